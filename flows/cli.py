"""The one way every command line ends: its exit code, or one `error:` line naming the fix.

`run_main` runs an entry point's work inside the quiet console (flows/console.py) and against
a Prefect server: the configured one, checked first so that a stopped server is one sentence
instead of a retry storm, or a temporary one that dies with the command
(flows/prefect_server.py). Bad input (the project's `InputError`) is one sentence, exit 2;
anything unexpected is one line naming the log file that holds the traceback, exit 1.
"""

from __future__ import annotations

import logging
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


def run_main(work: Callable[[], int], *, log_path: Path, verbose: bool = False) -> int:
    """Run an entry point's work with a quiet console: its exit code, or one `error:` line.

    Input errors (the project's `InputError`) are what a person fixes: one sentence, exit 2.
    Anything else is a bug or an outage: one line naming it and the log file holding the
    traceback, exit 1. With `verbose`, tracebacks are printed as usual.
    """
    try:
        return _run_quietly(work, log_path, verbose)
    finally:
        if not verbose:
            # The process ends after this: Prefect's log and event workers say goodbye from exit
            # hooks, after the terminal was given back, and people need not read it.
            for name in ("prefect", "EventsWorker", "APILogWorker"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _run_quietly(work: Callable[[], int], log_path: Path, verbose: bool) -> int:
    from flows.console import console
    from flows.prefect_server import temporary_server
    from tasks.common.errors import InputError, UnreachableError

    with console(log_path, verbose=verbose) as terminal:
        try:
            check_prefect_api()
            with temporary_server():  # dies with the command, even under kill -9
                return work()
        except (InputError, UnreachableError) as error:
            logging.getLogger("flows").info("Stopped: %s", error, exc_info=True)
            first, *details = str(error).splitlines()  # details (e.g. each failed expectation) are in the log
            if verbose:
                print(f"error: {error}", file=terminal)
            else:
                more = f"; {len(details)} more line(s) of detail" if details else ""
                print(f"error: {first} (full log{more}: {log_path})", file=terminal)
            return 2
        except KeyboardInterrupt:
            print(f"error: interrupted (full log: {log_path})", file=terminal)
            return 130
        except Exception as error:
            if verbose:
                raise
            logging.getLogger("flows").error("Unexpected failure", exc_info=True)
            print(f"error: unexpected {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                  f"(traceback in {log_path}; --verbose shows it here)", file=terminal)
            return 1
