"""The train_model flow end to end on a real (temporary) Prefect server and generated images.

Cats are warm and striped, dogs cool and checkered, so even a randomly initialised
VGG16 at 32 px plus a trained head separates them: test accuracy well above chance
proves that labels travel correctly from the manifest through features, head, model and
evaluation. A random MobileNetV2 is compared alongside: its pooled features vanish (~1e-12),
so it must lose the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import tasks.learning.layers  # noqa: F401  (registers the served model's mirror and temperature for loading)
import tasks.learning.preprocess  # noqa: F401  (registers the Preprocess layer for loading)
from flows.config import TrainConfig
from flows.train import train_model
from tasks.common.errors import InputError
from tasks.data.datafolder import DataFolder
from tasks.learning.calibration import apply_temperature
from tasks.learning.evaluate import PREDICTION_COLUMNS
from tasks.learning.extractor import feature_model
from tasks.learning.forward import compiled_forward, to_numpy
from tasks.learning.pixels import read_image
from tasks.learning.runs import rank_backbones
from tasks.learning.shards import load_features
from tasks.learning.layers import core_of
from tests.imagegen import class_pixels
from tests.prepared import make_prepared_dir

pytestmark = pytest.mark.slow  # two trainings, one of them fine-tuned, shared by the module

CONFIG = TrainConfig(backbones=["vgg16", "mobilenet_v2"], weights=None, input_size=32, batch_size=16,
                     head_epochs=25, head_batch_size=8, patience=5, fine_tune=False, fine_tune_epochs=1, seed=11)
BEST = "vgg16"
IMAGES = 2 * (10 + 4 + 5)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Head-only run comparing two backbones into the default output folder."""
    data_dir = make_prepared_dir(tmp_path_factory.mktemp("train"), {"train": 10, "validation": 4, "test": 5})
    return data_dir, train_model(data_dir, CONFIG)


@pytest.fixture(scope="module")
def second_run(first_run, tmp_path_factory):
    """The same data again, now with fine-tuning and test-time augmentation."""
    data_dir, _ = first_run
    result = train_model(data_dir, CONFIG.model_copy(update={"fine_tune": True, "tta": "flip"}))
    return Path(result.output_dir), result


def test_the_flow_learns_from_the_labels_and_picks_the_better_backbone(first_run):
    _, result = first_run
    metrics = result.test_metrics
    assert metrics["count"] == 10
    assert metrics["accuracy"] >= 0.8 and metrics["roc_auc"] >= 0.8, metrics
    assert result.chosen_backbone == BEST and result.backbones[BEST].val_auc >= 0.8
    assert result.head_agreement < 1e-4  # the saved model is the head that was validated
    comparison = pd.read_csv(result.comparison_path)
    ensemble = result.ensemble  # two backbones: a head on their concatenated features competes with them
    assert ensemble.backbone == "vgg16+mobilenet_v2" and ensemble.members == CONFIG.backbones
    assert ensemble.feature_dim == sum(entry.feature_dim for entry in result.backbones.values())
    assert comparison["backbone"].tolist() == rank_backbones({**result.backbones, ensemble.backbone: ensemble})
    assert comparison["backbone"].iloc[0] == BEST and comparison["chosen"].tolist() == [True, False, False]
    assert comparison["backbone"].tolist().index(BEST) < comparison["backbone"].tolist().index("mobilenet_v2")


