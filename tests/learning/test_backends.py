"""Across Keras backends: the same weights give the same features, and a model saved on one loads on the other.

Each check runs one side in this process and the other in a subprocess on the other backend
(TensorFlow <-> JAX; the backend is fixed when Keras is first imported). The test command's
TensorFlow pass runs them, which covers both directions; its JAX pass does not repeat them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def _on_other_backend(*args: str) -> str:
    env = {**os.environ, "KERAS_BACKEND": OTHER, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "tests.learning.other_backend", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    build_backbone("mobilenet_v2", None, SIZE).save_weights(str(path))
    return path


def test_features_agree_across_backends_for_the_same_weights_file(tmp_path, weights):
    data_dir = make_prepared_dir(tmp_path / "here", {"train": 3, "validation": 2, "test": 2})
    there = tmp_path / "there"
    shutil.copytree(tmp_path / "here", there, symlinks=False)
    here = extract_features(data_dir, "mobilenet_v2", str(weights), SIZE, batch_size=8)
    rows = DataFolder(data_dir).labelled_rows()
    ours = load_features(here.cache_dir, rows["sha256"].tolist())
    backend, cache_name = _on_other_backend("features", there / "data", weights, SIZE, tmp_path / "theirs.npy").split()
    theirs = np.load(tmp_path / "theirs.npy")
    assert backend == OTHER and cache_name.endswith(f"-{OTHER}") and Path(here.cache_dir).name.endswith(
        f"-{keras.config.backend()}")  # the backend is part of the cache key
    assert ours.shape == theirs.shape == (14, 1280)
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-5 * float(np.abs(ours).max()))


def test_a_model_saved_on_either_backend_predicts_the_same_on_the_other(tmp_path, weights):
    model = feature_model("mobilenet_v2", str(weights), SIZE)
    path = tmp_path / "model.keras"
    model.save(path)
    pixels = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    ours = to_numpy(compiled_forward(model)(pixels))
    assert _on_other_backend("predict", path, tmp_path / "pixels.npy", tmp_path / "theirs.npy") == OTHER
    theirs = np.load(tmp_path / "theirs.npy")
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-5 * float(np.abs(ours).max()))

    saved_there = tmp_path / "theirs.keras"  # and the other way round: saved there, loaded here
    assert _on_other_backend("save", saved_there, weights, SIZE) == OTHER
    loaded = keras.saving.load_model(saved_there, compile=False, safe_mode=True)
    np.testing.assert_allclose(to_numpy(compiled_forward(loaded)(pixels)), ours, rtol=1e-3,
                               atol=1e-5 * float(np.abs(ours).max()))
