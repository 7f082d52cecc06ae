"""Hide TensorFlow from a process that runs on another Keras backend.

Keras imports TensorFlow opportunistically when it is installed (as it is here), whatever the
backend. Hiding it proves that the compute path on JAX needs no TensorFlow, as on the GPU
hosts that have only JAX and PyTorch, and spares the ~9 CPU-seconds its import costs.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """Makes `import tensorflow` fail."""

    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: KERAS_BACKEND is not tensorflow)", name=name)
        return None


def hide_tensorflow_off_its_backend() -> None:
    """Block `import tensorflow` in this process unless KERAS_BACKEND is tensorflow (the default)."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" and \
            not any(isinstance(finder, _NoTensorFlow) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoTensorFlow())
