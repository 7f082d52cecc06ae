"""Test-wide isolation: every test session gets its own Prefect home, Keras cache and MLflow store.

Nothing here mocks a component users meet; the Prefect harness below is a real local server.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import tempfile
from pathlib import Path

import pytest


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """Makes `import tensorflow` fail, as on the GPU hosts that have only JAX and PyTorch."""

    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: KERAS_BACKEND is not tensorflow)", name=name)
        return None


if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    # The compute path must not need TensorFlow on another backend: prove it on this CPU by hiding it
    # (Keras itself would otherwise import it opportunistically, since it is installed here).
    sys.meta_path.insert(0, _NoTensorFlow())

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="catsdogs-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("KERAS_HOME", str(_SESSION_HOME / "keras"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_HOME / 'mlruns' / 'mlflow.db'}")
(_SESSION_HOME / "mlruns").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server for tests that call flows from Python."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
