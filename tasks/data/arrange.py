"""Arrange: mirror the manifest into `arranged/<split>/<cats|dogs>/` and summarise the dataset.

Arranging is a mirror, not a copy job: `arrange_files` makes the folder match the manifest
exactly. Missing links are made (atomically), stale files are removed, and files that are
already right are not touched, so a second run writes nothing. Hard links cost no space and
keep the bytes identical to what was hashed; a copy is the fallback across filesystems.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from tasks.common.files import write_if_changed
from tasks.common.labels import CLASS_DIRS, CLASSES, SPLITS, UNLABELLED
from tasks.common.results import PreparePaths, PrepareSummary
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import read_manifest, write_manifest


# --------------------------------------------------------------------------- arrange_files


@dataclass
class ArrangeStats:
    """What `arrange_files` did: the second run on the same manifest must report only `unchanged`."""

    linked: int = 0
    copied: int = 0
    unchanged: int = 0
    removed: int = 0

    @property
    def written(self) -> int:
        return self.linked + self.copied + self.removed


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_stem(relative_path: str) -> str:
    """A file-name stem that is safe on every filesystem and never hidden."""
    stem = _UNSAFE.sub("_", Path(relative_path).stem).strip("._") or "image"
    return stem[:80]


def arranged_paths(frame: pd.DataFrame) -> pd.Series:
    """Target path of every row relative to data_dir ("" for rows that are not arranged).

    Labelled: `arranged/<split>/<cats|dogs>/<stem>_<sha256[:10]>.jpg`; the hash suffix keeps
    names unique when two folders hold different images with the same name.
    Unlabelled: `unlabelled/<stem>.jpg`, the original name, because Kaggle's submission ids are
    the file stems of `test1/`; the hash is appended only where two such names clash.
    """
    paths = pd.Series("", index=frame.index, dtype=object)
    ok = frame["status"] == "ok"
    labelled = ok & frame["split"].isin(SPLITS) & frame["label"].isin(CLASSES)
    pool = ok & (frame["split"] == UNLABELLED)
    stems = frame["relative_path"].map(_safe_stem)
    short = frame["sha256"].str[:10]
    paths[labelled] = (f"{DataFolder.ARRANGED}/" + frame.loc[labelled, "split"] + "/" + frame.loc[labelled, "label"].map(CLASS_DIRS)
                       + "/" + stems[labelled] + "_" + short[labelled] + ".jpg")
    paths[pool] = f"{DataFolder.UNLABELLED}/" + stems[pool] + ".jpg"
    clash = pool & paths.duplicated(keep=False)
    paths[clash] = f"{DataFolder.UNLABELLED}/" + stems[clash] + "_" + short[clash] + ".jpg"
    return paths.astype(str)


def _is_current(source: Path, target: Path) -> bool:
    """True when `target` already holds `source`'s bytes: the same inode, or an equal copy.

    Copies are made with `copy2`, which keeps the mtime, so size + mtime_ns identifies our own
    copy without reading it (the rsync rule).
    """
    try:
        target_stat = target.stat()
    except FileNotFoundError:
        return False
    source_stat = source.stat()
    if (target_stat.st_dev, target_stat.st_ino) == (source_stat.st_dev, source_stat.st_ino):
        return True
    return (target_stat.st_size, target_stat.st_mtime_ns) == (source_stat.st_size, source_stat.st_mtime_ns)


def _place(source: Path, target: Path) -> str:
    """Hard-link (or copy where linking is impossible) `source` to `target` atomically.

    The link is made under a temporary name in the target folder and moved over the target with
    `os.replace`, so a reader sees the old file or the new one, never a missing or partial one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(source, tmp)
            how = "linked"
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            shutil.copy2(source, tmp)
            how = "copied"
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return how


