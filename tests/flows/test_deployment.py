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
