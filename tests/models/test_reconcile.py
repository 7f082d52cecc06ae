"""Reconciling what killed processes left in a real sqlite store: only the provably dead is set straight.

Each "killed run" here is a real process that writes to the store the way a retrain does
(owner tags from `tracking.owner_tags`) and then dies by SIGKILL; a live process and a run
without an owner stand for what must be left alone. The whole retrain, killed at its steps
and reconciled by the next one, is tests/flows/test_killed_and_concurrent_runs.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

from tasks.common.processes import ProcessId
from tasks.models.reconcile import INCOMPLETE, RECONCILED_TAG, Reconciled, reconcile_mlflow
from tasks.models.registry import GATE_DECISION_TAG, versions_built_from
from tests.fake_training import mlflow_store  # noqa: F401  (fixture)
from tests.servers import REPO_ROOT, base_env

_WRITER = textwrap.dedent("""
    import json, os, signal, sys, time
    from tasks.models.store import ensure_experiment, use_tracking
    from tasks.models.tracking import owner_tags
    _, client = use_tracking()
    experiment = ensure_experiment("cats-vs-dogs")
    tags = {"dataset_fingerprint": "f" * 64, "config_hash": "c" * 64, **owner_tags()}
    run = client.create_run(experiment, run_name=sys.argv[1], tags=tags)
    model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    ids = {"run": run.info.run_id, "model": model.model_id}
    if sys.argv[2] != "no-version":
        version = client.create_model_version("cats-vs-dogs", model.model_uri if hasattr(model, "model_uri")
                                              else f"models:/{model.model_id}", run_id=run.info.run_id,
                                              tags={"dataset_fingerprint": "f" * 64, "config_hash": "c" * 64})
        ids["version"] = str(version.version)
        if sys.argv[2] == "alias":
            client.set_registered_model_alias("cats-vs-dogs", "challenger", version.version)
    print(json.dumps(ids), flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
""")


def _writer(name: str, version: str, fate: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, name, version, fate], cwd=REPO_ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    ids = json.loads(line)
    if fate == "die":
        assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc, ids


def test_a_process_is_dead_when_its_pid_is_gone_reused_or_from_an_older_boot():
    me = ProcessId.current()
    assert me.alive() and ProcessId.from_labels(me.labels()) == me
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = ProcessId.of(child.pid)
    assert owner.alive()
    child.kill()
    time.sleep(0.2)
    assert "zombie" in owner.death() or "no longer exists" in owner.death()  # killed, not yet reaped
    child.wait()
    assert "no longer exists" in owner.death()
    assert "newer process" in replace(me, started="1").death()  # our pid, another start time: a reused pid
    assert "rebooted" in replace(me, pid=owner.pid, boot="another-boot").death()
    assert replace(me, host=socket.gethostname() + "-elsewhere", pid=owner.pid).death() is None  # cannot tell
    assert ProcessId.from_labels({"dataset_fingerprint": "x"}) is None


def test_stuck_records_of_killed_processes_are_set_straight_and_the_rest_left_alone(mlflow_store):
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    client.create_registered_model("cats-vs-dogs")
    _, gated = _writer("killed in the gate", "version", "die")
    _, aliased = _writer("killed after moving the alias", "alias", "die")
    _, logging = _writer("killed while logging", "no-version", "die")
    alive, running = _writer("still running", "version", "live")
    try:
        unowned = client.create_run(client.get_experiment_by_name("cats-vs-dogs").experiment_id)  # old code: no owner

        result = reconcile_mlflow()

        dead_runs = {gated["run"], aliased["run"], logging["run"]}
        assert set(result.failed_runs) == dead_runs
        assert set(result.failed_models) == {gated["model"], aliased["model"], logging["model"]}
        assert sorted(result.labelled_versions) == sorted([f"{gated['version']} ({INCOMPLETE})",
                                                          f"{aliased['version']} (challenger)"])
        assert result.unprovable == 4  # the live process's run, model and version; the run without owner
        for run_id in dead_runs:
            run = client.get_run(run_id)
            assert run.info.status == "FAILED"
            assert f"pid {os.getpid()}" in run.data.tags[RECONCILED_TAG]
            assert "no longer exists" in run.data.tags[RECONCILED_TAG] or "zombie" in run.data.tags[RECONCILED_TAG]
            assert "**FAILED**" in run.data.tags["mlflow.note.content"]
        for model_id in result.failed_models:
            model = client.get_logged_model(model_id)
            assert model.status == LoggedModelStatus.FAILED and RECONCILED_TAG in model.tags
        gated_version = client.get_model_version("cats-vs-dogs", gated["version"])
        assert gated_version.tags[GATE_DECISION_TAG] == INCOMPLETE and "died before the gate" in gated_version.tags["gate.reason"]
        assert client.get_model_version("cats-vs-dogs", aliased["version"]).tags[GATE_DECISION_TAG] == "challenger"
        assert client.get_run(running["run"]).info.status == "RUNNING"
        assert GATE_DECISION_TAG not in client.get_model_version("cats-vs-dogs", running["version"]).tags
        assert client.get_run(unowned.info.run_id).info.status == "RUNNING"
        # "nothing changed" never counts a version whose gate never ran
        assert gated["version"] not in [v.version for v in versions_built_from("f" * 64, "c" * 64)]

        again = reconcile_mlflow()  # idempotent: what was set straight stays so, nothing new to do
        assert (again.failed_runs, again.failed_models, again.labelled_versions) == ([], [], [])
    finally:
        alive.kill()
        alive.wait()


def test_the_summary_line_names_what_was_done():
    assert Reconciled().summary == "nothing left behind by killed runs"
    line = Reconciled(failed_runs=["r1"], labelled_versions=["3 (incomplete)"], removed=["training/.x.partial"],
                      unprovable=2).summary
    assert "1 stuck MLflow run(s) marked FAILED (r1)" in line and "3 (incomplete)" in line
    assert "training/.x.partial" in line and "2 stuck record(s) left alone" in line

