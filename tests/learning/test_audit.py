"""The data audit on real features: suspected labels, near-copies across splits, outliers, and its folder.

The features come from one randomly initialised VGG16 at 32 px (what every test backbone is),
computed once for the module from generated images: a learnable two-class set and a five-class
set with 5% of their labels flipped, distinctive scenes with re-encoded and resized near-copies
placed across train and test, and blank frames inside one class. The audit itself is numpy and
scikit-learn, so the findings are checked on these matrices without a data folder; one
folder test covers what is written, reused and read back.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.common.errors import DatasetValidationError
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.data.audit_checks import check_audit
from tasks.data.datafolder import DataFolder
from tasks.learning.audit import (LABEL_ISSUE, LEAKAGE, OUTLIER, REPORT_COLUMNS, AuditSettings, audit_features,
                                  audit_folder, leaked_test_hashes, suspected_train_hashes)
from tasks.learning.embedding import embed
from tasks.learning.label_issues import fold_count
from tasks.learning.neighbours import close_similarity, near_copy_pairs, nearest, outlier_fence, outlier_scores
from tasks.learning.shards import write_shard
from tests.imagegen import NEAR_COPIES, blank_bytes, image_bytes, indexed_image_bytes, jpeg_bytes, scene_pixels
from tests.prepared import make_prepared_dir

TWO, FIVE = 160, 200
"""Images of the two-class and the five-class set (5% of each flipped: 8 and 10)."""
SCENES = 30
COPIED = 4
"""Scenes with a near-copy of each kind in the test split (the scenes themselves are in train)."""
BLANKS = ((255, 255, 255), (0, 0, 0), (128, 128, 128))
FIVE_CLASSES = ClassMap.from_names(["a", "b", "c", "d", "e"])
_SPLITS = ("train", "train", "train", "validation", "test")


@pytest.fixture(scope="module")
def features():
    """Features of every generated image, by one random VGG16 at 32 px, in one forward pass."""
    import keras

    from tasks.learning.extractor import feature_model
    from tasks.learning.pixels import decode_image

    two = [image_bytes(("cat", "dog")[i % 2], 1000 + i) for i in range(TWO)]
    five = [indexed_image_bytes(i % 5, 5, 2000 + i) for i in range(FIVE)]
    scenes = [scene_pixels(seed) for seed in range(SCENES)]
    copies = [jpeg_bytes(scenes[i], **settings) for settings in NEAR_COPIES.values() for i in range(COPIED)]
    blobs = two + five + [jpeg_bytes(scene) for scene in scenes] + copies + [blank_bytes(c) for c in BLANKS]
    keras.utils.set_random_seed(0)
    model = feature_model("vgg16", None, 32)
    matrix = np.asarray(model.predict(np.stack([decode_image(blob, 32) for blob in blobs]), batch_size=64, verbose=0))
    ends = np.cumsum([TWO, FIVE, SCENES, len(copies), len(BLANKS)])
    return dict(zip(("two", "five", "scenes", "copies", "blanks"), np.split(matrix, ends[:-1])))


def rows_of(labels: np.ndarray, names: tuple[str, ...], splits: list[str] | None = None) -> pd.DataFrame:
    """`labelled_rows`-shaped rows for n images (hash = its index, so findings map back to images)."""
    n = len(labels)
    return pd.DataFrame({"sha256": [f"{i:064x}" for i in range(n)], "label": [names[y] for y in labels],
                         "y": np.asarray(labels, dtype=np.int64),
                         "split": splits or [_SPLITS[i % len(_SPLITS)] for i in range(n)],
                         "arranged_path": [f"arranged/{i}.jpg" for i in range(n)]})


def indices(report: pd.DataFrame, kind: str) -> list[int]:
    """Image indices of one kind's findings, most suspicious first."""
    return [int(sha, 16) for sha in report.loc[report["kind"] == kind, "sha256"]]


