"""The promotion lock on a Prefect server: a global concurrency limit that every host meets.

Two processes stand for two hosts: they share the Prefect server and an MLflow server URI,
and nothing else (each has its own temp folder, so a file lock could not serialise them).
The server is the test session's (tests/conftest.py); tests/team/ repeats the race with whole
retrain flow runs against a Prefect server on PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.models.lock import limit_name, promotion_lock
from tests.servers import base_env

REPO = Path(__file__).resolve().parents[2]
SERVER_STORE = "http://mlflow.team.example:5000"  # a server store: no local file to lock beside
MODEL = f"lock-probe-{uuid.uuid4().hex[:8]}"  # its own limit: other tests promote on the same server meanwhile


def _holder(api_url: str, tmpdir: Path) -> subprocess.Popen:
    """Another 'host': holds the promotion lock until a line arrives on stdin."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    script = ("import sys\nfrom tasks.models.lock import promotion_lock\n"
              f"with promotion_lock({SERVER_STORE!r}, {MODEL!r}) as what:\n"
              "    print(what, flush=True)\n    sys.stdin.readline()\n")
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=base_env(PREFECT_API_URL=api_url, TMPDIR=tmpdir))


def test_a_prefect_server_serialises_promotions_across_hosts(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "this-host"))
    (tmp_path / "this-host").mkdir()
    holder = _holder(api_url, tmp_path / "other-host")
    try:
        held = holder.stdout.readline().strip()
        assert held == f"Prefect concurrency limit {limit_name(MODEL)!r} on {api_url}"  # no file lock for a server store
        with pytest.raises(TimeoutError, match="another promotion holds the Prefect concurrency limit"):
            with promotion_lock(SERVER_STORE, MODEL, timeout_s=1.0):
                pass
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        with promotion_lock(SERVER_STORE, MODEL, timeout_s=30) as what:  # free again once released
            assert what.startswith("Prefect concurrency limit")
    finally:
        if holder.poll() is None:
            holder.kill()
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name(MODEL))
    assert limit.limit == 1 and limit.active and limit.active_slots == 0


def test_a_local_store_takes_the_file_lock_inside_the_server_limit(mlflow_uri):
    with promotion_lock(mlflow_uri, timeout_s=30) as what:
        assert what.startswith("Prefect concurrency limit") and what.endswith(".cats-vs-dogs.promotion.lock")
