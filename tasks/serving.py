"""The served model: an MLflow pyfunc that turns images into p(dog) and a label.

Users meet the model in three places: `mlflow models serve` (JSON over HTTP), the batch
`predict` flow, and `mlflow.pyfunc.load_model(...).predict(...)` in a notebook. All three go
through `CatsDogsModel.predict`, so decoding and resizing live here once, the same way
training did them (Pillow decode with EXIF orientation, RGB, bilinear `tf.image.resize` of
uint8 pixels to float32 0..255 at the model's input size).

Input (a pandas DataFrame; the signature declares both columns optional):

- column ``image``: encoded image bytes (JPEG, PNG, anything Pillow reads). The signature
  types it ``binary``, so MLflow's scoring server base64-decodes it from JSON for us:
  ``{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"]]}}``. A Python
  caller may also pass base64 text in this column.
- column ``pixels``: one RGB image per row as an array or nested list of shape (h, w, 3)
  (or (h, w) grey), values 0..255; any size, it is resized like an image. In JSON:
  ``{"dataframe_split": {"columns": ["pixels"], "data": [[[[[r, g, b], ...], ...]]]}}``.
  From Python: ``model.predict(pd.DataFrame({"pixels": list(batch)}))`` or
  ``model.predict({"pixels": batch})`` for a (n, h, w, 3) array.

One request should use one of the two columns per row; a row with both uses ``image``.
The unwrapped Python model (``loaded.unwrap_python_model()``) also accepts a bare
(n, h, w, 3) array, a single (h, w, 3) array, bytes or a list of bytes.

Output: a DataFrame with one row per input row: ``p_dog`` (float, NaN on error), ``label``
("cat"/"dog", "" on error), ``label_index`` (0/1, -1 on error) and ``error`` ("" or one
sentence). A corrupt image yields an error row, never an exception.

Heavy imports (TensorFlow, Keras, Pillow) stay inside functions: importing this module costs
only MLflow's import, and a server worker pays for TensorFlow once, in `load_context`.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from tasks.labels import CLASSES

IMAGE_COLUMN = "image"
"""Input column of encoded image bytes (base64 text in JSON)."""

PIXELS_COLUMN = "pixels"
"""Input column of RGB pixel arrays (h, w, 3), values 0..255."""

OUTPUT_COLUMNS: tuple[str, ...] = ("p_dog", "label", "label_index", "error")
"""Columns of every prediction frame, in order."""

KERAS_ARTIFACT = "keras_model"
"""Name of the `model.keras` artifact inside the logged pyfunc model."""

CUSTOM_OBJECT_MODULES: tuple[str, ...] = ("tasks.backbones", "tasks.features", "tasks.head", "tasks.finetune")
"""Modules imported before loading the Keras file so their registered serializable layers
(`@keras.saving.register_keras_serializable`) are known; a module that does not exist is skipped."""

DEFAULT_BATCH_SIZE = 64
"""Images per forward pass: bounds memory for large requests and batch prediction."""

THRESHOLD = 0.5
"""p(dog) at or above which the label is "dog" (dog = 1, the Kaggle convention)."""


@dataclass(frozen=True)
class Decoded:
    """One input row after decoding: pixels (h, w, 3) uint8/float, or the reason it failed."""

    pixels: np.ndarray | None
    error: str = ""


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array, applying the EXIF orientation.

    Training images were converted the same way (EXIF transpose, then RGB), so a phone
    photo taken sideways is seen upright here too. Raises ValueError with a readable reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P", "PA"):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("the bytes are not an image Pillow can read (JPEG, PNG, ...)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"the image cannot be decoded ({exc})") from None


def coerce_pixels(value: Any) -> np.ndarray:
    """Turn a pixel array or nested list into an (h, w, 3) float32 array of 0..255 values.

    Grey (h, w) or (h, w, 1) is repeated to RGB and an alpha channel is dropped, so callers
    need not care about channel layout. Raises ValueError when the shape or values are wrong.
    """
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the pixels are not a numeric array ({exc})") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"the pixels have shape {tuple(array.shape)}; expected (height, width, 3)")
    array = array[..., :3]
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ValueError("the pixel values must be finite numbers between 0 and 255")
    return array


def _decode_cell(value: Any, *, encoded: bool) -> Decoded:
    """Decode one cell of the `image` (encoded=True) or `pixels` column; never raises."""
    try:
        if encoded:
            if isinstance(value, str):
                try:
                    value = base64.b64decode(value, validate=False)
                except (binascii.Error, ValueError):
                    return Decoded(None, "the image text is not valid base64")
            if isinstance(value, (bytearray, memoryview, np.bytes_)):
                value = bytes(value)
            if not isinstance(value, bytes):
                return Decoded(None, f"the image must be encoded bytes, not {type(value).__name__}")
            return Decoded(decode_image(value))
        return Decoded(coerce_pixels(value))
    except ValueError as exc:
        return Decoded(None, str(exc))
    except Exception as exc:  # a per-image fault must never stop the batch
        return Decoded(None, f"the image could not be read ({type(exc).__name__}: {exc})")


def _is_missing(value: Any) -> bool:
    """True for None/NaN cells (a row that uses the other input column)."""
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def decode_inputs(model_input: Any) -> list[Decoded]:
    """Decode any supported input (see module docstring) into one `Decoded` per row."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({key: list(value) if isinstance(value, np.ndarray) else value
                                    for key, value in model_input.items()})
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame()
    if isinstance(model_input, pd.DataFrame):
        return _decode_frame(model_input)
    if isinstance(model_input, (bytes, bytearray)):
        return [_decode_cell(model_input, encoded=True)]
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return [_decode_cell(model_input, encoded=False)]
        if model_input.ndim == 4:
            return [_decode_cell(item, encoded=False) for item in model_input]
        raise ValueError(f"a pixel array must have shape (n, h, w, 3) or (h, w, 3), "
                         f"not {model_input.shape}")
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return [_decode_cell(item, encoded=isinstance(item, (bytes, bytearray, str)))
                for item in model_input]
    raise ValueError(f"unsupported input type {type(model_input).__name__}; pass a DataFrame "
                     f"with a column '{IMAGE_COLUMN}' (encoded bytes) or '{PIXELS_COLUMN}' (arrays)")


