"""Room on disk: which folder's disk is full, and how much a step needs, said before it half-writes.

A full disk surfaces as `OSError: [Errno 28]` from whichever write met it, naming no folder, and
only after Prefect's retries, which cannot free anything. A step that knows what it will write
(a download's Content-Length, an archive's declared member sizes) checks the room first and
refuses in one sentence; any other write that meets a full disk becomes one sentence naming the
folder and what is free there (tasks that catch it, or the command line: flows/cli.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.common.errors import DiskFullError

FIX = "free space there or pass --data-dir a folder on a larger disk"


def existing_folder(path: str | os.PathLike[str]) -> Path:
    """`path`, or its nearest ancestor that exists (the folder a missing path would be created in)."""
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a non-root writer may still use on the disk holding `path`."""
    return shutil.disk_usage(existing_folder(path)).free


def size_text(n: int) -> str:
    """1.5 GiB, 30 MiB, 12 KiB, 512 bytes: what `df -h` people read."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def ensure_room(folder: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse before writing when the disk holding `folder` has less than `needed` bytes free."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(f"{what} needs {size_text(needed)} in {folder}, but its disk has {size_text(free)} free; "
                            f"{FIX}.")


def disk_full(error: BaseException, folder: str | os.PathLike[str]) -> DiskFullError:
    """The one sentence for a write that met a full disk: the file's folder when the error names a file, else `folder`."""
    if isinstance(error, DiskFullError):
        return error
    named = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and named is None:
        named = getattr(current, "filename", None) if isinstance(current, OSError) else None
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return no_room(Path(os.fsdecode(named)).parent if named else folder)


def no_room(folder: str | os.PathLike[str]) -> DiskFullError:
    """The one sentence for a full disk under `folder`: which folder, what is free there, what to do."""
    where = existing_folder(folder)
    return DiskFullError(f"The disk holding {where} is full ({size_text(free_bytes(where))} free); {FIX}.")


STARTUP_ROOM = 1 << 20
"""What a command needs free before it starts: its log, and the banner of its Prefect server, written there."""


def check_not_full(folder: str | os.PathLike[str], minimum: int = STARTUP_ROOM) -> None:
    """Refuse at once when the disk holding `folder` is (all but) full, before anything is written there."""
    if free_bytes(folder) < minimum:
        raise no_room(folder)
