"""Content hashing and atomic writes: the two file primitives every step relies on.

A killed run must leave either the old file or the new one, never half of one, so every
write goes to a temporary name in the same folder and is moved into place with `os.replace`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()

_CHUNK = 1 << 20

DIGEST_CACHE_NAME = ".sha256-cache.json"
"""File, in the folder it speaks for, caching archive digests by stat key (`sha256_file_cached`)."""


def current_umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc/self/status).

    `os.umask` can only be read by setting it, which would briefly change it for every thread.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _ordinary_mode(path: Path, *, directory: bool = False) -> None:
    """Give a temporary file or folder the mode an ordinary `open`/`mkdir` would have had.

    `mkstemp`/`mkdtemp` create private (0600/0700) entries; renamed into place they would make
    a shared data folder or MLflow store unreadable for the rest of the team.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large archives never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory: the content address of an image."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it over `target` only if the block succeeds.

    The suffix lets libraries that infer a format from the file name (parquet, npz, keras)
    write to the temporary path unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _ordinary_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` so that readers see the old file or the whole new one."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], payload: Any) -> Path:
    return atomic_write_text(target, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_if_changed(target: str | os.PathLike[str], data: bytes) -> bool:
    """Atomically write `data` unless the file already holds exactly it; True when written.

    Keeps second runs free of writes, so mtimes, caches and `make`-style checks stay quiet.
    """
    target = Path(target)
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return False
    atomic_write_bytes(target, data)
    return True


def partial_path(target: str | os.PathLike[str]) -> Path:
    """The hidden sibling a folder is built in before `commit_directory` gives it its name."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def commit_directory(built: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Give the finished folder `built` the name `target`, replacing an old `target` whole.

    Two renames instead of delete-then-rename: the old folder stays whole until the new one
    has its name, so at every instant one complete version exists on disk.
    """
    built, target = Path(built), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `target` and rename it to `target` only on success.

    A failed block removes the temporary folder, so nothing half-built is ever visible
    under the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _ordinary_mode(tmp, directory=True)
    try:
        yield tmp
        commit_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_stat_key(path: str | os.PathLike[str]) -> list[int]:
    """Size, mtime, ctime and inode of a file: rewriting, replacing or touching it changes one of them.

    ctime cannot be set by user calls (`os.utime` only sets atime/mtime), so a file rewritten
    in place with its old mtime restored still gets a new key.
    """
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object (a cache or an index:
    losing one only costs work done again)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def link_stat_key(st: os.stat_result) -> list[int]:
    """Size, mtime and inode from a stat: rewriting or replacing a file changes it, linking it does not.

    Unlike `file_stat_key` it leaves ctime out on purpose: arranging hard-links every
    extracted file, which changes its ctime but not its bytes, and a second run must not
    re-hash 25,000 files for that.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def is_unfinished_write(name: str) -> bool:
    """Whether `name` is one the writers here give unfinished work: `.x.partial`, `.x.<rand>.tmp[.ext]`,
    `.x.<rand>.old` (and arrange's `.x.<hex>.tmp`); what a killed run leaves of them is garbage."""
    if not name.startswith(".") or name in (".", ".."):
        return False
    if name.endswith(".partial") or name.endswith(".old"):
        return True
    stem = name.rsplit(".", 1)[0] if not name.endswith(".tmp") else name
    return stem.endswith(".tmp")


def sha256_file_cached(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
                      known: str | None = None) -> str:
    """sha256 of a file, reused from `cache_dir/DIGEST_CACHE_NAME` while the file's stat key is unchanged.

    Re-hashing an 800 MB archive on every run would dominate an otherwise no-op second run.
    The cache is only a speed-up: a missing or corrupt cache file just means hashing again,
    and the cache is rewritten only when an entry changes, so repeat runs write nothing.
    `known` is a digest the caller computed from these exact bytes (say, while downloading
    them): it is recorded without reading the file again.
    """
    path = Path(path).resolve()
    cache_file = Path(cache_dir) / DIGEST_CACHE_NAME
    cache = read_json_object(cache_file)
    key = file_stat_key(path)
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = known or sha256_file(path)
    if file_stat_key(path) != key:
        return digest  # the file changed while being hashed: never cache a digest of unknown bytes
    cache[str(path)] = {"stat": key, "sha256": digest}
    text = json.dumps(cache, indent=2, sort_keys=True) + "\n"
    write_if_changed(cache_file, text.encode("utf-8"))
    return digest
