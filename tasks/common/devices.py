"""Hardware and backend facts: which Keras backend runs, on which device, at which precision.

The compute path runs on any Keras 3 backend (TensorFlow by default, JAX and PyTorch too),
so nothing here imports TensorFlow unless TensorFlow is the backend. CI has no GPU: the GPU
branches are correct by construction and measured on a lent GPU host (benchmarks/).

Precision: `--precision bfloat16|float32` is taken as given and nothing is measured. Under
"auto" an NVIDIA GPU of compute capability 8.0 or newer (Ampere and later, whose tensor cores
run bfloat16 at several times float32) computes in bfloat16 and an older one in float32, by
rule. On a CPU no rule holds: flags do not predict it (bfloat16 ResNet50 measured 0.36-0.77x
float32 on a Xeon with avx512_bf16 and no AMX, 1.17-1.66x on this project's AMD EPYC with
avx512_bf16; it also differs between TensorFlow and JAX), so "auto" asks `measure`, which
tasks/learning/precision.py supplies: it times the backbone both ways once per host and caches
the verdict. The chosen precision is part of every feature-cache key and logged parameter, so
features of different precision never mix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.results import DeviceSetup

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 32
"""Batch size on CPU: larger batches do not make a CPU faster, they only cost memory."""

POLICIES = {"bfloat16": "mixed_bfloat16", "float32": "float32"}
"""Keras dtype policy per precision (mixed: bf16 compute, float32 variables)."""

_POLICY_LOCK = threading.RLock()


def backend() -> str:
    """The Keras backend of this process ("tensorflow", "jax", "torch")."""
    import keras

    return keras.config.backend()


def keras_without_tensorflow() -> None:
    """Off the TensorFlow backend, keep Keras from importing TensorFlow only to look for it.

    Where TensorFlow is installed, Keras imports it whatever the backend, to seed it
    (`keras.utils.set_random_seed`) and to recognise its types when a model is saved: ~9 CPU-seconds
    and several hundred MB in a process that computes on JAX, and a process that behaves unlike
    the GPU hosts, which have no TensorFlow. Keras asks its lazy `tensorflow` module whether it is
    available; this answers no for it, as if TensorFlow were not installed. Nothing changes on the
    TensorFlow backend, or once TensorFlow was imported anyway (by the caller's own code).
    """
    import sys

    if backend() == "tensorflow" or "tensorflow" in sys.modules:
        return
    from keras.src.utils import module_utils

    lazy = getattr(module_utils, "tensorflow", None)
    if lazy is not None and getattr(lazy, "module", None) is None:
        lazy._available = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the backend (Keras' global seed generator): one seed makes a fit reproducible.

    `keras.utils.set_random_seed`, without the TensorFlow import it would make on other backends.
    """
    import keras

    keras_without_tensorflow()
    keras.utils.set_random_seed(int(seed))


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[tuple[str, tuple[int, int] | None], ...]:
    """(name, compute capability) of each visible GPU, asked of the backend in use."""
    name = backend()
    if name == "jax":
        import jax

        found = []
        for device in jax.devices():
            if device.platform != "gpu":
                continue
            capability = getattr(device, "compute_capability", None)
            major_minor = tuple(int(part) for part in str(capability).split(".")[:2]) if capability else None
            found.append((device.device_kind, major_minor))
        return tuple(found)
    if name == "torch":
        import torch

        return tuple((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                     for i in range(torch.cuda.device_count()))
    import tensorflow as tf

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        _enable_memory_growth(tf, device)
        details = tf.config.experimental.get_device_details(device)
        found.append((details.get("device_name", device.name), details.get("compute_capability")))
    return tuple(found)


def _enable_memory_growth(tf: Any, device: Any) -> None:
    """Keep TensorFlow from grabbing the whole card (other processes and a second model need it)."""
    try:
        tf.config.experimental.set_memory_growth(device, True)
    except RuntimeError:
        # Raised once the GPU is initialised: the setting from the first call still holds.
        logger.debug("Memory growth already fixed for %s.", device.name)


def choose_precision(requested: str = "auto", *, gpu_list: tuple | None = None,
                     measure: Callable[[], tuple[str, str]] | None = None) -> tuple[str, str]:
    """(precision, why) for `requested` "auto", "bfloat16" or "float32" on this hardware.

    A forced precision and a GPU's rule need no measurement; a CPU's "auto" is `measure()`
    (float32 when there is nothing to measure with).
    """
    if requested in ("bfloat16", "float32", "int8"):
        return requested, f"{requested} as configured"
    if requested != "auto":
        from tasks.common.errors import ConfigError

        raise ConfigError(f"precision {requested!r} is unknown; use auto, bfloat16, float32 or int8 (--precision).")
    found = gpus() if gpu_list is None else gpu_list
    if found:
        capabilities = [capability for _, capability in found]
        if all(capability is not None and tuple(capability) >= (8, 0) for capability in capabilities):
            return "bfloat16", f"GPU {found[0][0]} has bfloat16 (compute capability {found[0][1]})"
        return "float32", f"GPU {found[0][0]} lacks fast bfloat16 (compute capability below 8.0)"
    if measure is None:
        return "float32", "CPU: float32 until bfloat16 is measured against it for a backbone"
    return measure()


def configure_devices(precision: str = "auto", *,
                      measure: Callable[[], tuple[str, str]] | None = None) -> DeviceSetup:
    """What this process computes on: backend, device, precision (and GPU memory growth on TensorFlow).

    On a CPU, "auto" is decided by `measure` (see `choose_precision`); the train flow decides it
    per backbone (tasks/learning/precision.py) and records the chosen backbone's.
    """
    found = gpus()
    chosen, why = choose_precision(precision, gpu_list=found, measure=measure)
    return DeviceSetup(backend=backend(), device="GPU" if found else "CPU", gpus=len(found),
                       device_name=found[0][0] if found else cpu_name(), precision=chosen, reason=why,
                       engine="keras", engine_reason="Keras until the train flow chooses each backbone's engine")


def cpu_name() -> str:
    """The CPU's model name (the machine type where /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under the precision's Keras dtype policy, then restore the previous one.

    Keras reads the global policy when a layer is created, so the policy is set only for the
    duration of a build and a lock keeps two threads' builds from mixing policies.
    """
    import keras

    with _POLICY_LOCK:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(POLICIES[precision])
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an accelerator out-of-memory error of any backend (XLA, TensorFlow, CUDA)."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(word in text for word in ("resource_exhausted", "resourceexhausted", "out of memory", "oom "))


def pick_batch_size(forward: Callable[[np.ndarray], object], input_size: int, *, on_gpu: bool | None = None,
                    start: int = 32, max_batch: int = 1024, cpu_default: int = CPU_BATCH_SIZE) -> int:
    """The batch size to run `forward` with: a fixed default on CPU, the largest that fits on a GPU.

    On a GPU it doubles a zero uint8 batch from `start` until `forward` runs out of memory or
    `max_batch` is reached, and returns the last size that ran, halved once for headroom
    (decoding, the second batch in flight and fine-tuning's gradients need memory too), but
    never below `start`. Probing costs one forward pass per candidate: nothing next to an
    extraction over thousands of images.
    """
    if not (bool(gpus()) if on_gpu is None else on_gpu):
        return cpu_default
    best = 0
    batch = start
    while batch <= max_batch:
        try:
            forward(np.zeros((batch, input_size, input_size, 3), dtype=np.uint8))
        except Exception as error:  # noqa: BLE001 - every backend raises its own OOM type
            if not is_out_of_memory(error):
                raise
            logger.info("Batch %d does not fit (%s); using %d.", batch, type(error).__name__, max(best // 2, start))
            break
        best = batch
        batch *= 2
    else:
        return best
    return max(best // 2, start)
