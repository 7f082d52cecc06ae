"""Dedupe and split, on hand-built manifests (no Prefect, no image decoding).

The split is stratified by class and stable as data grows; the class sets of 3, 5 and 10 classes
here are what a person brings (60-200 images a class), checked by the real validation suite.
"""

from __future__ import annotations

import random

import pandas as pd
import pytest

from tasks.common.errors import ConfigError
from tasks.common.labels import SPLITS, class_map
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import write_manifest
from tasks.data.splits import (
    allocate,
    assign_splits,
    assign_splits_file,
    check_fractions,
    presplit_splits,
    split_settings,
)
from tasks.data.validate import ValidationThresholds, validate_manifest
from tests.data.rows import by_name, frame, row

SMALL_SET = ValidationThresholds(min_per_class=50, min_per_class_per_split=5)
"""The counts a set of 60-200 images a class can meet; the balance check keeps its default (1.5)."""


def class_set(n_classes: int, seed: int, low: int = 60, high: int = 200, ratio: float = 1.2) -> list[dict]:
    """Rows of `n_classes` classes, each of a size drawn in [size, size * ratio] within [low, high]."""
    rng = random.Random(seed)
    smallest = rng.randint(low, int(high / ratio))
    sizes = [rng.randint(smallest, int(smallest * ratio)) for _ in range(n_classes)]
    return [row(f"class{c}/{seed}-{i}.jpg", f"class{c}") for c, size in enumerate(sizes) for i in range(size)]


def per_class_split(out: pd.DataFrame) -> pd.DataFrame:
    kept = out[out["split"].isin(SPLITS)]
    return kept.groupby(["label", "split"]).size().unstack(fill_value=0)


# --------------------------------------------------------------------------- the split rule


def test_allocation_fills_the_splits_furthest_below_their_share():
    shares = dict(zip(SPLITS, (0.8, 0.1, 0.1)))
    assert allocate({}, 10, shares) == {"train": 8, "validation": 1, "test": 1}
    assert allocate({}, 72, shares) == {"train": 58, "validation": 7, "test": 7}  # 57.6 / 7.2 / 7.2
    assert allocate({"train": 10}, 5, shares) == {"train": 2, "validation": 2, "test": 1}  # pulled back, none moved
    assert allocate({}, 9, {"train": 0.9, "validation": 0.0, "test": 0.1}) == {"train": 8, "validation": 0, "test": 1}


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused_with_the_fix(fractions):
    with pytest.raises(ConfigError, match="sum to 1"):
        check_fractions(fractions)


@pytest.mark.parametrize("n_classes", [3, 5, 10])
def test_balanced_classes_get_their_fractions_in_every_split_and_pass_the_default_balance_check(n_classes, tmp_path):
    rows = class_set(n_classes, seed=n_classes)
    out = assign_splits(frame(rows))
    counts = per_class_split(out)
    sizes = counts.sum(axis=1)
    for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert ((counts[split] - sizes * fraction).abs() < 1).all(), counts  # each class within one image
    verdict = validate_manifest(out, tmp_path / "validation", SMALL_SET, classes=class_map(counts.index))
    assert verdict.success, verdict.brief
    shuffled = assign_splits(frame(rows).sample(frac=1.0, random_state=3)).set_index("relative_path")["split"]
    assert (shuffled.loc[out["relative_path"]].to_numpy() == out["split"].to_numpy()).all()  # content decides, not order


def test_a_class_missing_from_a_split_or_3x_short_in_one_still_fails(tmp_path):
    rows = []
    for label in ("apple", "banana", "cherry"):  # a pre-split source: its own splits are kept as they are
        validation = {"apple": 15, "banana": 5, "cherry": 0}[label]  # banana 3x short, cherry missing
        rows += [row(f"train/{label}/{i}.jpg", label, source_split="train") for i in range(120)]
        rows += [row(f"validation/{label}/{i}.jpg", label, source_split="validation") for i in range(validation)]
        rows += [row(f"test/{label}/{i}.jpg", label, source_split="test") for i in range(15)]
    verdict = validate_manifest(assign_splits(frame(rows)), tmp_path / "validation",
                                SMALL_SET.model_copy(update={"min_per_class_per_split": 1}),
                                classes=class_map(["apple", "banana", "cherry"]))
    assert not verdict.success
    [balance] = [line for line in verdict.brief if line.startswith("class_balance:")]
    assert "validation/banana share of largest 0.3333 < 0.6667" in balance and "validation/cherry" in balance
    [missing] = [line for line in verdict.brief if line.startswith("enough_images_per_class_per_split:")]
    assert missing == "enough_images_per_class_per_split: validation/cherry 0 < 1"


