"""Photo-like JPEGs for the benchmarks: 500x375 (a quarter portrait), quality 85, ~45 KB each.

Smooth gradients, soft-edged blobs and multi-scale noise compress and decode like the real
archive's photos; the flat test images of tests/imagegen.py would make decoding look free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = (500, 375) if seed % 4 else (375, 500)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        image[..., channel] = 128 + 60 * np.sin(a * xx / 60 + b * yy / 45 + d * 6) + 40 * np.cos((xx * b - yy * a) / 90)
    for _ in range(12):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 90)
        mask = np.clip((radius - np.hypot(xx - cx, yy - cy)) / 4, 0, 1)[..., None]
        image = image * (1 - mask) + mask * rng.uniform(0, 255, 3)
    coarse = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:height, :width]
    image += 12 * coarse + rng.normal(0, rng.uniform(8, 16), (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


def write_photos(folder: Path, count: int, seed0: int = 0) -> list[Path]:
    """`count` photo-like JPEGs under `folder` (kept between runs: generating them takes a while)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{seed0 + index:05d}.jpg"
        if not path.exists():
            photo(seed0 + index).save(path, quality=85)
        paths.append(path)
    return paths


def prepared_folder(root: Path, photos: list[Path], splits: tuple[str, ...] = ("train",)) -> Path:
    """A data folder whose arranged images are `photos` (alternately cat and dog, spread over `splits`)."""
    import os

    import pandas as pd

    from tasks.common.files import sha256_file
    from tasks.data.manifest import MANIFEST_COLUMNS, write_manifest

    rows = []
    for index, source in enumerate(photos):
        label = ("cat", "dog")[index % 2]
        split = splits[(index // 2) % len(splits)]
        sha = sha256_file(source)
        arranged = f"arranged/{split}/{label}s/{source.stem}_{sha[:10]}.jpg"
        target = root / arranged
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(source, target)
        rows.append({"source_path": str(source), "relative_path": source.name, "label": label, "source_split": "",
                     "sha256": sha, "bytes": source.stat().st_size, "mtime_ns": 0, "format": "JPEG", "mode": "RGB",
                     "width": 500, "height": 375, "converted_path": "", "status": "ok", "reason": "",
                     "split": split, "arranged_path": arranged})
    write_manifest(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), root / "manifest.parquet")
    return root
