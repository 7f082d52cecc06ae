"""Two processes meeting a new sqlite MLflow store at once: it is created and migrated once, intact.

MLflow migrates a new sqlite store on first use; two processes doing that at the same moment
used to leave it half-migrated for good (`table _alembic_tmp_latest_metrics already exists`).
Here real processes are lined up behind a starting gun and all touch the same new store, as a
scheduled and a manual retrain would, several times over.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.servers import REPO_ROOT, base_env

PROCESSES = 3
TRIALS = 2  # without the lock, every trial measured failed; two keep a lucky race from passing unseen

_READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.models.registry import champion_summary
    from tasks.models.store import ensure_experiment
    import mlflow.tracking  # imports done before the gun, so all start together
    ready, gun = Path(sys.argv[1]), Path(sys.argv[2])
    ready.write_text("ready")
    while not gun.exists():
        time.sleep(0.005)
    assert champion_summary() is None  # first touch: creates and migrates the store
    ensure_experiment("cats-vs-dogs")
    print("ok")
""")


def _race(store: Path, work: Path) -> list[subprocess.CompletedProcess]:
    uri = f"sqlite:///{store}"
    env = base_env(MLFLOW_TRACKING_URI=uri)
    gun = work / "go"
    procs = []
    for index in range(PROCESSES):
        procs.append(subprocess.Popen([sys.executable, "-c", _READER, str(work / f"ready{index}"), str(gun)],
                                      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + 300
    while not all((work / f"ready{index}").exists() for index in range(PROCESSES)):
        assert time.monotonic() < deadline, "the processes never got ready"
        assert all(proc.poll() is None for proc in procs), [proc.communicate() for proc in procs]
        time.sleep(0.05)
    gun.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("trial", range(TRIALS))
def test_processes_creating_a_new_store_at_once_all_succeed_and_leave_it_whole(tmp_path, trial):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns" / "mlflow.db"
    results = _race(store, tmp_path)
    failures = [result.stderr[-1500:] for result in results if result.returncode != 0]
    assert not failures, failures
    assert all(result.stdout.strip().endswith("ok") for result in results)

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")  # the store works for every later run
    [experiment] = [e for e in client.search_experiments() if e.name == "cats-vs-dogs"]
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
