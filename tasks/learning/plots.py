"""PNG plots for people: training curves, ROC curve, confusion matrix and the top-losses grid.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), never `pyplot`:
no global backend is chosen or changed (the Agg canvas is used per figure), nothing is
configured at import time, and figures from concurrent tasks cannot mix.

Every plot is bounded whatever the class count: past MAX_PLOTTED_CLASSES classes, the confusion
matrix shows the most confused classes and the ROC plot the classes of lowest AUC, each saying
so in its title; every class's numbers stay in the run's metrics (`confusion_matrix`, and
`roc_auc`, `f1_<class>`, ... per class). A 200-class matrix drawn whole was 18,050 x 18,000
pixels, 85 s and 10.6 GB of memory for 600 test images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.files import atomic_path
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.data.datafolder import DataFolder


MAX_PLOTTED_CLASSES = 20
"""Most classes a per-class plot draws (a confusion matrix of 20 x 20 counts stays readable, at ~1900 px a side)."""


def most_confused(matrix: np.ndarray, count: int = MAX_PLOTTED_CLASSES) -> np.ndarray:
    """Up to `count` classes with the most mistakes (as the true class or the predicted one), in label order.

    Classes without a mistake are left out (the first `count` when no class has one).
    """
    mistakes = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
    ranked = np.argsort(-mistakes, kind="stable")[:count]
    return np.sort(ranked[mistakes[ranked] > 0] if mistakes[ranked[0]] > 0 else ranked)


def _figure(width: float, height: float) -> Any:
    """A Figure drawn by the Agg canvas (headless, thread-safe, independent of pyplot's backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, target: Path) -> Path:
    """Atomic PNG write."""
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    return Path(target)


def plot_training_curves(histories: dict[str, dict[str, list[float]]], target: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), one colour per history.

    `histories` maps a label ("resnet50 head", "fine-tune") to a Keras `History.history` dict.
    """
    figure = _figure(11, 4)
    axes = figure.subplots(1, 2)
    for index, (name, history) in enumerate(histories.items()):
        colour = f"C{index % 10}"
        for axis, key in zip(axes, ("loss", "accuracy")):
            if history.get(key):
                epochs = np.arange(1, len(history[key]) + 1)
                axis.plot(epochs, history[key], color=colour, label=f"{name} train")
            if history.get(f"val_{key}"):
                epochs = np.arange(1, len(history[f"val_{key}"]) + 1)
                axis.plot(epochs, history[f"val_{key}"], color=colour, linestyle="--", label=f"{name} validation")
    for axis, key in zip(axes, ("loss", "accuracy")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.suptitle(title)
    return _save(figure, target)


def plot_roc(labels: np.ndarray, scores: np.ndarray, target: Path, auc: float | None,
             classes: ClassMap = CATS_DOGS) -> Path:
    """ROC curve of p(dog) against the true dog label (dog = positive class); one-vs-rest curves for N classes.

    `scores` are p(positive) for two classes, (n, classes) probabilities for more.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    many = len(classes.names) > 8
    figure = _figure(7.5 if many else 5, 5)
    axis = figure.subplots()
    title = "ROC on the test split" if classes.binary else "One-vs-rest ROC on the test split"
    if not classes.binary:
        present = [index for index in range(len(classes.names)) if 0 < int((labels == index).sum()) < len(labels)]
        if len(present) > MAX_PLOTTED_CLASSES:
            aucs = [roc_auc_score(labels == index, scores[:, index]) for index in present]
            present = sorted(present[i] for i in np.argsort(aucs, kind="stable")[:MAX_PLOTTED_CLASSES])
            title = f"One-vs-rest ROC, test split:\nthe {len(present)} of {len(classes.names)} classes of lowest AUC"
        for index in present:
            fpr, tpr, _ = roc_curve(labels == index, scores[:, index])
            axis.plot(fpr, tpr, label=classes.names[index])
        outside = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if many else {"loc": "lower right"}
        axis.legend(fontsize="x-small" if many else "small", title=f"macro AUC {auc:.4f}" if auc is not None else None,
                    **outside)
    elif len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
        axis.plot(fpr, tpr, label=f"AUC = {auc:.4f}" if auc is not None else "ROC")
        axis.legend(loc="lower right")
    else:
        axis.text(0.5, 0.5, "ROC undefined: one class only", ha="center")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    negative, positive = ("cats", "dogs") if classes.kaggle else \
        (classes.names[0], classes.positive) if classes.binary else ("others", "each class")
    axis.set_xlabel(f"false positive rate ({negative} called {positive})")
    axis.set_ylabel(f"true positive rate ({positive} found)")
    axis.set_title(title)
    return _save(figure, target)


def plot_confusion(matrix: list[list[int]], target: Path, classes: ClassMap = CATS_DOGS) -> Path:
    """N x N confusion matrix with counts; rows = true class, columns = predicted (label order: cat first).

    Past MAX_PLOTTED_CLASSES classes, the most confused of them (`most_confused`), each with its label index.
    """
    data = np.asarray(matrix, dtype=np.int64)
    shown = np.arange(len(classes.names))
    title = "Confusion matrix (test)"
    if len(shown) > MAX_PLOTTED_CLASSES:
        shown = most_confused(data)
        data = data[np.ix_(shown, shown)]
        title = (f"Confusion matrix (test): the {len(shown)} most confused of {len(classes.names)} classes\n"
                 "(every class in the run's metrics, confusion_matrix)")
    side = max(4.0, 0.9 * len(shown))
    figure = _figure(side + 0.5, side)
    axis = figure.subplots()
    image = axis.imshow(data, cmap="Blues")
    figure.colorbar(image, ax=axis)
    ticks = [f"{classes.names[index]} ({index})" for index in shown]
    axis.set_xticks(range(len(ticks)), labels=ticks, rotation=45 if len(ticks) > 2 else 0)
    axis.set_yticks(range(len(ticks)), labels=ticks)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = (data.min() + data.max()) / 2 if data.size else 0  # colormap midpoint
    for (row, column), value in np.ndenumerate(data):
        axis.text(column, row, str(value), ha="center", va="center",
                  color="white" if value > threshold else "black")
    axis.set_title(title)
    return _save(figure, target)


def true_class_probability(predictions: pd.DataFrame, classes: ClassMap = CATS_DOGS) -> np.ndarray:
    """Each row's probability of its true class (a predictions.csv table, see tasks/learning/evaluate.py)."""
    labels = predictions["label"].to_numpy(dtype=np.int64)
    if classes.binary:
        p = predictions[f"p_{classes.positive}"].to_numpy(dtype=np.float64)
        return np.where(labels == 1, p, 1 - p)
    probabilities = predictions[[f"p_{name}" for name in classes.names]].to_numpy(dtype=np.float64)
    return probabilities[np.arange(len(labels)), labels]


def top_losses(predictions: pd.DataFrame, count: int = 16, classes: ClassMap = CATS_DOGS) -> pd.DataFrame:
    """The most confident mistakes: wrong predictions sorted by cross-entropy loss, worst first.

    For more than two classes the worst mistakes of each true class (count / N each, at least
    one), so one confusable class does not fill the whole grid.
    """
    if classes.binary:
        p = predictions[f"p_{classes.positive}"].clip(1e-7, 1 - 1e-7)
        loss = np.where(predictions["label"] == 1, -np.log(p), -np.log(1 - p))
    else:
        loss = -np.log(np.clip(true_class_probability(predictions, classes), 1e-7, 1.0))
    ranked = predictions.assign(loss=loss)
    mistakes = ranked[ranked["label"] != ranked["predicted"]].sort_values(["loss", "path"], ascending=[False, True])
    if not classes.binary:
        each = max(1, count // len(classes.names))
        mistakes = mistakes.groupby("label", sort=True, group_keys=False).head(each)
        mistakes = mistakes.sort_values(["label", "loss", "path"], ascending=[True, False, True])
    return mistakes.head(count).reset_index(drop=True)


def plot_top_losses(predictions: pd.DataFrame, folder: DataFolder, target: Path, count: int = 16,
                    classes: ClassMap = CATS_DOGS) -> Path:
    """A grid of the most confident mistakes, each titled with its file name, true class and p(dog) (p(true class) for N)."""
    from PIL import Image

    worst = top_losses(predictions, count, classes)
    columns = 4
    rows = max(1, int(np.ceil(len(worst) / columns)))
    figure = _figure(3 * columns, 3.2 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for axis in axes:
        axis.axis("off")
    if worst.empty:
        axes[0].text(0, 0.5, "no mistakes on the test split", fontsize=12)
    for axis, row in zip(axes, worst.itertuples(index=False)):
        path = folder.file(row.path)
        try:
            with Image.open(path) as image:
                axis.imshow(np.asarray(image.convert("RGB")))
        except OSError:
            axis.text(0.5, 0.5, "unreadable", ha="center")
        name = path.name if len(path.name) <= 28 else path.name[:25] + "..."
        true = classes.names[int(row.label)]
        if classes.binary:
            score = f"p({classes.positive})={getattr(row, f'p_{classes.positive}'):.3f}"
        else:
            score = f"p({true})={getattr(row, f'p_{true}'):.3f}, said {classes.names[int(row.predicted)]}"
        title = f"{name}\ntrue {true}, {score}\nloss {row.loss:.2f}"
        axis.set_title(title, fontsize=8)
    figure.suptitle("Most confident mistakes (top losses)")
    return _save(figure, target)


def make_plots(output_dir: Path, folder: DataFolder, predictions_path: Path, test_metrics: dict[str, Any],
               history_paths: dict[str, str]) -> dict[str, str]:
    """All plots of a run under output_dir/plots/; returns {plot name: png path}.

    `history_paths` maps "head:<backbone>" and "fine_tune" to Keras history JSON files.
    """
    plots_dir = Path(output_dir) / "plots"
    histories = {key: json.loads(Path(path).read_text()) for key, path in history_paths.items()}
    head_histories = {f"{key.split(':', 1)[1]} head": value
                      for key, value in histories.items() if key.startswith("head:")}
    predictions = pd.read_csv(predictions_path, dtype={"path": str, "sha256": str})
    classes = folder.classes()
    scores = predictions[list(classes.probability_columns)].to_numpy() if not classes.binary \
        else predictions[f"p_{classes.positive}"].to_numpy()
    plots = {
        "head_curves": plot_training_curves(head_histories, plots_dir / "head_curves.png",
                                            "Head training (cached features)"),
        "roc_curve": plot_roc(predictions["label"].to_numpy(), scores, plots_dir / "roc_curve.png",
                              test_metrics.get("roc_auc"), classes),
        "confusion_matrix": plot_confusion(test_metrics["confusion_matrix"], plots_dir / "confusion_matrix.png",
                                           classes),
        "top_losses": plot_top_losses(predictions, folder, plots_dir / "top_losses.png", classes=classes),
    }
    if "fine_tune" in histories:
        plots["fine_tune_curves"] = plot_training_curves(
            {"fine-tune": histories["fine_tune"]}, plots_dir / "fine_tune_curves.png", "Fine-tuning (end to end)"
        )
    return {name: str(path) for name, path in plots.items()}


def plot_drift(reference: np.ndarray | None, current: np.ndarray | None, shares: dict[str, float],
               prior: dict[str, float], confidences: np.ndarray, baseline: float | None, target: Path) -> Path:
    """A drift check in three panels: the two samples' head inputs on the reference's first two principal axes, the
    predicted class shares beside the training split's, and the window's confidences against the test baseline."""
    figure = _figure(15, 4.4)
    scatter, bars, histogram = figure.subplots(1, 3)
    if reference is not None and current is not None and len(reference) > 2:
        centre = reference.mean(axis=0)
        _, _, axes = np.linalg.svd(reference - centre, full_matrices=False)
        for values, label, colour in ((reference, "training", "#57606a"), (current, "window", "#cf222e")):
            points = (values - centre) @ axes[:2].T
            scatter.scatter(points[:, 0], points[:, 1], s=8, alpha=0.5, label=f"{label} ({len(values)})",
                            color=colour)
        scatter.legend(loc="best", fontsize=8)
        scatter.set_title("Head inputs, training's first two principal axes")
    else:
        scatter.text(0.5, 0.5, "no features logged", ha="center", va="center")
        scatter.set_axis_off()
    names = list(prior)[:MAX_PLOTTED_CLASSES]
    positions = np.arange(len(names))
    bars.bar(positions - 0.2, [prior[name] for name in names], 0.4, label="training split", color="#57606a")
    bars.bar(positions + 0.2, [shares.get(name, 0.0) for name in names], 0.4, label="window (predicted)",
             color="#cf222e")
    bars.set_xticks(positions, names, rotation=30 if len(names) > 4 else 0, fontsize=8)
    bars.set_ylim(0, 1)
    bars.legend(fontsize=8)
    bars.set_title("Class shares")
    if len(confidences):
        histogram.hist(confidences, bins=20, range=(0, 1), color="#cf222e", alpha=0.7, label="window")
    if baseline is not None:
        histogram.axvline(baseline, color="#57606a", linestyle="--", label=f"test-split mean {baseline:.2f}")
    histogram.legend(fontsize=8)
    histogram.set_title("Probability of the predicted class")
    return _save(figure, target)