@pytest.mark.parametrize("name, classes, n_flipped", [("two", CATS_DOGS, TWO // 20), ("five", FIVE_CLASSES, FIVE // 20)])
def test_flipped_labels_are_found_ranked_first_with_the_class_they_belong_to(features, name, classes, n_flipped):
    n_classes = len(classes.names)
    truth = np.arange(len(features[name])) % n_classes
    rng = np.random.default_rng(7)
    flipped = rng.choice(len(truth), n_flipped, replace=False)
    given = truth.copy()
    given[flipped] = (given[flipped] + rng.integers(1, n_classes, n_flipped)) % n_classes

    findings = audit_features(features[name], rows_of(given, classes.names), classes)
    suspects = indices(findings.report, LABEL_ISSUE)
    recall = len(set(suspects) & set(flipped)) / n_flipped
    precision_at_k = len(set(suspects[:n_flipped]) & set(flipped)) / n_flipped
    assert recall >= 0.8 and precision_at_k >= 0.8, (recall, precision_at_k)
    issues = findings.report[findings.report["kind"] == LABEL_ISSUE]
    right = {f"{i:064x}": classes.names[truth[i]] for i in flipped}
    suggested = [issues.set_index("sha256").at[sha, "suggested_label"] == label for sha, label in right.items()
                 if sha in set(issues["sha256"])]
    assert np.mean(suggested) >= 0.8  # the class it more likely belongs to is the one it was flipped from
    assert (issues["score"].diff().dropna() <= 0).all() and findings.folds == 5
    assert findings.flags["label_issue"].sum() == len(issues)
    assert not (findings.report["kind"] == LEAKAGE).any()


@pytest.mark.parametrize("among", ["scenes", "look-alikes"])
def test_every_near_copy_across_splits_is_leakage_and_nothing_else_is(features, among):
    """Copies of scenes are found among other scenes and among generated cats and dogs that all look alike
    (where distinct images are as similar as a scene and its copy)."""
    crowd = features["two"][:60] if among == "look-alikes" else np.zeros((0, features["two"].shape[1]), np.float32)
    vectors = np.vstack([features["scenes"], features["copies"], crowd])
    copied = [i for _ in NEAR_COPIES for i in range(COPIED)]
    copies = range(SCENES, SCENES + len(copied))
    splits = ["train"] * SCENES + ["test"] * len(copied) + [_SPLITS[i % 5] for i in range(len(crowd))]
    labels = np.arange(len(vectors)) % 2
    labels[SCENES:SCENES + len(copied)] = labels[copied]  # a copy keeps its original's label
    findings = audit_features(vectors, rows_of(labels, CATS_DOGS.names, splits), CATS_DOGS)

    leaks = findings.report[findings.report["kind"] == LEAKAGE]
    pairs = {(int(sha, 16), int(other, 16)) for sha, other in zip(leaks["sha256"], leaks["other_sha256"])}
    assert pairs == {(copy, original) for copy, original in zip(copies, copied)}
    assert (leaks["split"] == "test").all() and (leaks["other_split"] == "train").all()
    assert (leaks["score"] >= AuditSettings().near_duplicate_similarity).all()
    assert findings.flags.loc[findings.flags["leaked"] == 1, "sha256"].map(lambda sha: int(sha, 16)).tolist() == \
        list(copies)
    siblings = findings.report[findings.report["kind"] == "near_duplicate"]  # a scene's two copies, both in test
    assert {(int(a, 16), int(b, 16)) for a, b in zip(siblings["other_sha256"], siblings["sha256"])} == \
        {tuple(sorted((SCENES + k, SCENES + COPIED + k))) for k in range(COPIED)}


def test_look_alike_images_are_not_called_copies_and_blank_frames_rank_as_outliers(features):
    """Generated cats all look alike (one hue, one texture), so their similarities are high: only the
    relative rule keeps them from being near-copies; blank frames in the dog class stand out."""
    vectors = np.vstack([features["two"], features["blanks"]])
    labels = np.concatenate([np.arange(TWO) % 2, np.ones(len(BLANKS), dtype=int)])
    findings = audit_features(vectors, rows_of(labels, CATS_DOGS.names), CATS_DOGS)
    kinds = set(findings.report["kind"])
    assert LEAKAGE not in kinds and "near_duplicate" not in kinds
    assert sorted(indices(findings.report, OUTLIER)) == list(range(TWO, TWO + len(BLANKS)))
    scores = outlier_scores(nearest(embed(vectors)))
    assert set(np.argsort(-scores)[:len(BLANKS)]) == set(range(TWO, TWO + len(BLANKS)))


def test_a_near_copy_reaches_the_floor_and_stands_apart_and_a_group_of_copies_is_found_whole():
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 1, (50, 16)).astype(np.float32)
    twins = spread[:2].repeat(2, axis=0)[[0, 2, 3]] + 0.01 * rng.normal(0, 1, (3, 16)).astype(np.float32)
    vectors = np.vstack([spread, twins])  # 0 has one copy (50); 1 has two (51, 52)
    neighbours = nearest(vectors)
    assert {(i, j) for i, j, _ in near_copy_pairs(neighbours, 0.9)} == {(0, 50), (1, 51), (1, 52), (51, 52)}
    assert near_copy_pairs(neighbours, 0.9999999) == []  # the option's floor holds whatever the gap
    assert close_similarity(neighbours, 0.5) > 0.9  # the absolute rule alone: close to the folder's spread
    crowd = np.ones((20, 16), np.float32) + 0.05 * rng.normal(0, 1, (20, 16)).astype(np.float32)
    assert near_copy_pairs(nearest(crowd), 0.9) == []  # all alike, nothing apart: none a copy
    assert outlier_fence(np.array([1.0, 1.0, 1.0])) == float("inf")  # too few images to call one odd


def test_too_few_images_of_a_class_means_no_label_verdicts_rather_than_a_crash():
    assert fold_count(np.array([0, 0, 0, 1])) == 0 and fold_count(np.array([0] * 9 + [1] * 3)) == 3
    vectors = np.random.default_rng(1).normal(0, 1, (5, 8)).astype(np.float32)
    findings = audit_features(vectors, rows_of(np.array([0, 0, 0, 0, 1]), CATS_DOGS.names), CATS_DOGS)
    assert findings.folds == 0 and not (findings.report["kind"] == LABEL_ISSUE).any()
    assert audit_features(vectors[:1], rows_of(np.array([0]), CATS_DOGS.names), CATS_DOGS).report.empty


def test_the_checks_warn_over_the_label_share_and_fail_over_the_leaked_test_share(tmp_path):
    flags = pd.DataFrame({"split": ["train"] * 16 + ["test"] * 4, "label_issue": [1] * 4 + [0] * 16,
                          "leaked": [0] * 19 + [1]})
    (tmp_path / "a").mkdir()
    verdict = check_audit(flags, tmp_path / "a", max_label_issue_share=0.1, max_leaked_test_share=0.25)
    assert verdict.warnings == ["label_issue_share: 0.2 > 0.1"] and verdict.failures == []
    verdict.raise_if_failed("audit.csv")  # a warning never stops a run
    (tmp_path / "b").mkdir()
    verdict = check_audit(flags, tmp_path / "b", max_label_issue_share=0.5, max_leaked_test_share=0.2)
    assert verdict.warnings == [] and verdict.failures == ["leaked_test_share: 0.25 > 0.2"]
    with pytest.raises(DatasetValidationError, match=r"leaked_test_share: 0.25 > 0.2.*audit.csv.*--max-leaked-test-share"):
        verdict.raise_if_failed("audit.csv")
    stored = json.loads((tmp_path / "b" / "result.json").read_text())
    assert stored["success"] is False and (tmp_path / "b" / "data_docs" / "index.html").is_file()


def test_a_folder_audit_is_written_whole_reused_unchanged_and_read_back(tmp_path, features):
    """Features put in a cache by hand (a stand-in for extraction): the folder's labelled rows, audited."""
    data_dir = make_prepared_dir(tmp_path, {"train": 10, "validation": 4, "test": 4})
    folder = DataFolder(data_dir)
    rows = folder.labelled_rows()
    vectors = np.vstack([features["scenes"], features["five"]])[:len(rows)].copy()
    test = rows.index[rows["split"] == "test"][0]
    train = rows.index[rows["split"] == "train"][0]
    vectors[test] = features["copies"][0]  # the test image is a re-encoded copy of scene 0 ...
    vectors[train] = features["scenes"][0]  # ... which is a training image
    cache_dir = data_dir / "features" / "vgg16-test-32-float32-tensorflow-opencv"
    cache_dir.mkdir(parents=True)
    write_shard(cache_dir, rows["sha256"].tolist(), vectors)

    settings = AuditSettings(max_leaked_test_share=0.5)
    summary = audit_folder(folder, cache_dir, settings)
    quality_dir = data_dir / "quality" / cache_dir.name
    assert summary.report == str(quality_dir / "audit.parquet") and not summary.reused
    assert summary.images == len(rows) and summary.leaked_test_images == 1
    csv = pd.read_csv(summary.csv, keep_default_na=False)
    assert tuple(csv.columns) == REPORT_COLUMNS and (csv["decision"] == "").all()
    assert leaked_test_hashes(summary.report) == {rows.at[test, "sha256"]}
    assert suspected_train_hashes(summary.report) <= set(rows.loc[rows["split"] == "train", "sha256"])
    assert [path.name for path in tmp_path.rglob(".*")] == []  # nothing half-written left

    before = {path: path.stat().st_mtime_ns for path in quality_dir.rglob("*")}
    again = audit_folder(folder, cache_dir, settings)
    assert again.reused and again.model_copy(update={"reused": False}) == summary
    assert {path: path.stat().st_mtime_ns for path in quality_dir.rglob("*")} == before

    with pytest.raises(DatasetValidationError, match="leaked_test_share: 0.125 > 0.1"):
        audit_folder(folder, cache_dir, AuditSettings(max_leaked_test_share=0.1))
    assert json.loads((quality_dir / "audit.json").read_text())["failures"]  # written before it stopped
