"""The deployment path users follow, with real processes: server, pool, `prefect deploy`, worker, run.

    prefect server start                                  (own PREFECT_HOME, loopback port)
    prefect work-pool create catsdogs-process --type process
    prefect deploy --prefect-file deployments/prefect.yaml --all      (from the repo root)
    prefect worker start --pool catsdogs-process                      (MLflow store in tmp)
    prefect deployment run 'retrain/weekly' --params '{...}'

then the flow run is followed through the REST API until it finishes, and its MLflow run (tagged
with the flow run id) and its markdown artifact are looked up. Every process is killed at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.imagegen import write_petimages_tree, zip_tree

PREFECT_YAML = servers.REPO_ROOT / "deployments" / "prefect.yaml"
DEPLOYMENT = "retrain/weekly"


def load_deployment_spec() -> tuple[dict, dict]:
    """(the whole prefect.yaml, its `weekly` deployment)."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [weekly] = [d for d in spec["deployments"] if d["name"] == "weekly"]
    return spec, weekly


def tiny_params(source: Path, data_dir: Path) -> dict:
    """A config the worker trains in seconds: random 32 px backbone, loose dataset checks."""
    return {"config": {
        "source": str(source), "data_dir": str(data_dir), "backbones": ["mobilenet_v2"], "weights": None,
        "input_size": 32, "batch_size": 16, "head_epochs": 1, "dense_units": 8, "patience": 1,
        "split_fractions": [0.6, 0.2, 0.2], "floor": 0.0,
        "thresholds": {"min_per_class": 10, "min_per_class_per_split": 1, "max_class_imbalance": 10.0},
    }}


def test_prefect_yaml_defines_the_weekly_retrain():
    from flows.config import RetrainConfig
    from flows.retrain import weekly_schedule

    spec, weekly = load_deployment_spec()
    path, _, function = weekly["entrypoint"].partition(":")
    assert (servers.REPO_ROOT / path).is_file() and function == "retrain"
    assert [s["cron"] for s in weekly["schedules"]] == ["0 3 * * 1"] == [weekly_schedule()["cron"]]
    assert weekly_schedule()["timezone"] == "UTC"  # --serve reads the one declaration
    assert weekly["work_pool"]["name"] == "catsdogs-process"
    [pull] = spec["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull
    RetrainConfig.model_validate(weekly["parameters"]["config"])  # the scheduled parameters are valid


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    server = servers.start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_deployment_runs_through_a_worker_and_lands_in_mlflow(prefect_server, tmp_path):
    server = prefect_server
    _, weekly = load_deployment_spec()
    pool = weekly["work_pool"]["name"]
    write_petimages_tree(tmp_path / "tree", per_class=20, faults=False)
    source = zip_tree(tmp_path / "tree", tmp_path / "petimages.zip")
    store = tmp_path / "mlruns"
    store.mkdir()
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"

    servers.create_process_pool(server, pool)
    deployed = servers.prefect("deploy", "--prefect-file", str(PREFECT_YAML), "--all",
                               server=server, cwd=servers.REPO_ROOT, timeout=300)
    assert DEPLOYMENT in deployed.stdout
    deployment = servers.api_get(server, f"deployments/name/{DEPLOYMENT}")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [weekly["schedules"][0]["cron"]]
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(servers.REPO_ROOT)}}]
    assert deployment["work_pool_name"] == pool

    # A parameter the config does not know is refused before any run starts.
    with pytest.raises(servers.ServerError, match="bogus"):
        servers.run_deployment(server, DEPLOYMENT, {"config": {"bogus": 1}})

    worker = servers.start_worker(server, pool, env={"MLFLOW_TRACKING_URI": tracking_uri},
                                  log_path=tmp_path / "worker.log")
    with servers.running(worker):
        servers.wait_until_worker_online(server, pool, worker)
        flow_run_id = servers.run_deployment(server, DEPLOYMENT, tiny_params(source, tmp_path / "data"))
        flow_run = servers.wait_for_flow_run(server, flow_run_id, timeout=300, worker=worker)
        state = flow_run["state"]["type"]
        assert state == "COMPLETED", (f"flow run ended {state}:\n{servers.flow_run_logs(server, flow_run_id)}"
                                      f"\nworker log:\n{worker.log_tail()}")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("cats-vs-dogs")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' "
                                             "and tags.`catsdogs.kind` = 'retrain'")
    assert run.data.tags["registered_model.version"] == "1"
    assert run.data.tags["prefect.deployment_name"] == "weekly"
    assert client.get_model_version_by_alias("cats-vs-dogs", "champion").run_id == run.info.run_id

    [artifact] = servers.flow_run_artifacts(server, flow_run_id)
    assert artifact["key"] == "retrain-summary" and artifact["type"] == "markdown"
    assert "promoted to **champion**" in artifact["data"] and run.info.run_id in artifact["data"]
