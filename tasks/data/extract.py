"""Safe archive extraction: nothing escapes the extraction folder, nothing half-built is ever visible.

Archives come from the internet. A hostile or broken one is refused with one sentence naming the
archive and the member before it can write outside the extraction folder, plant a link, overwrite
a file through a case- or Unicode-equivalent name, or fill the disk. Every member is checked from
the headers first (clear errors before any write), then bytes are counted again while streaming,
because headers can lie.

The result is content-addressed, `extracted_root/<archive sha256[:16]>`, built in a temporary
folder and renamed into place only when complete: an existing folder is always a complete one,
so a second run reuses it and writes nothing. The folder records the sha256 and stat key of
every member (`.catsdogs-members.json`); arranged images are hard links to these files, so a
write through an arranged file changes the extracted copy too. A reuse therefore checks every
member's stat (and hashes only the changed ones); a member that no longer holds the archive's
bytes is repaired by extracting the archive again, swapped in whole, with a warning naming it.

Nested archives are unpacked one level deep, in place of themselves: Kaggle's competition zip
holds `train.zip` and `test1.zip`, which become the folders `train/` and `test1/`.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import tarfile
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tasks.common.diskspace import ensure_room, no_room
from tasks.common.errors import AcquireError, UnsafeArchiveError, is_disk_full
from tasks.common.files import atomic_directory, atomic_write_text, link_stat_key, sha256_file, sha256_file_cached
from tasks.common.logs import run_logger

NESTED_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar", ".zip")
"""Member names unpacked in place of themselves (one level deep by default)."""

NAME_MAX = 255
"""Longest name, in bytes, of one file or folder on the common filesystems (ext4, XFS, Btrfs, APFS, tmpfs)."""

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_FIX = "rebuild the archive without it, or unpack it yourself after checking it and pass the folder with --source"
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            gzip.BadGzipFile, lzma.LZMAError, NotImplementedError)


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds that stop decompression bombs and runaway archives.

    The defaults pass the real archives (about 0.8 GB, 25 000 JPEGs, ratio close to 1) with a
    wide margin and stop classic bombs (ratios of 1000 and more) long before the disk fills.
    Members smaller than `ratio_floor_bytes` are not ratio-checked: a tiny text file may well
    compress 300:1 and cannot hurt.
    """

    max_total_bytes: int = 32 * 2**30
    max_ratio: float = 200.0
    max_members: int = 500_000
    max_nesting: int = 1
    ratio_floor_bytes: int = 1 << 20


@dataclass(frozen=True)
class _Entry:
    """One archive member whose name and type passed the checks."""

    name: str                # as stored in the archive, for messages
    parts: tuple[str, ...]   # output path components, relative to the extraction folder
    is_dir: bool
    size: int                # declared uncompressed size (0 for folders)
    mtime: float | None
    ref: Any                 # ZipInfo for zips, member index for tars
    nested: bool = False     # an archive to unpack in place of itself


def _refuse(label: str, name: str, problem: str, fix: str = _FIX) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"Refusing to extract {label}: member {name!r} {problem}; {fix}.")


def _fold(part: str) -> str:
    """The comparison key of a name: the same file on a case-insensitive or normalising filesystem."""
    return unicodedata.normalize("NFC", part).casefold()


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar' (any compression tarfile reads) or None, decided by content, not by name."""
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    return None


def nested_stem(name: str) -> str | None:
    """Folder name for a nested archive member (`train.zip` -> `train`), or None if it is not one."""
    lowered = name.lower()
    for suffix in NESTED_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def safe_parts(label: str, name: str) -> tuple[str, ...]:
    """Path components of a member name, refusing anything that could leave the extraction folder.

    Backslashes and drive letters are refused rather than translated: on Windows they are path
    separators, so the same archive would unpack differently there. Empty and '.' components are
    dropped (`./train/x.jpg` is common in tars); an empty result is the archive's own root entry.
    """
    if "\x00" in name:
        raise _refuse(label, name, "contains a NUL character")
    if "\\" in name:
        raise _refuse(label, name, "contains a backslash, a path separator on Windows")
    if name.startswith("/"):
        raise _refuse(label, name, "is an absolute path")
    if _DRIVE.match(name):
        raise _refuse(label, name, "starts with a drive letter")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _refuse(label, name, "contains '..' and would escape the extraction folder")
    longest = max((len(os.fsencode(part)) for part in parts), default=0)
    if longest > NAME_MAX:
        raise _refuse(label, name, f"has a name of {longest} bytes, longer than the {NAME_MAX} a file or folder "
                                   "name may have", "rename it in the archive, or unpack it yourself and pass the "
                                                    "folder with --source")
    return parts


