"""Evaluation on the test split: metrics, a predictions table and the data for the plots.

The test split is read only here, after the backbone was chosen and the model trained, so its
numbers are an honest estimate. The model is evaluated *as saved* (reloaded from its `.keras`
file in safe mode), so what is measured is exactly what ships. Labels: cat = 0, dog = 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import DatasetValidationError
from tasks.files import atomic_path, atomic_write_json
from tasks.labels import CLASSES, LABEL_INDEX, SPLITS

PREDICTION_COLUMNS: tuple[str, ...] = ("path", "sha256", "label", "p_dog", "predicted")
"""Columns of predictions.csv: `path` is relative to the data folder, labels are 0 (cat) / 1 (dog)."""

_EPS = 1e-7


def split_rows(data_dir: Path, split: str) -> pd.DataFrame:
    """Usable rows of one labelled split in a stable order (sha256), with an integer `y` column.

    Sorting by content hash makes every consumer (head, fine-tuning, evaluation) see the
    same order on every run, whatever order the manifest was written in.
    """
    manifest = Path(data_dir) / "manifest.parquet"
    if not manifest.is_file():
        raise DatasetValidationError(f"{manifest} does not exist; run the prepare_data flow on this folder first")
    frame = pd.read_parquet(manifest, columns=["sha256", "label", "status", "split", "arranged_path"])
    rows = frame[(frame["status"] == "ok") & (frame["split"] == split) & (frame["arranged_path"] != "")]
    rows = rows.drop_duplicates(subset=["sha256"]).sort_values("sha256").reset_index(drop=True)
    unknown = sorted(set(rows["label"]) - set(LABEL_INDEX))
    if unknown:
        raise DatasetValidationError(
            f"{manifest} has labels {unknown} in split {split!r}; only {list(CLASSES)} are allowed, rerun prepare_data"
        )
    rows["y"] = rows["label"].map(LABEL_INDEX).astype("int64")
    return rows


def require_both_classes(rows: pd.DataFrame, split: str, data_dir: Path) -> None:
    """Fail before training when a split cannot support it: learning or early stopping needs both classes."""
    missing = [name for name in CLASSES if not (rows["label"] == name).any()]
    if missing:
        raise DatasetValidationError(
            f"split {split!r} of {Path(data_dir) / 'manifest.parquet'} has no {' or '.join(missing)} images; "
            "add images of every class and rerun prepare_data"
        )


def labelled_counts(data_dir: Path) -> dict[str, dict[str, int]]:
    """{split: {"cat": n, "dog": n}} of usable images; fails unless every labelled split has both classes.

    Checked before any work, so a folder that cannot support training, model selection and
    an honest test fails in a second with the fix instead of after feature extraction.
    """
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = split_rows(data_dir, split)
        require_both_classes(rows, split, data_dir)
        counts[split] = {name: int((rows["label"] == name).sum()) for name in CLASSES}
    return counts


def _safe_float(value: float) -> float | None:
    """JSON has no NaN: undefined metrics (AUC on one class) become None."""
    return None if value is None or not math.isfinite(value) else float(value)


def binary_metrics(labels: np.ndarray, p_dog: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, ROC AUC, log loss, per-class precision/recall/F1 and the confusion matrix.

    The confusion matrix is `[[cat->cat, cat->dog], [dog->cat, dog->dog]]` (rows = true,
    columns = predicted, index = label). Metrics that a one-class sample cannot define are None.
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
        "roc_auc": _safe_float(roc_auc_score(labels, p_dog)) if both else None,
        "log_loss": float(log_loss(labels, np.clip(p_dog, _EPS, 1 - _EPS), labels=[0, 1])),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=[0, 1]).astype(int).tolist(),
    }
    for index, name in enumerate(CLASSES):
        metrics[f"precision_{name}"] = float(precision[index])
        metrics[f"recall_{name}"] = float(recall[index])
        metrics[f"f1_{name}"] = float(f1[index])
        metrics[f"support_{name}"] = int(support[index])
    return metrics


def predict_pixels(model: Any, data_dir: Path, relative_paths: list[str], input_size: int,
                   batch_size: int) -> np.ndarray:
    """p(dog) for arranged images, streamed through the same tf.data reader as feature extraction."""
    from tasks.features import image_dataset

    paths = [str(Path(data_dir) / relative) for relative in relative_paths]
    if not paths:
        return np.zeros((0,), dtype=np.float32)
    dataset = image_dataset(paths, input_size, batch_size)
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float32).reshape(-1)


def predictions_frame(rows: pd.DataFrame, p_dog: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """The predictions table in PREDICTION_COLUMNS order (labels and predictions as 0/1)."""
    return pd.DataFrame({
        "path": rows["arranged_path"].astype(str).to_numpy(),
        "sha256": rows["sha256"].astype(str).to_numpy(),
        "label": rows["y"].astype("int64").to_numpy(),
        "p_dog": np.asarray(p_dog, dtype=np.float64),
        "predicted": (np.asarray(p_dog) >= threshold).astype("int64"),
    }, columns=list(PREDICTION_COLUMNS))


def write_csv(frame: pd.DataFrame, target: Path) -> Path:
    """Atomic CSV write (a reader never sees half a table)."""
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return Path(target)


def evaluate_model(model_path: Path, data_dir: Path, output_dir: Path, input_size: int,
                   batch_size: int = 32, split: str = "test") -> dict[str, Any]:
    """Reload the saved model in safe mode, predict the split, write predictions.csv and test_metrics.json.

    Returns {"metrics", "predictions_path", "metrics_path", "count"}.
    """
    import keras

    import tasks.backbones  # noqa: F401  (registers the Preprocess layer the saved model uses)

    rows = split_rows(data_dir, split)
    require_both_classes(rows, split, data_dir)
    model = keras.saving.load_model(model_path, safe_mode=True)
    p_dog = predict_pixels(model, data_dir, rows["arranged_path"].tolist(), input_size, batch_size)
    metrics = binary_metrics(rows["y"].to_numpy(), p_dog)
    output_dir = Path(output_dir)
    predictions_path = write_csv(predictions_frame(rows, p_dog), output_dir / "predictions.csv")
    metrics_path = atomic_write_json(output_dir / f"{split}_metrics.json", metrics)
    return {"metrics": metrics, "predictions_path": str(predictions_path),
            "metrics_path": str(metrics_path), "count": int(len(rows))}


@task(name="check-prepared-data", cache_policy=NO_CACHE)
def labelled_counts_task(data_dir: str) -> dict[str, dict[str, int]]:
    """Image counts per split and class; fails early on a folder that prepare_data did not finish."""
    return labelled_counts(Path(data_dir))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_path: str, data_dir: str, output_dir: str, input_size: int,
                  batch_size: int = 32) -> dict[str, Any]:
    """Test-split evaluation of the saved end-to-end model."""
    return evaluate_model(Path(model_path), Path(data_dir), Path(output_dir), input_size, batch_size)
