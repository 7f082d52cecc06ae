"""bfloat16 features are good enough: a head trained on them scores the test split as one trained on float32."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import build_backbone
from tasks.learning.evaluate import binary_metrics
from tasks.learning.features import extract_features
from tasks.learning.shards import load_split_features
from tasks.learning.head import HeadParams, fit_head
from tests.prepared import make_prepared_dir

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)

BACKBONE = "efficientnetv2b0"  # a random EfficientNetV2 at 32 px still separates the generated classes
SIZE = 32


def test_a_head_on_bfloat16_features_matches_one_on_float32_features(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 16, "validation": 6, "test": 8})
    folder = DataFolder(data_dir)
    weights = tmp_path / "backbone.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    params = HeadParams(dense_units=16, dropout=0.2, learning_rate=1e-2, epochs=20, batch_size=8, patience=5, seed=3)
    accuracy = {}
    for precision in ("float32", "bfloat16"):
        cache = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16, precision=precision).cache_dir
        splits = {split: load_split_features(folder, cache, split)[:2] for split in ("train", "validation", "test")}
        head, _ = fit_head(*splits["train"], *splits["validation"], params)
        test_x, test_y = splits["test"]
        p_dog = np.asarray(head.predict(test_x, verbose=0)).reshape(-1)
        accuracy[precision] = binary_metrics(test_y, p_dog)["accuracy"]
    assert accuracy["float32"] >= 0.8, accuracy  # the features carry the classes at all
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 1 / 16 + 1e-9, accuracy  # at most one test image apart
