"""A logged model as a standalone artifact (OpenVINO IR, ONNX or a TensorFlow SavedModel), checked against MLflow.

Why it is built this way:
- What is exported is the logged Keras model itself (the `keras_model` artifact), whatever it
  holds: the backbone's preprocessing, the backbone and the head, and anything later added to
  it. It takes uint8 RGB pixels (n, size, size, 3) and answers the model's probabilities, so
  a user needs only the runtime of the format and a resize to the input size (README
  "Using an exported model").
- Keras writes every format (`model.export`): OpenVINO IR and a SavedModel on any backend
  (OpenVINO through tasks/learning/openvino_engine.py, which converts on TensorFlow), ONNX
  through tf2onnx on TensorFlow (the `export` extra).
- Parity is checked before the artifact gets its name: a few images scored by the exported
  artifact in its own runtime (OpenVINO at float32, ONNX Runtime, TensorFlow) against the MLflow
  model computed by Keras. The largest probability difference is reported; above the
  tolerance of the model's precision (1e-4 for float32) the export fails and nothing is left.
  Where the MLflow model is served on another engine or precision (OpenVINO, int8), that
  difference is reported too.
- The folder is written atomically with export.json beside the model: input and output
  contract, classes, decoder, the source model and the parity figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tasks.common.errors import ConfigError
from tasks.common.files import atomic_directory
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.learning.openvino_engine import without_augmentation
from tasks.models.pyfunc import KERAS_ARTIFACT, load_keras_model, model_input_size

FORMATS: tuple[str, ...] = ("openvino", "onnx", "savedmodel")

TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "int8": 1e-4}
"""Largest probability difference allowed between the export and the MLflow model computed by Keras, by the
model's precision (an int8 model's Keras model is float32: OpenVINO quantizes only its IR)."""

PARITY_IMAGES = 8

FILES = {"openvino": "openvino/model.xml", "onnx": "model.onnx", "savedmodel": "saved_model"}
"""Where each format's model is in the export folder (OpenVINO's model.bin beside its model.xml)."""


class ExportResult(BaseModel):
    """What was written and how well it agrees with the MLflow model."""

    output: str
    artifact: str
    format: str
    model_uri: str
    input_size: int
    classes: list[str]
    images: int
    max_difference: float
    """Largest probability difference to the MLflow model computed by Keras."""
    tolerance: float
    served_engine: str
    served_precision: str
    max_difference_served: float
    """Largest probability difference to the MLflow model as it is served (its own engine and precision)."""


def _logged_model(model_uri: str) -> tuple[Path, dict[str, Any]]:
    """(local folder of the logged pyfunc model, its config), one sentence when the URI points nowhere."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.models.registry import check_model_uri

    check_model_uri(model_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    except (MlflowException, OSError) as error:
        raise ConfigError(f"Cannot load the model '{model_uri}' ({str(error).splitlines()[0]}); check the URI.") \
            from None
    return local, dict(flavor.get("config") or {})


def _keras_file(local: Path) -> Path:
    found = sorted(local.glob("artifacts/**/*.keras")) or sorted(local.rglob("*.keras"))
    if not found:
        raise ConfigError(f"The model in {local} has no {KERAS_ARTIFACT} (.keras) artifact; export needs a model "
                          "logged by this project.")
    return found[0]


def _write(model: Any, format: str, target: Path, size: int) -> Path:
    """Write `model` in `format` at `target` (a file, or the SavedModel's folder)."""
    import keras

    model = without_augmentation(model)
    if format == "openvino":
        from tasks.learning.openvino_engine import export_ir

        return export_ir(model, target.parent)
    if keras.config.backend() != "tensorflow":
        raise ConfigError(f"--format {format} is written by TensorFlow; run the export with "
                          "KERAS_BACKEND=tensorflow (the default).")
    model(np.zeros((1, size, size, 3), np.uint8))  # Keras exports only a model that has been called
    if format == "onnx":
        import importlib.util

        if importlib.util.find_spec("tf2onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("--format onnx needs tf2onnx and onnxruntime; pip install -e '.[export]'.")
        model.export(str(target), format="onnx", verbose=False)
    else:
        model.export(str(target), format="tf_saved_model", verbose=False)
    return target


def _run_exported(format: str, path: Path, pixels: np.ndarray) -> np.ndarray:
    """The exported artifact's outputs for `pixels`, in its own runtime (as a user without this project runs it)."""
    if format == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(compiled(pixels)[0], dtype=np.float64)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: pixels})[0], dtype=np.float64)
    import tensorflow as tf

    return np.asarray(tf.saved_model.load(str(path)).serve(pixels), dtype=np.float64)