def test_old_images_never_move_when_images_are_added():
    old = frame([row(f"{label}.{i}.jpg", label) for i in range(200) for label in ("cat", "dog")])
    first = assign_splits(old)
    before = first.set_index("relative_path")["split"]
    record = dict(zip(first["sha256"], first["split"]))
    grown = frame([row(f"{label}.{i}.jpg", label) for i in range(300) for label in ("cat", "dog")])
    out = assign_splits(grown, record=record)
    after = out.set_index("relative_path")["split"]
    assert (after.loc[before.index] == before).all()
    counts = per_class_split(out)
    assert (counts["validation"] == 30).all() and (counts["test"] == 30).all()  # the new ones filled towards 10%
    shuffled = assign_splits(grown.sample(frac=1.0, random_state=3), record=record).set_index("relative_path")["split"]
    assert (shuffled.loc[after.index] == after).all()  # and the result is independent of row order
    assert not (assign_splits(grown).set_index("relative_path")["split"].loc[before.index] == before).all()  # the record did it


def test_the_data_folder_records_the_splits_and_keeps_them_while_the_settings_hold(tmp_path):
    folder = DataFolder(tmp_path / "data")
    folder.root.mkdir()
    small = [row(f"{label}/{i}.jpg", label) for i in range(40) for label in ("daisy", "roses")]
    write_manifest(frame(small), folder.inspected)
    assert assign_splits_file(folder).placed == 80
    first = pd.read_parquet(folder.splits).set_index("relative_path")["split"]
    more = small + [row(f"{label}/{i}.jpg", label) for i in range(40, 52) for label in ("daisy", "roses")]
    write_manifest(frame(more), folder.inspected)
    grown = assign_splits_file(folder)
    assert (grown.kept, grown.placed) == (80, 24)
    assert (pd.read_parquet(folder.splits).set_index("relative_path")["split"].loc[first.index] == first).all()
    other = assign_splits_file(folder, fractions=(0.6, 0.2, 0.2))  # other fractions: split afresh
    assert other.placed == 104
    assert ((per_class_split(pd.read_parquet(folder.splits))["validation"] - 52 * 0.2).abs() < 1).all()
    assert folder.split_settings.read_text().count("0.6") == 1


def test_a_folder_arranged_before_the_record_existed_keeps_its_arranged_splits(tmp_path):
    folder = DataFolder(tmp_path / "data")
    folder.root.mkdir()
    rows = [row(f"{label}/{i}.jpg", label) for i in range(30) for label in ("cat", "dog")]
    arranged = frame(rows)
    arranged["split"] = ["test" if i % 3 == 0 else "train" for i in range(len(rows))]  # whatever it had
    write_manifest(arranged, folder.manifest)
    write_manifest(frame(rows), folder.inspected)
    assert assign_splits_file(folder).kept == 60
    assert (pd.read_parquet(folder.splits)["split"] == arranged["split"]).all()
    assert folder.split_settings.is_file()
    write_manifest(frame(rows[:10]), folder.manifest)  # from now on the record is splits.parquet + splits.json
    assert assign_splits_file(folder).kept == 60
    assert split_settings((0.8, 0.1, 0.1), True)["rule"] in folder.split_settings.read_text()


# --------------------------------------------------------------------------- assign_splits


def test_duplicates_are_kept_once_and_quarantined_otherwise():
    df = frame([
        row("Cat/1.jpg", content="same"), row("Cat/dup_of_1.jpg", content="same"),
        row("Cat/2.jpg"), row("Dog/3.jpg", "dog"),
    ])
    out = by_name(assign_splits(df))
    assert out["Cat/1.jpg"][0] == "ok" and out["Cat/1.jpg"][2] in ("train", "validation", "test")
    assert out["Cat/dup_of_1.jpg"] == ("quarantined", "duplicate", "")
    assert out["Cat/2.jpg"][0] == out["Dog/3.jpg"][0] == "ok"