def _decode_frame(frame: pd.DataFrame) -> list[Decoded]:
    """Decode a DataFrame row by row, preferring `image` over `pixels` in each row."""
    has_image, has_pixels = IMAGE_COLUMN in frame.columns, PIXELS_COLUMN in frame.columns
    if not has_image and not has_pixels:
        raise ValueError(f"the input has columns {list(frame.columns)}; it needs a column "
                         f"'{IMAGE_COLUMN}' (encoded image bytes) or '{PIXELS_COLUMN}' (pixel arrays)")
    images = frame[IMAGE_COLUMN].tolist() if has_image else [None] * len(frame)
    pixels = frame[PIXELS_COLUMN].tolist() if has_pixels else [None] * len(frame)
    decoded = []
    for image, pixel in zip(images, pixels):
        if not _is_missing(image):
            decoded.append(_decode_cell(image, encoded=True))
        elif not _is_missing(pixel):
            decoded.append(_decode_cell(pixel, encoded=False))
        else:
            decoded.append(Decoded(None, f"the row has neither '{IMAGE_COLUMN}' nor '{PIXELS_COLUMN}'"))
    return decoded


def resize_batch(arrays: Sequence[np.ndarray], input_size: int) -> np.ndarray:
    """Resize images of any sizes to one (n, size, size, 3) float32 batch, as training did.

    Training resized uint8 pixels with bilinear `tf.image.resize` (no antialiasing) to
    float32 0..255 and left the backbone's preprocessing to the model itself; doing exactly
    the same here keeps served scores equal to the evaluated ones.
    """
    import tensorflow as tf

    batch = np.empty((len(arrays), input_size, input_size, 3), dtype=np.float32)
    for index, array in enumerate(arrays):
        if array.shape[:2] == (input_size, input_size):
            batch[index] = array.astype(np.float32)
        else:
            batch[index] = tf.image.resize(array, (input_size, input_size), method="bilinear").numpy()
    return batch


def predictions_frame(decoded: Sequence[Decoded], probabilities: dict[int, float]) -> pd.DataFrame:
    """Assemble the output frame: a probability for decoded rows, an error for the others."""
    rows = []
    for index, item in enumerate(decoded):
        if item.pixels is None or index not in probabilities:
            rows.append({"p_dog": float("nan"), "label": "", "label_index": -1,
                         "error": item.error or "the image could not be scored"})
            continue
        p_dog = probabilities[index]
        label_index = int(p_dog >= THRESHOLD)
        rows.append({"p_dog": p_dog, "label": CLASSES[label_index], "label_index": label_index,
                     "error": ""})
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype({"p_dog": "float64", "label": object, "label_index": "int64", "error": object})


