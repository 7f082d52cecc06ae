"""What a request to the served model carries, cell by cell, turned into the pixels the model takes.

The served model (tasks/models/pyfunc.py) accepts two input columns, both optional:

- ``image``: base64 text of encoded image bytes (JPEG, PNG, anything Pillow reads), as JSON
  carries it: ``{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"]]}}``.
  The model decodes the base64 itself, so one bad row is that row's error and the others are
  still scored. From Python the column may hold raw bytes instead.
- ``pixels``: one RGB image per row as an array or nested list of shape (h, w, 3) (or (h, w)
  grey), values 0..255; any size, it is resized like an image.

Every cell goes through the one input pipeline of training (tasks/learning/pixels.py: EXIF
orientation, RGB, the same bilinear resize, with the decoder the model was trained with), so
served scores equal evaluated ones. A cell is
refused before it costs memory or time: an encoded image over `MAX_IMAGE_BYTES` before its base64 is
decoded, an image over training's size rule (25 MP, 20,000 pixels a side: tasks/data/images.py
`size_fault`) from its header or shape. A refusal
is an `ImageError` whose message is the reason, in words a client can act on.

This module imports only numpy, pandas and Pillow (through tasks.learning.pixels; OpenCV too when
that is the model's decoder).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import InputError
from tasks.data.images import size_fault
from tasks.learning.pixels import ImageError, decode_image, resize_pixels

IMAGE_COLUMN = "image"
"""Input column of encoded image bytes (base64 text in JSON)."""

PIXELS_COLUMN = "pixels"
"""Input column of RGB pixel arrays (h, w, 3), values 0..255."""

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest encoded image per row (20 MiB): larger ones are refused before their base64 is decoded."""


class RequestError(InputError):
    """The input as a whole cannot be used (no usable column, an unsupported type, too many rows).

    Unlike an ImageError, which is one row's error, it refuses the whole request: the served
    model answers it with HTTP 400 and this one sentence.
    """


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
    if fault := size_fault(array.shape[1], array.shape[0]):
        raise ImageError(fault)
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


def row_count(model_input: Any) -> int:
    """Rows `input_cells` would make of `model_input`, counted without touching a cell.

    What a request's row limit is checked against, before any per-row work or memory.
    """
    if isinstance(model_input, dict):
        return max((len(value) if isinstance(value, list | tuple | np.ndarray | pd.Series) else 1
                    for value in model_input.values()), default=0)
    if isinstance(model_input, bytes | bytearray | str):
        return 1
    if isinstance(model_input, np.ndarray) and model_input.dtype != object and model_input.ndim == 3:
        return 1
    return len(model_input) if hasattr(model_input, "__len__") else 1


def input_cells(model_input: Any) -> list[tuple[str, Any]]:
    """(kind, value) per input row, kind "image" or "pixels" (or "" with the error as value).

    Raises RequestError when the input as a whole has nothing to score.
    """
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({key: list(value) if isinstance(value, np.ndarray) else value
                                    for key, value in model_input.items()})
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame()
    if isinstance(model_input, pd.DataFrame):
        has_image, has_pixels = IMAGE_COLUMN in model_input.columns, PIXELS_COLUMN in model_input.columns
        if not has_image and not has_pixels:
            raise RequestError(f"the input has columns {list(model_input.columns)}; it needs a column "
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
        raise RequestError(f"a pixel array must have shape (n, h, w, 3) or (h, w, 3), not {model_input.shape}")
    if isinstance(model_input, list | tuple | np.ndarray):
        return [(IMAGE_COLUMN if isinstance(item, bytes | bytearray | str) else PIXELS_COLUMN, item)
                for item in model_input]
    raise RequestError(f"unsupported input type {type(model_input).__name__}; pass a DataFrame "
                     f"with a column '{IMAGE_COLUMN}' (base64 image text) or '{PIXELS_COLUMN}' (arrays)")


def model_input_pixels(kind: str, value: Any, size: int, decoder: str = "auto") -> np.ndarray:
    """One cell through the one input pipeline: (size, size, 3) uint8, or ImageError with the reason."""
    if kind == IMAGE_COLUMN:
        return decode_image(encoded_bytes(value), size, decoder=decoder)
    if kind == PIXELS_COLUMN:
        return resize_pixels(coerce_pixels(value), size, decoder=decoder)
    raise ImageError(str(value))
