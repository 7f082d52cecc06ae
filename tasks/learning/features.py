"""Bottleneck features: a frozen backbone streamed over the arranged images, cached by content.

Why it is built this way:
- The cache key is the feature space, (backbone, weights fingerprint, input size, precision,
  Keras backend), for the folder, and the image sha256 inside it: a second run computes
  nothing, 10% new images cost about 10%, and features of different precision or backend
  never mix.
- Work is cut into shards planned up front (`plan_extraction`), each computed by
  `extract_shard` and written atomically under a name made of the hashes it holds. Shards
  computed anywhere (another process, another Dask worker) merge by construction, a killed
  run keeps every finished shard, and no reader ever sees half of one.
- Images are decoded by the one input pipeline (tasks/learning/pixels.py) a few batches
  ahead of the model, cross to the device as uint8, and come back once per batch; two
  batches are in flight (tasks/learning/forward.py).
- Two live workers never compute the same shard: the one computing it holds a lease, a file
  created with O_EXCL beside the shard and touched every LEASE_HEARTBEAT_S. Another worker
  that is handed the same shard (Dask reschedules work freely) waits for the shard instead,
  and reuses it. A lease whose holder died (its process is gone, on this host; or no
  heartbeat for LEASE_STALE_S, from anywhere) is broken and the shard computed again, so a
  worker killed mid-shard costs exactly that shard. O_EXCL and rename are atomic on local
  filesystems and on NFSv3+, which is what "storage all workers see" must provide.
- A shard that fails its integrity check (bit rot, truncation) is set aside as
  `.corrupt-<name>` with a warning and its images are computed again. An image that cannot
  be decoded is recorded in its shard with the reason and left out of training, never
  failing the batch or the run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tasks.common.errors import ConfigError, InputError
from tasks.common.files import atomic_path, atomic_write_json, sha256_bytes, write_if_changed
from tasks.common.logs import run_logger
from tasks.common.processes import ProcessId, host_id
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import (
    build_backbone,
    get_backbone,
    resolve_input_size,
    resolve_weights,
    weights_fingerprint,
)
from tasks.learning.pixels import Decoder

CACHE_FORMAT = 2
"""Version of the shard layout, recorded in each cache's meta.json (2: uint8 pipeline, failures kept)."""

SHARD_GLOB = "shard-*.npz"
PLANS_DIR = ".plans"

LEASE_HEARTBEAT_S = 10.0
"""How often the worker computing a shard touches its lease."""

LEASE_STALE_S = 120.0
"""A lease not touched for this long belongs to a dead (or frozen) worker and may be broken.

Twelve missed heartbeats: long enough for a stalled NFS client or a stop-the-world pause,
short next to the minutes a large shard takes. On the holder's own host a dead holder is
seen at once (its pid is gone), so only a worker lost with its host costs the full wait.
"""

LEASE_POLL_S = 0.5
"""How often a worker waiting for another's shard looks again."""

ShardHook = Callable[[Path, int], None]
"""Called as hook(shard_path, images_done_so_far) after each shard is in place."""

ProgressHook = Callable[[int], None]
"""Called with the number of images finished since the last call."""


class FeatureSummary(BaseModel):
    """What `extract_features` did for one feature space (small: it travels between tasks)."""

    cache_dir: str
    computed: int
    reused: int
    failed: int
    """Images that could not be decoded (left out of training, each with its reason in its shard)."""
    feature_dim: int
    images: int
    precision: str
    backend: str


# ---------------------------------------------------------------- models


def feature_model(backbone: str, weights: str | os.PathLike[str] | None, input_size: int | None,
                  precision: str = "float32") -> Any:
    """uint8 RGB pixels (input_size x input_size x 3) -> pooled backbone features.

    Layers: Input (uint8) -> `Preprocess` (the backbone's own preprocess_input, float32) ->
    backbone (at `precision`), so the backbone is `model.layers[-1]`. The same graph starts the
    end-to-end model, which therefore needs no preprocessing outside the model either.
    """
    import keras

    from tasks.learning.preprocess import Preprocess

    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    base = build_backbone(backbone, weights, size, precision)
    inputs = keras.Input(shape=(size, size, 3), dtype="uint8", name="pixels")
    x = Preprocess(spec.preprocess_mode, name="preprocess")(inputs)
    outputs = base(x, training=False)
    return keras.Model(inputs, outputs, name=f"{backbone}_features")