class _Run:
    """What an archive and its nested archives share: the byte and member budget, and claimed names."""

    def __init__(self, limits: ExtractLimits) -> None:
        self.limits = limits
        self.written = 0
        self.members = 0
        self.digests: dict[str, str] = {}  # relative path -> sha256 of every file written
        self._claims: dict[tuple[str, ...], tuple[bool, str]] = {}

    def count_member(self, label: str, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _refuse(label, name, f"passes the limit of {self.limits.max_members} members",
                          "raise ExtractLimits.max_members if the archive is trusted")

    def check_declared(self, label: str, name: str, declared: int, archive_size: int) -> None:
        """Refuse from headers alone when the archive announces more than the limits allow."""
        limits = self.limits
        if self.written + declared > limits.max_total_bytes:
            raise _refuse(label, name, f"brings the uncompressed total past {limits.max_total_bytes} bytes",
                          "raise ExtractLimits.max_total_bytes if the archive is trusted")
        if declared > limits.ratio_floor_bytes and declared > limits.max_ratio * max(archive_size, 1):
            raise _refuse(label, name, f"brings the compression ratio past {limits.max_ratio:g} (a decompression bomb)",
                          "raise ExtractLimits.max_ratio if the archive is trusted")

    def count_bytes(self, label: str, name: str, n: int, archive_written: int, archive_size: int) -> None:
        """Count bytes actually written; headers can lie, the stream cannot."""
        self.written += n
        if self.written > self.limits.max_total_bytes:
            raise _refuse(label, name, f"brings the uncompressed total past {self.limits.max_total_bytes} bytes",
                          "raise ExtractLimits.max_total_bytes if the archive is trusted")
        if archive_written > self.limits.ratio_floor_bytes and archive_written > self.limits.max_ratio * max(archive_size, 1):
            raise _refuse(label, name, f"decompresses past a ratio of {self.limits.max_ratio:g} (a decompression bomb)",
                          "raise ExtractLimits.max_ratio if the archive is trusted")

    def claim(self, label: str, name: str, parts: tuple[str, ...], is_dir: bool) -> None:
        """Refuse a name that is already taken once case and Unicode normalisation are ignored.

        On macOS and Windows `Cat.jpg` and `cat.jpg` (or NFC and NFD spellings of `café`) are the
        same file, so one member would silently overwrite the other; a file and a folder of the
        same name cannot both exist anywhere.
        """
        key = tuple(_fold(part) for part in parts)
        for i in range(1, len(key)):
            taken = self._claims.setdefault(key[:i], (True, "/".join(parts[:i])))
            if not taken[0]:
                raise _refuse(label, name, f"needs a folder where the file {taken[1]!r} is")
        taken = self._claims.get(key)
        if taken is not None and not (is_dir and taken[0]):
            raise _refuse(label, name, f"collides with {taken[1]!r} once names are compared "
                                       "case-insensitively and Unicode-normalised")
        self._claims[key] = (is_dir, "/".join(parts))


# ---------------------------------------------------------------- listing members (headers only)

def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    try:
        return time.mktime(info.date_time + (0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _zip_entries(zf: zipfile.ZipFile, label: str, archive_size: int, run: _Run) -> list[_Entry]:
    """Check every zip member from the central directory; links and devices are read from the Unix mode bits."""
    entries: list[_Entry] = []
    declared = 0
    for info in zf.infolist():
        name = info.filename
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise _refuse(label, name, "is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(label, name, "is a device, fifo or socket, not a regular file")
        if info.flag_bits & 0x1:
            raise _refuse(label, name, "is encrypted", "re-create the archive without a password")
        parts = safe_parts(label, name)
        run.count_member(label, name)
        if not parts:
            continue
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        size = 0 if is_dir else info.file_size
        if size > run.limits.ratio_floor_bytes and size > run.limits.max_ratio * max(info.compress_size, 1):
            raise _refuse(label, name, f"has a compression ratio above {run.limits.max_ratio:g} (a decompression bomb)",
                          "raise ExtractLimits.max_ratio if the archive is trusted")
        declared += size
        run.check_declared(label, name, declared, archive_size)
        entries.append(_Entry(name, parts, is_dir, size, _zip_mtime(info), info))
    return entries


def _tar_entries(tf: tarfile.TarFile, label: str, archive_size: int, dest: Path, run: _Run) -> list[_Entry]:
    """Check tar headers one by one, so a bomb is refused at its header before its data is inflated.

    Python's own `data` extraction filter runs as a second opinion on every member.
    """
    entries: list[_Entry] = []
    declared = 0
    for index, member in enumerate(tf):
        name = member.name
        if member.issym() or member.islnk():
            raise _refuse(label, name, f"is a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}")
        if member.ischr() or member.isblk() or member.isfifo():
            raise _refuse(label, name, "is a device or fifo, not a regular file")
        if not (member.isreg() or member.isdir()):
            raise _refuse(label, name, "is neither a regular file nor a folder")
        parts = safe_parts(label, name)
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as err:
            raise _refuse(label, name, f"is refused by Python's tar data filter ({err})") from err
        run.count_member(label, name)
        if not parts:
            continue
        size = member.size if member.isreg() else 0
        declared += size
        run.check_declared(label, name, declared, archive_size)
        entries.append(_Entry(name, parts, member.isdir(), size, float(member.mtime), index))
    return entries


def _place(entries: list[_Entry], label: str, prefix: tuple[str, ...], depth: int, run: _Run) -> list[_Entry]:
    """Map members to output paths under `prefix`, mark nested archives and claim every name.

    A nested archive whose members all sit in a folder named like the archive itself (Kaggle's
    `train.zip` holds `train/cat.0.jpg`) is unwrapped, so the result is `train/cat.0.jpg`,
    not `train/train/cat.0.jpg`.
    """
    if prefix and entries and all(_fold(e.parts[0]) == _fold(prefix[-1]) and (len(e.parts) > 1 or e.is_dir)
                                  for e in entries):
        entries = [_Entry(e.name, e.parts[1:], e.is_dir, e.size, e.mtime, e.ref) for e in entries if len(e.parts) > 1]
    placed: list[_Entry] = []
    for entry in entries:
        parts = prefix + entry.parts
        stem = None if entry.is_dir else nested_stem(entry.parts[-1])
        if stem is not None and depth + 1 > run.limits.max_nesting:
            raise _refuse(label, entry.name, f"is an archive nested more than {run.limits.max_nesting} level(s) deep",
                          "unpack the inner archive yourself and pass the folder")
        run.claim(label, entry.name, parts, entry.is_dir)
        if stem is not None:
            run.claim(label, entry.name, parts[:-1] + (stem,), True)
        placed.append(_Entry(entry.name, parts, entry.is_dir, entry.size, entry.mtime, entry.ref, stem is not None))
    return placed


# ---------------------------------------------------------------- writing members

class _Writer:
    """Writes checked members under one root, counting bytes and never following or replacing anything."""

    def __init__(self, root: Path, label: str, archive_size: int, run: _Run) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.label = label
        self.archive_size = archive_size
        self.run = run
        self.archive_written = 0
        self._made: set[Path] = set()

    def _folder(self, folder: Path) -> None:
        if folder in self._made:
            return
        folder.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(folder)
        if real != self.real_root and not real.startswith(self.real_root + os.sep):
            raise _refuse(self.label, str(folder), "resolves outside the extraction folder")
        self._made.add(folder)

    def write(self, entry: _Entry, source: IO[bytes] | None) -> None:
        """Write one member; a path longer than the filesystem allows (names of 255 bytes, nested deep) is refused."""
        try:
            self._write(entry, source)
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:
                raise
            raise _refuse(self.label, entry.name, "makes a path longer than this filesystem allows") from None

    def _write(self, entry: _Entry, source: IO[bytes] | None) -> None:
        target = self.root.joinpath(*entry.parts)
        if entry.is_dir or source is None:
            self._folder(target)
            return
        self._folder(target.parent)
        copied = 0
        digest = hashlib.sha256()
        with open(target, "xb") as out:  # "x": never replace or follow anything already there
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                copied += len(chunk)
                if copied > entry.size:
                    raise _refuse(self.label, entry.name, "holds more bytes than its header declares")
                self.archive_written += len(chunk)
                self.run.count_bytes(self.label, entry.name, len(chunk), self.archive_written, self.archive_size)
                out.write(chunk)
        if copied != entry.size:
            raise _refuse(self.label, entry.name, "holds fewer bytes than its header declares (truncated)",
                          "download the archive again")
        if entry.mtime is not None:
            os.utime(target, (entry.mtime, entry.mtime))  # deterministic mtimes keep manifest reuse working
        self.run.digests["/".join(entry.parts)] = digest.hexdigest()


def _unpack_zip(archive: Path, label: str, root: Path, prefix: tuple[str, ...], depth: int, run: _Run) -> list[_Entry]:
    size = archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        entries = _place(_zip_entries(zf, label, size, run), label, prefix, depth, run)
        _ensure_room(root, entries, label)
        writer = _Writer(root, label, size, run)
        for entry in entries:
            if entry.is_dir:
                writer.write(entry, None)
                continue
            with zf.open(entry.ref) as source:
                writer.write(entry, source)
    return [entry for entry in entries if entry.nested]


def _unpack_tar(archive: Path, label: str, root: Path, prefix: tuple[str, ...], depth: int, run: _Run) -> list[_Entry]:
    """Two sequential passes (headers, then data) so compressed tars are never seeked backwards."""
    size = archive.stat().st_size
    with tarfile.open(archive, "r:*") as tf:
        entries = _place(_tar_entries(tf, label, size, root, run), label, prefix, depth, run)
    _ensure_room(root, entries, label)
    by_index = {entry.ref: entry for entry in entries}
    writer = _Writer(root, label, size, run)
    with tarfile.open(archive, "r:*") as tf:
        for index, member in enumerate(tf):
            entry = by_index.get(index)
            if entry is None:
                continue
            if member.name != entry.name:
                raise _refuse(label, member.name, "changed between two reads of the archive", "download it again")
            if entry.is_dir:
                writer.write(entry, None)
                continue
            source = tf.extractfile(member)
            if source is None:
                raise _refuse(label, member.name, "has no readable data")
            with source:
                writer.write(entry, source)
    return [entry for entry in entries if entry.nested]


def _ensure_room(root: Path, entries: list[_Entry], label: str) -> None:
    """Refuse before the first write when the members, as their headers declare them, cannot fit."""
    ensure_room(root.parent, sum(entry.size for entry in entries), f"Extracting {label}")


def _unpack(archive: Path, label: str, root: Path, prefix: tuple[str, ...], depth: int, run: _Run) -> None:
    """Unpack one archive under root/prefix, then its nested archives in place of themselves."""
    kind = archive_kind(archive)
    if kind is None:
        raise UnsafeArchiveError(f"Refusing to extract {label}: it is neither a zip nor a tar archive; "
                                 "pass a .zip, .tar, .tar.gz or .tgz archive or a folder with --source.")
    unpack = _unpack_zip if kind == "zip" else _unpack_tar
    try:
        nested = unpack(archive, label, root, prefix, depth, run)
    except _CORRUPT as err:
        raise UnsafeArchiveError(f"Refusing to extract {label}: it is corrupt or truncated ({err}); "
                                 "download or rebuild it.") from err
    for entry in nested:
        inner = root.joinpath(*entry.parts)
        stem = nested_stem(entry.parts[-1])
        assert stem is not None
        _unpack(inner, f"{label} > {entry.name}", root, entry.parts[:-1] + (stem,), depth + 1, run)
        inner.unlink()
        run.digests.pop("/".join(entry.parts), None)


def extract_archive(source_path: Path, extracted_root: Path, *, limits: ExtractLimits | None = None) -> Path:
    """Unpack an archive safely into `extracted_root/<sha256[:16]>` and return that folder.

    A folder is returned as is (resolved): it is already extracted. An archive is unpacked
    once; later calls find the complete folder and write nothing (the archive's digest comes
    from a stat-keyed cache, so an unchanged 800 MB archive is not re-hashed either).
    Raises UnsafeArchiveError for hostile, corrupt or unknown archives, leaving nothing behind.
    """
    source_path = Path(source_path).expanduser()
    if source_path.is_dir():
        return source_path.resolve()
    if not source_path.is_file():
        raise AcquireError(f"Cannot extract {source_path}: it does not exist; pass an existing archive or folder with --source.")
    source_path = source_path.resolve()
    label = str(source_path)
    if archive_kind(source_path) is None:
        raise UnsafeArchiveError(f"Refusing to extract {label}: it is neither a zip nor a tar archive; "
                                 "pass a .zip, .tar, .tar.gz or .tgz archive or a folder with --source.")
    extracted_root = Path(extracted_root).resolve()  # callers record absolute source paths
    digest = sha256_file_cached(source_path, extracted_root)
    target = extracted_root / digest[:16]
    log = run_logger(__name__)
    if target.is_dir():
        damaged = damaged_members(target)
        if not damaged:
            log.info("Reusing %s, already extracted from %s", target, source_path.name)
            return target
        if damaged == [INDEX_NAME]:
            log.info("Extracting %s again into %s: the folder has no member index yet, so its files "
                     "cannot be checked against the archive", source_path.name, target)
        else:
            shown = ", ".join(str(target / name) for name in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
            log.warning("%d extracted file(s) no longer hold what %s holds (%s), changed in place (an arranged "
                        "hard link written to?) or lost; extracting the archive again", len(damaged),
                        source_path.name, shown)
    log.info("Extracting %s into %s", source_path, target)
    run = _Run(limits or ExtractLimits())
    try:
        with atomic_directory(target) as tmp:  # a full disk mid-way leaves nothing half-extracted
            _unpack(source_path, label, tmp, (), 0, run)
            write_index(tmp, run.digests)
    except OSError as error:
        if is_disk_full(error):
            raise no_room(extracted_root) from error
        raise
    log.info("Extracted %d members (%d bytes) from %s", run.members, run.written, source_path.name)
    return target


# ---------------------------------------------------------------- the member index: what the archive holds

INDEX_NAME = ".catsdogs-members.json"
"""Hidden file in each extracted folder: sha256 and stat key of every member (layouts skip hidden files)."""


def write_index(folder: Path, digests: dict[str, str]) -> None:
    """Record every member's sha256 and stat key, in the folder itself (it is built and renamed whole)."""
    members = {name: {"sha256": sha, "stat": link_stat_key((folder / name).stat())} for name, sha in sorted(digests.items())}
    atomic_write_text(folder / INDEX_NAME, json.dumps({"version": 1, "members": members}, sort_keys=True) + "\n")


def damaged_members(folder: Path) -> list[str]:
    """Members of an extracted folder whose bytes are no longer the archive's; [INDEX_NAME] if unknown.

    A member whose stat key is unchanged is trusted without reading it (a second run stays a
    walk of stats); one whose key changed is hashed again, and counts as damaged only when its
    bytes differ (a touched but intact file gets its new key recorded). Missing members are damaged.
    """
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        members = index["members"]
    except (OSError, ValueError, KeyError, TypeError):
        return [INDEX_NAME]
    damaged: list[str] = []
    touched = False
    for name, entry in members.items():
        path = folder / name
        try:
            key = link_stat_key(path.stat())
        except OSError:
            damaged.append(name)
            continue
        if key == entry.get("stat"):
            continue
        if sha256_file(path) == entry.get("sha256"):
            entry["stat"] = link_stat_key(path.stat())
            touched = True
        else:
            damaged.append(name)
    if touched and not damaged:
        atomic_write_text(folder / INDEX_NAME, json.dumps(index, sort_keys=True) + "\n")
    return sorted(damaged)
