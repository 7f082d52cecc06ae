"""Manifest throughput: parallel build vs a single-threaded loop over the same files, same run.

    python benchmarks/manifest_throughput.py [--n 3000] [--width 200] [--height 150] [--workers N]

Generates `n` small JPEGs in a temporary class-folder tree, then times
  1. a single-threaded loop calling the same unit of work (`inspect_and_store`) on every file,
  2. `build_manifest` with threads (the default backend),
  3. `build_manifest` with processes (forkserver),
  4. `build_manifest` again with the first result as `previous` (the second-run reuse path).
Prints files per second, speed-ups as ratios of the single-threaded loop, and the reuse run as a
fraction of the first run. Figures, never pass/fail: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.data.images import MAX_PIXELS, MAX_SIDE, inspect_and_store
from tasks.data.layout import find_candidates
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import build_manifest, default_workers


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth colour gradient plus noise, so it compresses like a photo."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, 3)
    pixels = base + (xx[..., None] * rng.uniform(-0.5, 0.5, 3)) + (yy[..., None] * rng.uniform(-0.5, 0.5, 3))
    pixels = pixels + rng.normal(0, 10, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def generate_tree(root: Path, n: int, width: int, height: int) -> None:
    """`cats/` and `dogs/` folders with n images in all (the class_folders layout)."""
    rng = np.random.default_rng(0)
    for folder in ("cats", "dogs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = "cats" if i % 2 == 0 else "dogs"
        (root / folder / f"{i}.jpg").write_bytes(_jpeg(rng, width, height))


def _timed(label: str, n: int, run) -> float:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"{label:<34} {seconds:8.2f} s  {n / seconds:9.0f} files/s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="number of images (default 3000)")
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--height", type=int, default=150)
    parser.add_argument("--workers", type=int, default=None, help="parallel workers (default: per backend)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="manifest-bench-"))
    try:
        source = work / "source"
        generate_tree(source, args.n, args.width, args.height)
        _, candidates = find_candidates(source)
        n = len(candidates)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{n} JPEGs of {args.width}x{args.height}; {cores} usable cores; "
              f"threads={args.workers or default_workers('thread')}, "
              f"processes={args.workers or default_workers('process')}")

        converted = str(DataFolder(work / "serial").converted)
        serial = _timed("single-threaded loop", n, lambda: [
            inspect_and_store((str(c.path), converted, 32, MAX_PIXELS, MAX_SIDE)) for c in candidates])

        results: dict[str, object] = {}
        threads = _timed("build_manifest (threads)", n, lambda: results.__setitem__(
            "thread", build_manifest(candidates, DataFolder(work / "threads"), workers=args.workers, backend="thread")))
        processes = _timed("build_manifest (processes)", n, lambda: results.__setitem__(
            "process", build_manifest(candidates, DataFolder(work / "processes"), workers=args.workers, backend="process")))
        reuse = _timed("second run (reuse, threads)", n, lambda: results.__setitem__(
            "reuse", build_manifest(candidates, DataFolder(work / "threads"), previous=results["thread"],
                                    workers=args.workers)))

        assert results["thread"].equals(results["process"]), "backends disagree"
        print(f"speed-up vs single-threaded: threads {serial / threads:.2f}x, processes {serial / processes:.2f}x")
        print(f"second run: {reuse / threads:.3f} of the first threaded run "
              f"({results['reuse'].attrs['reused']} reused, {results['reuse'].attrs['inspected']} inspected)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
