"""Any image classes end to end: three class folders -> `python -m flows.retrain` -> a registered champion
-> a real `mlflow models serve` that answers three probabilities -> `python -m flows.predict` writing
`id,label,<class probabilities>`; and five pre-split classes through prepare, train and the served model in-process.

Generated classes differ by hue and texture (tests/imagegen.py `write_class_folders`), so a random
VGG16 at 32 px plus a trained softmax head tells them apart; a fresh sqlite MLflow store per test.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.imagegen import indexed_image_bytes, write_class_folders
from tests.test_readme import served_model

FOLDERS = ["Daisy", "Red Roses", "tulips"]
CLASSES = ["daisy", "red_roses", "tulips"]
TINY_FLAGS = ["--weights", "none", "--backbones", "vgg16", "--input-size", "32", "--batch-size", "16",
              "--epochs", "30", "--dense-units", "16", "--patience", "5", "--split-fractions", "0.6", "0.2", "0.2",
              "--floor", "0", "--min-per-class", "10", "--min-per-class-per-split", "1",
              "--max-class-imbalance", "10", "--max-quarantined-share", "0.2"]


@pytest.mark.slow
def test_three_class_folders_retrain_to_a_champion_that_serves_three_probabilities(mlflow_uri, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from flows.predict import main as predict_main
    from flows.retrain import main as retrain_main

    source = write_class_folders(tmp_path / "flowers", FOLDERS, per_class=15)
    data_dir = tmp_path / "data"

    assert retrain_main(["--source", str(source), "--data-dir", str(data_dir), "--model-name", "flowers",
                         *TINY_FLAGS]) == 0, \
        capsys.readouterr().err
    assert "| split | daisy | red_roses | tulips |" in capsys.readouterr().out

    client = MlflowClient(tracking_uri=mlflow_uri)
    champion = client.get_model_version_by_alias("flowers", "champion")  # its own registered model
    assert not client.search_registered_models("name='cats-vs-dogs'")
    run = client.get_run(champion.run_id)
    assert run.data.params["data.classes"] == "daisy,red_roses,tulips"
    assert run.data.metrics["test_accuracy"] > run.data.metrics["test_chance_accuracy"]
    assert {"test_macro_f1", "test_roc_auc", "test_recall_red_roses"} <= set(run.data.metrics)
    assert json.loads((data_dir / "classes.json").read_text())["names"] == CLASSES

    with served_model("models:/flowers@champion", mlflow_uri, tmp_path) as server:
        cells = [[base64.b64encode(indexed_image_bytes(index, 3, 900 + index)).decode("ascii")] for index in range(3)]
        cells.append(["%%% not base64 %%%"])
        response = httpx.post(f"{server.url}/invocations", timeout=300,
                              json={"dataframe_split": {"columns": ["image"], "data": cells}})
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert list(rows[0]) == ["p_daisy", "p_red_roses", "p_tulips", "label", "label_index", "error"]
    for row in rows[:3]:
        probabilities = [row[f"p_{name}"] for name in CLASSES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == CLASSES[int(np.argmax(probabilities))] == CLASSES[row["label_index"]]
    assert sum(row["label"] == name for row, name in zip(rows, CLASSES)) >= 2
    assert rows[3]["label"] == "" and rows[3]["p_daisy"] is None and "base64" in rows[3]["error"]

    unseen = write_class_folders(tmp_path / "new", FOLDERS, per_class=2, seed0=5000)
    output = tmp_path / "predictions.csv"
    assert predict_main([str(unseen), "--output-csv", str(output), "--data-dir", str(data_dir),
                         "--model-uri", "models:/flowers@champion"]) == 0, \
        capsys.readouterr().err
    table = pd.read_csv(output)
    assert list(table.columns) == ["id", "label", "p_daisy", "p_red_roses", "p_tulips"]
    assert len(table) == 6 and set(table["label"]) <= set(CLASSES)
    assert np.allclose(table[["p_daisy", "p_red_roses", "p_tulips"]].sum(axis=1), 1.0, atol=1e-4)


FIVE = ["apple", "banana", "cherry", "damson", "elder"]


@pytest.mark.slow
def test_five_presplit_classes_prepare_train_and_predict_in_process(tmp_path):
    from flows.config import DataConfig, QualityConfig, TrainConfig
    from flows.prepare import prepare_data
    from flows.train import train_model
    from tasks.common.labels import class_map
    from tasks.data.validate import ValidationThresholds
    from tasks.models.pyfunc import CatsDogsModel, load_keras_model

    source = write_class_folders(tmp_path / "fruit", [name.title() for name in FIVE],
                                 splits={"train": 6, "validation": 2, "test": 2})
    data_dir = tmp_path / "data"
    thresholds = ValidationThresholds(min_per_class=10, min_per_class_per_split=1, max_class_imbalance=10.0,
                                      max_quarantined_share=0.2)
    prepared = prepare_data(DataConfig(source=str(source), data_dir=str(data_dir), thresholds=thresholds))
    assert prepared.layout == "presplit_classes" and prepared.classes == FIVE
    assert prepared.counts["test"] == dict.fromkeys(FIVE, 2)  # the source's own splits are kept
    assert sorted(path.name for path in (data_dir / "arranged" / "test").iterdir()) == FIVE

    # Each generated class is ten images of one hue and texture, at 32 px as alike as copies: the data audit
    # rightly pairs them across splits as near-copies, which here is not what the test is about.
    look_alikes = QualityConfig(max_leaked_test_share=1.0)
    trained = train_model(data_dir, TrainConfig(backbones=["vgg16"], weights=None, input_size=32, batch_size=16,
                                                head_epochs=30, dense_units=16, patience=5, class_weight="balanced",
                                                fine_tune=True, fine_tune_epochs=1), quality=look_alikes)
    assert trained.quality.leaked_test_images >= 5  # one near-copy in train at least, per class
    assert trained.fine_tune is not None and trained.fine_tune.epochs_run == 1  # the softmax fine-tunes too
    metrics = trained.test_metrics
    assert len(metrics["confusion_matrix"]) == 5 and all(len(row) == 5 for row in metrics["confusion_matrix"])
    assert metrics["accuracy"] > metrics["chance_accuracy"] == pytest.approx(0.2)
    assert metrics["roc_auc"] is not None and {f"recall_{name}" for name in FIVE} <= set(metrics)
    predictions = pd.read_csv(trained.predictions_path)
    assert list(predictions.columns) == ["path", "sha256", "label", "predicted", *(f"p_{name}" for name in FIVE)]
    assert set(trained.plots) >= {"roc_curve", "confusion_matrix", "top_losses"}

    model = CatsDogsModel().attach(load_keras_model(trained.model_path), trained.input_size, trained.decoder,
                                   class_map(FIVE))
    answer = model.predict(None, pd.DataFrame({"image": [indexed_image_bytes(index, 5, 7000 + index)
                                                         for index in range(5)] + [b"not an image"]}))
    assert list(answer.columns) == [*(f"p_{name}" for name in FIVE), "label", "label_index", "error"]
    assert np.allclose(answer[[f"p_{name}" for name in FIVE]].iloc[:5].astype(float).sum(axis=1), 1.0, atol=1e-4)
    assert sum(answer["label"].iloc[:5] == FIVE) >= 3
    assert answer["label"].iloc[5] == "" and answer["error"].iloc[5]
