"""Stand-ins for train_model's and prepare_data's outputs, made of real files, for the models wing's tests.

Tracking, registry, serving and predict tests need a trained end-to-end model and a
train-result dict, not a training run: a 3-layer Keras model whose weights are set by hand
(p(dog) rises with blue minus red, which is exactly how tests/imagegen.py draws dogs and
cats) is trained in no time and is a real `.keras` file with the contract's input and output.
Other weights give a reliably mediocre or a reliably wrong model (MEDIOCRE, INVERTED).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.common.results import BackboneResult, DeviceSetup, PreparePaths, PrepareSummary, TrainResult
from tasks.learning.pixels import resolve_decoder

TINY_SIZE = 32

GOOD = (-10.0, 0.0, 10.0, 0.0)
"""Weights on mean (red, green, blue) and a bias: blue minus red separates the generated classes perfectly."""

MEDIOCRE = (0.0, 10.0, 0.0, -2.0)
"""Green only: weakly related to the class (ROC AUC 0.75, accuracy 0.75 on make_prepared_dir's test split)."""

INVERTED = (10.0, 0.0, -10.0, 0.0)
"""Red minus blue: every generated image is scored wrong (ROC AUC 0)."""

UNCALIBRATED = (-0.001, 0.0, 0.001, -0.01)
"""Blue minus red, whispered below the threshold: every score is just under 0.5, so every image is
called a cat (accuracy at chance), though the scores rank the images perfectly (ROC AUC 1.0)."""


CHAMPION_TEMPERATURE = 1.5
"""The temperature inside every fake model: the served layers are in what every model test loads."""


def tiny_model(path: Path, *, rgb: tuple[float, float, float, float] = GOOD, size: int = TINY_SIZE,
               tta: bool = True, temperature: float | None = CHAMPION_TEMPERATURE) -> Path:
    """Save a served model of train_model's shape as .keras: Preprocess("tf") -> backbone -> head_output,
    wrapped like tasks/learning/shipped.py does (test-time augmentation and a temperature by default).

    The "backbone" is a nested model (an identity 1x1 convolution, then global average
    pooling, as every real backbone ends), so Grad-CAM finds maps in it; the head is
    p(dog) = sigmoid(rgb[:3] . (mean colour / 127.5 - 1) + rgb[3]), at the temperature; see GOOD,
    MEDIOCRE, INVERTED, UNCALIBRATED (a mean colour is the same mirrored, and a temperature moves
    no score across 0.5, so each keeps what it is named for). `Preprocess`, `MirrorImages` and
    `Temperature` are the project's registered layers, so every load of this model proves the
    serving code registers them first.
    """
    import keras

    from tasks.learning.preprocess import Preprocess
    from tasks.learning.layers import wrap

    conv = keras.layers.Conv2D(3, 1, name="conv")
    backbone_input = keras.Input(shape=(size, size, 3), name="image")
    backbone = keras.Model(backbone_input, keras.layers.GlobalAveragePooling2D(name="avg_pool")(conv(backbone_input)),
                           name="tiny_backbone")
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.zeros(3, dtype=np.float32)])
    inputs = keras.Input(shape=(size, size, 3), dtype="uint8", name="pixels")
    x = Preprocess("tf", name="preprocess")(inputs)  # the project's custom layer: loading must find it
    dense = keras.layers.Dense(1, activation="sigmoid", name="head_output")
    outputs = dense(backbone(x))
    model = keras.Model(inputs, outputs, name="catsdogs_tiny")
    dense.set_weights([np.array(rgb[:3], dtype=np.float32).reshape(3, 1), np.array(rgb[3:], dtype=np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    wrap(model, tta, temperature).save(path)
    return path


REGION = (slice(0, 16), slice(16, 32))
"""Where region_model looks in a 32-pixel image: the top right quadrant (a transposed map would land bottom left)."""


def region_model(size: int = TINY_SIZE) -> Any:
    """A served-shape model whose class is decided by one region: a blue patch is a dog, a red one a cat.

    Its backbone's only convolution (3x3, stride 2) sees blue minus red and red minus blue above a
    threshold, which grey noise never reaches; its head weighs the two maps' means against each
    other. Made by hand, so Grad-CAM is checked against a model whose reasons are known exactly.
    """
    import keras

    from tasks.learning.head_input import HEAD_LAYER_NAMES
    from tasks.learning.preprocess import Preprocess

    kernel = np.zeros((3, 3, 3, 2), dtype=np.float32)
    kernel[1, 1, 2, 0], kernel[1, 1, 0, 0] = 1.0, -1.0  # blue - red
    kernel[1, 1, 0, 1], kernel[1, 1, 2, 1] = 1.0, -1.0  # red - blue
    conv = keras.layers.Conv2D(2, 3, strides=2, padding="same", activation="relu", name="conv")
    image = keras.Input(shape=(size, size, 3), name="image")
    backbone = keras.Model(image, keras.layers.GlobalAveragePooling2D(name="avg_pool")(conv(image)),
                           name="region_backbone")
    conv.set_weights([kernel, np.full(2, -0.5, dtype=np.float32)])
    pixels = keras.Input(shape=(size, size, 3), dtype="uint8", name="pixels")
    head = keras.layers.Dense(1, activation="sigmoid", name=HEAD_LAYER_NAMES[-1])
    model = keras.Model(pixels, head(backbone(Preprocess("tf", name="preprocess")(pixels))), name="catsdogs_region")
    head.set_weights([np.array([[12.0], [-12.0]], dtype=np.float32), np.zeros(1, dtype=np.float32)])
    return model


def region_pixels(label: str, seed: int, size: int = TINY_SIZE) -> np.ndarray:
    """Grey noise everywhere, and in REGION a blue (dog) or red (cat) patch: the picture's one deciding region."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(60, 200, (size, size, 1))
    pixels = np.clip(grey + rng.normal(0, 6, (size, size, 3)), 0, 255)
    colour = (30, 60, 230) if label == "dog" else (230, 60, 30)
    pixels[REGION] = np.asarray(colour) + rng.normal(0, 8, (REGION[0].stop - REGION[0].start,
                                                           REGION[1].stop - REGION[1].start, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")
    return path


def fake_train_result(out: Path, *, rgb: tuple[float, float, float, float] = GOOD, test_auc: float = 0.97,
                      backbones: tuple[str, ...] = ("resnet50", "mobilenet_v2"),
                      fine_tune: bool = True, size: int = TINY_SIZE, engine: str = "keras") -> TrainResult:
    """A TrainResult (what train_model returns) pointing at real files under `out`.

    `engine` "openvino" ships the model's OpenVINO IR beside it, as a run on that engine does (its head input
    the second output).
    """
    out.mkdir(parents=True, exist_ok=True)
    model_path = tiny_model(out / "model.keras", rgb=rgb, size=size)
    engine_model = None
    if engine == "openvino":
        from tasks.learning.head_input import with_head_input
        from tasks.learning.openvino_engine import export_ir
        from tasks.models.pyfunc import load_keras_model

        engine_model = str(export_ir(with_head_input(load_keras_model(model_path)), out / "model.openvino"))
    history_paths: dict[str, str] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(backbones):
        history = {"loss": [0.7, 0.5, 0.4], "accuracy": [0.5, 0.8, 0.9],
                   "val_loss": [0.6, 0.45 + index / 10, 0.42], "val_accuracy": [0.6, 0.85, 0.88]}
        path = out / "heads" / f"{name}.history.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(history))
        history_paths[f"head:{name}"] = str(path)
        summaries[name] = BackboneResult(
            backbone=name, weights="imagenet", input_size=size, precision="float32", engine=engine, int8_check=None,
            feature_dim=3,
            feature_cache_dir=str(out / "cache"),
            features_computed=24, features_reused=0, head_path=str(out / "heads" / f"{name}.keras"),
            history_path=str(path), val_accuracy=0.88 - index / 10, val_loss=0.42 + index / 10,
            val_auc=0.95 - index / 10, epochs_run=3, best_epoch=3)
    if fine_tune:
        path = out / "fine_tune.history.json"
        path.write_text(json.dumps({"loss": [0.3, 0.25], "val_loss": [0.35, 0.33], "val_auc": [0.96, 0.97]}))
        history_paths["fine_tune"] = str(path)
    comparison = out / "comparison.csv"
    pd.DataFrame([{"backbone": name, "chosen": i == 0, **summaries[name].model_dump()}
                  for i, name in enumerate(backbones)]).to_csv(comparison, index=False)
    predictions = out / "predictions.csv"
    pd.DataFrame({"path": ["arranged/test/cats/a.jpg", "arranged/test/dogs/b.jpg"], "sha256": ["a", "b"],
                  "label": [0, 1], "p_dog": [0.1, 0.9], "predicted": [0, 1]}).to_csv(predictions, index=False)
    plots = {"roc_curve": str(_png(out / "plots" / "roc_curve.png", (200, 50, 50))),
             "confusion_matrix": str(_png(out / "plots" / "confusion_matrix.png", (50, 50, 200)))}
    config = {"backbones": list(backbones), "weights": None, "input_size": size, "head_epochs": 3,
              "fine_tune": fine_tune, "batch_size": 8, "seed": 42}
    import keras

    return TrainResult(
        chosen_backbone=backbones[0], backbones=summaries,
        test_metrics={"accuracy": 0.9, "roc_auc": test_auc, "log_loss": 0.3, "count": 8,
                      "precision_cat": 0.9, "recall_cat": 0.9, "confusion_matrix": [[4, 0], [1, 3]]},
        val_metrics={"accuracy": 0.88, "roc_auc": 0.95, "log_loss": 0.35, "threshold": 0.5},
        model_path=str(model_path), engine_model_path=engine_model, input_size=size, output_dir=str(out), plots=plots,
        comparison_path=str(comparison), history_paths=history_paths, predictions_path=str(predictions),
        metrics_path=str(out / "metrics.json"), fine_tuned=fine_tune, fine_tune=None, head_agreement=0.0,
        devices=DeviceSetup(backend=keras.config.backend(), device="CPU", gpus=0, device_name="test CPU",
                            precision="float32", reason="tests", engine=engine, engine_reason="tests"),
        decoder=resolve_decoder("auto"),
        counts={"train": {"cat": 10, "dog": 10}}, config=config, config_hash="c" * 64, data_dir=str(out),
        data_fingerprint="f" * 64)


def fake_prepare_summary(data_dir: Path, *, fingerprint: str = "f" * 64) -> PrepareSummary:
    """A PrepareSummary with a real manifest, GX result JSON and Data Docs folder under data_dir."""
    validation = data_dir / "validation"
    (validation / "data_docs").mkdir(parents=True, exist_ok=True)
    (validation / "result.json").write_text(json.dumps({"success": True, "results": []}))
    (validation / "data_docs" / "index.html").write_text("<html><body>Data Docs</body></html>")
    counts = {"train": {"cat": 10, "dog": 10}, "validation": {"cat": 4, "dog": 4}, "test": {"cat": 4, "dog": 4}}
    rows = [{"sha256": f"{split}{label}{i}", "label": label, "split": split, "status": "ok",
             "arranged_path": f"arranged/{split}/{label}s/{i}.jpg"}
            for split, per_class in counts.items() for label, n in per_class.items() for i in range(n)]
    pd.DataFrame(rows).to_parquet(data_dir / "manifest.parquet", index=False)
    return PrepareSummary(
        layout="petimages", counts=counts, unlabelled=0, quarantined=2,
        quarantine_reasons={"empty_file": 1, "undecodable": 1}, fingerprint=fingerprint,
        paths=PreparePaths(data_dir=str(data_dir), manifest=str(data_dir / "manifest.parquet"),
                           arranged=str(data_dir / "arranged"), validation_result=str(validation / "result.json"),
                           data_docs=str(validation / "data_docs" / "index.html"),
                           summary=str(data_dir / "prepare_summary.json")))


_TEMPLATE_DB: Path | None = None


def template_db() -> Path:
    """An empty, fully migrated MLflow sqlite db, made once per test process.

    A fresh store runs MLflow's ~50 schema migrations (seconds on a busy CI core); copying
    a migrated empty db gives the same fresh store in milliseconds.
    """
    global _TEMPLATE_DB
    if _TEMPLATE_DB is None or not _TEMPLATE_DB.is_file():
        from mlflow.tracking import MlflowClient

        db = Path(tempfile.mkdtemp(prefix="mlflow-template-", dir=os.environ.get("CATSDOGS_TEST_HOME"))) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        _TEMPLATE_DB = db
    return _TEMPLATE_DB


def seed_store(uri: str) -> str:
    """Put a migrated empty db at a `sqlite:///` URI's path (which must not exist yet)."""
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():
        shutil.copyfile(template_db(), db)
    return uri


@pytest.fixture
def mlflow_store(mlflow_uri: str) -> str:
    """conftest's `mlflow_uri` (a fresh store per test), pre-migrated from the template db."""
    return seed_store(mlflow_uri)


def promoted_champion(root: Path, **train_kwargs: Any) -> tuple[str, TrainResult]:
    """A fresh store under root whose `cats-vs-dogs@champion` is a fake training run's model.

    Logged by `log_retrain` and promoted by the gate, so tests load exactly what users load.
    Returns the store's tracking URI and the fake train result.
    """
    from tasks.models.promotion import register_and_gate
    from tasks.models.tracking import log_retrain

    uri = seed_store(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        result = fake_train_result(root / "train", **train_kwargs)
        logged = log_retrain(fake_prepare_summary(root / "data"), result, result.config, source="tests")
        gate = register_and_gate(logged.run_id, logged.model_uri, result.test_metrics,
                                 evaluate_champion=None, floor=0.5, margin=0.0)
    assert gate.alias == "champion"
    return uri, result
