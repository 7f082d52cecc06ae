"""The quiet terminal: the pipeline's own lines on the screen, everything else in the run's log.

Libraries write a lot to stderr: TensorFlow's C++ start-up lines, CUDA probes, Prefect's
engine chatter and one traceback per flow level for a handled error, MLflow's progress bars
and warnings. Every command line shows people the records the pipeline marked as its own
(tasks/common/logs.py: steps, counts, progress, warnings) and sends the rest to
data_dir/logs/<command>-<time>.log; `--verbose` shows everything instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s %(threadName)s: %(message)s"


class _OursOnly(logging.Filter):
    """Lines the pipeline wrote for people (tasks.common.logs.OURS), and anything of WARNING or worse of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.common.logs import OURS

        return bool(getattr(record, OURS, False))


class _Terminal(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp}  {level}{record.getMessage()}"


def quiet_environment() -> None:
    """Settings that keep libraries from talking: set before they start (TensorFlow, Prefect's server)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@contextlib.contextmanager
def console(log_path: Path, *, verbose: bool = False) -> Iterator[TextIO]:
    """The terminal shows the pipeline's own lines; everything else goes to `log_path`.

    Libraries write a lot to stderr: TensorFlow's C++ start-up lines, CUDA probes, Prefect's
    engine chatter and one traceback per flow level for a handled error, MLflow's progress
    bars and warnings. Without `verbose`, file descriptor 2 and `sys.stderr` point at the log
    file for the duration (so C/C++ writers and child processes are caught too), and a handler
    on the terminal shows only records marked as ours (steps, counts, progress, warnings).
    Yields the terminal stream, for the final result or error line. With `verbose` nothing
    is redirected and everything is shown, as Prefect and the libraries print it.
    """
    quiet_environment()
    terminal = sys.stderr
    if verbose:
        yield terminal
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    own_terminal = None
    if _fileno(terminal) == 2:  # the real stderr: keep a handle on the terminal before fd 2 is redirected
        own_terminal = terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    ours = logging.StreamHandler(terminal)
    ours.setLevel(logging.INFO)
    ours.addFilter(_OursOnly())
    ours.setFormatter(_Terminal())
    everything = logging.StreamHandler(log_file)
    everything.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    moved = [handler for logger in (root, logging.getLogger("prefect")) for handler in logger.handlers
             if isinstance(handler, logging.StreamHandler) and handler not in (ours, everything)]
    streams = {handler: handler.setStream(log_file) for handler in moved}
    for name in ("tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(ours)
    root.addHandler(everything)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            logging.captureWarnings(True)
            yield terminal
    finally:
        logging.captureWarnings(False)
        sys.stderr = terminal
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        for handler, stream in streams.items():
            handler.setStream(stream)
        root.removeHandler(ours)
        root.removeHandler(everything)
        root.setLevel(previous_level)
        log_file.close()
        if own_terminal is not None:
            own_terminal.close()


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def log_path_for(data_dir: str | os.PathLike[str], command: str) -> Path:
    """data_dir/logs/<command>-<UTC time>.log: beside the data it speaks of, never shared between runs."""
    from datetime import datetime, timezone

    from tasks.data.datafolder import DataFolder

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return DataFolder.at(data_dir).logs / f"{command}-{stamp}.log"
