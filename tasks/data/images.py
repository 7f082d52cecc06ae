"""Decide, image by image, whether a file is fit to train on, and make it TensorFlow-safe.

A header check is not enough: the real PetImages archive holds truncated JPEGs, PNG and GIF
bytes under `.jpg` names, CMYK and grayscale JPEGs and a `Thumbs.db`. TensorFlow's decoders
reject some of these mid-epoch and ignore EXIF orientation, so every image is fully decoded
here once and anything that is not a plain RGB baseline JPEG is re-encoded as one. The
`format` and `mode` fields still describe the *source*, so the manifest says what arrived.

Order of checks (cheapest and safest first): extension -> empty -> header (identify) ->
pixel count and smallest side from the header (a decompression bomb is refused before a
single pixel is decoded) -> full decode -> orientation and conversion.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.common.files import atomic_write_bytes, sha256_bytes

OK = "ok"
QUARANTINED = "quarantined"

EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
UNDECODABLE = "undecodable"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
REASONS: tuple[str, ...] = (EMPTY_FILE, NOT_AN_IMAGE, UNDECODABLE, TOO_SMALL, TOO_LARGE)
"""Quarantine reasons this module decides (dedupe and label conflicts are decided later)."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
"""File name endings that may hold an image; anything else (`.db`, `.txt`, `.py`) is not one."""

MAX_PIXELS = 25_000_000
"""Largest image accepted anywhere (width x height): the manifest quarantines larger ones as too_large,
and the input pipeline and the served model refuse them from their header, before decoding."""

JPEG_QUALITY = 95
"""Quality of converted JPEGs: high enough that re-encoding adds no visible artefacts."""

_ORIENTATION_TAG = 0x0112
_PLAIN_JPEG_FRAMES = frozenset({0xC0, 0xC1})  # baseline and extended sequential Huffman DCT
_WHITE = (255, 255, 255)


def _row(data: bytes) -> dict[str, Any]:
    """The fields every result has, before anything is known about the content."""
    return {
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "format": "",
        "mode": "",
        "width": 0,
        "height": 0,
        "status": OK,
        "reason": "",
        "converted_jpeg": None,
    }