@functools.lru_cache(maxsize=1)
def cached_extractor(backbone: str, weights: str, size: int, precision: str, fingerprint: str) -> tuple[Any, Any]:
    """(model, compiled forward), built once per process and feature space (Dask workers reuse it)."""
    from tasks.learning.forward import compiled_forward

    model = feature_model(backbone, weights, size, precision)
    return model, compiled_forward(model)


_DECODER: dict[tuple, Decoder] = {}
_DECODER_LOCK = threading.Lock()


def shared_decoder(size: int, batch_size: int, workers: int | None = None) -> Decoder:
    """One decoder per process (its worker processes are expensive to start), replaced on a new shape."""
    key = (size, batch_size, workers)
    with _DECODER_LOCK:
        if key not in _DECODER:
            for old in _DECODER.values():
                old.close()
            _DECODER.clear()
            _DECODER[key] = Decoder(size, batch_size, workers=workers)
        return _DECODER[key]


def close_decoders() -> None:
    """Stop the shared decoder's workers (tests, and the end of a flow run)."""
    with _DECODER_LOCK:
        for decoder in _DECODER.values():
            decoder.close()
        _DECODER.clear()


# ---------------------------------------------------------------- the cache


def cache_key(backbone: str, weights_id: str, input_size: int, precision: str, backend: str) -> str:
    """The folder name of one feature space: `<backbone>-<weights>-<size>-<precision>-<backend>`."""
    return f"{get_backbone(backbone).name}-{weights_id}-{input_size}-{precision}-{backend}"


def feature_cache_dir(folder: DataFolder, backbone: str, weights: str | os.PathLike[str] | None,
                      input_size: int | None, precision: str = "float32") -> Path:
    """data_dir/features/<cache key>: one cache per feature space.

    weights=None means the data folder's kept random draw (`random_weights_file`), so the
    cache always names weights that can be loaded again, never an unrepeatable random build.
    """
    from tasks.common.devices import backend

    size = resolve_input_size(backbone, input_size)
    fingerprint = weights_fingerprint(resolve_weights(folder, backbone, weights))
    return folder.feature_cache(cache_key(backbone, fingerprint, size, precision, backend()))


def _cache_meta(backbone: str, weights: str, input_size: int, precision: str) -> dict:
    from tasks.common.devices import backend

    spec = get_backbone(backbone)
    return {"format": CACHE_FORMAT, "backbone": spec.name, "weights": weights_fingerprint(weights),
            "input_size": input_size, "feature_dim": spec.feature_dim, "preprocess": spec.preprocess_mode,
            "precision": precision, "backend": backend()}


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


# ---------------------------------------------------------------- leases: one live worker per shard


def lease_path(shard: Path) -> Path:
    """The lease file of a shard: hidden (no shard glob sees it), beside the shard on the shared storage."""
    return shard.with_name(f".lease-{shard.stem}.json")


class LeaseHolder(BaseModel):
    """Who holds a lease, written into the lease file (read by the workers that wait, and by people)."""

    host: str
    pid: int
    worker: str
    token: str
    since: float


