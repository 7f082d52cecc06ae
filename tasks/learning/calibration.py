"""Temperature scaling: probabilities people can bet on, fitted on validation, judged on test.

A head trained to low loss on a small training set is usually over-confident: it says 0.999
where it is right nine times in ten, and log loss (Kaggle's score for Dogs vs. Cats) punishes
exactly that. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks")
divides the logits by one number T fitted on the validation split; the ranking of the scores,
and for N classes the predicted class, stay as they were.

What was taken from Ludwig's `ludwig/utils/calibration.py` (TemperatureScaling, ECELoss): two
classes are fitted as the two-class softmax [0, z], which is the same as sigmoid(z); the
expected calibration error bins the top-class confidence into 15 equal-width bins (lower edge
excluded, upper included) and weighs each bin's |accuracy - confidence| by its share of images;
and a fit that makes things worse is reverted. Ludwig reverts when validation ECE rose; here the
fit is kept only when it lowers validation log loss, the quantity it minimises (the issue's
rule), and its ECE is reported beside. Ludwig optimises T with L-BFGS in PyTorch; here T is one
number, found by SciPy's bounded scalar minimiser on log T (no gradient code, no framework).

The temperature lives in the model (tasks/learning/layers.py `Temperature`), so every scoring
path applies it; `apply_temperature` here is the same arithmetic in NumPy for fitting and for
reading the uncalibrated scores back out of a calibrated model's predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.common.results import CalibrationSummary
from tasks.learning.layers import PROBABILITY_FLOOR

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al., Ludwig)."""

TEMPERATURE_RANGE = (0.25, 20.0)
"""Where T is searched. Above 1 it softens an over-confident head, below 1 it sharpens an
under-confident one; the floor is there because a small validation split that the head separates
perfectly would otherwise push T towards zero, an over-confidence of its own (p = 0.9 at T = 0.25
is 0.99998: one test mistake then costs a log loss of 11)."""

MIN_GAIN = 1e-6
"""Validation log loss must fall by more than this for a temperature to be applied (float noise is no gain)."""


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores as one probability per class, (n, k): p(positive) of shape (n,) becomes [1 - p, p]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 or scores.shape[-1] == 1:
        p = scores.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return scores


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """What the `Temperature` layer computes, in NumPy: sigmoid(logit(p) / T) or softmax(log(p) / T), same shape."""
    scores = np.asarray(scores, dtype=np.float64)
    p = np.clip(scores, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    if scores.ndim == 1 or scores.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / temperature))
    logits = np.log(p) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities clipped like evaluation's)."""
    probabilities = class_probabilities(scores)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    true = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(true, PROBABILITY_FLOOR, 1.0))))


def brier_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared error of the probabilities: (p - y)^2 for two classes (scikit-learn's and Kaggle's
    convention), the sum over classes of (p_k - [y = k])^2 for more."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 or scores.shape[-1] == 1:
        return float(np.mean((scores.reshape(-1) - labels) ** 2))
    onehot = np.eye(scores.shape[1])[labels]
    return float(np.mean(np.sum((scores - onehot) ** 2, axis=1)))


