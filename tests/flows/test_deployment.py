"""deployments/prefect.yaml: what it declares, and the small parameters the deployment tests run with.

The deployment path users follow runs with real processes twice: the README walk
(tests/test_readme.py: `prefect server start`, a work pool, a worker, `prefect deploy --all`,
`prefect deployment run`) and the team stack (tests/team/: both deployments on two workers,
on PostgreSQL, racing to promote).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests import servers

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
        "source": str(source), "data_dir": str(data_dir), "backbones": ["vgg16"], "weights": None,
        "input_size": 32, "batch_size": 16, "head_epochs": 20, "dense_units": 8, "patience": 3,
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


def test_deploy_all_asks_nothing_and_params_take_the_command_line_names(tmp_path, prefect_api_url):
    """The README's `prefect deploy --all`, as at a terminal (prompts on) with no one to answer (stdin closed).

    A deployment without `schedules` makes Prefect ask for one interactively; `retrain/on-demand`
    declares an empty list, so the command runs through and registers it unscheduled.
    """
    import httpx

    env = servers.base_env(PREFECT_API_URL=prefect_api_url, PREFECT_CLI_PROMPT="true",
                           PREFECT_HOME=tmp_path / "prefect", PREFECT_PROFILES_PATH=tmp_path / "profiles.toml")
    pool = ["work-pool", "create", "catsdogs-process", "--type", "process", "--overwrite"]
    servers.run_cli([servers.cli("prefect"), *pool], env=env)
    done = subprocess.run([servers.cli("prefect"), "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
                          cwd=servers.REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "EOFError" not in done.stdout + done.stderr
    deployed = {name: httpx.get(f"{prefect_api_url}/deployments/name/retrain/{name}", timeout=30).json()
                for name in ("weekly", "on-demand")}
    assert [s["schedule"]["cron"] for s in deployed["weekly"]["schedules"]] == ["0 3 * * 1"]
    assert deployed["on-demand"]["schedules"] == []
    assert {d["work_pool_name"] for d in deployed.values()} == {"catsdogs-process"}
    from flows.retrain import _serving_notices

    [notice] = _serving_notices()  # what `--serve` says before it takes this deployment over
    assert notice.startswith("retrain/weekly was deployed to work pool 'catsdogs-process'; serving takes it over")

    # --params with the command line's flat names: the server accepts them, the flow reads them into thresholds
    from flows.config import RetrainConfig

    params = {"config": {"source": "/srv/pets.zip", "min_per_class": 10, "max_class_imbalance": 10.0}}
    run = subprocess.run([servers.cli("prefect"), "deployment", "run", "retrain/on-demand", "--params",
                          json.dumps(params)], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    try:
        stored = httpx.get(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=30).json()["parameters"]["config"]
        config = RetrainConfig.model_validate(stored)  # what the flow does with its parameter
        assert (config.thresholds.min_per_class, config.thresholds.max_class_imbalance) == (10, 10.0)
    finally:
        httpx.delete(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=30)  # no worker may ever pick it up
    bogus = subprocess.run([servers.cli("prefect"), "deployment", "run", "retrain/on-demand", "--params",
                            json.dumps({"config": {"min_per_klass": 10}})], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
    assert bogus.returncode != 0 and "min_per_klass" in bogus.stdout + bogus.stderr
