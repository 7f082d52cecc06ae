"""The `prepare_data` flow: from a source (Kaggle, PetImages, URL, archive, folder) to arranged splits.

    acquire -> extract -> find candidates -> build manifest -> assign splits -> validate
            -> arrange -> summarise

Each step is a task of tasks/data/steps.py; this module only wires them and logs one line per
step. Every step skips work that is already done (verified download, complete extraction,
unchanged files, same manifest, links in place), so a second run on the same source writes
nothing. What lands where under `data_dir` is written down in tasks/data/datafolder.py.

From Python: `prepare_data(source="petimages", data_dir="data")`; from the shell:
`python -m flows.prepare --source <source> [--data-dir data] [dataset-check options]`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.common.labels import SPLITS
from tasks.common.logs import run_logger
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import PrepareSummary
from tasks.data import steps
from tasks.data.folderlock import holding_data_folder
from tasks.data.splits import DEFAULT_FRACTIONS, check_fractions
from tasks.data.validate import ValidationThresholds


@flow(name="prepare-data", on_running=[label_flow_run_owner])
@holding_data_folder("prepare_data")
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
) -> PrepareSummary:
    """Acquire, check and arrange the Dogs vs. Cats images; return the dataset summary.

    `source`: "kaggle", "petimages", an https:// URL, a local .zip/.tar/.tar.gz or a folder.
    `split_fractions`: train/validation/test shares of the content-hash split.
    `respect_source_split`: keep a pre-split source's own train/validation (test is carved
    from its train images by hash when it has none).
    `min_side`/`max_pixels`: per-image limits (smaller/larger images are quarantined).
    `thresholds`: dataset-level limits; the defaults suit the real 25,000-image dataset.
    Raises DatasetValidationError, before anything is arranged, when they fail.
    """
    log = run_logger(__name__)
    data_dir = str(Path(data_dir).expanduser().absolute())
    fractions = check_fractions(split_fractions)
    thresholds = thresholds or ValidationThresholds(min_side=min_side)

    archive = steps.acquire(source, data_dir, expected_sha256)
    log.info("Acquire: %s", archive)

    root = steps.extract(archive, data_dir)
    log.info("Extract: %s", root)

    found = steps.find_candidates(root)
    log.info("Find candidates: %s layout, %d files, labels %s", found.layout, found.candidates, found.labels)

    inspected = steps.build_manifest(root, data_dir, min_side=min_side, max_pixels=max_pixels, workers=workers)
    log.info("Build manifest: %d files, %d inspected, %d reused, %d quarantined",
             inspected.rows, inspected.inspected, inspected.reused, inspected.quarantined)

    split = steps.assign_splits(data_dir, fractions=fractions, respect_source_split=respect_source_split)
    log.info("Assign splits: %d duplicates, %d label conflicts quarantined; source splits kept: %s",
             split.duplicate, split.label_conflict, split.presplit or "none (split by content hash)")

    required = tuple(name for name, share in zip(SPLITS, fractions) if share > 0)
    verdict = steps.validate(data_dir, thresholds, required)
    log.info("Validate: %s (%s), Data Docs at %s", "passed" if verdict.success else "FAILED",
             "reused verdict" if verdict.reused else "validated", verdict.data_docs_path)
    verdict.raise_if_failed(split.path)

    arranged = steps.arrange(data_dir)
    log.info("Arrange: %d linked, %d copied, %d unchanged, %d stale removed",
             arranged.linked, arranged.copied, arranged.unchanged, arranged.removed)

    summary = steps.summarise(data_dir, found.layout)
    counts = ", ".join(f"{name} {c['cat']} cats/{c['dog']} dogs" for name, c in summary.counts.items())
    log.info("Summary: %s; %d unlabelled; %d quarantined %s; fingerprint %s", counts, summary.unlabelled,
             summary.quarantined, summary.quarantine_reasons, summary.fingerprint[:16])
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.prepare --source ...`: the same data options as `python -m flows.retrain`."""
    from flows.cli import build_parser, log_path_for, parse, run_main
    from flows.config import DataConfig

    parsed = parse(DataConfig, build_parser(DataConfig, "python -m flows.prepare",
                                            "Acquire, check and arrange the Dogs vs. Cats images into a data folder."),
                   argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = prepare_data(config.source, config.data_dir, expected_sha256=config.expected_sha256,
                               split_fractions=config.split_fractions, thresholds=config.thresholds)
        print(summary.paths.summary)
        return 0

    return run_main(work, log_path=log_path_for(config.data_dir, "prepare"), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
