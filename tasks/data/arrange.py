"""Arrange: mirror the manifest into `arranged/<split>/<cats|dogs>/` and summarise the dataset.

Arranging is a mirror, not a copy job: `arrange_files` makes the folder match the manifest
exactly. Missing links are made (atomically), stale files are removed, and files that are
already right are not touched, so a second run writes nothing. Hard links cost no space and
keep the bytes identical to what was hashed; a copy is the fallback across filesystems.

A hard link shares its bytes with its source, so writing an arranged file in place writes
the extracted (or converted) copy too. `arranged.index.json` records, per arranged file, the
stat keys of the file and its source and the sha256 of the bytes placed: an unchanged key is
trusted, a changed one is looked at, and a damaged source is repaired (extraction repairs
archive members before this step; a damaged conversion is converted again here) before the
file is linked again.
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

from tasks.common.files import link_stat_key, read_json_object, sha256_file, write_if_changed
from tasks.common.labels import CATS_DOGS, SPLITS, UNLABELLED, ClassMap
from tasks.common.logs import run_logger
from tasks.common.results import LabelOverrides, PreparePaths, PrepareSummary
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


def arranged_paths(frame: pd.DataFrame, classes: ClassMap = CATS_DOGS) -> pd.Series:
    """Target path of every row relative to data_dir ("" for rows that are not arranged).

    Labelled: `arranged/<split>/<class folder>/<stem>_<sha256[:10]>.jpg` (`cats`/`dogs` by default); the hash suffix keeps
    names unique when two folders hold different images with the same name.
    Unlabelled: `unlabelled/<stem>.jpg`, the original name, because Kaggle's submission ids are
    the file stems of `test1/`; the hash is appended only where two such names clash.
    """
    paths = pd.Series("", index=frame.index, dtype=object)
    ok = frame["status"] == "ok"
    labelled = ok & frame["split"].isin(SPLITS) & frame["label"].isin(classes.names)
    pool = ok & (frame["split"] == UNLABELLED)
    stems = frame["relative_path"].map(_safe_stem)
    short = frame["sha256"].str[:10]
    paths[labelled] = (f"{DataFolder.ARRANGED}/" + frame.loc[labelled, "split"] + "/" + frame.loc[labelled, "label"].map(classes.folder_of)
                       + "/" + stems[labelled] + "_" + short[labelled] + ".jpg")
    paths[pool] = f"{DataFolder.UNLABELLED}/" + stems[pool] + ".jpg"
    clash = pool & paths.duplicated(keep=False)
    paths[clash] = f"{DataFolder.UNLABELLED}/" + stems[clash] + "_" + short[clash] + ".jpg"
    return paths.astype(str)


CURRENT, PLACE, REPAIR = "current", "place", "repair"


def _state(source: Path, target: Path, entry: dict | None) -> str:
    """Whether `target` still holds what was arranged from `source`: CURRENT, PLACE (again) or REPAIR.

    `entry` is what the last arrange recorded for this target (stat keys of target and source,
    sha256 of the bytes placed). Unchanged keys mean unchanged bytes, without reading a byte.
    A changed key on a target that shares the source's inode (a hard link) means the bytes
    were touched or rewritten in place: they are hashed, and REPAIR means they were rewritten,
    so the source itself is damaged. A target that no longer shares the source's inode (the
    source was repaired, or replaced) is placed again. Without an entry (a folder arranged
    before entries were kept) the old rule decides: the same inode, or an equal-looking copy
    (copies keep the mtime: the rsync rule).
    """
    try:
        target_stat = target.stat()
    except FileNotFoundError:
        return PLACE
    source_stat = source.stat()
    same = (target_stat.st_dev, target_stat.st_ino) == (source_stat.st_dev, source_stat.st_ino)
    if entry is None:
        if same or (target_stat.st_size, target_stat.st_mtime_ns) == (source_stat.st_size, source_stat.st_mtime_ns):
            return CURRENT
        return PLACE
    if entry.get("target") == link_stat_key(target_stat) and entry.get("source") == link_stat_key(source_stat):
        return CURRENT
    if same:
        return CURRENT if sha256_file(target) == entry.get("sha256") else REPAIR
    return PLACE


def _remake_conversion(original: Path, converted: Path, folder: DataFolder) -> None:
    """Convert `original` again into `converted` (its content-addressed name), replacing damaged bytes."""
    from tasks.data.images import inspect_and_store

    converted.unlink(missing_ok=True)
    inspect_and_store((str(original), str(folder.converted), 1, 10**12, 10**12))


def _place(source: Path, target: Path) -> str:
    """Hard-link (or copy where linking is impossible) `source` to `target` atomically.

    The link is made under a temporary name in the target folder and moved over the target with
    `os.replace`, so a reader sees the old file or the new one, never a missing or partial one.
    A source that is a symbolic link (links in a source folder are followed) is placed as the
    file it leads to: `link(2)` would otherwise link the symbolic link itself, and the arranged
    folder would hold a link out of the data folder (dangling, when relative).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(os.path.realpath(source), tmp)
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
    frame["arranged_path"] = arranged_paths(frame, folder.classes())
    todo = frame[frame["arranged_path"] != ""]
    stats = ArrangeStats()
    wanted: set[Path] = set()
    recorded = read_json_object(folder.arranged_index)
    entries: dict[str, dict] = {}
    log = run_logger(__name__)
    for arranged, converted, original, sha in zip(todo["arranged_path"], todo["converted_path"],
                                                  todo["source_path"], todo["sha256"]):
        # the bytes to arrange: the converted RGB JPEG where the manifest step made one
        source, target = Path(converted or original), folder.file(arranged)
        wanted.add(target)
        entry = recorded.get(arranged)
        state = _state(source, target, entry)
        if state == REPAIR:
            if converted:
                log.warning("%s (and the conversion %s it is linked to) was changed in place; converting %s "
                            "again", target, source, original)
                _remake_conversion(Path(original), source, folder)
            else:
                log.warning("%s was changed in place, and so was its source %s, which cannot be repaired "
                            "(it is not from an archive); check that file", target, source)
        if state == CURRENT:
            stats.unchanged += 1
        elif _place(source, target) == "linked":
            stats.linked += 1
        else:
            stats.copied += 1
        placed = entry.get("sha256") if entry and state == CURRENT else None
        entries[arranged] = {"target": link_stat_key(target.stat()), "source": link_stat_key(source.stat()),
                             "sha256": placed or (sha256_file(source) if converted else sha)}
    _remove_stale(folder.arranged, wanted, stats)
    _remove_stale(folder.unlabelled, wanted, stats)
    write_if_changed(folder.arranged_index, (json.dumps(entries, sort_keys=True) + "\n").encode("utf-8"))
    return frame, stats


