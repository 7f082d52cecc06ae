"""One run at a time per data folder: the exclusive lock `data_dir/.lock`, and the flows that hold it.

A scheduled retrain and a manual one on the same data folder would otherwise arrange, extract
features and train into the same files at once. Every flow that writes the data folder
(`retrain`, and `prepare_data` / `train_model` when called alone) holds this lock for its
whole run, so a second run waits for the first and then finds its work done, instead of both
failing. While it waits it says, once a minute, which process it waits for.

The lock is a `flock` on `data_dir/.lock`: the kernel drops it the moment its holder dies,
however it dies, so a killed run never blocks the next one. It is re-entrant within one run
(`retrain` holds it and calls `prepare_data`, which takes it again): what a run holds is
kept in a context variable, which Prefect hands on to subflows and tasks. Holding it writes
nothing (the file is created once, then only locked), so a second run stays write-free.

Because every writer holds the lock, the holder knows that nothing else works in the folder:
leftovers such as hidden `.partial` training folders belong to dead runs and can be removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import inspect
import os
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tasks.common.errors import InputError
from tasks.common.files import is_unfinished_write
from tasks.common.logs import run_logger

WAIT_S = 24 * 3600.0
"""How long a run waits for another run of the same data folder before giving up."""

REPORT_EVERY_S = 60.0
"""How often a waiting run says again whom it waits for."""

_POLL_S = 0.2

_HELD: contextvars.ContextVar[frozenset[tuple[int, int]]] = contextvars.ContextVar("catsdogs_held_data_folders",
                                                                                     default=frozenset())

F = TypeVar("F", bound=Callable[..., Any])


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


@contextlib.contextmanager
def hold(root: Path, what: str, *, wait_s: float = WAIT_S, create: bool = True) -> Iterator[bool]:
    """Hold the data folder's lock for the block; wait (saying for whom) while another run holds it.

    Yields True when the lock is held (taken here or already held by this run), False when
    `create` is False and the folder does not exist (there is nothing to protect, and the
    caller's own checks will say so). Raises DataFolderBusy after `wait_s`.
    """
    from tasks.data.datafolder import DataFolder

    root = Path(root)
    if not root.is_dir():
        if not create:
            yield False
            return
        root.mkdir(parents=True, exist_ok=True)
    path = DataFolder(root).lock_file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # an existing file is opened as is, never touched
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _HELD.get():
            yield True  # this run holds it already (a subflow of the run that took it)
            return
        _acquire(fd, path, what, wait_s)
        token = _HELD.set(_HELD.get() | {key})
        try:
            yield True
        finally:
            _HELD.reset(token)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, what: str, wait_s: float) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    log = run_logger(__name__)
    started = time.monotonic()
    log.info("%s waits: data folder %s is in use by %s; it goes on when that run ends",
             what, path.parent, holder_text(path))
    reported = started
    while True:
        time.sleep(_POLL_S)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.info("%s goes on: data folder %s is free after %.0f s", what, path.parent, time.monotonic() - started)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now - started > wait_s:
            raise DataFolderBusy(f"Data folder {path.parent} has been in use by {holder_text(path)} for over "
                                 f"{wait_s:.0f} s; wait for that run to end, or stop it if it hangs.")
        if now - reported >= REPORT_EVERY_S:
            log.info("%s still waits for %s (data folder %s, %.0f s so far)", what, holder_text(path),
                     path.parent, now - started)
            reported = now


def holds_lock(root: Path) -> bool:
    """Whether this run holds the lock of the data folder `root`."""
    from tasks.data.datafolder import DataFolder

    try:
        st = DataFolder(Path(root)).lock_file.stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _HELD.get()


def _data_dir_argument(signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.arguments.get("data_dir") is not None:
        return bound.arguments["data_dir"]
    return getattr(bound.arguments.get("config"), "data_dir", None)


def holding_data_folder(what: str, *, create: bool = True) -> Callable[[F], F]:
    """Decorate a flow function so that its whole run holds its data folder's lock.

    The folder is the function's `data_dir` argument, or its `config.data_dir`. Put it under
    `@flow`, so the waiting happens inside the flow run and is logged there. The signature
    (and so Prefect's parameters) stays the function's own.
    """
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            data_dir = _data_dir_argument(signature, args, kwargs)
            if data_dir is None:
                return fn(*args, **kwargs)
            with hold(Path(data_dir).expanduser().absolute(), what, create=create):
                return fn(*args, **kwargs)

        # Prefect resolves string annotations (`from __future__ import annotations`) in the
        # wrapper's module, not the flow's: hand it the flow's resolved types instead.
        hints = typing.get_type_hints(fn)
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[param.replace(annotation=hints.get(name, param.annotation))
                        for name, param in signature.parameters.items()],
            return_annotation=hints.get("return", signature.return_annotation))
        return wrapper  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------- leftovers of dead runs

def remove_leftovers(root: Path) -> list[str]:
    """Remove what killed runs left half-written under `root` (only while holding its lock); their paths.

    Holding the lock proves that no other run writes here, so every hidden `.partial` training
    folder, temporary extraction folder or temporary file is a dead run's.
    """
    import shutil

    from tasks.data.datafolder import DataFolder

    root = Path(root)
    if not holds_lock(root):
        raise RuntimeError(f"remove_leftovers needs the lock of {root}; call it inside DataFolder.lock()")
    removed: list[str] = []
    for base, recursive in DataFolder(root).leftover_places():
        if not base.is_dir():
            continue
        for current, dirs, files in os.walk(base):
            for name in [d for d in dirs if is_unfinished_write(d)]:
                shutil.rmtree(Path(current) / name, ignore_errors=True)
                removed.append(str((Path(current) / name).relative_to(root)))
                dirs.remove(name)
            for name in files:
                if is_unfinished_write(name):
                    (Path(current) / name).unlink(missing_ok=True)
                    removed.append(str((Path(current) / name).relative_to(root)))
            if not recursive:
                break
    return sorted(removed)
