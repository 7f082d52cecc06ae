"""Evaluation on the test split: metrics, a predictions table and the data for the plots.

The test split is read only here, after the backbone was chosen and the model trained, so its
numbers are an honest estimate. The model is evaluated *as saved* (reloaded from its `.keras`
file in safe mode), so what is measured is exactly what ships. Labels are the data folder's
class map (cat = 0, dog = 1 by default): two classes are scored by the probability of the
second (`binary_metrics`), more by a probability per class (`multiclass_metrics`);
`class_metrics` picks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from tasks.common.files import atomic_path, atomic_write_json
from tasks.common.labels import CATS_DOGS, CLASSES, ClassMap
from tasks.data.datafolder import DataFolder

PREDICTION_COLUMNS: tuple[str, ...] = ("path", "sha256", "label", "p_dog", "predicted")
"""Columns of predictions.csv: `path` is relative to the data folder, labels are 0 (cat) / 1 (dog)."""

_EPS = 1e-7


def _safe_float(value: float) -> float | None:
    """JSON has no NaN: undefined metrics (AUC on one class) become None."""
    return None if value is None or not math.isfinite(value) else float(value)


def binary_metrics(labels: np.ndarray, p_dog: np.ndarray, threshold: float = 0.5,
                   names: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """Accuracy, ROC AUC, log loss, per-class precision/recall/F1 and the confusion matrix.

    `chance_accuracy` is what always answering the most frequent class would score on these
    labels: accuracy at or below it means the model has learnt nothing usable, whatever its
    ROC AUC (which judges only the ranking of the scores; `score_min`/`score_max` show how far
    the scores are from the threshold).

    The confusion matrix is `[[cat->cat, cat->dog], [dog->cat, dog->dog]]` (rows = true,
    columns = predicted, index = label). Metrics that a one-class sample cannot define are None.
    `names` are the two classes in label order (per-class keys: `precision_<name>`, ...).
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    p_dog = np.asarray(p_dog, dtype=np.float64).reshape(-1)
    if labels.shape != p_dog.shape or labels.size == 0:
        raise ValueError(f"need as many labels as scores and at least one, got {labels.size} and {p_dog.size}")
    predicted = (p_dog >= threshold).astype(np.int64)
    both = len(np.unique(labels)) == 2
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=[0, 1], zero_division=0
    )
    metrics: dict[str, Any] = {
        "count": int(labels.size),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(labels, predicted)),
        "chance_accuracy": float(np.bincount(labels, minlength=2).max() / labels.size),
        "score_min": float(p_dog.min()),
        "score_max": float(p_dog.max()),
        "roc_auc": _safe_float(roc_auc_score(labels, p_dog)) if both else None,
        "log_loss": float(log_loss(labels, np.clip(p_dog, _EPS, 1 - _EPS), labels=[0, 1])),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).astype(int).tolist(),
    }
    return metrics | _per_class(names, precision, recall, f1, support)


