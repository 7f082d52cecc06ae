"""The `prepare_data` flow: from a source (Kaggle, PetImages, URL, archive, folder) to arranged splits.

    acquire -> extract -> find candidates -> build manifest -> assign splits -> validate
            -> arrange -> summary

Each step is a task in `tasks/`; this module only wires them and logs one line per step. Every
step skips work that is already done (verified download, complete extraction, unchanged
files, same manifest, links in place), so a second run on the same source writes nothing.

Files under `data_dir` (see CONTRACTS.md): `inspected.parquet` (one row per file, inspected),
`splits.parquet` (after dedupe and split), `manifest.parquet` (final, with `arranged_path`),
`validation/` (GX result + Data Docs), `arranged/`, `unlabelled/`, `prepare_summary.json`.

Run from Python: `prepare_data(source="petimages", data_dir="data")`, or from the shell:
`python -m flows.prepare <source> [data_dir]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.acquire import acquire
from tasks.arrange import DEFAULT_FRACTIONS, SPLITS_NAME, arrange_task, assign_splits_task, check_fractions, summary_task
from tasks.errors import DatasetValidationError
from tasks.extract import extract
from tasks.labels import SPLITS
from tasks.layout import find_candidates_task
from tasks.manifest import build_manifest_task
from tasks.validate import ValidationThresholds, validate_task


def _validation_error(verdict: dict, manifest: str) -> DatasetValidationError:
    """One sentence with the fix, then the failed expectations with their observed values."""
    failed = "\n".join(f"  - {line}" for line in verdict["failed"])
    return DatasetValidationError(
        f"Dataset validation failed for {manifest} ({len(verdict['failed'])} expectation(s), "
        f"details in {verdict['data_docs_path']}); fix the source data or pass looser `thresholds`:\n{failed}"
    )


@flow(name="prepare-data")
def prepare_data(
    source: str,
    data_dir: str | Path = "data",
    *,
    expected_sha256: str | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    respect_source_split: bool = True,
    min_side: int = 32,
    max_pixels: int = 25_000_000,
    thresholds: ValidationThresholds | None = None,
    workers: int | None = None,
) -> dict:
    """Acquire, check and arrange the Dogs vs. Cats images; return the dataset summary.

    `source`: "kaggle", "petimages", an https:// URL, a local .zip/.tar/.tar.gz or a folder.
    `split_fractions`: train/validation/test shares of the content-hash split.
    `respect_source_split`: keep a pre-split source's own train/validation (test is carved
    from its train images by hash when it has none).
    `min_side`/`max_pixels`: per-image limits (smaller/larger images are quarantined).
    `thresholds`: dataset-level limits; the defaults suit the real 25,000-image dataset.
    Raises DatasetValidationError, before anything is arranged, when they fail.
    """
    log = get_run_logger()
    data_dir = Path(data_dir).absolute()
    fractions = check_fractions(split_fractions)
    thresholds = thresholds or ValidationThresholds(min_side=min_side)

    archive = acquire(source, data_dir / "downloads", expected_sha256)
    log.info("Acquire: %s", archive)

    root = extract(archive, data_dir / "extracted")
    log.info("Extract: %s", root)

    found = find_candidates_task(root)
    log.info("Find candidates: %s layout, %d files, labels %s", found["layout"], found["candidates"], found["labels"])

    inspected = build_manifest_task(root, data_dir, min_side=min_side, max_pixels=max_pixels, workers=workers)
    log.info("Build manifest: %d files, %d inspected, %d reused, %d quarantined",
             inspected["rows"], inspected["inspected"], inspected["reused"], inspected["quarantined"])

    split = assign_splits_task(inspected["path"], data_dir / SPLITS_NAME, fractions=fractions,
                               respect_source_split=respect_source_split)
    log.info("Assign splits: %d duplicates, %d label conflicts quarantined; source splits kept: %s",
             split["duplicate"], split["label_conflict"], split["presplit"] or "none (split by content hash)")

    required = tuple(name for name, share in zip(SPLITS, fractions) if share > 0)
    verdict = validate_task(split["path"], data_dir / "validation", thresholds, required)
    log.info("Validate: %s (%s), Data Docs at %s", "passed" if verdict["success"] else "FAILED",
             "reused verdict" if verdict["reused"] else "validated", verdict["data_docs_path"])
    if not verdict["success"]:
        raise _validation_error(verdict, split["path"])

    arranged = arrange_task(split["path"], data_dir)
    log.info("Arrange: %d linked, %d copied, %d unchanged, %d stale removed",
             arranged["linked"], arranged["copied"], arranged["unchanged"], arranged["removed"])

    summary = summary_task(arranged["manifest"], data_dir, found["layout"])
    counts = ", ".join(f"{name} {c['cat']} cats/{c['dog']} dogs" for name, c in summary["counts"].items())
    log.info("Summary: %s; %d unlabelled; %d quarantined %s; fingerprint %s",
             counts, summary["unlabelled"], summary["quarantined"], summary["quarantine_reasons"],
             summary["fingerprint"][:16])
    return summary


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.prepare <source> [data_dir]`: run the flow with default settings."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        raise SystemExit("usage: python -m flows.prepare <kaggle|petimages|URL|archive|folder> [data_dir]")
    summary = prepare_data(args[0], args[1] if len(args) > 1 else "data")
    print(summary["paths"]["summary"])


if __name__ == "__main__":
    main()
