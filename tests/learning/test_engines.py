"""The OpenVINO engine: the same features as Keras, its IR kept and reused, `--engine auto` measured once, int8.

OpenVINO runs the Keras feature model converted to IR (on TensorFlow here; on JAX through a
TensorFlow child process, which the JAX job of the test command exercises in
tests/models/test_served_model_env.py and the champion's serving tests), so its features
must equal Keras' to float32 rounding. `auto` times both once per host and caches the verdict
like `--precision auto`; int8 is NNCF's quantization calibrated on train images only, and a
run reports what it costs the head.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from tasks.common.devices import backend
from tasks.common.errors import ConfigError
from tasks.data.datafolder import DataFolder
from tasks.learning import engines, openvino_engine, quantize
from tasks.learning.backbones import build_backbone
from tasks.learning.features import extract_features
from tasks.learning.head import HeadParams, fit_head, save_model
from tasks.learning.precision import host_id, verdict_key
from tasks.learning.shards import engine_dir, load_split_features
from tests.prepared import make_prepared_dir

BACKBONE = "vgg16"  # the cheapest backbone to build and convert at 32 px
SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared folder and a kept random VGG16 (the weights every engine computes with)."""
    root = tmp_path_factory.mktemp("engines")
    data_dir = make_prepared_dir(root, {"train": 6, "validation": 3, "test": 2})
    weights = root / "backbone.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    return data_dir, str(weights)


def test_openvino_features_equal_keras_features_and_its_ir_is_converted_once(prepared, monkeypatch):
    data_dir, weights = prepared
    folder = DataFolder(data_dir)
    by_keras = extract_features(data_dir, BACKBONE, weights, SIZE, precision="float32", engine="keras")
    by_openvino = extract_features(data_dir, BACKBONE, weights, SIZE, precision="float32", engine="openvino")
    assert by_openvino.cache_dir == by_keras.cache_dir + "-openvino" and by_openvino.engine == "openvino"
    for split in ("train", "validation", "test"):
        keras_x, keras_y, _ = load_split_features(folder, by_keras.cache_dir, split)
        openvino_x, openvino_y, _ = load_split_features(folder, by_openvino.cache_dir, split)
        np.testing.assert_array_equal(keras_y, openvino_y)
        assert np.linalg.norm(openvino_x - keras_x) <= 1e-4 * np.linalg.norm(keras_x), split
    assert openvino_engine.has_ir(engine_dir(by_openvino.cache_dir))  # the IR lives with the features it computed
    assert sys.modules["openvino_telemetry"] is None  # OpenVINO's and NNCF's telemetry stubs, nothing sent

    # new images: the kept IR computes them, nothing is converted again (another process would read it too)
    from tasks.learning import extractor

    extractor.cached_extractor.cache_clear()
    monkeypatch.setattr(openvino_engine, "export_ir", lambda *args: pytest.fail("converted again"))
    make_prepared_dir(data_dir.parent, {"train": 1}, seed0=500)
    again = extract_features(data_dir, BACKBONE, weights, SIZE, precision="float32", engine="openvino")
    assert again.computed == 2 and again.reused == by_openvino.images


def test_auto_measures_openvino_against_keras_once_then_reuses_the_verdict(prepared, monkeypatch, caplog):
    data_dir, weights = prepared
    folder = DataFolder(data_dir)
    ir_dir = str(quantize.float32_ir_dir(folder, BACKBONE, weights, SIZE, "auto"))
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        chosen, why = engines.resolve_engine(folder, BACKBONE, weights, SIZE, "auto", ir_dir, gpu_list=())
    path = folder.engine_verdict(verdict_key(BACKBONE, SIZE, backend(), host_id()))
    verdict = json.loads(path.read_text())
    assert chosen == verdict["engine"] == engines.decide(verdict["keras_s"], verdict["openvino_s"])[0]
    assert f"{verdict['speedup']:.2f}x Keras/" in why and "measured now" in why and str(path) in why
    assert any(chosen in record.getMessage() for record in caplog.records)

    monkeypatch.setattr(engines, "time_engines", lambda *args: pytest.fail("measured twice"))
    assert engines.resolve_engine(folder, BACKBONE, weights, SIZE, "auto", ir_dir, gpu_list=())[0] == chosen
    # a GPU runs Keras by rule, and a forced engine is never measured
    assert engines.resolve_engine(folder, BACKBONE, weights, SIZE, "auto", ir_dir, gpu_list=(("H200", (9, 0)),))[0] \
        == "keras"
    assert engines.resolve_engine(folder, BACKBONE, weights, SIZE, "keras", ir_dir) == ("keras", "keras as configured")


def test_without_openvino_auto_is_keras_and_openvino_is_refused_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_engine, "installed", lambda: False)
    folder = DataFolder(tmp_path / "data")
    chosen, why = engines.resolve_engine(folder, BACKBONE, "unused", SIZE, "auto", str(tmp_path), gpu_list=())
    assert chosen == "keras" and "not installed" in why and not folder.engine_verdicts.exists()
    with pytest.raises(ConfigError, match=r"--engine openvino needs OpenVINO, which is not installed here; pip install"):
        engines.resolve_engine(folder, BACKBONE, "unused", SIZE, "openvino", str(tmp_path))


def test_int8_is_calibrated_on_train_images_only_and_reports_what_it_costs_the_head(prepared, monkeypatch):
    data_dir, weights = prepared
    folder = DataFolder(data_dir)
    monkeypatch.setattr(quantize, "CALIBRATION_IMAGES", 5)
    summary = extract_features(data_dir, BACKBONE, weights, SIZE, precision="int8", engine="openvino")
    assert summary.cache_dir.endswith("-32-int8-" + backend() + "-opencv-openvino")
    calibration = json.loads((engine_dir(summary.cache_dir) / "calibration.json").read_text())
    train = folder.split_rows("train")["sha256"].tolist()
    assert calibration["images"] == 5 and set(calibration["sha256"]) <= set(train)  # never validation or test
    assert calibration["sha256"] == sorted(train)[:5]  # the same images for every run of this data

    x, y, _ = load_split_features(folder, summary.cache_dir, "train")
    head, _ = fit_head(x, y, *load_split_features(folder, summary.cache_dir, "validation")[:2],
                       HeadParams(dense_units=8, dropout=0.0, learning_rate=1e-2, epochs=3, batch_size=8, patience=3))
    head_path = save_model(head, data_dir.parent / "head.keras")
    check = quantize.int8_check(folder, BACKBONE, weights, SIZE, "opencv", summary.cache_dir, head_path)
    assert check.images == 6 and check.calibration_images == 5
    assert set(check.int8) == set(check.float32) == {"accuracy", "roc_auc", "log_loss"}
    assert 0 < check.feature_relative_l2 < 0.5 and 0 <= check.max_probability_gap < 1