def reliability_bins(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width confidence bin: its edges, how many images fell in it, their mean confidence and accuracy.

    Confidence is the top class's probability; a bin is (lower, upper], the first one [0, upper].
    """
    probabilities = class_probabilities(scores)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({"lower": edges[b], "upper": edges[b + 1], "count": count,
                     "confidence": float(confidence[members].mean()) if count else np.nan,
                     "accuracy": float(correct[members].mean()) if count else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins of |accuracy - mean confidence| weighted by the bin's share of images."""
    table = reliability_bins(labels, scores, bins)
    filled = table[table["count"] > 0]
    return float((filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / table["count"].sum())


def calibration_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ECE (15 bins), log loss and Brier score: the three numbers the report shows before and after."""
    return {"ece": expected_calibration_error(labels, scores), "log_loss": log_loss(labels, scores),
            "brier": brier_score(labels, scores)}


def fit_temperature(labels: np.ndarray, scores: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE that minimises the log loss of `apply_temperature(scores, T)` on these labels."""
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(lambda u: log_loss(labels, apply_temperature(scores, float(np.exp(u)))),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def calibrate(labels: np.ndarray, scores: np.ndarray) -> CalibrationSummary:
    """Fit T on validation labels and scores; keep it only when it lowers validation log loss.

    The summary's `test` part is filled later, by `on_test_split`, from the shipped model's
    test predictions.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    fitted = fit_temperature(labels, scores)
    before = calibration_metrics(labels, scores)
    after = calibration_metrics(labels, apply_temperature(scores, fitted))
    applied = after["log_loss"] < before["log_loss"] - MIN_GAIN
    if applied:
        reason = (f"T = {fitted:.3f} lowers validation log loss from {before['log_loss']:.4f} to "
                  f"{after['log_loss']:.4f} ({'over' if fitted > 1 else 'under'}-confident head)")
    else:
        reason = (f"not applied: the best T ({fitted:.3f}) would not lower validation log loss "
                  f"({before['log_loss']:.4f}); the head's probabilities ship as they are")
        after = before
    return CalibrationSummary(temperature=fitted if applied else 1.0, fitted_temperature=fitted, applied=applied,
                              reason=reason, validation={"before": before, "after": after}, test={},
                              reliability_plot=None)


def scores_of(predictions: pd.DataFrame, classes: ClassMap = CATS_DOGS) -> np.ndarray:
    """The probability columns of a predictions table: p(positive) (n,) for two classes, (n, N) for more."""
    if classes.binary:
        return predictions[f"p_{classes.positive}"].to_numpy(dtype=np.float64)
    return predictions[list(classes.probability_columns)].to_numpy(dtype=np.float64)


def on_test_split(summary: CalibrationSummary, predictions_path: Path, plot_path: Path,
                     classes: ClassMap = CATS_DOGS) -> CalibrationSummary:
    """The shipped model's test predictions before and after its temperature, and the reliability diagram.

    The predictions are the calibrated model's; the scores before calibration are read back
    out of them with the inverse temperature (sigmoid(logit(p) * T) = the head's own p), so no
    second pass over the test images is needed.
    """
    predictions = pd.read_csv(predictions_path, dtype={"path": str, "sha256": str})
    labels = predictions["label"].to_numpy(dtype=np.int64)
    after = scores_of(predictions, classes)
    before = apply_temperature(after, 1.0 / summary.temperature) if summary.applied else after
    plot = plot_reliability(labels, before, after, plot_path, summary.temperature if summary.applied else None)
    return summary.model_copy(update={"test": {"before": calibration_metrics(labels, before),
                                               "after": calibration_metrics(labels, after)},
                                      "reliability_plot": str(plot)})


def plot_reliability(labels: np.ndarray, before: np.ndarray, after: np.ndarray, target: Path,
                     temperature: float | None) -> Path:
    """Reliability diagram of the test split: accuracy against confidence per bin, before and after temperature.

    A calibrated model follows the diagonal; bars below it are over-confidence. The legend
    gives each curve's ECE.
    """
    from tasks.learning.plots import _figure, _save

    figure = _figure(5.5, 5)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    curves = [("before", before, "C3")]
    if temperature is not None:
        curves.append((f"after (T = {temperature:.2f})", after, "C0"))
    for name, scores, colour in curves:
        table = reliability_bins(labels, scores)
        filled = table[table["count"] > 0]
        ece = expected_calibration_error(labels, scores)
        axis.plot(filled["confidence"], filled["accuracy"], marker="o", color=colour, label=f"{name}, ECE {ece:.3f}")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top class probability)")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left", fontsize="small")
    axis.set_title("Reliability on the test split" + ("" if temperature is not None else " (no temperature applied)"))
    axis.grid(alpha=0.3)
    return _save(figure, target)


def summary_rows(summary: CalibrationSummary) -> list[dict[str, Any]]:
    """Before/after rows per split and metric, as the report's table shows them."""
    return [{"split": split, "metric": metric, "before": values["before"][metric], "after": values["after"][metric]}
            for split, values in (("validation", summary.validation), ("test", summary.test)) if values
            for metric in values["before"]]
