"""The prediction log: each row the served model scored, kept for the monitor to compare with training.

What a row holds (one JSON object per line): `time` (UTC), the model's registered `model` name,
`version` and `run_id`, the predicted `label` and `label_index`, its `probability`, the
`probabilities` of every class in label order, and `features`, the 32-number summary of the
head's input (tasks/learning/head_input.py; absent for a model logged before it had one). No
image is stored unless asked (`prediction_log_images`: then each scored encoded image is kept
once, by its sha256, under `images/<hour>/`, and its row names it in `image`).

Why it is built this way:
- One file per process and hour, `predictions-<YYYYMMDDTHH>-<host>-<pid>.jsonl`: server workers
  never share a file, so no lock is taken and no line interleaves another's. Each batch of rows
  goes to the file in one append write.
- Off the request's critical path: the request's thread only hands the batch's arrays to a
  bounded queue (never waiting: when the queue is full the rows are dropped and counted, once
  said); a writer thread of the process projects, serialises and appends them.
- Bounded: a process's file of an hour stops taking rows at a tenth of the folder's budget
  (`prediction_log_mb`, 1024 by default), and at each new hour the files and kept images older
  than `prediction_log_days` (30) go, then the oldest others until the folder is under budget.
- A disk that is full (or a folder that cannot be written) stops the logging with one warning in
  the server's log and never fails a request; the next hour's file is tried again.
- Readers take whole lines: a last line cut short (a process killed mid-write, or a write still
  under way) is left out; a file with any other line that is not a row is skipped and named.

Nothing here imports Keras or Prefect: the served model imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)

PREFIX = "predictions-"
SUFFIX = ".jsonl"
IMAGES = "images"
HOUR_FORMAT = "%Y%m%dT%H"

DEFAULT_DAYS = 30.0
"""Retention window: rows and kept images older than this go at the next hour's sweep."""

DEFAULT_MB = 1024.0
"""The folder's budget in MiB (rows and kept images)."""

FILE_SHARE = 0.1
"""Share of the budget one process's file of one hour may take (then its rows wait for the next hour)."""

QUEUE_BATCHES = 256
"""Scored batches waiting for the writer at most; beyond them rows are dropped rather than a request kept waiting."""

REQUIRED = ("time", "label_index", "probabilities")
"""Keys every row has; a line without them is not a row."""


_not_traffic = threading.local()


@contextlib.contextmanager
def not_traffic() -> Iterator[None]:
    """Models loaded by this thread inside the block log nothing: MLflow loads a model it logs and predicts its input
    example once, to check that it serves, and that row is not a request."""
    before = getattr(_not_traffic, "on", False)
    _not_traffic.on = True
    try:
        yield
    finally:
        _not_traffic.on = before


@dataclass(frozen=True)
class LogSettings:
    """Where the log goes and how much of it is kept (the served model's config: `prediction_log`, ...)."""

    folder: Path
    days: float = DEFAULT_DAYS
    max_mb: float = DEFAULT_MB
    images: bool = False

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LogSettings | None:
        """The settings a model config names, or None where logging is off (no folder, a model logged before, or a
        model loaded `not_traffic`)."""
        folder = config.get("prediction_log")
        if not folder or getattr(_not_traffic, "on", False):
            return None
        return cls(folder=Path(str(folder)).expanduser(), days=float(config.get("prediction_log_days") or DEFAULT_DAYS),
                   max_mb=float(config.get("prediction_log_mb") or DEFAULT_MB),
                   images=bool(config.get("prediction_log_images")))


@dataclass(frozen=True)
class ModelIdentity:
    """Which model wrote a row: registered name and version (where it was loaded by them) and its MLflow run."""

    name: str = ""
    version: str = ""
    run_id: str = ""

    @classmethod
    def of_folder(cls, model_dir: str | os.PathLike[str]) -> ModelIdentity:
        """Read from a local model folder: its MLmodel (run id) and MLflow's `registered_model_meta` (name and
        version), which MLflow writes beside it when the model was loaded by a `models:/` name."""
        import yaml

        def read(name: str) -> dict[str, Any]:
            try:
                return yaml.safe_load((Path(model_dir) / name).read_text()) or {}
            except (OSError, yaml.YAMLError):
                return {}

        meta = read("registered_model_meta")
        return cls(name=str(meta.get("model_name") or ""), version=str(meta.get("model_version") or ""),
                   run_id=str(read("MLmodel").get("run_id") or ""))


