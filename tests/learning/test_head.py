"""The classifier head on feature vectors: learns, is reproducible, restores its best epoch, saves safely."""

from __future__ import annotations

import json
from dataclasses import replace

import keras
import numpy as np
import pytest

from tasks.common.errors import DatasetValidationError
from tasks.data.datafolder import DataFolder
from tasks.learning.shards import write_shard
from tasks.learning.head import HEAD_LAYER_NAMES, HeadParams, fit_head, train_head
from tests.prepared import make_prepared_dir

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)

PARAMS = HeadParams(dense_units=16, dropout=0.2, learning_rate=1e-2, epochs=15, batch_size=16, patience=3, seed=7)


def _features(labels: np.ndarray, seed: int, dim: int = 12, scale: float = 1e-3) -> np.ndarray:
    """Noisy vectors whose first coordinates move with the label, at a tiny scale (as random backbones give)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (len(labels), dim))
    x[:, :3] += 2.5 * labels[:, None]
    return (x * scale + 0.5).astype(np.float32)


def _data(n: int = 64, seed: int = 0):
    labels = np.arange(n) % 2
    return _features(labels, seed), labels


def test_head_learns_and_scores_dogs_high():
    train_x, train_y = _data(seed=0)
    val_x, val_y = _data(seed=1)
    model, history = fit_head(train_x, train_y, val_x, val_y, PARAMS)
    p_dog = model.predict(val_x, verbose=0).reshape(-1)
    assert np.mean((p_dog >= 0.5) == (val_y == 1)) >= 0.9
    assert p_dog[val_y == 1].mean() > 0.7 > 0.3 > p_dog[val_y == 0].mean()  # dog = 1, cat = 0
    assert [layer.name for layer in model.layers[1:]] == list(HEAD_LAYER_NAMES)
    assert set(history) >= {"loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc"}


def test_same_seed_same_head_and_other_seed_other_head():
    train_x, train_y = _data(seed=0)
    val_x, val_y = _data(seed=1)
    params = replace(PARAMS, epochs=3)
    first, history_1 = fit_head(train_x, train_y, val_x, val_y, params)
    second, history_2 = fit_head(train_x, train_y, val_x, val_y, params)
    other, _ = fit_head(train_x, train_y, val_x, val_y, replace(params, seed=8))
    assert history_1 == history_2
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), other.get_weights()))


def test_early_stopping_keeps_the_best_epoch_not_the_last():
    rng = np.random.default_rng(3)
    train_x = rng.normal(size=(64, 12)).astype(np.float32)
    train_y = rng.integers(0, 2, 64)  # labels are noise: validation loss soon rises
    val_x = rng.normal(size=(32, 12)).astype(np.float32)
    val_y = rng.integers(0, 2, 32)
    params = replace(PARAMS, epochs=60, patience=2, learning_rate=5e-2, dropout=0.0, dense_units=64)
    model, history = fit_head(train_x, train_y, val_x, val_y, params)
    assert len(history["val_loss"]) < 60, "early stopping should have ended training"
    final = model.evaluate(val_x, val_y.reshape(-1, 1).astype(np.float32), verbose=0, return_dict=True)["loss"]
    assert final == pytest.approx(min(history["val_loss"]), rel=1e-4)
    assert final < history["val_loss"][-1]


def test_bad_shapes_fail_clearly():
    x, y = _data()
    with pytest.raises(ValueError, match="one label per row"):
        fit_head(x, y[:-1], x, y, PARAMS)
    with pytest.raises(ValueError, match="validation features"):
        fit_head(x, y, x[:, :5], y, PARAMS)


def _cached_dir(tmp_path, per_class=None):
    """A prepared folder plus a feature cache written in tasks.learning.shards' format."""
    data_dir = make_prepared_dir(tmp_path, per_class or {"train": 12, "validation": 6, "test": 2})
    cache_dir = data_dir / "features" / "fake"
    for split in ("train", "validation", "test"):
        rows = DataFolder(data_dir).labelled_rows(split)
        if len(rows):
            write_shard(cache_dir, rows["sha256"].tolist(), _features(rows["y"].to_numpy(), seed=len(split)))
    return data_dir, cache_dir


def test_train_head_saves_a_safe_model_history_and_validation_metrics(tmp_path):
    data_dir, cache_dir = _cached_dir(tmp_path)
    result = train_head(DataFolder(data_dir), cache_dir, tmp_path / "run", "vgg16", PARAMS)
    assert result.head_path.endswith("heads/vgg16.keras")
    assert result.train_count == 24 and result.val_count == 12
    assert result.val_accuracy >= 0.9 and result.val_auc >= 0.9
    history = json.loads(open(result.history_path).read())
    assert result.best_epoch == int(np.argmin(history["val_loss"])) + 1 <= result.epochs_run
    head = keras.saving.load_model(result.head_path, safe_mode=True)
    rows = DataFolder(data_dir).labelled_rows("validation")
    p_dog = head.predict(_features(rows["y"].to_numpy(), seed=len("validation")), verbose=0).reshape(-1)
    assert np.mean((p_dog >= 0.5) == (rows["y"].to_numpy() == 1)) == pytest.approx(result.val_accuracy)
    json.dumps(result.model_dump(), allow_nan=False)


def test_train_head_refuses_a_split_without_dogs(tmp_path):
    data_dir, cache_dir = _cached_dir(tmp_path)
    import pandas as pd

    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    manifest.loc[(manifest["split"] == "validation") & (manifest["label"] == "dog"), "status"] = "quarantined"
    manifest.to_parquet(data_dir / "manifest.parquet", index=False)
    with pytest.raises(DatasetValidationError, match="no dog images"):
        train_head(DataFolder(data_dir), cache_dir, tmp_path / "run", "vgg16", PARAMS)