def _mlflow_probabilities(model_uri: str, pixels: np.ndarray, classes: ClassMap, engine: str = "auto") -> np.ndarray:
    """The MLflow model's probability columns for `pixels` (p(positive), or one per class), through pyfunc on `engine`
    (the parity images are not traffic: nothing goes to its prediction log)."""
    import pandas as pd

    from tasks.models.registry import load_pyfunc

    model = load_pyfunc(model_uri, engine, prediction_log=False)
    frame = model.predict(pd.DataFrame({"pixels": list(pixels)}))
    return frame[list(classes.probability_columns)].to_numpy(dtype=np.float64)


def parity_pixels(size: int, count: int = PARITY_IMAGES) -> np.ndarray:
    """A few fixed images: flat colours, gradients and noise, the same for every export."""
    rng = np.random.default_rng(27)
    yy, xx = np.mgrid[0:size, 0:size]
    images = [np.full((size, size, 3), value, np.uint8) for value in (0, 128, 255)]
    images += [np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), 255 - xx * 255 // max(size - 1, 1)],
                        axis=-1).astype(np.uint8)]
    images += [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(max(count - len(images), 0))]
    return np.stack(images[:count])


def export_model(model_uri: str, format: str, output: str | os.PathLike[str]) -> ExportResult:
    """Write the logged model at `model_uri` in `format` to the folder `output` (replaced whole), parity-checked."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is unknown; use one of {', '.join(FORMATS)}.")
    local, config = _logged_model(model_uri)
    classes = ClassMap.from_names(config["classes"]) if config.get("classes") else CATS_DOGS
    model = load_keras_model(_keras_file(local))
    size = model_input_size(model, config.get("input_size"))
    engine, precision = str(config.get("engine") or "keras"), str(config.get("precision") or "float32")
    pixels = parity_pixels(size)
    output = Path(output).expanduser().absolute()
    with atomic_directory(output) as building:
        artifact = _write(model, format, building / FILES[format], size)
        exported = _run_exported(format, artifact, pixels).reshape(len(pixels), -1)  # p(positive), or softmax
        by_keras = _mlflow_probabilities(model_uri, pixels, classes, engine="keras")
        served = by_keras if engine == "keras" else _mlflow_probabilities(model_uri, pixels, classes)
        result = ExportResult(
            output=str(output), artifact=str(output / artifact.relative_to(building)), format=format,
            model_uri=model_uri, input_size=size, classes=list(classes.names), images=len(pixels),
            max_difference=float(np.max(np.abs(exported - by_keras))), tolerance=TOLERANCES.get(precision, 1e-4),
            served_engine=engine, served_precision=precision,
            max_difference_served=float(np.max(np.abs(exported - served))))
        if result.max_difference > result.tolerance:
            raise ConfigError(f"The {format} export of {model_uri} differs from the MLflow model by up to "
                              f"{result.max_difference:.2e} in probability, above the {result.tolerance:g} allowed; "
                              "nothing was written (report it with the model's backbone and precision).")
        contract = {**result.model_dump(), "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC, RGB, 0..255",
                                                      "shape": [None, size, size, 3]},
                    "output": ("p(" + classes.names[1] + "), shape (n, 1)") if classes.binary
                    else f"softmax over {list(classes.names)}, shape (n, {len(classes.names)})",
                    "decoder": config.get("decoder"), "keras_backend": config.get("keras_backend")}
        (building / "export.json").write_text(json.dumps(contract, indent=2) + "\n")
    return result
