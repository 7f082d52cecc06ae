"""The dataset-level gate: a Great Expectations suite over the manifest, run before arranging.

Per-file faults (empty, undecodable, too small, ...) were already quarantined row by row by the
manifest step and duplicates/label conflicts by `assign_splits`; what is left to judge is the
dataset as a whole. Too few images of a class, a lopsided class balance, a quarantine rate that
says the source is broken, or an image leaking into two splits must stop the run before
anything trains on it, with the failed expectations and their observed values in the message.

Two batches are validated:

* `manifest_rows`: the manifest itself, plus two derived columns (`quarantined` 0/1 and
  `splits_per_image`) so that "share quarantined" and "no image in two splits" are plain
  column expectations a person can read in Data Docs.
* `class_counts`: one row per (scope, class) with scope "all" and every required split, so a
  class that is *missing* from a split shows up as a row with 0 images instead of as no row.

The result (JSON) and the Data Docs site are built in a temporary folder and swapped in whole.
They are keyed on a fingerprint of the manifest + thresholds: the same manifest never triggers
a second validation (nor even a Great Expectations import), so second runs write nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from tasks.common.errors import DatasetValidationError
from tasks.common.files import atomic_directory
from tasks.common.labels import CATS_DOGS, SPLITS, UNLABELLED, ClassMap
from tasks.data.datafolder import DataFolder
from tasks.data.images import MAX_SIDE
from tasks.data.manifest import read_manifest

SUITE_VERSION = "manifest-suite-1"
"""Bump when the expectations change, so cached results are not reused for a different suite."""

RESULT_FILE = "result.json"
DATA_DOCS_DIR = "data_docs"

STATUSES = ("ok", "quarantined")
REASONS = ("", "empty_file", "not_an_image", "undecodable", "too_small", "too_large",
           "duplicate", "label_conflict", "excluded")
REQUIRED_COLUMNS = ("source_path", "relative_path", "label", "source_split", "sha256", "bytes",
                    "format", "width", "height", "status", "reason", "split")
_KEY_COLUMNS = ("relative_path", "label", "sha256", "format", "width", "height", "status",
                "reason", "split")


class ValidationThresholds(BaseModel):
    """Dataset-level limits. Defaults suit the real 25,000-image Dogs vs. Cats data.

    The real archive has 12,500 images per class and a few dozen broken files, so the
    defaults leave wide margins; `cats_and_dogs_filtered` (1,000 + 500 per class) passes too.
    Tests and small custom datasets pass smaller numbers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_side: int = Field(32, ge=1, description="Smallest width/height of a kept image, in pixels; smaller ones are "
                                                "quarantined as too_small.")
    max_side: int = Field(MAX_SIDE, ge=1, le=MAX_SIDE,
                          description=f"Largest width/height of a kept image, in pixels; longer ones are quarantined as "
                                      f"too_large (at most {MAX_SIDE:,}: the input pipeline refuses longer sides, in "
                                      "training, prediction and serving alike).")
    min_per_class: int = Field(1000, ge=0, description="Fewest kept labelled images of each class overall.")
    min_per_class_per_split: int = Field(50, ge=0, description="Fewest images of each class in each of train/validation/test.")
    max_class_imbalance: float = Field(1.5, ge=1.0, description="Largest majority/minority class ratio, overall and per split.")
    max_quarantined_share: float = Field(0.05, ge=0.0, le=1.0, description="Largest share of candidate files quarantined for any reason.")

    def share_bounds(self) -> tuple[float, float]:
        """A majority/minority ratio r as bounds on each class's share: [1/(1+r), r/(1+r)]."""
        r = self.max_class_imbalance
        return 1.0 / (1.0 + r), r / (1.0 + r)


# --------------------------------------------------------------------------- frames under test


