"""Any image classes end to end, in-process: five pre-split classes through prepare, train (fine-tuned softmax)
and the served model. The command-line story (three class folders -> `python -m flows.retrain` -> a champion
served by a real `mlflow models serve` -> `python -m flows.predict`) is the README's own "Your own classes"
block, run as pasted by the README walk (tests/test_readme.py).

Generated classes differ by hue and texture (tests/imagegen.py `write_class_folders`), so a random
VGG16 at 32 px plus a trained softmax head tells them apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.imagegen import indexed_image_bytes, write_class_folders

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
    assert sorted(path.name for path in (data_dir / "arranged" / "test").iterdir()) == [n.title() for n in FIVE]

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