def _quarantine(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update(status=QUARANTINED, reason=reason, converted_jpeg=None)
    return row


def pixel_limit(max_pixels: int) -> int:
    """The effective pixel limit: ours, capped by Pillow's own bomb guard.

    Pillow warns above `Image.MAX_IMAGE_PIXELS` and refuses above twice that; capping keeps one
    rule (an image is either refused as too_large or decoded silently). To accept larger
    images, raise both `max_pixels` and `PIL.Image.MAX_IMAGE_PIXELS`.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)


def _jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker byte, offset) of the JPEG header's segments, up to and including the first start of scan.

    Stops early at bytes that are not a marker, so a damaged header yields fewer markers, never an error.
    """
    index = 2
    while index + 4 <= len(data):
        if data[index] != 0xFF:
            return
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        yield marker, index
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            index += 2
        else:
            index += 2 + int.from_bytes(data[index + 2 : index + 4], "big")


def jpeg_frame_marker(data: bytes) -> int | None:
    """The JPEG start-of-frame marker byte (0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic, ...).

    Pillow records only "progressive"; arithmetic-coded and lossless JPEGs are what some
    decoders lack, so the frame type is read from the marker segments themselves.
    """
    for marker, _ in _jpeg_markers(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker (FF D9) follows the JPEG's first scan: a file cut short has none.

    Pillow refuses a truncated JPEG ("image file is truncated"); libjpeg inside OpenCV pads it
    with grey and only warns, so the OpenCV decoder asks this first to fail the same files.
    FF D9 cannot occur inside entropy-coded data (an FF there is always followed by 00 or a
    restart marker), and an EXIF thumbnail's own FF D9 lies before the first scan.
    """
    scan = next((offset for marker, offset in _jpeg_markers(data) if marker == 0xDA), None)
    return scan is not None and data.rfind(b"\xff\xd9") > scan


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1 = as stored); a malformed EXIF block counts as no orientation."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - EXIF is metadata; a broken block must not reject pixels
        return 1


def _upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation exactly once; the returned image carries no orientation tag."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - same reasoning as `_orientation`
        return image


def _is_plain_jpeg(image: Image.Image, data: bytes, orientation: int) -> bool:
    """True when TensorFlow decodes the source bytes to the right pixels as they are."""
    return (
        image.format == "JPEG"
        and image.mode == "RGB"
        and orientation == 1
        and not image.info.get("progressive")
        and jpeg_frame_marker(data) in _PLAIN_JPEG_FRAMES
    )


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels as a person would see them: transparency over white, 16-bit scaled to 8-bit."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """The pixels a person sees: EXIF orientation applied once, then RGB (see `_to_rgb`)."""
    return _to_rgb(_upright(image))


def encode_jpeg(image: Image.Image) -> bytes:
    """An RGB baseline JPEG without EXIF, so no decoder can rotate it a second time."""
    buffer = io.BytesIO()
    _to_rgb(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def inspect_bytes(data: bytes, name: str, *, min_side: int = 32, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """`inspect_image` for bytes already in memory; `name` supplies the extension."""
    row = _row(data)
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return _quarantine(row, NOT_AN_IMAGE)
    if not data:
        return _quarantine(row, EMPTY_FILE)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _quarantine(row, NOT_AN_IMAGE)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _quarantine(row, TOO_LARGE)  # Pillow's own guard, raised from the header alone
    except Exception:  # noqa: BLE001 - a broken header is a per-image fault, never a crash
        return _quarantine(row, UNDECODABLE)
    with image:
        return _inspect_opened(image, data, row, min_side, pixel_limit(max_pixels))


def _inspect_opened(image: Image.Image, data: bytes, row: dict[str, Any], min_side: int,
                    limit: int) -> dict[str, Any]:
    """Size checks from the header, then the full decode, then conversion when needed."""
    width, height = image.size
    row.update(format=image.format or "", mode=image.mode, width=width, height=height)
    if width * height > limit:
        return _quarantine(row, TOO_LARGE)  # before load(): a bomb never allocates its pixels
    if min(width, height) < min_side:
        return _quarantine(row, TOO_SMALL)  # rotation-invariant, so decided before decoding too
    try:
        image.load()
        orientation = _orientation(image)
        upright = _upright(image) if orientation != 1 else image
        converted = None if _is_plain_jpeg(image, data, orientation) else encode_jpeg(upright)
    except Exception:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        return _quarantine(row, UNDECODABLE)
    row.update(width=upright.size[0], height=upright.size[1], converted_jpeg=converted)
    return row


def inspect_image(path: str | os.PathLike[str], *, min_side: int = 32,
                  max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Fully decode one file and return its manifest fields.

    Keys: sha256 and bytes (of the source bytes), format and mode (of the source, "" when not
    an image), width and height (after EXIF orientation; header values for refused images),
    status ("ok"/"quarantined"), reason ("" or one of `REASONS`), and converted_jpeg: the RGB
    JPEG bytes to train on instead of the source, or None when the source is already a plain
    RGB baseline JPEG without rotation (or is quarantined). Reading errors (OSError) propagate:
    the caller decides whether a vanished file is a fault.
    """
    path = Path(path)
    return inspect_bytes(path.read_bytes(), path.name, min_side=min_side, max_pixels=max_pixels)


def inspect_and_store(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """Inspect one file and store its conversion as `<converted_dir>/<sha256>.jpg`.

    The unit of work of the parallel manifest build, kept here (not in tasks.data.manifest) so a
    worker process imports only Pillow and numpy. `job` is (path, converted_dir, min_side,
    max_pixels) and the result holds plain values: the JPEG bytes are written in the worker
    and never travel back. Conversions are content-addressed, so an existing file already
    holds the right bytes and is left alone. A file that cannot be read is quarantined as
    undecodable (a per-image fault never stops the run).
    """
    path, converted_dir, min_side, max_pixels = job
    try:
        result = inspect_image(path, min_side=min_side, max_pixels=max_pixels)
    except OSError:
        result = _quarantine(_row(b""), UNDECODABLE)
        result["sha256"] = ""
    converted = result.pop("converted_jpeg")
    result["converted_path"] = ""
    if converted is not None:
        target = Path(converted_dir) / f"{result['sha256']}.jpg"
        if not target.exists():
            atomic_write_bytes(target, converted)
        result["converted_path"] = str(target)
    return result
