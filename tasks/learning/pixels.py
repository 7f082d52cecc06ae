"""The one input pipeline: image bytes -> upright RGB -> size x size uint8, for every consumer.

Feature extraction, fine-tuning, evaluation, batch prediction and the served model all decode
through `decode_image`, so they all see identical pixels. Batches leave the host as uint8
(a quarter of float32's bytes); the cast and the backbone's preprocessing run inside the
model (tasks/learning/preprocess.py).

Two decoders, chosen by name (`--decoder auto|opencv|pillow`; auto is OpenCV where it is
installed). The name is recorded wherever the pixels matter (feature cache key, run
parameters, the served model's config), because the two give pixels a level or two apart:

- "pillow": Pillow, with the JPEG DCT-domain downscale (`Image.draft`) when the source is at
  least twice the target on both sides; EXIF orientation applied; transparency over white;
  then Pillow's bilinear resize (antialiased when it shrinks).
- "opencv": the same header check through Pillow (lazy: no pixel is decoded), then OpenCV's
  libjpeg-turbo for JPEGs in RGB or grey, reduced by 1/2, 1/4 or 1/8 while decoding on the
  same rule as Pillow's draft, EXIF orientation applied by OpenCV; every other image (PNG,
  GIF, CMYK, 16-bit, alpha) is decoded by Pillow as above. Then OpenCV's bilinear resize after
  a smoothing of the same spread as Pillow's antialiasing filter on each shrunk axis: mean
  |difference| from Pillow's pixels about 0.4 of 255 at 224 px. Per core, 500x375 -> 224: about
  2.7x Pillow's speed in a decode worker process, 2x in a process that has loaded TensorFlow or
  JAX, where Pillow runs faster and OpenCV does not (Pillow's resize alone costs more than the
  whole JPEG decode; benchmarks/decode_throughput.py).
  OpenCV's INTER_AREA is further from Pillow (0.8) and slower; INTER_LINEAR alone aliases (2.0).

Either way the image is squashed to the square input (aspect ratio not kept, as Keras'
`image_dataset_from_directory` does).

What one image may cost is bounded, whatever its bytes: an image over 25 MP or with a side over
20,000 pixels is refused from its header, before a single pixel is decoded (the one size rule,
`tasks.data.images.size_fault`, by which the manifest quarantines the same images as too_large),
and a JPEG cut short is refused from its bytes (`jpeg_is_complete`) rather than padded with grey.
The OpenCV decoder's smoothing costs its taps per pixel, and its taps grow with the shrink: an
axis shrinking more than MAX_OPENCV_SHRINK times (a side over 32 x the input size after the JPEG
reduction) is resized by Pillow instead, whose work grows with the pixels only (and which is
the faster of the two there). So the worst an image can cost is a 25 MP PNG's decode and
resize, about a second on one core, where a 2 KB PNG of 1 x 1,000,000 pixels once took minutes
of an uninterruptible OpenCV call (no signal handler, SIGTERM's included, runs until it returns).

Parallelism: `Decoder` decodes a batch's images in parallel, in order, a few batches ahead
of the consumer: threads on small hosts (Pillow and OpenCV release the GIL while decoding and
resizing), worker processes writing straight into shared-memory batches on many-core hosts,
where the GIL would otherwise cap a Python-driven decoder. OpenCV's own thread pool is set to
one thread per process: the workers are the parallelism. A file that cannot be read or
decoded fails alone, with its reason; its row in the batch is zeros and is marked.

This module imports only numpy and Pillow (and OpenCV when that decoder is used): the served
model and decode workers load it cheaply.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.common.errors import ConfigError
from tasks.data.images import JPEG_FORMATS, MAX_PIXELS, jpeg_is_complete, pixel_limit, size_fault, upright_rgb

OPENCV = "opencv"
PILLOW = "pillow"
DECODERS = (OPENCV, PILLOW)
"""Decoder names, as the config, the feature cache key and the served model's config spell them."""

_OPENCV_FORMATS = JPEG_FORMATS
"""Formats OpenCV decodes (MPO: a camera's JPEG with more pictures after it; the first is the image)."""

