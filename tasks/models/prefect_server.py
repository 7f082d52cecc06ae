"""Prefect's temporary server, started so that it dies with the command that needed it.

Without `PREFECT_API_URL`, Prefect runs a flow against a temporary server: a uvicorn
subprocess it stops at interpreter exit. A command killed with `kill -9` never reaches that
exit, and the server lives on as an orphan, holding a port and Prefect's database, until the
host reboots. So a command-line run starts that same server itself, from the main thread,
with the kernel told (Linux `PR_SET_PDEATHSIG`) to send it SIGTERM the moment its parent dies,
and pins `PREFECT_API_URL` to it for the run. Where that cannot be arranged (not Linux, not the
main thread, an API already configured) Prefect's own behaviour is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

STARTUP_TIMEOUT_S = 180
"""Longest wait for the temporary server (Prefect's own setting, when larger, wins)."""

_PR_SET_PDEATHSIG = 1
_SERVER_APP = "prefect.server.api.server:create_app"


def _die_with(parent: int) -> Any:
    """A `preexec_fn`: SIGTERM this child when its parent dies (and at once if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _tied_server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server, whose uvicorn process gets PR_SET_PDEATHSIG."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            real = subprocess.Popen
            preexec = _die_with(os.getpid())

            def popen(args: Any, *rest: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                if _SERVER_APP in [str(arg) for arg in args]:
                    kwargs.setdefault("preexec_fn", preexec)
                return real(args, *rest, **kwargs)

            subprocess.Popen = popen  # type: ignore[misc]  # only for this one call, see above
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real  # type: ignore[misc]

    return TiedServer


def _can_tie() -> bool:
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def tied_temporary_server() -> Iterator[str | None]:
    """Run the block against a temporary Prefect server that dies with this process; yields its API URL.

    Yields None and changes nothing when an API is configured or the server cannot be tied.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url or not _can_tie():
        yield None
        return
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = _tied_server_class()()
    # a new database is migrated first, which takes longer than Prefect's 20 s on a busy CPU
    server.start(timeout=max(int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), STARTUP_TIMEOUT_S))
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # subprocesses (process pools) use it too
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        _drain()
        server.stop()


def _drain(timeout_s: float = 15.0) -> None:
    """Send the run's buffered logs and events while the server still listens (else they are lost)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout_s)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout_s)


def server_pid() -> int | None:
    """The pid of the temporary server this process runs, if any (for tests and diagnostics)."""
    from prefect.server.api.server import SubprocessASGIServer

    for instance in SubprocessASGIServer._instances.values():
        process = getattr(instance, "server_process", None)
        if process is not None and process.poll() is None:
            return int(process.pid)
    return None
