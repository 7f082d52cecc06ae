"""The data audit: suspected label errors, near-copies, leakage and outliers, from the cached features.

Every training run audits the labelled images on the features it computed anyway (no extra
backbone pass), and so can `python -m flows.audit` on its own:

    features of every labelled image (tasks/learning/shards.py)
    -> standardised, reduced view                      (tasks/learning/embedding.py)
    -> out-of-fold probabilities, cleanlab's suspects  (tasks/learning/label_issues.py)
    -> nearest neighbours: near-copies, outliers       (tasks/learning/neighbours.py)
    -> Great Expectations over the shares              (tasks/data/audit_checks.py)
    -> data/quality/<feature space>/: audit.parquet, audit.csv, audit.json, checks/

A near-copy pair across splits with a training image in it is leakage: the other image (test or
validation) gains from having been trained on. Leaked test images are left out of the gate's
test metrics (tasks/models/scoring.py reads them back with `leaked_test_hashes`).

The report has one row per finding, most suspicious first within each kind: `path` (in the data
folder), `sha256`, `split`, `given_label`, `suggested_label`, `score`, `kind`, the near-copy's
`other_path`/`other_sha256`/`other_split`, and an empty `decision` column: a person fills it
(`exclude`, `relabel`, a class name) and passes the CSV back as labels.csv (tasks/data/overrides.py).
Scores are higher for more suspicious: one minus the probability of the given label, the
cosine similarity of a near-copy, the Euclidean distance of an outlier to its 10th nearest image.

The folder is written whole (a temporary folder renamed into place) and keyed on what the audit
depends on (the images, labels and splits, the feature space, the settings), so a second run on
the same data reuses it without computing anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common.files import atomic_directory
from tasks.common.labels import SPLITS, ClassMap
from tasks.common.logs import run_logger
from tasks.common.results import QualitySummary
from tasks.data.datafolder import DataFolder
from tasks.learning.embedding import embed
from tasks.learning.label_issues import find_label_issues
from tasks.learning.neighbours import (NEAR_DUPLICATE_SIMILARITY, near_copy_pairs, nearest, outlier_fence,
                                       outlier_scores)

AUDIT_VERSION = 1
"""Bump when what the audit finds changes, so kept reports are not reused for another method."""

REPORT_FILE = "audit.parquet"
CSV_FILE = "audit.csv"
SUMMARY_FILE = "audit.json"
CHECKS_DIR = "checks"

LABEL_ISSUE, LEAKAGE, NEAR_DUPLICATE, OUTLIER = "label_issue", "leakage", "near_duplicate", "outlier"
KINDS: tuple[str, ...] = (LEAKAGE, LABEL_ISSUE, OUTLIER, NEAR_DUPLICATE)
"""Finding kinds, in the order the report lists them."""

SMALL_AUDIT = 2**22
"""Feature values (images x dimensions) below which the audit runs on one BLAS thread (2,000 images of 2,048)."""

REPORT_COLUMNS: tuple[str, ...] = ("path", "sha256", "split", "given_label", "suggested_label", "score", "kind",
                                   "other_path", "other_sha256", "other_split", "decision")


MAX_LABEL_ISSUE_SHARE = 0.05
"""Default share of suspected labels above which the audit warns (real datasets hold some: Kaggle's about 0.4%)."""

MAX_LEAKED_TEST_SHARE = 0.25
"""Default share of leaked test images above which the run stops.

Leaked test images are left out of the gate's test metrics whatever their share, so the
metrics stay honest below it; the check stops runs whose test split is mostly copies of the
training images (frames of one video, augmented copies), where what is left measures little.
It is also what tiny generated test sets need: their images are drawn from a few colours and
textures, and now and then two of them are truly near-identical (benchmarks/near_copies.py),
which in a test split of 8 images is already 12%.
"""


@dataclass(frozen=True)
class AuditSettings:
    """What counts as a near-copy, how much of each finding is too much, and the seed of the folds."""

    near_duplicate_similarity: float = NEAR_DUPLICATE_SIMILARITY
    max_label_issue_share: float = MAX_LABEL_ISSUE_SHARE
    max_leaked_test_share: float = MAX_LEAKED_TEST_SHARE
    seed: int = 0


@dataclass(frozen=True)
class Findings:
    """The audit of n images: one report row per finding, one flag row per image, and the folds it used."""

    report: pd.DataFrame
    flags: pd.DataFrame
    folds: int


def _finding(rows: pd.DataFrame, i: int, kind: str, score: float, suggested: str = "",
             other: int | None = None) -> dict:
    return {"path": rows.at[i, "arranged_path"], "sha256": rows.at[i, "sha256"], "split": rows.at[i, "split"],
            "given_label": rows.at[i, "label"], "suggested_label": suggested, "score": round(float(score), 6),
            "kind": kind, "other_path": rows.at[other, "arranged_path"] if other is not None else "",
            "other_sha256": rows.at[other, "sha256"] if other is not None else "",
            "other_split": rows.at[other, "split"] if other is not None else "", "decision": ""}


def _pair_finding(rows: pd.DataFrame, i: int, j: int, similarity: float) -> dict:
    """A near-copy pair as one row: leakage (the non-training image named) when one of them is in train."""
    rank = {split: index for index, split in enumerate(SPLITS)}
    first, second = sorted((i, j), key=lambda k: (rank.get(rows.at[k, "split"], 9), rows.at[k, "sha256"]))
    splits = {rows.at[first, "split"], rows.at[second, "split"]}
    kind = LEAKAGE if len(splits) == 2 and "train" in splits else NEAR_DUPLICATE
    other_label = rows.at[first, "label"]
    suggested = other_label if other_label != rows.at[second, "label"] else ""
    return _finding(rows, second, kind, similarity, suggested, other=first)


def audit_features(features: np.ndarray, rows: pd.DataFrame, classes: ClassMap,
                   settings: AuditSettings = AuditSettings()) -> Findings:
    """Audit n images from their features (n, d) and rows (`labelled_rows` columns: sha256, label, y, split, arranged_path).

    Pure: nothing is read or written. A small audit runs on one BLAS thread: its products are too
    small to share, and handing them to idle-waiting threads cost 10x the work (measured on 2
    busy cores: 0.33 s instead of 0.03 s for 40 images), on every training run of the tests.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1 if np.size(features) < SMALL_AUDIT else None):
        return _audit(features, rows.reset_index(drop=True), classes, settings)


def _audit(features: np.ndarray, rows: pd.DataFrame, classes: ClassMap, settings: AuditSettings) -> Findings:
    vectors = embed(features, settings.seed)
    labels = rows["y"].to_numpy(dtype=np.int64)
    issues = find_label_issues(vectors, labels, len(classes.names), settings.seed)
    neighbours = nearest(vectors)
    scores = outlier_scores(neighbours)
    fence = outlier_fence(scores)

    found = [_finding(rows, int(i), LABEL_ISSUE, issues.score[i], classes.names[int(issues.suggested[i])])
             for i in np.flatnonzero(issues.suspected)]
    found += [_pair_finding(rows, i, j, similarity) for i, j, similarity in near_copy_pairs(neighbours, settings.near_duplicate_similarity)]
    found += [_finding(rows, int(i), OUTLIER, scores[i]) for i in np.flatnonzero(scores > fence)]
    report = pd.DataFrame(found, columns=list(REPORT_COLUMNS))
    if len(report):
        order = report["kind"].map({kind: index for index, kind in enumerate(KINDS)})
        report = report.assign(_order=order).sort_values(["_order", "score", "path"], ascending=[True, False, True],
                                                         kind="stable").drop(columns="_order").reset_index(drop=True)
    leaked = set(report.loc[report["kind"] == LEAKAGE, "sha256"])
    flags = pd.DataFrame({"sha256": rows["sha256"], "split": rows["split"],
                          "label_issue": issues.suspected.astype(int),
                          "leaked": rows["sha256"].isin(leaked).astype(int)})
    return Findings(report=report, flags=flags, folds=issues.folds)


# --------------------------------------------------------------------------- the audit of a data folder


def _audit_key(rows: pd.DataFrame, feature_space: str, classes: ClassMap, settings: AuditSettings) -> str:
    """What the findings depend on: images, labels, splits, the feature space, the classes and the settings."""
    digest = hashlib.sha256(json.dumps({"version": AUDIT_VERSION, "space": feature_space, "classes": classes.names,
                                        "settings": asdict(settings)}, sort_keys=True).encode())
    for sha, label, split in zip(rows["sha256"], rows["label"], rows["split"]):
        digest.update(f"{sha},{label},{split}\n".encode())
    return digest.hexdigest()


def _stored(quality_dir: Path, key: str) -> dict | None:
    """The kept audit when it was made from exactly this input."""
    try:
        stored = json.loads((quality_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("key") != key or not (quality_dir / REPORT_FILE).is_file():
        return None
    return stored


def _summary(stored: dict, quality_dir: Path, reused: bool) -> QualitySummary:
    return QualitySummary(**{**stored["summary"], "report": str(quality_dir / REPORT_FILE),
                             "csv": str(quality_dir / CSV_FILE),
                             "checks": str(quality_dir / CHECKS_DIR / "result.json"), "reused": reused})


def _raise_if_failed(stored: dict, quality_dir: Path) -> None:
    from tasks.data.audit_checks import AuditVerdict

    AuditVerdict(warnings=stored["warnings"], failures=stored["failures"]).raise_if_failed(str(quality_dir / CSV_FILE))


def audited_rows(folder: DataFolder, cache_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Every labelled image with cached features (those that failed to decode are left out), and the features."""
    from tasks.learning.shards import load_features, shard_index

    rows = folder.labelled_rows()
    index = shard_index(cache_dir)
    rows = rows[~rows["sha256"].isin(list(index.failed))].reset_index(drop=True)
    return rows, load_features(cache_dir, rows["sha256"].tolist(), index)


def audit_folder(folder: DataFolder, cache_dir: str | Path, settings: AuditSettings = AuditSettings()) -> QualitySummary:
    """Audit the labelled images of `folder` on the features in `cache_dir`; keep the findings in data/quality/<space>/.

    Raises DatasetValidationError after writing them when too many test images leak (the
    critical expectation of tasks/data/audit_checks.py); too many suspected labels only warn.
    """
    from tasks.data.audit_checks import check_audit

    cache_dir = Path(cache_dir)
    space = cache_dir.name
    quality_dir = folder.quality(space)
    classes = folder.classes()
    rows, features = audited_rows(folder, cache_dir)
    key = _audit_key(rows, space, classes, settings)
    stored = _stored(quality_dir, key)
    if stored is not None:
        _raise_if_failed(stored, quality_dir)
        return _summary(stored, quality_dir, reused=True)

    findings = audit_features(features, rows, classes, settings)
    report = findings.report
    kinds = report["kind"]
    with atomic_directory(quality_dir) as tmp:
        report.to_parquet(tmp / REPORT_FILE, index=False)
        report.to_csv(tmp / CSV_FILE, index=False)
        (tmp / CHECKS_DIR).mkdir()
        verdict = check_audit(findings.flags, tmp / CHECKS_DIR, settings.max_label_issue_share,
                              settings.max_leaked_test_share)
        stored = {"key": key, "warnings": verdict.warnings, "failures": verdict.failures, "summary": {
            "feature_space": space, "images": len(rows), "label_issues": int((kinds == LABEL_ISSUE).sum()),
            "near_duplicates": int(kinds.isin([NEAR_DUPLICATE, LEAKAGE]).sum()),
            "leaked_test_images": int(report.loc[(kinds == LEAKAGE) & (report["split"] == "test"), "sha256"].nunique()),
            "leaked_validation_images": int(report.loc[(kinds == LEAKAGE) & (report["split"] == "validation"),
                                                       "sha256"].nunique()),
            "outliers": int((kinds == OUTLIER).sum()), "folds": findings.folds,
            "warnings": verdict.warnings}}
        (tmp / SUMMARY_FILE).write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    summary = _summary(stored, quality_dir, reused=False)
    for warning in verdict.warnings:
        run_logger(__name__).warning("Data audit: %s (see %s)", warning, summary.csv)
    _raise_if_failed(stored, quality_dir)
    return summary


# --------------------------------------------------------------------------- reading findings back


def _findings(report: str | Path | None, kind: str, split: str) -> frozenset[str]:
    if not report:
        return frozenset()
    frame = pd.read_parquet(report, columns=["sha256", "kind", "split"])
    return frozenset(frame.loc[(frame["kind"] == kind) & (frame["split"] == split), "sha256"])


def leaked_test_hashes(report: str | Path | None) -> frozenset[str]:
    """Test images that are near-copies of training images: left out of the gate's test metrics."""
    return _findings(report, LEAKAGE, "test")


def suspected_train_hashes(report: str | Path | None) -> frozenset[str]:
    """Training images suspected of a wrong label: left out of training with exclude_suspected_labels."""
    return _findings(report, LABEL_ISSUE, "train")
