"""`python -m flows.retrain --serve`, as a person runs it in a terminal and stops it with Ctrl-C.

The command serves `retrain/weekly` from its own process with its own temporary Prefect server
(no PREFECT_API_URL); a run is started through that server with `prefect deployment run`, its
pipeline lines must reach the terminal, and Ctrl-C (SIGINT to the terminal's process group, as a
terminal sends it) must end the command promptly: exit 130, one `error:` line, its server gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests import servers
from tests.imagegen import write_petimages_tree, zip_tree


class Terminal:
    """A command in its own process group with its stdout and stderr collected as they come, like a terminal."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, lines: list[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(lines) if re.search(pattern, line)), None)
            if found is not None:
                return found
            assert self.process.poll() is None, "\n".join(self.err[-30:] + self.out[-30:])
            time.sleep(0.5)
        raise AssertionError(f"no line like {pattern!r} within {timeout:.0f} s:\n" + "\n".join(self.err + self.out))

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def own_prefect_server(pid: int) -> tuple[psutil.Process, str]:
    """The `prefect server start` the command started for itself, and its API URL."""
    for child in psutil.Process(pid).children(recursive=True):
        command = child.cmdline()
        if "server" in command and "start" in command and "--port" in command:
            return child, f"http://127.0.0.1:{command[command.index('--port') + 1]}/api"
    raise AssertionError("the command started no Prefect server of its own")


@pytest.mark.slow
def test_serve_shows_its_runs_on_the_terminal_and_ctrl_c_ends_it_promptly(tmp_path):
    write_petimages_tree(tmp_path / "tree", per_class=20, faults=False)
    source = zip_tree(tmp_path / "tree", tmp_path / "pets.zip")
    env = servers.base_env(PREFECT_API_URL=None, PREFECT_HOME=servers.seed_prefect_home(tmp_path / "prefect"),
                           PYTHONPATH=servers.REPO_ROOT,
                           MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
                           CATSDOGS_PROGRESS_SECONDS="0", TF_CPP_MIN_LOG_LEVEL=None, PREFECT_LOGGING_LEVEL=None)
    terminal = Terminal([sys.executable, "-m", "flows.retrain", "--serve", "--source", str(source),
                         "--data-dir", str(tmp_path / "data"), "--weights", "none", "--backbones", "mobilenet_v2",
                         "--input-size", "32", "--min-per-class", "10", "--min-per-class-per-split", "1",
                         "--max-class-imbalance", "10", "--floor", "0"], env, tmp_path)
    try:
        serving = terminal.wait_for(r"Serving retrain/weekly", terminal.err, timeout=240)
        assert "from this process, without a work pool" in serving and "Ctrl-C stops serving" in serving
        assert any("No PREFECT_API_URL" in line for line in terminal.err)  # its server goes with it: said once
        server, api = own_prefect_server(terminal.process.pid)

        run = subprocess.run([servers.cli("prefect"), "deployment", "run", "retrain/weekly"], capture_output=True,
                             text=True, timeout=120, env={**env, "PREFECT_API_URL": api})
        assert run.returncode == 0, run.stdout + run.stderr
        # the run's own lines, from the child process the runner started, on the terminal
        terminal.wait_for(r"^\d\d:\d\d:\d\d  Build manifest: ", terminal.out, timeout=300)

        terminal.ctrl_c()
        stopped = time.monotonic()
        code = terminal.finish(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if terminal.process.poll() is None:
            servers.kill_tree(terminal.process.pid)
    assert code == 130, "\n".join(terminal.err[-40:])
    assert took < 30, f"Ctrl-C took {took:.0f} s to stop serving"
    everything = terminal.err + terminal.out
    assert not [line for line in everything if "Traceback" in line or "Crash detected" in line], everything
    errors = [line for line in terminal.err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted (full log: "), errors
    assert not server.is_running()  # its temporary server went with it
