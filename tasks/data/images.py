"""Decide, image by image, whether a file is fit to train on, and make it TensorFlow-safe.

A header check is not enough: the real PetImages archive holds truncated JPEGs, PNG and GIF
bytes under `.jpg` names, CMYK and grayscale JPEGs and a `Thumbs.db`. TensorFlow's decoders
reject some of these mid-epoch and ignore EXIF orientation, so every image is fully decoded
here once and anything that is not a plain RGB baseline JPEG is re-encoded as one. The
`format` and `mode` fields still describe the *source*, so the manifest says what arrived.

Order of checks (cheapest and safest first): extension -> empty -> header (identify) ->
pixel count, longest and smallest side from the header (a decompression bomb, or a 2 KB PNG of
1 x 1,000,000 pixels, is refused before a single pixel is decoded) -> JPEG data at least what
its header's size needs -> full decode -> orientation and conversion.

The size rule (`size_fault`: at most MAX_PIXELS pixels and MAX_SIDE pixels a side) is the one
rule of the whole project: the manifest quarantines what breaks it as too_large, and the input
pipeline (tasks/learning/pixels.py) refuses it from the header in feature extraction, batch
prediction and the served model, so no model is trained on an image it could not be served.
"""

from __future__ import annotations

import io
import os
import stat
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

MAX_SIDE = 20_000
"""Longest side accepted anywhere, in pixels (the dataset check's `max_side` may only lower it).

With MAX_PIXELS it bounds what one image can cost to decode and resize: resizing work grows with
the pixels times the shrink of the longer side, so a 2 KB PNG of 1 x 1,000,000 pixels cost
minutes of CPU in the OpenCV decoder (and a Pillow resize of it needs 224 rows of a million
pixels). Within both limits, the worst image is a 25 MP PNG: about a second to decode here."""

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


