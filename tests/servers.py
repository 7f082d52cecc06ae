"""Real servers for tests: start them as users do, wait until they answer, and always kill them.

Tests that check "where users meet the product" (a Prefect server, a worker, `prefect deploy`,
`mlflow models serve`, `mlflow ui`) run the real command lines as subprocesses. The helpers here
own the dull, error-prone parts: a free loopback port, an isolated environment, readiness polling
that fails fast with the process log when the process dies, and teardown that kills the whole
process tree (a Prefect worker starts flow runs in their *own* sessions, so killing the worker's
process group alone would leave them running).

Nothing here imports Prefect or MLflow at import time; the helpers only run their CLIs and speak
HTTP, so any test can reuse them for any server (`start_process` + `wait_for_http`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The project root: where `prefect deploy` must run so entrypoints like flows/retrain.py resolve."""

BIN_DIR = Path(sys.executable).parent
"""Console scripts (prefect, mlflow) of the interpreter running the tests, not whatever is on PATH."""

TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


class ServerError(RuntimeError):
    """A helper process failed to start, died, or did not finish in time (message has its log)."""


# --------------------------------------------------------------------------------------------
# Generic processes
# --------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the OS picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def cli(name: str) -> str:
    """Path of a console script installed beside the running interpreter (e.g. 'prefect')."""
    path = BIN_DIR / name
    return str(path) if path.exists() else name


@dataclass
class ManagedProcess:
    """A subprocess started in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the process log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process and every descendant (SIGTERM, then SIGKILL after `timeout`)."""
        kill_tree(self.popen.pid, timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1)


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """Kill `pid`, its process group and all its descendants, even those in other sessions.

    Descendants are collected *before* the parent is signalled: once it dies they are
    re-parented to init and can no longer be found from it.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, survivors = psutil.wait_procs(procs, timeout=timeout)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=5)


def start_process(name: str, args: Sequence[str], *, env: Mapping[str, str], log_path: Path,
                  cwd: Path | None = None) -> ManagedProcess:
    """Start `args` in a new session with stdout+stderr appended to `log_path`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(args), env=dict(env), cwd=str(cwd) if cwd else None, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


@contextlib.contextmanager
def running(process: ManagedProcess) -> Iterator[ManagedProcess]:
    """Yield `process` and kill its tree on exit, whatever happened inside."""
    try:
        yield process
    finally:
        process.stop()


def wait_until(check: Callable[[], Any], *, timeout: float, interval: float = 0.5,
               what: str = "condition", process: ManagedProcess | None = None) -> Any:
    """Call `check` until it returns a truthy value; fail early if `process` dies meanwhile."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a server that is still starting refuses
            last_error = exc
        if process is not None and not process.alive():
            raise ServerError(f"{process.name} exited with code {process.popen.returncode} "
                              f"while waiting for {what}:\n{process.log_tail()}")
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    log = f"\n{process.name} log:\n{process.log_tail()}" if process is not None else ""
    raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}{detail}{log}")


def wait_for_http(url: str, *, timeout: float = 120.0, process: ManagedProcess | None = None,
                  ok: Callable[[httpx.Response], bool] | None = None) -> httpx.Response:
    """Poll `url` until it answers 2xx (or `ok(response)`); return that response."""
    accept = ok or (lambda response: response.is_success)

    def check() -> httpx.Response | None:
        response = httpx.get(url, timeout=5.0)
        return response if accept(response) else None

    return wait_until(check, timeout=timeout, what=f"HTTP {url}", process=process)


def base_env(**overrides: str | os.PathLike | None) -> dict[str, str]:
    """os.environ plus overrides; an override of None removes the variable."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


# --------------------------------------------------------------------------------------------
# Prefect
# --------------------------------------------------------------------------------------------

