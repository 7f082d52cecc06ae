"""The manifest: one row per candidate file, built in parallel and reused for unchanged files.

Inspecting an image means reading and fully decoding it, which dominates the cost of preparing
the data. So rows are keyed by (source path, size, mtime_ns), the rsync rule: a file whose
stat is unchanged is not opened again, and a second run costs a directory walk plus a parquet
read. Converted JPEGs are content-addressed (`converted/<source sha256>.jpg`), so they are
written once and shared by duplicates.

The manifest written here is the *inspected* manifest (`inspected.parquet`): `split` and
`arranged_path` are left "" for the arrange step, which writes the final `manifest.parquet`.
Keeping the two files apart means both stay unchanged on a second run, and the reuse cache is
never confused by the arrange step's `duplicate`/`label_conflict` verdicts.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel

from tasks.common.files import write_if_changed
from tasks.common.logs import run_logger
from tasks.common.progress import Progress
from tasks.common.labels import classes_of_files
from tasks.data.datafolder import DataFolder
from tasks.data.images import MAX_PIXELS, MAX_SIDE, OK, TOO_LARGE, TOO_SMALL, inspect_and_store, pixel_limit
from tasks.data.layout import Candidate, find_candidates

MANIFEST_COLUMNS: list[str] = [
    "source_path", "relative_path", "label", "source_split", "sha256", "bytes", "mtime_ns",
    "format", "mode", "width", "height", "converted_path", "status", "reason", "split",
    "arranged_path",
]
"""Manifest columns in contract order (a list, so `frame[MANIFEST_COLUMNS]` selects them)."""

INT_COLUMNS: frozenset[str] = frozenset({"bytes", "mtime_ns", "width", "height"})
"""Integer columns; every other column is a string that is never NaN ("" when empty)."""

Backend = Literal["thread", "process"]

_INSPECTION_FIELDS = ("sha256", "bytes", "format", "mode", "width", "height", "converted_path",
                      "status", "reason")


# --------------------------------------------------------------------------- schema


def normalise_manifest(frame: pd.DataFrame) -> pd.DataFrame:
    """Contract column order and types: int64 integers, strings with "" for missing, no attrs.

    Applied before every write and after every read, so equal content always serialises to
    equal bytes (that is what lets `write_manifest` skip unchanged manifests).
    """
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"Manifest lacks columns {missing}; expected {MANIFEST_COLUMNS}.")
    out = frame.loc[:, MANIFEST_COLUMNS].reset_index(drop=True)
    for column in MANIFEST_COLUMNS:
        if column in INT_COLUMNS:
            out[column] = out[column].fillna(0).astype("int64")
        else:
            out[column] = out[column].fillna("").astype(str)
    out.attrs = {}
    return out


def empty_manifest() -> pd.DataFrame:
    return normalise_manifest(pd.DataFrame({column: [] for column in MANIFEST_COLUMNS}))


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest parquet file in contract order and types."""
    return normalise_manifest(pd.read_parquet(path))


def manifest_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    normalise_manifest(frame).to_parquet(buffer, index=False, engine="pyarrow")
    return buffer.getvalue()


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike[str]) -> bool:
    """Atomically write the manifest as parquet unless the file already holds the same; True if written."""
    return write_if_changed(path, manifest_bytes(frame))


# --------------------------------------------------------------------------- reuse


def _stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns), or (-1, -1) for a file that vanished, so it is never reused."""
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _verdict_still_holds(row: dict[str, Any], min_side: int, limit: int, max_side: int) -> bool:
    """Whether a previous row's status would be the same under today's thresholds.

    Size verdicts depend on `min_side`/`max_pixels`/`max_side`; the others (empty, not an image,
    undecodable) depend only on the bytes, which are unchanged when the stat is.
    """
    width, height = row["width"], row["height"]
    large = width * height > limit or max(width, height) > max_side
    if row["reason"] == TOO_LARGE:
        # 0 x 0: Pillow's own bomb guard refused it from the header, and `pixel_limit` never exceeds that guard
        return large or width * height == 0
    if row["reason"] == TOO_SMALL:
        return not large and min(width, height) < min_side
    if row["status"] == OK:
        return not large and min(width, height) >= min_side
    return True


def _reusable_rows(previous: pd.DataFrame | None, folder: DataFolder, min_side: int,
                   limit: int, max_side: int) -> dict[str, dict[str, Any]]:
    """Previous inspection fields by source path, for rows that can still be trusted.

    A row whose converted JPEG has gone missing is not reusable: inspecting the file again
    recreates it. The converted path is recomputed under today's `data_dir`, so a moved data
    folder keeps its cache.
    """
    if previous is None or previous.empty:
        return {}
    frame = normalise_manifest(previous)
    columns = {column: frame[column].tolist() for column in ("source_path", "mtime_ns", *_INSPECTION_FIELDS)}
    reusable: dict[str, dict[str, Any]] = {}
    for values in zip(*columns.values(), strict=True):
        row = dict(zip(columns, values, strict=True))
        if row["converted_path"]:
            converted = folder.converted_file(row["sha256"])
            if not converted.is_file():
                continue
            row["converted_path"] = str(converted)
        if _verdict_still_holds(row, min_side, limit, max_side):
            reusable[row["source_path"]] = row
    return reusable


# --------------------------------------------------------------------------- build


def default_workers(backend: Backend = "thread") -> int:
    """Threads overlap file reads with decoding (Pillow and hashlib release the GIL); processes
    are bounded by the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(32, cores + 4) if backend == "thread" else cores


