"""Deduplicate, split and arrange: turn the manifest into `arranged/<split>/<class>/` hard links.

Two rules carry the design:

* **A split comes from the content hash only.** `split_for_hash` maps an image's sha256 to a
  split, so adding images never moves an old one and an image cannot land in two splits.
* **Arranging is a mirror, not a copy job.** `arrange_files` makes the folder match the manifest
  exactly: missing links are made (atomically), stale files are removed, and files that are
  already right are not touched, so a second run writes nothing.

`assign_splits` is a pure function over the manifest DataFrame; the `@task` wrappers at the
bottom only read and write parquet paths: `inspected.parquet` (engineer B's step) ->
`splits.parquet` (after `assign_splits`, validated next) -> `manifest.parquet` (after
arranging, with `arranged_path`). Each is written only when its content changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ConfigError
from tasks.files import write_if_changed
from tasks.labels import CLASS_DIRS, CLASSES, SPLITS, UNLABELLED
from tasks.manifest import read_manifest, write_manifest

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Default train/validation/test fractions."""

ARRANGED = "arranged"
"""Folder under data_dir holding `<split>/<class dir>/` links."""

SPLITS_NAME = "splits.parquet"
"""Manifest after `assign_splits` (input of validation and arranging), under data_dir."""

MANIFEST_NAME = "manifest.parquet"
"""The final manifest, with `arranged_path` filled, under data_dir."""

SUMMARY_NAME = "prepare_summary.json"
"""The flow's summary (the same dict `prepare_data` returns), under data_dir."""

SPLIT_REASONS: frozenset[str] = frozenset({"duplicate", "label_conflict"})
"""Quarantine reasons this module owns; any others come from the manifest step and are kept."""

_HASH_DIGITS = 13  # 52 bits: exact in a float, so the position is always < 1


# --------------------------------------------------------------------------- split rules


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Fractions must be three non-negative numbers summing to 1, else splits would silently shift."""
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions {tuple(fractions)} must be {len(SPLITS)} non-negative numbers for "
            f"{'/'.join(SPLITS)} that sum to 1, for example (0.8, 0.1, 0.1)."
        )
    return values  # type: ignore[return-value]


def hash_unit(sha256: str) -> float:
    """Map a hex digest to [0, 1): the image's fixed position on the split line."""
    return int(sha256[:_HASH_DIGITS], 16) / 16**_HASH_DIGITS


