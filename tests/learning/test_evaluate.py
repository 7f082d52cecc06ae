"""Evaluation metrics, the predictions table and the PNG plots (no model needed: fixed scores)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.data.datafolder import DataFolder
from tasks.learning.evaluate import PREDICTION_COLUMNS, binary_metrics, predictions_frame, write_csv
from tasks.common.labels import ClassMap
from tasks.learning.plots import MAX_PLOTTED_CLASSES, make_plots, most_confused, plot_confusion, plot_roc, top_losses
from tests.prepared import make_prepared_dir



def test_metrics_use_cat_0_dog_1_and_rows_true_columns_predicted():
    labels = np.array([0, 0, 0, 1, 1])            # three cats, two dogs
    p_dog = np.array([0.1, 0.2, 0.9, 0.8, 0.4])   # one cat called dog, one dog called cat
    metrics = binary_metrics(labels, p_dog)
    assert metrics["confusion_matrix"] == [[2, 1], [1, 1]]
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision_cat"] == pytest.approx(2 / 3) and metrics["recall_cat"] == pytest.approx(2 / 3)
    assert metrics["precision_dog"] == pytest.approx(1 / 2) and metrics["recall_dog"] == pytest.approx(1 / 2)
    assert metrics["support_cat"] == 3 and metrics["support_dog"] == 2
    assert metrics["roc_auc"] == pytest.approx(4 / 6)  # 4 of 6 (dog, cat) pairs ranked right
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.1, 0.8, 0.4]))
    assert metrics["log_loss"] == pytest.approx(expected_loss, rel=1e-6)
    json.dumps(metrics, allow_nan=False)  # JSON-ready for MLflow and metrics.json


def test_perfect_and_inverted_scores_show_which_class_is_positive():
    labels = np.array([0, 1, 0, 1])
    assert binary_metrics(labels, np.array([0.0, 1.0, 0.1, 0.9]))["roc_auc"] == 1.0
    inverted = binary_metrics(labels, np.array([1.0, 0.0, 0.9, 0.1]))
    assert inverted["roc_auc"] == 0.0 and inverted["accuracy"] == 0.0
    assert math.isfinite(inverted["log_loss"])  # clipped, not inf


def test_one_class_sample_has_no_auc_instead_of_nan():
    metrics = binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert metrics["roc_auc"] is None
    json.dumps(metrics, allow_nan=False)


def test_mismatched_or_empty_inputs_fail():
    with pytest.raises(ValueError, match="as many labels"):
        binary_metrics(np.array([0, 1]), np.array([0.5]))
    with pytest.raises(ValueError):
        binary_metrics(np.array([]), np.array([]))


def test_predictions_csv_has_contract_columns(tmp_path):
    rows = pd.DataFrame({"arranged_path": ["a/cat.jpg", "a/dog.jpg"], "sha256": ["0" * 64, "1" * 64], "y": [0, 1]})
    frame = predictions_frame(rows, np.array([0.25, 0.75]))
    path = write_csv(frame, tmp_path / "predictions.csv")
    loaded = pd.read_csv(path, dtype={"sha256": str})
    assert tuple(loaded.columns) == PREDICTION_COLUMNS
    assert loaded["label"].tolist() == [0, 1] and loaded["predicted"].tolist() == [0, 1]
    assert loaded["sha256"].tolist() == ["0" * 64, "1" * 64]


def test_top_losses_are_confident_mistakes_worst_first():
    frame = pd.DataFrame({
        "path": ["ok_cat", "bad_cat", "worse_cat", "bad_dog", "ok_dog"],
        "sha256": list("abcde"), "label": [0, 0, 0, 1, 1],
        "p_dog": [0.1, 0.6, 0.99, 0.3, 0.9], "predicted": [0, 1, 1, 0, 1],
    })
    worst = top_losses(frame, count=2)
    assert worst["path"].tolist() == ["worse_cat", "bad_dog"]
    assert worst["loss"].iloc[0] == pytest.approx(-math.log(0.01), rel=1e-4)


def _is_png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_make_plots_writes_every_png(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"test": 3})
    rows = DataFolder(data_dir).labelled_rows("test")
    p_dog = np.where(rows["y"] == 1, 0.8, 0.3)
    p_dog[0] = 1.0 - p_dog[0]  # one confident mistake for the top-losses grid
    out = tmp_path / "run"
    predictions = write_csv(predictions_frame(rows, p_dog), out / "predictions.csv")
    metrics = binary_metrics(rows["y"].to_numpy(), p_dog)
    history = {"loss": [0.7, 0.5], "val_loss": [0.6, 0.55], "accuracy": [0.5, 0.8], "val_accuracy": [0.6, 0.7]}
    (out / "h.json").write_text(json.dumps(history))
    (out / "f.json").write_text(json.dumps(history))
    histories = {"head:resnet50": str(out / "h.json"), "fine_tune": str(out / "f.json")}
    plots = make_plots(out, DataFolder(data_dir), predictions, metrics, histories)
    assert set(plots) == {"head_curves", "fine_tune_curves", "roc_curve", "confusion_matrix", "top_losses"}
    for path in plots.values():
        width, height = _is_png(path)
        assert width > 100 and height > 100
    assert not list((out / "plots").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_top_losses_plot_without_mistakes_and_plots_without_fine_tuning(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"test": 2})
    rows = DataFolder(data_dir).labelled_rows("test")
    p_dog = np.where(rows["y"] == 1, 0.9, 0.1)
    out = tmp_path / "run"
    predictions = write_csv(predictions_frame(rows, p_dog), out / "predictions.csv")
    (out / "h.json").write_text(json.dumps({"loss": [0.5], "val_loss": [0.4]}))
    metrics = binary_metrics(rows["y"], p_dog)
    plots = make_plots(out, DataFolder(data_dir), predictions, metrics, {"head:vgg16": str(out / "h.json")})
    assert "fine_tune_curves" not in plots
    _is_png(plots["top_losses"])


def test_confusion_plot_is_a_png(tmp_path):
    _is_png(plot_confusion([[3, 0], [1, 4]], tmp_path / "cm.png"))


def test_plots_of_many_classes_stay_bounded_and_show_the_most_confused_and_worst_classes(tmp_path):
    """60 classes of 3 test images each (200 once drew an 18,050 x 18,000 px matrix in 85 s and 10.6 GB)."""
    count = 60
    classes = ClassMap.from_names([f"class_{index:02d}" for index in range(count)])
    labels = np.repeat(np.arange(count), 3)
    said = labels.copy()
    said[2::3] = (labels[2::3] + 1) % count  # every class's third image called the next class
    said[labels == 7] = 12  # and class 7 always called class 12
    scores = np.full((len(labels), count), 0.1 / (count - 1))
    scores[np.arange(len(labels)), said] = 0.9
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (labels, said), 1)
    assert {7, 12} <= set(most_confused(matrix)) and len(most_confused(matrix)) == MAX_PLOTTED_CLASSES
    one_mistake = np.diag([3] * count)
    one_mistake[4, 5] = 1
    assert list(most_confused(one_mistake)) == [4, 5]  # classes without a mistake are not "confused"
    width, height = _is_png(plot_confusion(matrix.tolist(), tmp_path / "cm.png", classes))
    assert max(width, height) < 0.9 * MAX_PLOTTED_CLASSES * 100 + 200  # about 20 classes' worth, not 60
    width, height = _is_png(plot_roc(labels, scores, tmp_path / "roc.png", 0.98, classes))
    assert max(width, height) <= 800