def rows_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus derived per-row columns that turn dataset rules into column expectations."""
    frame = manifest.reset_index(drop=True).copy()
    # a person's `excluded` (labels.csv) is a decision, not a fault of the source: not counted as quarantined
    frame["quarantined"] = ((frame["status"] == "quarantined") & (frame["reason"] != "excluded")).astype(int)
    placed = frame[frame["split"] != ""]
    per_image = placed.groupby("sha256")["split"].nunique()
    frame["splits_per_image"] = frame["sha256"].map(per_image).where(frame["split"] != "", 0).fillna(0).astype(int)
    return frame


def class_counts_frame(manifest: pd.DataFrame, required_splits: Sequence[str] = SPLITS,
                       classes: ClassMap = CATS_DOGS) -> pd.DataFrame:
    """Kept labelled images per (scope, class), every combination present even when it is 0.

    With more than two classes each row also has `share_of_largest`: its count over the
    largest class's count in the scope, which the N-class balance check bounds.
    """
    kept = manifest[(manifest["status"] == "ok") & manifest["split"].isin(SPLITS)]
    rows = []
    for scope in ("all", *required_splits):
        in_scope = kept if scope == "all" else kept[kept["split"] == scope]
        total = len(in_scope)
        largest = max((int((in_scope["label"] == label).sum()) for label in classes.names), default=0)
        for label in classes.names:
            n = int((in_scope["label"] == label).sum())
            row = {"key": f"{scope}/{label}", "scope": scope, "label": label, "images": n,
                   "class_share": round(n / total, 6) if total else 0.0}
            if not classes.binary:
                row["share_of_largest"] = round(n / largest, 6) if largest else 0.0
            rows.append(row)
    return pd.DataFrame(rows)


def validation_key(manifest: pd.DataFrame, thresholds: ValidationThresholds,
                   required_splits: Sequence[str] = SPLITS, classes: ClassMap = CATS_DOGS) -> str:
    """Fingerprint of everything the verdict depends on: the judged columns, limits, suite and classes."""
    columns = [c for c in _KEY_COLUMNS if c in manifest.columns]
    ordered = manifest[columns].sort_values(columns, kind="stable").reset_index(drop=True)
    digest = hashlib.sha256(pd.util.hash_pandas_object(ordered, index=False).values.tobytes())
    digest.update(json.dumps({"suite": SUITE_VERSION, "thresholds": thresholds.model_dump(),
                              "splits": list(required_splits), "columns": columns}, sort_keys=True).encode())
    if not classes.kaggle:  # cats vs. dogs keeps the key it always had
        digest.update(f"classes={classes.text()}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the suites


def _expect(kind: Any, check: str, description: str, **kwargs: Any) -> Any:
    """An expectation whose `meta.check` names it in failure messages and Data Docs."""
    return kind(meta={"check": check}, description=description, **kwargs)


def _rows_expectations(gx: Any, t: ValidationThresholds, classes: ClassMap = CATS_DOGS) -> list[Any]:
    """Expectations over manifest rows: schema, known codes, one split per image, sizes, quarantine share."""
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    ok = Column("status") == "ok"
    labelled = Column("split").is_in(list(SPLITS))
    placed = Column("split") != ""
    return [
        _expect(E.ExpectTableColumnsToMatchSet, "manifest_columns", "The manifest has every column the pipeline reads.",
                column_set=list(REQUIRED_COLUMNS), exact_match=False),
        _expect(E.ExpectColumnValuesToBeInSet, "status_in_set", "Every row is ok or quarantined.",
                column="status", value_set=list(STATUSES)),
        _expect(E.ExpectColumnValuesToBeInSet, "reason_in_set", "Quarantine reasons are known codes.",
                column="reason", value_set=list(REASONS)),
        _expect(E.ExpectColumnValuesToBeInSet, "split_in_set", "Split values are known.",
                column="split", value_set=[*SPLITS, UNLABELLED, ""]),
        _expect(E.ExpectColumnValuesToNotBeInSet, "kept_rows_have_a_split", "Every kept image has a split.",
                column="split", value_set=[""], row_condition=ok),
        _expect(E.ExpectColumnValuesToBeInSet, "labels_in_set",
                f"Images in train/validation/test are labelled {' or '.join(classes.names)}.",
                column="label", value_set=list(classes.names), row_condition=labelled),
        _expect(E.ExpectColumnValuesToBeUnique, "kept_sha256_unique", "Each kept image is kept once (deduplicated by content).",
                column="sha256", row_condition=ok),
        _expect(E.ExpectColumnValuesToBeBetween, "no_image_in_two_splits", "No image content appears in two splits.",
                column="splits_per_image", max_value=1, row_condition=placed),
        _expect(E.ExpectColumnValuesToNotBeInSet, "kept_rows_decoded", "Every kept image was fully decoded.",
                column="format", value_set=[""], row_condition=ok),
        _expect(E.ExpectColumnValuesToBeBetween, "width_in_bounds", "Kept images are within the width bounds.",
                column="width", min_value=t.min_side, max_value=t.max_side, row_condition=ok),
        _expect(E.ExpectColumnValuesToBeBetween, "height_in_bounds", "Kept images are within the height bounds.",
                column="height", min_value=t.min_side, max_value=t.max_side, row_condition=ok),
        _expect(E.ExpectColumnMeanToBeBetween, "quarantined_share", "The share of quarantined files is below the limit.",
                column="quarantined", min_value=0.0, max_value=t.max_quarantined_share),
    ]


def _count_expectations(gx: Any, t: ValidationThresholds, classes: ClassMap = CATS_DOGS) -> list[Any]:
    """Expectations over the per-(scope, class) counts: enough images, balanced classes.

    Two classes bound each class's share (the same rule as a majority/minority ratio); more
    classes bound each class's count over the largest class's count by 1 / max_class_imbalance.
    """
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    low, high = t.share_bounds()
    balance = _expect(E.ExpectColumnValuesToBeBetween, "class_balance", "Class shares are balanced, overall and per split.",
                      column="class_share", min_value=round(low, 6), max_value=round(high, 6)) if classes.binary else \
        _expect(E.ExpectColumnValuesToBeBetween, "class_balance",
                "Each class has at least 1/max_class_imbalance of the largest class's images, overall and per split.",
                column="share_of_largest", min_value=round(1.0 / t.max_class_imbalance, 6))
    return [
        _expect(E.ExpectColumnValuesToBeBetween, "enough_images_per_class", "Enough kept images of each class overall.",
                column="images", min_value=t.min_per_class, row_condition=Column("scope") == "all"),
        _expect(E.ExpectColumnValuesToBeBetween, "enough_images_per_class_per_split",
                "Enough images of each class in each split.",
                column="images", min_value=t.min_per_class_per_split, row_condition=Column("scope") != "all"),
        balance,
    ]


# --------------------------------------------------------------------------- running GX


def _quiet_gx() -> Any:
    """Import GX with analytics off and its chatty loggers turned down (never at module import)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return gx


