"""A small real disk for tests: a tmpfs of a few MiB, mounted where a test asks for it; and a read-only view.

A full disk cannot be faked convincingly (every writer meets ENOSPC in its own way: Python's
buffered files, sqlite, a child process's banner), so the tests make a real one. A read-only
disk neither (root may write through any permission bits): a read-only bind mount is one.
Mounting needs root in a sandbox that allows it; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` (created) for the block; skip the test where mounting is not allowed."""
    if shutil.which("mount") is None:
        pytest.skip("a small real disk needs the mount command")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a {size} tmpfs is not permitted here ({done.stderr.strip()}); "
                    "the full-disk tests need root in a sandbox that allows mounts")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_view(folder: Path, at: Path) -> Iterator[Path]:
    """`folder` bind-mounted read-only at `at` (created) for the block: writes there fail with EROFS, as on a read-only disk."""
    if shutil.which("mount") is None:
        pytest.skip("a read-only view needs the mount command")
    at.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(folder), str(at)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"bind mounts are not permitted here ({done.stderr.strip()}); the read-only store tests need root "
                    "in a sandbox that allows mounts")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(at)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"a read-only remount is not permitted here ({remount.stderr.strip()})")
        yield at
    finally:
        subprocess.run(["umount", "--lazy", str(at)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk with one file until `leave` bytes (rounded to pages) remain free; returns the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with contextlib.suppress(OSError):
            while (room := shutil.disk_usage(disk).free - leave) > 0:
                os.write(fd, b"\0" * min(room, 1 << 20))
    finally:
        os.close(fd)
    return filler
