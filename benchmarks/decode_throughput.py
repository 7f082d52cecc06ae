"""Per-core decode throughput of the two decoders, as a ratio measured in the same run.

Run: python benchmarks/decode_throughput.py [--images 128] [--repeats 7]

`tasks/learning/pixels.py`'s `decode_image` on one thread, bytes already in memory, photo-like
500x375 JPEGs (benchmarks/photos.py) -> 224 x 224, OpenCV and Pillow in interleaved rounds.
This process imports the decoder only, as the decode worker processes of a many-core (GPU) host
do. Pillow is markedly faster in a process that has loaded TensorFlow or JAX (OpenCV is not):
benchmarks/extraction_throughput.py also measures it there, where the thread workers of a small
host decode. Nothing here passes or fails; it is for people to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.photos import write_photos  # noqa: E402
from tasks.learning.pixels import OPENCV, PILLOW, decode_image  # noqa: E402

TARGET = 2.5
"""OpenCV / Pillow per core, the issue's target for feeding a GPU."""


def decode_per_core(photos: list[Path], size: int, repeats: int) -> dict[str, np.ndarray]:
    """img/s of `decode_image` on one thread, per decoder, in interleaved rounds (bytes already in memory)."""
    blobs = [path.read_bytes() for path in photos]
    rates: dict[str, list[float]] = {PILLOW: [], OPENCV: []}
    for name in rates:
        decode_image(blobs[0], size, decoder=name)  # imports and first calls outside the timing
    for _ in range(repeats):
        for name in rates:
            start = time.perf_counter()
            for blob in blobs:
                decode_image(blob, size, decoder=name)
            rates[name].append(len(blobs) / (time.perf_counter() - start))
    return {name: np.asarray(values) for name, values in rates.items()}


def summary(rates: dict[str, np.ndarray]) -> str:
    """One line: the median rates and their ratio, with the spread of the per-round ratios."""
    pillow, opencv = rates[PILLOW], rates[OPENCV]
    ratios = opencv / pillow
    load = "/".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"pillow {np.median(pillow):5.0f} img/s   opencv {np.median(opencv):5.0f} img/s   opencv/pillow "
            f"{np.median(ratios):.2f} (rounds {ratios.min():.2f}-{ratios.max():.2f}; target >= {TARGET}; "
            f"load average {load})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="photos in each round")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "catsdogs-bench-photos")
    args = parser.parse_args(argv)
    photos = write_photos(args.photos, args.images)
    print(f"decode 500x375 -> {args.size} on one core, median of {args.repeats} interleaved rounds of "
          f"{args.images}, a process without TensorFlow or JAX:")
    print("  " + summary(decode_per_core(photos, args.size, args.repeats)))


if __name__ == "__main__":
    main()
