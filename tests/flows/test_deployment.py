"""deployments/prefect.yaml: what it declares, and the small parameters the deployment tests run with.

The deployment path users follow runs with real processes twice: the README walk
(tests/test_readme.py: `prefect server start`, a work pool, a worker, `prefect deploy --all`
with prompts on and nobody to answer, `prefect deployment run` with the command line's option
names and with a bogus one) and the team stack (tests/team/: both deployments on two workers,
on PostgreSQL, racing to promote).
"""

from __future__ import annotations

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


def test_prefect_yaml_closes_the_loop_a_daily_drift_check_whose_event_starts_a_retrain():
    """monitor/daily checks the champion; its event (flows/monitor.py emits it) is what retrain/on-demand's
    trigger expects, about the same model; the README's off switch names that trigger."""
    from flows.config import MonitorConfig, RetrainConfig
    from tasks.models.monitoring import DRIFT_EVENT, resource_id
    from tasks.models.naming import parse_registry_uri

    spec, _ = load_deployment_spec()
    by_name = {(d["entrypoint"].rsplit(":", 1)[1], d["name"]): d for d in spec["deployments"]}
    daily = by_name[("monitor", "daily")]
    config = MonitorConfig.model_validate(daily["parameters"]["config"])
    assert [s["cron"] for s in daily["schedules"]] == ["0 6 * * *"] and daily["work_pool"]["name"] == "catsdogs-process"
    on_demand = by_name[("retrain", "on-demand")]
    [trigger] = on_demand["triggers"]
    watched = parse_registry_uri(config.model_uri)[1]
    assert trigger["expect"] == [DRIFT_EVENT] and trigger["match"] == {"prefect.resource.id": resource_id(watched)}
    assert RetrainConfig.model_validate(on_demand["parameters"]["config"]).model_name == watched
    assert f"prefect automation pause {trigger['name']}" in (servers.REPO_ROOT / "README.md").read_text()