def size_fault(width: int, height: int, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> str | None:
    """Why an image of `width` x `height` is refused everywhere, in words a person can act on; None when it is not.

    The one size rule: the manifest quarantines such an image as too_large, the input pipeline
    and the served model refuse it as that row's error, all from the header, before decoding.
    """
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        return (f"the image is {width} x {height} = {width * height:,} pixels, above the limit of {limit:,}; "
                "downscale it first")
    if max(width, height) > max_side:
        return (f"the image is {width} x {height} pixels, a side longer than the limit of {max_side:,}; "
                "crop or downscale it first")
    return None


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


def _is_frame(marker: int) -> bool:
    """A start-of-frame marker (C0..CF, less the table and arithmetic-conditioning markers C4, C8, CC)."""
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


def jpeg_frame_marker(data: bytes) -> int | None:
    """The JPEG start-of-frame marker byte (0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic, ...).

    Pillow records only "progressive"; arithmetic-coded and lossless JPEGs are what some
    decoders lack, so the frame type is read from the marker segments themselves.
    """
    return next((marker for marker, _ in _jpeg_markers(data) if _is_frame(marker)), None)


_HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_blocks(segment: bytes) -> int:
    """The 8 x 8 blocks a start-of-frame segment's size and sampling make (0 when it does not say).

    `segment` is the frame header after its length: precision, height, width, components, then
    (id, sampling, table) per component; a component sampled h of the largest h's columns covers
    width * h / largest h pixels across, and likewise down.
    """
    if len(segment) < 6:
        return 0
    height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
    sampling = [(byte >> 4, byte & 0x0F) for byte in segment[7:6 + 3 * count:3]]
    if not height or not width or not sampling or min(min(pair) for pair in sampling) == 0:
        return 0
    most_h, most_v = max(h for h, _ in sampling), max(v for _, v in sampling)
    return sum(_ceil_div(_ceil_div(width * h, most_h), 8) * _ceil_div(_ceil_div(height * v, most_v), 8)
               for h, v in sampling)


def jpeg_is_complete(data: bytes) -> bool:
    """True when the JPEG holds the data its header promises: False for a file cut short, however it was cut.

    Two signs of a cut, both read from the bytes without decoding: no end-of-image marker (FF D9)
    after the first scan, or fewer bytes after the first scan than the header's size needs
    (a 5000 x 5000 header over the data of 256 x 192 pixels, then FF D9). Pillow refuses the first
    ("image file is truncated") but decodes the second to a grey picture without a word, and
    libjpeg inside OpenCV pads both with grey and only warns; so the manifest and both decoders
    ask this first. FF D9 cannot occur inside entropy-coded data (an FF there is always followed
    by 00 or a restart marker), and an EXIF thumbnail's own FF D9 lies before the first scan.
    The size needed is a floor that a whole file always passes: a Huffman-coded JPEG (baseline
    or progressive) spends at least one bit on each 8 x 8 block's DC coefficient.
    """
    frame = scan = None
    for marker, offset in _jpeg_markers(data):
        if marker == 0xDA:
            scan = offset
        elif frame is None and _is_frame(marker):
            frame = offset
    if scan is None or data.rfind(b"\xff\xd9") <= scan:
        return False
    if frame is None or data[frame + 1] not in _HUFFMAN_FRAMES:
        return True  # arithmetic coding may spend less than a bit per block: no floor to check
    length = int.from_bytes(data[frame + 2:frame + 4], "big")
    return (len(data) - scan) * 8 >= _jpeg_blocks(data[frame + 4:frame + 2 + length])


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


def inspect_bytes(data: bytes, name: str, *, min_side: int = 32, max_pixels: int = MAX_PIXELS,
                  max_side: int = MAX_SIDE) -> dict[str, Any]:
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
        return _inspect_opened(image, data, row, min_side, max_pixels, max_side)


JPEG_FORMATS = ("JPEG", "MPO")
"""Pillow's formats of JPEG data (MPO: a camera's JPEG with more pictures after it)."""


def _inspect_opened(image: Image.Image, data: bytes, row: dict[str, Any], min_side: int, max_pixels: int,
                    max_side: int) -> dict[str, Any]:
    """Size checks from the header, then the full decode, then conversion when needed."""
    width, height = image.size
    row.update(format=image.format or "", mode=image.mode, width=width, height=height)
    if size_fault(width, height, max_pixels=max_pixels, max_side=max_side):
        return _quarantine(row, TOO_LARGE)  # before load(): a bomb never allocates its pixels
    if min(width, height) < min_side:
        return _quarantine(row, TOO_SMALL)  # rotation-invariant, so decided before decoding too
    if image.format in JPEG_FORMATS and not jpeg_is_complete(data):
        return _quarantine(row, UNDECODABLE)  # cut short: decoders would pad it with grey
    try:
        image.load()
        orientation = _orientation(image)
        upright = _upright(image) if orientation != 1 else image
        converted = None if _is_plain_jpeg(image, data, orientation) else encode_jpeg(upright)
    except Exception:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        return _quarantine(row, UNDECODABLE)
    row.update(width=upright.size[0], height=upright.size[1], converted_jpeg=converted)
    return row


def inspect_image(path: str | os.PathLike[str], *, min_side: int = 32, max_pixels: int = MAX_PIXELS,
                  max_side: int = MAX_SIDE) -> dict[str, Any]:
    """Fully decode one file and return its manifest fields.

    Keys: sha256 and bytes (of the source bytes), format and mode (of the source, "" when not
    an image), width and height (after EXIF orientation; header values for refused images),
    status ("ok"/"quarantined"), reason ("" or one of `REASONS`), and converted_jpeg: the RGB
    JPEG bytes to train on instead of the source, or None when the source is already a plain
    RGB baseline JPEG without rotation (or is quarantined). What is not a regular file (a fifo,
    a device) is not_an_image, unread. Reading errors (OSError) propagate: the caller decides
    whether a vanished file is a fault.
    """
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):  # a fifo or a device (a link to /dev/zero): never read
        return {**_quarantine(_row(b""), NOT_AN_IMAGE), "sha256": ""}
    return inspect_bytes(path.read_bytes(), path.name, min_side=min_side, max_pixels=max_pixels, max_side=max_side)


def inspect_and_store(job: tuple[str, str, int, int, int]) -> dict[str, Any]:
    """Inspect one file and store its conversion as `<converted_dir>/<sha256>.jpg`.

    The unit of work of the parallel manifest build, kept here (not in tasks.data.manifest) so a
    worker process imports only Pillow and numpy. `job` is (path, converted_dir, min_side,
    max_pixels, max_side) and the result holds plain values: the JPEG bytes are written in the worker
    and never travel back. Conversions are content-addressed, so an existing file already
    holds the right bytes and is left alone. A file that cannot be read is quarantined as
    undecodable (a per-image fault never stops the run).
    """
    path, converted_dir, min_side, max_pixels, max_side = job
    try:
        result = inspect_image(path, min_side=min_side, max_pixels=max_pixels, max_side=max_side)
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