def test_result_follows_the_contract_and_every_path_exists(first_run):
    data_dir, result = first_run
    assert result.input_size == 32 and result.config == CONFIG.model_dump(mode="json")
    sizes = {"train": 10, "validation": 4, "test": 5}
    assert result.counts == {split: {"cat": n, "dog": n} for split, n in sizes.items()}
    output_dir = Path(result.output_dir)
    assert output_dir.parent == data_dir / "training" and output_dir.name.endswith(CONFIG.config_hash()[:8])
    assert Path(result.model_path) == output_dir / "model.keras"
    for key in ("model_path", "comparison_path", "predictions_path", "metrics_path"):
        assert Path(getattr(result, key)).is_file(), key
    assert set(result.plots) == {"head_curves", "roc_curve", "confusion_matrix", "top_losses", "reliability"}
    assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in result.plots.values())
    assert set(result.history_paths) == {f"head:{name}" for name in [*CONFIG.backbones, result.ensemble.backbone]}
    calibration = result.calibration  # fitted on validation, judged on test, in the metrics file too
    assert calibration.applied == (calibration.temperature != 1.0) and calibration.reliability_plot
    assert set(calibration.test["before"]) == set(calibration.test["after"]) == {"ece", "log_loss", "brier"}
    assert calibration.validation["after"]["log_loss"] <= calibration.validation["before"]["log_loss"]
    assert json.loads(Path(result.metrics_path).read_text())["calibration"]["temperature"] == calibration.temperature
    assert set(result.test_metrics) >= {"accuracy", "roc_auc", "log_loss", "precision_cat", "recall_dog",
                                            "f1_cat", "f1_dog", "confusion_matrix"}
    assert Path(result.backbones[BEST].head_path).is_file()
    assert not result.fine_tuned and result.fine_tune is None
    assert json.loads((output_dir / "train_summary.json").read_text()) == result.model_dump(mode="json")
    assert not list(output_dir.rglob(".*.tmp*")), "a temporary file was left behind"
    assert not [p for p in (data_dir / "training").iterdir() if p.name.startswith(".")], "a partial folder was left"
    assert result.devices.backend == keras.config.backend() and result.devices.precision in ("bfloat16", "float32")
    # precision "auto" was measured per backbone on this CPU, once, and the chosen backbone's is the run's
    verdicts = sorted(p.name for p in DataFolder(data_dir).precision_verdicts.glob("*.json"))
    assert len(verdicts) == 2 and all(f"-{name}-32-" in " ".join(verdicts) for name in CONFIG.backbones)
    assert result.devices.precision == result.backbones[BEST].precision and "x float32" in result.devices.reason
    assert result.decoder == "opencv"  # "auto" where OpenCV is installed, recorded with the features
    # engine "auto" too: measured once per backbone, and the engine each computed on is in its cache key
    assert len(list(DataFolder(data_dir).engine_verdicts.glob("*.json"))) == 2
    assert all(Path(entry.feature_cache_dir).name.endswith("-opencv" if entry.engine == "keras" else "-opencv-openvino")
               for entry in result.backbones.values())
    assert result.devices.engine == result.backbones[BEST].engine and "x Keras/" in result.devices.engine_reason
    assert (result.engine_model_path is not None) == (result.devices.engine == "openvino")  # its IR ships beside it


def test_cat_is_0_and_dog_is_1_in_every_output(first_run):
    data_dir, result = first_run
    predictions = pd.read_csv(result.predictions_path, dtype={"sha256": str})
    assert tuple(predictions.columns) == PREDICTION_COLUMNS
    truth = DataFolder(data_dir).labelled_rows("test").set_index("sha256")["label"]
    assert (predictions["label"] == predictions["sha256"].map(truth).map({"cat": 0, "dog": 1})).all()
    assert (predictions["predicted"] == (predictions["p_dog"] >= 0.5).astype(int)).all()
    matrix = result.test_metrics["confusion_matrix"]
    assert sum(matrix[0]) == result.test_metrics["support_cat"] == (predictions["label"] == 0).sum()
    assert sum(matrix[1]) == result.test_metrics["support_dog"] == (predictions["label"] == 1).sum()
    model = keras.saving.load_model(result.model_path, safe_mode=True)
    clear = np.stack([class_pixels("cat", 4242, (32, 32)), class_pixels("dog", 4242, (32, 32))])
    p_cat, p_dog = to_numpy(compiled_forward(model)(clear)).reshape(-1)
    assert p_cat < 0.5 < p_dog


def test_second_run_computes_no_features_and_repeats_the_heads(first_run, second_run):
    _, first = first_run
    _, second = second_run
    for name in CONFIG.backbones:
        assert first.backbones[name].features_computed == IMAGES
        assert second.backbones[name].features_computed == 0
        assert second.backbones[name].features_reused == IMAGES
        assert second.backbones[name].weights == first.backbones[name].weights  # same random draw
        for key in ("val_auc", "val_loss", "val_accuracy"):  # seeded heads on the same features
            assert getattr(second.backbones[name], key) == getattr(first.backbones[name], key)


