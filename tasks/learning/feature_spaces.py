"""Cached features of several feature spaces side by side: an ensemble's backbones, and mirrored images.

A head reads one feature space (tasks/learning/shards.py `load_split_features`); an ensemble's
head reads the concatenation of its backbones' spaces, row by row for the same images, and
test-time augmentation reads the mirrored images' space beside the plain one. Rows are the data
folder's one reader of a split (sha256 order); an image that failed to decode in any of the
spaces is left out of all of them, so the rows always line up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from tasks.common.logs import run_logger
from tasks.data.datafolder import DataFolder
from tasks.learning.shards import load_features, shard_index


def joint_split_features(folder: DataFolder, cache_dirs: Sequence[str | os.PathLike[str]], split: str,
                         leave_out: frozenset[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (n, sum of dims), labels (n,), sha256s) of one split over every space in `cache_dirs`.

    With one space this is `load_split_features`; with several, the columns are the spaces' in
    the order given. The hashes in `leave_out` are left out (the audit's suspects, when asked).
    """
    rows = folder.split_rows(split)
    rows = rows[~rows["sha256"].isin(leave_out)] if leave_out else rows
    indexes = [shard_index(cache_dir) for cache_dir in cache_dirs]
    failed = rows["sha256"].isin(set().union(*(index.failed for index in indexes)))
    if failed.any():
        run_logger(__name__).warning("%d %s image(s) could not be decoded and are left out, e.g. %s.",
                                     int(failed.sum()), split, rows.loc[failed, "path"].iloc[0])
        rows = rows[~failed]
    sha256s = rows["sha256"].tolist()
    return joint_features(cache_dirs, sha256s, indexes), rows["y"].to_numpy(dtype=np.int32), sha256s


def joint_features(cache_dirs: Sequence[str | os.PathLike[str]], sha256s: Sequence[str],
                   indexes: Sequence | None = None) -> np.ndarray:
    """Features of `sha256s` in every space of `cache_dirs`, concatenated column-wise in that order."""
    indexes = indexes or [None] * len(cache_dirs)
    parts = [load_features(cache_dir, sha256s, index) for cache_dir, index in zip(cache_dirs, indexes)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
