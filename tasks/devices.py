"""Device setup that is correct on a GPU and a clean no-op on a CPU.

CI has no GPU, so this code must be right by construction: memory growth keeps TensorFlow
from grabbing the whole card (other processes, and a second model, may need it), mixed
precision is only switched on where it pays (a GPU), and everything is safe to call again
in the same process (Prefect may run several tasks in one worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 32
"""Batch size on CPU: larger batches do not make a CPU faster, they only cost memory."""


def configure_devices(mixed_precision: bool = False) -> dict:
    """Turn on GPU memory growth and set the Keras dtype policy; return what was configured.

    Returns {"gpus": n, "device": "GPU"|"CPU", "policy": "float32"|"mixed_float16",
    "mixed_precision": bool}. Mixed precision is honoured only with a GPU: on a CPU float16
    is slower, so the policy stays float32 and the result says so. Memory growth can only be
    set before a GPU is first used; a later call finds it already set (or not settable) and
    carries on, which is what makes repeated calls safe.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        _enable_memory_growth(gpu)
    policy = "mixed_float16" if mixed_precision and gpus else "float32"
    if mixed_precision and not gpus:
        logger.info("Mixed precision requested but no GPU is visible; keeping float32.")
    keras.mixed_precision.set_global_policy(policy)
    return {"gpus": len(gpus), "device": "GPU" if gpus else "CPU", "policy": policy,
            "mixed_precision": policy == "mixed_float16"}


def _enable_memory_growth(gpu: tf.config.PhysicalDevice) -> None:
    try:
        tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # Raised once the GPU is initialised (a second call, or a model already built):
        # the setting from the first call still holds.
        logger.debug("Memory growth already fixed for %s.", gpu.name)


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def pick_batch_size(forward: Callable[[np.ndarray], object], input_size: int, *,
                    start: int = 32, max_batch: int = 512, cpu_default: int = CPU_BATCH_SIZE) -> int:
    """The batch size to run `forward` with: a fixed default on CPU, the largest that fits on GPU.

    On a GPU it doubles a zero batch from `start` until `forward` runs out of memory or
    `max_batch` is reached, and returns the last size that ran (never less than `start`,
    which lets the real run report a genuine out-of-memory error). `forward` takes a float32
    (n, size, size, 3) array, e.g. `lambda x: model(x, training=False)`. Probing costs one
    forward pass per candidate, negligible next to an extraction over thousands of images.
    """
    if not gpu_available():
        return cpu_default
    best = start
    batch = start
    while batch <= max_batch:
        try:
            forward(np.zeros((batch, input_size, input_size, 3), dtype=np.float32))
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError) as error:
            logger.info("Batch %d does not fit (%s); using %d.", batch, type(error).__name__, best)
            break
        best = batch
        batch *= 2
    return best
