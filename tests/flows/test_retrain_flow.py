"""The `retrain` flow end to end, from Python and from its command line, on a generated archive.

Real components throughout: the session's Prefect server (tests/conftest.py), prepare_data on a zip,
train_model with a random-weights backbone at 32 px, a fresh sqlite MLflow store per test.
The stateful story (first run -> nothing changed -> a challenger -> nothing changed -> forced
run) is one test so that parallel test workers never split it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import RetrainConfig
from flows.retrain import TRAINED, UNCHANGED, build_parser, config_from_args, main, retrain
from tasks.common.results import ChampionInfo, RetrainSummary
from tasks.models.report import summary_markdown, unchanged_reason
from tasks.models.steps import SUMMARY_ARTIFACT_KEY
from tasks.data.validate import ValidationThresholds
from tests.imagegen import write_petimages_tree, zip_tree

PER_CLASS = 20
TINY = {
    "backbones": ["vgg16"], "weights": None, "input_size": 32, "batch_size": 16,
    "head_epochs": 20, "dense_units": 8, "patience": 3,
    "split_fractions": (0.6, 0.2, 0.2), "floor": 0.0,
    "thresholds": ValidationThresholds(min_per_class=10, min_per_class_per_split=1,
                                       max_class_imbalance=10.0, max_quarantined_share=0.2),
}


@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    """A small PetImages-style archive (no faulty files: prepare's own tests cover those)."""
    base = tmp_path_factory.mktemp("retrain-source")
    write_petimages_tree(base / "tree", per_class=PER_CLASS, faults=False)
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

    # Another model config, and a margin no model can beat: trained, kept as challenger.
    third = retrain(tiny_config(petimages_zip, data_dir, dense_units=16, margin=1.0))
    assert third.status == TRAINED
    assert third.decision.version == "2" and third.decision.alias == "challenger"
    assert any("does not beat" in reason for reason in third.decision.reasons)
    assert versions_by_alias(client) == {"champion": "1", "challenger": "2"}
    trainings = sorted((data_dir / "training").iterdir())

    # The same again: the champion was built from another config, but version 2 from this one,
    # so nothing is trained and no identical twin of version 2 is registered.
    fourth = retrain(tiny_config(petimages_zip, data_dir, dense_units=16, margin=1.0))
    assert fourth.status == UNCHANGED and "registered version(s) 2" in fourth.reason, fourth.headline
    assert third.config_hash[:12] in fourth.reason
    assert sorted((data_dir / "training").iterdir()) == trainings
    assert len(client.search_model_versions("name='cats-vs-dogs'")) == 2

    # force trains although nothing changed.
    fifth = retrain(tiny_config(petimages_zip, data_dir, dense_units=16, margin=1.0, force=True))
    assert fifth.status == TRAINED and fifth.decision.version == "3" and fifth.decision.alias == "challenger"
    assert versions_by_alias(client) == {"champion": "1", "challenger": "3"}
    assert len(sorted((data_dir / "training").iterdir())) == len(trainings) + 1


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
