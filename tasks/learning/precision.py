"""`--precision auto` on a CPU: bfloat16 only where it measured faster than float32, here, for this backbone.

Why measured rather than read from CPU flags: the same flags gave opposite answers. Keras'
mixed_bfloat16 ResNet50 ran at 0.36-0.77x float32 on a Xeon with avx512_bf16 and no AMX, and at
1.17-1.66x on this project's AMD EPYC with the same flag; on the EPYC it is ~1.5x on TensorFlow
and ~1.0x on JAX. So the first time a host runs a backbone at an input size on a backend,
`auto` times the backbone's compiled forward (the model extraction runs) on a few batches of
uint8 pixels, float32 and bfloat16 interleaved so that load from other processes hits both
alike, and takes bfloat16 only when its median is at least BF16_MIN_SPEEDUP times faster: noise
of a few percent must not flip the choice, and bfloat16 costs accuracy that only speed pays for.

The verdict is cached as JSON under the data folder (`DataFolder.precision_verdict`), keyed by
host (name and a hash of its CPU), backbone, input size, backend and engine (OpenVINO's CPU
plugin is timed at its own inference precisions: on AMX hosts its bfloat16 is another matter
than Keras'), and reused ever after; the
log says which precision and why, with the measured ratio. Measuring costs the other precision's
build and compile once (seconds at 224 px, a few at test sizes; the timed batches themselves are
sub-second at test sizes); bfloat16 is built last, so when it wins extraction reuses its model.
GPUs keep the rule in tasks/common/devices.py (compute capability 8.0+: bfloat16).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from tasks.common.devices import CPU_BATCH_SIZE, backend, choose_precision, cpu_flags, cpu_name
from tasks.common.files import atomic_write_json
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import get_backbone, resolve_input_size, weights_fingerprint

BF16_MIN_SPEEDUP = 1.1
"""bfloat16 is chosen only when float32's median batch time is at least this multiple of bfloat16's."""

MEASURE_BATCH = 8
"""Images per timed batch: enough for the backbone's real kernels, few enough to take seconds at 224 px."""

MEASURE_ROUNDS = 3
"""Timed batches per precision (after one untimed batch that compiles); the median is compared."""


class Measurement(BaseModel):
    """What every cached `auto` verdict records of its measurement: how, of what, where and when."""

    speedup: float
    batch: int
    rounds: int
    min_speedup: float
    backbone: str
    input_size: int
    backend: str
    host: str
    cpu: str
    measured_at: str


class PrecisionVerdict(Measurement):
    """What `auto` measured on one host for one backbone, input size and backend (the cached JSON).

    `speedup` is float32 seconds / bfloat16 seconds per batch (medians): above 1, bfloat16 is faster.
    """

    precision: Literal["bfloat16", "float32"]
    float32_s: float
    bfloat16_s: float


V = TypeVar("V", bound=Measurement)


def host_id() -> str:
    """This host as a file-name part: its name and a hash of what decides speed (CPU model, flags, cores).

    A host whose CPU or core count changes under the same name (a resized VM) measures again.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts = f"{cpu_name()}|{' '.join(sorted(cpu_flags()))}|{cores}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname())[:64] or "host"
    return f"{name}-{hashlib.sha256(facts.encode()).hexdigest()[:8]}"


def verdict_key(backbone: str, input_size: int, backend_name: str, host: str, engine: str = "keras") -> str:
    """The verdict's file name (without .json): `<host>-<backbone>-<size>-<backend>[-openvino]`."""
    key = f"{host}-{get_backbone(backbone).name}-{input_size}-{backend_name}"
    return key if engine == "keras" else f"{key}-{engine}"


def decide(float32_s: float, bfloat16_s: float, min_speedup: float = BF16_MIN_SPEEDUP) -> tuple[str, float]:
    """(precision, speedup) from the two median batch times: bfloat16 only at `min_speedup` or better."""
    speedup = float32_s / bfloat16_s
    return ("bfloat16" if speedup >= min_speedup else "float32"), speedup


