"""The fixed label convention (Kaggle's): cat = 0, dog = 1, everywhere."""

from __future__ import annotations

CLASSES: tuple[str, str] = ("cat", "dog")
"""Class names in label order: index 0 is cat, index 1 is dog."""

LABEL_INDEX: dict[str, int] = {name: index for index, name in enumerate(CLASSES)}
"""Class name to integer label."""

CLASS_DIRS: dict[str, str] = {"cat": "cats", "dog": "dogs"}
"""Class name to the folder name used under `arranged/<split>/`."""

SPLITS: tuple[str, str, str] = ("train", "validation", "test")
"""Labelled splits, in the order they are used."""

UNLABELLED = "unlabelled"
"""Split value of images without a label (Kaggle's `test1/` pool): never trained on."""
