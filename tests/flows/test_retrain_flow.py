"""The `retrain` flow end to end, from Python and from its command line, on a generated archive.

Real components throughout: the session's Prefect server (tests/conftest.py), prepare_data on a zip,
train_model with a random-weights backbone at 32 px, a fresh sqlite MLflow store per test.
The stateful story (first run -> nothing changed -> a challenger trained without the audit's
suspects -> nothing changed -> forced run -> too much leakage stops a run -> the audit's CSV,
decided, as labels.csv -> a new model) is one test so that parallel test workers never split it.
Its archive holds what the data audit must find: near-copies in test of scenes in train,
blank frames and cats among the dogs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from flows.config import RetrainConfig
from flows.retrain import TRAINED, UNCHANGED, build_parser, config_from_args, main, retrain
from tasks.common.errors import DatasetValidationError
from tasks.common.files import sha256_bytes
from tasks.common.results import ChampionInfo, RetrainSummary
from tasks.models.report import summary_markdown, unchanged_reason
from tasks.models.steps import SUMMARY_ARTIFACT_KEY
from tasks.data.validate import ValidationThresholds
from tests.imagegen import (NEAR_COPIES, blank_bytes, image_bytes, jpeg_bytes, scene_pixels, write_petimages_tree,
                            zip_tree)

PER_CLASS = 20
FRACTIONS = (0.6, 0.2, 0.2)
TINY = {
    "backbones": ["vgg16"], "weights": None, "input_size": 32, "batch_size": 16,
    "head_epochs": 20, "dense_units": 8, "patience": 3,
    "split_fractions": FRACTIONS, "floor": 0.0, "max_leaked_test_share": 0.5,
    "thresholds": ValidationThresholds(min_per_class=10, min_per_class_per_split=1,
                                       max_class_imbalance=10.0, max_quarantined_share=0.2),
}


SPLIT_BY_HASH = {"train": lambda sha: sha < "1", "test": lambda sha: sha >= "f8"}
"""Where a content hash lands: a class's images are split in sha256 order (the lowest 60% train, the highest 20%
test: tasks/data/splits.py), so among ~25 images of a class one of the lowest 1/16 of hashes is in train and one of
the highest 1/32 in test (the archive is generated the same way every time, so this holds or fails for good)."""


def _first_in(split: str, make: Callable[[int], bytes], start: int = 0) -> bytes:
    """The first of `make(start), make(start + 1), ...` whose content hash puts it in `split`."""
    return next(data for data in map(make, itertools.count(start)) if SPLIT_BY_HASH[split](sha256_bytes(data)))


def _copied_scene(settings: dict, start: int) -> tuple[bytes, bytes]:
    """A scene whose JPEG lands in train and whose near-copy (`settings`) lands in test."""
    for seed in itertools.count(start):
        original, copy = jpeg_bytes(scene_pixels(seed)), jpeg_bytes(scene_pixels(seed), **settings)
        if SPLIT_BY_HASH["train"](sha256_bytes(original)) and SPLIT_BY_HASH["test"](sha256_bytes(copy)):
            return original, copy
    raise AssertionError("unreachable")


@functools.cache
def planted() -> dict[str, dict[str, bytes]]:
    """What the audit must find in the archive, by kind: PetImages-relative name -> bytes."""
    copies, scenes = {}, {}
    for index, (kind, settings) in enumerate(NEAR_COPIES.items()):
        scenes[f"Cat/scene_{kind}.jpg"], copies[f"Cat/scene_{kind}_copy.jpg"] = _copied_scene(settings, 10_000 * index)
    blanks = {f"Dog/blank_{name}.jpg": blank_bytes(colour)
              for name, colour in (("white", (255, 255, 255)), ("black", (0, 0, 0)), ("grey", (128, 128, 128)))}
    cats = {f"Dog/cat_{i}.jpg": _first_in("train", lambda seed: image_bytes("cat", seed), 700 + 1000 * i) for i in range(2)}
    return {"scenes": scenes, "copies": copies, "blanks": blanks, "mislabelled": cats}


def planted_hashes(kind: str) -> set[str]:
    return {sha256_bytes(data) for data in planted()[kind].values()}


@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    """A small PetImages-style archive (no faulty files: prepare's own tests cover those), with `planted()` files."""
    base = tmp_path_factory.mktemp("retrain-source")
    pet = write_petimages_tree(base / "tree", per_class=PER_CLASS, faults=False)
    for files in planted().values():
        for name, data in files.items():
            (pet / name).write_bytes(data)
    return zip_tree(base / "tree", base / "petimages.zip")


def tiny_config(source: Path, data_dir: Path, **overrides) -> RetrainConfig:
    return RetrainConfig(source=str(source), data_dir=str(data_dir), **{**TINY, **overrides})


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from tasks.models.store import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri())


