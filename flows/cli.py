"""The one way every command line ends: its exit code, or one `error:` line naming the fix.

`run_main` runs an entry point's work inside the quiet console (flows/console.py) and against
a Prefect server: the configured one, checked first so that a stopped server is one sentence
instead of a retry storm, or a temporary one that dies with the command
(flows/prefect_server.py). Bad input (the project's `InputError`) is one sentence, exit 2;
anything unexpected is one line naming the log file that holds the traceback, exit 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path


def check_prefect_api() -> None:
    """One sentence instead of a retry storm when PREFECT_API_URL points at a server that is not running."""
    from tasks.common.prefect_api import prefect_api

    api = prefect_api()
    if api is None:
        return
    import httpx

    from tasks.common.errors import ConfigError

    try:
        httpx.get(f"{api.url.rstrip('/')}/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError:
        raise ConfigError(f"PREFECT_API_URL is {api.url}, which does not answer; start that server "
                          "(prefect server start), or run without it: unset PREFECT_API_URL, or "
                          "prefect config unset PREFECT_API_URL if it is set in your Prefect profile.") from None


def run_main(work: Callable[[], int], *, log_path: Path, verbose: bool = False,
             preflight: Callable[[], None] | None = None) -> int:
    """Run an entry point's work with a quiet console: its exit code, or one `error:` line.

    Input errors (the project's `InputError`) are what a person fixes: one sentence, exit 2.
    Anything else is a bug or an outage: one line naming it and the log file holding the
    traceback, exit 1. With `verbose`, tracebacks are printed as usual. `preflight` checks what
    needs no work (a missing source, a missing store) before a Prefect server or a flow starts,
    so its sentence comes as quickly as a mistyped option's.
    """
    try:
        return _run_quietly(work, log_path, verbose, preflight)
    finally:
        if not verbose:
            # The process ends after this: Prefect's log and event workers say goodbye from exit
            # hooks, after the terminal was given back, and people need not read it.
            for name in ("prefect", "EventsWorker", "APILogWorker"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _run_quietly(work: Callable[[], int], log_path: Path, verbose: bool,
                 preflight: Callable[[], None] | None = None) -> int:
    from flows.console import console, log_pointer, open_log
    from flows.prefect_server import temporary_server
    from tasks.common.diskspace import disk_full
    from tasks.common.errors import InputError, UnreachableError, is_disk_full

    data_dir = log_path.parent.parent  # log_path_for: <data_dir>/logs/<command>-<time>.log
    try:
        open_log(log_path)
    except InputError as error:  # before the console: the log would be where the problem is
        print(f"error: {error}", file=sys.stderr)
        return 2
    with console(log_path, verbose=verbose) as terminal:

        def stopped(error: BaseException) -> int:
            logging.getLogger("flows").info("Stopped: %s", error, exc_info=True)
            first, *details = str(error).splitlines()  # details (e.g. each failed expectation) are in the log
            if verbose:
                print(f"error: {error}", file=terminal)
            else:
                more = f"; {len(details)} more line(s) of detail" if details else ""
                print(f"error: {first} ({log_pointer(log_path, more)})", file=terminal)
            return 2

        try:
            if preflight is not None:
                preflight()
            check_prefect_api()
            with temporary_server():  # dies with the command, even under kill -9
                return work()
        except (InputError, UnreachableError) as error:
            return stopped(error)
        except KeyboardInterrupt:
            print(f"error: interrupted ({log_pointer(log_path)})", file=terminal)
            return 130
        except Exception as error:
            if is_disk_full(error):
                return stopped(disk_full(error, data_dir))
            if verbose:
                raise
            logging.getLogger("flows").error("Unexpected failure", exc_info=True)
            pointer = log_pointer(log_path)
            where = f"traceback in {log_path}" if pointer.startswith("full log") else pointer
            print(f"error: unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                  f"({where}; --verbose shows it here)", file=terminal)
            return 1
