"""The `monitor` flow: has what the served model sees drifted from what it learned on?

    the model's version now (models:/<name>@champion by default)
    -> samples: the train split's head inputs (cached, or the model's own), its class shares and test
       confidence; and the window: the prediction log's last hours of this version, or a folder of new images
    -> figures: feature drift (MMD, permutation p-value), class-share shift, confidence drop
    -> the check's page (data/monitoring/<time>/drift.html) and its MLflow run (<model name>-monitoring)
    -> on drift: the Prefect event `catsdogs.drift.detected`, with the figures

It runs from the command line (`python -m flows.monitor`), from Python (`monitor(MonitorConfig())`)
and as the deployment `monitor/daily` (deployments/prefect.yaml), whose event the deployment
`retrain/on-demand` is triggered by: the loop that retrains by itself (README "Watching the champion").

    python -m flows.monitor                                   # the champion's last 24 hours of predictions
    python -m flows.monitor --images new_photos/               # or a folder of new images
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from prefect import flow

from flows.config import MonitorConfig
from tasks.common.logs import run_logger
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import DriftSummary
from tasks.data.datafolder import DataFolder
from tasks.models import steps
from tasks.models.naming import parse_registry_uri


@flow(name="monitor", on_running=[label_flow_run_owner])
def monitor(config: MonitorConfig = MonitorConfig()) -> DriftSummary:
    """Compare the model's recent predictions (or new images) with its training data; emit an event on drift."""
    logger = run_logger(__name__)
    folder = DataFolder.at(config.data_dir)
    version = steps.resolve_model(config.model_uri)
    check_dir = str(folder.new_monitoring_run())
    reference, window = steps.drift_samples(version.model_uri, version.run_id or "", str(folder.root), check_dir,
                                            config.images, config.log_dir, config.window_hours, config.sample,
                                            config.seed, config.batch_size)
    source = "images" if config.images else "log"
    identity = {"model_uri": config.model_uri, "model_name": (parse_registry_uri(config.model_uri) or ("", ""))[1],
                "version": version.version, "run_id": version.run_id or "", "source": source,
                "window": config.images if config.images else f"the last {config.window_hours:g} h"}
    thresholds = {"max_p_value": config.max_p_value, "max_class_shift": config.max_class_shift,
                  "max_confidence_drop": config.max_confidence_drop, "min_rows": float(config.min_rows)}
    summary = steps.measure_drift(reference, window, identity, thresholds, config.seed, config.sample)
    summary = steps.publish_drift_check(summary, check_dir, reference, window, config.experiment)
    for skipped in summary.skipped_files:
        logger.warning("Skipped a corrupt prediction log file: %s", skipped)
    if summary.drifted and config.emit_event:
        summary = summary.model_copy(update={"event_id": steps.emit_drift_event(summary)})
    logger.info("Drift check: %s; %s", summary.headline(), "; ".join(summary.reasons) or "nothing past a threshold")
    logger.info("Report: %s", summary.report_path)
    return summary


def summary_text(summary: DriftSummary) -> str:
    """What a person reads at the end of `python -m flows.monitor`."""
    lines = [f"Drift check: {summary.headline()}."]
    lines += [f"  - {reason}" for reason in summary.reasons]
    lines += [f"  skipped: {item}" for item in summary.skipped_files]
    lines.append(f"Compared {summary.window} with {summary.reference}.")
    if summary.event_id:
        lines.append(f"Emitted catsdogs.drift.detected (event {summary.event_id}).")
    lines.append(f"Report: {summary.report_path}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.monitor`: one drift check, its verdict on stdout (exit 2 with one sentence on bad input)."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    def own_options(parser) -> None:
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    parsed = parse(MonitorConfig, build_parser(MonitorConfig, "python -m flows.monitor",
                                               "Check the served model for drift: its recent prediction log (or a "
                                               "folder of new images) against its training data; on drift, emit the "
                                               "Prefect event catsdogs.drift.detected.", own_options), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = monitor(config)
        print(json.dumps(summary.model_dump(mode="json"), indent=2) if args.json else summary_text(summary))
        return 0

    def preflight() -> None:
        from tasks.models.predictions import check_images
        from tasks.models.store import check_store_exists

        if config.images:
            check_images(config.images)
        check_store_exists()

    return run_main(work, log_path=log_path_for(config.data_dir, "monitor"), verbose=args.verbose,
                    preflight=preflight)


if __name__ == "__main__":
    # Run the importable module's main (a deployment pickles flows by reference to a real module).
    from flows.monitor import main as _main

    raise SystemExit(_main())
