"""`--engine auto`: OpenVINO only where it measured faster than Keras, here, for this backbone.

Why measured, like `--precision auto` (tasks/learning/precision.py, whose host key and
timing this shares): OpenVINO's gain over Keras ranged from 1.0x to 3.4x by backbone and
CPU in the issue's measurements, and a GPU runs Keras faster than any CPU plugin. So on a
GPU `auto` is Keras by rule; on a CPU the first run of a backbone at an input size on a
backend times the Keras forward against the OpenVINO IR (both at float32, like for like,
interleaved so that other processes' load hits both alike) and takes OpenVINO when it is
at least OPENVINO_MIN_SPEEDUP faster. The IR converted for the measurement is the one a
winning OpenVINO then extracts with (it lives in that feature cache's folder), so winning
costs no second conversion. The verdict is cached as JSON (`DataFolder.engine_verdict`) and
reused ever after; the log says which engine and why, with the measured ratio. Where OpenVINO
is not installed, `auto` is Keras and says so; `--engine openvino` then stops in one sentence.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from tasks.common.devices import CPU_BATCH_SIZE, backend, cpu_name, gpus
from tasks.common.errors import ConfigError
from tasks.common.files import atomic_write_json
from tasks.common.logs import run_logger
from tasks.data.datafolder import DataFolder
from tasks.learning import openvino_engine
from tasks.learning.backbones import get_backbone, resolve_input_size, weights_fingerprint
from tasks.learning.precision import (
    MEASURE_ROUNDS,
    Measurement,
    cached_verdict,
    host_id,
    time_forwards,
    verdict_key,
)

OPENVINO_MIN_SPEEDUP = 1.1
"""OpenVINO is chosen only when Keras' median batch time is at least this multiple of OpenVINO's."""

MEASURE_BATCH = CPU_BATCH_SIZE
"""Images per timed batch: extraction's own CPU batch. At 8 images OpenVINO's two infer requests get 4 each and
the ratio swung from 0.8x to 1.4x between runs on a loaded 2-core host (MobileNetV2, 224 px); at 32 it held at
2.3-2.7x."""


class EngineVerdict(Measurement):
    """What `auto` measured on one host for one backbone, input size and backend (the cached JSON).

    `speedup` is Keras seconds / OpenVINO seconds per batch (medians, both float32): above 1, OpenVINO is faster.
    """

    engine: Literal["keras", "openvino"]
    keras_s: float
    openvino_s: float


def decide(keras_s: float, openvino_s: float, min_speedup: float = OPENVINO_MIN_SPEEDUP) -> tuple[str, float]:
    """(engine, speedup) from the two median batch times: OpenVINO only at `min_speedup` or better."""
    speedup = keras_s / openvino_s
    return ("openvino" if speedup >= min_speedup else "keras"), speedup


def time_engines(backbone: str, weights: str, input_size: int, ir_dir: str) -> dict[str, float]:
    """Median seconds per batch of the Keras forward and the OpenVINO IR in `ir_dir` (converted there if new), float32."""
    from tasks.learning.extractor import cached_extractor

    name, fingerprint = get_backbone(backbone).name, weights_fingerprint(weights)
    forwards = {engine: cached_extractor(name, weights, input_size, "float32", fingerprint, engine, ir_dir)[1]
                for engine in ("keras", "openvino")}
    return time_forwards(forwards, input_size, batch=MEASURE_BATCH)


def measured_engine(folder: DataFolder, backbone: str, weights: str, input_size: int | None,
                    ir_dir: str) -> tuple[str, str]:
    """(engine, why) for `auto` on this CPU: the cached verdict, or a measurement now (then cached)."""
    size = resolve_input_size(backbone, input_size)
    host = host_id()
    path = folder.engine_verdict(verdict_key(backbone, size, backend(), host))
    verdict = cached_verdict(path, EngineVerdict)
    when = "measured earlier on this host"
    if verdict is None:
        seconds = time_engines(backbone, weights, size, ir_dir)
        engine, speedup = decide(seconds["keras"], seconds["openvino"])
        verdict = EngineVerdict(
            engine=engine, speedup=round(speedup, 4), keras_s=seconds["keras"], openvino_s=seconds["openvino"],
            batch=MEASURE_BATCH, rounds=MEASURE_ROUNDS, min_speedup=OPENVINO_MIN_SPEEDUP,
            backbone=get_backbone(backbone).name, input_size=size, backend=backend(), host=host, cpu=cpu_name(),
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(path, verdict.model_dump())
        when = "measured now"
    comparison = "at least" if verdict.engine == "openvino" else "below"
    why = (f"CPU: OpenVINO ran {verdict.speedup:.2f}x Keras/{verdict.backend} for {verdict.backbone} at {size} px "
           f"({when}, {verdict.measured_at}; {comparison} the {verdict.min_speedup:g}x that OpenVINO must gain; "
           f"cached in {path}, delete it to measure again)")
    run_logger(__name__).info("Engine %s: %s.", verdict.engine, why)
    return verdict.engine, why


def resolve_engine(folder: DataFolder, backbone: str, weights: str, input_size: int | None, requested: str,
                   ir_dir: str, *, gpu_list: tuple | None = None) -> tuple[str, str]:
    """(engine, why) of one backbone's run: as configured, Keras on a GPU or without OpenVINO, or measured on this CPU."""
    if requested not in ("auto", *openvino_engine.ENGINES):
        raise ConfigError(f"engine {requested!r} is unknown; use auto, keras or openvino (--engine).")
    if requested == "openvino":
        openvino_engine.require("--engine openvino")
    if requested != "auto":
        return requested, f"{requested} as configured"
    found = gpus() if gpu_list is None else gpu_list
    if found:
        return "keras", f"GPU {found[0][0]}: Keras runs the backbone there (OpenVINO's engine here is its CPU plugin)"
    if not openvino_engine.installed():
        return "keras", f"OpenVINO is not installed here ({openvino_engine.INSTALL_HINT})"
    return measured_engine(folder, backbone, weights, input_size, ir_dir)
