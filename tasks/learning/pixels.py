"""The one input pipeline: image bytes -> upright RGB -> size x size uint8, for every consumer.

Feature extraction, fine-tuning, evaluation, batch prediction and the served model all decode
through `decode_image`, so they all see identical pixels. Batches leave the host as uint8
(a quarter of float32's bytes); the cast and the backbone's preprocessing run inside the
model (tasks/learning/preprocess.py).

Decoding: Pillow, with the JPEG DCT-domain downscale (`Image.draft`) when the source is at
least twice the target size, so a 12000 x 12000 photo costs a 1500 x 1500 decode; EXIF
orientation applied; transparency over white; then one bilinear resize to the square input
(aspect ratio not kept, as Keras' `image_dataset_from_directory` does). An image larger than
the pixel limit is refused from its header, before a single pixel is decoded.

Parallelism: `BatchReader` decodes a batch's images in parallel, in order, a few batches ahead
of the consumer: threads on small hosts (Pillow releases the GIL while decoding and
resizing), worker processes writing straight into shared-memory batches on many-core hosts,
where the GIL would otherwise cap a Python-driven decoder. A file that cannot be read or
decoded fails alone, with its reason; its row in the batch is zeros and is marked.

This module imports only numpy and Pillow: the served model and decode workers load it cheaply.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.data.images import MAX_PIXELS, pixel_limit, upright_rgb


class ImageError(ValueError):
    """One image cannot be used; the message is the reason, in a few words a person can read."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse empty, unreadable and oversized images before decoding."""
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
    width, height = image.size
    if width * height > pixel_limit(max_pixels):
        image.close()
        raise ImageError(f"the image is {width} x {height} = {width * height:,} pixels, above the limit of "
                         f"{pixel_limit(max_pixels):,}; downscale it first")
    return image


def resize(image: Image.Image, size: int) -> np.ndarray:
    """The one resize: bilinear to size x size, as uint8 (h, w, 3)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB; raises ImageError with the reason."""
    image = _open(data, max_pixels)
    try:
        with image:
            if image.format == "JPEG" and min(image.size) >= 2 * size:
                image.draft("RGB", (size, size))  # DCT-domain downscale by 1/2, 1/4 or 1/8
            return resize(upright_rgb(image), size)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise ImageError(f"the image cannot be decoded ({type(error).__name__}: {str(error)[:120]})") from None


def resize_pixels(array: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 array (h, w, 3) of any size through the same resize as decoded images."""
    return resize(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB"), size)


def read_image(path: str | os.PathLike[str], size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file through `decode_image`; an unreadable file is an ImageError naming the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read the file ({error.strerror or error})") from None
    return decode_image(data, size, max_pixels=max_pixels)


# --------------------------------------------------------------------------- parallel batches


@dataclass
class Batch:
    """Decoded images `start .. start + len(errors)` of a reader's paths.

    `pixels` is (n, size, size, 3) uint8; `errors[i]` is "" or the reason row i failed (its
    pixels are then zeros). With process workers `pixels` is a view of shared memory that is
    reused a few batches later: consume it (or copy it) before asking for more than
    `BatchReader.in_flight` further batches.
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


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int, max_pixels: int) -> list[str]:
    errors = []
    for row, path in enumerate(paths):
        try:
            out[row] = read_image(path, size, max_pixels=max_pixels)
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


def _decode_shared(slot: int, offset: int, paths: Sequence[str], size: int, max_pixels: int) -> list[str]:
    ring = _SHARED["ring"]
    return _decode_into(ring[slot, offset:offset + len(paths)], paths, size, max_pixels)


class Decoder:
    """Decodes lists of paths into (size, size, 3) uint8 batches, in parallel and in order.

    `in_flight` batches are decoded ahead of the consumer, so decoding overlaps the model.
    `workers` defaults to every core; `processes` defaults to True from PROCESS_THRESHOLD
    workers on. A decoder keeps its workers between calls of `batches` (one per shard, say);
    use it as a context manager, or call `close`, to stop them.
    """

    def __init__(self, size: int, batch_size: int, *, workers: int | None = None,
                 processes: bool | None = None, in_flight: int = 2, max_pixels: int = MAX_PIXELS) -> None:
        self.size, self.batch_size, self.max_pixels = int(size), int(batch_size), max_pixels
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
                futures.append(self._pool.submit(_decode_shared, slot, offset, chunk, self.size, self.max_pixels))
            else:
                view = self._ring[slot, offset:offset + len(chunk)]
                futures.append(self._pool.submit(_decode_into, view, chunk, self.size, self.max_pixels))
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
