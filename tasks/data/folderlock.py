"""One run at a time per data folder: the re-entrant lock on `data_dir/.lock`.

A scheduled retrain and a manual one on the same data folder would otherwise arrange, extract
features and train into the same files at once. Every flow that writes the data folder
(`retrain`, and `prepare_data` / `train_model` when called alone) holds this lock for its
whole run (`DataFolder.lock`, taken in the flow's body), so a second run waits for the first
and then finds its work done, instead of both failing. While it waits it says, once a minute,
which process it waits for.

The lock is the project's one `flock` (tasks/common/flock.py): the kernel drops it the moment
its holder dies, so a killed run never blocks the next one. It is re-entrant within one run
(`retrain` holds it and calls `prepare_data`, which takes it again): what a run holds is kept
in a context variable, which Prefect hands on to subflows and tasks.

Because every writer holds the lock, the holder knows that nothing else works in the folder:
leftovers such as hidden `.partial` training folders belong to dead runs and can be removed
(`DataFolder.remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.common.errors import InputError
from tasks.common.flock import LockTimeout, exclusive_flock
from tasks.common.logs import run_logger

WAIT_S = 24 * 3600.0
"""How long a run waits for another run of the same data folder before giving up."""

REPORT_EVERY_S = 60.0
"""How often a waiting run says again whom it waits for."""

_POLL_S = 0.2

_HELD: contextvars.ContextVar[frozenset[tuple[int, int]]] = contextvars.ContextVar("catsdogs_held_data_folders",
                                                                                     default=frozenset())


class DataFolderBusy(InputError):
    """Another run kept the data folder for longer than this run would wait."""


def lock_holders(path: Path) -> list[int]:
    """Pids that hold a `flock` on `path` (from /proc/locks; [] where the kernel does not say)."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                pids.append(int(parts[4]))
        except ValueError:
            continue
    return sorted(set(pids))


def describe_pid(pid: int) -> str:
    """`pid 123 (python -m flows.retrain --source ...)`, the command shortened."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    if len(command) > 160:
        command = command[:157] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def holder_text(path: Path) -> str:
    pids = [pid for pid in lock_holders(path) if pid != os.getpid()]
    return ", ".join(describe_pid(pid) for pid in pids) if pids else "another process"


def _key(lock_file: Path) -> tuple[int, int] | None:
    try:
        st = lock_file.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def hold(lock_file: Path, what: str, *, wait_s: float = WAIT_S, create: bool = True) -> Iterator[bool]:
    """Hold a data folder's lock file for the block; wait (saying for whom) while another run holds it.

    Yields True when the lock is held (taken here or already held by this run), False when
    `create` is False and the folder does not exist (there is nothing to protect, and the
    caller's own checks will say so). Raises DataFolderBusy after `wait_s`.
    """
    lock_file = Path(lock_file)
    root = lock_file.parent
    if not root.is_dir():
        if not create:
            yield False
            return
        root.mkdir(parents=True, exist_ok=True)
    if _key(lock_file) in _HELD.get():
        yield True  # this run holds it already (a subflow of the run that took it)
        return
    log = run_logger(__name__)
    reported: list[float] = []

    def waiting(seconds: float) -> None:
        if not reported:
            log.info("%s waits: data folder %s is in use by %s; it goes on when that run ends",
                     what, root, holder_text(lock_file))
            reported.append(seconds)
        elif seconds - reported[-1] >= REPORT_EVERY_S:
            log.info("%s still waits for %s (data folder %s, %.0f s so far)", what, holder_text(lock_file), root,
                     seconds)
            reported.append(seconds)

    with contextlib.ExitStack() as stack:
        try:
            waited = stack.enter_context(exclusive_flock(lock_file, timeout_s=wait_s, poll_s=_POLL_S,
                                                         while_waiting=waiting))
        except LockTimeout:
            raise DataFolderBusy(f"Data folder {root} has been in use by {holder_text(lock_file)} for over "
                                 f"{wait_s:.0f} s; wait for that run to end, or stop it if it hangs.") from None
        if reported:
            log.info("%s goes on: data folder %s is free after %.0f s", what, root, waited)
        token = _HELD.set(_HELD.get() | {_key(lock_file)})
        try:
            yield True
        finally:
            _HELD.reset(token)


def holds(lock_file: Path) -> bool:
    """Whether this run holds the data folder lock `lock_file`."""
    key = _key(Path(lock_file))
    return key is not None and key in _HELD.get()
