"""The feature cache on disk: one folder per feature space, holding shard files keyed by content.

Why it is built this way:
- The cache key is the feature space, (backbone, weights fingerprint, input size, precision,
  Keras backend, image decoder, engine), for the folder, and the image sha256 inside it: a
  second run computes nothing, 10% new images cost about 10%, and features of different
  precision, backend, decoder (OpenCV's pixels are a level or two from Pillow's) or engine
  never mix. Keras' features keep the name they always had (no engine part), so caches made
  before engines existed stay valid; OpenVINO's end in `-openvino`, and their folder keeps the
  IR that computed them (`openvino/`, see `engine_dir`), so a second run does not convert
  again. meta.json in the folder says the same for people (and `CACHE_FORMAT` for code).
- A shard is written atomically under a name made of the hashes it is planned to hold.
  Shards computed anywhere (another process, another Dask worker) merge by construction, a
  killed run keeps every finished shard, and no reader ever sees half of one.
- A shard that fails its integrity check (bit rot, truncation) is set aside as
  `.corrupt-<name>` with a warning and its images are computed again. An image that cannot
  be decoded is recorded in its shard with the reason and left out of training, never
  failing the batch or the run.
- Readers index every shard once (`shard_index`) and read each shard file once, whatever the
  order of the hashes asked for, so the head and fine-tuning read features at disk speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tasks.common.errors import ConfigError
from tasks.common.files import atomic_path, write_if_changed
from tasks.common.logs import run_logger
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import get_backbone, resolve_input_size, resolve_weights, weights_fingerprint
from tasks.learning.pixels import resolve_decoder

CACHE_FORMAT = 2
"""Version of the shard layout, recorded in each cache's meta.json (2: uint8 pipeline, failures kept)."""

SHARD_GLOB = "shard-*.npz"


VIEWS: tuple[str, ...] = ("plain", "flip")
"""What the backbone sees of each image: the image, or its mirror (test-time augmentation's second view)."""

ENGINE_DIR = "openvino"
"""Subfolder of an OpenVINO feature cache holding the IR (and compiled blobs) that computed its features."""


def cache_key(backbone: str, weights_id: str, input_size: int, precision: str, backend: str, decoder: str,
              engine: str = "keras", view: str = "plain") -> str:
    """The folder name of one feature space: `<backbone>-<weights>-<size>-<precision>-<backend>-<decoder>`,
    then `-openvino` for features computed by OpenVINO and `-flip` for the mirrored images (Keras' plain
    images keep the name they always had)."""
    key = f"{get_backbone(backbone).name}-{weights_id}-{input_size}-{precision}-{backend}-{decoder}"
    return (key if engine == "keras" else f"{key}-{engine}") + view_suffix(view)


def view_suffix(view: str) -> str:
    """"" for the plain images, "-flip" for their mirrors; an unknown view is a ConfigError."""
    if view not in VIEWS:
        raise ConfigError(f"Feature view {view!r} is unknown; use one of {', '.join(VIEWS)}.")
    return "" if view == "plain" else f"-{view}"


