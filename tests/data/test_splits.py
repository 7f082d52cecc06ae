"""Dedupe and split, on hand-built manifests (no Prefect, no image decoding)."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.common.errors import ConfigError
from tasks.data.splits import assign_splits, hash_unit, presplit_splits, split_for_hash
from tests.data.rows import by_name, frame, row, sha


# --------------------------------------------------------------------------- split_for_hash


def test_split_for_hash_cuts_the_hash_line_at_cumulative_fractions():
    assert split_for_hash("0" * 64) == "train"
    assert split_for_hash("c" + "0" * 63) == "train"          # 0.75 < 0.8
    assert split_for_hash("d" + "0" * 63) == "validation"     # 0.8125
    assert split_for_hash("e" + "8" * 63) == "test"           # 0.908
    assert split_for_hash("f" * 64) == "test"
    assert split_for_hash("f" * 64, (1.0, 0.0, 0.0)) == "train"
    assert split_for_hash("0" * 64, (0.0, 0.5, 0.5)) == "validation"


def test_split_fractions_follow_the_requested_proportions():
    splits = pd.Series([split_for_hash(sha(str(i))) for i in range(4000)]).value_counts(normalize=True)
    assert splits["train"] == pytest.approx(0.8, abs=0.03)
    assert splits["validation"] == pytest.approx(0.1, abs=0.02)
    assert splits["test"] == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused_with_the_fix(fractions):
    with pytest.raises(ConfigError, match="sum to 1"):
        split_for_hash(sha("x"), fractions)


def test_hash_unit_is_in_unit_interval():
    assert hash_unit("0" * 64) == 0.0
    assert 0.999 < hash_unit("f" * 64) < 1.0


# --------------------------------------------------------------------------- assign_splits


def test_old_images_never_move_when_images_are_added():
    old = frame([row(f"{label}.{i}.jpg", label) for i in range(200) for label in ("cat", "dog")])
    before = assign_splits(old).set_index("relative_path")["split"]
    grown = frame([row(f"{label}.{i}.jpg", label) for i in range(300) for label in ("cat", "dog")])
    after = assign_splits(grown).set_index("relative_path")["split"]
    assert (after.loc[before.index] == before).all()
    assert set(after) == {"train", "validation", "test"}
    # and the result is independent of row order
    shuffled = assign_splits(grown.sample(frac=1.0, random_state=3)).set_index("relative_path")["split"]
    assert (shuffled.loc[after.index] == after).all()


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
    # a single labelled train/ folder (Kaggle) is not a pre-split source: hash decides
    assert out["train/cat.1.jpg"][2] == split_for_hash(sha("a"))


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
    carved = train[train["split"] == "test"]
    assert 0.05 < len(carved) / len(train) < 0.16          # ~10% of the source's train images
    assert (carved["sha256"].map(split_for_hash) == "test").all()   # carved by content hash
    assert not (train["split"] == "validation").any()      # validation is the source's own


def test_presplit_source_with_a_test_folder_keeps_all_three():
    out = assign_splits(frame(presplit_rows(n_train=50, n_val=10, with_test=True)))
    assert (out["split"] == out["source_split"]).all()


def test_presplit_can_be_overridden_by_the_hash():
    out = assign_splits(frame(presplit_rows()), respect_source_split=False)
    assert (out["split"] == out["sha256"].map(split_for_hash)).all()
    assert (out[out["source_split"] == "validation"]["split"] != "validation").any()


def test_presplit_leak_between_source_splits_keeps_the_train_copy():
    df = frame(presplit_rows(n_train=5, n_val=2) + [
        row("validation/cats/leak.jpg", "cat", content="train/cats/cat.0.jpg", source_split="validation")])
    out = by_name(assign_splits(df))
    assert out["validation/cats/leak.jpg"] == ("quarantined", "duplicate", "")
    assert out["train/cats/cat.0.jpg"][0] == "ok"
