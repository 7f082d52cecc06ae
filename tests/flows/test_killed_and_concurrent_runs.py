"""A retrain killed with `kill -9` in the gate, while a second retrain of the same data waits for it.

Both are the real command line (`python -m flows.retrain`; the killed one through
tests/killable_retrain.py, which only makes it stop in the gate) in their own processes, on one
real sqlite MLflow store, one data folder and one Prefect home, with Prefect's temporary server
as users get it (no PREFECT_API_URL). The second run must wait for the data folder, saying for
whom; once the first is killed it must take over, set straight what the killed run left (the
version without a verdict, the flow run stuck RUNNING, a half-written training folder), train,
and leave no process of the killed run behind. One scenario for all of it: each retrain
process costs tens of seconds on a small CPU.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import sys
from pathlib import Path

import psutil
import pytest

from tests.imagegen import write_petimages_tree, zip_tree
from tests.servers import (REPO_ROOT, ManagedProcess, prefect_database, prefect_env, running, seed_prefect_home,
                           start_process, wait_until)

pytestmark = pytest.mark.slow

PER_CLASS = 20
RUN_TIMEOUT_S = 900
OPTIONS = ["--backbones", "vgg16", "--weights", "none", "--input-size", "32", "--batch-size", "16",
           "--head-epochs", "20", "--dense-units", "8", "--patience", "3", "--split-fractions", "0.6", "0.2", "0.2",
           "--floor", "0", "--min-per-class", "10", "--min-per-class-per-split", "1", "--max-class-imbalance", "10",
           "--max-quarantined-share", "0.2"]


@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("killed-source")
    write_petimages_tree(base / "tree", per_class=PER_CLASS, faults=False)
    return zip_tree(base / "tree", base / "petimages.zip")


def _retrain(name: str, module: list[str], source: Path, data_dir: Path, env: dict[str, str],
             logs: Path) -> ManagedProcess:
    args = [sys.executable, "-m", *module, "--source", str(source), "--data-dir", str(data_dir), *OPTIONS]
    return start_process(name, args, env=env, log_path=logs / f"{name}.log", cwd=logs)


def _log(process: ManagedProcess) -> str:
    return process.log_path.read_text(errors="replace") if process.log_path.exists() else ""


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _flow_runs(prefect_home: Path) -> dict[str, tuple[str, str, str]]:
    """{flow run id: (flow name, state type, state message)} as Prefect's database holds them."""
    with sqlite3.connect(prefect_database(prefect_home)) as db:
        rows = db.execute("SELECT r.id, f.name, r.state_type, s.message FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                          "LEFT JOIN flow_run_state s ON s.id = r.state_id").fetchall()
    return {run_id: (flow, state, message or "") for run_id, flow, state, message in rows}


def test_a_retrain_killed_in_the_gate_is_set_straight_by_the_run_that_waited_for_it(petimages_zip, tmp_path):
    from mlflow.tracking import MlflowClient

    data_dir, home, logs = tmp_path / "data", tmp_path / "prefect", tmp_path / "logs"
    logs.mkdir()
    store = tmp_path / "store" / "mlflow.db"
    env = prefect_env(seed_prefect_home(home), PREFECT_LOGGING_LEVEL="INFO", MLFLOW_TRACKING_URI=f"sqlite:///{store}",
                      PYTHONPATH=str(REPO_ROOT))
    marker = logs / "killed.paused"

    killed = _retrain("killed", ["tests.killable_retrain", str(marker)], petimages_zip, data_dir, env, logs)
    with running(killed):
        # The second run starts once the first holds the data folder (so Prefect's database exists).
        wait_until(lambda: (data_dir / ".lock").exists(), timeout=RUN_TIMEOUT_S, what="the first run to start",
                   process=killed)
        waiter = _retrain("waiter", ["flows.retrain"], petimages_zip, data_dir, env, logs)
        with running(waiter):
            wait_until(marker.exists, timeout=RUN_TIMEOUT_S, what="the first run to reach the gate", process=killed)
            wait_until(lambda: "waits: data folder" in _log(waiter), timeout=RUN_TIMEOUT_S,
                       what="the second run to wait for the data folder", process=waiter)
            assert f"in use by pid {killed.pid}" in _log(waiter)
            left = data_dir / "training" / ".20260101T000000Z-deadbeef.partial"
            left.mkdir()  # what a run killed while training leaves (nothing else writes here now)
            descendants = psutil.Process(killed.pid).children(recursive=True)
            assert any("prefect server start" in " ".join(p.cmdline()) for p in descendants), \
                "the command should run its own temporary Prefect server"

            os.kill(killed.pid, signal.SIGKILL)  # only the command, as the OOM killer would
            killed.popen.wait(timeout=30)
            wait_until(lambda: not waiter.alive(), timeout=RUN_TIMEOUT_S, interval=1.0, what="the second run")
            log = _log(waiter)
            assert waiter.popen.returncode == 0, log[-4000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    [reconciled] = [line for line in log.splitlines() if "Reconcile:" in line]
    assert "1 half-registered version(s) labelled (1 (incomplete))" in reconciled
    assert "1 stuck Prefect flow run(s) marked CRASHED" in reconciled
    assert "training/.20260101T000000Z-deadbeef.partial" in reconciled and not left.exists()

    half = client.get_model_version("cats-vs-dogs", "1")
    assert half.tags["gate.decision"] == "incomplete" and "no longer exists" in half.tags["catsdogs.reconciled"]
    aliases = {alias: str(version) for alias, version in client.get_registered_model("cats-vs-dogs").aliases.items()}
    assert aliases == {"champion": "2"}, "the half-registered version is not 'built already': the data is trained again"
    experiment = client.get_experiment_by_name("cats-vs-dogs").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")

    killed_run = client.get_run(half.run_id).data.tags["prefect.flow_run_id"]
    runs = _flow_runs(home)
    flow, state, message = runs[killed_run]
    assert (flow, state) == ("retrain", "CRASHED") and f"pid {killed.pid}" in message and killed_run in reconciled
    assert not [run for run in runs.values() if run[1] == "RUNNING"], runs
    assert all(_gone(proc) for proc in descendants), [p for p in descendants if not _gone(p)]  # its server died too


_OWN_SERVER = """
import logging
from flows.prefect_server import temporary_server
logging.basicConfig(level=logging.INFO)
with temporary_server() as url:
    print("served by", url, flush=True)
"""


def _held(lock: Path) -> bool:
    """Whether another process holds the flock on `lock` (tried without waiting, released at once if free)."""
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_command_waits_while_another_sets_up_its_prefect_server_on_the_same_home(tmp_path):
    """Each command line starts its own temporary Prefect server (flows/cli.py); two started together on a new
    PREFECT_HOME once both migrated its new database, and the second died ("Prefect's temporary server exited
    with code 3", `duplicate column name`). Here the test holds the set-up lock, as a first command setting up
    its server would: the command waits, saying so, with no server of its own, then holds the lock itself while
    its server sets up (creates or migrates) the database, and runs. (Every start takes the lock, so the home
    starts from the session's migrated database: a new one costs seconds of migrations and shows nothing more.)"""
    from tasks.common.flock import exclusive_flock

    home = seed_prefect_home(tmp_path / "prefect")
    lock = home / ".prefect.db.setup.lock"  # beside the database (flows/prefect_server.py `setup_lock`)
    command = start_process("command", [sys.executable, "-c", _OWN_SERVER],
                            env=prefect_env(home, PYTHONPATH=str(REPO_ROOT)), log_path=tmp_path / "command.log",
                            cwd=tmp_path)
    with running(command):
        with exclusive_flock(lock, timeout_s=0):
            wait_until(lambda: "Waiting for another command's Prefect server to set up" in _log(command),
                       timeout=RUN_TIMEOUT_S, what="the command to wait for the set-up", process=command)
            assert not [child for child in psutil.Process(command.pid).children(recursive=True)
                        if "prefect server start" in " ".join(child.cmdline())]
        wait_until(lambda: _held(lock), timeout=RUN_TIMEOUT_S, interval=0.02, what="the command to take the lock",
                   process=command)  # held while its own server creates and migrates the database
        command.popen.wait(timeout=RUN_TIMEOUT_S)
        assert command.popen.returncode == 0 and "served by http://127.0.0.1:" in _log(command), _log(command)
    assert prefect_database(home).is_file() and not _held(lock)