def versions_by_alias(client) -> dict[str, str]:
    model = client.get_registered_model("cats-vs-dogs")
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def summary_artifacts(flow_run_id: str) -> list:
    """Artifacts of one flow run, read back from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.mark.slow
def test_retrain_registers_champion_then_skips_when_any_version_was_built_the_same_then_force_trains(
        mlflow_uri, petimages_zip, tmp_path):
    data_dir = tmp_path / "data"

    first = retrain(tiny_config(petimages_zip, data_dir))
    assert first.status == TRAINED
    assert first.decision.version == "1" and first.decision.promoted is True
    client = mlflow_client()
    assert versions_by_alias(client) == {"champion": "1"}
    run = client.get_run(first.mlflow.run_id)
    assert run.data.tags["prefect.flow_run_id"] == first.flow_run_id
    assert run.data.tags["dataset_fingerprint"] == first.data.fingerprint
    assert "test_roc_auc" in run.data.metrics
    work = [path.stat().st_mtime * 1000 for path in (data_dir / "features").rglob("shard-*")]
    work += [Path(first.model_path).stat().st_mtime * 1000]
    assert run.info.start_time <= min(work) and max(work) <= run.info.end_time  # the run spans the training
    assert client.get_experiment(run.info.experiment_id).name == "cats-vs-dogs"
    assert {item.dataset.name for item in run.inputs.dataset_inputs} == {
        "cats-vs-dogs-train", "cats-vs-dogs-validation", "cats-vs-dogs-test"}
    [artifact] = summary_artifacts(first.flow_run_id)
    assert artifact.key == SUMMARY_ARTIFACT_KEY and artifact.type == "markdown"
    assert "promoted to **champion**" in artifact.data and first.mlflow.run_url in artifact.data
    trainings = sorted((data_dir / "training").iterdir())

    # The data audit found what was planted, and the gate's test metrics left the leaked copies out.
    quality = first.quality
    report = pd.read_parquet(quality.report)
    found = {kind: set(report.loc[report["kind"] == kind, "sha256"]) for kind in ("leakage", "outlier", "label_issue")}
    assert planted_hashes("copies") <= found["leakage"] and planted_hashes("blanks") <= found["outlier"]
    assert planted_hashes("mislabelled") & found["label_issue"]  # on 50 images a cat among dogs is not always plain
    leaked = report[(report["kind"] == "leakage") & (report["split"] == "test")]
    assert set(leaked["other_sha256"]) >= planted_hashes("scenes")  # named with the training image they copy
    assert first.test_metrics["n_left_out"] == quality.leaked_test_images == leaked["sha256"].nunique() >= 2
    assert first.test_metrics["n_images"] == sum(first.data.counts["test"].values()) - quality.leaked_test_images
    for name in ("label_issues", "near_duplicates", "leaked_test_images"):
        assert run.data.metrics[f"quality.{name}"] == getattr(quality, name)
    assert [item.path for item in client.list_artifacts(first.mlflow.run_id, "data/quality")][:1] == \
        ["data/quality/audit.csv"]
    assert "## Data quality" in artifact.data and f"{quality.leaked_test_images} test image(s)" in artifact.data

    # Same data, same model config: gate settings are not part of "the config", so still unchanged.
    second = retrain(tiny_config(petimages_zip, data_dir, margin=0.5))
    assert second.status == UNCHANGED
    assert "nothing changed" in second.reason and "registered version(s) 1" in second.reason
    assert sorted((data_dir / "training").iterdir()) == trainings, "an unchanged run must not train"
    assert len(client.search_model_versions("name='cats-vs-dogs'")) == 1
    skipped = client.get_run(second.mlflow.run_id)
    assert skipped.data.tags["catsdogs.kind"] == "skipped"
    assert skipped.data.tags["prefect.flow_run_id"] == second.flow_run_id
    [artifact] = summary_artifacts(second.flow_run_id)
    assert "Training skipped" in artifact.data

    # Another model config, without the audit's suspects, and a margin no model can beat: trained, kept as
    # challenger; the champion was scored on the same test images, leaked ones left out for both.
    challenger = {"dense_units": 16, "margin": 1.0, "exclude_suspected_labels": True}
    third = retrain(tiny_config(petimages_zip, data_dir, **challenger))
    assert third.status == TRAINED
    assert third.decision.version == "2" and third.decision.alias == "challenger"
    assert any("does not beat" in reason for reason in third.decision.reasons)
    assert versions_by_alias(client) == {"champion": "1", "challenger": "2"}
    suspects = report[(report["kind"] == "label_issue") & (report["split"] == "train")]
    left_out = client.get_run(third.mlflow.child_run_ids["vgg16"]).data.metrics["suspects_left_out"]
    assert left_out == len(suspects) >= len(planted()["mislabelled"])
    assert third.decision.champion_metrics["n_images"] == third.test_metrics["n_images"] == first.test_metrics["n_images"]
    trainings = sorted((data_dir / "training").iterdir())

    # The same again: the champion was built from another config, but version 2 from this one,
    # so nothing is trained and no identical twin of version 2 is registered.
    fourth = retrain(tiny_config(petimages_zip, data_dir, **challenger))
    assert fourth.status == UNCHANGED and "registered version(s) 2" in fourth.reason, fourth.headline
    assert third.config_hash[:12] in fourth.reason
    assert sorted((data_dir / "training").iterdir()) == trainings
    assert len(client.search_model_versions("name='cats-vs-dogs'")) == 2

    # force trains although nothing changed.
    fifth = retrain(tiny_config(petimages_zip, data_dir, **challenger, force=True))
    assert fifth.status == TRAINED and fifth.decision.version == "3" and fifth.decision.alias == "challenger"
    assert versions_by_alias(client) == {"champion": "1", "challenger": "3"}
    assert len(sorted((data_dir / "training").iterdir())) == len(trainings) + 1

    # More leaked test images than allowed: the run stops before any head is trained, naming the findings.
    with pytest.raises(DatasetValidationError, match=r"leaked_test_share: .* > 0\.1\b.*audit\.csv.*--max-leaked-test-share"):
        retrain(tiny_config(petimages_zip, data_dir, **challenger, force=True, max_leaked_test_share=0.1))
    assert len(client.search_model_versions("name='cats-vs-dogs'")) == 3

    # The audit's CSV with decisions, saved as labels.csv: the data changed, so the next run trains and says why.
    decided = pd.read_csv(quality.csv, keep_default_na=False)
    decided.loc[decided["kind"].isin(["leakage", "outlier"]), "decision"] = "exclude"
    decided.loc[decided["sha256"].isin(planted_hashes("mislabelled")), "decision"] = "relabel"
    by_path = [{"path": f"PetImages/{name}", "decision": "cat"} for name in planted()["mislabelled"]]  # the source's path
    pd.concat([decided, pd.DataFrame(by_path)]).to_csv(data_dir / "labels.csv", index=False)
    sixth = retrain(tiny_config(petimages_zip, data_dir, **challenger))
    assert sixth.status == TRAINED and sixth.decision.version == "4", sixth.headline
    assert sixth.data.fingerprint != fifth.data.fingerprint
    overrides = sixth.data.label_overrides
    assert overrides.relabelled == len(planted()["mislabelled"]) and overrides.excluded >= 5
    assert client.get_model_version("cats-vs-dogs", "4").tags["data.label_overrides"] == overrides.text()
    assert sixth.data.quarantine_reasons["excluded"] == overrides.excluded
    assert sixth.quality.leaked_test_images == 0 and sixth.test_metrics["n_left_out"] == 0


def test_cli_reports_a_missing_source_in_one_sentence(mlflow_uri, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "kagglecatsanddogs.zip"
    code = main(["--source", str(missing), "--data-dir", str(tmp_path / "data"), "--weights", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_an_unknown_backbone_before_running(tmp_path, capsys):
    code = main(["--source", str(tmp_path), "--backbones", "resnet5O"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: invalid --backbones:") and "resnet5o" in err.lower()
    assert not (tmp_path / "data").exists()


def test_cli_options_map_onto_the_config_and_keep_defaults():
    args = build_parser().parse_args(["--source", "x.zip", "--backbones", "vgg16,resnet50", "mobilenet_v2",
                                      "--weights", "none", "--epochs", "3", "--fine-tune",
                                      "--min-per-class", "5", "--decoder", "pillow", "--precision", "float32"])
    config = config_from_args(args)
    assert config.backbones == ["vgg16", "resnet50", "mobilenet_v2"]
    assert config.decoder == "pillow" and config.precision == "float32"
    assert config.weights is None and config.head_epochs == 3 and config.fine_tune is True
    assert config.thresholds.min_per_class == 5 and config.thresholds.min_per_class_per_split == 50
    assert config.force is False and config.data_dir == "data"  # untouched options keep the model's defaults
    assert config_from_args(build_parser().parse_args([])) == RetrainConfig()
    every_field = {name for name in RetrainConfig.model_fields if name != "thresholds"}
    every_field |= set(RetrainConfig.model_fields["thresholds"].annotation.model_fields)
    assert every_field <= set(vars(build_parser().parse_args([])))  # the CLI is generated: no field is missing


def test_flow_survives_pickling_by_value_as_flow_serve_does():
    """`retrain.serve` ships the flow to each run's process with cloudpickle (by value): the
    `config` parameter must still validate into a RetrainConfig there."""
    import cloudpickle

    clone = cloudpickle.loads(cloudpickle.dumps(retrain))
    assert clone.fn.__globals__ is not retrain.fn.__globals__
    assert isinstance(clone.validate_parameters({"config": {"weights": None}})["config"], RetrainConfig)


def test_unchanged_names_every_version_built_from_this_data_and_config():
    built = [ChampionInfo(version=v, run_id=None, model_uri=f"models:/cats-vs-dogs/{v}", dataset_fingerprint="f" * 64,
                          config_hash="c" * 64, metrics={}) for v in ("4", "3")]
    reason = unchanged_reason("f" * 64, "c" * 64, built)
    assert "registered version(s) 4, 3" in reason
    assert "another Keras backend, or the precision, engine or image decoder that auto picks on this host, is not a " \
           "change: --force" \
        in reason
    assert unchanged_reason("f" * 64, "c" * 64, []) is None
    assert unchanged_reason("", "", built) is None


def test_config_hash_ignores_retrain_only_fields():
    base = RetrainConfig(weights=None)
    assert base.config_hash() == RetrainConfig(weights=None, source="kaggle", floor=0.5, margin=0.1,
                                               force=True, data_dir="/elsewhere").config_hash()
    assert base.config_hash() != RetrainConfig(weights=None, head_epochs=7).config_hash()


def test_summary_markdown_shows_metrics_decision_and_link():
    from tasks.common.results import Int8Check, MlflowRun, PreparePaths, PrepareSummary, Promotion

    paths = PreparePaths(data_dir="/d", manifest="/d/m", arranged="/d/a", validation_result="/d/r",
                         data_docs="/d/i", summary="/d/s")
    summary = RetrainSummary(
        status=TRAINED, headline="version 2 promoted to champion", flow_run_id=None, config_hash="ab" * 32,
        data=PrepareSummary(layout="petimages", counts={"train": {"cat": 8, "dog": 9}}, unlabelled=0, quarantined=1,
                            quarantine_reasons={}, fingerprint="cd" * 32, paths=paths),
        champion_before=ChampionInfo(version="1", run_id="r0", model_uri="models:/cats-vs-dogs/1",
                                     dataset_fingerprint="ee" * 32, config_hash="ab" * 32,
                                     metrics={"roc_auc": 0.91}),  # on its own, older test split
        test_metrics={"roc_auc": 0.95, "accuracy": 0.9},
        decision=Promotion(version="2", model_name="cats-vs-dogs", promoted=True, alias="champion", metric="roc_auc",
                           candidate_value=0.95, champion_value=0.93, champion_metrics={"roc_auc": 0.93, "accuracy": 0.85},
                           model_uri="models:/cats-vs-dogs/2", reasons=["beats the champion"],
                           previous_champion_version="1"),
        mlflow=MlflowRun(run_id="r1", experiment_id="1", run_url="http://127.0.0.1:5000/#/experiments/1/runs/r1",
                         tracking_uri="sqlite:///x"),
        int8_check=Int8Check(images=40, calibration_images=300, float32={"accuracy": 0.9, "roc_auc": 0.95,
                                                                         "log_loss": 0.3},
                             int8={"accuracy": 0.875, "roc_auc": 0.95, "log_loss": 0.31}, feature_relative_l2=0.2,
                             max_probability_gap=0.1))
    text = summary_markdown(summary)
    assert "- int8: the head on int8 features of 40 validation images scored accuracy 0.8750 (float32 0.9000)" in text
    assert "| roc_auc | 0.9500 | 0.9300 |" in text  # the champion re-scored on this test split, as the gate saw it
    assert "| accuracy | 0.9000 | 0.8500 |" in text and "0.9100" not in text
    assert "| train | 8 | 9 |" in text
    assert "promoted to **champion**" in text and "- beats the champion" in text
    assert "[r1](http://127.0.0.1:5000/#/experiments/1/runs/r1)" in text and "models:/cats-vs-dogs/2" in text
    assert "- All training runs: http://127.0.0.1:5000/#/experiments/1/runs\n" in text  # the MLflow UI's runs table
