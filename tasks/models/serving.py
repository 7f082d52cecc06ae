"""The served model: an MLflow pyfunc that turns images into p(dog) and a label.

Users meet the model in three places: `mlflow models serve` (JSON over HTTP), the batch
`predict` flow, and `mlflow.pyfunc.load_model(...).predict(...)` in a notebook. All three go
through `CatsDogsModel.predict`, which decodes with the one input pipeline of training
(tasks/learning/pixels.py: EXIF orientation, RGB, the same bilinear resize, uint8 into the
model), so served scores equal evaluated ones.

Input (a pandas DataFrame; the signature declares both columns optional):

- column ``image``: base64 text of encoded image bytes (JPEG, PNG, anything Pillow reads), as
  JSON carries it: ``{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"]]}}``.
  The model decodes the base64 itself, so one bad row is that row's error and the others are
  still scored. From Python the column may hold raw bytes instead.
- column ``pixels``: one RGB image per row as an array or nested list of shape (h, w, 3)
  (or (h, w) grey), values 0..255; any size, it is resized like an image.

Output: one row per input row: ``p_dog`` (nullable float: NA on error, null in JSON), ``label``
("cat"/"dog", "" on error), ``label_index`` (0/1, -1 on error) and ``error`` ("" or one
sentence). A corrupt image, an oversized one, or a row past the request's row limit yields
an error row, never a failed request.

Memory stays bounded whatever arrives: under `mlflow models serve` a request body over
`max_request_bytes` is refused with HTTP 413 before it is read, an image over the pixel limit
(training's 25 MP) is refused from its header, an encoded image over `MAX_IMAGE_BYTES` before
it is decoded, a large JPEG is decoded at 1/2..1/8 scale in the DCT domain, rows beyond
`max_rows` are refused, and at most `max_concurrent` requests per process decode and score
at a time (the rest wait), each in batches of `batch_size`. All but the image limits can be
set where the model is served (`MLFLOW_PYFUNC_INFERENCE_CONFIG`, see `model_config`).

What the server imports: this module, tasks.learning.pixels and .forward and .preprocess,
tasks.data.images and tasks.common: numpy, pandas, Pillow, Keras and MLflow only, all in the
model's requirements. Nothing here imports Prefect.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from tasks.common.labels import CLASSES
from tasks.learning.pixels import MAX_PIXELS, ImageError, decode_image, resize_pixels

IMAGE_COLUMN = "image"
"""Input column of encoded image bytes (base64 text in JSON)."""

PIXELS_COLUMN = "pixels"
"""Input column of RGB pixel arrays (h, w, 3), values 0..255."""

OUTPUT_COLUMNS: tuple[str, ...] = ("p_dog", "label", "label_index", "error")
"""Columns of every prediction frame, in order."""

KERAS_ARTIFACT = "keras_model"
"""Name of the `model.keras` artifact inside the logged pyfunc model."""

DEFAULT_BATCH_SIZE = 64
"""Images per forward pass: bounds memory for large requests and batch prediction."""

MAX_ROWS = 512
"""Rows scored per request; further rows get an error row (split big jobs, or use flows.predict)."""

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest encoded image per row (20 MiB): larger ones get an error row before decoding."""

MAX_CONCURRENT = 2
"""Requests decoding and scoring at once per server process; others wait their turn."""

MAX_REQUEST_BYTES = 32 * 2**20
"""Largest `/invocations` body `mlflow models serve` reads for this model (32 MiB); larger ones get HTTP 413."""

SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
"""Set by `mlflow models serve` for its scoring app: this process is the model server."""

THRESHOLD = 0.5
"""p(dog) at or above which the label is "dog" (dog = 1, the Kaggle convention)."""


def coerce_pixels(value: Any) -> np.ndarray:
    """A pixel array or nested list as an (h, w, 3) uint8 array of 0..255 values.

    Grey (h, w) or (h, w, 1) is repeated to RGB and an alpha channel is dropped. Raises
    ImageError when the shape or values are wrong.
    """
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"the pixels are not a numeric array ({exc})") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ImageError(f"the pixels have shape {tuple(array.shape)}; expected (height, width, 3)")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise ImageError(f"the pixels are {array.shape[1]} x {array.shape[0]}, above the limit of {MAX_PIXELS:,}")
    array = array[..., :3]
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ImageError("the pixel values must be finite numbers between 0 and 255")
    return np.rint(array).astype(np.uint8)