def import_custom_objects(modules: Iterable[str] = CUSTOM_OBJECT_MODULES) -> list[str]:
    """Import the project modules that register custom Keras layers; return those imported.

    A `.keras` file names its custom layers by registered name, so the registering module
    must run before `load_model`. Only a missing module is tolerated; a module that exists
    but fails to import is a real error and propagates.
    """
    imported = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
        imported.append(name)
    return imported


def load_keras_model(path: str | Path) -> Any:
    """Load an end-to-end `.keras` model in safe mode, after registering custom layers."""
    import keras

    import_custom_objects()
    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def compiled_forward(model: Any, input_size: int) -> Any:
    """`model(x, training=False)` traced once for any batch size.

    A fixed input signature with an unknown batch dimension means the last, smaller batch
    of a request does not trigger a new trace (Keras' predict_on_batch would retrace).
    """
    import tensorflow as tf

    spec = tf.TensorSpec((None, input_size, input_size, 3), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def model_input_size(model: Any, configured: int | None = None) -> int:
    """The square input size the model expects: from the logged config, else its input shape."""
    if configured:
        return int(configured)
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    height, width = shape[1], shape[2]
    if not height or height != width:
        raise ValueError(f"the model input shape {shape} is not a fixed square image size")
    return int(height)


class CatsDogsModel(mlflow.pyfunc.PythonModel):
    """Scores images with the end-to-end Keras model logged as the `keras_model` artifact.

    Pickled by reference (`tasks.serving.CatsDogsModel`); the `tasks` package is logged as
    the model's code path, so a server process can import it without the project installed.
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.batch_size = batch_size
        self._model: Any = None
        self._input_size: int | None = None
        self._forward: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings only: the Keras model is an artifact, loaded by `load_context`."""
        return {"batch_size": self.batch_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def load_context(self, context: Any) -> None:
        """Load the Keras model once per process (server worker or batch flow)."""
        config = getattr(context, "model_config", None) or {}
        self.attach(load_keras_model(context.artifacts[KERAS_ARTIFACT]), config.get("input_size"))

    def attach(self, keras_model: Any, input_size: int | None = None) -> "CatsDogsModel":
        """Use an in-memory Keras model (tests, evaluation before anything is logged)."""
        self._model = keras_model
        self._input_size = model_input_size(keras_model, input_size)
        self._forward = compiled_forward(keras_model, self._input_size)
        return self

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score every decodable row in batches; undecodable rows become error rows.

        MLflow passes a DataFrame (after checking it against the signature); called directly,
        `model_input` may be anything `decode_inputs` accepts. Returns OUTPUT_COLUMNS, one row
        per input row, in input order. (The DataFrame hint is one MLflow does not turn into a
        second schema.)
        """
        if self._model is None:
            raise RuntimeError("the model is not loaded; call load_context or attach first")
        decoded = decode_inputs(model_input)
        batch_size = int((params or {}).get("batch_size") or self.batch_size)
        ok = [index for index, item in enumerate(decoded) if item.pixels is not None]
        probabilities: dict[int, float] = {}
        for start in range(0, len(ok), batch_size):
            chunk = ok[start:start + batch_size]
            batch = resize_batch([decoded[index].pixels for index in chunk], self._input_size)
            scores = np.asarray(self._forward(batch), dtype=np.float64).reshape(-1)
            probabilities.update(zip(chunk, (float(score) for score in scores)))
        return predictions_frame(decoded, probabilities)


def model_signature() -> Any:
    """The logged signature: optional `image` (binary) and `pixels` (any) in; scores out.

    `binary` makes the scoring server base64-decode JSON strings; `pixels` is typed `Any`
    because MLflow's nested-array checks would walk every pixel of every image in Python.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
        ColSpec(AnyType(), PIXELS_COLUMN, required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.double, "p_dog"), ColSpec(DataType.string, "label"),
        ColSpec(DataType.long, "label_index"), ColSpec(DataType.string, "error"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image_bytes(size: int = 32) -> bytes:
    """A small neutral JPEG used as the logged input example (no user data leaks into it)."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1),
                       np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def input_example() -> pd.DataFrame:
    """The logged input example: one row with an encoded JPEG in the `image` column."""
    return pd.DataFrame({IMAGE_COLUMN: [example_image_bytes()]})


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, read from the installed packages.

    Given explicitly so MLflow does not infer them by loading TensorFlow in a subprocess.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "tensorflow", "keras", "pillow", "numpy", "pandas", "scikit-learn"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def tasks_code_path() -> str:
    """The `tasks` package folder, logged with the model so a server can unpickle it."""
    return str(Path(__file__).resolve().parent)
