"""Precision: bfloat16 features are good enough, and `--precision auto` measures where bfloat16 pays.

A head trained on bfloat16 features scores the test split as one trained on float32; on a CPU,
"auto" times the backbone both ways once per host, caches the verdict and says why.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tasks.common.devices import backend
from tasks.data.datafolder import DataFolder
from tasks.learning import precision
from tasks.learning.backbones import build_backbone
from tasks.learning.evaluate import binary_metrics
from tasks.learning.features import extract_features
from tasks.learning.shards import load_split_features
from tasks.learning.head import HeadParams, fit_head
from tests.prepared import make_prepared_dir

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)

BACKBONE = "vgg16"  # a random VGG16 at 32 px separates the generated classes, and is the cheapest to build
SIZE = 32


def test_a_head_on_bfloat16_features_matches_one_on_float32_features(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 16, "validation": 6, "test": 8})
    folder = DataFolder(data_dir)
    weights = tmp_path / "backbone.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    params = HeadParams(dense_units=16, dropout=0.2, learning_rate=1e-2, epochs=20, batch_size=8, patience=5, seed=3)
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        cache = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16, precision=dtype).cache_dir
        splits = {split: load_split_features(folder, cache, split)[:2] for split in ("train", "validation", "test")}
        head, _ = fit_head(*splits["train"], *splits["validation"], params)
        test_x, test_y = splits["test"]
        p_dog = np.asarray(head.predict(test_x, verbose=0)).reshape(-1)
        accuracy[dtype] = binary_metrics(test_y, p_dog)["accuracy"]
    assert accuracy["float32"] >= 0.8, accuracy  # the features carry the classes at all
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 1 / 16 + 1e-9, accuracy  # at most one test image apart


# ------------------------------------------------------------------ what --precision auto measures on a CPU


def test_auto_measures_bfloat16_against_float32_once_then_reuses_the_cached_verdict(tmp_path, caplog, monkeypatch):
    folder = DataFolder(tmp_path / "data")
    weights = tmp_path / "backbone.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        chosen, why = precision.resolve_precision(folder, BACKBONE, str(weights), SIZE, "auto")
    assert not caplog.records  # the train flow says it, once per backbone (the README walk counts it)
    path = folder.precision_verdict(precision.verdict_key(BACKBONE, SIZE, backend(), precision.host_id()))
    verdict = json.loads(path.read_text())
    assert verdict["float32_s"] > 0 and verdict["bfloat16_s"] > 0
    assert verdict["speedup"] == pytest.approx(verdict["float32_s"] / verdict["bfloat16_s"], rel=1e-3)
    assert chosen == verdict["precision"] == precision.decide(verdict["float32_s"], verdict["bfloat16_s"])[0]
    assert f"{verdict['speedup']:.2f}x float32" in why and "measured now" in why and str(path) in why

    monkeypatch.setattr(precision, "time_precisions", lambda *args, **kwargs: pytest.fail("measured twice"))
    again, why_again = precision.resolve_precision(folder, BACKBONE, str(weights), SIZE, "auto")
    assert again == chosen and "measured earlier" in why_again and json.loads(path.read_text()) == verdict


def test_a_forced_precision_never_measures(tmp_path, monkeypatch):
    folder = DataFolder(tmp_path / "data")
    monkeypatch.setattr(precision, "time_precisions", lambda *args, **kwargs: pytest.fail("a forced precision ran"))
    for forced in ("float32", "bfloat16"):
        assert precision.resolve_precision(folder, BACKBONE, "unused", SIZE, forced) == (forced, f"{forced} as configured")
    assert not folder.precision_verdicts.exists()


def test_an_unreadable_verdict_is_measured_again(tmp_path, monkeypatch):
    folder = DataFolder(tmp_path / "data")
    path = folder.precision_verdict(precision.verdict_key(BACKBONE, SIZE, backend(), precision.host_id()))
    path.parent.mkdir(parents=True)
    path.write_text("{ half a file")
    measured = []
    monkeypatch.setattr(precision, "time_precisions",
                        lambda *args, **kwargs: measured.append(args) or {"float32": 0.30, "bfloat16": 0.20})
    assert precision.measured_precision(folder, BACKBONE, "unused", SIZE)[0] == "bfloat16"
    assert len(measured) == 1 and json.loads(path.read_text())["speedup"] == pytest.approx(1.5)


@pytest.mark.parametrize("float32_s, bfloat16_s, expected", [
    (1.0, 0.6, "bfloat16"),   # 1.67x, as measured quiet on this project's EPYC (TensorFlow)
    (1.0, 0.9, "bfloat16"),   # 1.11x: just over the margin
    (1.0, 0.95, "float32"),   # 1.05x: noise, not worth bfloat16's rounding
    (1.0, 1.3, "float32"),    # 0.77x, as on a Xeon with avx512_bf16 and no AMX
])
def test_bfloat16_must_beat_float32_by_the_margin(float32_s, bfloat16_s, expected):
    assert precision.decide(float32_s, bfloat16_s)[0] == expected


def test_verdicts_are_kept_apart_by_host_backbone_size_and_backend():
    keys = {precision.verdict_key(*args) for args in [("resnet50", 224, "jax", "a"), ("resnet50", 224, "jax", "b"),
                                                      ("vgg16", 224, "jax", "a"), ("resnet50", 32, "jax", "a"),
                                                      ("resnet50", 224, "tensorflow", "a")]}
    assert len(keys) == 5
    assert precision.host_id() == precision.host_id() and "/" not in precision.host_id()
