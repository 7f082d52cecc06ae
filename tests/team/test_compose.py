"""deployments/compose.yaml says what test_team_stack.py runs: the same servers, flags and pool.

No container engine exists on the build machines, so the compose file cannot be started here;
these checks keep it from drifting away from the process topology that the tests do run.
"""

from __future__ import annotations

import yaml

from tests.servers import REPO_ROOT

COMPOSE = REPO_ROOT / "deployments" / "compose.yaml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _command(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_both_servers_keep_their_state_in_the_one_postgres_and_mlflow_serves_artifacts():
    services = _services()
    init = (REPO_ROOT / "deployments" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE prefect;" in init and "CREATE DATABASE mlflow;" in init
    prefect = services["prefect-server"]
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert "prefect server start" in _command(prefect)
    mlflow = _command(services["mlflow"])
    for flag in ("--backend-store-uri postgresql+psycopg2://", "@postgres:5432/mlflow", "--serve-artifacts",
                 "--artifacts-destination /srv/catsdogs/mlartifacts"):
        assert flag in mlflow
    for name in ("prefect-server", "mlflow"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_workers_share_storage_reach_the_servers_and_get_one_gpu_each():
    services = _services()
    project = [name for name, service in services.items() if service.get("image") == "catsdogs-pipeline:latest"]
    assert set(project) == {"mlflow", "dask-scheduler", "dask-worker-gpu0", "dask-worker-gpu1", "prefect-worker",
                            "model"}
    for name in project:
        assert "shared:/srv/catsdogs" in services[name]["volumes"]  # one path for data/ and artifacts everywhere
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    gpus = []
    for name in ("dask-worker-gpu0", "dask-worker-gpu1"):
        command = _command(services[name])
        assert "dask worker tcp://dask-scheduler:8786" in command and "--nthreads 1" in command
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        gpus += device["device_ids"]
        assert services[name]["environment"]["GPU"] == device["device_ids"][0]
    assert gpus == ["0", "1"]
    pool = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())["deployments"][0]["work_pool"]
    assert f"--pool {pool['name']} --type process" in _command(services["prefect-worker"])


def test_the_image_installs_the_team_extra():
    dockerfile = (REPO_ROOT / "deployments" / "Dockerfile").read_text()
    assert "ARG EXTRAS=team" in dockerfile and 'pip install -e ".[${EXTRAS}]"' in dockerfile
    assert "WORKDIR /opt/catsdogs" in dockerfile  # one checkout path on every worker (prefect.yaml's pull step)


def test_the_model_is_served_only_through_a_proxy_that_bounds_bodies_before_mlflow_reads_them():
    """MLflow's scoring server reads whole bodies of any size and type: the proxy is the one place that bounds them.

    tests/models/test_model_server.py runs this same proxy file in a real nginx where nginx is installed.
    """
    services = _services()
    model, proxy = services["model"], services["model-proxy"]
    serve = _command(model)
    assert "mlflow models serve -m models:/cats-vs-dogs@champion --env-manager local" in serve
    assert "--port 5001" in serve and "--timeout 60" in serve
    assert "ports" not in model and model["expose"] == ["5001"]  # not published: clients go through the proxy
    assert int(model["environment"]["UVICORN_LIMIT_CONCURRENCY"]) >= 2  # requests in flight per process
    assert proxy["image"].startswith("nginx:") and proxy["depends_on"] == ["model"]
    assert proxy["ports"] == ["5001:8080"]
    [mount] = proxy["volumes"]
    source, target = mount.removesuffix(":ro").split(":")
    assert target == "/etc/nginx/conf.d/default.conf"
    conf = (COMPOSE.parent / source).read_text()
    assert "listen 8080;" in conf and "proxy_pass http://model:5001;" in conf
    assert "client_max_body_size 32m;" in conf and "proxy_request_buffering on;" in conf
    assert "return 415" in conf and "application/json" in conf  # parquet, CSV and no Content-Type stop here
    assert "proxy_read_timeout 75s;" in conf  # past the model server's own --timeout 60
