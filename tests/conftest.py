"""Test-wide isolation and the session's shared servers.

Every test session gets its own Prefect home, Keras cache and MLflow store, and one real
Prefect server (`prefect server start`, as users start it) that every test, every flow called
in-process and every command line the tests run talks to through PREFECT_API_URL. It is
started by the session's first process (the xdist controller, before its workers exist, so
they inherit the URL) while the workers import TensorFlow, and stopped when the session ends.
A test that must run without a server (a command line's own temporary server) removes
PREFECT_API_URL from its child's environment.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.without_tensorflow import hide_tensorflow_off_its_backend

hide_tensorflow_off_its_backend()  # the JAX job proves the compute path needs no TensorFlow

_SESSION_HOME = Path(os.environ.get("CATSDOGS_TEST_HOME") or tempfile.mkdtemp(prefix="catsdogs-tests-"))
os.environ["CATSDOGS_TEST_HOME"] = str(_SESSION_HOME)  # the xdist workers, started later, share the controller's
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("KERAS_HOME", str(_SESSION_HOME / "keras"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # MLflow's job runners: the pipeline uses none
os.environ.setdefault("MLFLOW_WORKERS", "1")  # `mlflow ui`/`mlflow server` start 4 by default; one test client needs one
# On JAX, every process and test compiles the same few models again; XLA's persistent cache lets
# them share the compiled programs (a quarter of the JAX job's CPU time, measured).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_SESSION_HOME / "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_HOME / 'mlruns' / 'mlflow.db'}")
(_SESSION_HOME / "mlruns").mkdir(parents=True, exist_ok=True)


def pytest_configure(config):
    """Start the session's Prefect server in the first process; the workers inherit its URL."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller started it already
        return
    if compute_core_only(config):
        return
    from tests.servers import launch_prefect_server

    server = launch_prefect_server(_SESSION_HOME / "prefect-server")
    config.stash[_PREFECT_SERVER] = server
    os.environ["PREFECT_API_URL"] = server.api_url


def pytest_unconfigure(config):
    server = config.stash.get(_PREFECT_SERVER, None)
    if server is not None:
        if "prefect" in sys.modules:  # this process ran flows (no xdist): send what it still queues first
            from flows.prefect_server import drain_clients

            drain_clients()
        server.stop()
    if not hasattr(config, "workerinput"):  # the controller made the session's folder; the workers are done with it
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


_PREFECT_SERVER = pytest.StashKey()


def compute_core_only(config) -> bool:
    """The test command's JAX job (`-m backends`): the compute core, which never meets Prefect, so no server."""
    return config.getoption("markexpr") == "backends"


@pytest.fixture(scope="session", autouse=True)
def prefect_api_url(pytestconfig) -> str | None:
    """The session's Prefect server, once it answers (usually before the first test: it starts during collection)."""
    from tests.servers import keep_prefect_template, wait_for_http

    if compute_core_only(pytestconfig):
        return None
    url = os.environ["PREFECT_API_URL"]
    wait_for_http(f"{url}/health", timeout=240)
    keep_prefect_template(_SESSION_HOME / "prefect-server")  # the tests' other Prefect homes start from it
    return url


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


HEAVIEST_FIRST = (  # measured seconds on 2 busy cores, heaviest first (refresh from --durations when they drift)
    "tests/test_readme.py",                              # ~290 s: the README walk (your own classes included)
    "tests/team/test_team_stack.py",                     # ~170 s
    "tests/flows/test_retrain_flow.py",                  # ~90 s
    "tests/flows/test_killed_and_concurrent_runs.py",    # ~85 s
    "tests/learning/test_features.py",                   # ~70 s
    "tests/flows/test_train_flow.py",                    # ~70 s
)


def pytest_collection_modifyitems(config, items):
    """Heaviest modules first, then the other modules with slow tests, then the rest.

    pyproject's `--dist loadscope` hands each test worker whole modules (so a module's fixtures
    are built once) in this order as workers free up: the long ones start at once and the short
    ones fill the gaps, instead of one long module starting last and running on alone at the end.
    """
    slow_modules = {item.module for item in items if item.get_closest_marker("slow") is not None}

    def rank(item) -> tuple[int, int]:
        path = item.nodeid.split("::", 1)[0]
        if path in HEAVIEST_FIRST:
            return 0, HEAVIEST_FIRST.index(path)
        return (1 if item.module in slow_modules else 2), 0

    items.sort(key=rank)


@pytest.fixture(scope="session")
def champion_store(tmp_path_factory, worker_id):
    """One store whose `cats-vs-dogs@champion` is tests/fake_training's blue-minus-red model, for the whole run.

    It is logged with the OpenVINO engine (its IR beside its Keras model), the engine `auto` picks
    on these CPUs, so every served-model test (in process, behind `mlflow models serve`, batch
    predict) runs the model as a CPU run ships it.

    Built once, by the first worker that asks (the others wait on the lock and reuse it), because
    every test that only reads a champion (serving, batch prediction, the model server) can share
    one. Tests that register or promote make stores of their own.
    """
    from tasks.common.flock import exclusive_flock
    from tasks.common.results import TrainResult
    from tests.fake_training import promoted_champion

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "shared-champion"
    with exclusive_flock(root.with_suffix(".lock"), timeout_s=600):
        summary = root / "train_result.json"
        if not summary.is_file():
            uri, result = promoted_champion(root, engine="openvino")  # served as a CPU run ships it: on OpenVINO
            (root / "uri").write_text(uri)
            summary.write_text(result.model_dump_json())
    return SimpleNamespace(uri=(root / "uri").read_text(), root=root,
                           result=TrainResult.model_validate_json(summary.read_text()))
