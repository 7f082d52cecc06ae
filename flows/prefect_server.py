"""Prefect's temporary server, started so that it dies with the command that needed it.

Without `PREFECT_API_URL`, Prefect runs a flow against a temporary server: a uvicorn
subprocess it stops at interpreter exit. A command killed with `kill -9` (or by the OOM killer)
never reaches that exit, and the server lives on as an orphan, holding a port and Prefect's
database, until the host reboots. So every command line (`flows.cli.run_main`) starts that same
server itself, from the main thread, with the kernel told (Linux `PR_SET_PDEATHSIG`) to send it
SIGTERM the moment its parent dies. Everything else stays Prefect's: the same server class and
command, the same singleton its clients find, the same stop at exit. Where it cannot be tied
(not Linux, not the main thread) or is not wanted (an API configured), nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
_SERVER_APP = "prefect.server.api.server:create_app"


def _die_with(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: SIGTERM this child when its parent dies (and exit at once if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _tied_server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server, whose uvicorn process gets PR_SET_PDEATHSIG.

        Prefect builds the uvicorn command line and environment; only the one Popen call that
        starts the server app is given the `preexec_fn` (Prefect offers no hook for it).
        """

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            real = subprocess.Popen
            preexec = _die_with(os.getpid())

            def popen(args: Any, *rest: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                if _SERVER_APP in [str(arg) for arg in args]:
                    kwargs.setdefault("preexec_fn", preexec)
                return real(args, *rest, **kwargs)

            subprocess.Popen = popen  # type: ignore[misc]
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real  # type: ignore[misc]

    return TiedServer


def tie_temporary_server() -> str | None:
    """Start this process's temporary Prefect server now, tied to this process; its API URL.

    It is Prefect's own (the port-keyed singleton its clients, log and event workers use when
    no API is configured, stopped by Prefect at exit), started early from the main thread
    because PR_SET_PDEATHSIG fires when the *thread* that started the child ends. Returns
    None and does nothing when an API is configured, ephemeral mode is off, or the server
    cannot be tied here (not Linux, not the main thread).
    """
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    server = _tied_server_class()()  # key None: the instance Prefect's `SubprocessASGIServer()` returns
    server.start(timeout=int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    return server.api_url
