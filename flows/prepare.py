"""The `prepare_data` flow: from a source (Kaggle, PetImages, URL, archive, folder) to arranged splits.

    acquire -> extract -> find candidates -> build manifest -> label corrections (labels.csv)
            + assign splits -> validate -> arrange -> summarise

Each step is a task of tasks/data/steps.py; this module only wires them and logs one line per
step. Every step skips work that is already done (verified download, complete extraction,
unchanged files, same manifest, links in place), so a second run on the same source writes
nothing. What lands where under `data_dir` is written down in tasks/data/datafolder.py.

From Python: `prepare_data(DataConfig(source="petimages", data_dir="data"))`; from the shell:
`python -m flows.prepare --source <source> [--data-dir data] [dataset-check options]`.
"""

from __future__ import annotations

from prefect import flow

from flows.config import DataConfig
from tasks.common.labels import SPLITS
from tasks.common.logs import run_logger
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import PrepareSummary
from tasks.data import steps
from tasks.data.datafolder import DataFolder


@flow(name="prepare-data", on_running=[label_flow_run_owner])
def prepare_data(config: DataConfig = DataConfig()) -> PrepareSummary:
    """Acquire, check and arrange the images of `config.source`; return the dataset summary.

    Raises DatasetValidationError, before anything is arranged, when the dataset fails the
    checks of `config.thresholds` (whose image size limits the manifest applies too).
    """
    log = run_logger(__name__)
    folder = DataFolder.at(config.data_dir)
    data_dir = str(folder.root)
    with folder.lock("prepare_data"):
        archive = steps.acquire(config.source, data_dir, config.expected_sha256)
        log.info("Acquire: %s", archive)

        root = steps.extract(archive, data_dir)
        log.info("Extract: %s", root)

        found = steps.find_candidates(root)
        log.info("Find candidates: %s layout, %d files: %s", found.layout, found.candidates, found.counts_text())
        if not found.classes().kaggle:
            log.info("Classes: %s (label order)", ", ".join(found.classes().names))

        inspected = steps.build_manifest(root, data_dir, config.thresholds.min_side, config.thresholds.max_side,
                                         config.replace_classes)
        log.info("Build manifest: %d files, %d inspected, %d reused, %d quarantined",
                 inspected.rows, inspected.inspected, inspected.reused, inspected.quarantined)

        split = steps.assign_splits(data_dir, config.split_fractions, config.respect_source_split, str(root))
        if split.label_overrides:
            log.info("Label overrides: %s (%s)", split.label_overrides.text(), ", ".join(split.label_overrides.files))
        log.info("Assign splits: %d duplicates, %d label conflicts quarantined; %d images kept their split, %d placed "
                 "(each class in its fractions); source splits kept: %s", split.duplicate, split.label_conflict,
                 split.kept, split.placed, split.presplit or "none")

        required = tuple(name for name, share in zip(SPLITS, config.split_fractions) if share > 0)
        verdict = steps.validate(data_dir, config.thresholds, required)
        log.info("Validate: %s (%s), Data Docs at %s", "passed" if verdict.success else "FAILED",
                 "reused verdict" if verdict.reused else "validated", verdict.data_docs_path)
        for failure in verdict.brief:  # the numbers on the terminal; the error names the options that loosen them
            log.warning("Validate: %s", failure)
        verdict.raise_if_failed(split.path)

        arranged = steps.arrange(data_dir)
        log.info("Arrange: %d linked, %d copied, %d unchanged, %d stale removed",
                 arranged.linked, arranged.copied, arranged.unchanged, arranged.removed)

        summary = steps.summarise(data_dir, found.layout, split.label_overrides)
    counts = ", ".join(f"{split} {_class_counts(per_class)}" for split, per_class in summary.counts.items())
    log.info("Summary: %s; %d unlabelled; %d quarantined %s; fingerprint %s", counts, summary.unlabelled,
             summary.quarantined, summary.quarantine_reasons, summary.fingerprint[:16])
    return summary


def _class_counts(per_class: dict[str, int]) -> str:
    """`12 cats/14 dogs` as before for cats vs. dogs; `5 daisy/6 roses/4 tulips` for any other classes."""
    if set(per_class) == {"cat", "dog"}:
        return f"{per_class['cat']} cats/{per_class['dog']} dogs"
    return "/".join(f"{count} {name}" for name, count in per_class.items())


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.prepare --source ...`: the same data options as `python -m flows.retrain`."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    parsed = parse(DataConfig, build_parser(DataConfig, "python -m flows.prepare",
                                            "Acquire, check and arrange the images (Dogs vs. Cats by default, or your own "
                                            "classes: one folder per class) into a data folder."),
                   argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        print(prepare_data(config).paths.summary)
        return 0

    def preflight() -> None:
        from tasks.data.acquire import check_source

        check_source(config.source)

    return run_main(work, log_path=log_path_for(config.data_dir, "prepare"), verbose=args.verbose, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(main())
