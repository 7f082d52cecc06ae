"""The one exclusive lock of the project: a `flock` on a file.

The kernel drops a `flock` the moment its holder dies, however it dies (`kill -9`, the OOM
killer), so a killed run never blocks the next one and there is no stale lock to clean up.
The data-folder lock (one run per data folder), the MLflow store's creation lock and the
promotion lock all take it; they differ only in what they say while they wait.

Taking the lock writes nothing: an existing lock file is opened as it is, never truncated or
touched, so a second run of a flow stays write-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""


@contextlib.contextmanager
def exclusive_flock(path: str | os.PathLike[str], *, timeout_s: float, poll_s: float = 0.05,
                    while_waiting: Callable[[float], None] | None = None) -> Iterator[float]:
    """Hold an exclusive `flock` on `path` for the block; yields how many seconds it waited.

    `while_waiting(seconds_so_far)` is called after each unsuccessful try (the caller decides
    what, and how often, to tell people). Raises LockTimeout after `timeout_s`. Threads of
    one process exclude each other too: each call opens its own file description.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise LockTimeout(f"{path} was held by another process for over {timeout_s:g} s") from None
                if while_waiting is not None:
                    while_waiting(waited)
                time.sleep(poll_s)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