MAX_OPENCV_SHRINK = 32
"""Largest shrink per axis the OpenCV decoder's smoothing filter takes on; beyond it Pillow resizes.

The filter's taps grow with the shrink (about 1.6 per unit), so its work per pixel does too:
capped here at about 2 x 53 taps, the same order as decoding the pixels. Photos at the usual
input sizes stay well below it (500 x 375 at 32 px: 16), so their pixels are OpenCV's as before."""

_OPENCV_MODES = ("RGB", "L")
"""JPEG modes OpenCV decodes to the same pixels as Pillow (CMYK/YCCK JPEGs go through Pillow)."""


class ImageError(ValueError):
    """One image cannot be used; the message is the reason, in a few words a person can read."""


@functools.cache
def _opencv() -> ModuleType | None:
    """OpenCV, imported once per process with its thread pool off (None where it is not installed).

    The decode workers are the parallelism: N workers each starting N OpenCV threads would only
    fight over the cores. The setting is process-wide, and this process uses OpenCV for nothing else.
    """
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    return cv2


def opencv_installed() -> bool:
    """Whether the OpenCV decoder can run here (opencv-python-headless imports)."""
    return _opencv() is not None


def resolve_decoder(requested: str = "auto") -> str:
    """The decoder that runs for `requested`: "auto" is OpenCV where installed, else Pillow.

    A decoder named explicitly must be installed: pixels decoded another way than asked would
    silently differ from those a model was trained on.
    """
    if requested == "auto":
        return OPENCV if opencv_installed() else PILLOW
    if requested == PILLOW:
        return PILLOW
    if requested == OPENCV:
        if not opencv_installed():
            raise ConfigError("the OpenCV image decoder is not installed here; pip install opencv-python-headless, "
                              "or choose the Pillow decoder (--decoder pillow)")
        return OPENCV
    raise ConfigError(f"decoder {requested!r} is unknown; use auto, opencv or pillow (--decoder).")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse empty, unreadable, oversized and cut-short images before decoding."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the bytes are not an image Pillow can read (JPEG, PNG, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has more than {pixel_limit(max_pixels):,} pixels; downscale it first") from None
    except Exception as error:  # noqa: BLE001 - a broken header surfaces as many exception types
        raise ImageError(f"the image header cannot be read ({type(error).__name__})") from None
    fault = size_fault(*image.size, max_pixels=max_pixels)
    if fault is None and image.format in JPEG_FORMATS and not jpeg_is_complete(data):
        fault = "the image cannot be decoded (the JPEG holds less data than its header promises: the file is truncated)"
    if fault is not None:
        image.close()
        raise ImageError(fault)
    return image


def _reduction(width: int, height: int, size: int) -> int:
    """1, 2, 4 or 8: the largest DCT-domain downscale that keeps both sides at least `size` (Pillow's draft rule)."""
    return next((scale for scale in (8, 4, 2) if min(width, height) >= scale * size), 1)


@functools.lru_cache(maxsize=512)
def _antialias_taps(source: int, size: int) -> np.ndarray:
    """1-D smoothing taps that make OpenCV's bilinear shrink of `source` pixels to `size` match Pillow's.

    Pillow's bilinear filter widens with the shrink s into a triangle of variance s**2 / 6;
    bilinear sampling of the smoothed image adds the variance of a unit triangle, 1/6, so the
    taps supply (s**2 - 1) / 6: none when nothing shrinks, three taps of exactly that variance
    while it is too small to sample a Gaussian from (shrinks up to 2), a Gaussian to +-2 sigma beyond.
    """
    shrink = source / size
    variance = (shrink * shrink - 1.0) / 6.0
    if variance <= 0.0:
        return np.ones(1, dtype=np.float32)
    if variance <= 0.5:
        side = variance / 2.0
        return np.array([side, 1.0 - 2.0 * side, side], dtype=np.float32)
    radius = math.ceil(2.0 * math.sqrt(variance))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-offsets * offsets / (2.0 * variance))
    return (taps / taps.sum()).astype(np.float32)


