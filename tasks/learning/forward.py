"""`model(x, training=False)` compiled once for the backend in use, and run two batches deep.

Keras' `predict` converts every batch to float32 on the host and adds per-call overhead
(measured at under a fifth of the model's own speed on an H200); here a uint8 batch goes to
the device as it is and one compiled function runs the whole model:

- JAX: `jax.jit` over `model.stateless_call` (the weights are arguments, not constants), with
  batches padded to a power of two so that a few compiled shapes serve every batch size;
- TensorFlow: one `tf.function` traced for any batch size (no retrace for the last batch);
- PyTorch: the model under `torch.no_grad()`.

A model of several outputs (the served model with its head's input beside its probabilities,
tasks/learning/head_input.py) gives a tuple of them, in order, through the same one call.

(The OpenVINO engine's forward, tasks/learning/openvino_engine.py, keeps the same contract.)

`run_ahead` keeps two batches in flight: batch k+1 is dispatched before batch k's features
are copied back (JAX, TensorFlow-GPU and CUDA all dispatch asynchronously), so the device
never waits for the host's copy, and each batch crosses back once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

Forward = Callable[[np.ndarray], Any]
"""uint8 (n, h, w, 3) batch -> the backend's float32 output array, or a tuple of them for a model of several outputs
(possibly not computed yet)."""


def _float32(outputs: Any) -> Any:
    """The model's output(s) cast to float32: one array, or a tuple for several outputs."""
    import keras

    if isinstance(outputs, list | tuple):
        return tuple(keras.ops.cast(output, "float32") for output in outputs)
    return keras.ops.cast(outputs, "float32")


def compiled_forward(model: Any) -> Forward:
    """The model's inference call as one compiled function of a uint8 batch (outputs float32).

    Build it after the model's last training step: on JAX it holds the weights as they are now.
    """
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]

        @jax.jit
        def run(trainable: list, non_trainable: list, pixels: Any) -> Any:
            outputs, _ = model.stateless_call(trainable, non_trainable, pixels, training=False)
            return _float32(outputs)

        def run_padded(pixels: np.ndarray) -> Any:
            # XLA compiles once per batch shape (seconds each): pad to a power of two, so a smaller
            # last batch or an odd-sized request reuses one of a few compiled shapes.
            count = len(pixels)
            bucket = 1 << max(count - 1, 0).bit_length()
            if bucket != count:
                pixels = np.concatenate([pixels, np.zeros((bucket - count, *pixels.shape[1:]), pixels.dtype)])
            outputs = run(trainable, non_trainable, pixels)
            return tuple(output[:count] for output in outputs) if isinstance(outputs, tuple) else outputs[:count]

        return run_padded
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)
        return tf.function(lambda pixels: _float32(model(pixels, training=False)), input_signature=[spec],
                           autograph=False)
    if backend == "torch":
        import torch

        def run_torch(pixels: np.ndarray) -> Any:
            with torch.no_grad():
                return _float32(model(pixels, training=False))

        return run_torch
    raise RuntimeError(f"Keras backend {backend!r} is not supported; use tensorflow, jax or torch.")


def to_numpy(outputs: Any) -> Any:
    """Backend array (or the OpenVINO engine's `Pending` batch) -> float32 numpy (blocks until it is computed); a tuple
    of them -> a tuple of numpy arrays."""
    import keras

    from tasks.learning.openvino_engine import Pending

    if isinstance(outputs, Pending):
        return outputs.wait()
    if isinstance(outputs, tuple):
        return tuple(to_numpy(output) for output in outputs)

    return np.asarray(keras.ops.convert_to_numpy(outputs), dtype=np.float32)


def run_ahead(forward: Forward, batches: Iterable[T], pixels_of: Callable[[T], np.ndarray]
              ) -> Iterator[tuple[T, np.ndarray]]:
    """(batch, outputs) for every batch, with the next batch dispatched before outputs are read."""
    pending: tuple[T, Any] | None = None
    for batch in batches:
        launched = (batch, forward(pixels_of(batch)))
        if pending is not None:
            yield pending[0], to_numpy(pending[1])
        pending = launched
    if pending is not None:
        yield pending[0], to_numpy(pending[1])
