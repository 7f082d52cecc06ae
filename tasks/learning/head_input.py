"""The served model's head input beside its probabilities, and the 32 numbers that summarise it for drift checks.

What the monitor compares with the training data (flows/monitor.py) is what the head reads: the
pooled bottleneck features (an ensemble's, concatenated), which the model computes for every
image anyway. So nothing is computed twice:

- `with_head_input(model)` is the same model, weights shared, with a second output: the input of
  its head's first layer (`head_normalize`; a hand-made model without one: its first head layer
  there is). Under test-time augmentation it is the plain view's (the mirror's would say the same
  about the images' colours and textures). One forward returns both, on Keras and, converted the
  same way, on OpenVINO (the IR of a model logged since has the second output).
- `FeatureSummary` standardises them with the head's own training mean and variance (what
  `head_normalize` holds, so every feature weighs alike), then projects them on a fixed Gaussian
  random matrix to 32 dimensions: distances between images are kept within a small factor
  (Johnson-Lindenstrauss), and 32 numbers a row keep the prediction log small. The matrix is made
  from a seed by NumPy's legacy `RandomState`, whose streams NumPy promises never to change
  (NEP 19): the seed in the model's config is the matrix, and the cached training features of the
  same feature space project exactly as the served rows do.

Nothing here imports Keras at import time (the flows import this module's names); the served
model imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

HEAD_LAYER_NAMES: tuple[str, ...] = ("head_normalize", "head_dense", "head_dropout", "head_output")
"""Layer names shared by the feature head and the end-to-end model, so weights copy by name (tasks/learning/head.py)."""

PROJECTION_SEED = 28
"""Seed of the random projection a model is logged with (recorded in its config)."""

PROJECTION_DIMS = 32
"""Dimensions each row's head input is summarised in."""


def head_input_layer(core: Any) -> Any:
    """The first layer of the head in an end-to-end model: its input is the pooled features."""
    names = {layer.name for layer in core.layers}
    for name in HEAD_LAYER_NAMES:
        if name in names:
            return core.get_layer(name)
    raise ValueError(f"model {core.name!r} has no head layer ({', '.join(HEAD_LAYER_NAMES)}) whose input to return")


def with_head_input(model: Any) -> Any:
    """The served (or end-to-end) model with two outputs: its probabilities, then its head's input (plain view)."""
    import keras

    from tasks.learning.layers import core_of, wrap, wrapping_of

    core = core_of(model)
    both = keras.Model(core.inputs, [core.output, head_input_layer(core).input], name=f"{core.name}_and_head_input")
    return wrap(both, *wrapping_of(model))


def projection_matrix(dim: int, seed: int = PROJECTION_SEED, dims: int = PROJECTION_DIMS) -> np.ndarray:
    """(dim, dims) Gaussian entries of variance 1/dims: the same matrix for the same seed, on any NumPy."""
    return (np.random.RandomState(seed).standard_normal((dim, dims)) / math.sqrt(dims)).astype(np.float32)


@dataclass(frozen=True)
class FeatureSummary:
    """Head input (n, dim) -> (n, dims): standardised as the head standardises it, then projected."""

    mean: np.ndarray
    scale: np.ndarray
    matrix: np.ndarray

    def __call__(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32).reshape(-1, self.matrix.shape[0])
        return ((features - self.mean) / self.scale) @ self.matrix

    @property
    def dims(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def of(cls, model: Any, seed: int = PROJECTION_SEED, dims: int = PROJECTION_DIMS) -> FeatureSummary:
        """The summary of a served or end-to-end Keras model's head input."""
        import keras

        from tasks.learning.layers import core_of

        layer = head_input_layer(core_of(model))
        dim = int(layer.input.shape[-1])
        mean, scale = np.zeros(dim, np.float32), np.ones(dim, np.float32)
        if layer.name == HEAD_LAYER_NAMES[0]:  # a Normalization: the training features' mean and (floored) variance
            mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float32).reshape(-1)
            variance = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float32).reshape(-1)
            scale = np.sqrt(np.maximum(variance, keras.config.epsilon()))
        return cls(mean=mean, scale=scale, matrix=projection_matrix(dim, seed, dims))
