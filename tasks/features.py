"""Bottleneck features: a frozen backbone streamed over the arranged images, cached by content.

Why it is built this way:
- `tf.data` reads and decodes files in parallel and prefetches, so the model never waits
  for JPEG decoding (on 2 CPU cores decode overlaps with the forward pass).
- The cache key is (backbone, weights fingerprint, input size) for the folder and the image
  sha256 inside it, so a second run computes nothing and 10% new images cost about 10%.
- Features are written in shards, each atomically as it fills: a run killed mid-way keeps
  every finished shard and the next run continues from there. Only one shard of features
  and a few prefetched batches of images are ever in memory, whatever the dataset size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from prefect import task

from tasks.backbones import (
    Preprocess,
    build_backbone,
    get_backbone,
    resolve_input_size,
    resolve_weights,
    weights_fingerprint,
)
from tasks.devices import pick_batch_size
from tasks.errors import ConfigError, InputError
from tasks.files import atomic_path, write_if_changed
from tasks.labels import LABEL_INDEX, SPLITS

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the shard layout, recorded in each cache's meta.json."""

SHARD_GLOB = "shard-*.npz"

AUTOTUNE = tf.data.AUTOTUNE

ShardHook = Callable[[Path, int], None]
"""Called as hook(shard_path, images_written_so_far) after each shard is in place."""


# ---------------------------------------------------------------- models and input pipeline


def feature_model(backbone: str, weights: str | os.PathLike[str] | None, input_size: int | None) -> keras.Model:
    """Raw 0..255 RGB pixels (float32, input_size x input_size x 3) -> pooled backbone features.

    Layers: Input -> `Preprocess` (the backbone's own preprocess_input) -> backbone, so the
    backbone is `model.layers[-1]`. The same graph is the start of the fine-tuned end-to-end
    model, which then needs no preprocessing outside the model.
    """
    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    base = build_backbone(backbone, weights, size)
    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="pixels")
    x = Preprocess(spec.preprocess_mode, name="preprocess")(inputs)
    outputs = base(x, training=False)
    return keras.Model(inputs, outputs, name=f"{backbone}_features")


def decode_and_resize(data: tf.Tensor, input_size: int) -> tf.Tensor:
    """JPEG bytes -> float32 RGB pixels 0..255 at input_size x input_size (bilinear, no crop).

    The one resize used for features, fine-tuning and serving, so all three see the same
    pixels. Aspect ratio is not kept (the Keras `image_dataset_from_directory` default).
    """
    image = tf.io.decode_jpeg(data, channels=3)
    image = tf.image.resize(image, (input_size, input_size), method="bilinear", antialias=False)
    return tf.cast(image, tf.float32)


def image_dataset(paths: Sequence[str | os.PathLike[str]], input_size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of float32 pixels for `paths`, in exactly that order, decoded in parallel.

    Reading and decoding run on tf.data's thread pool (`num_parallel_calls=AUTOTUNE`,
    `deterministic=True` keeps the order, which pairs each feature row with its hash);
    `prefetch` lets the next batches be prepared while the model runs.
    """
    files = tf.data.Dataset.from_tensor_slices([os.fspath(p) for p in paths])
    images = files.map(lambda path: decode_and_resize(tf.io.read_file(path), input_size),
                       num_parallel_calls=AUTOTUNE, deterministic=True)
    return images.batch(batch_size).prefetch(AUTOTUNE)


def compiled_forward(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """`model(x, training=False)` as one traced graph for any batch size.

    A fixed signature with an unknown batch dimension avoids a second trace for the last,
    smaller batch; a graph avoids per-layer Python overhead of eager calls.
    """
    size = model.input_shape[1]
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32)]

    def forward(pixels: tf.Tensor) -> tf.Tensor:
        return model(pixels, training=False)

    return tf.function(forward, input_signature=signature, autograph=False)


# ---------------------------------------------------------------- manifest


def labelled_images(data_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The images to learn from: manifest rows with status ok in a labelled split, one per sha256.

    Columns: sha256, path (absolute), label, label_index (cat=0, dog=1), split. Rows keep
    manifest order. Unlabelled and quarantined rows are never read.
    """
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise ConfigError(f"Data folder {str(data_dir)!r} has no manifest.parquet; run prepare_data on it first.")
    manifest = pd.read_parquet(manifest_path, columns=["sha256", "label", "status", "split", "arranged_path"])
    rows = manifest[(manifest["status"] == "ok") & manifest["split"].isin(SPLITS) & (manifest["arranged_path"] != "")]
    rows = rows.drop_duplicates(subset="sha256", keep="first")
    unknown = sorted(set(rows["label"]) - set(LABEL_INDEX))
    if unknown:
        raise ConfigError(f"Manifest {str(manifest_path)!r} has labels {unknown} outside {sorted(LABEL_INDEX)}; "
                          "re-run prepare_data.")
    return pd.DataFrame({
        "sha256": rows["sha256"].astype(str).to_numpy(),
        "path": [str(data_dir / rel) for rel in rows["arranged_path"]],
        "label": rows["label"].astype(str).to_numpy(),
        "label_index": rows["label"].map(LABEL_INDEX).astype("int32").to_numpy(),
        "split": rows["split"].astype(str).to_numpy(),
    })


