"""One self-contained HTML report per trained version: what it is, how it scored, why it ships or not.

Everything people would otherwise gather from MLflow params, metrics, plots and tags, on one
page: lineage (data fingerprint, source, classes, split counts, quarantined files, config hash,
backend, precision, decoder), the gate's decision with the champion's metrics on the same test
split beside this model's, test metrics and the per-class table, the confusion matrix and ROC
curve, calibration before and after its temperature with the reliability diagram, the ranked
candidates (single backbones and the ensemble, with and without test-time augmentation), the
worst mistakes of each class with their Grad-CAM overlays, and the data audit's findings where
the data folder holds one (`quality/<feature space>/*.csv`).

The file is self-contained: every image is inline as a `data:` URI and the page's
Content-Security-Policy allows nothing else, so it opens anywhere, offline, and no request
leaves it (tested in a real headless Chromium). It is rendered by Jinja2 (installed with MLflow
and Prefect) from templates/report.html.j2, with autoescaping on: file names and reasons are
text, never markup. It is logged to the run as `report/index.html` and linked from the
registered version's description and the Prefect summary.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common.files import atomic_write_text
from tasks.common.labels import ClassMap
from tasks.common.numbers import decimals4
from tasks.common.results import MlflowRun, PrepareSummary, Promotion, TrainResult
from tasks.models.report import metric_cell, reported_metrics

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPORT_ARTIFACT = "report/index.html"
"""Where the report lies in the run's artifacts (and under the run folder)."""

COUNTS = ("count", "n_images", "n_errors")
"""Metrics that are counts of images (shown as whole numbers)."""

AUDIT_ROWS = 20
"""Rows of the data audit shown (its CSV has them all)."""