def test_fine_tuning_run_is_recorded_and_its_model_reloads_with_the_evaluated_predictions(first_run, second_run):
    data_dir, _ = first_run
    output_dir, result = second_run
    assert result.output_dir == str(output_dir) and result.chosen_backbone == BEST
    # VGG16's top block (three convolutions) opened; it has no BatchNorm to keep frozen (test_finetune's
    # MobileNetV2 checks that rule)
    assert result.fine_tune.trainable_layers == 3 and result.fine_tune.frozen_batchnorm == 0
    assert result.fine_tuned == result.fine_tune.improved
    assert set(result.history_paths) == {f"head:{name}" for name in [*CONFIG.backbones, result.ensemble.backbone]} \
        | {"fine_tune"}
    assert "fine_tune_curves" in result.plots and result.test_metrics["accuracy"] >= 0.8
    model = keras.saving.load_model(result.model_path, safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 1)
    predictions = pd.read_csv(result.predictions_path)
    images = np.stack([read_image(data_dir / p, 32, decoder=result.decoder) for p in predictions["path"]])
    np.testing.assert_allclose(to_numpy(compiled_forward(model)(images)).reshape(-1), predictions["p_dog"], atol=1e-5)
    # --tta flip: the mirrors' features are a feature space of their own, every candidate is scored with them
    # on validation, and the served model averages each image with its mirror, then applies its temperature
    assert result.tta == "flip"
    for entry in [*result.backbones.values(), result.ensemble]:
        assert set(entry.val_tta) == {"accuracy", "log_loss", "roc_auc"}
    for entry in result.backbones.values():
        assert entry.mirrored_cache_dir == entry.feature_cache_dir + "-flip"
        assert len(list(Path(entry.mirrored_cache_dir).glob("shard-*.npz"))) >= 1
    assert pd.read_csv(result.comparison_path)["val_auc_tta"].notna().all()
    entry, sha256 = result.backbones[BEST], predictions["sha256"].iloc[0]  # the cached mirror is the mirrored image's
    features = feature_model(BEST, entry.weights, 32, entry.precision)(images[:1, :, ::-1], training=False)
    mirrored = load_features(entry.mirrored_cache_dir, [sha256])
    np.testing.assert_allclose(mirrored, to_numpy(features), rtol=1e-2, atol=1e-3)
    assert not np.allclose(mirrored, load_features(entry.feature_cache_dir, [sha256]), rtol=1e-2, atol=1e-3)
    core = core_of(model)
    averaged = (to_numpy(core(images, training=False)) + to_numpy(core(images[:, :, ::-1], training=False))) / 2
    np.testing.assert_allclose(apply_temperature(averaged.reshape(-1), result.calibration.temperature),
                               predictions["p_dog"], atol=1e-5)


def test_the_audit_alone_reuses_the_training_runs_features_and_findings(first_run, tmp_path, capsys):
    from flows.audit import audit, main, summary_text
    from flows.config import AuditConfig

    data_dir, result = first_run
    summary = audit(AuditConfig(data_dir=str(data_dir), backbones=[BEST], weights=None, input_size=32, seed=CONFIG.seed))
    found = summary.audits[BEST]
    assert found.reused and found == result.backbones[BEST].quality.model_copy(update={"reused": True})
    assert found.images == IMAGES and Path(found.csv).parent.name == Path(result.backbones[BEST].feature_cache_dir).name
    assert f"findings: {found.csv}" in summary_text(summary) and summary.data_fingerprint is None  # not via prepare
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run prepare_data" in err and "Traceback" not in err


def test_rank_backbones_prefers_auc_then_loss_then_config_order():
    summaries = {
        "a": {"val_auc": 0.90, "val_loss": 0.30}, "b": {"val_auc": 0.95, "val_loss": 0.40},
        "c": {"val_auc": 0.95, "val_loss": 0.20}, "d": {"val_auc": None, "val_loss": 0.10},
        "e": {"val_auc": 0.95, "val_loss": 0.20},
    }
    assert rank_backbones(summaries) == ["c", "e", "b", "a", "d"]


def test_unknown_backbone_fails_before_any_work(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 1, "validation": 1, "test": 1})
    with pytest.raises(Exception, match="resnet5.*choose from") as error:
        train_model(data_dir, {"backbones": ["resnet5"], "weights": None})
    assert "vgg16" in str(error.value)
    assert not (data_dir / "features").exists() and not (data_dir / "training").exists()


def test_a_folder_without_manifest_fails_with_the_fix(tmp_path):
    with pytest.raises(InputError, match="prepare_data"):
        train_model(tmp_path, TrainConfig(backbones=["vgg16"], weights=None, input_size=32))


def test_the_ensemble_is_served_end_to_end_as_its_head_was_validated(first_run, tmp_path):
    """Chosen, the ensemble runs each member's backbone with its own preprocessing on the one image, once."""
    from tasks.learning import steps
    from tasks.learning.gradcam import GradCam

    data_dir, result = first_run
    exported = steps.export_ensemble.fn(str(data_dir), str(tmp_path), result.ensemble, result.backbones, 8, result.decoder)
    assert exported.head_agreement < 1e-4 and not exported.fine_tuned
    model = keras.saving.load_model(exported.model_path, safe_mode=True)
    backbones = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(backbones) == 2 and len([layer for layer in model.layers if layer.name.startswith("preprocess_")]) == 2
    clear = np.stack([class_pixels("cat", 4242, (32, 32)), class_pixels("dog", 4242, (32, 32))])
    heat = GradCam(model).heatmaps(clear, np.array([0, 1]))  # one map per member, scaled and averaged
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all()
