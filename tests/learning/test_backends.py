"""Across Keras backends: the same weights give the same features, and a model saved on one loads on the other.

One side runs in this process, the other in one subprocess on the other backend (TensorFlow <->
JAX; the backend is fixed when Keras is first imported), started once for the module: it
extracts features from a copy of the same data folder, predicts with the model saved here, and
saves a model of its own for this side to load. The test command's TensorFlow pass runs these,
which covers both directions; its JAX pass does not repeat them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

import tasks.learning.preprocess  # noqa: F401  (registers the Preprocess layer for loading)
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import build_backbone
from tasks.learning.extractor import feature_model
from tasks.learning.features import extract_features
from tasks.learning.forward import compiled_forward, to_numpy
from tasks.learning.shards import load_features
from tests.prepared import make_prepared_dir

SIZE = 32
REPO = Path(__file__).resolve().parents[2]
OTHER = "jax" if keras.config.backend() == "tensorflow" else "tensorflow"


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> SimpleNamespace:
    """This backend's features and model, and what the other backend made of the same inputs."""
    root = tmp_path_factory.mktemp("backends")
    weights = root / "mobilenet_v2.weights.h5"
    build_backbone("mobilenet_v2", None, SIZE).save_weights(str(weights))
    data_dir = make_prepared_dir(root / "here", {"train": 3, "validation": 2, "test": 2})
    shutil.copytree(root / "here", root / "there", symlinks=False)
    here = extract_features(data_dir, "mobilenet_v2", str(weights), SIZE, batch_size=8)
    model = feature_model("mobilenet_v2", str(weights), SIZE)
    model.save(root / "here.keras")
    pixels = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
    np.save(root / "pixels.npy", pixels)

    env = {**os.environ, "KERAS_BACKEND": OTHER, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "tests.learning.other_backend", str(root / "there" / "data"),
                           str(weights), str(SIZE), str(root / "here.keras"), str(root / "pixels.npy"), str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backend, cache_name, tensorflow_imported = done.stdout.strip().splitlines()[-1].split()
    rows = DataFolder(data_dir).labelled_rows()
    return SimpleNamespace(backend=backend, cache_name=cache_name, tensorflow_imported=tensorflow_imported == "True",
                           here=here, pixels=pixels, model=model, root=root,
                           ours=load_features(here.cache_dir, rows["sha256"].tolist()),
                           theirs=np.load(root / "features.npy"), predicted_there=np.load(root / "predicted.npy"))


def test_features_agree_across_backends_for_the_same_weights_file(both):
    assert both.backend == OTHER and f"-{OTHER}-" in both.cache_name
    assert f"-{keras.config.backend()}-" in Path(both.here.cache_dir).name  # the backend is part of the cache key
    assert both.ours.shape == both.theirs.shape == (14, 1280)
    np.testing.assert_allclose(both.theirs, both.ours, rtol=1e-3, atol=1e-5 * float(np.abs(both.ours).max()))


def test_off_tensorflow_nothing_imports_it_although_it_is_installed(both):
    """Features, a head fit (seeded) and a saved model on JAX, with TensorFlow importable: it stays unimported."""
    assert both.tensorflow_imported == (OTHER == "tensorflow")


def test_a_model_saved_on_either_backend_predicts_the_same_on_the_other(both):
    ours = to_numpy(compiled_forward(both.model)(both.pixels))
    tolerance = {"rtol": 1e-3, "atol": 1e-5 * float(np.abs(ours).max())}
    np.testing.assert_allclose(both.predicted_there, ours, **tolerance)  # saved here, loaded there
    loaded = keras.saving.load_model(both.root / "there.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(to_numpy(compiled_forward(loaded)(both.pixels)), ours, **tolerance)  # and back