def _executor(backend: Backend, workers: int) -> Executor:
    if backend == "process":
        # forkserver, not fork: the caller may run inside Prefect's threads, and forking a
        # threaded process can deadlock its children. Unlike spawn, the caller's main module is
        # imported once (in the server), not once per worker. Python 3.14's default too.
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inspect")


def inspect_many(paths: Sequence[str], folder: DataFolder, *, min_side: int, max_pixels: int,
                 max_side: int = MAX_SIDE, workers: int | None = None,
                 backend: Backend = "thread") -> list[dict[str, Any]]:
    """Inspect files in parallel, results in input order; one worker or one file runs inline.

    Fully decoding 25,000 photos takes minutes on a small machine, so progress is reported.
    """
    jobs = [(path, str(folder.converted), min_side, max_pixels, max_side) for path in paths]
    workers = workers or default_workers(backend)
    progress = Progress("Inspecting images", len(jobs), "files", logger_name=__name__)
    results: list[dict[str, Any]] = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(inspect_and_store(job))
            progress.advance()
    else:
        chunksize = max(1, min(64, len(jobs) // (workers * 8)))  # few round trips, still balanced at the tail
        with _executor(backend, min(workers, len(jobs))) as pool:
            for result in pool.map(inspect_and_store, jobs, chunksize=chunksize):
                results.append(result)
                progress.advance()
    progress.finish()
    return results


def build_manifest(candidates: Iterable[Candidate], folder: DataFolder, *,
                   previous: pd.DataFrame | None = None, min_side: int = 32,
                   max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE, workers: int | None = None,
                   backend: Backend = "thread") -> pd.DataFrame:
    """One manifest row per candidate, sorted by relative path; split and arranged_path are "".

    Rows of `previous` are reused without opening the file when its source path, size and
    mtime_ns are unchanged and its verdict still holds under `min_side`/`max_pixels`/`max_side`; every
    other file is inspected (`workers` threads by default, or processes with
    backend="process"). Conversions land in `data_dir/converted/<sha256>.jpg`, written
    atomically and only when missing. `frame.attrs` holds {"inspected": n, "reused": n}.
    """
    reusable = _reusable_rows(previous, folder, min_side, pixel_limit(max_pixels), max_side)
    rows: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for candidate in sorted(candidates, key=lambda c: c.relative_path):
        size, mtime_ns = _stat(candidate.path)
        row = {
            "source_path": str(candidate.path), "relative_path": candidate.relative_path,
            "label": candidate.label, "source_split": candidate.source_split,
            "mtime_ns": mtime_ns, "split": "", "arranged_path": "",
        }
        old = reusable.get(row["source_path"])
        if old is not None and (old["bytes"], old["mtime_ns"]) == (size, mtime_ns):
            row.update({field: old[field] for field in _INSPECTION_FIELDS})
        else:
            todo.append(row)
        rows.append(row)
    results = inspect_many([row["source_path"] for row in todo], folder, min_side=min_side,
                           max_pixels=max_pixels, max_side=max_side, workers=workers, backend=backend)
    for row, result in zip(todo, results, strict=True):
        row.update(result)
    frame = normalise_manifest(pd.DataFrame(rows, columns=MANIFEST_COLUMNS)) if rows else empty_manifest()
    frame.attrs = {"inspected": len(todo), "reused": len(rows) - len(todo)}
    return frame


# --------------------------------------------------------------------------- the step


class ManifestBuilt(BaseModel):
    """What `build_inspected` did: rows, how many were inspected or reused, and the file."""

    layout: str
    path: str
    rows: int
    inspected: int
    reused: int
    quarantined: int
    written: bool


def _read_previous(path: Path) -> pd.DataFrame | None:
    """The last inspected manifest, or None when absent or unreadable (then everything is inspected)."""
    if not path.is_file():
        return None
    try:
        return read_manifest(path)
    except Exception:  # noqa: BLE001 - a damaged cache only costs time, never correctness
        return None


def build_inspected(root: str | os.PathLike[str], folder: DataFolder, *, min_side: int = 32,
                    max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE, workers: int | None = None,
                    replace_classes: bool = False) -> ManifestBuilt:
    """Inspect every candidate under `root` into `inspected.parquet`, reusing the last one's rows.

    The source's class map is recorded here too (`classes.json`), from the labels its layout gave,
    before any image is inspected: a folder holding other classes refuses them unless `replace_classes`.
    """
    layout, candidates = find_candidates(root)
    folder.record_classes(classes_of_files((c.label, c.relative_path) for c in candidates), replace=replace_classes)
    frame = build_manifest(candidates, folder, previous=_read_previous(folder.inspected), min_side=min_side,
                           max_pixels=max_pixels, max_side=max_side, workers=workers)
    built = ManifestBuilt(layout=layout, path=str(folder.inspected), rows=len(frame),
                          inspected=frame.attrs["inspected"], reused=frame.attrs["reused"],
                          quarantined=int((frame["status"] != OK).sum()),
                          written=write_manifest(frame, folder.inspected))
    run_logger(__name__).debug("Manifest %s: %s", folder.inspected, built)
    return built