def engine_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where an OpenVINO feature cache keeps its IR (float32, or int8 with its calibration.json)."""
    return Path(cache_dir) / ENGINE_DIR


def feature_cache_dir(folder: DataFolder, backbone: str, weights: str | os.PathLike[str] | None,
                      input_size: int | None, precision: str = "float32", decoder: str = "auto",
                      engine: str = "keras", view: str = "plain") -> Path:
    """data_dir/features/<cache key>: one cache per feature space.

    weights=None means the data folder's kept random draw (`random_weights_file`), so the
    cache always names weights that can be loaded again, never an unrepeatable random build.
    The decoder enters resolved ("auto" is the one that runs here).
    """
    from tasks.common.devices import backend

    size = resolve_input_size(backbone, input_size)
    fingerprint = weights_fingerprint(resolve_weights(folder, backbone, weights))
    return folder.feature_cache(cache_key(backbone, fingerprint, size, precision, backend(), resolve_decoder(decoder),
                                          engine, view))


def _cache_meta(backbone: str, weights: str, input_size: int, precision: str, decoder: str, engine: str,
                view: str = "plain") -> dict:
    from tasks.common.devices import backend

    spec = get_backbone(backbone)
    meta = {"format": CACHE_FORMAT, "backbone": spec.name, "weights": weights_fingerprint(weights),
            "input_size": input_size, "feature_dim": spec.feature_dim, "preprocess": spec.preprocess_mode,
            "precision": precision, "backend": backend(), "decoder": decoder, "engine": engine}
    if view != "plain":  # the plain caches' meta.json stays as it was
        meta["view"] = view
    return meta


def ready_cache_dir(cache_dir: Path, backbone: str, weights: str, input_size: int, precision: str,
                    decoder: str, engine: str = "keras", view: str = "plain") -> None:
    """Make `cache_dir` ready for shards: the folder, minus what killed runs left, and its meta.json.

    meta.json is written only when it changed: a run that adds images leaves the folder's old files as they were.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_dir)
    write_if_changed(cache_dir / "meta.json",
                     (json.dumps(_cache_meta(backbone, weights, input_size, precision, decoder, engine, view), indent=2,
                                 sort_keys=True)
                      + "\n").encode())


def _shard_paths(cache_dir: Path) -> list[Path]:
    # Temporary files start with "." (tasks.common.files.atomic_path), so this never sees a half-written shard.
    return sorted(cache_dir.glob(SHARD_GLOB)) if cache_dir.is_dir() else []


def _remove_stale_temporaries(cache_dir: Path, older_than_s: float = 3600.0) -> None:
    """Delete shard temporaries left by a killed run (SIGKILL skips cleanup); young ones may be a live run's."""
    cutoff = time.time() - older_than_s
    for tmp in cache_dir.glob(".shard-*.tmp.npz"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


class Shard(BaseModel):
    """One verified shard file: the hashes it has features for and those it could not decode."""

    path: str
    sha256: list[str]
    failed: dict[str, str]
    worker: str


def read_shard(path: Path) -> Shard | None:
    """The shard's contents after a full read (the zip CRC of every array is checked).

    A shard that fails the check is renamed `.corrupt-<name>` (kept for inspection, never read
    again) with a warning, and None is returned: its images are then computed again.
    """
    try:
        with np.load(path, allow_pickle=False) as shard:
            hashes = shard["sha256"].tolist()
            features = shard["features"]
            failed = dict(zip(shard["failed_sha256"].tolist(), shard["failed_reason"].tolist()))
            worker = str(shard["worker"])
        if features.shape[0] != len(hashes):
            raise ValueError(f"{features.shape[0]} feature rows for {len(hashes)} hashes")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        aside = path.with_name(f".corrupt-{path.name}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        run_logger(__name__).warning("Feature shard %s failed its check (%s: %s); set aside as %s, its images "
                                     "will be computed again.", path, type(error).__name__, error, aside.name)
        return None
    return Shard(path=str(path), sha256=hashes, failed=failed, worker=worker)


class ShardIndex(BaseModel):
    """sha256 -> (shard file, row) over all verified shards, and the images that failed to decode."""

    rows: dict[str, tuple[str, int]]
    failed: dict[str, str]
    workers: dict[str, str]
    """shard file name -> the worker that computed it."""


def shard_index(cache_dir: str | os.PathLike[str]) -> ShardIndex:
    """Index every finished shard; the first shard holding a hash wins, features beat failures."""
    rows: dict[str, tuple[str, int]] = {}
    failed: dict[str, str] = {}
    workers: dict[str, str] = {}
    for path in _shard_paths(Path(cache_dir)):
        shard = read_shard(path)
        if shard is None:
            continue
        workers[path.name] = shard.worker
        for row, sha in enumerate(shard.sha256):
            rows.setdefault(sha, (str(path), row))
        for sha, reason in shard.failed.items():
            failed.setdefault(sha, reason)
    return ShardIndex(rows=rows, failed={sha: why for sha, why in failed.items() if sha not in rows}, workers=workers)


def worker_name() -> str:
    """Who computes a shard: the Dask worker's name when run by Dask, else host:pid."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def shard_name(sha256s: Sequence[str]) -> str:
    """A shard's file name, made of the hashes it is planned to hold: equal plans, equal names."""
    return f"shard-{hashlib.sha256(chr(10).join(sha256s).encode()).hexdigest()[:16]}.npz"


def write_shard(cache_dir: Path, sha256s: Sequence[str], features: np.ndarray,
                failed: dict[str, str] | None = None, *, name: str | None = None) -> Path:
    """Atomically write one shard (features of `sha256s`, and the images that failed with why)."""
    if len(sha256s) != len(features):
        raise ValueError(f"{len(sha256s)} hashes for {len(features)} feature rows")
    failed = failed or {}
    target = cache_dir / (name or shard_name([*sha256s, *failed]))
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, sha256=np.asarray(sha256s, dtype=str), features=np.asarray(features, dtype=np.float32),
                 failed_sha256=np.asarray(list(failed), dtype=str),
                 failed_reason=np.asarray(list(failed.values()), dtype=str),
                 worker=np.asarray(worker_name()))
    return target


