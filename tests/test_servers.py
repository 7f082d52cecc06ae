"""The process helpers that every real-server test relies on: teardown and failing fast."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests import servers

# A parent that starts a child in its own session (as a Prefect worker starts flow runs),
# prints the child's pid and sleeps.
_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def test_stop_kills_descendants_in_other_sessions(tmp_path):
    process = servers.start_process("parent", [sys.executable, "-c", _PARENT], env=servers.base_env(),
                                    log_path=tmp_path / "parent.log")
    with servers.running(process):
        child_pid = int(servers.wait_until(lambda: process.log_path.read_text().strip(), timeout=30,
                                           what="the child's pid", process=process))
        assert psutil.pid_exists(child_pid)
    assert not process.alive()
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


def test_waiting_on_a_dead_process_fails_at_once_with_its_log(tmp_path):
    process = servers.start_process("broken server", [sys.executable, "-c", "print('port in use'); raise SystemExit(3)"],
                                    env=servers.base_env(), log_path=tmp_path / "broken.log")
    with servers.running(process), pytest.raises(servers.ServerError, match="(?s)exited with code 3.*port in use"):
        servers.wait_for_http(f"http://127.0.0.1:{servers.free_port()}/health", timeout=60, process=process)


def test_wait_until_times_out_with_the_last_error():
    with pytest.raises(servers.ServerError, match="timed out.*ZeroDivisionError"):
        servers.wait_until(lambda: 1 / 0, timeout=0.3, interval=0.1, what="arithmetic")


def test_failed_cli_reports_its_output(tmp_path):
    with pytest.raises(servers.ServerError, match="(?s)exited with 2.*bad flag"):
        servers.run_cli([sys.executable, "-c", "import sys; print('bad flag', file=sys.stderr); sys.exit(2)"],
                        env=servers.base_env(), cwd=Path(tmp_path))
