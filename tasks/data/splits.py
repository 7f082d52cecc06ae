"""Deduplicate and split: every kept image gets one split, each class in its fractions, stable as data grows.

Each class is split on its own (stratified), so every class has its share of every split to
within one image: a ten-class set of 150 images each has 15 of each class in validation, not
the 7 to 24 that cutting each image's content hash at fixed points gives by chance. And an image
keeps the split it was given: the data folder records the splits (`splits.parquet`, with the
rule and fractions that made them in `splits.json`), and a class's new images, in sha256 order,
fill its splits towards the fractions. So adding images never moves an old one, the same images
always give the same splits (sha256 order depends on content only), and an image cannot land
in two splits. Other fractions (or `respect_source_split`) split the data afresh.

`assign_splits` is a pure function over the manifest: identical bytes are kept once, the same
bytes under two labels are quarantined, and a pre-split source keeps its own splits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from tasks.common.errors import ConfigError
from tasks.common.files import read_json_object, write_if_changed
from tasks.common.labels import SPLITS, UNLABELLED
from tasks.common.results import LabelOverrides
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import read_manifest, write_manifest
from tasks.data.overrides import apply_overrides, override_files, read_overrides

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Default train/validation/test fractions."""

SPLIT_REASONS: frozenset[str] = frozenset({"duplicate", "label_conflict"})
"""Quarantine reasons this module owns; any others come from the manifest step and are kept."""

RULE = "stratified-by-class-1"
"""Names the rule in `splits.json`; splits recorded under another rule are not kept."""


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


def allocate(recorded: Mapping[str, int], new: int, shares: Mapping[str, float]) -> dict[str, int]:
    """How many of `new` images each split of a pool takes, given the pool's recorded counts and shares.

    One image at a time goes to the split furthest below its share of the pool so far (ties go
    to the first in `shares`), so a new pool lands within one image of its shares and a pool whose
    recorded images lean one way is pulled back without moving any of them. A split with share 0
    never takes one.
    """
    have = {split: int(recorded.get(split, 0)) for split in shares}
    taken = dict.fromkeys(shares, 0)
    total = sum(have.values())
    order = {split: index for index, split in enumerate(shares)}
    for _ in range(new):
        total += 1
        split = max(shares, key=lambda s: (shares[s] * total - have[s] - taken[s], -order[s]))
        taken[split] += 1
    return taken


def fill(new_sha256: Sequence[str], counts: Mapping[str, int]) -> dict[str, str]:
    """New images of one pool to splits: in sha256 order, the first `counts[train]` to train, and so on.

    The sha256 order is random with respect to what an image shows, so each split gets a random
    sample of the class, and it depends on content only.
    """
    ordered = sorted(new_sha256)
    placed: dict[str, str] = {}
    start = 0
    for split in SPLITS:
        for sha in ordered[start:start + counts.get(split, 0)]:
            placed[sha] = split
        start += counts.get(split, 0)
    return placed


def presplit_splits(manifest: pd.DataFrame) -> frozenset[str]:
    """The labelled splits a pre-split source brings, or an empty set when it brings none.

    A source counts as pre-split when its labelled images carry more than one of
    train/validation/test (e.g. `cats_and_dogs_filtered`: train + validation). Kaggle's single
    labelled `train/` folder is *not* a split decision, so it is split like any other.
    """
    labelled = manifest[(manifest["status"] == "ok") & _labelled(manifest)]
    found = frozenset(labelled["source_split"]) & frozenset(SPLITS)
    return found if len(found) > 1 else frozenset()


def _pool_shares(source_split: str, presplit: frozenset[str],
                 fractions: tuple[float, float, float]) -> dict[str, float] | None:
    """The splits an image may take and their shares, or None when its source decides (a pre-split source's own split).

    Pre-split sources rarely ship every split (`cats_and_dogs_filtered` has no test folder).
    The missing ones are carved out of the source's *train* images, each class's train images
    giving each missing split its fraction of them; its validation images stay put. So with
    80/10/10 and a train+validation source, 10% of each class's train images become its test split.
    """
    if source_split not in presplit:
        return dict(zip(SPLITS, fractions))
    missing = {split: share for split, share in zip(SPLITS, fractions) if split not in presplit}
    if source_split != "train" or not missing:
        return None
    return {"train": 1.0 - sum(missing.values()), **missing}