def read_lease(path: Path) -> LeaseHolder | None:
    """The lease's holder; None when there is no lease or its holder has not written it yet."""
    try:
        return LeaseHolder.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def lease_is_stale(path: Path, stale_s: float = LEASE_STALE_S) -> str | None:
    """Why the lease at `path` may be broken (its holder is dead or silent), or None while it holds."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_lease(path)
    death = ProcessId(host=holder.host, pid=holder.pid, started="", boot="").death() if holder else None
    if death:
        return f"its holder {holder.worker} is dead ({death})"
    if age > stale_s:
        who = holder.worker if holder else "a worker that never wrote its name"
        return f"{who} has not renewed it for {age:.0f} s"
    return None


class ShardLease:
    """The right to compute one shard, held while it is computed and renewed by a heartbeat thread.

    `acquire` creates the lease file with O_EXCL, so of any number of workers exactly one
    gets it. `break_stale` removes a stale lease under a second O_EXCL file, and only the
    very lease that was judged stale (same inode, same mtime), so two workers breaking it
    at once cannot break the fresh lease a third has just taken.
    """

    def __init__(self, path: Path, holder: LeaseHolder, heartbeat_s: float) -> None:
        self.path, self.holder, self.heartbeat_s = path, holder, heartbeat_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}", daemon=True)

    @classmethod
    def acquire(cls, path: Path, worker: str, heartbeat_s: float = LEASE_HEARTBEAT_S) -> ShardLease | None:
        holder = LeaseHolder(host=host_id(), pid=os.getpid(), worker=worker, token=uuid.uuid4().hex,
                             since=time.time())
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as handle:
            handle.write(holder.model_dump_json())
        lease = cls(path, holder, heartbeat_s)
        lease._thread.start()
        return lease

    @staticmethod
    def break_stale(path: Path, stale_s: float = LEASE_STALE_S) -> str | None:
        """Remove the lease at `path` if it is stale; the reason when this call removed it."""
        try:
            seen = path.stat()
        except FileNotFoundError:
            return None
        reason = lease_is_stale(path, stale_s)
        if reason is None:
            return None
        breaker = path.with_name(path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # a breaker that died within the last few lines
                if time.time() - breaker.stat().st_mtime > stale_s:
                    breaker.unlink()
            return None
        os.close(fd)
        try:
            now = path.stat()
            if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
                return None  # renewed or replaced meanwhile: not the lease judged stale
            path.unlink()
            return reason
        except FileNotFoundError:
            return None
        finally:
            breaker.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_lease(self.path)
            if holder is None or holder.token != self.holder.token:
                self.lost.set()  # broken as stale (this process was frozen): the shard may be computed twice
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this one."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost.is_set():
            run_logger(__name__).warning(
                "The lease %s was broken while this worker (%s) held it, so another worker may have computed the "
                "same shard; raise LEASE_STALE_S if workers freeze this long.", self.path, self.holder.worker)
        holder = read_lease(self.path)
        if holder is not None and holder.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def lease_shard(target: Path, worker: str, *, stale_s: float = LEASE_STALE_S, heartbeat_s: float = LEASE_HEARTBEAT_S,
                poll_s: float = LEASE_POLL_S) -> tuple[ShardLease | None, Shard | None]:
    """(the lease, None) once this worker may compute `target`, or (None, the shard) once another wrote it.

    Waits as long as another live worker holds the lease; breaks it when its holder has died.
    """
    path = lease_path(target)
    waiting_for: str | None = None
    while True:
        existing = read_shard(target) if target.exists() else None
        if existing is not None:
            return None, existing
        lease = ShardLease.acquire(path, worker, heartbeat_s)
        if lease is not None:
            existing = read_shard(target) if target.exists() else None  # written just before our lease
            if existing is not None:
                lease.release()
                return None, existing
            return lease, None
        reason = ShardLease.break_stale(path, stale_s)
        if reason is not None:
            run_logger(__name__).warning("Shard %s: lease broken (%s); computing it here.", target.name, reason)
            continue
        holder = read_lease(path)
        if holder is not None and holder.worker != waiting_for:
            waiting_for = holder.worker
            run_logger(__name__).info("Shard %s is being computed by %s; waiting for it.", target.name,
                                      holder.worker)
        time.sleep(poll_s)


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


def load_split_features(folder: DataFolder, cache_dir: str | os.PathLike[str],
                        split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (n, d), labels int32 (n,) with cat=0 dog=1, sha256s) of one split.

    Rows come from the data folder's one reader (sha256 order); labels come from the manifest
    row of the same hash, so they cannot drift from features. Images that failed to decode
    are left out with a warning naming how many.
    """
    rows = folder.split_rows(split)
    index = shard_index(cache_dir)
    failed = rows["sha256"].isin(list(index.failed))
    if failed.any():
        run_logger(__name__).warning("%d %s image(s) could not be decoded and are left out, e.g. %s (%s).",
                                     int(failed.sum()), split, rows.loc[failed, "path"].iloc[0],
                                     index.failed[rows.loc[failed, "sha256"].iloc[0]])
        rows = rows[~failed]
    sha256s = rows["sha256"].tolist()
    return load_features(cache_dir, sha256s, index), rows["y"].to_numpy(dtype=np.int32), sha256s


