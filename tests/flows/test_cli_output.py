"""What a person sees on the terminal when something goes wrong, and how quickly `--help` comes.

The command line runs as users run it (a subprocess, its own temporary Prefect server, a new
MLflow store); the terminal is its stderr and stdout, the details its log file. The quiet
output of a successful main job, with its progress lines, is checked by the README walk
(tests/test_readme.py), which runs the README's own main command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.imagegen import write_petimages_tree, zip_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli-source")
    write_petimages_tree(base / "tree", per_class=24, faults=True)
    return zip_tree(base / "tree", base / "pets.zip")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect"), "CATSDOGS_PROGRESS_SECONDS": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: nothing set
    env.pop("PREFECT_LOGGING_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "flows.retrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_handled_error_is_one_line_naming_the_fix_and_the_log(source, tmp_path):
    done = run(["--source", str(source), "--weights", "none", "--backbones", "mobilenet_v2"], tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--min-per-class" in errors[0]  # the flag that loosens the check
    assert "Traceback" not in done.stderr and "(full log; 4 more line(s) of detail: " in errors[0]
    log = Path(errors[0].split("of detail: ")[1].rstrip(")"))
    assert log.is_file() and "enough_images_per_class" in log.read_text()  # each failed expectation, in the log
    assert not (tmp_path / "data" / "training").exists()  # nothing that looks like a result


def test_help_is_quick_to_reach_and_lists_every_option(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.retrain", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    for option in ("--source", "--weights", "--min-per-class", "--precision", "--decoder", "--fine-tune", "--verbose",
                   "--serve"):
        assert option in done.stdout


