"""What a drift check leaves behind: one self-contained HTML page, and an MLflow run in the model's monitoring experiment.

The page (templates/drift.html.j2, in the version report's style) gives the verdict and its
reasons, the figures beside their training values and thresholds, one figure of three plots (the
head inputs of both samples on the training sample's first two principal axes, the class shares,
the confidences), and what was compared with what, corrupt log files named. Like the version
report it is self-contained: its image is inline and nothing leaves it.

The run (experiment `<model name>-monitoring`, tag `catsdogs.kind` = monitor) holds the figures
as metrics, the thresholds and the window as params, and the page as `report/drift.html`, so the
checks of a model line up in one table in the MLflow UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.files import atomic_write_text
from tasks.common.numbers import decimals4
from tasks.common.results import DriftSummary, MlflowRun
from tasks.models.model_report import TEMPLATES, data_uri
from tasks.models.monitoring import Sample

REPORT_ARTIFACT = "report/drift.html"
KIND = "monitor"


def monitoring_experiment(model_name: str) -> str:
    """The MLflow experiment of a model's drift checks."""
    return f"{model_name}-monitoring"


def _number(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else decimals4(float(value))


def _figures(summary: DriftSummary) -> list[tuple[str, str, str, str]]:
    limits = summary.thresholds
    shares = ", ".join(f"{name} {share:.2f}" for name, share in summary.class_shares.items()) or "–"
    prior = ", ".join(f"{name} {share:.2f}" for name, share in summary.training_shares.items())
    return [("rows compared", str(summary.rows), str(summary.reference_rows), f">= {limits.get('min_rows', 0):g}"),
            ("feature MMD², permutation p-value", f"{_number(summary.mmd2)}, p = {_number(summary.p_value)}", "–",
             f"p < {limits.get('max_p_value', 0):g}"),
            ("predicted class shares (shift)", f"{shares} ({_number(summary.class_shift)})", prior,
             f"shift >= {limits.get('max_class_shift', 0):g}"),
            ("mean probability of the predicted class", _number(summary.mean_confidence),
             _number(summary.baseline_confidence), f"drop >= {limits.get('max_confidence_drop', 0):g}")]


def render(summary: DriftSummary, plot: Path | None) -> str:
    """The page's HTML."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    lineage = [("model", summary.model_uri), ("version", summary.version or "–"), ("MLflow run", summary.run_id),
               ("window", summary.window), ("training data", summary.reference),
               ("rows of other models left out", str(summary.other_rows))]
    return environment.get_template("drift.html.j2").render(
        title=f"Drift check of {summary.model_name or summary.model_uri}"
              + (f" version {summary.version}" if summary.version else ""),
        subtitle="What the model sees now against what it learned on; this page is self-contained (no request "
                 "leaves it).",
        summary=summary, figures=_figures(summary), plot=data_uri(plot), lineage=lineage)


def write_report(folder: Path, summary: DriftSummary, reference: Sample, current: Sample) -> Path:
    """drift.png and drift.html in the check's folder; the page's path."""
    from tasks.learning.plots import plot_drift

    confidences = current.probabilities.max(axis=1) if len(current.probabilities) else np.zeros(0)
    plot = plot_drift(reference.features, current.features, summary.class_shares, summary.training_shares,
                      confidences, summary.baseline_confidence, Path(folder) / "drift.png")
    return atomic_write_text(Path(folder) / "drift.html", render(summary, plot))


def log_check(summary: DriftSummary, report: Path, experiment: str | None = None) -> MlflowRun:
    """The check as a finished MLflow run of the model's monitoring experiment, its page as `report/drift.html`."""
    from mlflow.entities import Metric

    from tasks.models.store import ensure_experiment, run_url, use_tracking
    from tasks.models.tracking import log_batch, log_json, now_ms, prefect_tags

    uri, client = use_tracking()
    experiment_id = ensure_experiment(experiment or monitoring_experiment(summary.model_name))
    run = client.create_run(experiment_id, run_name=f"drift-{summary.version or 'model'}-{Path(report).parent.name}",
                            tags={"catsdogs.kind": KIND, "catsdogs.drift": summary.status,
                                  "model_version": summary.version, "model_run_id": summary.run_id,
                                  "mlflow.note.content": summary.headline(), **prefect_tags()})
    metrics: dict[str, Any] = {"rows": summary.rows, "reference_rows": summary.reference_rows,
                               "drift": float(summary.drifted), "mmd2": summary.mmd2, "p_value": summary.p_value,
                               "class_shift": summary.class_shift, "mean_confidence": summary.mean_confidence,
                               "baseline_confidence": summary.baseline_confidence,
                               "confidence_drop": summary.confidence_drop, "other_rows": summary.other_rows,
                               "skipped_files": len(summary.skipped_files),
                               **{f"share.{name}": share for name, share in summary.class_shares.items()}}
    log_batch(client, run.info.run_id,
               metrics=[Metric(key, float(value), now_ms(), 0) for key, value in metrics.items()
                        if value is not None and np.isfinite(float(value))],
               params={"model_uri": summary.model_uri, "source": summary.source, "window": summary.window,
                       **{f"threshold.{key}": value for key, value in summary.thresholds.items()}})
    client.log_artifact(run.info.run_id, str(report), str(Path(REPORT_ARTIFACT).parent))
    log_json(client, run.info.run_id, summary.model_dump(mode="json"), "report/drift.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return MlflowRun(run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=uri,
                     run_url=run_url(run.info.run_id, experiment_id, uri))