def _context(gx: Any, docs_dir: Path) -> Any:
    """An in-memory context whose only Data Docs site is `docs_dir`; nothing else touches disk."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={"manifest": {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(gx: Any, context: Any, name: str, frame: pd.DataFrame, expectations: list[Any],
               index_columns: list[str]) -> Any:
    """Validate one DataFrame with one suite through a Checkpoint (results land in the context's store).

    Data Docs are built once for both suites afterwards (`context.build_data_docs`): an
    `UpdateDataDocsAction` per checkpoint would recompile GX's templates twice, which costs
    more than validating the manifest.
    """
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, meta={"pipeline": SUITE_VERSION}))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": index_columns,
                       "partial_unexpected_count": 10},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


def _plain(value: Any) -> Any:
    """numpy scalars as plain Python numbers, floats rounded, so messages read cleanly."""
    value = value.item() if hasattr(value, "item") else value
    return round(value, 4) if isinstance(value, float) else value


def _compact(item: Any) -> Any:
    """An unexpected row `{"key": "test/cat", "images": 3}` as `test/cat: 3`."""
    if isinstance(item, dict):
        where = item.get("key", item.get("relative_path"))
        rest = [_plain(v) for k, v in item.items() if k not in ("key", "relative_path")]
        return f"{where}: {rest[0] if len(rest) == 1 else rest}"
    return _plain(item)


def _observed(result: dict) -> str:
    """The observed part of a failed expectation, short enough for an exception message."""
    details = result.get("result") or {}
    info = result.get("exception_info") or {}
    if info.get("raised_exception"):
        return f"error: {info.get('exception_message')}"
    if "observed_value" in details:
        return f"observed {_plain(details['observed_value'])}"
    if details.get("unexpected_count"):
        sample = details.get("partial_unexpected_index_list") or details.get("partial_unexpected_list") or []
        shown = ", ".join(str(_compact(item)) for item in sample[:6])
        return f"{details['unexpected_count']} of {details.get('element_count')} unexpected, e.g. {shown}"
    return f"observed {details}"


def _bounds(kwargs: dict) -> str:
    keys = ("value_set", "min_value", "max_value", "column_set")
    return ", ".join(f"{k}={_plain(kwargs[k])}" for k in keys if kwargs.get(k) is not None)


@dataclass(frozen=True)
class _Failure:
    """One failed expectation of a suite, as GX's result dict spells it."""

    suite: str
    result: dict
    config: dict
    kwargs: dict
    check: str


def _failures(validations: dict[str, dict]) -> Iterator[_Failure]:
    """The failed expectations of every suite, in order, each with its check name (meta) or type."""
    for suite_name, validation in validations.items():
        for result in validation.get("results", []):
            if result.get("success"):
                continue
            config = result.get("expectation_config") or {}
            yield _Failure(suite_name, result, config, config.get("kwargs") or {},
                           (config.get("meta") or {}).get("check", config.get("type")))


def failure_lines(validations: dict[str, dict]) -> list[str]:
    """One readable line per failed expectation: its check name, type, column, bounds and observation."""
    lines = []
    for failed in _failures(validations):
        column = f" on {failed.kwargs['column']}" if "column" in failed.kwargs else ""
        bounds = f" ({_bounds(failed.kwargs)})" if _bounds(failed.kwargs) else ""
        lines.append(f"{failed.check}: {failed.config.get('type')}{column}{bounds} in {failed.suite}: "
                     f"{_observed(failed.result)}")
    return lines


def _number(value: Any) -> str:
    """30, 1000 (not 1000.0), 0.3333: counts and shares as people write them."""
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _against(value: Any, low: Any, high: Any) -> str:
    """`30 < 1000`: a value with the bound it breaks."""
    try:
        if low is not None and float(value) < float(low):
            return f"{_number(value)} < {_number(low)}"
        if high is not None and float(value) > float(high):
            return f"{_number(value)} > {_number(high)}"
    except (TypeError, ValueError):
        pass
    return _number(value)


def brief_failures(validations: dict[str, dict], shown: int = 6) -> list[str]:
    """One short line per failed expectation, numbers first: `enough_images_per_class: cat 12 < 1000, dog 14 < 1000`.

    What a person reads on the terminal; `failure_lines` (the log, the error) and Data Docs keep the whole story.
    """
    lines = []
    for failed in _failures(validations):
        result, kwargs, check = failed.result, failed.kwargs, failed.check
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        details = result.get("result") or {}
        if (result.get("exception_info") or {}).get("raised_exception"):
            lines.append(f"{check}: could not be evaluated (see the log)")
            continue
        if "observed_value" in details:
            lines.append(f"{check}: {_against(details['observed_value'], low, high)}")
            continue
        column = kwargs.get("column", "")
        what = "" if column == "images" else f"{column.replace('_', ' ')} "
        items = [item for item in details.get("partial_unexpected_index_list") or [] if isinstance(item, dict)]
        parts = []
        for item in items[:shown]:
            where = str(item.get("key", item.get("relative_path", ""))).removeprefix("all/")
            parts.append(f"{where} {what}{_against(item.get(column), low, high)}".strip())
        if not parts:
            parts = [_number(value) for value in (details.get("partial_unexpected_list") or [])[:shown]]
        total = int(details.get("unexpected_count") or len(parts))
        more = f", ... ({total} in all)" if total > len(parts) else ""
        lines.append(f"{check}: {', '.join(parts)}{more}")
    return lines


def _read_cached(out_dir: Path, key: str) -> dict | None:
    """The stored verdict when it was made for this very manifest and thresholds."""
    try:
        stored = json.loads((out_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("manifest_fingerprint") != key or not (out_dir / DATA_DOCS_DIR / "index.html").is_file():
        return None
    return stored


THRESHOLD_OF_CHECK: dict[str, str] = {
    "enough_images_per_class": "min_per_class",
    "enough_images_per_class_per_split": "min_per_class_per_split",
    "class_balance": "max_class_imbalance",
    "quarantined_share": "max_quarantined_share",
}
"""The ValidationThresholds field that loosens each check (the others are not thresholds)."""

SIDE_CHECKS = ("width_in_bounds", "height_in_bounds")
"""Checks of both size bounds: which one loosens them is the bound a side broke (`8 < 32`, `25000 > 20000`)."""


def thresholds_to_loosen(failed: list[str], brief: list[str]) -> list[str]:
    """The ValidationThresholds fields whose options would let the failed checks pass, sorted."""
    checks = {line.split(":", 1)[0] for line in failed}
    fields = {THRESHOLD_OF_CHECK[check] for check in checks if check in THRESHOLD_OF_CHECK}
    for line in brief:
        check, _, numbers = line.partition(":")
        if check in SIDE_CHECKS and check in checks:
            fields.update({"min_side"} if " < " in numbers else set())
            fields.update({"max_side"} if " > " in numbers else set())
    return sorted(fields)


class Verdict(BaseModel):
    """The dataset-level verdict: passed or not, one line per failed expectation, where to read more."""

    success: bool
    failed: list[str]
    brief: list[str] = []
    """The failures in short, with their numbers (`enough_images_per_class: cat 12 < 1000`), for the terminal."""
    result_path: str
    data_docs_path: str
    fingerprint: str
    reused: bool

    def raise_if_failed(self, manifest: str | os.PathLike[str]) -> None:
        """Stop the run, before anything is arranged, with the fix a person can type."""
        if self.success:
            return
        fields = thresholds_to_loosen(self.failed, self.brief)
        fix = "fix the source data"
        if fields:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in fields)
            fix += f" or loosen the checks with {flags} (the config's `thresholds` from Python)"
        details = "\n".join(f"  - {line}" for line in self.failed)
        raise DatasetValidationError(
            f"Dataset validation failed for {manifest} ({len(self.failed)} expectation(s), details in "
            f"{self.data_docs_path}); {fix}:\n{details}")


def _summary(stored: dict, out_dir: Path, reused: bool) -> Verdict:
    return Verdict(success=bool(stored["success"]), failed=list(stored["failed"]),
                   brief=brief_failures(stored.get("validations") or {}), result_path=str(out_dir / RESULT_FILE), data_docs_path=str(out_dir / DATA_DOCS_DIR / "index.html"),
                   fingerprint=stored["manifest_fingerprint"], reused=reused)


def validate_manifest(manifest: pd.DataFrame, out_dir: Path, thresholds: ValidationThresholds | None = None,
                      *, required_splits: Sequence[str] = SPLITS, classes: ClassMap = CATS_DOGS) -> Verdict:
    """Run the dataset-level suite over `manifest`; keep JSON + Data Docs under `out_dir`.

    Never raises for a failed expectation: the caller decides (the flow calls
    `Verdict.raise_if_failed`). `required_splits` are the splits
    that must hold enough of each class (the flow drops those with a zero fraction); `classes`
    are the classes each of them must hold.
    """
    out_dir = Path(out_dir)
    thresholds = thresholds or ValidationThresholds()
    key = validation_key(manifest, thresholds, required_splits, classes)
    cached = _read_cached(out_dir, key)
    if cached is not None:
        return _summary(cached, out_dir, reused=True)

    gx = _quiet_gx()
    with atomic_directory(out_dir) as tmp:
        context = _context(gx, tmp / DATA_DOCS_DIR)
        rows = _run_suite(gx, context, "manifest_rows", rows_frame(manifest),
                          _rows_expectations(gx, thresholds, classes), ["relative_path"])
        counts = _run_suite(gx, context, "class_counts", class_counts_frame(manifest, required_splits, classes),
                            _count_expectations(gx, thresholds, classes), ["key"])
        validations = {"manifest_rows": rows.to_json_dict(), "class_counts": counts.to_json_dict()}
        stored = {
            "success": bool(rows.success and counts.success),
            "failed": failure_lines(validations),
            "manifest_fingerprint": key,
            "thresholds": thresholds.model_dump(),
            "required_splits": list(required_splits),
            "data_docs": f"{DATA_DOCS_DIR}/index.html",
            "validations": validations,
        }
        (tmp / RESULT_FILE).write_text(json.dumps(stored, indent=2, sort_keys=True, default=str) + "\n")
        context.build_data_docs()
    return _summary(stored, out_dir, reused=False)


def validate_splits(folder: DataFolder, thresholds: ValidationThresholds | None = None,
                    required_splits: Sequence[str] = SPLITS) -> Verdict:
    """Validate `splits.parquet` (after dedupe and split, before arranging) against the folder's classes."""
    return validate_manifest(read_manifest(folder.splits), folder.validation, thresholds,
                             required_splits=required_splits, classes=folder.classes())
