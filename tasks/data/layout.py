"""Recognise how an extracted Dogs vs. Cats source is laid out and list its candidate files.

The four public sources put labels in different places (a file name prefix, a folder per class,
a folder per split and class), so this step turns each of them into one flat list of
`Candidate`s with an explicit label and source split. Downstream steps never look at folder
names again.

Recognised layouts (names compared case-insensitively, optionally inside one wrapping folder):

* ``kaggle``: ``train/cat.N.jpg``, ``train/dog.N.jpg`` and an unlabelled ``test1/`` (or ``test/``)
  pool, e.g. the extracted competition folder with ``sampleSubmission.csv`` beside them.
* ``petimages``: ``PetImages/Cat/`` and ``PetImages/Dog/`` (Microsoft's archive).
* ``presplit``: ``train|validation|test/cats|dogs/`` (``cats_and_dogs_filtered.zip``).
* ``class_folders``: ``cats/`` and ``dogs/`` (or ``cat/``, ``dog/``).
* ``presplit_classes``: ``train|validation|test/<class>/`` with any two or more class names.
* ``any_classes``: two or more class folders of any names (``daisy/``, ``roses/``, ``tulips/``).

The last two are any image classes: a folder's name, normalised (tasks/common/labels.py), is
its label. Cats and dogs layouts are tried first and keep their labels (cat, dog).

Hidden files, ``__MACOSX/`` and stray top-level files (readme, licence, csv) are ignored. Every
file inside a class folder is a candidate, even ``Thumbs.db``: the manifest step quarantines it
as ``not_an_image``, so it is visible in the manifest instead of silently dropped.

Symbolic links are followed, folders and files alike, as if what they lead to were there: a
class folder that is a link (``roses -> /mnt/photos/roses``) is a class like any other, and a
linked file is read where it leads (the arranged copy is its bytes, never a link: see
tasks/data/arrange.py). A link that leads nowhere where folders are looked for stops the run
naming it (it may be a class whose disk is not mounted); a linked file that leads nowhere is
quarantined like any unreadable file; a link to a folder above, or to one walked already, is
not followed (no loop, no file twice). (Archives hold no links at all: tasks/data/extract.py
refuses them.)
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from tasks.common.errors import LayoutError
from tasks.common.labels import UNLABELLED, ClassMap, class_map, class_name, classes_of_labels

LAYOUTS: tuple[str, ...] = ("kaggle", "petimages", "presplit", "class_folders", "presplit_classes", "any_classes")
"""Layout names `find_candidates` can return, in the order they are tried."""

CLASS_FOLDER_LABELS: dict[str, str] = {"cat": "cat", "cats": "cat", "dog": "dog", "dogs": "dog"}
"""Lower-cased class folder name to label."""

SPLIT_FOLDERS: dict[str, str] = {"train": "train", "validation": "validation", "test": "test"}
"""Lower-cased split folder name (pre-split layout) to source split."""

KAGGLE_TRAIN = "train"
KAGGLE_UNLABELLED_FOLDERS: tuple[str, ...] = ("test1", "test")
_KAGGLE_NAME = re.compile(r"^(cat|dog)\.", re.IGNORECASE)

EXPECTED_LAYOUTS = (
    "Kaggle (train/cat.N.jpg, train/dog.N.jpg, optional test1/), "
    "PetImages (PetImages/Cat/, PetImages/Dog/), "
    "pre-split (train|validation|test/cats|dogs/), class folders (cats/, dogs/), "
    "or two or more class folders of any names (daisy/, roses/, ...), pre-split or not, "
    "optionally inside one wrapping folder"
)

_MAX_NAMES_IN_ERROR = 12


@dataclass(frozen=True)
class Candidate:
    """One file that may become a training image; `label` is "" only for the unlabelled pool."""

    path: Path
    relative_path: str
    label: str
    source_split: str


# (absolute path, label, source split) before relative paths are known.
_Found = tuple[Path, str, str]
_Detector = Callable[[Path], "list[_Found] | None"]


# --------------------------------------------------------------------------- folder listing


def _ignored(name: str) -> bool:
    """Hidden files and macOS resource forks are archive noise, never data."""
    return name.startswith(".") or name.lower() == "__macosx"


def _entries(folder: Path) -> list[os.DirEntry]:
    """The visible entries of `folder`; a symbolic link that leads nowhere is a LayoutError naming it.

    Where folders are looked for, such a link could be a whole class (a link to a disk that is not
    mounted): dropping it without a word would train on the other classes alone.
    """
    entries = [entry for entry in os.scandir(folder) if not _ignored(entry.name)]
    for entry in entries:
        if entry.is_symlink() and not os.path.exists(entry.path):
            raise LayoutError(f"{entry.path} is a symbolic link to {os.readlink(entry.path)}, which does not exist; "
                              "restore (or mount) what it leads to, or remove the link.")
    return entries


def _subfolders(folder: Path) -> dict[str, Path]:
    """Sub-folders by name, links to folders included (links are followed, folders and files alike)."""
    return {entry.name: Path(entry.path) for entry in _entries(folder) if entry.is_dir()}


def _visible_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-cased name, links to folders included."""
    return {name.lower(): path for name, path in _subfolders(folder).items()}


