"""The label convention: a class map from class names to integer labels.

Cats vs. dogs is the default and keeps Kaggle's convention (cat = 0, dog = 1, `p_dog`, an
`id,label` submission). Any other image classes get a `ClassMap` made by `class_map(names)`:
names normalised and sorted, so the same folders always give the same labels on every host.
The data folder records its map (`classes.json`), and the model, its MLflow run and its
served signature carry it, so that a label index never travels without its meaning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from tasks.common.errors import LayoutError


@dataclass(frozen=True)
class ClassMap:
    """Class names in label order (index = label) and the folder of each class under `arranged/<split>/`
    (`cats`/`dogs`, or the class's own folder name as the source spells it)."""

    names: tuple[str, ...]
    folders: tuple[str, ...]

    def index(self, name: str) -> int:
        """The integer label of a class name."""
        return self.names.index(name)

    @property
    def binary(self) -> bool:
        """Two classes: one sigmoid output, the probability of `positive`."""
        return len(self.names) == 2

    @property
    def positive(self) -> str:
        """The class whose probability a binary model outputs (label 1: "dog" for cats vs. dogs)."""
        return self.names[1]

    @property
    def kaggle(self) -> bool:
        """Cats vs. dogs: Kaggle's `p_dog` output and `id,label` submission."""
        return self == CATS_DOGS

    @property
    def folder_of(self) -> dict[str, str]:
        """Class name to its folder name under `arranged/<split>/`."""
        return dict(zip(self.names, self.folders))

    @property
    def probability_columns(self) -> tuple[str, ...]:
        """Output columns of probabilities: `p_dog` for cats vs. dogs, else one `p_<class>` per class."""
        return ("p_dog",) if self.kaggle else tuple(f"p_{name}" for name in self.names)

    def text(self) -> str:
        """`cat,dog`: the map as one MLflow parameter value, in label order."""
        return ",".join(self.names)

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "folders": list(self.folders)}, indent=2) + "\n"

    @classmethod
    def from_names(cls, names: Iterable[str]) -> ClassMap:
        """The map of already normalised names in label order (what a logged model or data folder recorded)."""
        names = tuple(str(name) for name in names)
        if names == CATS_DOGS.names:
            return CATS_DOGS
        return cls(names, names)

    @classmethod
    def from_json(cls, text: str) -> ClassMap:
        payload = json.loads(text)
        found = cls(tuple(payload["names"]), tuple(payload["folders"]))
        return CATS_DOGS if found == CATS_DOGS else found


CATS_DOGS = ClassMap(("cat", "dog"), ("cats", "dogs"))
"""The default map: Kaggle's cat = 0, dog = 1, arranged in `cats/` and `dogs/`."""

CLASSES: tuple[str, ...] = CATS_DOGS.names
"""Cats vs. dogs class names in label order: index 0 is cat, index 1 is dog."""

LABEL_INDEX: dict[str, int] = {name: index for index, name in enumerate(CLASSES)}
"""Cats vs. dogs class name to integer label."""

CLASS_DIRS: dict[str, str] = CATS_DOGS.folder_of
"""Cats vs. dogs class name to the folder name used under `arranged/<split>/`."""

SPLITS: tuple[str, str, str] = ("train", "validation", "test")
"""Labelled splits, in the order they are used."""

UNLABELLED = "unlabelled"
"""Split value of images without a label (Kaggle's `test1/` pool): never trained on."""

_NOT_NAME = re.compile(r"[^a-z0-9_]")


def normalise_class_name(folder: str) -> str:
    """`Golden Retriever` -> `golden_retriever`: lower case, spaces and hyphens to `_`, only [a-z0-9_].

    Names become column names (`p_golden_retriever`), MLflow parameters and folder names, so
    they are kept to characters that are safe in all of them.
    """
    name = folder.strip().lower().replace(" ", "_").replace("-", "_")
    return _NOT_NAME.sub("", name).strip("_")


def class_name(folder: str) -> str:
    """The class name of a class folder; LayoutError when nothing of its name is left after normalising."""
    name = normalise_class_name(folder)
    if not name:
        raise LayoutError(f"The class folder {folder!r} has no letters or digits to name its class; "
                          "rename it (for example to its class in plain letters).")
    return name


def class_map(folders: Iterable[str]) -> ClassMap:
    """The class map of these class folder names: normalised, sorted; {cat, dog} gives CATS_DOGS.

    Raises LayoutError (one sentence naming the folders) when fewer than two classes remain,
    a name normalises to nothing, or two folders normalise to the same name.
    """
    folders = sorted(set(folders))
    by_name: dict[str, list[str]] = {}
    for folder in folders:
        name = class_name(folder)
        by_name.setdefault(name, []).append(folder)
    clashes = [found for found in by_name.values() if len(found) > 1]
    if clashes:
        shown = ", ".join(" and ".join(f"{f}/" for f in found) for found in clashes)
        raise LayoutError(f"The class folders {shown} name the same class once normalised "
                          f"({', '.join(normalise_class_name(found[0]) for found in clashes)}); "
                          "merge or rename them.")
    if len(by_name) < 2:
        raise LayoutError(f"Only one class ({', '.join(folders) or 'none'}) was found; "
                          "a classifier needs at least two class folders.")
    return ClassMap.from_names(sorted(by_name))


def classes_of_labels(labels: Iterable[str]) -> ClassMap:
    """The class map of a source's labels: cats vs. dogs whenever they are cat/dog only, else `class_map` of
    the names (a source of one class is refused before this, by tasks/data/layout.py)."""
    found = {label for label in labels if label}
    return CATS_DOGS if found <= set(CATS_DOGS.names) else class_map(found)


def classes_of_files(files: Iterable[tuple[str, str]]) -> ClassMap:
    """The class map of a source's (label, relative path) pairs, each class arranged in its folder's name as on disk.

    Your own classes keep the names their folders have (`Red Roses/` is class `red_roses`, arranged in
    `arranged/<split>/Red Roses/`, and `classes.json` lists that folder); cats vs. dogs keep `cats/` and
    `dogs/`. Where a class's folder is spelled two ways (`train/Daisy/`, `test/daisy/`), the first path's wins.
    """
    pairs = [(label, path) for label, path in files if label]
    classes = classes_of_labels(label for label, _ in pairs)
    if classes.kaggle:
        return classes
    folders: dict[str, str] = {}
    for label, path in sorted(pairs, key=lambda pair: pair[1]):
        if label not in folders:
            parts = PurePosixPath(path).parts[:-1]
            folders[label] = next((part for part in parts if normalise_class_name(part) == label), label)
    return ClassMap(classes.names, tuple(folders.get(name, name) for name in classes.names))