def _per_class(names: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
               support: np.ndarray) -> dict[str, Any]:
    """`precision_<class>`, `recall_<class>`, `f1_<class>`, `support_<class>`: the keys MLflow, the gate and reports read."""
    metrics: dict[str, Any] = {}
    for index, name in enumerate(names):
        metrics[f"precision_{name}"] = float(precision[index])
        metrics[f"recall_{name}"] = float(recall[index])
        metrics[f"f1_{name}"] = float(f1[index])
        metrics[f"support_{name}"] = int(support[index])
    return metrics


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """The N-class metrics: accuracy, chance_accuracy, macro F1, one-vs-rest macro ROC AUC, log loss,
    the N x N confusion matrix (rows true, columns predicted, in label order), per-class
    precision/recall/F1/support keyed by class name, and the range of the top probability.

    `roc_auc` keeps its name so the gate, the backbone ranking and the logs read one key for
    any number of classes; it is None where a class is missing from `labels`.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = list(range(len(names)))
    if probabilities.ndim != 2 or probabilities.shape != (labels.size, len(names)) or labels.size == 0:
        raise ValueError(f"need one row of {len(names)} probabilities per label and at least one label, "
                         f"got {probabilities.shape} for {labels.size}")
    predicted = probabilities.argmax(axis=1)
    top = probabilities.max(axis=1)
    every = len(np.unique(labels)) == len(names)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    normalised = np.clip(probabilities, _EPS, 1.0)
    normalised = normalised / normalised.sum(axis=1, keepdims=True)
    metrics: dict[str, Any] = {
        "count": int(labels.size),
        "accuracy": float(accuracy_score(labels, predicted)),
        "chance_accuracy": float(np.bincount(labels, minlength=len(names)).max() / labels.size),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "score_min": float(top.min()),
        "score_max": float(top.max()),
        "roc_auc": _safe_float(roc_auc_score(labels, normalised, multi_class="ovr", average="macro",
                                             labels=classes)) if every else None,
        "log_loss": float(log_loss(labels, normalised, labels=classes)),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).astype(int).tolist(),
    }
    return metrics | _per_class(names, precision, recall, f1, support)


def class_metrics(labels: np.ndarray, scores: np.ndarray, classes: ClassMap = CATS_DOGS) -> dict[str, Any]:
    """`binary_metrics` of p(positive) for two classes, `multiclass_metrics` of the probabilities for more."""
    if classes.binary:
        return binary_metrics(labels, scores, names=classes.names)
    return multiclass_metrics(labels, scores, classes.names)


def predict_paths(model: Any, paths: list[str], input_size: int, batch_size: int,
                  forward: Any = None, *, decoder: str = "auto") -> tuple[np.ndarray, list[str]]:
    """(scores float32, error per path) through the one input pipeline and a compiled forward pass.

    Scores are p(positive) of shape (n,) for a one-output (binary) model, and a probability per
    class, (n, classes), for a softmax model. A file that cannot be decoded gets NaN and its
    reason; the others are scored normally.
    `decoder` must be the one the model's features were computed with (tasks/learning/pixels.py).
    """
    from tasks.learning.extractor import shared_decoder
    from tasks.learning.forward import compiled_forward, run_ahead

    width = int(model.output_shape[-1] or 1)
    scores = np.full((len(paths), width), np.nan, dtype=np.float32)
    errors = [""] * len(paths)
    if not paths:
        return scores.reshape(-1) if width == 1 else scores, errors
    forward = forward or compiled_forward(model)
    for batch, outputs in run_ahead(forward, shared_decoder(input_size, batch_size, decoder=decoder).batches(paths),
                                    lambda b: b.pixels):
        rows = slice(batch.start, batch.start + len(batch.errors))
        scores[rows] = np.asarray(outputs).reshape(len(batch.errors), width)
        errors[rows] = batch.errors
    scores[[bool(error) for error in errors]] = np.nan
    return (scores.reshape(-1) if width == 1 else scores), errors


def predictions_frame(rows: pd.DataFrame, p_dog: np.ndarray, threshold: float = 0.5,
                      classes: ClassMap = CATS_DOGS) -> pd.DataFrame:
    """The predictions table: PREDICTION_COLUMNS for cats vs. dogs (labels and predictions as 0/1).

    Other classes: path, sha256, label and predicted (label indices), then one `p_<class>`
    column per class (two classes: the positive class's only, like `p_dog`).
    """
    scores = np.asarray(p_dog, dtype=np.float64)
    head = {"path": rows["arranged_path"].astype(str).to_numpy(), "sha256": rows["sha256"].astype(str).to_numpy(),
            "label": rows["y"].astype("int64").to_numpy()}
    if classes.binary:
        column = f"p_{classes.positive}"
        return pd.DataFrame({**head, column: scores, "predicted": (scores >= threshold).astype("int64")},
                            columns=["path", "sha256", "label", column, "predicted"])
    probabilities = {f"p_{name}": scores[:, index] for index, name in enumerate(classes.names)}
    return pd.DataFrame({**head, "predicted": scores.argmax(axis=1).astype("int64"), **probabilities})


def write_csv(frame: pd.DataFrame, target: Path) -> Path:
    """Atomic CSV write (a reader never sees half a table)."""
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return Path(target)


class Evaluation(BaseModel):
    """Test-split metrics of the saved model, and where its predictions were written."""

    metrics: dict[str, Any]
    predictions_path: str
    metrics_path: str
    count: int
    failed: int


def evaluate_model(model_path: Path, folder: DataFolder, output_dir: Path, input_size: int,
                   batch_size: int = 32, split: str = "test", *, decoder: str = "auto",
                   engine_model: str | None = None, precision: str = "float32") -> Evaluation:
    """Reload the saved model in safe mode, predict the split, write predictions.csv and <split>_metrics.json.

    Images that cannot be decoded are counted in `failed` and left out of the metrics. With
    `engine_model` (the shipped OpenVINO IR) the scores are that IR's at `precision`: what is served.
    """
    import keras

    import tasks.learning.layers  # noqa: F401  (registers the TTA mirror and the temperature it may hold)
    import tasks.learning.preprocess  # noqa: F401  (registers the Preprocess layer the saved model uses)

    rows = folder.split_rows(split)
    classes = folder.classes()
    model = keras.saving.load_model(model_path, safe_mode=True)
    forward = None
    if engine_model:
        from tasks.learning.openvino_engine import ir_forward

        forward = ir_forward(engine_model, precision)
    scores, errors = predict_paths(model, rows["path"].tolist(), input_size, batch_size, forward, decoder=decoder)
    ok = np.array([not error for error in errors], dtype=bool)
    rows, scores = rows[ok], scores[ok]
    metrics = class_metrics(rows["y"].to_numpy(), scores, classes)
    output_dir = Path(output_dir)
    predictions_path = write_csv(predictions_frame(rows, scores, classes=classes), output_dir / "predictions.csv")
    metrics_path = atomic_write_json(output_dir / f"{split}_metrics.json", metrics)
    return Evaluation(metrics=metrics, predictions_path=str(predictions_path), metrics_path=str(metrics_path),
                      count=int(len(rows)), failed=int((~ok).sum()))