def hour_of(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime(HOUR_FORMAT)


def file_hour(path: Path) -> datetime | None:
    """The UTC hour a log file's name says, or None for a name that is not a log file's."""
    if not (path.name.startswith(PREFIX) and path.name.endswith(SUFFIX)):
        return None
    try:
        return datetime.strptime(path.name[len(PREFIX):].split("-", 1)[0], HOUR_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


@dataclass
class _Batch:
    moment: float
    probabilities: np.ndarray
    indexes: np.ndarray
    features: np.ndarray | None
    images: list[Any] | None


class PredictionLog:
    """The log of one process: `record` scored batches from any thread; a writer thread appends them."""

    def __init__(self, settings: LogSettings, identity: ModelIdentity, classes: Sequence[str],
                 summary: Callable[[np.ndarray], np.ndarray] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.identity = identity
        self.classes = list(classes)
        self.summary = summary
        self.clock = clock
        self._queue: queue.Queue[_Batch | None] = queue.Queue(QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start = threading.Lock()
        self._hour = ""
        self._fd: int | None = None
        self._written = 0
        self._paused_hour = ""  # an hour whose file is full, or whose folder could not be written
        self._said: set[str] = set()
        self.dropped = 0

    def path(self, hour: str) -> Path:
        """This process's file of an hour (YYYYMMDDTHH, UTC)."""
        return self.settings.folder / f"{PREFIX}{hour}-{socket.gethostname()}-{os.getpid()}{SUFFIX}"

    # ------------------------------------------------------------------ the request's side: hand over, never wait

    def record(self, probabilities: np.ndarray, indexes: np.ndarray, features: np.ndarray | None = None,
               images: list[Any] | None = None) -> None:
        """Queue one scored batch: (n, classes) probabilities, the predicted label indexes, the head input (n, dim)."""
        self._ensure_writer()
        batch = _Batch(self.clock(), probabilities, indexes, features, images if self.settings.images else None)
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += len(indexes)
            self._say_once("full-queue", logging.WARNING, "The prediction log's writer is behind; rows are dropped "
                           "(not logged) until it catches up, and requests are not kept waiting for it.")

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._start:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._pid != os.getpid():  # a forked child: its own queue and file, not its parent's
                self._queue = queue.Queue(QUEUE_BATCHES)
                self._fd, self._hour = None, ""
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued row is written (or `timeout` seconds pass)."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer (at exit too)."""
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            return
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd, self._hour = None, ""
                    return
                self._write(batch)
            except Exception:  # noqa: BLE001 - the log never takes the server down with it
                self._say_once("bug", logging.WARNING, "The prediction log failed to write a batch; its rows are "
                               "not logged.", exc_info=True)
            finally:
                self._queue.task_done()

    def _write(self, batch: _Batch) -> None:
        hour = hour_of(batch.moment)
        if hour == self._paused_hour:
            return
        try:
            if hour != self._hour:
                self._open(hour)
            data = self._lines(batch, hour)
            if self._written + len(data) > self.settings.max_bytes * FILE_SHARE:
                self._pause(hour, logging.WARNING, f"The prediction log file {self.path(hour)} reached a tenth of the "
                            f"folder's {self.settings.max_mb:g} MiB budget (prediction_log_mb); this process logs "
                            "no more rows until the next hour.")
                return
            if os.write(self._fd, data) < len(data):  # type: ignore[arg-type]  # the disk filled up mid-write
                os.ftruncate(self._fd, self._written)  # type: ignore[arg-type]  # no half line left behind
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._written += len(data)
        except OSError as error:
            self._pause(hour, logging.WARNING, f"The prediction log cannot be written in {self.settings.folder} "
                        f"({error.strerror or error}); requests are answered as before, and their rows are not logged "
                        "(it tries again at the next hour's file). Free space there or point prediction_log "
                        "elsewhere (MLFLOW_PYFUNC_INFERENCE_CONFIG).", key="os-error")

    def _open(self, hour: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._hour = hour
        self.settings.folder.mkdir(parents=True, exist_ok=True)
        sweep(self.settings, now=self.clock())
        path = self.path(hour)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        self._written = os.fstat(self._fd).st_size
        if self._paused_hour:
            self._paused_hour = ""
            _log.info("The prediction log is written again, to %s.", path)

    def _pause(self, hour: str, level: int, message: str, key: str = "file-full") -> None:
        self._paused_hour = hour
        self._say_once(key, level, message)

    def _say_once(self, key: str, level: int, message: str, **kwargs: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            _log.log(level, message, **kwargs)

    def _lines(self, batch: _Batch, hour: str) -> bytes:
        moment = datetime.fromtimestamp(batch.moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        probabilities = np.round(np.asarray(batch.probabilities, dtype=np.float64), 6)
        features = None
        if batch.features is not None and self.summary is not None:
            features = np.round(self.summary(batch.features).astype(np.float64), 4).tolist()
        images = self._keep_images(batch.images, hour) if batch.images is not None else None
        lines = []
        for row, index in enumerate(np.asarray(batch.indexes).tolist()):
            values = probabilities[row].tolist()
            record = {"time": moment, "model": self.identity.name, "version": self.identity.version,
                      "run_id": self.identity.run_id, "label": self.classes[index], "label_index": index,
                      "probability": values[index], "probabilities": values}
            if features is not None:
                record["features"] = features[row]
            if images is not None and images[row]:
                record["image"] = images[row]
            lines.append(json.dumps(record, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode()

    def _keep_images(self, cells: list[Any], hour: str) -> list[str]:
        """Each encoded image's sha256, its bytes written once under images/<hour>/ (pixel rows keep none)."""
        import hashlib

        from tasks.models.inputs import IMAGE_COLUMN, encoded_bytes

        folder = self.settings.folder / IMAGES / hour
        names = []
        for kind, value in cells:
            if kind != IMAGE_COLUMN:
                names.append("")
                continue
            data = encoded_bytes(value)
            name = hashlib.sha256(data).hexdigest()
            target = folder / name
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f".{name}.{os.getpid()}.partial"
                partial.write_bytes(data)
                os.replace(partial, target)
            names.append(name)
        return names


# ---------------------------------------------------------------------- bounds


def sweep(settings: LogSettings, now: float | None = None) -> list[Path]:
    """Remove what the retention window and the budget leave out (never the current hour's); what was removed.

    Any process may sweep (they agree on what goes); a file another process removed first is no
    error.
    """
    import shutil

    now = time.time() if now is None else now
    current = datetime.fromtimestamp(now, timezone.utc).replace(minute=0, second=0, microsecond=0)
    oldest = current - timedelta(days=settings.days)
    entries: list[tuple[datetime, Path, int]] = []
    for path in settings.folder.glob(f"{PREFIX}*{SUFFIX}"):
        hour = file_hour(path)
        if hour is not None:
            entries.append((hour, path, _size(path)))
    for folder in (settings.folder / IMAGES).glob("*"):
        try:
            hour = datetime.strptime(folder.name, HOUR_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        entries.append((hour, folder, sum(_size(path) for path in folder.glob("*"))))
    removed = []
    total = sum(size for _, _, size in entries)
    for hour, path, size in sorted(entries, key=lambda entry: (entry[0], str(entry[1]))):
        if hour >= current or (hour >= oldest and total <= settings.max_bytes):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------- reading


@dataclass
class LogWindow:
    """The rows of a time window, and what could not be read."""

    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Corrupt files: (path, why), each left out whole."""
    cut_short: int = 0
    """Last lines cut short (a writer killed mid-write, or a write under way), left out."""


def read_file(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(the rows of one log file, whether its last line was cut short); ValueError naming the line when any other line
    is not a row."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is a write cut short (or nothing)
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"line {number} is not JSON") from None
        if not isinstance(row, dict) or any(key not in row for key in REQUIRED):
            raise ValueError(f"line {number} is not a prediction row (it needs {', '.join(REQUIRED)})")
        rows.append(row)
    return rows, bool(lines[-1])


def read_window(folder: str | os.PathLike[str], since: datetime | None = None,
                until: datetime | None = None) -> LogWindow:
    """Rows written in [since, until) in every log file of `folder`, oldest file first; corrupt files skipped and named."""
    window = LogWindow(rows=[])
    start_hour = since.replace(minute=0, second=0, microsecond=0) if since else None
    paths = sorted((path for path in Path(folder).glob(f"{PREFIX}*{SUFFIX}") if file_hour(path) is not None),
                   key=lambda path: (file_hour(path), path.name))
    for path in paths:
        hour = file_hour(path)
        if (start_hour and hour < start_hour) or (until and hour >= until):
            continue
        try:
            rows, cut_short = read_file(path)
        except (OSError, ValueError) as error:
            window.skipped.append((path, str(error)))
            continue
        window.files.append(path)
        window.cut_short += cut_short
        window.rows += [row for row in rows if _within(row, since, until)]
    return window


def _within(row: dict[str, Any], since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    try:
        moment = datetime.fromisoformat(str(row["time"]).replace("Z", "+00:00"))
    except ValueError:
        return False
    return (since is None or moment >= since) and (until is None or moment < until)
