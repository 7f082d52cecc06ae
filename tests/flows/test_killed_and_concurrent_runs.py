"""The retrain command killed with `kill -9` at its worst moments, and two retrains at once.

Every run is the real command line (`python -m flows.retrain` through tests/killable_retrain.py,
which only makes it stop at a step so it can be killed there) in its own process, on a real
sqlite MLflow store, with Prefect's temporary server as users get it (no PREFECT_API_URL).
Afterwards a real `prefect server start` on the same Prefect home reads back the flow runs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.imagegen import write_petimages_tree, zip_tree
from tests.servers import (REPO_ROOT, ManagedProcess, api_post, base_env, start_prefect_server, start_process,
                           wait_until)

pytestmark = pytest.mark.slow

PER_CLASS = 20
RUN_TIMEOUT_S = 900
OPTIONS = ["--backbones", "mobilenet_v2", "--weights", "none", "--input-size", "32", "--batch-size", "16",
           "--head-epochs", "2", "--dense-units", "8", "--patience", "1", "--split-fractions", "0.6", "0.2", "0.2",
           "--floor", "0", "--min-per-class", "10", "--min-per-class-per-split", "1", "--max-class-imbalance", "10",
           "--max-quarantined-share", "0.2"]


@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("killed-source")
    write_petimages_tree(base / "tree", per_class=PER_CLASS, faults=False)
    return zip_tree(base / "tree", base / "petimages.zip")


def _env(tmp_path: Path, prefect_home: Path) -> dict[str, str]:
    return base_env(PREFECT_HOME=prefect_home, PREFECT_PROFILES_PATH=prefect_home / "profiles.toml",
                    PREFECT_API_URL=None, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                    PREFECT_LOGGING_LEVEL="INFO", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                    PYTHONPATH=str(REPO_ROOT))


def _retrain(name: str, source: Path, data_dir: Path, env: dict[str, str], log_dir: Path,
             pause_at: str = "none") -> tuple[ManagedProcess, Path]:
    marker = log_dir / f"{name}.paused"
    args = [sys.executable, "-m", "tests.killable_retrain", pause_at, str(marker),
            "--source", str(source), "--data-dir", str(data_dir), *OPTIONS]
    return start_process(name, args, env=env, log_path=log_dir / f"{name}.log", cwd=log_dir), marker


def _kill_when_paused(process: ManagedProcess, marker: Path) -> list[psutil.Process]:
    """SIGKILL the command (only it, as the OOM killer would) once it stops at its step; its descendants."""
    wait_until(marker.exists, timeout=RUN_TIMEOUT_S, interval=1.0, what=f"{process.name} to reach its step",
               process=process)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert any("prefect.server.api.server" in " ".join(p.cmdline()) for p in descendants), \
        "the command should run Prefect's temporary server"
    os.kill(process.pid, signal.SIGKILL)
    process.popen.wait(timeout=30)
    return descendants


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _finish(process: ManagedProcess) -> str:
    wait_until(lambda: not process.alive(), timeout=RUN_TIMEOUT_S, interval=1.0, what=f"{process.name} to end")
    log = process.log_path.read_text(errors="replace")
    assert process.popen.returncode == 0, log[-4000:]
    return log


def _store(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")


def test_a_retrain_killed_mid_way_is_set_straight_by_the_next_and_leaves_no_process(petimages_zip, tmp_path):
    from mlflow.entities import LoggedModelStatus

    data_dir, home, logs = tmp_path / "data", tmp_path / "prefect", tmp_path / "logs"
    logs.mkdir()
    env = _env(tmp_path, home)
    orphans: list[psutil.Process] = []

    # 1. killed inside MLflow's log_model: run RUNNING, logged model PENDING, Prefect flow run RUNNING
    first, marker = _retrain("killed-logging", petimages_zip, data_dir, env, logs, "log-model")
    orphans += _kill_when_paused(first, marker)
    client = _store(tmp_path)
    experiment = client.get_experiment_by_name("cats-vs-dogs").experiment_id
    [stuck] = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    [pending] = [m for m in client.search_logged_models([experiment]) if m.status == LoggedModelStatus.PENDING]
    first_flow_run = stuck.data.tags["prefect.flow_run_id"]

    # 2. killed in the gate, after registering: a version with no alias and no verdict
    second, marker = _retrain("killed-gating", petimages_zip, data_dir, env, logs, "gate")
    orphans += _kill_when_paused(second, marker)
    [second_line] = [line for line in second.log_path.read_text().splitlines() if "Reconcile:" in line]
    assert f"1 stuck MLflow run(s) marked FAILED ({stuck.info.run_id})" in second_line
    assert f"1 pending logged model(s) marked FAILED ({pending.model_id})" in second_line
    assert "1 stuck Prefect flow run(s) marked CRASHED" in second_line and first_flow_run in second_line
    [half] = client.search_model_versions("name='cats-vs-dogs'")
    assert "gate.decision" not in half.tags and not client.get_registered_model("cats-vs-dogs").aliases
    second_flow_run = client.get_run(half.run_id).data.tags["prefect.flow_run_id"]
    (data_dir / "training" / ".20260101T000000Z-deadbeef.partial").mkdir()  # as a run killed while training leaves

    # 3. an ordinary run: reconciles, then trains (the half-registered version does not count as built)
    third, _ = _retrain("next", petimages_zip, data_dir, env, logs)
    log = _finish(third)
    [line] = [line for line in log.splitlines() if "Reconcile:" in line]
    assert f"1 half-registered version(s) labelled ({half.version} (incomplete))" in line
    assert "1 stuck Prefect flow run(s) marked CRASHED" in line and second_flow_run in line
    assert "training/.20260101T000000Z-deadbeef.partial" in line

    failed = client.get_run(stuck.info.run_id)
    assert failed.info.status == "FAILED" and "no longer exists" in failed.data.tags["catsdogs.reconciled"]
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert client.get_logged_model(pending.model_id).status == LoggedModelStatus.FAILED
    assert client.get_model_version("cats-vs-dogs", half.version).tags["gate.decision"] == "incomplete"
    aliases = {alias: str(version) for alias, version in client.get_registered_model("cats-vs-dogs").aliases.items()}
    assert aliases == {"champion": str(int(half.version) + 1)}
    assert not list((data_dir / "training").glob(".*"))
    assert all(_gone(proc) for proc in orphans), [p for p in orphans if not _gone(p)]  # the servers died too

    server = start_prefect_server(home)
    try:
        runs = {run["id"]: run for run in api_post(server, "flow_runs/filter", {})}
        for flow_run in (first_flow_run, second_flow_run):
            state = runs[flow_run]["state"]
            assert state["type"] == "CRASHED" and "no longer exists" in state["message"], state
        assert not [run for run in runs.values() if run["state"]["type"] == "RUNNING"]
    finally:
        server.stop()


def test_two_retrains_at_once_on_a_new_store_and_one_data_folder_both_succeed(petimages_zip, tmp_path):
    """A scheduled and a manual run colliding: one trains, the other waits for it, then finds nothing changed."""
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    runs = [_retrain(name, petimages_zip, data_dir, _env(tmp_path, tmp_path / f"prefect-{name}"), logs)[0]
            for name in ("scheduled", "manual")]
    texts = [_finish(run) for run in runs]
    client = _store(tmp_path)
    assert [str(v.version) for v in client.search_model_versions("name='cats-vs-dogs'")] == ["1"]
    trained = [text for text in texts if "version 1 promoted to champion" in text]
    skipped = [text for text in texts if "Training skipped: nothing changed" in text]
    assert len(trained) == 1 and len(skipped) == 1, [text[-3000:] for text in texts]
    assert "registered version(s) 1" in skipped[0]
    waiter = [text for text in texts if "waits: data folder" in text]
    assert waiter, "one run must have waited for the other"
    other = runs[1 - texts.index(waiter[0])]
    assert f"in use by pid {other.pid}" in waiter[0]
