"""A command line's own Prefect server: `prefect server start`, tied to the command's life.

Without `PREFECT_API_URL`, Prefect would run flows against a temporary server it starts in the
background and stops at interpreter exit. A command killed with `kill -9` (or by the OOM
killer) never reaches that exit, and the server lives on as an orphan, holding a port and
Prefect's database, until the host reboots. So every command line (`flows.cli.run_main`) starts
the server itself, the way people do, `prefect server start` on a free loopback port, as a
child the kernel sends SIGTERM the moment the command dies (Linux `PR_SET_PDEATHSIG`, set in
the child before it runs), and points this process and its children at it for the command's
duration (PREFECT_API_URL, marked as temporary: see tasks/common/prefect_api.py). Nothing of
Prefect's internals is touched. Where an API is configured, nothing is started.

Commands started together share one PREFECT_HOME and its sqlite database, which each server
creates or migrates as it starts: two servers migrating one new database at once fail
(`duplicate column name`, exit code 3). So a server's start, up to its first healthy answer, is
serialised by a lock beside the database (tasks/common/flock.py); the next command's server
then starts on a migrated database, a few seconds later.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.common.databases import check_database
from tasks.common.errors import ConfigError
from tasks.common.flock import LockTimeout, exclusive_flock
from tasks.common.prefect_api import TEMPORARY_API_ENV, prefect_api

STARTUP_TIMEOUT_S = 180.0
"""A first start creates Prefect's database (seconds on a laptop, longer on a busy 2-core machine)."""

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: SIGTERM this child when its parent dies (and exit at once if it already has)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def local_database() -> Path | None:
    """The sqlite file a Prefect server started here would keep its state in (None for PostgreSQL)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url or "")
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix):]).expanduser() if url.startswith(prefix) else None


def check_local_database() -> str:
    """Check the database of the temporary server (DamagedDatabase names the file and the fix); what was checked."""
    database = local_database()
    if database is None:
        return "Prefect database: not a local sqlite file"
    if not database.is_file():
        return f"Prefect database {database}: not created yet"
    check_database(database, "Prefect's database", disposable=True)
    return f"Prefect database {database}: intact"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_healthy(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"Prefect's temporary server exited with code {process.returncode} before it answered "
                              "(its output is in the log); check PREFECT_HOME, or start a server and set "
                              "PREFECT_API_URL.")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).is_success:
                return
        time.sleep(0.2)
    raise ConfigError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s; start one "
                      "(prefect server start) and set PREFECT_API_URL.")


def drain_clients() -> None:
    """Send the log lines and events Prefect still queues, while their server is up."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        EventsWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - a line that cannot be sent must not fail the command
        pass


def setup_lock(database: Path) -> Path:
    """The lock file a server's start holds, beside the sqlite database it creates or migrates."""
    return database.with_name(f".{database.name}.setup.lock")


@contextlib.contextmanager
def _setting_up(timeout_s: float) -> Iterator[None]:
    """Hold the start-up lock beside the local database for the block (where there is one to hold).

    Another command's server creating or migrating the same database meanwhile is waited for;
    a home whose folder cannot hold a lock file starts unlocked, as it did before.
    """
    database = local_database()
    said: list[float] = []

    def waiting(seconds: float) -> None:
        if not said:
            logging.getLogger(__name__).info("Waiting for another command's Prefect server to set up %s; this "
                                             "command's own starts once that one answers", database)
            said.append(seconds)

    with contextlib.ExitStack() as stack:
        if database is not None:
            try:
                stack.enter_context(exclusive_flock(setup_lock(database), timeout_s=timeout_s, while_waiting=waiting))
            except LockTimeout:  # before OSError: a TimeoutError is one
                raise ConfigError(f"Another command's Prefect server took over {timeout_s:.0f} s to set up {database}; "
                                  "try again, or start one server (prefect server start) and set PREFECT_API_URL."
                                  ) from None
            except OSError:
                pass
        yield


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def temporary_server(timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str | None]:
    """Run the block against a Prefect server of its own, unless an API is configured; yields its API URL.

    The server's output goes where this process's stderr goes (the run's log file under the
    quiet console). It must be entered from the main thread: the kernel's parent-death signal
    fires when the *thread* that started the child ends.
    """
    api = prefect_api()
    if api is not None:
        yield api.url
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    check_local_database()  # a damaged one is named before a server fails on it
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # Its output lands in the run's log: plain text, and no question about profiles to a terminal it does not have.
    env = {**{name: value for name, value in os.environ.items() if name != "FORCE_COLOR"},
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "PREFECT_CLI_PROMPT": "false",
           "PREFECT_LOGGING_COLORS": "false", "NO_COLOR": "1"}
    with _setting_up(timeout_s):  # one server at a time creates or migrates a shared database
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--log-level", "WARNING"],
            env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is for the command: the server must outlive its goodbyes, then stopped
            preexec_fn=_die_with_parent(os.getpid()))
        try:
            _wait_until_healthy(process, url, timeout_s)
        except BaseException:
            _stop(process)
            raise
    try:
        previous = {name: os.environ.get(name) for name in ("PREFECT_API_URL", TEMPORARY_API_ENV)}
        os.environ.update({"PREFECT_API_URL": url, TEMPORARY_API_ENV: url})  # child processes meet it too
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    drain_clients()
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        _stop(process)
