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
import time
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


class LogFile:
    """The run's log file, which never raises: a disk that fills up costs the log its lines, not the run.

    Everything that would go to the terminal's stderr is written here (libraries, Prefect, the
    server's output). When a write fails (ENOSPC, EIO, a quota), the run goes on and later lines
    are dropped; the command's last line says that the log is incomplete, and why.
    """

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lost: OSError | None = None
        self.lost_at = ""
        self.reported = False
        self._file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                self._file.write(text)
            except OSError as error:
                self._lose(error)
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self._file.flush()
            except OSError as error:
                self._lose(error)

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    def __getattr__(self, name: str) -> Any:
        """Anything else a library asks of `sys.stderr` (`buffer`, `closed`, `name`) is the file's own."""
        if name == "_file":
            raise AttributeError(name)
        return getattr(self._file, name)

    def _lose(self, error: OSError) -> None:
        self.lost, self.lost_at = error, time.strftime("%H:%M:%S")

    def pointer(self, more: str = "") -> str:
        """`full log: <path>`, or that the log lost its lines from some time on, and why (`more` before the path)."""
        if self.lost is None:
            return f"full log{more}: {self.path}"
        self.reported = True
        return f"log incomplete from {self.lost_at}, {self.lost.strerror or self.lost}{more}: {self.path}"


def _detach_other_handlers(everything: logging.Handler) -> list[tuple[logging.Logger, logging.Handler]]:
    """Take the libraries' stream handlers (Prefect's rich console handler above all) off every logger.

    Their records reach the log once, through `everything` on the root logger, as plain text:
    Prefect's handler would write them a second time, with the terminal's colour codes. A logger
    that does not propagate to the root gets `everything` in their place. Returns what to put back.
    """
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    removed: list[tuple[logging.Logger, logging.Handler]] = []
    for logger in loggers:
        streams = [handler for handler in logger.handlers
                   if isinstance(handler, logging.StreamHandler) and handler is not everything]
        for handler in streams:
            logger.removeHandler(handler)
            removed.append((logger, handler))
        if streams and logger is not logging.getLogger() and not logger.propagate:
            logger.addHandler(everything)
    return removed


@contextlib.contextmanager
def console(log_path: Path, *, verbose: bool = False) -> Iterator[TextIO]:
    """The terminal shows the pipeline's own lines; everything else goes to `log_path`, each line once, plain text.

    Libraries write a lot to stderr: TensorFlow's C++ start-up lines, CUDA probes, Prefect's
    engine chatter and one traceback per flow level for a handled error, MLflow's progress
    bars and warnings. Without `verbose`, file descriptor 2 and `sys.stderr` point at the log
    file for the duration (so C/C++ writers and child processes are caught too), and a handler
    on the terminal shows only records marked as ours (steps, counts, progress, warnings).
    Yields the terminal stream, for the final result or error line (`log_pointer` says where the
    log is, and whether it lost lines to a full disk). With `verbose` nothing is redirected and
    everything is shown, as Prefect and the libraries print it.
    """
    quiet_environment()
    terminal = original_stderr = sys.stderr
    if verbose:
        yield terminal
        return
    open_log(log_path)
    own_terminal = None
    if _fileno(terminal) == 2:  # the real stderr: keep a handle on the terminal before fd 2 is redirected
        own_terminal = terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log_file = LogFile(log_path)
    ours = logging.StreamHandler(terminal)
    ours.setLevel(logging.INFO)
    ours.addFilter(_OursOnly())
    ours.setFormatter(_Terminal())
    everything = logging.StreamHandler(log_file)  # type: ignore[arg-type] - a file-like object
    everything.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    detached = _detach_other_handlers(everything)
    for name in ("tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(ours)
    root.addHandler(everything)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            logging.captureWarnings(True)
            yield terminal
    finally:
        logging.captureWarnings(False)
        sys.stderr = original_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        for logger in logging.Logger.manager.loggerDict.values():
            if isinstance(logger, logging.Logger) and everything in logger.handlers:
                logger.removeHandler(everything)
        for logger, handler in detached:
            logger.addHandler(handler)
        root.removeHandler(ours)
        root.removeHandler(everything)
        root.setLevel(previous_level)
        log_file.close()
        if log_file.lost is not None and not log_file.reported:
            with contextlib.suppress(OSError, ValueError):
                print(f"warning: {log_file.pointer()}", file=terminal)
        if own_terminal is not None:
            with contextlib.suppress(OSError):
                own_terminal.close()


def log_pointer(log_path: Path, more: str = "") -> str:
    """Where the command's last line sends people: `full log: <path>`, or that the log lost lines, and why.

    Inside `console`, `sys.stderr` is the run's LogFile, which knows whether a write failed.
    """
    current = sys.stderr
    return current.pointer(more) if isinstance(current, LogFile) else f"full log{more}: {log_path}"


def open_log(log_path: Path) -> None:
    """Create the log file (and its folder), or say in one sentence why the data folder cannot hold it.

    A file where the data folder should be, a folder without write permission and a disk with no
    room left are each one sentence naming the path and the fix, before anything else starts.
    """
    from tasks.common.diskspace import check_not_full, no_room
    from tasks.common.errors import ConfigError, is_disk_full

    blocking = next((parent for parent in reversed(log_path.parents) if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{blocking} is a file, not a folder, so the data folder cannot be there; "
                          "pass --data-dir a folder (it is created when missing).")
    check_not_full(log_path.parent)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.open("a").close()
    except OSError as error:
        if is_disk_full(error):
            raise no_room(log_path.parent) from None
        raise ConfigError(f"Cannot write the log {log_path} ({error.strerror or error}); "
                          "pass --data-dir a folder you can write to.") from None


@contextlib.contextmanager
def child_runs_console() -> Iterator[None]:
    """Flow runs that Prefect starts in child processes (`flow.serve`) show the pipeline's lines too.

    A child does not run `console`: it configures logging from Prefect's logging file when it
    imports Prefect. For the block, PREFECT_LOGGING_SETTINGS_PATH names a copy of Prefect's own
    default file in which the console handler shows only the records marked as ours, on the
    child's stdout (the terminal), and everything goes to its stderr as plain text (the run's
    log, which the child inherits as file descriptor 2).
    """
    import tempfile

    import yaml
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    config = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())  # "${SETTING}" templates stay as text
    config.setdefault("filters", {})["ours"] = {"()": f"{__name__}._OursOnly"}
    config["formatters"].update({"terminal": {"()": f"{__name__}._Terminal"}, "plain": {"format": LOG_FORMAT}})
    config["handlers"]["console"] = {"class": "logging.StreamHandler", "level": "INFO", "stream": "ext://sys.stdout",
                                     "filters": ["ours"], "formatter": "terminal"}
    config["handlers"]["log"] = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}
    config["handlers"]["debug"]["formatter"] = "plain"
    for name, logger in config["loggers"].items():
        if "console" in logger.get("handlers", []):
            logger["handlers"] = ["log" if handler == "console" else handler for handler in logger["handlers"]]
    config["loggers"].update({name: {"level": "INFO"} for name in ("tasks", "flows")})
    config["root"]["handlers"] = ["console", "log"]
    previous = os.environ.get("PREFECT_LOGGING_SETTINGS_PATH")
    with tempfile.TemporaryDirectory(prefix="catsdogs-logging-") as folder:
        path = Path(folder) / "logging.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(path)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("PREFECT_LOGGING_SETTINGS_PATH", None)
            else:
                os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = previous


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