def _visible_files(folder: Path) -> list[Path]:
    return [Path(entry.path) for entry in _entries(folder) if not entry.is_dir()]


def files_under(folder: Path) -> Iterator[Path]:
    """Every visible file below `folder`, recursively, links followed: a class folder's sub-folders are still that class.

    A link to a folder above (`up -> ..`) is not followed, and a folder reached twice (two links
    to it) is walked once: no loop, and no file listed twice.
    """
    top = os.path.realpath(folder)
    walked = {top}
    for current, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(current, name))
            if not _ignored(name) and real not in walked and not top.startswith(real + os.sep):
                walked.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in files:
            if not _ignored(name):
                yield Path(current) / name


def _unwrap_same_name(folder: Path) -> Path:
    """`train/train/` -> `train/`: extracting Kaggle's inner `train.zip` into a folder named after it
    nests its own `train/` folder once more."""
    dirs = _visible_dirs(folder)
    if len(dirs) == 1 and folder.name.lower() in dirs and not _visible_files(folder):
        return dirs[folder.name.lower()]
    return folder


def _class_folders(folder: Path) -> list[tuple[Path, str]] | None:
    """`(path, label)` for each class folder in `folder`, or None if any sub-folder is not one.

    Unknown sub-folders make the layout unrecognised rather than silently skipped: a folder we
    do not understand may hold images someone expects to be trained on.
    """
    dirs = _visible_dirs(folder)
    if not dirs or any(name not in CLASS_FOLDER_LABELS for name in dirs):
        return None
    return [(path, CLASS_FOLDER_LABELS[name]) for name, path in sorted(dirs.items())]


def _class_files(folders: list[tuple[Path, str]], source_split: str) -> list[_Found]:
    return [(path, label, source_split) for folder, label in folders for path in files_under(folder)]


# --------------------------------------------------------------------------- detectors


def _kaggle(base: Path) -> list[_Found] | None:
    """`train/` holding `cat.N`/`dog.N` files directly; `test1/` or `test/` is the unlabelled pool.

    A file in `train/` without a class prefix has no label, so it joins the unlabelled pool
    (never trained on) instead of guessing.
    """
    dirs = _visible_dirs(base)
    if KAGGLE_TRAIN not in dirs or set(dirs) - {KAGGLE_TRAIN, *KAGGLE_UNLABELLED_FOLDERS}:
        return None
    train = _unwrap_same_name(dirs[KAGGLE_TRAIN])
    if not any(_KAGGLE_NAME.match(path.name) for path in _visible_files(train)):
        return None
    found: list[_Found] = []
    for path in files_under(train):
        match = _KAGGLE_NAME.match(path.name)
        found.append((path, match.group(1).lower(), "train") if match else (path, "", UNLABELLED))
    for name in KAGGLE_UNLABELLED_FOLDERS:
        if name in dirs:
            found.extend((path, "", UNLABELLED) for path in files_under(_unwrap_same_name(dirs[name])))
    return found


def _petimages(base: Path) -> list[_Found] | None:
    """`PetImages/{Cat,Dog}/`, or `base` itself when the user points at the PetImages folder."""
    dirs = _visible_dirs(base)
    if "petimages" in dirs and len(dirs) == 1:
        pet = dirs["petimages"]
    elif base.name.lower() == "petimages":
        pet = base
    else:
        return None
    folders = _class_folders(pet)
    return None if folders is None else _class_files(folders, "")


def _presplit(base: Path) -> list[_Found] | None:
    """Only split folders at the top, each holding only class folders; the split is kept as `source_split`."""
    dirs = _visible_dirs(base)
    if not dirs or any(name not in SPLIT_FOLDERS for name in dirs):
        return None
    found: list[_Found] = []
    for name, split_dir in sorted(dirs.items()):
        folders = _class_folders(split_dir)
        if folders is None:
            return None
        found.extend(_class_files(folders, SPLIT_FOLDERS[name]))
    return found


def _plain_class_folders(base: Path) -> list[_Found] | None:
    folders = _class_folders(base)
    return None if folders is None else _class_files(folders, "")


_NOT_CLASSES = frozenset({*SPLIT_FOLDERS, *KAGGLE_UNLABELLED_FOLDERS, "petimages"})
"""Folder names that mean a split or a known source, never a class of its own."""