def stratified_splits(rows: pd.DataFrame, presplit: frozenset[str], fractions: tuple[float, float, float],
                      record: Mapping[str, str] | None = None) -> pd.Series:
    """The split of each kept labelled row (`sha256`, `label`, `source_split`; one row per sha256), index-aligned.

    Rows are pooled by class (and, in a pre-split source, by whether their train images may be
    carved); a recorded split the pool allows is kept, and the pool's new images fill its splits
    towards its shares (`allocate`, then `fill`).
    """
    record = record or {}
    chosen: dict[str, str] = {}
    pools: dict[tuple[str, tuple[tuple[str, float], ...]], list[str]] = {}
    for sha, label, source_split in zip(rows["sha256"], rows["label"], rows["source_split"]):
        shares = _pool_shares(source_split, presplit, fractions)
        if shares is None:
            chosen[sha] = source_split
        else:
            pools.setdefault((label, tuple(shares.items())), []).append(sha)
    for (_, shares_items), members in pools.items():
        shares = dict(shares_items)
        kept = {sha: record[sha] for sha in members if record.get(sha) in shares}
        recorded = {split: list(kept.values()).count(split) for split in shares}
        new = [sha for sha in members if sha not in kept]
        chosen.update(kept)
        chosen.update(fill(new, allocate(recorded, len(new), shares)))
    return rows["sha256"].map(chosen)


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
                  respect_source_split: bool = True, record: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Deduplicate by content, quarantine label conflicts and give every kept image its split.

    Pure: returns a new frame with `status`, `reason`, `split` updated and `arranged_path` "".
    Rows already quarantined by the manifest step keep their reason and get split "".

    * The same bytes under two labels: every copy is quarantined as `label_conflict`
      (we cannot tell which label is right, and keeping either would teach noise).
    * Otherwise identical images are kept once; the other copies are `duplicate`.
    * Unlabelled images (Kaggle's `test1/`) get split "unlabelled" and are never trained on.
    * Labelled images keep their split in `record` (sha256 -> split, what the data folder gave
      them before), and the others are stratified by class (`stratified_splits`), unless
      `respect_source_split` and the source is pre-split (`presplit_splits`, `_pool_shares`).
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
    frame.loc[kept_labelled, "split"] = stratified_splits(frame[kept_labelled], presplit, fractions, record)
    return frame


# --------------------------------------------------------------------------- the record in the data folder


def split_settings(fractions: Sequence[float], respect_source_split: bool) -> dict[str, object]:
    """What `splits.json` records beside `splits.parquet`: the splits there were made by this rule and these settings."""
    return {"rule": RULE, "fractions": list(check_fractions(fractions)), "respect_source_split": respect_source_split}


def split_record(folder: DataFolder, settings: Mapping[str, object]) -> dict[str, str]:
    """sha256 -> split of every image the data folder has split before under the same settings ({} when none).

    A folder prepared before `splits.json` existed keeps the splits it arranged (`manifest.parquet`:
    its champion was tested on them); one never arranged, or recorded under other settings, is split afresh.
    """
    saved = read_json_object(folder.split_settings)
    if saved:
        source = folder.splits if saved == dict(settings) else None
    else:
        source = folder.manifest if folder.manifest.is_file() else None
    if source is None or not source.is_file():
        return {}
    try:
        frame = pd.read_parquet(source, columns=["sha256", "status", "split"])
    except Exception:  # noqa: BLE001 - an unreadable record only costs a fresh split
        return {}
    placed = frame[(frame["status"] == "ok") & frame["split"].isin(SPLITS)]
    return dict(zip(placed["sha256"], placed["split"]))


class SplitsAssigned(BaseModel):
    """What `assign_splits_file` did: label corrections applied, duplicates and conflicts found, splits kept and new,
    source splits kept."""

    path: str
    written: bool
    duplicate: int
    label_conflict: int
    presplit: list[str]
    kept: int = 0
    """Labelled images that kept the split the data folder had given them."""
    placed: int = 0
    """Labelled images given a split now (new images, or all of them on a fresh split)."""
    label_overrides: LabelOverrides | None = None


def assign_splits_file(folder: DataFolder, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       respect_source_split: bool = True, source_root: str | Path | None = None) -> SplitsAssigned:
    """Apply labels.csv, dedupe and split `inspected.parquet` into `splits.parquet` (written only if it changed),
    and record the settings.

    The corrections (tasks/data/overrides.py) come from `source_root`'s labels.csv and the data
    folder's, and are applied first, so deduplication and label conflicts see the corrected labels.
    """
    inspected = read_manifest(folder.inspected)
    files = override_files(source_root, folder)
    overrides = None
    if files:
        inspected, overrides = apply_overrides(inspected, read_overrides(files, folder.classes()), files)
    settings = split_settings(fractions, respect_source_split)
    record = split_record(folder, settings)
    frame = assign_splits(inspected, fractions=fractions, respect_source_split=respect_source_split, record=record)
    written = write_manifest(frame, folder.splits)
    write_if_changed(folder.split_settings, (json.dumps(settings, indent=2) + "\n").encode("utf-8"))
    labelled = frame[(frame["status"] == "ok") & frame["split"].isin(SPLITS)]
    kept = int((labelled["sha256"].map(record) == labelled["split"]).sum())
    return SplitsAssigned(
        path=str(folder.splits), written=written,
        duplicate=int((frame["reason"] == "duplicate").sum()),
        label_conflict=int((frame["reason"] == "label_conflict").sum()),
        presplit=sorted(presplit_splits(inspected)) if respect_source_split else [],
        kept=kept, placed=len(labelled) - kept, label_overrides=overrides)
