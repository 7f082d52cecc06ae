"""Layout recognition: every supported source shape yields the right labels and source splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.errors import InputError, LayoutError
from tasks.data.layout import Candidate, describe_layout, find_candidates
from tests.imagegen import FAULTS, image_bytes, write_kaggle_tree, write_petimages_tree, write_presplit_tree


def _labels(candidates: list[Candidate]) -> dict[str, tuple[str, str]]:
    return {c.relative_path: (c.label, c.source_split) for c in candidates}


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_kaggle_competition_folder(tmp_path):
    root = write_kaggle_tree(tmp_path / "dogs-vs-cats", per_class=2, unlabelled=2)
    _write(root / "sampleSubmission.csv", b"id,label\n")
    _write(root / "train" / ".DS_Store")

    layout, candidates = find_candidates(root)

    assert layout == "kaggle"
    assert _labels(candidates) == {
        "test1/1.jpg": ("", "unlabelled"), "test1/2.jpg": ("", "unlabelled"),
        "train/cat.0.jpg": ("cat", "train"), "train/cat.1.jpg": ("cat", "train"),
        "train/dog.0.jpg": ("dog", "train"), "train/dog.1.jpg": ("dog", "train"),
    }
    assert all(c.path.is_absolute() and c.path == root / c.relative_path for c in candidates)


def test_kaggle_inner_archives_extracted_into_their_own_folders(tmp_path):
    """train.zip holds train/, so extracting it into `train/` nests the folder once more."""
    root = tmp_path / "competition"
    _write(root / "train" / "train" / "cat.7.jpg")
    _write(root / "train" / "train" / "Dog.8.jpg")
    _write(root / "train" / "train" / "Thumbs.db")
    _write(root / "test1" / "test1" / "3.jpg")

    layout, candidates = find_candidates(root)

    assert layout == "kaggle"
    assert _labels(candidates) == {
        "test1/test1/3.jpg": ("", "unlabelled"),
        "train/train/Dog.8.jpg": ("dog", "train"),
        "train/train/Thumbs.db": ("", "unlabelled"),  # no class prefix: never trained on
        "train/train/cat.7.jpg": ("cat", "train"),
    }


@pytest.mark.parametrize("wrapper", ["", "kagglecatsanddogs_5340"])
def test_petimages_with_archive_noise(tmp_path, wrapper):
    root = tmp_path / "extracted"
    base = root / wrapper if wrapper else root
    write_petimages_tree(base, per_class=2, faults=True)
    _write(base / "CDLA-Permissive-2.0.pdf")
    _write(base / "readme[1].txt")
    _write(root / "__MACOSX" / "PetImages" / "Cat" / "._0.jpg")
    _write(base / "PetImages" / "Dog" / ".DS_Store")

    layout, candidates = find_candidates(root)

    assert layout == "petimages"
    labels = _labels(candidates)
    prefix = f"{wrapper}/PetImages" if wrapper else "PetImages"
    assert labels[f"{prefix}/Cat/0.jpg"] == ("cat", "")
    assert labels[f"{prefix}/Dog/1.jpg"] == ("dog", "")
    assert labels[f"{prefix}/Cat/Thumbs.db"] == ("cat", "")  # candidate; the manifest quarantines it
    assert {f"{prefix}/Cat/{name}" for name in FAULTS} <= set(labels)
    assert not any("__MACOSX" in p or ".DS_Store" in p or p.endswith((".pdf", ".txt")) for p in labels)
    assert [c.relative_path for c in candidates] == sorted(labels)


def test_petimages_folder_itself_and_nested_class_subfolders(tmp_path):
    pet = tmp_path / "PetImages"
    _write(pet / "Cat" / "1.jpg")
    _write(pet / "Dog" / "more" / "2.jpg")

    layout, candidates = find_candidates(pet)

    assert layout == "petimages"
    assert _labels(candidates) == {"Cat/1.jpg": ("cat", ""), "Dog/more/2.jpg": ("dog", "")}


def test_presplit_cats_and_dogs_filtered(tmp_path):
    root = tmp_path / "extracted"
    write_presplit_tree(root / "cats_and_dogs_filtered", per_class={"train": 2, "validation": 1})
    _write(root / "cats_and_dogs_filtered" / "vectorize.py")
    _write(root / "__MACOSX" / "cats_and_dogs_filtered" / "._train")

    layout, candidates = find_candidates(root)

    assert layout == "presplit"
    assert _labels(candidates) == {
        "cats_and_dogs_filtered/train/cats/cat.0.jpg": ("cat", "train"),
        "cats_and_dogs_filtered/train/cats/cat.1.jpg": ("cat", "train"),
        "cats_and_dogs_filtered/train/dogs/dog.0.jpg": ("dog", "train"),
        "cats_and_dogs_filtered/train/dogs/dog.1.jpg": ("dog", "train"),
        "cats_and_dogs_filtered/validation/cats/cat.1000.jpg": ("cat", "validation"),
        "cats_and_dogs_filtered/validation/dogs/dog.1000.jpg": ("dog", "validation"),
    }


def test_presplit_singular_and_mixed_case(tmp_path):
    for rel in ("Train/Cat/a.jpg", "Train/DOGS/b.jpg", "VALIDATION/cat/c.jpg", "test/Dog/d.jpg"):
        _write(tmp_path / rel)

    layout, candidates = find_candidates(tmp_path)

    assert layout == "presplit"
    assert _labels(candidates) == {
        "Train/Cat/a.jpg": ("cat", "train"), "Train/DOGS/b.jpg": ("dog", "train"),
        "VALIDATION/cat/c.jpg": ("cat", "validation"), "test/Dog/d.jpg": ("dog", "test"),
    }


@pytest.mark.parametrize("cat_dir,dog_dir", [("cats", "dogs"), ("Cat", "Dog")])
def test_plain_class_folders(tmp_path, cat_dir, dog_dir):
    _write(tmp_path / cat_dir / "x.jpg", image_bytes("cat", 1))
    _write(tmp_path / dog_dir / "y.png", image_bytes("dog", 1, fmt="PNG"))
    _write(tmp_path / "LICENSE.txt")
    _write(tmp_path / "labels.csv")

    layout, candidates = find_candidates(tmp_path)

    assert layout == "class_folders"
    assert _labels(candidates) == {f"{cat_dir}/x.jpg": ("cat", ""), f"{dog_dir}/y.png": ("dog", "")}


def test_unknown_layout_says_what_was_found_and_what_is_expected(tmp_path):
    _write(tmp_path / "images" / "1.jpg")
    _write(tmp_path / "labels.csv")

    with pytest.raises(LayoutError) as caught:
        find_candidates(tmp_path)

    message = str(caught.value)
    assert isinstance(caught.value, InputError)  # never retried
    assert "images/" in message and "labels.csv" in message
    for expected in ("Kaggle", "PetImages", "pre-split", "class folders"):
        assert expected in message


def test_unknown_layout_inside_a_wrapper_lists_the_wrapper_contents(tmp_path):
    _write(tmp_path / "bundle" / "photos" / "1.jpg")
    _write(tmp_path / "bundle" / "labels.csv")  # a lone photos/ alone would be one class (tests/data/test_any_classes.py)

    with pytest.raises(LayoutError, match=r"bundle/.*inside bundle/: labels.csv, photos/"):
        find_candidates(tmp_path)


def test_unexpected_folder_beside_class_folders_is_not_silently_dropped(tmp_path):
    for rel in ("cats/a.jpg", "dogs/b.jpg", "birds/c.jpg"):
        _write(tmp_path / rel)

    with pytest.raises(LayoutError, match="birds/"):
        find_candidates(tmp_path)


def test_class_folders_without_files(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    _write(tmp_path / "dogs" / ".hidden")

    with pytest.raises(LayoutError, match="holds no files"):
        find_candidates(tmp_path)


def test_missing_or_file_root(tmp_path):
    _write(tmp_path / "archive.zip")
    with pytest.raises(LayoutError, match="not a folder"):
        find_candidates(tmp_path / "archive.zip")
    with pytest.raises(LayoutError, match="not a folder"):
        find_candidates(tmp_path / "missing")


def test_task_returns_a_small_summary(tmp_path):
    root = write_kaggle_tree(tmp_path, per_class=2, unlabelled=1)

    summary = describe_layout(str(root))

    assert summary.model_dump() == {
        "layout": "kaggle", "root": str(root), "candidates": 5,
        "labels": {"cat": 2, "dog": 2, "": 1}, "source_splits": {"train": 4, "unlabelled": 1},
    }
    assert summary.counts_text() == "cat 2, dog 2, 1 unlabelled"  # Kaggle's test1 pool has no label: said so


def test_links_are_followed_once_and_a_folder_link_that_leads_nowhere_is_named(tmp_path):
    """Folders and files alike (README "Your own classes"); a link up is not followed; a dangling link where
    class folders are looked for may be a whole class (a disk not mounted): it stops the run, naming it."""
    root = tmp_path / "flowers"
    for name in ("daisy", "tulips"):
        _write(root / name / "1.jpg", image_bytes("cat", 1))
    _write(tmp_path / "elsewhere" / "roses" / "1.jpg", image_bytes("dog", 2))
    (root / "roses").symlink_to(tmp_path / "elsewhere" / "roses")
    (root / "daisy" / "up").symlink_to(Path(".."))  # a loop: flowers/daisy/up/daisy/up/...
    (root / "tulips" / "2.jpg").symlink_to(tmp_path / "elsewhere" / "roses" / "1.jpg")

    layout, candidates = find_candidates(root)

    assert layout == "any_classes"
    assert _labels(candidates) == {
        "daisy/1.jpg": ("daisy", ""), "roses/1.jpg": ("roses", ""),  # once dropped without a word
        "tulips/1.jpg": ("tulips", ""), "tulips/2.jpg": ("tulips", ""),
    }

    (root / "daisy" / "up").unlink()
    (root / "lilies").symlink_to(tmp_path / "unmounted" / "lilies")
    with pytest.raises(LayoutError, match=f"{root / 'lilies'} is a symbolic link to .*unmounted/lilies, which does "
                                          "not exist; restore \\(or mount\\) what it leads to, or remove the link"):
        find_candidates(root)
