"""MLflow tracking: the default store, what one retrain logs, and a real `mlflow server` showing it."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.models import store
from tasks.models.store import local_store_dir, resolve_tracking_uri, use_tracking
from tasks.common.processes import ProcessId
from tasks.models.tracking import log_retrain, log_skipped_run, prefect_tags, training_run
from tests.fake_training import mlflow_store  # noqa: F401 - fixture
from tests.fake_training import fake_prepare_summary, fake_train_result


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, recursively."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# ------------------------------------------------------------------ the store


def test_default_store_is_sqlite_in_cwd_mlruns_created_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    importlib.reload(store)  # importing must not create anything
    uri = resolve_tracking_uri()
    assert not (tmp_path / "mlruns").exists()  # nor resolving the URI
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert use_tracking()[0] == uri and (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert store.experiment_artifact_location(uri, "cats-vs-dogs") == (tmp_path / "mlruns" / "cats-vs-dogs").as_uri()


def test_environment_uri_wins_and_servers_have_no_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert local_store_dir("http://127.0.0.1:5999") is None
    assert store.experiment_artifact_location("http://127.0.0.1:5999", "x") is None  # the server decides
    monkeypatch.chdir(tmp_path)
    assert local_store_dir("sqlite:///rel/mlflow.db") == tmp_path.resolve() / "rel"
    assert str(local_store_dir("sqlite:////abs/store/mlflow.db")) == "/abs/store"


def test_readers_never_create_a_store(tmp_path, monkeypatch):
    from tasks.common.errors import ConfigError

    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(ConfigError, match=r"nowhere/mlflow.db does not exist.*MLFLOW_TRACKING_URI"):
        use_tracking(create=False)
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------ one retrain in MLflow


def int8_on_openvino(result):
    """A fake run at int8 on OpenVINO: its chosen backbone reports what int8 cost its head."""
    from tasks.common.results import Int8Check

    check = Int8Check(images=8, calibration_images=20, float32={"accuracy": 0.875, "roc_auc": 0.95, "log_loss": 0.3},
                      int8={"accuracy": 0.75, "roc_auc": 0.94, "log_loss": 0.31}, feature_relative_l2=0.05,
                      max_probability_gap=0.02)
    chosen = result.backbones[result.chosen_backbone].model_copy(update={"precision": "int8", "int8_check": check})
    return result.model_copy(update={"backbones": {**result.backbones, result.chosen_backbone: chosen},
                                     "devices": result.devices.model_copy(update={"precision": "int8"})})


def test_log_retrain_records_config_data_metrics_artifacts_children_and_model(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = int8_on_openvino(fake_train_result(tmp_path / "train", engine="openvino"))
    summary = fake_prepare_summary(tmp_path / "data")
    client = MlflowClient(tracking_uri=mlflow_store)
    with training_run(summary.fingerprint, result.config_hash, prefect_context={  # opened as training starts
            "flow_run_id": "abc-123", "flow_run_name": "brave-cat", "flow_run_url": "http://prefect/runs/abc-123"}) \
            as opened:
        started = client.get_run(opened.run_id)
        assert started.info.status == "RUNNING" and ProcessId.from_labels(started.data.tags) == ProcessId.current()
        time.sleep(0.3)  # the training
        logged = log_retrain(summary, result, result.config, source="kagglecatsanddogs.zip", run=opened)

    run = client.get_run(logged.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "brave-cat" and logged.run_id == opened.run_id
    assert run.info.end_time - run.info.start_time >= 300 and run.info.start_time == started.info.start_time
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["backbones"] == '["resnet50", "mobilenet_v2"]' and params["head_epochs"] == "3"
    assert params["data.fingerprint"] == "f" * 64 and params["data.train.cat"] == "10"
    assert metrics["data.test.dog"] == 4 and metrics["data.quarantined.empty_file"] == 1
    assert metrics["test_roc_auc"] == pytest.approx(0.97) and metrics["val_roc_auc"] == pytest.approx(0.95)
    assert tags["dataset_fingerprint"] == "f" * 64 and tags["config_hash"] == result.config_hash
    assert params["resolved.backend"] == result.devices.backend and params["resolved.precision"] == "int8"
    assert params["resolved.engine"] == "openvino" and metrics["int8_check.int8.accuracy"] == 0.75
    assert metrics["int8_check.float32.accuracy"] == 0.875 and metrics["int8_check.feature_relative_l2"] == 0.05
    assert "int8: the head on int8 features of 8 validation images scored accuracy 0.7500 (float32 0.8750)" in \
        tags["mlflow.note.content"]
    assert params["resolved.decoder"] == result.decoder == "opencv"
    inputs = {item.tags[0].value: item.dataset for item in run.inputs.dataset_inputs}  # MLflow's lineage
    assert {split: dataset.name for split, dataset in inputs.items()} == {
        split: f"cats-vs-dogs-{split}" for split in ("train", "validation", "test")}  # named after the model
    assert {dataset.digest for dataset in inputs.values()} == {("f" * 64)[:16]}
    assert all(dataset.source_type == "local" or "kagglecatsanddogs" in dataset.source for dataset in inputs.values())
    assert tags["prefect.flow_run_id"] == "abc-123" and tags["prefect.flow_run_url"].endswith("abc-123")
    assert {"plots/roc_curve.png", "plots/confusion_matrix.png", "evaluation/comparison.csv",
            "evaluation/predictions.csv", "evaluation/test_metrics.json", "data/prepare_summary.json",
            "data/validation/result.json", "data/validation/data_docs/index.html"} <= _artifacts(client, run.info.run_id)

    children = client.search_runs([logged.experiment_id], f"tags.mlflow.parentRunId = '{logged.run_id}'")
    assert {child.data.tags["backbone"] for child in children} == {"resnet50", "mobilenet_v2"}
    chosen = logged.child_run_ids["resnet50"]
    head_curve = client.get_metric_history(chosen, "head.val_loss")
    assert [(m.step, m.value) for m in head_curve] == [(1, 0.6), (2, 0.45), (3, 0.42)]
    assert [m.step for m in client.get_metric_history(chosen, "fine_tune.val_auc")] == [1, 2]
    assert client.get_metric_history(logged.child_run_ids["mobilenet_v2"], "fine_tune.loss") == []

    assert client.get_run(chosen).data.params["precision"] == "int8"
    assert client.get_run(chosen).data.params["engine"] == "openvino"
    model_info = mlflow.models.get_model_info(logged.model_uri)
    assert model_info.signature.inputs.input_names() == ["image", "pixels"]
    loaded = mlflow.pyfunc.load_model(logged.model_uri)  # it serves with the decoder it was trained with
    assert loaded.model_config["decoder"] == "opencv" and loaded.unwrap_python_model().decoder == "opencv"
    assert "opencv-python-headless==" in Path(mlflow.pyfunc.get_model_dependencies(logged.model_uri)).read_text()
    assert "openvino==" in Path(mlflow.pyfunc.get_model_dependencies(logged.model_uri)).read_text()
    assert loaded.model_config["engine"] == "openvino" and loaded.model_config["precision"] == "int8"
    assert loaded.unwrap_python_model().engine == "openvino"  # on the run's IR, logged beside the Keras model
    assert model_info.saved_input_example_info is not None
    store = tmp_path / "mlruns"
    assert any(store.joinpath("cats-vs-dogs").rglob("model.keras"))  # artifacts beside the db
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no ./mlruns or ./mlartifacts
    assert logged.run_url.endswith(f"/#/experiments/{logged.experiment_id}/runs/{logged.run_id}")


def test_a_failure_while_logging_or_training_marks_the_run_failed(mlflow_store, tmp_path):
    result = fake_train_result(tmp_path / "train", backbones=("resnet50",), fine_tune=False)
    result = result.model_copy(update={"model_path": str(tmp_path / "missing" / "model.keras")})
    with pytest.raises(Exception):
        log_retrain(fake_prepare_summary(tmp_path / "data"), result, result.config, source="tests")
    with pytest.raises(MemoryError), training_run("f" * 64, "cfg", experiment="flowers"):
        raise MemoryError("the training ran out of memory")
    runs = mlflow.search_runs(experiment_names=["cats-vs-dogs", "flowers"],
                              filter_string="tags.`catsdogs.kind` = 'retrain'")
    assert runs["status"].tolist() == ["FAILED", "FAILED"]
    assert mlflow.active_run() is None


def test_log_skipped_run_records_why(mlflow_store):
    logged = log_skipped_run("dataset and config equal the champion's", "fp", "cfg")
    run = MlflowClient().get_run(logged.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["catsdogs.kind"] == "skipped"
    assert run.data.tags["skip_reason"] == "dataset and config equal the champion's"
    assert (run.data.tags["dataset_fingerprint"], run.data.tags["config_hash"]) == ("fp", "cfg")


def test_prefect_tags_come_from_the_running_flow():
    from prefect import flow

    @flow(name="tagging-probe")
    def probe() -> dict:
        return prefect_tags()

    tags = probe()
    assert tags["prefect.flow_name"] == "tagging-probe"
    assert len(tags["prefect.flow_run_id"]) == 36 and tags["prefect.flow_run_name"]
    assert prefect_tags() == {}  # outside a flow run there is nothing to link
