"""Bottleneck features of a data folder: plan the shards, compute each, summarise what was done.

Why it is built this way:
- Work is cut into shards planned up front (`plan_extraction`) and saved as JSON, so any
  worker can compute any shard (`extract_shard`) from the plan's path alone. Only the
  images without cached features are planned, so a warm cache plans nothing and builds no
  model.
- There is one orchestration, run two ways: `extract_features` loops over the shards in this
  process, and the train flow maps `extract_shard` over them as Prefect tasks (on a Dask
  cluster when asked). Both plan with `plan_extraction`, run each shard with `extract_shard`
  and count with `summarise`, so the same situation reports the same numbers either way.
- Every image is counted once: computed, reused or failed. A shard that another worker had
  already written when this one reached it (Dask reschedules work freely) is reused, not
  computed, exactly like an image cached before the plan was made.
- Images are decoded by the one input pipeline (tasks/learning/pixels.py) a few batches
  ahead of the model, cross to the device as uint8, and come back once per batch; two
  batches are in flight (tasks/learning/forward.py).

The model and decoder live in extractor.py, the cache's files in shards.py, and the rule
that keeps two live workers off one shard in leases.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tasks.common.errors import ConfigError, InputError
from tasks.common.files import atomic_write_json, sha256_bytes
from tasks.common.logs import run_logger
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import get_backbone, resolve_input_size, resolve_weights, weights_fingerprint
from tasks.learning.extractor import cached_extractor, shared_decoder
from tasks.learning.leases import LEASE_STALE_S, lease_shard
from tasks.learning.pixels import resolve_decoder
from tasks.learning.shards import (
    engine_dir,
    feature_cache_dir,
    ready_cache_dir,
    shard_index,
    shard_name,
    worker_name,
    write_shard,
)

PLANS_DIR = ".plans"

ShardHook = Callable[[Path, int], None]
"""Called as hook(shard_path, images_done_so_far) after each shard is in place."""

ProgressHook = Callable[[int], None]
"""Called with the number of images finished since the last call."""


class FeatureSummary(BaseModel):
    """What extraction did for one feature space (small: it travels between tasks).

    computed + reused + failed == images.
    """

    cache_dir: str
    computed: int
    reused: int
    """Images whose features were already cached: before the plan, or by another worker since."""
    failed: int
    """Images that could not be decoded (left out of training, each with its reason in its shard)."""
    feature_dim: int
    images: int
    precision: str
    backend: str
    decoder: str
    engine: str


class ExtractionPlan(BaseModel):
    """The shards still to compute for one feature space; saved as JSON so any worker can run one."""

    cache_dir: str
    backbone: str
    weights: str
    input_size: int
    precision: str
    decoder: str
    """The image decoder that runs ("opencv" or "pillow"), part of the cache key."""
    engine: str
    """What computes the features ("keras" or "openvino"), part of the cache key."""
    feature_dim: int
    images: int
    reused: int
    shards: list[list[tuple[str, str]]]
    view: str = "plain"
    """"plain", or "flip" for the mirrored images' features (`--tta flip`), part of the cache key."""
    """Per shard: (sha256, absolute path) of its images, in sha256 order."""
    plan_path: str = ""

    @property
    def todo(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def ref(self) -> PlanRef:
        """The plan without its image list: what travels between Prefect tasks."""
        return PlanRef(plan_path=self.plan_path, shards=len(self.shards), cache_dir=self.cache_dir,
                       images=self.images, reused=self.reused, feature_dim=self.feature_dim,
                       precision=self.precision, decoder=self.decoder, engine=self.engine, todo=self.todo)


class PlanRef(BaseModel):
    """Where an extraction plan is saved and how many shards it has (the plan itself stays on disk)."""

    plan_path: str
    shards: int
    cache_dir: str
    images: int
    reused: int
    feature_dim: int
    precision: str
    decoder: str
    engine: str
    todo: int


def plan_extraction(folder: DataFolder, backbone: str, weights: str | os.PathLike[str] | None,
                    input_size: int | None, precision: str = "float32", shard_size: int = 512,
                    decoder: str = "auto", engine: str = "keras", view: str = "plain") -> ExtractionPlan:
    """Which images of the labelled splits still need features, cut into shards of `shard_size`.

    Images that failed to decode before are planned again (their file may have been repaired).
    Nothing is written until there is work: a warm cache costs one index read. `decoder` is
    resolved here, so every worker decodes the plan's images the same way. On OpenVINO the
    IR is made here too (converted, or for int8 quantized on train images), before any shard
    runs, so every worker reads the same one.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size {shard_size} must be at least 1.")
    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    rows = folder.labelled_rows()  # first: a folder without a manifest gets nothing written
    weights = resolve_weights(folder, backbone, weights)
    decoder = resolve_decoder(decoder)
    cache_dir = feature_cache_dir(folder, backbone, weights, size, precision, decoder, engine, view)
    index = shard_index(cache_dir)
    todo = rows[~rows["sha256"].isin(list(index.rows))]
    pairs = list(zip(todo["sha256"], todo["path"]))
    shards = [pairs[start:start + shard_size] for start in range(0, len(pairs), shard_size)]
    plan = ExtractionPlan(cache_dir=str(cache_dir), backbone=spec.name, weights=weights, input_size=size,
                          precision=precision, decoder=decoder, engine=engine, feature_dim=spec.feature_dim,
                          images=len(rows), reused=len(rows) - len(todo), shards=shards, view=view)
    if shards:
        missing = [path for _, path in pairs if not os.path.isfile(path)]
        if missing:
            raise InputError(f"{len(missing)} arranged image(s) are missing, e.g. {missing[0]!r}; "
                             "run prepare_data (python -m flows.prepare) again to restore the arranged folders.")
        if engine == "openvino" and precision == "int8":
            from tasks.learning.quantize import quantized_feature_ir

            quantized_feature_ir(folder, spec.name, weights, size, decoder, cache_dir, view)
        # a bad weights file fails here; on OpenVINO the IR is converted here, once, for every worker
        cached_extractor(spec.name, weights, size, precision, weights_fingerprint(weights), engine,
                         str(engine_dir(cache_dir)), view)
        ready_cache_dir(cache_dir, backbone, weights, size, precision, decoder, engine, view)
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
                                  weights_fingerprint(plan.weights), plan.engine, str(engine_dir(cache_dir)), plan.view)
    if batch_size is None:
        batch_size = pick_batch_size(forward, plan.input_size)
    decoder = shared_decoder(plan.input_size, batch_size, decode_workers, plan.decoder)
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


def summarise(plan: PlanRef, results: Sequence[ShardResult]) -> FeatureSummary:
    """The one count of a plan's run, whichever runner ran its shards and in whatever order they finished.

    A shard found already written (by another worker, or before a restart) adds its images
    with features to `reused`, as the images cached before the plan are.
    """
    from tasks.common.devices import backend

    reused = plan.reused + sum(result.images - result.failed for result in results if result.reused)
    return FeatureSummary(cache_dir=plan.cache_dir, computed=sum(result.computed for result in results),
                          reused=reused, failed=sum(result.failed for result in results),
                          feature_dim=plan.feature_dim, images=plan.images, precision=plan.precision,
                          backend=backend(), decoder=plan.decoder, engine=plan.engine)


def extract_features(folder: DataFolder | str | os.PathLike[str], backbone: str,
                     weights: str | os.PathLike[str] | None, input_size: int | None, batch_size: int | None = 32,
                     shard_size: int = 512, *, precision: str = "float32", decoder: str = "auto",
                     engine: str = "keras", decode_workers: int | None = None,
                     on_shard: ShardHook | None = None, on_progress: ProgressHook | None = None) -> FeatureSummary:
    """Compute and cache features for every labelled image not cached yet, shard after shard, in this process.

    `batch_size=None` picks the largest batch that fits a GPU (32 on CPU). `on_shard` is
    called after each shard lands; `on_progress` after each batch. With nothing to do it
    returns before building the model, so a warm run costs a manifest read and an index read.
    (The train flow maps `extract_shard` over the plan as Prefect tasks instead, so the shards
    can run on a Dask cluster; both count with `summarise`.)
    """
    folder = folder if isinstance(folder, DataFolder) else DataFolder.at(folder)
    plan = plan_extraction(folder, backbone, weights, input_size, precision, shard_size, decoder, engine)
    results: list[ShardResult] = []
    done = 0
    for index in range(len(plan.shards)):
        result = extract_shard(plan, index, batch_size, decode_workers=decode_workers, on_progress=on_progress)
        results.append(result)
        done += len(plan.shards[index])
        if on_shard is not None:
            on_shard(Path(result.shard), done)
    summary = summarise(plan.ref(), results)
    if plan.shards:
        run_logger(__name__).info("Features %s: %d computed, %d reused, %d failed.", Path(plan.cache_dir).name,
                                  summary.computed, summary.reused, summary.failed)
    return summary