def _check_files_exist(paths: Iterable[str]) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{len(missing)} arranged image(s) are missing, e.g. {missing[0]!r}; "
                         "re-run prepare_data to restore the arranged folders.")


# ---------------------------------------------------------------- cache


def feature_cache_dir(data_dir: str | os.PathLike[str], backbone: str, weights: str | os.PathLike[str] | None,
                      input_size: int | None) -> Path:
    """data_dir/features/<backbone>-<weights fingerprint>-<input size>: one cache per feature space.

    weights=None means the data folder's kept random draw (`random_weights_file`), so the
    cache always names weights that can be loaded again, never an unrepeatable random build.
    """
    size = resolve_input_size(backbone, input_size)
    fingerprint = weights_fingerprint(resolve_weights(data_dir, backbone, weights))
    return Path(data_dir) / "features" / f"{get_backbone(backbone).name}-{fingerprint}-{size}"


def _cache_meta(backbone: str, weights: str | os.PathLike[str] | None, input_size: int) -> dict:
    spec = get_backbone(backbone)
    return {"format": CACHE_FORMAT, "backbone": spec.name, "weights": weights_fingerprint(weights),
            "input_size": input_size, "feature_dim": spec.feature_dim, "preprocess": spec.preprocess_mode}


def _write_meta(cache_dir: Path, meta: dict) -> None:
    """meta.json says what the shards hold; written only when it changes (second runs write nothing)."""
    write_if_changed(cache_dir / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _shard_paths(cache_dir: Path) -> list[Path]:
    # Temporary files start with "." (tasks.files.atomic_path), so this never sees a half-written shard.
    return sorted(cache_dir.glob(SHARD_GLOB)) if cache_dir.is_dir() else []


def _remove_stale_temporaries(cache_dir: Path, older_than_s: float = 3600.0) -> None:
    """Delete shard temporaries left by a killed run (SIGKILL skips cleanup); young ones may be a live run's."""
    cutoff = time.time() - older_than_s
    for tmp in cache_dir.glob(".shard-*.tmp.npz"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def _read_shard_hashes(path: Path) -> np.ndarray | None:
    """The hash list of a shard, or None for an unreadable file (its images are then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            return shard["sha256"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("Ignoring unreadable feature shard %s (%s); its images will be recomputed.", path, error)
        return None


def shard_index(cache_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, int]]:
    """sha256 -> (shard file, row) over all finished shards; the first shard holding a hash wins."""
    index: dict[str, tuple[Path, int]] = {}
    for path in _shard_paths(Path(cache_dir)):
        hashes = _read_shard_hashes(path)
        for row, sha in enumerate([] if hashes is None else hashes.tolist()):
            index.setdefault(sha, (path, row))
    return index


def write_shard(cache_dir: Path, sha256s: Sequence[str], features: np.ndarray) -> Path:
    """Atomically write one shard named by the hashes it holds (so reruns and races cannot clash)."""
    if len(sha256s) != len(features):
        raise ValueError(f"{len(sha256s)} hashes for {len(features)} feature rows")
    digest = hashlib.sha256("\n".join(sha256s).encode()).hexdigest()[:16]
    target = cache_dir / f"shard-{digest}.npz"
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, sha256=np.asarray(sha256s, dtype=str), features=np.asarray(features, dtype=np.float32))
    return target


def load_features(cache_dir: str | os.PathLike[str], sha256s: Sequence[str]) -> np.ndarray:
    """Cached features for `sha256s`, rows in the given order, float32 (n, feature_dim).

    Each shard is read once, whatever the order asked for. Hashes with no cached feature
    are an error that names them, never a silent zero row.
    """
    cache_dir = Path(cache_dir)
    index = shard_index(cache_dir)
    missing = [sha for sha in sha256s if sha not in index]
    if missing:
        raise ConfigError(f"{len(missing)} image(s) have no cached features in {str(cache_dir)!r} "
                          f"(e.g. {', '.join(missing[:3])}); run extract_features first.")
    wanted: dict[Path, list[tuple[int, int]]] = {}
    for out_row, sha in enumerate(sha256s):
        path, row = index[sha]
        wanted.setdefault(path, []).append((out_row, row))
    result: np.ndarray | None = None
    for path, pairs in wanted.items():
        with np.load(path, allow_pickle=False) as shard:
            features = shard["features"]
        if result is None:
            result = np.empty((len(sha256s), features.shape[1]), dtype=np.float32)
        out_rows, rows = (np.asarray(column) for column in zip(*pairs))
        result[out_rows] = features[rows]
    if result is None:  # no hashes asked for
        dim = _meta_feature_dim(cache_dir)
        return np.empty((0, dim), dtype=np.float32)
    return result


def _meta_feature_dim(cache_dir: Path) -> int:
    meta_path = cache_dir / "meta.json"
    return int(json.loads(meta_path.read_text())["feature_dim"]) if meta_path.is_file() else 0


def load_split_features(data_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
                        split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (n, d), labels int32 (n,) with cat=0 dog=1, sha256s) for one split.

    Labels come from the manifest row of the same hash, so they cannot drift from features.
    """
    if split not in SPLITS:
        raise ConfigError(f"Split {split!r} is not a labelled split; use one of {', '.join(SPLITS)}.")
    rows = labelled_images(data_dir)
    rows = rows[rows["split"] == split]
    sha256s = rows["sha256"].tolist()
    return load_features(cache_dir, sha256s), rows["label_index"].to_numpy(dtype=np.int32), sha256s


# ---------------------------------------------------------------- extraction


def extract_features(data_dir: str | os.PathLike[str], backbone: str, weights: str | os.PathLike[str] | None,
                     input_size: int | None, batch_size: int | None = 32, shard_size: int = 512, *,
                     on_shard: ShardHook | None = None) -> dict:
    """Compute and cache features for every labelled image not cached yet; return a small summary.

    Returns {"cache_dir", "computed", "reused", "feature_dim", "images"}. With nothing to do
    it returns before building the model, so a warm run costs a manifest read and one
    hash list per shard. `batch_size=None` picks the largest batch that fits a GPU (32 on
    CPU). `on_shard` is called after each shard lands (progress reporting; tests use it to
    interrupt a run).
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size {shard_size} must be at least 1.")
    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    rows = labelled_images(data_dir)  # first: a folder without a manifest gets nothing written
    weights = resolve_weights(data_dir, backbone, weights)
    cache_dir = feature_cache_dir(data_dir, backbone, weights, size)
    cached = set(shard_index(cache_dir))
    todo = rows[~rows["sha256"].isin(cached)]
    summary = {"cache_dir": str(cache_dir), "computed": 0, "reused": len(rows) - len(todo),
               "feature_dim": spec.feature_dim, "images": len(rows)}
    if todo.empty:
        return summary
    _check_files_exist(todo["path"])
    model = feature_model(backbone, weights, size)  # before any write: a bad weights file leaves no folder
    forward = compiled_forward(model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_dir)
    _write_meta(cache_dir, _cache_meta(backbone, weights, size))
    if batch_size is None:
        batch_size = pick_batch_size(forward, size)
    summary["computed"] = write_feature_shards(forward, todo["path"].tolist(), todo["sha256"].tolist(),
                                               cache_dir, size, batch_size, shard_size, on_shard)
    logger.info("Features %s: %d computed, %d reused.", cache_dir.name, summary["computed"], summary["reused"])
    return summary


def write_feature_shards(forward: Callable[[tf.Tensor], tf.Tensor], paths: Sequence[str], sha256s: Sequence[str],
                         cache_dir: Path, input_size: int, batch_size: int, shard_size: int,
                         on_shard: ShardHook | None = None) -> int:
    """Run `forward` over `paths` batch by batch, writing a shard each time `shard_size` rows are ready.

    The streaming core of `extract_features` (public so the benchmark times exactly this
    code with a model built once). Returns the number of feature rows written.
    """
    pending: list[np.ndarray] = []
    pending_rows = 0
    written = 0
    batches = iter(image_dataset(paths, input_size, batch_size))
    for batch_number in range(-(-len(paths) // batch_size)):
        try:
            images = next(batches)
        except tf.errors.InvalidArgumentError as error:
            start = batch_number * batch_size
            names = ", ".join(os.path.basename(p) for p in paths[start:start + batch_size][:3])
            raise InputError(f"An image in the batch starting with {names} could not be decoded as JPEG "
                             f"({str(error).splitlines()[0][:120]}); re-run prepare_data.") from error
        pending.append(np.asarray(forward(images), dtype=np.float32))
        pending_rows += len(pending[-1])
        while pending_rows >= shard_size or (pending_rows and written + pending_rows == len(paths)):
            block = np.concatenate(pending)
            take = min(shard_size, len(block))
            path = write_shard(cache_dir, sha256s[written:written + take], block[:take])
            written += take
            pending, pending_rows = ([block[take:]], len(block) - take) if take < len(block) else ([], 0)
            if on_shard is not None:
                on_shard(path, written)
    return written


@task(name="extract-features")
def extract_features_task(data_dir: str, backbone: str, weights: str | None, input_size: int | None,
                          batch_size: int | None = 32, shard_size: int = 512) -> dict:
    """Prefect step: cache bottleneck features; returns the small summary dict, never arrays.

    No retries: the work is compute, not flaky I/O, and a rerun resumes from the finished
    shards anyway. No Prefect result caching either: the shard cache is the cache.
    """
    return extract_features(Path(data_dir), backbone, weights, input_size, batch_size, shard_size)