def _resize_opencv(pixels: np.ndarray, size: int) -> np.ndarray:
    """The OpenCV decoder's one resize: antialiasing taps on each shrunk axis, then bilinear to size x size.

    Past MAX_OPENCV_SHRINK on either axis, Pillow's resize (what the taps imitate) at a cost that
    no longer grows with the shrink.
    """
    cv2 = _opencv()
    height, width = pixels.shape[:2]
    if (width, height) == (size, size):
        return pixels
    if max(width, height) > MAX_OPENCV_SHRINK * size:
        return _resize_pillow(Image.fromarray(pixels), size)
    taps_x, taps_y = _antialias_taps(width, size), _antialias_taps(height, size)
    if len(taps_x) > 1 or len(taps_y) > 1:
        pixels = cv2.sepFilter2D(pixels, -1, taps_x, taps_y)
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)


def _resize_pillow(image: Image.Image, size: int) -> np.ndarray:
    """The Pillow decoder's one resize: bilinear to size x size, as uint8 (h, w, 3)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _decode_opencv(image: Image.Image, data: bytes, size: int) -> np.ndarray:
    cv2 = _opencv()
    if image.format not in _OPENCV_FORMATS or image.mode not in _OPENCV_MODES:
        return _resize_opencv(np.asarray(upright_rgb(image), dtype=np.uint8), size)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[_reduction(*image.size, size)]
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)  # EXIF orientation applied
    if pixels is None:
        raise ImageError("the image cannot be decoded (OpenCV could not decode the JPEG data)")
    return cv2.cvtColor(_resize_opencv(pixels, size), cv2.COLOR_BGR2RGB)  # resizing is per channel: BGR is fine


def decode_image(data: bytes, size: int, *, decoder: str = "auto", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB; raises ImageError with the reason."""
    name = resolve_decoder(decoder)
    image = _open(data, max_pixels)
    try:
        with image:
            if name == OPENCV:
                return _decode_opencv(image, data, size)
            if image.format == "JPEG" and min(image.size) >= 2 * size:
                image.draft("RGB", (size, size))  # DCT-domain downscale by 1/2, 1/4 or 1/8
            return _resize_pillow(upright_rgb(image), size)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise ImageError(f"the image cannot be decoded ({type(error).__name__}: {str(error)[:120]})") from None


def resize_pixels(array: np.ndarray, size: int, *, decoder: str = "auto") -> np.ndarray:
    """An RGB uint8 array (h, w, 3) of any size through the same resize as the decoder's decoded images."""
    pixels = np.ascontiguousarray(array, dtype=np.uint8)
    if resolve_decoder(decoder) == OPENCV:
        return _resize_opencv(pixels, size)
    return _resize_pillow(Image.fromarray(pixels, "RGB"), size)