def _remove_stale(root: Path, wanted: set[Path], stats: ArrangeStats) -> None:
    """Delete files under `root` that the manifest no longer names (and leftover temp files)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_dir():
            if path != root and not any(path.iterdir()):
                path.rmdir()
        elif path not in wanted:
            path.unlink()
            stats.removed += 1


def link_arranged(manifest: pd.DataFrame, folder: DataFolder) -> tuple[pd.DataFrame, ArrangeStats]:
    """`arrange_files` with a count of what was done (the flow logs it; tests assert it)."""
    frame = manifest.copy()
    frame["arranged_path"] = arranged_paths(frame)
    todo = frame[frame["arranged_path"] != ""]
    stats = ArrangeStats()
    wanted: set[Path] = set()
    for arranged, converted, original in zip(todo["arranged_path"], todo["converted_path"], todo["source_path"]):
        # the bytes to arrange: the converted RGB JPEG where the manifest step made one
        source, target = Path(converted or original), folder.file(arranged)
        wanted.add(target)
        if _is_current(source, target):
            stats.unchanged += 1
        elif _place(source, target) == "linked":
            stats.linked += 1
        else:
            stats.copied += 1
    _remove_stale(folder.arranged, wanted, stats)
    _remove_stale(folder.unlabelled, wanted, stats)
    return frame, stats


def arrange_files(manifest: pd.DataFrame, folder: DataFolder) -> pd.DataFrame:
    """Mirror the kept rows into `data_dir/arranged/` (and `unlabelled/`); fill `arranged_path`.

    Hard links cost no space and keep the bytes identical to what was hashed; a copy is the
    fallback across filesystems. Files that are already right are not touched and files the
    manifest no longer names are removed, so the folder always equals the manifest.
    """
    return link_arranged(manifest, folder)[0]


# --------------------------------------------------------------------------- summary


def dataset_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over sorted "sha256,label,split" lines of the kept labelled images.

    It changes exactly when what a model would train or be tested on changes, so downstream
    steps (features, training, the retrain gate) can key on it.
    """
    kept = manifest[(manifest["status"] == "ok") & manifest["split"].isin(SPLITS)]
    lines = sorted(f"{sha},{label},{split}" for sha, label, split in zip(kept["sha256"], kept["label"], kept["split"]))
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def summarise(manifest: pd.DataFrame, folder: DataFolder, layout: str) -> PrepareSummary:
    """The flow's result: counts per split and class, quarantine reasons, fingerprint, paths.

    Only facts about the data, nothing about the run (no timings or work counters), so the
    same source gives the same summary and `prepare_summary.json` is not rewritten.
    """
    kept = manifest[manifest["status"] == "ok"]
    quarantined = manifest[manifest["status"] != "ok"]
    counts = {split: {label: int(((kept["split"] == split) & (kept["label"] == label)).sum()) for label in CLASSES}
              for split in SPLITS}
    return PrepareSummary(
        layout=layout, counts=counts, unlabelled=int((kept["split"] == UNLABELLED).sum()),
        quarantined=len(quarantined),
        quarantine_reasons={reason: int(n) for reason, n in sorted(quarantined["reason"].value_counts().items())},
        fingerprint=dataset_fingerprint(manifest),
        paths=PreparePaths(data_dir=str(folder.root), manifest=str(folder.manifest), arranged=str(folder.arranged),
                           validation_result=str(folder.validation_result), data_docs=str(folder.data_docs),
                           summary=str(folder.summary)))


class Arranged(BaseModel):
    """What `arrange_folder` did; a second run on the same manifest reports only `unchanged`."""

    linked: int
    copied: int
    unchanged: int
    removed: int
    manifest_written: bool
    manifest: str


def arrange_folder(folder: DataFolder) -> Arranged:
    """Mirror the kept images of `splits.parquet` into `arranged/` and write the final manifest."""
    frame, stats = link_arranged(read_manifest(folder.splits), folder)
    return Arranged(**asdict(stats), manifest_written=write_manifest(frame, folder.manifest),
                    manifest=str(folder.manifest))


def write_summary(folder: DataFolder, layout: str) -> PrepareSummary:
    """Summarise the final manifest and keep it as `prepare_summary.json` (rewritten only on change)."""
    summary = summarise(read_manifest(folder.manifest), folder, layout)
    payload = json.dumps(summary.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    write_if_changed(folder.summary, payload.encode("utf-8"))
    return summary