def _any_class_folders(folder: Path) -> list[tuple[Path, str]] | None:
    """`(path, normalised name)` for two or more class folders of any names, or None.

    Cats and dogs folders beside other folders are refused with a sentence rather than taken
    as N classes: `birds/` beside `cats/` and `dogs/` is more often a stray than a class.
    """
    dirs = _subfolders(folder)
    if len(dirs) < 2 or any(name.lower() in _NOT_CLASSES for name in dirs):
        return None
    pets = sorted(name for name in dirs if name.lower() in CLASS_FOLDER_LABELS)
    if pets:
        others = sorted(f"{name}/" for name in dirs if name.lower() not in CLASS_FOLDER_LABELS)
        raise LayoutError(
            f"{folder} holds {', '.join(others)} beside {' and '.join(f'{p}/' for p in pets)}: move "
            f"{', '.join(others)} out to learn cats and dogs, or rename {' and '.join(f'{p}/' for p in pets)} "
            "(e.g. cat_photos/) to learn every folder as a class.")
    class_map(dirs)  # two folders that normalise to one name: one sentence naming both
    return [(dirs[name], class_name(name)) for name in sorted(dirs)]


def _any_presplit(base: Path) -> list[_Found] | None:
    """`train|validation|test/<class>/` with any class names (a split may lack a class; validation says so)."""
    dirs = _visible_dirs(base)
    if not dirs or any(name not in SPLIT_FOLDERS for name in dirs):
        return None
    found: list[_Found] = []
    folders: list[Path] = []
    for name, split_dir in sorted(dirs.items()):
        classes = _subfolders(split_dir)
        if not classes or any(folder.lower() in _NOT_CLASSES for folder in classes):
            return None
        if len(classes) > 1:
            class_map(classes)  # two folders of one split that normalise to one name: one sentence naming both
        found.extend(_class_files([(path, class_name(folder)) for folder, path in sorted(classes.items())],
                                  SPLIT_FOLDERS[name]))
        folders.extend(classes.values())
    class_map({label for _, label, _ in found})  # at least two classes in all
    return _refuse_empty_classes(found, folders)


def _refuse_empty_classes(found: list[_Found], folders: list[Path]) -> list[_Found]:
    """A class folder without a file would silently drop its class from the class map: one sentence instead."""
    empty = sorted({str(folder) for folder in folders} - {str(parent) for parent in _class_roots(found, folders)})
    if empty and found:
        raise LayoutError(f"The class folder {empty[0]} holds no files; add its images or remove it "
                          f"({len(empty)} empty class folder(s) in all).")
    return found


def _class_roots(found: list[_Found], folders: list[Path]) -> set[Path]:
    """The class folders (of `folders`) that hold at least one of the files found."""
    roots = set()
    for path, _, _ in found:
        roots.update(folder for folder in folders if folder in path.parents)
    return roots


def _plain_any_classes(base: Path) -> list[_Found] | None:
    folders = _any_class_folders(base)
    if folders is None:
        return None
    return _refuse_empty_classes(_class_files(folders, ""), [path for path, _ in folders])


_DETECTORS: tuple[tuple[str, _Detector], ...] = (
    ("kaggle", _kaggle),
    ("petimages", _petimages),
    ("presplit", _presplit),
    ("class_folders", _plain_class_folders),
    ("presplit_classes", _any_presplit),
    ("any_classes", _plain_any_classes),
)


# --------------------------------------------------------------------------- public API


def _bases(root: Path) -> Iterator[Path]:
    """The root, then its single wrapping folder if it has exactly one (`cats_and_dogs_filtered/`)."""
    yield root
    dirs = _visible_dirs(root)
    if len(dirs) == 1:
        yield next(iter(dirs.values()))


def _describe(folder: Path) -> str:
    """Top-level names as a person would list them (folders with a trailing slash)."""
    entries = sorted(
        (entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(folder) if not _ignored(entry.name)),
        key=str.lower,
    )
    if not entries:
        return "nothing"
    shown = ", ".join(entries[:_MAX_NAMES_IN_ERROR])
    more = len(entries) - _MAX_NAMES_IN_ERROR
    return shown + (f" and {more} more" if more > 0 else "")


def _unrecognised(root: Path) -> LayoutError:
    found = _describe(root)
    dirs = _visible_dirs(root)
    if len(dirs) == 1:
        inner = next(iter(dirs.values()))
        found += f" (inside {inner.name}/: {_describe(inner)})"
    return LayoutError(
        f"No known dataset layout in {root}: found {found}; expected {EXPECTED_LAYOUTS}, "
        "so point the source at a folder or archive in one of these layouts."
    )