def encoded_bytes(value: Any) -> bytes:
    """The encoded image of an `image` cell: base64 text (JSON) or bytes (Python)."""
    if isinstance(value, str):
        if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image text is not valid base64") from None
    if isinstance(value, bytearray | memoryview | np.bytes_):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise ImageError(f"the image must be base64 text or bytes, not {type(value).__name__}")
    if len(value) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return value


def _is_missing(value: Any) -> bool:
    """True for None/NaN cells (a row that uses the other input column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def input_cells(model_input: Any) -> list[tuple[str, Any]]:
    """(kind, value) per input row, kind "image" or "pixels" (or "" with the error as value)."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({key: list(value) if isinstance(value, np.ndarray) else value
                                    for key, value in model_input.items()})
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame()
    if isinstance(model_input, pd.DataFrame):
        has_image, has_pixels = IMAGE_COLUMN in model_input.columns, PIXELS_COLUMN in model_input.columns
        if not has_image and not has_pixels:
            raise ValueError(f"the input has columns {list(model_input.columns)}; it needs a column "
                             f"'{IMAGE_COLUMN}' (base64 image text) or '{PIXELS_COLUMN}' (pixel arrays)")
        images = model_input[IMAGE_COLUMN].tolist() if has_image else [None] * len(model_input)
        pixels = model_input[PIXELS_COLUMN].tolist() if has_pixels else [None] * len(model_input)
        cells = []
        for image, pixel in zip(images, pixels):
            if not _is_missing(image):
                cells.append((IMAGE_COLUMN, image))
            elif not _is_missing(pixel):
                cells.append((PIXELS_COLUMN, pixel))
            else:
                cells.append(("", f"the row has neither '{IMAGE_COLUMN}' nor '{PIXELS_COLUMN}'"))
        return cells
    if isinstance(model_input, bytes | bytearray | str):
        return [(IMAGE_COLUMN, model_input)]
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return [(PIXELS_COLUMN, model_input)]
        if model_input.ndim == 4:
            return [(PIXELS_COLUMN, item) for item in model_input]
        raise ValueError(f"a pixel array must have shape (n, h, w, 3) or (h, w, 3), not {model_input.shape}")
    if isinstance(model_input, list | tuple | np.ndarray):
        return [(IMAGE_COLUMN if isinstance(item, bytes | bytearray | str) else PIXELS_COLUMN, item)
                for item in model_input]
    raise ValueError(f"unsupported input type {type(model_input).__name__}; pass a DataFrame "
                     f"with a column '{IMAGE_COLUMN}' (base64 image text) or '{PIXELS_COLUMN}' (arrays)")


def model_input_pixels(kind: str, value: Any, size: int) -> np.ndarray:
    """One cell through the one input pipeline: (size, size, 3) uint8, or ImageError with the reason."""
    if kind == IMAGE_COLUMN:
        return decode_image(encoded_bytes(value), size)
    if kind == PIXELS_COLUMN:
        return resize_pixels(coerce_pixels(value), size)
    raise ImageError(str(value))


def predictions_frame(scores: Sequence[float | None], errors: Sequence[str]) -> pd.DataFrame:
    """The output frame: a probability for scored rows, an error (and null p_dog) for the others."""
    rows = []
    for p_dog, error in zip(scores, errors):
        if error or p_dog is None:
            rows.append({"p_dog": None, "label": "", "label_index": -1, "error": error or "not scored"})
        else:
            index = int(p_dog >= THRESHOLD)
            rows.append({"p_dog": float(p_dog), "label": CLASSES[index], "label_index": index, "error": ""})
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS)).astype({"label": object, "label_index": "int64",
                                                                     "error": object})
    # nullable Float64: a missing score is NA, which MLflow's JSON writes as null (NaN is not JSON)
    frame["p_dog"] = pd.array([row["p_dog"] for row in rows], dtype="Float64")
    return frame


