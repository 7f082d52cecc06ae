"""Second run of `prepare_data` on the same source, as a fraction of the first (same process).

    python benchmarks/prepare_rerun.py [--n 2000] [--width 500] [--height 375]

Builds a PetImages-style zip of `n` photo-sized JPEGs (Kaggle's images are about 500x375),
runs the flow twice on it and prints both times, their ratio, and how many files under the
data folder the second run created or modified (the design says: none). A throw-away flow run
first starts Prefect's temporary server, so neither timed run pays for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow  # noqa: E402

from benchmarks.manifest_throughput import _jpeg  # noqa: E402
from flows.config import DataConfig  # noqa: E402
from flows.prepare import prepare_data  # noqa: E402
from tasks.data.validate import ValidationThresholds  # noqa: E402
from tests.imagegen import zip_tree  # noqa: E402


@flow
def _warm_up() -> None:
    """Starts the temporary Prefect server outside the timed runs."""


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    args = parser.parse_args()

    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="prepare-rerun-"))
    rng = np.random.default_rng(0)
    for i in range(args.n):
        folder = work / "src" / "PetImages" / ("Cat" if i % 2 == 0 else "Dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(_jpeg(rng, args.width, args.height))
    archive = zip_tree(work / "src", work / "petimages.zip")
    thresholds = ValidationThresholds(min_per_class=args.n // 4, min_per_class_per_split=args.n // 100)
    data_dir = work / "data"
    config = DataConfig(source=str(archive), data_dir=str(data_dir), thresholds=thresholds)
    _warm_up()

    start = time.perf_counter()
    prepare_data(config)
    first = time.perf_counter() - start
    before = _snapshot(data_dir)

    start = time.perf_counter()
    prepare_data(config)
    second = time.perf_counter() - start
    after = _snapshot(data_dir)

    changed = sum(1 for path, key in after.items() if before.get(path) != key)
    print(f"images: {args.n} at {args.width}x{args.height}, cores: {os.cpu_count()}")
    print(f"first run:  {first:7.2f} s")
    print(f"second run: {second:7.2f} s  ({second / first:.3f} of the first, {first / second:.1f}x faster)")
    print(f"files created or modified by the second run: {changed}")


if __name__ == "__main__":
    main()