def _to_candidates(root: Path, found: list[_Found]) -> list[Candidate]:
    candidates = [
        Candidate(path=path, relative_path=path.relative_to(root).as_posix(), label=label, source_split=split)
        for path, label, split in found
    ]
    return sorted(candidates, key=lambda c: c.relative_path)


def find_candidates(root: str | os.PathLike[str]) -> tuple[str, list[Candidate]]:
    """Recognise the layout under `root` and list its candidate files, sorted by relative path.

    Returns `(layout, candidates)` with layout in `LAYOUTS`. Paths are absolute; relative paths
    are POSIX and relative to `root`, so they stay the same wherever the source is extracted.
    Raises LayoutError when `root` is not a folder, matches no layout, or its class folders
    hold no files.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise LayoutError(f"Source {root} is not a folder; pass the folder the archive was extracted to.")
    for base in _bases(root):
        for layout, detect in _DETECTORS:
            found = detect(base)
            if found is None:
                continue
            if not found:
                raise LayoutError(
                    f"The {layout} layout in {base} holds no files in its class folders; "
                    "check that the archive was extracted completely."
                )
            _refuse_one_class(base, found)
            return layout, _to_candidates(root, found)
    raise _lone_class_folder(root) or _unrecognised(root)


def _refuse_one_class(base: Path, found: list[_Found]) -> None:
    """A source of one class (a lone `cats/` folder) in one sentence: no threshold can make it a classifier's data."""
    labels = {label for _, label, _ in found if label}
    if len(labels) != 1:
        return
    [label] = labels
    if label in CLASS_FOLDER_LABELS.values():
        other = "dog" if label == "cat" else "cat"
        raise LayoutError(f"No {other} images were found in {base}, only {label} images; add the {other} images "
                          f"(a {other}s/ folder beside {label}s/), as a classifier needs two or more classes.")
    raise LayoutError(f"One class ({label}) was found in {base}: a classifier needs two or more; "
                      "add a folder of images for each other class beside it.")


def _lone_class_folder(root: Path) -> LayoutError | None:
    """`flowers/daisy/*.jpg` and nothing beside `daisy/` (in the root or its wrapping folder): one class, said as
    such rather than as an unknown layout."""
    for base in _bases(root):
        dirs = _visible_dirs(base)
        if len(dirs) != 1 or _visible_files(base):
            continue
        [folder] = dirs.values()
        if not _visible_dirs(folder) and _visible_files(folder):
            return LayoutError(f"One class ({folder.name}/) was found in {base}: a classifier needs two or more; "
                               f"add a folder of images for each other class beside {folder.name}/.")
    return None


def kaggle_unlabelled_folder(root: str | os.PathLike[str]) -> Path | None:
    """Kaggle's unlabelled pool (`test1/`) when `root` holds the competition layout, else None.

    The competition zip unpacks to `train/` (labelled `cat.N.jpg`, `dog.N.jpg`), `test1/` (the
    images a submission scores) and `sampleSubmission.csv`; a prediction given the whole of it
    means its `test1/`.
    """
    for base in _bases(Path(root)):
        dirs = _visible_dirs(base)
        if KAGGLE_TRAIN not in dirs or set(dirs) - {KAGGLE_TRAIN, *KAGGLE_UNLABELLED_FOLDERS}:
            continue
        if not any(_KAGGLE_NAME.match(path.name) for path in _visible_files(_unwrap_same_name(dirs[KAGGLE_TRAIN]))):
            continue
        for name in KAGGLE_UNLABELLED_FOLDERS:
            if name in dirs:
                return _unwrap_same_name(dirs[name])
    return None


class LayoutFound(BaseModel):
    """What `describe_layout` found: the layout and how many candidates of each label and source split."""

    layout: str
    root: str
    candidates: int
    labels: dict[str, int]
    source_splits: dict[str, int]

    def classes(self) -> ClassMap:
        """The class map of the labels found (cats vs. dogs, or any classes by their normalised names)."""
        return classes_of_labels(self.labels)

    def counts_text(self) -> str:
        """`cat 12, dog 12, 40 unlabelled`: the label counts as people read them (the pool's label is empty)."""
        labelled = [f"{label} {n}" for label, n in sorted(self.labels.items()) if label]
        unlabelled = [f"{self.labels['']} unlabelled"] if self.labels.get("") else []
        return ", ".join(labelled + unlabelled) or "none"


def describe_layout(root: str | os.PathLike[str]) -> LayoutFound:
    """Fail fast on an unknown layout and report what was found (the list itself stays on disk)."""
    layout, candidates = find_candidates(root)
    return LayoutFound(layout=layout, root=str(Path(root).absolute()), candidates=len(candidates),
                       labels=dict(Counter(c.label for c in candidates)),
                       source_splits=dict(Counter(c.source_split for c in candidates)))