def arrange_files(manifest: pd.DataFrame, folder: DataFolder) -> pd.DataFrame:
    """Mirror the kept rows into `data_dir/arranged/` (and `unlabelled/`); fill `arranged_path`.

    Hard links cost no space and keep the bytes identical to what was hashed; a copy is the
    fallback across filesystems. Files that are already right are not touched and files the
    manifest no longer names are removed, so the folder always equals the manifest.
    """
    return link_arranged(manifest, folder)[0]


# --------------------------------------------------------------------------- summary


def dataset_fingerprint(manifest: pd.DataFrame, classes: ClassMap = CATS_DOGS) -> str:
    """sha256 over sorted "sha256,label,split" lines of the kept labelled images, and the class map.

    It changes exactly when what a model would train or be tested on changes, so downstream
    steps (features, training, the retrain gate) can key on it. The class map is a last line
    `classes=a,b,c` (label order), except for cats vs. dogs, whose fingerprint stays as it was.
    """
    kept = manifest[(manifest["status"] == "ok") & manifest["split"].isin(SPLITS)]
    lines = sorted(f"{sha},{label},{split}" for sha, label, split in zip(kept["sha256"], kept["label"], kept["split"]))
    if not classes.kaggle:
        lines.append(f"classes={classes.text()}")
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def summarise(manifest: pd.DataFrame, folder: DataFolder, layout: str,
              label_overrides: LabelOverrides | None = None) -> PrepareSummary:
    """The flow's result: counts per split and class, quarantine reasons, fingerprint, paths.

    Only facts about the data, nothing about the run (no timings or work counters), so the
    same source gives the same summary and `prepare_summary.json` is not rewritten.
    """
    kept = manifest[manifest["status"] == "ok"]
    quarantined = manifest[manifest["status"] != "ok"]
    classes = folder.classes()
    counts = {split: {label: int(((kept["split"] == split) & (kept["label"] == label)).sum())
                      for label in classes.names} for split in SPLITS}
    return PrepareSummary(
        layout=layout, classes=list(classes.names), counts=counts, unlabelled=int((kept["split"] == UNLABELLED).sum()),
        quarantined=len(quarantined),
        quarantine_reasons={reason: int(n) for reason, n in sorted(quarantined["reason"].value_counts().items())},
        fingerprint=dataset_fingerprint(manifest, classes),
        paths=PreparePaths(data_dir=str(folder.root), manifest=str(folder.manifest), arranged=str(folder.arranged),
                           validation_result=str(folder.validation_result), data_docs=str(folder.data_docs),
                           summary=str(folder.summary)),
        label_overrides=label_overrides)


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


def write_summary(folder: DataFolder, layout: str, label_overrides: LabelOverrides | None = None) -> PrepareSummary:
    """Summarise the final manifest and keep it as `prepare_summary.json` (rewritten only on change)."""
    summary = summarise(read_manifest(folder.manifest), folder, layout, label_overrides)
    payload = json.dumps(summary.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    write_if_changed(folder.summary, payload.encode("utf-8"))
    return summary