def test_same_image_under_both_labels_quarantines_every_copy():
    df = frame([
        row("Cat/conflict.jpg", "cat", content="c"), row("Cat/conflict_again.jpg", "cat", content="c"),
        row("Dog/conflict.jpg", "dog", content="c"), row("Dog/fine.jpg", "dog"),
    ])
    out = by_name(assign_splits(df))
    for name in ("Cat/conflict.jpg", "Cat/conflict_again.jpg", "Dog/conflict.jpg"):
        assert out[name] == ("quarantined", "label_conflict", "")
    assert out["Dog/fine.jpg"][0] == "ok"


def test_unlabelled_pool_gets_its_own_split_and_loses_to_a_labelled_copy():
    df = frame([
        row("train/cat.1.jpg", "cat", content="a", source_split="train"),
        row("train/dog.1.jpg", "dog", content="b", source_split="train"),
        row("test1/1.jpg", "", content="u1", source_split="unlabelled"),
        row("test1/2.jpg", "", content="a", source_split="unlabelled"),   # also in train
        row("test1/3.jpg", "", content="u1", source_split="unlabelled"),  # same as test1/1
    ])
    out = by_name(assign_splits(df))
    assert out["test1/1.jpg"] == ("ok", "", "unlabelled")
    assert out["test1/2.jpg"] == ("quarantined", "duplicate", "")
    assert out["test1/3.jpg"] == ("quarantined", "duplicate", "")
    # a single labelled train/ folder (Kaggle) is not a pre-split source: each class is split, the first to train
    assert out["train/cat.1.jpg"][2] == out["train/dog.1.jpg"][2] == "train"


def test_rows_quarantined_upstream_keep_their_reason_and_get_no_split():
    df = frame([row("Cat/empty.jpg", status="quarantined", reason="empty_file", content=""),
                row("Cat/ok.jpg", content="")])  # an ok file with the same hash is not a duplicate of it
    out = by_name(assign_splits(df))
    assert out["Cat/empty.jpg"] == ("quarantined", "empty_file", "")
    assert out["Cat/ok.jpg"][0] == "ok"


def test_assign_splits_is_pure_and_idempotent():
    df = frame([row("a.jpg", content="x"), row("b.jpg", content="x"), row("c.jpg", "dog", content="x2")])
    snapshot = df.copy()
    once = assign_splits(df)
    twice = assign_splits(once)
    pd.testing.assert_frame_equal(df, snapshot)
    pd.testing.assert_frame_equal(once, twice)


def presplit_rows(n_train: int = 300, n_val: int = 40, with_test: bool = False) -> list[dict]:
    rows = []
    for label in ("cat", "dog"):
        rows += [row(f"train/{label}s/{label}.{i}.jpg", label, source_split="train") for i in range(n_train)]
        rows += [row(f"validation/{label}s/{label}.{i}.jpg", label, source_split="validation") for i in range(n_val)]
        if with_test:
            rows += [row(f"test/{label}s/{label}.{i}.jpg", label, source_split="test") for i in range(n_val)]
    return rows


def test_presplit_source_keeps_validation_and_carves_test_out_of_train():
    df = frame(presplit_rows())
    assert presplit_splits(df) == {"train", "validation"}
    out = assign_splits(df)
    val = out[out["source_split"] == "validation"]
    assert (val["split"] == "validation").all()
    train = out[out["source_split"] == "train"]
    assert set(train["split"]) == {"train", "test"}
    carved = train[train["split"] == "test"].groupby("label").size()
    assert carved.to_dict() == {"cat": 30, "dog": 30}      # 10% of each class's train images
    assert not (train["split"] == "validation").any()      # validation is the source's own


def test_presplit_source_with_a_test_folder_keeps_all_three():
    out = assign_splits(frame(presplit_rows(n_train=50, n_val=10, with_test=True)))
    assert (out["split"] == out["source_split"]).all()


def test_presplit_can_be_overridden():
    out = assign_splits(frame(presplit_rows()), respect_source_split=False)
    assert (per_class_split(out) == pd.DataFrame({"test": [34, 34], "train": [272, 272], "validation": [34, 34]},
                                                 index=["cat", "dog"])).all().all()
    assert (out[out["source_split"] == "validation"]["split"] != "validation").any()


def test_presplit_leak_between_source_splits_keeps_the_train_copy():
    df = frame(presplit_rows(n_train=5, n_val=2) + [
        row("validation/cats/leak.jpg", "cat", content="train/cats/cat.0.jpg", source_split="validation")])
    out = by_name(assign_splits(df))
    assert out["validation/cats/leak.jpg"] == ("quarantined", "duplicate", "")
    assert out["train/cats/cat.0.jpg"][0] == "ok"