def data_uri(path: str | Path | None) -> str | None:
    """A PNG as a `data:` URI, or None when there is no such file."""
    if not path or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _cell(value: Any) -> str:
    """A table cell: 4 decimals for floats, a dash for nothing, the text otherwise."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return decimals4(value)
    return str(value)


def audit_table(trained: TrainResult) -> dict[str, Any] | None:
    """The data audit of the model's feature space(s) (its findings' CSV, data/quality/<space>/audit.csv), or None
    where the run has none."""
    for name in trained.chosen_members:
        quality = trained.backbones[name].quality
        if quality is None or not Path(quality.csv).is_file():
            continue
        frame = pd.read_csv(quality.csv)
        shown = frame.head(AUDIT_ROWS)
        return {"path": quality.csv, "summary": f"On {name}'s features: {quality.text()}",
                "warnings": list(quality.warnings), "columns": list(shown.columns),
                "rows": [[_cell(value) for value in row] for row in shown.itertuples(index=False)]}
    return None


def _lineage(data: PrepareSummary, trained: TrainResult, source: str, run: MlflowRun | None,
             decision: Promotion | None) -> list[tuple[str, str]]:
    calibration = trained.calibration
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(data.quarantine_reasons.items()))
    return [
        ("data fingerprint", data.fingerprint),
        ("source", source),
        ("layout", data.layout),
        ("classes", ", ".join(data.classes)),
        ("quarantined files", f"{data.quarantined}" + (f" ({reasons})" if reasons else "")),
        ("unlabelled images", str(data.unlabelled)),
        ("config hash", trained.config_hash),
        ("chosen", trained.chosen_backbone),
        ("input size", f"{trained.input_size} px"),
        ("backend", f"Keras/{trained.devices.backend} on {trained.devices.device_name}"),
        ("precision", f"{trained.devices.precision} ({trained.devices.reason})"),
        ("decoder", trained.decoder),
        ("fine-tuned", _cell(trained.fine_tuned)),
        ("test-time augmentation", trained.tta),
        ("temperature", f"{calibration.temperature:.3f}" if calibration else "–"),
        ("run folder", trained.output_dir),
        ("MLflow run", run.run_url if run else "–"),
        ("model", decision.model_uri if decision else (run.model_uri or "–") if run else "–"),
    ]


def _decision(decision: Promotion | None, served: Mapping[str, Any], classes: list[str]) -> dict[str, Any] | None:
    if decision is None:
        return None
    champion = decision.champion_metrics or {}
    names = [name for name in dict.fromkeys((decision.metric, *reported_metrics(classes))) if name in served]
    return {"version": decision.version, "model_name": decision.model_name, "promoted": decision.promoted,
            "alias": decision.alias, "metric": decision.metric, "candidate": metric_cell(decision.candidate_value),
            "champion": metric_cell(decision.champion_value), "reasons": decision.reasons,
            "previous": decision.previous_champion_version,
            "rows": [(name, metric_cell(served.get(name)), metric_cell(champion.get(name))) for name in names]}


def _candidates(trained: TrainResult) -> dict[str, Any]:
    frame = pd.read_csv(trained.comparison_path) if Path(trained.comparison_path).is_file() else pd.DataFrame()
    if trained.tta == "none":
        frame = frame.drop(columns=[column for column in frame.columns if column.endswith("_tta")])
    columns = [column for column in frame.columns if column != "chosen"]
    return {"columns": columns, "rows": [{"chosen": bool(row["chosen"]), "cells": [_cell(row[c]) for c in columns]}
                                         for _, row in frame.iterrows()]}


def render_report(data: PrepareSummary, trained: TrainResult, served_metrics: Mapping[str, Any],
                  decision: Promotion | None, run: MlflowRun | None, source: str) -> str:
    """The report's HTML."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    from tasks.learning.calibration import summary_rows

    classes = ClassMap.from_names(data.classes)
    test = trained.test_metrics
    scalar = {key: value for key, value in served_metrics.items() if isinstance(value, int | float)}
    shown = [name for name in dict.fromkeys((*reported_metrics(data.classes), "chance_accuracy", "macro_f1",
                                             "count", "n_images", "n_errors")) if name in scalar]
    per_class = [{"name": name, **{key: _cell(test.get(f"{key}_{name}")) for key in ("precision", "recall", "f1",
                                                                                      "support")}}
                 for name in classes.names]
    calibration = trained.calibration
    version = f"version {decision.version}" if decision else "an unregistered model"
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("report.html.j2").render(
        title=f"{decision.model_name if decision else 'Model'} {version}: {trained.chosen_backbone}",
        subtitle=f"Trained on {sum(sum(c.values()) for c in data.counts.values())} images of "
                 f"{len(classes.names)} classes; this page is self-contained (no request leaves it).",
        lineage=_lineage(data, trained, source, run, decision), classes=list(classes.names),
        splits=[(split, [*(counts.get(name, 0) for name in classes.names), sum(counts.values())])
                for split, counts in data.counts.items()],
        decision=_decision(decision, served_metrics, data.classes),
        metrics=[(name, _cell(int(scalar[name]) if name in COUNTS else float(scalar[name]))) for name in shown],
        per_class=per_class,
        plots=[("confusion matrix", data_uri(trained.plots.get("confusion_matrix"))),
               ("ROC", data_uri(trained.plots.get("roc_curve")))],
        calibration={"reason": calibration.reason,
                     "rows": [{**row, "before": _cell(row["before"]), "after": _cell(row["after"])}
                              for row in summary_rows(calibration)],
                     "plot": data_uri(calibration.reliability_plot)} if calibration else None,
        tta=trained.tta, candidates=_candidates(trained),
        mistakes=[{"image": data_uri(item.overlay), "name": Path(item.path).name, "label": item.label,
                   "predicted": item.predicted, "probability": _cell(item.probability)}
                  for item in trained.explanations if data_uri(item.overlay)],
        audit=audit_table(trained))


def write_report(target: Path, data: PrepareSummary, trained: TrainResult, served_metrics: Mapping[str, Any],
                 decision: Promotion | None, run: MlflowRun | None, source: str) -> Path:
    """Render the report and write it atomically to `target`."""
    return atomic_write_text(Path(target), render_report(data, trained, served_metrics, decision, run, source))


def report_url(run: MlflowRun) -> str:
    """The report in the MLflow UI: the run's artifact view, which shows the HTML."""
    return f"{run.run_url}/artifactPath/{REPORT_ARTIFACT}"


def publish_report(data: PrepareSummary, trained: TrainResult, served_metrics: Mapping[str, Any],
                   decision: Promotion, run: MlflowRun, source: str) -> tuple[str, str]:
    """Write <run folder>/report/index.html, log it to the run as `report/index.html`, link it from the version.

    Returns (local path, MLflow UI link). The version's description keeps the gate's line and
    gains the link.
    """
    from tasks.models.store import use_tracking

    path = write_report(Path(trained.output_dir) / REPORT_ARTIFACT, data, trained, served_metrics, decision, run,
                        source)
    _, client = use_tracking()
    client.log_artifact(run.run_id, str(path), str(Path(REPORT_ARTIFACT).parent))
    url = report_url(run)
    version = client.get_model_version(decision.model_name, decision.version)
    described = (version.description or "").split("; report: ")[0]
    client.update_model_version(decision.model_name, decision.version, description=f"{described}; report: {url}")
    return str(path), url
