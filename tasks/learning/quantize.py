"""`--precision int8`: NNCF's post-training quantization of the OpenVINO IR, and what it costs the head.

Why it is built this way:
- int8 is opt-in and OpenVINO only. NNCF calibrates the quantizers on at most
  CALIBRATION_IMAGES images of the *train* split (never validation or test, whose numbers must
  stay an honest estimate), the first ones in sha256 order: the same images for every run of
  the same data, decoded by the run's own decoder.
- The calibrated IR is a cached artifact like the features it computes: it lives in the int8
  feature cache's folder with calibration.json (which images), and is made once, before any
  shard runs, so every worker reads the same quantizers. The float32 IR it is made from is the
  float32 OpenVINO feature cache's, converted there if new.
- int8 features are not the float32 features: on random weights they differed by relative L2
  0.17-0.31 (issue 27), and only the head's verdicts can say whether that matters. So a run at
  int8 extracts a validation sample both ways and scores it with the same head (`int8_check`):
  the summary and MLflow show the head's validation metrics on int8 next to float32.
- The shipped end-to-end model is quantized the same way on the same images
  (`shipped_ir`), so what is served computes what the head was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.results import Int8Check
from tasks.data.datafolder import DataFolder
from tasks.learning import openvino_engine
from tasks.learning.extractor import cached_extractor, feature_model, shared_decoder
from tasks.learning.shards import engine_dir, feature_cache_dir, load_features

CALIBRATION_IMAGES = 300
"""Train images NNCF calibrates on at most (NNCF's default subset is 300 too)."""

CHECK_IMAGES = 300
"""Validation images at most that an int8 run extracts both ways for `int8_check`."""


def calibration_images(folder: DataFolder, size: int, decoder: str,
                       limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """(uint8 images, their sha256) of the first `limit` (CALIBRATION_IMAGES) train images that decode, in sha256
    order."""
    rows = folder.split_rows("train").sort_values("sha256").head(limit or CALIBRATION_IMAGES)
    images, ids = [], []
    for batch in shared_decoder(size, 32, decoder=decoder).batches(rows["path"].tolist()):
        for row, error in enumerate(batch.errors):
            if not error:
                images.append(batch.pixels[row].copy())
                ids.append(str(rows["sha256"].iloc[batch.start + row]))
    return images, ids


def float32_ir_dir(folder: DataFolder, backbone: str, weights: str, size: int, decoder: str,
                   view: str = "plain") -> Path:
    """The float32 OpenVINO feature cache's IR folder: what int8 is quantized from, and what auto measures."""
    return engine_dir(feature_cache_dir(folder, backbone, weights, size, "float32", decoder, "openvino", view))


def quantized_feature_ir(folder: DataFolder, backbone: str, weights: str, size: int, decoder: str,
                         cache_dir: str | os.PathLike[str], view: str = "plain") -> Path:
    """The int8 IR of an int8 feature cache, quantized now (from the float32 IR, on train images) if it is new.

    A mirrored view's model mirrors inside, so it is calibrated on the same (plain) train images."""
    target = engine_dir(cache_dir)
    if openvino_engine.has_ir(target):
        return openvino_engine.ir_path(target)
    source = float32_ir_dir(folder, backbone, weights, size, decoder, view)
    if not openvino_engine.has_ir(source):
        openvino_engine.export_ir(feature_model(backbone, weights, size, "float32", view), source)
    images, ids = calibration_images(folder, size, decoder)
    return openvino_engine.quantize_ir(openvino_engine.ir_path(source), target, images, ids)


def shipped_ir(model: Any, target: str | os.PathLike[str], precision: str, folder: DataFolder, size: int,
               decoder: str) -> Path:
    """An end-to-end Keras model as the IR in `target` (replacing what is there): float32, or int8 calibrated on the
    same train images as its features, so what is served computes what the head was trained on.

    The IR has the model's probabilities as its first output and its head's input as its second
    (tasks/learning/head_input.py), so the served model can log what it saw without a second pass;
    whoever reads only the first output reads the model as before."""
    from tasks.learning.head_input import with_head_input

    model = with_head_input(model)
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)  # the model changed since (fine-tuning)
    if precision != "int8":
        return openvino_engine.export_ir(model, target)
    with tempfile.TemporaryDirectory(prefix=".float32-ir-", dir=target.parent) as scratch:
        source = openvino_engine.export_ir(model, Path(scratch) / "float32")
        images, ids = calibration_images(folder, size, decoder)
        return openvino_engine.quantize_ir(source, target, images, ids)


def int8_check(folder: DataFolder, backbone: str, weights: str, size: int, decoder: str,
               int8_cache_dir: str | os.PathLike[str], head_path: str | os.PathLike[str],
               limit: int | None = None) -> Int8Check:
    """The head's validation metrics on int8 features (the run's cache) vs float32 OpenVINO features of the same images."""
    import keras

    from tasks.learning.backbones import weights_fingerprint
    from tasks.learning.evaluate import class_metrics
    from tasks.learning.forward import run_ahead
    from tasks.learning.shards import shard_index

    index = shard_index(int8_cache_dir)
    rows = folder.split_rows("validation")
    rows = rows[rows["sha256"].isin(list(index.rows))].head(limit or CHECK_IMAGES)
    int8 = load_features(int8_cache_dir, rows["sha256"].tolist(), index)
    _, forward = cached_extractor(backbone, weights, size, "float32", weights_fingerprint(weights), "openvino",
                                  str(float32_ir_dir(folder, backbone, weights, size, decoder)))
    float32 = np.empty_like(int8)
    for batch, outputs in run_ahead(forward, shared_decoder(size, 32, decoder=decoder).batches(rows["path"].tolist()),
                                    lambda b: b.pixels):
        float32[batch.start:batch.start + len(outputs)] = outputs
    head = keras.saving.load_model(head_path, safe_mode=True)
    classes = folder.classes()
    labels = rows["y"].to_numpy()
    scores = {name: np.asarray(head.predict(x, verbose=0)) for name, x in (("float32", float32), ("int8", int8))}
    if classes.binary:
        scores = {name: value.reshape(-1) for name, value in scores.items()}

    def summary(values: np.ndarray) -> dict[str, float | None]:
        metrics = class_metrics(labels, values, classes)
        return {key: metrics[key] for key in ("accuracy", "roc_auc", "log_loss")}

    calibration = openvino_engine.ir_path(engine_dir(int8_cache_dir)).with_name("calibration.json")
    return Int8Check(images=len(rows), calibration_images=int(json.loads(calibration.read_text())["images"]),
                     float32=summary(scores["float32"]), int8=summary(scores["int8"]),
                     feature_relative_l2=float(np.linalg.norm(int8 - float32) / max(np.linalg.norm(float32), 1e-12)),
                     max_probability_gap=float(np.max(np.abs(scores["int8"] - scores["float32"]))) if len(rows) else 0.0)
