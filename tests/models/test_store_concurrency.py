"""Two processes meeting a new sqlite MLflow store at once: it is created and migrated once, intact.

MLflow migrates a new sqlite store on first use; two processes doing that at the same moment
used to leave it half-migrated for good (`table _alembic_tmp_latest_metrics already exists`).
Here real processes are lined up behind a starting gun and all touch the same new store, as a
scheduled and a manual retrain would, in several rounds.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.servers import REPO_ROOT, base_env

PROCESSES = 3
ROUNDS = 2  # without the lock, every round measured failed; two keep a lucky race from passing unseen

_READER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from tasks.models.registry import champion_summary
    from tasks.models.store import ensure_experiment
    import mlflow.tracking  # imports done before the first gun, so all start together
    work, index, stores = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for round, store in enumerate(stores):  # one new store per round, the same processes
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
        (work / f"ready{index}-{round}").write_text("ready")
        while not (work / f"go{round}").exists():
            time.sleep(0.005)
        assert champion_summary() is None  # first touch: creates and migrates the store
        ensure_experiment("cats-vs-dogs")
    print("ok")
""")


def _race(stores: list[Path], work: Path) -> list[subprocess.CompletedProcess]:
    """Start PROCESSES readers once; for each store, fire the gun when all of them wait for it."""
    procs = [subprocess.Popen([sys.executable, "-c", _READER, str(work), str(index), *map(str, stores)],
                              cwd=REPO_ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for index in range(PROCESSES)]
    deadline = time.monotonic() + 300
    for round in range(len(stores)):
        while not all((work / f"ready{index}-{round}").exists() for index in range(PROCESSES)):
            if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
                for proc in procs:  # one failed (or none got ready): the others would wait for a gun forever
                    proc.kill()
                break
            time.sleep(0.02)
        (work / f"go{round}").write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_processes_creating_a_new_store_at_once_all_succeed_and_leave_it_whole(tmp_path):
    from mlflow.tracking import MlflowClient

    stores = [tmp_path / f"round{index}" / "mlruns" / "mlflow.db" for index in range(ROUNDS)]
    results = _race(stores, tmp_path)
    failures = [result.stderr[-1500:] for result in results if result.returncode != 0]
    assert not failures, failures
    assert all(result.stdout.strip().endswith("ok") for result in results)

    for store in stores:  # each store works for every later run
        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        [experiment] = [e for e in client.search_experiments() if e.name == "cats-vs-dogs"]
        run = client.create_run(experiment.experiment_id)
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