def load_keras_model(path: str | Path) -> Any:
    """Load an end-to-end `.keras` model in safe mode, after registering the custom layer."""
    import keras

    import tasks.learning.preprocess  # noqa: F401  (registers Preprocess)

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


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

    Pickled by reference (`tasks.models.serving.CatsDogsModel`); the `tasks` package is logged
    as the model's code path, so a server process can import it without the project installed.
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, max_rows: int = MAX_ROWS,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.max_concurrent = max_concurrent
        self._model: Any = None
        self._input_size: int | None = None
        self._forward: Any = None
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings only: the Keras model is an artifact, loaded by `load_context`."""
        return {"batch_size": self.batch_size, "max_rows": self.max_rows, "max_concurrent": self.max_concurrent}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def load_context(self, context: Any) -> None:
        """Load the Keras model once per process (server worker or batch flow).

        The backend the model was logged with is used unless the environment names one:
        Keras reads KERAS_BACKEND when it is first imported, which happens here.
        """
        config = getattr(context, "model_config", None) or {}
        if config.get("keras_backend"):
            os.environ.setdefault("KERAS_BACKEND", str(config["keras_backend"]))
        self.max_rows = int(config.get("max_rows", self.max_rows))
        if int(config.get("max_concurrent", self.max_concurrent)) != self.max_concurrent:
            self.max_concurrent = int(config["max_concurrent"])
            self._slots = threading.BoundedSemaphore(self.max_concurrent)
        if os.environ.get(SERVER_MODEL_PATH_ENV):
            limit_request_bytes(int(config.get("max_request_bytes", MAX_REQUEST_BYTES)))
        self.attach(load_keras_model(context.artifacts[KERAS_ARTIFACT]), config.get("input_size"))

    def attach(self, keras_model: Any, input_size: int | None = None) -> CatsDogsModel:
        """Use an in-memory Keras model (tests, evaluation before anything is logged)."""
        from tasks.learning.forward import compiled_forward

        self._model = keras_model
        self._input_size = model_input_size(keras_model, input_size)
        self._forward = compiled_forward(keras_model)
        return self

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score every usable row in batches; every other row becomes an error row, in input order.

        MLflow passes a DataFrame; called directly, `model_input` may be anything
        `input_cells` accepts. (The DataFrame hint is one MLflow does not turn into a schema.)
        """
        from tasks.learning.forward import to_numpy

        if self._model is None:
            raise RuntimeError("the model is not loaded; call load_context or attach first")
        cells = input_cells(model_input)
        batch_size = int((params or {}).get("batch_size") or self.batch_size)
        size = int(self._input_size)
        scores: list[float | None] = [None] * len(cells)
        errors = [""] * len(cells)
        for index in range(self.max_rows, len(cells)):
            errors[index] = (f"the request has {len(cells)} rows; at most {self.max_rows} are scored per request, "
                             "send the rest in another request")
        with self._slots:
            for start in range(0, min(len(cells), self.max_rows), batch_size):
                rows = range(start, min(start + batch_size, len(cells), self.max_rows))
                batch = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
                good = []
                for offset, index in enumerate(rows):
                    try:
                        batch[offset] = model_input_pixels(*cells[index], size)
                        good.append(offset)
                    except ImageError as error:
                        errors[index] = str(error)
                    except Exception as error:  # noqa: BLE001 - a per-image fault must never stop the batch
                        errors[index] = f"the image could not be read ({type(error).__name__}: {error})"
                if good:
                    outputs = to_numpy(self._forward(batch[good])).reshape(-1)
                    for offset, p_dog in zip(good, outputs):
                        scores[rows[offset]] = float(p_dog)
        return predictions_frame(scores, errors)