def prefect_env(home: Path, api_url: str | None = None, **extra: str | os.PathLike | None
                ) -> dict[str, str]:
    """Environment for Prefect CLIs: their own PREFECT_HOME (and sqlite DB), quiet, no telemetry.

    With `api_url` every CLI talks to that server instead of starting an ephemeral one.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    return base_env(
        PREFECT_HOME=home,
        PREFECT_PROFILES_PATH=home / "profiles.toml",
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        **extra,
    )


@dataclass
class PrefectServer:
    """A running `prefect server start` and how to reach it."""

    url: str
    home: Path
    process: ManagedProcess
    env: dict[str, str] = field(repr=False)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def stop(self) -> None:
        self.process.stop()


def start_prefect_server(home: Path, *, port: int | None = None, timeout: float = 180.0,
                         ui: bool = False) -> PrefectServer:
    """Start `prefect server start` on loopback with its own PREFECT_HOME; wait for /api/health.

    The UI is off by default in tests: it only costs start-up time and no test reads it.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = prefect_env(home, api_url=None, PREFECT_UI_ENABLED=str(ui).lower(),
                      PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    process = start_process(
        "prefect server", [cli("prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(port)],
        env=env, log_path=Path(home) / "server.log", cwd=Path(home),
    )
    try:
        wait_for_http(f"{url}/api/health", timeout=timeout, process=process)
    except BaseException:
        process.stop()
        raise
    return PrefectServer(url=url, home=Path(home), process=process,
                         env=prefect_env(home, api_url=f"{url}/api"))


def run_cli(args: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None,
            timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run a CLI to completion; raise ServerError with its output when it fails."""
    try:
        result = subprocess.run(list(args), env=dict(env), cwd=str(cwd) if cwd else None,
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"{' '.join(args)} timed out after {timeout:.0f} s:\n"
                          f"{exc.stdout or ''}{exc.stderr or ''}") from exc
    if result.returncode != 0:
        raise ServerError(f"{' '.join(args)} exited with {result.returncode}:\n"
                          f"{result.stdout}\n{result.stderr}")
    return result


def prefect(*args: str, server: PrefectServer, cwd: Path | None = None,
            timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run `prefect <args>` against `server` (e.g. prefect('work-pool', 'ls', server=s))."""
    return run_cli([cli("prefect"), *args], env=server.env, cwd=cwd, timeout=timeout)


def create_process_pool(server: PrefectServer, name: str) -> None:
    """`prefect work-pool create NAME --type process --overwrite`, as the README tells users."""
    prefect("work-pool", "create", name, "--type", "process", "--overwrite", server=server)


def start_worker(server: PrefectServer, pool: str, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, log_path: Path | None = None,
                 poll_seconds: float = 1.0) -> ManagedProcess:
    """`prefect worker start --pool POOL --type process` with extra `env` for its flow runs.

    The flow-run subprocesses inherit the worker's environment, so this is where a test points
    MLFLOW_TRACKING_URI, KERAS_HOME etc. at temporary stores. Polling is shortened from
    Prefect's 10 s default so a triggered run starts promptly.
    """
    worker_env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
                  "PREFECT_WORKER_PREFETCH_SECONDS": "5", **(env or {})}
    name = f"test-worker-{os.getpid()}-{free_port()}"
    return start_process(
        "prefect worker",
        [cli("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name],
        env=worker_env, log_path=log_path or server.home / "worker.log", cwd=cwd or REPO_ROOT,
    )


def api_get(server: PrefectServer, path: str) -> Any:
    """GET a Prefect REST endpoint and return its JSON."""
    response = httpx.get(f"{server.api_url}/{path.lstrip('/')}", timeout=30.0)
    response.raise_for_status()
    return response.json()


def api_post(server: PrefectServer, path: str, payload: Mapping[str, Any]) -> Any:
    """POST to a Prefect REST endpoint (the `/filter` endpoints) and return its JSON."""
    response = httpx.post(f"{server.api_url}/{path.lstrip('/')}", json=dict(payload), timeout=30.0)
    response.raise_for_status()
    return response.json()


def wait_until_worker_online(server: PrefectServer, pool: str, worker: ManagedProcess,
                             timeout: float = 120.0) -> None:
    """Wait until the worker has sent a heartbeat to its pool (so it will pick up runs)."""
    wait_until(lambda: api_post(server, f"work_pools/{pool}/workers/filter", {}),
               timeout=timeout, what=f"a worker in pool {pool!r}", process=worker)


_UUID = re.compile(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def run_deployment(server: PrefectServer, name: str, params: Mapping[str, Any] | None = None,
                   *, cwd: Path | None = None) -> str:
    """`prefect deployment run NAME --params JSON`; return the id of the flow run it created."""
    args = ["deployment", "run", name]
    if params is not None:
        args += ["--params", json.dumps(params)]
    result = prefect(*args, server=server, cwd=cwd)
    match = _UUID.search(result.stdout)
    if not match:
        raise ServerError(f"no flow run id in the output of prefect deployment run:\n{result.stdout}")
    return match.group(1)


def wait_for_flow_run(server: PrefectServer, flow_run_id: str, *, timeout: float = 300.0,
                      worker: ManagedProcess | None = None) -> dict[str, Any]:
    """Poll the flow run until it reaches a terminal state; return the flow run JSON."""

    def terminal() -> dict[str, Any] | None:
        run = api_get(server, f"flow_runs/{flow_run_id}")
        return run if (run.get("state") or {}).get("type") in TERMINAL_STATES else None

    return wait_until(terminal, timeout=timeout, interval=1.0,
                      what=f"flow run {flow_run_id} to finish", process=worker)


def flow_run_artifacts(server: PrefectServer, flow_run_id: str) -> list[dict[str, Any]]:
    """Artifacts created by a flow run (markdown summaries, tables, links)."""
    return api_post(server, "artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def flow_run_logs(server: PrefectServer, flow_run_id: str, limit: int = 200) -> str:
    """The flow run's log messages as text, to explain a failed run in an assertion message."""
    logs = api_post(server, "logs/filter",
                    {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": limit,
                     "sort": "TIMESTAMP_ASC"})
    return "\n".join(f"{entry.get('level')}: {entry.get('message')}" for entry in logs)