def load_features(cache_dir: str | os.PathLike[str], sha256s: Sequence[str],
                  index: ShardIndex | None = None) -> np.ndarray:
    """Cached features for `sha256s`, rows in the given order, float32 (n, feature_dim).

    Each shard is read once, whatever the order asked for. Hashes with no cached feature
    are an error that names them, never a silent zero row.
    """
    cache_dir = Path(cache_dir)
    index = index or shard_index(cache_dir)
    missing = [sha for sha in sha256s if sha not in index.rows]
    if missing:
        raise ConfigError(f"{len(missing)} image(s) have no cached features in {str(cache_dir)!r} "
                          f"(e.g. {', '.join(missing[:3])}); run extract_features first.")
    wanted: dict[str, list[tuple[int, int]]] = {}
    for out_row, sha in enumerate(sha256s):
        path, row = index.rows[sha]
        wanted.setdefault(path, []).append((out_row, row))
    result: np.ndarray | None = None
    for path, pairs in wanted.items():
        with np.load(path, allow_pickle=False) as shard:
            features = shard["features"]
        if result is None:
            result = np.empty((len(sha256s), features.shape[1]), dtype=np.float32)
        out_rows, rows = (np.asarray(column) for column in zip(*pairs))
        result[out_rows] = features[rows]
    return result if result is not None else np.empty((0, _meta_feature_dim(cache_dir)), dtype=np.float32)


def _meta_feature_dim(cache_dir: Path) -> int:
    return int(json.loads((cache_dir / "meta.json").read_text())["feature_dim"])


def load_split_features(folder: DataFolder, cache_dir: str | os.PathLike[str], split: str,
                        leave_out: frozenset[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (n, d), labels int32 (n,) with cat=0 dog=1, sha256s) of one split.

    Rows come from the data folder's one reader (sha256 order); labels come from the manifest
    row of the same hash, so they cannot drift from features. Images that failed to decode
    are left out with a warning naming how many, and so are the hashes in `leave_out` (the
    audit's suspected labels, when asked).
    """
    rows = folder.split_rows(split)
    rows = rows[~rows["sha256"].isin(leave_out)] if leave_out else rows
    index = shard_index(cache_dir)
    failed = rows["sha256"].isin(list(index.failed))
    if failed.any():
        run_logger(__name__).warning("%d %s image(s) could not be decoded and are left out, e.g. %s (%s).",
                                     int(failed.sum()), split, rows.loc[failed, "path"].iloc[0],
                                     index.failed[rows.loc[failed, "sha256"].iloc[0]])
        rows = rows[~failed]
    sha256s = rows["sha256"].tolist()
    return load_features(cache_dir, sha256s, index), rows["y"].to_numpy(dtype=np.int32), sha256s
