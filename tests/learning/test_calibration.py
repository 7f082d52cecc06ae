"""Temperature scaling: an over-confident head made honest, the fit refused when it gains nothing, and the
temperature and test-time augmentation as layers inside the saved model."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.learning.calibration import (
    apply_temperature,
    brier_score,
    calibrate,
    calibration_metrics,
    expected_calibration_error,
    log_loss,
)

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)


def _overconfident(n: int, classes: int, seed: int, confidence: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and a head that says the same `confidence` times more loudly."""
    rng = np.random.default_rng(seed)
    if classes == 2:
        logits = rng.normal(0, 2, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(int)
        return labels, 1 / (1 + np.exp(-confidence * logits))
    logits = rng.normal(0, 2, (n, classes))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in true])
    loud = np.exp(confidence * logits)
    return labels, loud / loud.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 3])
def test_an_overconfident_head_is_calibrated_on_validation_and_better_on_test(classes):
    val_labels, val_scores = _overconfident(3000, classes, seed=1)
    test_labels, test_scores = _overconfident(3000, classes, seed=2)
    fitted = calibrate(val_labels, val_scores)
    assert fitted.applied and 2.5 < fitted.temperature < 3.5  # the head's loudness, found from validation alone
    before = calibration_metrics(test_labels, test_scores)
    after = calibration_metrics(test_labels, apply_temperature(test_scores, fitted.temperature))
    assert after["ece"] <= before["ece"] / 2, (before, after)
    assert after["log_loss"] <= before["log_loss"] and after["brier"] <= before["brier"]
    assert fitted.validation["after"]["log_loss"] < fitted.validation["before"]["log_loss"]
    calibrated = apply_temperature(test_scores, fitted.temperature)
    if classes == 2:  # the ranking of the scores stays
        assert (np.diff(calibrated[np.argsort(test_scores, kind="stable")]) >= 0).all()
    if classes > 2:
        assert (calibrated.argmax(axis=1) == test_scores.argmax(axis=1)).all()  # and the predicted class


def test_a_fit_that_gains_nothing_on_validation_is_not_applied():
    labels = np.array([0, 1] * 50)
    fitted = calibrate(labels, np.full(100, 0.5))  # a head that answers 0.5 for everything: no T changes it
    assert not fitted.applied and fitted.temperature == 1.0 and "not applied" in fitted.reason
    assert fitted.validation["after"] == fitted.validation["before"]


def test_ece_log_loss_and_brier_by_hand():
    labels = np.array([1, 1, 0, 0])
    p_dog = np.array([0.9, 0.9, 0.9, 0.1])  # every confidence is 0.9 and three of four are right
    assert expected_calibration_error(labels, p_dog) == pytest.approx(0.15)
    assert brier_score(labels, p_dog) == pytest.approx((0.01 + 0.01 + 0.81 + 0.01) / 4)
    assert log_loss(labels, p_dog) == pytest.approx(-(3 * np.log(0.9) + np.log(0.1)) / 4)
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert brier_score(np.array([0, 1]), three) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.81 + 0.64)) / 2)


@pytest.mark.parametrize("shape", [(5, 1), (5, 3)])
def test_the_temperature_layer_computes_what_was_fitted_and_reloads(tmp_path, shape):
    import keras

    from tasks.learning.layers import MirrorImages, Temperature, load_saved_model

    rng = np.random.default_rng(0)
    raw = rng.random(shape).astype(np.float32)
    scores = raw if shape[1] == 1 else raw / raw.sum(axis=1, keepdims=True)
    inputs = keras.Input(shape=shape[1:])
    model = keras.Model(inputs, Temperature(2.5, name="temperature")(inputs))
    model.save(tmp_path / "t.keras")
    again = load_saved_model(tmp_path / "t.keras")
    out = keras.ops.convert_to_numpy(again(scores))
    np.testing.assert_allclose(out, apply_temperature(scores, 2.5), atol=1e-6)
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    mirrored = keras.ops.convert_to_numpy(MirrorImages()(pixels))
    assert mirrored.dtype == np.uint8 and (mirrored == pixels[:, :, ::-1, :]).all()  # left to right, per image


def test_a_temperature_must_be_positive():
    from tasks.learning.layers import Temperature

    with pytest.raises(ValueError, match="positive"):
        Temperature(0.0)
