"""The Great Expectations gate over hand-built manifests: a good one passes, each fault is named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.errors import DatasetValidationError
from tasks.common.labels import SPLITS
from tasks.data.images import MAX_SIDE
from tasks.data.validate import (
    ValidationThresholds,
    Verdict,
    class_counts_frame,
    rows_frame,
    validate_manifest,
    validation_key,
)
from tests.data.rows import frame, row

THRESHOLDS = ValidationThresholds(min_per_class=20, min_per_class_per_split=4, max_class_imbalance=1.5,
                                  max_quarantined_share=0.1)
PER_SPLIT = {"train": 16, "validation": 4, "test": 4}


def good_manifest() -> pd.DataFrame:
    """24 images per class split 16/4/4, two unlabelled images and one quarantined file."""
    rows = []
    for label in ("cat", "dog"):
        for split, n in PER_SPLIT.items():
            for i in range(n):
                r = row(f"{label}/{split}/{i}.jpg", label)
                r["split"] = split
                rows.append(r)
    for i in range(2):
        r = row(f"test1/{i}.jpg", "", source_split="unlabelled")
        r["split"] = "unlabelled"
        rows.append(r)
    bad = row("cat/empty.jpg", status="quarantined", reason="empty_file")
    bad.update(format="", mode="", width=0, height=0)
    rows.append(bad)
    return frame(rows)


def files_under(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_good_manifest_passes_and_keeps_json_and_data_docs(tmp_path):
    out = tmp_path / "validation"
    verdict = validate_manifest(good_manifest(), out, THRESHOLDS)
    assert verdict.success, verdict.failed
    assert verdict.failed == [] and verdict.reused is False
    assert Path(verdict.result_path) == out / "result.json"
    assert Path(verdict.data_docs_path) == out / "data_docs" / "index.html"
    assert "manifest_rows" in (out / "data_docs" / "index.html").read_text()
    stored = json.loads((out / "result.json").read_text())
    assert stored["success"] is True
    assert stored["thresholds"]["min_per_class"] == 20
    checks = {r["expectation_config"]["meta"]["check"] for v in stored["validations"].values() for r in v["results"]}
    assert {"kept_sha256_unique", "no_image_in_two_splits", "labels_in_set", "width_in_bounds",
            "quarantined_share", "enough_images_per_class", "enough_images_per_class_per_split",
            "class_balance"} <= checks
    assert not [p for p in tmp_path.iterdir() if p.name != "validation"]  # temp folder swapped in


def test_the_same_manifest_is_not_validated_twice(tmp_path, monkeypatch):
    out = tmp_path / "validation"
    first = validate_manifest(good_manifest(), out, THRESHOLDS)
    before = files_under(out)
    import tasks.data.validate as module

    monkeypatch.setattr(module, "_quiet_gx", lambda: pytest.fail("Great Expectations ran again"))
    again = validate_manifest(good_manifest().sample(frac=1.0, random_state=1), out, THRESHOLDS)
    assert again.reused is True and again.success and again.fingerprint == first.fingerprint
    assert files_under(out) == before


def test_the_key_changes_with_the_manifest_and_the_thresholds():
    base = validation_key(good_manifest(), THRESHOLDS)
    changed = good_manifest()
    changed.loc[0, "split"] = "test"
    assert validation_key(changed, THRESHOLDS) != base
    assert validation_key(good_manifest(), THRESHOLDS.model_copy(update={"min_per_class": 21})) != base
    assert validation_key(good_manifest(), THRESHOLDS, required_splits=("train", "validation")) != base


def _drop(df: pd.DataFrame, label: str, split: str, keep: int) -> pd.DataFrame:
    mask = (df["label"] == label) & (df["split"] == split)
    return df.drop(df[mask].index[keep:]).reset_index(drop=True)


def _too_few(df):
    return _drop(_drop(df, "cat", "train", 6), "dog", "train", 6)


def _missing_class_in_test(df):
    return _drop(df, "dog", "test", 0)


def _imbalanced(df):
    extra = df[(df["label"] == "cat") & (df["split"] == "train")].copy()
    extra["relative_path"] = extra["relative_path"].str.replace(".jpg", "_more.jpg")
    extra["sha256"] = extra["sha256"].str[::-1]
    return pd.concat([df, extra], ignore_index=True)


def _too_many_quarantined(df):
    bad = df[df["status"] == "quarantined"].iloc[[0] * 6].copy()
    bad["relative_path"] = [f"cat/bad{i}.jpg" for i in range(6)]
    return pd.concat([df, bad], ignore_index=True)


def _same_image_in_two_splits(df):
    df = df.copy()
    train_cat = df[(df["label"] == "cat") & (df["split"] == "train")].index[0]
    test_cat = df[(df["label"] == "cat") & (df["split"] == "test")].index[0]
    df.loc[test_cat, "sha256"] = df.loc[train_cat, "sha256"]
    return df


def _unknown_label(df):
    df = df.copy()
    df.loc[0, "label"] = "horse"
    return df


def _unlabelled_in_train(df):
    df = df.copy()
    df.loc[df["split"] == "unlabelled", "split"] = "train"
    return df


def _too_small_kept(df):
    df = df.copy()
    df.loc[3, "width"] = 8
    return df


def _kept_without_split(df):
    df = df.copy()
    df.loc[5, "split"] = ""
    return df


@pytest.mark.parametrize("fault, checks, observed", [
    (_too_few, {"enough_images_per_class"}, "all/cat: 14"),
    (_missing_class_in_test, {"enough_images_per_class_per_split", "class_balance"}, "test/dog: 0"),
    (_imbalanced, {"class_balance"}, "train/cat: 0.6667"),
    (_too_many_quarantined, {"quarantined_share"}, "observed 0.1228"),
    (_same_image_in_two_splits, {"kept_sha256_unique", "no_image_in_two_splits"}, "cat/test/0.jpg"),
    (_unknown_label, {"labels_in_set"}, "horse"),
    (_unlabelled_in_train, {"labels_in_set"}, "test1/0.jpg"),
    (_too_small_kept, {"width_in_bounds"}, "8"),
    (_kept_without_split, {"kept_rows_have_a_split"}, ""),
])
def test_each_dataset_fault_fails_with_its_expectation_named(tmp_path, fault, checks, observed):
    verdict = validate_manifest(fault(good_manifest()), tmp_path / "validation", THRESHOLDS)
    assert not verdict.success
    failed = {line.split(":")[0] for line in verdict.failed}
    assert failed == checks, verdict.failed
    assert observed in "\n".join(verdict.failed)
    assert (tmp_path / "validation" / "data_docs" / "index.html").is_file()
    assert json.loads((tmp_path / "validation" / "result.json").read_text())["success"] is False


def test_required_splits_leave_out_a_split_with_no_share(tmp_path):
    no_test = good_manifest()
    no_test = no_test[no_test["split"] != "test"].reset_index(drop=True)
    assert not validate_manifest(no_test, tmp_path / "a", THRESHOLDS).success
    thresholds = THRESHOLDS.model_copy(update={"min_per_class": 16})
    verdict = validate_manifest(no_test, tmp_path / "b", thresholds, required_splits=("train", "validation"))
    assert verdict.success, verdict.failed


def test_a_crash_mid_validation_keeps_the_previous_verdict(tmp_path, monkeypatch):
    out = tmp_path / "validation"
    validate_manifest(good_manifest(), out, THRESHOLDS)
    before = files_under(out)
    import tasks.data.validate as module

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(module, "failure_lines", crash)
    with pytest.raises(RuntimeError, match="killed"):
        validate_manifest(_imbalanced(good_manifest()), out, THRESHOLDS)
    assert files_under(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["validation"]


def test_derived_frames_count_missing_classes_and_split_leaks():
    df = _same_image_in_two_splits(_missing_class_in_test(good_manifest()))
    counts = class_counts_frame(df).set_index("key")
    assert counts.loc["test/dog", "images"] == 0 and counts.loc["test/cat", "class_share"] == 1.0
    assert list(counts.index) == [f"{s}/{c}" for s in ("all", *SPLITS) for c in ("cat", "dog")]
    rows = rows_frame(df)
    assert rows["splits_per_image"].max() == 2
    assert rows.loc[rows["status"] == "quarantined", "splits_per_image"].eq(0).all()
    assert rows["quarantined"].sum() == 1


def test_thresholds_are_checked_and_json_friendly():
    with pytest.raises(ValueError):
        ValidationThresholds(max_class_imbalance=0.5)
    with pytest.raises(ValueError):
        ValidationThresholds(max_quarantined_share=2)
    with pytest.raises(ValueError):
        ValidationThresholds(min_per_clas=3)  # a typo is an error, not a silent default
    with pytest.raises(ValueError):
        ValidationThresholds(max_side=MAX_SIDE + 1)  # longer sides are refused where the model serves: not trainable
    assert ValidationThresholds.model_validate_json(THRESHOLDS.model_dump_json()) == THRESHOLDS
    assert ValidationThresholds(max_class_imbalance=1.5).share_bounds() == pytest.approx((0.4, 0.6))


@pytest.mark.parametrize("fault, brief", [
    (_too_few, ["enough_images_per_class: cat 14 < 20, dog 14 < 20"]),
    (_missing_class_in_test, ["enough_images_per_class_per_split: test/dog 0 < 4",
                              "class_balance: test/cat class share 1 > 0.6, test/dog class share 0 < 0.4"]),
    (_too_many_quarantined, ["quarantined_share: 0.1228 > 0.1"]),
    (_too_small_kept, ["width_in_bounds: cat/train/3.jpg width 8 < 32"]),
])
def test_each_failure_has_a_short_line_with_its_numbers_for_the_terminal(tmp_path, fault, brief):
    verdict = validate_manifest(fault(good_manifest()), tmp_path / "validation", THRESHOLDS)
    assert verdict.brief == brief
    reused = validate_manifest(fault(good_manifest()), tmp_path / "validation", THRESHOLDS)
    assert reused.reused and reused.brief == brief  # a reused verdict tells the same numbers


@pytest.mark.parametrize("brief, option, not_option", [
    ("width_in_bounds: cat/train/3.jpg width 8 < 32", "--min-side", "--max-side"),
    ("height_in_bounds: cat/train/3.jpg height 25000 > 20000", "--max-side", "--min-side"),
])
def test_a_side_out_of_bounds_names_the_option_of_the_bound_it_broke(brief, option, not_option):
    check = brief.split(":")[0]
    verdict = Verdict(success=False, failed=[f"{check}: expect_column_values_to_be_between on ..."], brief=[brief],
                      result_path="result.json", data_docs_path="index.html", fingerprint="f", reused=False)
    with pytest.raises(DatasetValidationError) as caught:
        verdict.raise_if_failed("manifest.parquet")
    assert f"loosen the checks with {option} (" in str(caught.value) and not_option not in str(caught.value)