def limit_request_bytes(max_bytes: int) -> bool:
    """In `mlflow models serve`: refuse an `/invocations` body over `max_bytes` with HTTP 413, unread.

    MLflow's scoring app reads the whole body, then parses the JSON, before the model sees a
    row, and offers no limit of its own; a 2 GB request would be held (and parsed) in full.
    The model is loaded before that app is built, so it can bound what the app reads: the
    app's request body is read here, refused from its Content-Length when that is too large,
    and counted while streaming otherwise. Only the scoring app's process does this (see
    `load_context`); True when the limit is in place.
    """
    try:
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - MLflow's scoring server is built on starlette
        return False
    current = Request.body
    if getattr(current, "catsdogs_limit", None) is not None:
        current.catsdogs_limit = max_bytes  # type: ignore[attr-defined]
        return True

    async def body(self: Any) -> bytes:
        limit = body.catsdogs_limit  # type: ignore[attr-defined]
        if hasattr(self, "_body") or self.url.path != "/invocations":
            return await current(self)
        too_large = (f"the request is larger than {limit:,} bytes; send fewer or smaller images per "
                     "request (or raise max_request_bytes in MLFLOW_PYFUNC_INFERENCE_CONFIG)")
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(status_code=413, detail=too_large)
        chunks, total = [], 0
        async for chunk in self.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPException(status_code=413, detail=too_large)
            chunks.append(chunk)
        self._body = b"".join(chunks)
        return self._body

    body.catsdogs_limit = max_bytes  # type: ignore[attr-defined]
    Request.body = body  # type: ignore[method-assign]
    return True


def model_signature() -> Any:
    """The logged signature: optional `image` and `pixels` (both Any, see below) in; scores out.

    `image` is typed Any, not binary: a binary column makes MLflow base64-decode it before the
    model sees it, and one bad row would then fail the whole request. `pixels` is Any because
    MLflow's nested-array checks would walk every pixel of every image in Python.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(AnyType(), IMAGE_COLUMN, required=False),
                     ColSpec(AnyType(), PIXELS_COLUMN, required=False)])
    outputs = Schema([ColSpec(DataType.double, "p_dog", required=False), ColSpec(DataType.string, "label"),
                      ColSpec(DataType.long, "label_index"), ColSpec(DataType.string, "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image_bytes(size: int = 32) -> bytes:
    """A small neutral JPEG used as the logged input example (no user data leaks into it)."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1),
                       np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def input_example() -> pd.DataFrame:
    """The logged input example: one row with a base64 JPEG in the `image` column, as JSON sends it."""
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_bytes()).decode("ascii")]})


SERVING_PACKAGES: tuple[str, ...] = ("mlflow", "keras", "pillow", "numpy", "pandas", "h5py")
"""What the served model imports, whatever the backend (h5py: Keras reads .keras weights with it)."""

BACKEND_PACKAGES: dict[str, tuple[str, ...]] = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"),
                                                "torch": ("torch",)}


def pip_requirements(backend: str | None = None) -> list[str]:
    """Pinned requirements of the served model: what it imports and the Keras backend it was logged on.

    Given explicitly (not inferred by MLflow, which would load the model in a subprocess) and
    exactly: a fresh virtualenv made from these alone loads and serves the model (tested).
    """
    from importlib.metadata import PackageNotFoundError, version

    if backend is None:
        import keras

        backend = keras.config.backend()
    pins = []
    for package in (*SERVING_PACKAGES, *BACKEND_PACKAGES.get(backend, ())):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def model_config(input_size: int) -> dict[str, Any]:
    """Settings stored with the logged model: input size, the backend to load it on, and the limits.

    Each can be changed where the model is served, without logging it again, through MLflow's
    `MLFLOW_PYFUNC_INFERENCE_CONFIG` (e.g. `'{"max_request_bytes": 8388608, "max_rows": 128}'`).
    """
    import keras

    return {"input_size": int(input_size), "keras_backend": keras.config.backend(), "max_rows": MAX_ROWS,
            "max_request_bytes": MAX_REQUEST_BYTES, "max_concurrent": MAX_CONCURRENT}


def tasks_code_path() -> str:
    """The `tasks` package folder, logged with the model so a server can unpickle it."""
    return str(Path(__file__).resolve().parents[1])