def time_forwards(forwards: dict[str, Any], input_size: int, *, batch: int = MEASURE_BATCH,
                  rounds: int = MEASURE_ROUNDS) -> dict[str, float]:
    """Median seconds per batch of uint8 pixels of each forward, interleaved round by round (after one untimed batch)."""
    from tasks.learning.forward import to_numpy

    pixels = np.random.default_rng(0).integers(0, 256, (batch, input_size, input_size, 3), dtype=np.uint8)
    for forward in forwards.values():
        to_numpy(forward(pixels))  # compile before timing
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(rounds):
        for name, forward in forwards.items():
            start = time.perf_counter()
            to_numpy(forward(pixels))
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def time_precisions(backbone: str, weights: str, input_size: int, *, batch: int = MEASURE_BATCH,
                    rounds: int = MEASURE_ROUNDS, engine: str = "keras", ir_dir: str | None = None) -> dict[str, float]:
    """Median seconds per batch of the backbone's compiled forward, {"float32": s, "bfloat16": s}.

    The models are extraction's own (`cached_extractor`), built from the run's weights (on
    OpenVINO, one IR compiled at both inference precisions); float32 first, so bfloat16 is the
    one left in the cache.
    """
    from tasks.learning.extractor import cached_extractor

    forwards = {precision: cached_extractor(get_backbone(backbone).name, weights, input_size, precision,
                                            weights_fingerprint(weights), engine, ir_dir)[1]
                for precision in ("float32", "bfloat16")}
    return time_forwards(forwards, input_size, batch=batch, rounds=rounds)


def cached_verdict(path: os.PathLike[str], kind: type[V]) -> V | None:
    """The verdict in `path`, or None when there is none or it cannot be read (then it is measured again)."""
    try:
        with open(path, encoding="utf-8") as file:
            return kind.model_validate_json(file.read())
    except (OSError, ValueError, ValidationError):
        return None


def measured_precision(folder: DataFolder, backbone: str, weights: str, input_size: int | None,
                       engine: str = "keras", ir_dir: str | None = None) -> tuple[str, str]:
    """(precision, why) for `auto` on this CPU: the cached verdict, or a measurement now (then cached)."""
    size = resolve_input_size(backbone, input_size)
    host = host_id()
    path = folder.precision_verdict(verdict_key(backbone, size, backend(), host, engine))
    verdict = cached_verdict(path, PrecisionVerdict)
    when = "measured earlier on this host"
    batch = MEASURE_BATCH if engine == "keras" else CPU_BATCH_SIZE  # OpenVINO splits a batch over its requests
    if verdict is None:
        seconds = time_precisions(backbone, weights, size, batch=batch, engine=engine, ir_dir=ir_dir)
        precision, speedup = decide(seconds["float32"], seconds["bfloat16"])
        verdict = PrecisionVerdict(
            precision=precision, speedup=round(speedup, 4), float32_s=seconds["float32"],
            bfloat16_s=seconds["bfloat16"], batch=batch, rounds=MEASURE_ROUNDS, min_speedup=BF16_MIN_SPEEDUP,
            backbone=get_backbone(backbone).name, input_size=size, backend=backend(), host=host, cpu=cpu_name(),
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(path, verdict.model_dump())
        when = "measured now"
    comparison = "at least" if verdict.precision == "bfloat16" else "below"
    on = f"Keras/{verdict.backend}" if engine == "keras" else "OpenVINO"
    why = (f"CPU: bfloat16 ran {verdict.speedup:.2f}x float32 for {verdict.backbone} at {size} px on {on} "
           f"({when}, {verdict.measured_at}; {comparison} the {verdict.min_speedup:g}x that "
           f"bfloat16 must gain; cached in {path}, delete it to measure again)")
    return verdict.precision, why  # the train flow says it, once per backbone


def resolve_precision(folder: DataFolder, backbone: str, weights: str, input_size: int | None,
                      requested: str = "auto", engine: str = "keras", ir_dir: str | None = None) -> tuple[str, str]:
    """(precision, why) of one backbone's run on its engine: as configured, a GPU's rule, or measured on this CPU.

    `ir_dir` is where the OpenVINO engine's float32 IR is (or will be) kept; int8 is never chosen by auto.
    """
    return choose_precision(requested, measure=lambda: measured_precision(folder, backbone, weights, input_size,
                                                                          engine, ir_dir))