# ---------------------------------------------------------------- planning and computing


class ExtractionPlan(BaseModel):
    """The shards still to compute for one feature space; saved as JSON so any worker can run one."""

    cache_dir: str
    backbone: str
    weights: str
    input_size: int
    precision: str
    feature_dim: int
    images: int
    reused: int
    shards: list[list[tuple[str, str]]]
    """Per shard: (sha256, absolute path) of its images, in sha256 order."""
    plan_path: str = ""

    @property
    def todo(self) -> int:
        return sum(len(shard) for shard in self.shards)


def plan_extraction(folder: DataFolder, backbone: str, weights: str | os.PathLike[str] | None,
                    input_size: int | None, precision: str = "float32", shard_size: int = 512) -> ExtractionPlan:
    """Which images of the labelled splits still need features, cut into shards of `shard_size`.

    Images that failed to decode before are planned again (their file may have been repaired).
    Nothing is written until there is work: a warm cache costs one index read.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size {shard_size} must be at least 1.")
    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    rows = folder.labelled_rows()  # first: a folder without a manifest gets nothing written
    weights = resolve_weights(folder, backbone, weights)
    cache_dir = feature_cache_dir(folder, backbone, weights, size, precision)
    index = shard_index(cache_dir)
    todo = rows[~rows["sha256"].isin(list(index.rows))]
    pairs = list(zip(todo["sha256"], todo["path"]))
    shards = [pairs[start:start + shard_size] for start in range(0, len(pairs), shard_size)]
    plan = ExtractionPlan(cache_dir=str(cache_dir), backbone=spec.name, weights=weights, input_size=size,
                          precision=precision, feature_dim=spec.feature_dim, images=len(rows),
                          reused=len(rows) - len(todo), shards=shards)
    if shards:
        missing = [path for _, path in pairs if not os.path.isfile(path)]
        if missing:
            raise InputError(f"{len(missing)} arranged image(s) are missing, e.g. {missing[0]!r}; "
                             "run prepare_data (python -m flows.prepare) again to restore the arranged folders.")
        cached_extractor(spec.name, weights, size, precision, weights_fingerprint(weights))  # a bad weights file fails here
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(cache_dir)
        write_if_changed(cache_dir / "meta.json",
                         (json.dumps(_cache_meta(backbone, weights, size, precision), indent=2, sort_keys=True)
                          + "\n").encode())
        payload = plan.model_dump_json()
        plan_path = cache_dir / PLANS_DIR / f"plan-{sha256_bytes(payload.encode())[:16]}.json"
        atomic_write_json(plan_path, json.loads(payload))
        plan = plan.model_copy(update={"plan_path": str(plan_path)})
    return plan


def load_plan(plan_path: str | os.PathLike[str]) -> ExtractionPlan:
    return ExtractionPlan.model_validate_json(Path(plan_path).read_text()).model_copy(
        update={"plan_path": str(plan_path)})


class ShardResult(BaseModel):
    shard: str
    images: int
    computed: int
    failed: int
    worker: str
    reused: bool
    """True when the shard was already there (computed by another worker, or before a restart)."""


def extract_shard(plan: ExtractionPlan, index: int, batch_size: int | None = 32, *,
                  decode_workers: int | None = None, on_progress: ProgressHook | None = None,
                  lease_stale_s: float = LEASE_STALE_S) -> ShardResult:
    """Compute and write shard `index` of the plan (or find it already written, or wait for the worker writing it).

    The lease (see `lease_shard`) makes this safe to run for the same shard on any number of
    workers at once: one computes, the others wait and reuse its file.
    """
    cache_dir = Path(plan.cache_dir)
    pairs = plan.shards[index]
    name = shard_name([sha for sha, _ in pairs])
    target = cache_dir / name
    lease, existing = lease_shard(target, worker_name(), stale_s=lease_stale_s)
    if existing is not None:
        if on_progress:
            on_progress(len(pairs))
        return ShardResult(shard=str(target), images=len(pairs), computed=0, failed=len(existing.failed),
                           worker=existing.worker, reused=True)
    try:
        return _compute_shard(plan, pairs, target, batch_size, decode_workers, on_progress)
    finally:
        lease.release()


def _compute_shard(plan: ExtractionPlan, pairs: list[tuple[str, str]], target: Path, batch_size: int | None,
                   decode_workers: int | None, on_progress: ProgressHook | None) -> ShardResult:
    from tasks.common.devices import pick_batch_size
    from tasks.learning.forward import run_ahead

    cache_dir, name = target.parent, target.name
    _, forward = cached_extractor(plan.backbone, plan.weights, plan.input_size, plan.precision,
                            weights_fingerprint(plan.weights))
    if batch_size is None:
        batch_size = pick_batch_size(forward, plan.input_size)
    decoder = shared_decoder(plan.input_size, batch_size, decode_workers)
    sha256s = [sha for sha, _ in pairs]
    features = np.empty((len(pairs), plan.feature_dim), dtype=np.float32)
    ok = np.ones(len(pairs), dtype=bool)
    failed: dict[str, str] = {}
    for batch, outputs in run_ahead(forward, decoder.batches([path for _, path in pairs]), lambda b: b.pixels):
        features[batch.start:batch.start + len(outputs)] = outputs
        for row, error in enumerate(batch.errors):
            if error:
                ok[batch.start + row] = False
                failed[sha256s[batch.start + row]] = error
                run_logger(__name__).warning("Cannot use %s: %s.", pairs[batch.start + row][1], error)
        if on_progress:
            on_progress(len(outputs))
    kept = [sha for sha, good in zip(sha256s, ok) if good]
    path = write_shard(cache_dir, kept, features[ok], failed, name=name)
    return ShardResult(shard=str(path), images=len(pairs), computed=len(kept), failed=len(failed),
                       worker=worker_name(), reused=False)


def extract_features(folder: DataFolder | str | os.PathLike[str], backbone: str,
                     weights: str | os.PathLike[str] | None, input_size: int | None, batch_size: int | None = 32,
                     shard_size: int = 512, *, precision: str = "float32", decode_workers: int | None = None,
                     on_shard: ShardHook | None = None, on_progress: ProgressHook | None = None) -> FeatureSummary:
    """Compute and cache features for every labelled image not cached yet, shard after shard, in this process.

    `batch_size=None` picks the largest batch that fits a GPU (32 on CPU). `on_shard` is
    called after each shard lands; `on_progress` after each batch. With nothing to do it
    returns before building the model, so a warm run costs a manifest read and an index read.
    (The train flow maps `extract_shard` over the plan as Prefect tasks instead, so the shards
    can run on a Dask cluster.)
    """
    from tasks.common.devices import backend

    folder = folder if isinstance(folder, DataFolder) else DataFolder.at(folder)
    plan = plan_extraction(folder, backbone, weights, input_size, precision, shard_size)
    computed = failed = done = 0
    for index in range(len(plan.shards)):
        result = extract_shard(plan, index, batch_size, decode_workers=decode_workers, on_progress=on_progress)
        computed += result.computed
        failed += result.failed
        done += len(plan.shards[index])
        if on_shard is not None:
            on_shard(Path(result.shard), done)
    if plan.shards:
        run_logger(__name__).info("Features %s: %d computed, %d reused, %d failed.", Path(plan.cache_dir).name,
                                  computed, plan.reused, failed)
    return FeatureSummary(cache_dir=plan.cache_dir, computed=computed, reused=plan.reused, failed=failed,
                          feature_dim=plan.feature_dim, images=plan.images, precision=precision, backend=backend())
