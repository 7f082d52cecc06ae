"""Deduplicate and split: every kept image gets one split, decided by its content hash alone.

`split_for_hash` maps an image's sha256 to a split, so adding images never moves an old one
and an image cannot land in two splits. `assign_splits` is a pure function over the manifest:
identical bytes are kept once, the same bytes under both labels are quarantined, and a
pre-split source keeps its own train/validation where it has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from tasks.common.errors import ConfigError
from tasks.common.labels import SPLITS, UNLABELLED
from tasks.common.results import LabelOverrides
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import read_manifest, write_manifest
from tasks.data.overrides import apply_overrides, override_files, read_overrides

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Default train/validation/test fractions."""

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
            f"{'/'.join(SPLITS)} that sum to 1, for example --split-fractions 0.8 0.1 0.1."
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
    labelled = manifest[(manifest["status"] == "ok") & _labelled(manifest)]
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


def _labelled(frame: pd.DataFrame) -> pd.Series:
    """Rows with a class label (any class; the unlabelled pool's label is "")."""
    return frame["label"].fillna("").astype(str) != ""


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
        _unlabelled=~_labelled(frame),
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
    labelled = ok & _labelled(frame)

    labels_per_hash = frame[labelled].groupby("sha256")["label"].nunique()
    conflicted = set(labels_per_hash[labels_per_hash > 1].index)
    conflict_rows = ok & frame["sha256"].isin(conflicted)
    _quarantine(frame, conflict_rows, "label_conflict")

    ok = frame["status"] == "ok"
    ordered = _keeper_order(frame[ok])
    duplicates = ordered.index[ordered.duplicated(subset="sha256", keep="first")]
    _quarantine(frame, frame.index.isin(duplicates), "duplicate")

    kept = frame["status"] == "ok"
    kept_labelled = kept & _labelled(frame)
    frame.loc[kept & ~_labelled(frame), "split"] = UNLABELLED
    presplit = presplit_splits(frame) if respect_source_split else frozenset()
    frame.loc[kept_labelled, "split"] = [
        _split_for_row(sha, src, presplit, fractions)
        for sha, src in zip(frame.loc[kept_labelled, "sha256"], frame.loc[kept_labelled, "source_split"])
    ]
    return frame


class SplitsAssigned(BaseModel):
    """What `assign_splits_file` did: label corrections applied, duplicates and conflicts found, source splits kept."""

    path: str
    written: bool
    duplicate: int
    label_conflict: int
    presplit: list[str]
    label_overrides: LabelOverrides | None = None


def assign_splits_file(folder: DataFolder, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       respect_source_split: bool = True, source_root: str | Path | None = None) -> SplitsAssigned:
    """Apply labels.csv, dedupe and split `inspected.parquet` into `splits.parquet` (written only if it changed).

    The corrections (tasks/data/overrides.py) come from `source_root`'s labels.csv and the data
    folder's, and are applied first, so deduplication and label conflicts see the corrected labels.
    """
    inspected = read_manifest(folder.inspected)
    files = override_files(source_root, folder)
    overrides = None
    if files:
        inspected, overrides = apply_overrides(inspected, read_overrides(files, folder.classes()), files)
    frame = assign_splits(inspected, fractions=fractions, respect_source_split=respect_source_split)
    return SplitsAssigned(
        path=str(folder.splits), written=write_manifest(frame, folder.splits),
        duplicate=int((frame["reason"] == "duplicate").sum()),
        label_conflict=int((frame["reason"] == "label_conflict").sum()),
        presplit=sorted(presplit_splits(inspected)) if respect_source_split else [], label_overrides=overrides)
