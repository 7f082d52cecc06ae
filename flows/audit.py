"""The `audit` flow: the data audit of a prepared data folder, without training.

    hold the data folder -> check it was prepared -> configure devices -> the image decoder
    for each backbone: precision -> plan features -> extract missing shards (mapped)
                       -> audit the data on its features (checks included)

The same audit runs inside every training run (flows/train.py); this flow runs it alone, to
review a dataset before training on it or after correcting it. It computes only the feature
shards the cache lacks (none after a training run on the same feature space), and reuses a
kept audit when data and settings are unchanged. The findings land in
data/quality/<feature space>/ (audit.csv to review and pass back as labels.csv, audit.parquet,
audit.json, checks/); too many test images that are near-copies of training images stop it with
one sentence, after the findings are written.

    python -m flows.audit --data-dir data --backbones resnet50
    python -m flows.audit --data-dir data --backbones vgg16 --weights none --input-size 32
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import AuditConfig, ComputeConfig
from flows.train import backbone_features
from tasks.common.logs import run_logger
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import AuditSummary
from tasks.data.datafolder import DataFolder
from tasks.learning import steps


@flow(name="audit", task_runner=ThreadPoolTaskRunner(max_workers=1), on_running=[label_flow_run_owner])
def audit(config: AuditConfig = AuditConfig()) -> AuditSummary:
    """Audit the prepared folder's labelled images on each backbone's features; return what was found where."""
    logger = run_logger(__name__)
    folder = DataFolder.at(config.data_dir)
    data_dir = str(folder.root)
    with folder.lock("audit", create=False):
        steps.check_prepared_data(data_dir)
        devices = steps.configure_devices(config.precision)
        decoder = steps.check_decoder(config.decoder)
        audits = {}
        for name in config.backbones:
            space = backbone_features(data_dir, name, config, ComputeConfig(), devices, decoder)
            audits[name] = steps.audit_data(data_dir, space.features.cache_dir, steps.audit_settings(config, config.seed))
            logger.info("%s data audit: %s; findings in %s", name, audits[name].text(), audits[name].csv)
    return AuditSummary(data_dir=data_dir, data_fingerprint=folder.summary_fingerprint(), audits=audits)


def summary_text(summary: AuditSummary) -> str:
    """What a person reads at the end of `python -m flows.audit`: per backbone, the counts and where to decide."""
    lines = []
    for name, found in summary.audits.items():
        lines += [f"{name}: {found.text()}", f"  findings: {found.csv}"]
        lines += [f"  warning: {warning}" for warning in found.warnings]
    lines.append("Fill the decision column (exclude, relabel or a class) and save the file as "
                 f"{DataFolder.at(summary.data_dir).label_overrides}: the next prepare or retrain applies it.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.audit`: the audit alone, findings on stdout (exit 2 with one sentence on bad input)."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    def own_options(parser) -> None:
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    parsed = parse(AuditConfig, build_parser(AuditConfig, "python -m flows.audit",
                                             "Audit a prepared data folder: suspected label errors, near-copies, "
                                             "leaked test images and outliers, from the cached features.",
                                             own_options), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = audit(config)
        print(json.dumps(summary.model_dump(mode="json"), indent=2) if args.json else summary_text(summary))
        return 0

    return run_main(work, log_path=log_path_for(config.data_dir, "audit"), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
