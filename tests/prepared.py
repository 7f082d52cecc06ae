"""A prepared data folder (arranged images + manifest.parquet) built without the prepare flow.

The learning tests (features, head, training) need the *output* of `prepare_data`, not the
flow itself: building it directly keeps those tests fast and independent of the data wing.
The layout and columns follow tasks/data/datafolder.py and tasks/data/manifest.py, so the
same folder is valid input for the real flows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from tasks.common.files import sha256_bytes
from tasks.data.manifest import MANIFEST_COLUMNS
from tests.imagegen import SIZE, image_bytes

_SPLIT_SEED_OFFSET = {"train": 0, "validation": 10_000, "test": 20_000, "unlabelled": 30_000}


def _row(source: Path, relative: str, label: str, split: str, data: bytes,
         size: tuple[int, int], arranged: str, status: str = "ok", reason: str = "") -> dict:
    """One manifest row in the contract's types (strings never NaN)."""
    return {
        "source_path": str(source), "relative_path": relative, "label": label,
        "source_split": split if status == "ok" else "", "sha256": sha256_bytes(data),
        "bytes": len(data), "mtime_ns": source.stat().st_mtime_ns,
        "format": "JPEG" if data else "", "mode": "RGB" if data else "",
        "width": size[0] if data else 0, "height": size[1] if data else 0,
        "converted_path": "", "status": status, "reason": reason,
        "split": split if status == "ok" else "", "arranged_path": arranged,
    }


def make_prepared_dir(tmp_path: Path, per_class_split: dict[str, int] | None = None, *,
                      seed0: int = 0, size: tuple[int, int] = SIZE, unlabelled: int = 0,
                      quarantined: int = 0) -> Path:
    """Write `tmp_path/data` with arranged JPEGs and a matching manifest; return the data dir.

    `per_class_split` maps a labelled split to the number of images *per class* (default
    train 10, validation 4, test 4). Calling it again on the same `tmp_path` with another
    `seed0` adds new images and merges their rows into the existing manifest (rows are unique
    by source path), which is how tests simulate "10% more data". `unlabelled` adds
    Kaggle-test1-style rows (split "unlabelled", no label, linked under `unlabelled/`);
    `quarantined` adds empty-file rows that must never be read.
    """
    per_class_split = per_class_split or {"train": 10, "validation": 4, "test": 4}
    tmp_path = Path(tmp_path)
    data_dir = tmp_path / "data"
    source_root = tmp_path / "source"
    rows: list[dict] = []
    for split, count in per_class_split.items():
        for label, folder in (("cat", "cats"), ("dog", "dogs")):
            for i in range(count):
                seed = seed0 + _SPLIT_SEED_OFFSET[split] + i
                data = image_bytes(label, seed, size=size)
                relative = f"{split}/{folder}/{label}.{seed}.jpg"
                source = source_root / relative
                source.parent.mkdir(parents=True, exist_ok=True)
                source.write_bytes(data)
                arranged = f"arranged/{split}/{folder}/{label}.{seed}_{sha256_bytes(data)[:10]}.jpg"
                target = data_dir / arranged
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.link(source, target)
                rows.append(_row(source, relative, label, split, data, size, arranged))
    for i in range(unlabelled):
        seed = seed0 + _SPLIT_SEED_OFFSET["unlabelled"] + i
        data = image_bytes("dog" if i % 2 else "cat", seed, size=size)
        source = source_root / "test1" / f"{seed}.jpg"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
        arranged = f"unlabelled/{seed}.jpg"
        (data_dir / "unlabelled").mkdir(parents=True, exist_ok=True)
        if not (data_dir / arranged).exists():
            os.link(source, data_dir / arranged)
        rows.append(_row(source, f"test1/{seed}.jpg", "", "unlabelled", data, size, arranged))
    for i in range(quarantined):
        source = source_root / "bad" / f"empty_{seed0}_{i}.jpg"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"")
        rows.append(_row(source, f"bad/{source.name}", "cat", "", b"", size, "",
                         status="quarantined", reason="empty_file"))
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    manifest = data_dir / "manifest.parquet"
    if manifest.exists():
        frame = pd.concat([pd.read_parquet(manifest), frame], ignore_index=True)
        frame = frame.drop_duplicates(subset=["source_path"], keep="first")
    data_dir.mkdir(parents=True, exist_ok=True)
    frame.reset_index(drop=True).to_parquet(manifest, index=False)
    return data_dir
