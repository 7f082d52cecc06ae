"""The `monitor` flow on a tiny model that logs what it scores: no drift on the same photos, drift on night shots.

The champion is tests/fake_training's model (p(dog) from blue minus red; its "backbone" pools the
colours), logged by `log_retrain` as fine-tuned from a prepared folder of 100 train images, so its
reference is its own features of the train split, scored once and kept. Its rows come from the served
model in this process (`mlflow models serve` writing the log with two workers is the README walk's,
which also runs the command line on a real backbone's cached features and lets the event start a retrain).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest

from flows.config import MonitorConfig
from tests.fake_training import fake_prepare_summary, fake_train_result, seed_store
from tests.imagegen import image_bytes, night_shot_bytes
from tests.prepared import make_prepared_dir

CHAMPION = "models:/cats-vs-dogs@champion"


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    from tasks.models.promotion import register_and_gate
    from tasks.models.tracking import log_retrain

    root = tmp_path_factory.mktemp("monitor")
    data = make_prepared_dir(root, {"train": 50, "validation": 2, "test": 2})
    uri = seed_store(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        trained = fake_train_result(root / "train").model_copy(update={"data_dir": str(data), "fine_tuned": True})
        logged = log_retrain(fake_prepare_summary(root / "prepared"), trained, trained.config, source="tests")
        register_and_gate(logged.run_id, logged.model_uri, trained.test_metrics, evaluate_champion=None, floor=0.5,
                          margin=0.0)
    return SimpleNamespace(root=root, data=data, uri=uri, run_id=logged.run_id)


def _serve(watched, monkeypatch, make_image, count: int, log_dir: Path | None = None) -> None:
    """`count` requests' worth of rows through the served model, into its log (its own folder unless `log_dir`)."""
    from tasks.models.registry import load_pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", watched.uri)
    model = load_pyfunc(CHAMPION, prediction_log=str(log_dir) if log_dir else True)
    model.predict(pd.DataFrame({"image": [make_image("dog" if index % 2 else "cat", 7000 + index)
                                          for index in range(count)]}))
    model.unwrap_python_model().prediction_log.close()


def _drift_events(api: str, resource: str) -> list[dict]:
    found = httpx.post(f"{api}/events/filter", timeout=30, json={"filter": {
        "event": {"name": ["catsdogs.drift.detected"]}, "resource": {"id": [resource]}}}).json()
    return found["events"]


def test_the_same_photos_raise_nothing_and_night_shots_from_another_camera_are_drift(watched, monkeypatch,
                                                                                     prefect_api_url):
    from mlflow.tracking import MlflowClient

    from flows.monitor import monitor

    assert not (watched.data / "predictions").exists()  # logging the model (MLflow scores its example) is no request
    _serve(watched, monkeypatch, image_bytes, 200)  # the model's own log: the training data folder's predictions/
    steady = monitor(MonitorConfig(data_dir=str(watched.data)))
    assert steady.status == "no drift" and steady.rows == 200 and not steady.reasons and steady.event_id is None
    assert steady.p_value > 0.01 and steady.class_shift < 0.1 and steady.version == "1"
    assert steady.reference.startswith("the model's own features of 100 train images (fine-tuned)")
    assert Path(watched.data, "monitoring", f"reference-{watched.run_id}.npz").is_file()  # kept for the next checks

    night = watched.root / "night"
    _serve(watched, monkeypatch, night_shot_bytes, 200, night)
    corrupt = night / "predictions-20260101T00-other-1.jsonl"
    corrupt.write_text('{"time": "2026-01-01T00:00:00Z"}\n')  # an hour outside the window: never read
    torn = night / f"predictions-{time.strftime('%Y%m%dT%H', time.gmtime())}-other-2.jsonl"
    torn.write_bytes(b"\x00\x17 not a row\n")
    drifted = monitor(MonitorConfig(data_dir=str(watched.data), log_dir=str(night)))
    assert drifted.status == "drift" and drifted.rows == 200 and drifted.p_value < 0.01, drifted
    assert "the head's inputs differ from the training images'" in drifted.reasons[0]
    assert drifted.skipped_files == [f"{torn}: line 1 is not JSON"]  # skipped and named
    page = Path(drifted.report_path).read_text()
    for text in ("Drift check of cats-vs-dogs version 1", "MMD permutation p-value", str(torn), "data:image/png"):
        assert text in page, text

    client = MlflowClient(tracking_uri=watched.uri)
    experiment = client.get_experiment_by_name("cats-vs-dogs-monitoring")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert runs[drifted.mlflow_run_id].data.metrics["drift"] == 1.0 and runs[steady.mlflow_run_id].data.metrics[
        "drift"] == 0.0
    assert [item.path for item in client.list_artifacts(drifted.mlflow_run_id, "report")] == ["report/drift.html",
                                                                                            "report/drift.json"]
    deadline = time.monotonic() + 30
    while not (events := _drift_events(prefect_api_url, "catsdogs.model.cats-vs-dogs")) and time.monotonic() < deadline:
        time.sleep(0.5)
    [event] = [event for event in events if event["id"] == drifted.event_id]  # on the server, with the figures
    assert event["payload"]["p_value"] == drifted.p_value and event["payload"]["version"] == "1"
    assert event["resource"]["prefect.resource.id"] == "catsdogs.model.cats-vs-dogs"


def test_a_thin_window_judges_nothing_and_bad_input_is_one_sentence(watched, monkeypatch, tmp_path, capsys):
    from flows.monitor import main, monitor

    _serve(watched, monkeypatch, night_shot_bytes, 5, tmp_path / "thin")
    thin = monitor(MonitorConfig(data_dir=str(watched.data), log_dir=str(tmp_path / "thin")))
    assert thin.status == "too few rows" and thin.event_id is None and thin.rows == 5
    assert thin.reasons == ["5 rows to judge, fewer than the 100 a check needs"]
    assert "too few rows" in Path(thin.report_path).read_text()

    assert main(["--data-dir", str(watched.data), "--images", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert "missing do not exist" in error and "Traceback" not in error
