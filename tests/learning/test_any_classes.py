"""Learning N classes: the softmax head, balanced class weights, and the N-class metrics."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.learning.evaluate import class_metrics, multiclass_metrics
from tasks.learning.head import HeadParams, balanced_class_weights, fit_head
from tasks.learning.plots import top_losses
from tasks.common.labels import class_map

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)

NAMES = ("daisy", "roses", "tulips")
PARAMS = HeadParams(dense_units=16, dropout=0.2, learning_rate=1e-2, epochs=20, batch_size=16, patience=3, seed=7)


def _features(labels: np.ndarray, seed: int, dim: int = 12) -> np.ndarray:
    """Noisy vectors with one coordinate per class that moves with it, at a random backbone's tiny scale."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (len(labels), dim))
    x[np.arange(len(labels)), labels] += 4.0
    return (x * 1e-3 + 0.5).astype(np.float32)


def test_a_three_class_head_is_a_softmax_that_learns_the_classes():
    labels = np.arange(90) % 3
    model, history = fit_head(_features(labels, 0), labels, _features(labels, 1), labels, PARAMS, n_classes=3)
    probabilities = model.predict(_features(labels, 2), verbose=0)
    assert probabilities.shape == (90, 3) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert model.layers[-1].get_config()["activation"] == "softmax"
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.85  # chance is 1/3
    assert "val_accuracy" in history and "auc" not in history


def test_balanced_weights_give_each_class_the_same_total_weight_and_are_used_in_the_fit(monkeypatch):
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    weights = balanced_class_weights(labels, 3)
    assert weights == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    assert {index: weights[index] * int((labels == index).sum()) for index in weights} == pytest.approx(
        {0: 10 / 3, 1: 10 / 3, 2: 10 / 3})

    import keras

    seen = {}
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen["class_weight"] = kwargs.get("class_weight")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    x = _features(labels, 0)
    fit_head(x, labels, x, labels, HeadParams(dense_units=4, epochs=1, class_weight="balanced"), n_classes=3)
    assert seen["class_weight"] == pytest.approx(weights)
    fit_head(x, labels, x, labels, HeadParams(dense_units=4, epochs=1), n_classes=3)
    assert seen["class_weight"] is None


def test_multiclass_metrics_count_per_class_and_macro():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                              [0.1, 0.6, 0.3], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]])
    metrics = multiclass_metrics(labels, probabilities, NAMES)
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["chance_accuracy"] == pytest.approx(2 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["recall_roses"] == 1.0 and metrics["precision_roses"] == pytest.approx(2 / 3)
    assert metrics["support_tulips"] == 2 and metrics["score_max"] == pytest.approx(0.8)
    assert metrics["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))
    assert 0.5 < metrics["roc_auc"] <= 1.0
    assert multiclass_metrics(labels[:4], probabilities[:4], NAMES)["roc_auc"] is None  # tulips absent: undefined
    binary = class_metrics(np.array([0, 1]), np.array([0.2, 0.9]), class_map(["apples", "pears"]))
    assert binary["recall_pears"] == 1.0 and "macro_f1" not in binary  # two classes: binary_metrics, by name
    with pytest.raises(ValueError, match="one row of 3 probabilities per label"):
        multiclass_metrics(labels, probabilities[:, :2], NAMES)


def test_top_mistakes_are_picked_per_true_class():
    import pandas as pd

    classes = class_map(NAMES)
    rows = [{"path": f"{i}.jpg", "label": label, "predicted": predicted, "p_daisy": p[0], "p_roses": p[1],
             "p_tulips": p[2]} for i, (label, predicted, p) in enumerate([
                 (0, 1, (0.1, 0.8, 0.1)), (0, 1, (0.05, 0.9, 0.05)), (0, 2, (0.3, 0.1, 0.6)),
                 (1, 2, (0.1, 0.2, 0.7)), (2, 2, (0.1, 0.1, 0.8))])]
    worst = top_losses(pd.DataFrame(rows), count=3, classes=classes)
    assert worst["path"].tolist() == ["1.jpg", "3.jpg"]  # one per class (3 // 3): daisy's worst, then roses'
