"""The data wing's Prefect tasks: the steps of `prepare_data`, each a thin wrapper over its module.

A task names a step, sets its retries (transient I/O only, never bad input) and turns off
Prefect's result caching: every step keeps its own content-addressed cache on disk, which is
what makes a second run cheap. Modules of this wing stay importable without Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.errors import retry_unless_input_error
from tasks.common.results import LabelOverrides, PrepareSummary
from tasks.data.acquire import acquire_source
from tasks.data.arrange import Arranged, arrange_folder, write_summary
from tasks.data.datafolder import DataFolder
from tasks.data.extract import ExtractLimits, extract_archive
from tasks.data.layout import LayoutFound, describe_layout
from tasks.data.manifest import ManifestBuilt, build_inspected
from tasks.data.splits import SplitsAssigned, assign_splits_file
from tasks.data.validate import ValidationThresholds, Verdict, validate_splits


@task(name="acquire", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_input_error,
      cache_policy=NO_CACHE)
def acquire(source: str, data_dir: str, expected_sha256: str | None = None) -> Path:
    """Locate or download the source: a download tries again within itself (resuming) and then says how often it
    tried, so only other I/O failures retry here; bad input never."""
    return acquire_source(source, DataFolder.at(data_dir).downloads, expected_sha256=expected_sha256)


@task(name="extract", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_input_error,
      cache_policy=NO_CACHE)
def extract(source_path: Path, data_dir: str, limits: ExtractLimits | None = None) -> Path:
    """Unpack the acquired source safely; I/O failures retry once, unsafe archives never."""
    return extract_archive(Path(source_path), DataFolder.at(data_dir).extracted, limits=limits)


@task(name="find-candidates", cache_policy=NO_CACHE)
def find_candidates(root: Path) -> LayoutFound:
    """Recognise the layout; the list of files stays on disk."""
    return describe_layout(root)


@task(name="build-manifest", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_input_error,
      cache_policy=NO_CACHE)
def build_manifest(root: Path, data_dir: str, min_side: int, max_side: int,
                   replace_classes: bool = False) -> ManifestBuilt:
    """Inspect every file (reusing unchanged rows) into inspected.parquet; images out of the size bounds are quarantined.

    A data folder of other classes is refused first, unless `replace_classes`."""
    return build_inspected(root, DataFolder.at(data_dir), min_side=min_side, max_side=max_side,
                           replace_classes=replace_classes)


@task(name="assign-splits", cache_policy=NO_CACHE)
def assign_splits(data_dir: str, fractions: Sequence[float], respect_source_split: bool,
                  source_root: str | None = None) -> SplitsAssigned:
    """Apply labels.csv corrections, dedupe by content and split each class in its fractions into splits.parquet
    (images keep their splits)."""
    return assign_splits_file(DataFolder.at(data_dir), fractions=fractions,
                              respect_source_split=respect_source_split, source_root=source_root)


@task(name="validate", cache_policy=NO_CACHE)
def validate(data_dir: str, thresholds: ValidationThresholds, required_splits: Sequence[str]) -> Verdict:
    """Great Expectations over splits.parquet; the verdict is reused while the manifest is unchanged."""
    return validate_splits(DataFolder.at(data_dir), thresholds, required_splits)


@task(name="arrange", cache_policy=NO_CACHE)
def arrange(data_dir: str) -> Arranged:
    """Mirror the kept images into arranged/ and write manifest.parquet."""
    return arrange_folder(DataFolder.at(data_dir))


@task(name="summarise", cache_policy=NO_CACHE)
def summarise(data_dir: str, layout: str, label_overrides: LabelOverrides | None = None) -> PrepareSummary:
    """The dataset summary, kept as prepare_summary.json."""
    return write_summary(DataFolder.at(data_dir), layout, label_overrides)