def split_for_hash(sha256: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of an image, decided by its content hash alone.

    The hash is cut against cumulative fractions (train first), so the answer never depends on
    which other images exist: adding images never moves an old one. Changing the fractions only
    moves images across the boundaries that moved.
    """
    position = hash_unit(sha256)
    cumulative = 0.0
    for split, fraction in zip(SPLITS, check_fractions(fractions)):
        cumulative += fraction
        if position < cumulative:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions)) if f > 0)  # float rounding


def presplit_splits(manifest: pd.DataFrame) -> frozenset[str]:
    """The labelled splits a pre-split source brings, or an empty set when it brings none.

    A source counts as pre-split when its labelled images carry more than one of
    train/validation/test (e.g. `cats_and_dogs_filtered`: train + validation). Kaggle's single
    labelled `train/` folder is *not* a split decision, so it is split by hash like any other.
    """
    labelled = manifest[(manifest["status"] == "ok") & manifest["label"].isin(CLASSES)]
    found = frozenset(labelled["source_split"]) & frozenset(SPLITS)
    return found if len(found) > 1 else frozenset()


def _split_for_row(sha256: str, source_split: str, kept: frozenset[str],
                   fractions: tuple[float, float, float]) -> str:
    """A labelled image's split: the source's own where it has one, else the hash's.

    Pre-split sources rarely ship every split (`cats_and_dogs_filtered` has no test folder).
    The missing ones are carved out of the source's *train* images by content hash: a train
    image whose hash falls in a missing split's band moves there; its validation images stay
    put. So with 80/10/10 and a train+validation source, about 10% of its train images become
    the test split, and the carve is as stable as the hash split itself.
    """
    by_hash = split_for_hash(sha256, fractions)
    if source_split not in kept:
        return by_hash
    if source_split == "train" and by_hash not in kept:
        return by_hash
    return source_split


# --------------------------------------------------------------------------- assign_splits


def _reset_split_fields(manifest: pd.DataFrame) -> pd.DataFrame:
    """Undo a previous `assign_splits` so that running it again is a pure function of the files."""
    frame = manifest.copy()
    mine = frame["reason"].isin(SPLIT_REASONS)
    frame.loc[mine, "status"] = "ok"
    frame.loc[mine, "reason"] = ""
    frame["split"] = ""
    frame["arranged_path"] = ""
    return frame


def _quarantine(frame: pd.DataFrame, mask: pd.Series, reason: str) -> None:
    frame.loc[mask, "status"] = "quarantined"
    frame.loc[mask, "reason"] = reason


def _keeper_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted so that the copy to keep comes first within each sha256.

    Labelled copies beat unlabelled ones (a label is information), then the source's train
    copy beats validation/test ones (a leak between a pre-split source's splits is resolved
    towards train), then the path decides, so the choice is deterministic.
    """
    split_rank = {s: i for i, s in enumerate((*SPLITS, UNLABELLED, ""))}
    return frame.assign(
        _unlabelled=~frame["label"].isin(CLASSES),
        _split_rank=frame["source_split"].map(split_rank).fillna(len(split_rank)),
    ).sort_values(["sha256", "_unlabelled", "_split_rank", "relative_path", "source_path"], kind="stable")


def assign_splits(manifest: pd.DataFrame, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  respect_source_split: bool = True) -> pd.DataFrame:
    """Deduplicate by content, quarantine label conflicts and give every kept image its split.

    Pure: returns a new frame with `status`, `reason`, `split` updated and `arranged_path` "".
    Rows already quarantined by the manifest step keep their reason and get split "".

    * The same bytes under both labels: every copy is quarantined as `label_conflict`
      (we cannot tell which label is right, and keeping either would teach noise).
    * Otherwise identical images are kept once; the other copies are `duplicate`.
    * Unlabelled images (Kaggle's `test1/`) get split "unlabelled" and are never trained on.
    * Labelled images get `split_for_hash`, unless `respect_source_split` and the source is
      pre-split (see `presplit_splits` and `_split_for_row` for how a missing test split is carved).
    """
    fractions = check_fractions(fractions)
    frame = _reset_split_fields(manifest)
    ok = frame["status"] == "ok"
    labelled = ok & frame["label"].isin(CLASSES)

    labels_per_hash = frame[labelled].groupby("sha256")["label"].nunique()
    conflicted = set(labels_per_hash[labels_per_hash > 1].index)
    conflict_rows = ok & frame["sha256"].isin(conflicted)
    _quarantine(frame, conflict_rows, "label_conflict")

    ok = frame["status"] == "ok"
    ordered = _keeper_order(frame[ok])
    duplicates = ordered.index[ordered.duplicated(subset="sha256", keep="first")]
    _quarantine(frame, frame.index.isin(duplicates), "duplicate")

    kept = frame["status"] == "ok"
    kept_labelled = kept & frame["label"].isin(CLASSES)
    frame.loc[kept & ~frame["label"].isin(CLASSES), "split"] = UNLABELLED
    presplit = presplit_splits(frame) if respect_source_split else frozenset()
    frame.loc[kept_labelled, "split"] = [
        _split_for_row(sha, src, presplit, fractions)
        for sha, src in zip(frame.loc[kept_labelled, "sha256"], frame.loc[kept_labelled, "source_split"])
    ]
    return frame


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
    paths[labelled] = (f"{ARRANGED}/" + frame.loc[labelled, "split"] + "/" + frame.loc[labelled, "label"].map(CLASS_DIRS)
                       + "/" + stems[labelled] + "_" + short[labelled] + ".jpg")
    paths[pool] = f"{UNLABELLED}/" + stems[pool] + ".jpg"
    clash = pool & paths.duplicated(keep=False)
    paths[clash] = f"{UNLABELLED}/" + stems[clash] + "_" + short[clash] + ".jpg"
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


def link_arranged(manifest: pd.DataFrame, data_dir: Path) -> tuple[pd.DataFrame, ArrangeStats]:
    """`arrange_files` with a count of what was done (the flow logs it; tests assert it)."""
    data_dir = Path(data_dir)
    frame = manifest.copy()
    frame["arranged_path"] = arranged_paths(frame)
    todo = frame[frame["arranged_path"] != ""]
    stats = ArrangeStats()
    wanted: set[Path] = set()
    for arranged, converted, original in zip(todo["arranged_path"], todo["converted_path"], todo["source_path"]):
        # the bytes to arrange: the converted RGB JPEG where the manifest step made one
        source, target = Path(converted or original), data_dir / arranged
        wanted.add(target)
        if _is_current(source, target):
            stats.unchanged += 1
        elif _place(source, target) == "linked":
            stats.linked += 1
        else:
            stats.copied += 1
    _remove_stale(data_dir / ARRANGED, wanted, stats)
    _remove_stale(data_dir / UNLABELLED, wanted, stats)
    return frame, stats


def arrange_files(manifest: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """Mirror the kept rows into `data_dir/arranged/` (and `unlabelled/`); fill `arranged_path`.

    Hard links cost no space and keep the bytes identical to what was hashed; a copy is the
    fallback across filesystems. Files that are already right are not touched and files the
    manifest no longer names are removed, so the folder always equals the manifest.
    """
    return link_arranged(manifest, data_dir)[0]


# --------------------------------------------------------------------------- summary


def dataset_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over sorted "sha256,label,split" lines of the kept labelled images.

    It changes exactly when what a model would train or be tested on changes, so downstream
    steps (features, training, the retrain gate) can key on it.
    """
    kept = manifest[(manifest["status"] == "ok") & manifest["split"].isin(SPLITS)]
    lines = sorted(f"{sha},{label},{split}" for sha, label, split in zip(kept["sha256"], kept["label"], kept["split"]))
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def summarise(manifest: pd.DataFrame, data_dir: Path, layout: str) -> dict:
    """The flow's result: counts per split and class, quarantine reasons, fingerprint, paths.

    Only facts about the data, nothing about the run (no timings or work counters), so the
    same source gives the same summary and `prepare_summary.json` is not rewritten.
    """
    data_dir = Path(data_dir).absolute()
    kept = manifest[manifest["status"] == "ok"]
    quarantined = manifest[manifest["status"] != "ok"]
    counts = {split: {label: int(((kept["split"] == split) & (kept["label"] == label)).sum()) for label in CLASSES}
              for split in SPLITS}
    return {
        "layout": layout,
        "counts": counts,
        "unlabelled": int((kept["split"] == UNLABELLED).sum()),
        "quarantined": len(quarantined),
        "quarantine_reasons": {reason: int(n) for reason, n in sorted(quarantined["reason"].value_counts().items())},
        "fingerprint": dataset_fingerprint(manifest),
        "paths": {
            "data_dir": str(data_dir),
            "manifest": str(data_dir / MANIFEST_NAME),
            "arranged": str(data_dir / ARRANGED),
            "validation_result": str(data_dir / "validation" / "result.json"),
            "data_docs": str(data_dir / "validation" / "data_docs" / "index.html"),
            "summary": str(data_dir / SUMMARY_NAME),
        },
    }


# --------------------------------------------------------------------------- Prefect tasks


@task(name="assign-splits", cache_policy=NO_CACHE)
def assign_splits_task(inspected_path: Path, out_path: Path, *,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       respect_source_split: bool = True) -> dict:
    """Dedupe and split the inspected manifest; write it to `out_path` (only if it changed).

    Returns {"path", "written", "duplicate", "label_conflict", "presplit": [splits kept from the source]}.
    """
    inspected = read_manifest(Path(inspected_path))
    frame = assign_splits(inspected, fractions=fractions, respect_source_split=respect_source_split)
    return {
        "path": str(out_path),
        "written": write_manifest(frame, Path(out_path)),
        "duplicate": int((frame["reason"] == "duplicate").sum()),
        "label_conflict": int((frame["reason"] == "label_conflict").sum()),
        "presplit": sorted(presplit_splits(inspected)) if respect_source_split else [],
    }


@task(name="arrange", cache_policy=NO_CACHE)
def arrange_task(split_path: Path, data_dir: Path) -> dict:
    """Mirror the kept images into `arranged/` and write the final `manifest.parquet`.

    Returns the work done: {"linked", "copied", "unchanged", "removed", "manifest_written", "manifest"}.
    """
    frame, stats = link_arranged(read_manifest(Path(split_path)), Path(data_dir))
    manifest_path = Path(data_dir) / MANIFEST_NAME
    return {**asdict(stats), "manifest_written": write_manifest(frame, manifest_path),
            "manifest": str(manifest_path)}


@task(name="summarise", cache_policy=NO_CACHE)
def summary_task(manifest_path: Path, data_dir: Path, layout: str) -> dict:
    """Build the summary from the final manifest and keep it as `prepare_summary.json`."""
    summary = summarise(read_manifest(Path(manifest_path)), Path(data_dir), layout)
    payload = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    write_if_changed(Path(data_dir) / SUMMARY_NAME, payload.encode("utf-8"))
    return summary