def read_image(path: str | os.PathLike[str], size: int, *, decoder: str = "auto",
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file through `decode_image`; an unreadable file is an ImageError naming the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read the file ({error.strerror or error})") from None
    return decode_image(data, size, decoder=decoder, max_pixels=max_pixels)


# --------------------------------------------------------------------------- parallel batches


@dataclass
class Batch:
    """Decoded images `start .. start + len(errors)` of a reader's paths.

    `pixels` is (n, size, size, 3) uint8; `errors[i]` is "" or the reason row i failed (its
    pixels are then zeros). With process workers `pixels` is a view of shared memory that is
    reused a few batches later: consume it (or copy it) before asking for more than
    `Decoder.in_flight` further batches.
    """

    start: int
    pixels: np.ndarray
    errors: list[str]

    @property
    def ok(self) -> np.ndarray:
        return np.array([not error for error in self.errors], dtype=bool)


def default_workers() -> int:
    """Decode workers: every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PROCESS_THRESHOLD = 4
"""From this many workers on, decoding runs in processes: Pillow threads stop scaling near 4 cores."""


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int, max_pixels: int, decoder: str) -> list[str]:
    errors = []
    for row, path in enumerate(paths):
        try:
            out[row] = read_image(path, size, decoder=decoder, max_pixels=max_pixels)
            errors.append("")
        except ImageError as error:
            out[row] = 0
            errors.append(str(error))
    return errors


_SHARED: dict[str, Any] = {}


def _attach(name: str, shape: tuple[int, ...]) -> None:
    """Process-pool initializer: map the reader's shared ring of batches."""
    memory = shared_memory.SharedMemory(name=name)
    _SHARED.update(memory=memory, ring=np.ndarray(shape, dtype=np.uint8, buffer=memory.buf))


def _decode_shared(slot: int, offset: int, paths: Sequence[str], size: int, max_pixels: int,
                   decoder: str) -> list[str]:
    ring = _SHARED["ring"]
    return _decode_into(ring[slot, offset:offset + len(paths)], paths, size, max_pixels, decoder)


class Decoder:
    """Decodes lists of paths into (size, size, 3) uint8 batches, in parallel and in order.

    `in_flight` batches are decoded ahead of the consumer, so decoding overlaps the model.
    `decoder` is resolved once here (`resolve_decoder`): "auto" fails nothing, a decoder that is
    not installed fails before any work. `workers` defaults to every core; `processes`
    defaults to True from PROCESS_THRESHOLD workers on. A decoder keeps its workers between calls of `batches` (one per shard, say);
    use it as a context manager, or call `close`, to stop them.
    """

    def __init__(self, size: int, batch_size: int, *, decoder: str = "auto", workers: int | None = None,
                 processes: bool | None = None, in_flight: int = 2, max_pixels: int = MAX_PIXELS) -> None:
        self.size, self.batch_size, self.max_pixels = int(size), int(batch_size), max_pixels
        self.decoder = resolve_decoder(decoder)
        self.workers = max(1, workers or default_workers())
        self.processes = self.workers >= PROCESS_THRESHOLD if processes is None else processes
        self.in_flight = max(1, in_flight)
        self._slots = self.in_flight + 2  # the consumer may still hold two batches it was given
        self._memory: shared_memory.SharedMemory | None = None
        self._pool: Executor | None = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()
            self._memory = None

    def _start(self) -> None:
        if self._pool is not None:
            return
        shape = (self._slots, self.batch_size, self.size, self.size, 3)
        if self.processes:
            self._memory = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
            self._ring = np.ndarray(shape, dtype=np.uint8, buffer=self._memory.buf)
            # forkserver, not fork: the caller may run inside Prefect's or Keras' threads
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                             initializer=_attach, initargs=(self._memory.name, shape))
        else:
            self._ring = np.zeros(shape, dtype=np.uint8)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")

    def _submit(self, paths: list[str], index: int) -> tuple[int, list[Future]]:
        chunk_paths = paths[index * self.batch_size:(index + 1) * self.batch_size]
        slot = index % self._slots
        step = -(-len(chunk_paths) // self.workers)
        futures = []
        for offset in range(0, len(chunk_paths), step):
            chunk = chunk_paths[offset:offset + step]
            if self.processes:
                futures.append(self._pool.submit(_decode_shared, slot, offset, chunk, self.size, self.max_pixels,
                                                 self.decoder))
            else:
                view = self._ring[slot, offset:offset + len(chunk)]
                futures.append(self._pool.submit(_decode_into, view, chunk, self.size, self.max_pixels, self.decoder))
        return slot, futures

    def batches(self, paths: Sequence[str | os.PathLike[str]]) -> Iterator[Batch]:
        """The batches of `paths`, in order; each `Batch.start` is its first path's index."""
        self._start()
        paths = [os.fspath(path) for path in paths]
        count = -(-len(paths) // self.batch_size)
        pending: deque[tuple[int, int, list[Future]]] = deque()
        submitted = 0
        try:
            while submitted < count and len(pending) < self.in_flight:
                pending.append((submitted, *self._submit(paths, submitted)))
                submitted += 1
            while pending:
                index, slot, futures = pending.popleft()
                errors = [error for future in futures for error in future.result()]
                if submitted < count:
                    pending.append((submitted, *self._submit(paths, submitted)))
                    submitted += 1
                yield Batch(index * self.batch_size, self._ring[slot, :len(errors)], errors)
        finally:
            for _, _, futures in pending:  # a consumer that stops early leaves nothing running
                for future in futures:
                    future.cancel()
            for _, _, futures in pending:
                for future in futures:
                    if not future.cancelled():
                        future.exception()
