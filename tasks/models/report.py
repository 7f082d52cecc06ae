"""What a retrain tells people: the "nothing changed" rule and the markdown summary.

The summary is the run's Prefect artifact and what the CLI prints: data counts, the
candidate's test metrics next to the champion's *re-scored on the same test split* (the
numbers the gate compared), the decision with its reasons, and the links.
"""

from __future__ import annotations

from typing import Any

from tasks.common.numbers import decimals4
from tasks.common.results import ChampionInfo, Int8Check, RetrainSummary
from tasks.models.store import experiment_url

REPORTED_METRICS = ("roc_auc", "accuracy", "log_loss", "f1_cat", "f1_dog")
"""The metrics table of cats vs. dogs; other classes show roc_auc, accuracy, macro_f1, log_loss and f1 per class."""


def reported_metrics(classes: list[str]) -> tuple[str, ...]:
    """The rows of the metrics table for these classes."""
    if classes == ["cat", "dog"]:
        return REPORTED_METRICS
    macro = ("macro_f1",) if len(classes) > 2 else ()
    return ("roc_auc", "accuracy", *macro, "log_loss", *(f"f1_{name}" for name in classes))


def unchanged_reason(fingerprint: str, config_hash: str, built: list[ChampionInfo]) -> str | None:
    """Why training can be skipped, or None: a registered version was built from this very data and config.

    Any version counts, champion or not: retraining would only register its identical twin.
    The Keras backend, and the precision, engine and image decoder that "auto" picks on this
    host, are deliberately not part of the check: they decide how the same model is computed, not
    which model it is (a model saved on one backend predicts the same on another; float32 and
    bfloat16 features, OpenVINO's and Keras' features, and OpenCV's and Pillow's pixels, train
    heads that agree: tests/learning/test_backends.py, test_precision.py, test_engines.py and
    test_pixels.py). The configured values ("auto",
    "opencv", ...) are in the config hash like every training field. Moving the schedule to a GPU
    host, or installing OpenCV, must not retrain everything; `--force` does when someone wants it.
    """
    if not fingerprint or not config_hash or not built:
        return None
    versions = ", ".join(version.version for version in built)
    return (f"nothing changed: dataset fingerprint {fingerprint[:12]} and config hash {config_hash[:12]} "
            f"equal those of registered version(s) {versions} (another Keras backend, or the precision, engine or "
            "image decoder that auto picks on this host, is not a change: --force trains anyway)")


def metric_cell(value: Any) -> str:
    """A metric for a table cell: 4 decimals, or a dash when missing."""
    if isinstance(value, bool) or value is None:
        return "–"
    shown = decimals4(value)
    return str(value) if shown == "n/a" else shown


def int8_sentence(check: Int8Check) -> str:
    """What int8 cost the head, in one line (the run page's note and the retrain summary)."""
    def pair(key: str) -> str:
        return f"{key} {decimals4(check.int8[key])} (float32 {decimals4(check.float32[key])})"

    return (f"int8: the head on int8 features of {check.images} validation images scored {pair('accuracy')}, "
            f"{pair('roc_auc')}; features relative L2 {check.feature_relative_l2:.3f}, largest probability gap "
            f"{check.max_probability_gap:.3f}; calibrated on {check.calibration_images} train images.")


def _quality_lines(summary: RetrainSummary) -> list[str]:
    """The data audit in a few lines: what it found, what the gate left out, what warned, where to decide."""
    quality = summary.quality
    if quality is None:
        return []
    lines = ["", "## Data quality", "", f"Audit on `{quality.feature_space}` features: {quality.text()}."]
    left_out = int((summary.test_metrics or {}).get("n_left_out", 0))
    if left_out:
        lines.append(f"- {left_out} test image(s) that are near-copies of training images were left out of the test "
                     "metrics below, the champion's included: both were scored on the same images.")
    lines += [f"- Warning: {warning}" for warning in quality.warnings]
    lines.append(f"- Findings: `{quality.csv}` (fill its `decision` column with exclude, relabel or a class, and save "
                 "it as labels.csv in the data folder: the next run applies it)")
    return lines


def summary_markdown(summary: RetrainSummary) -> str:
    """The run summary people read in the Prefect UI (and on the console): data, metrics, decision, links."""
    data = summary.data
    lines = [f"# Retrain: {summary.headline}", "",
             f"- Dataset fingerprint: `{data.fingerprint[:16]}`",
             f"- Config hash: `{summary.config_hash[:16]}`",
             f"- Data folder: `{data.paths.data_dir}`"]
    if summary.chosen_backbone:
        lines.append(f"- Chosen backbone: **{summary.chosen_backbone}**")
    if summary.devices:
        lines.append(f"- Compute: Keras/{summary.devices.backend} on {summary.devices.device_name}, "
                     f"{summary.devices.precision}, engine {summary.devices.engine}")  # why: the run's log says it, once
    if summary.int8_check:
        lines.append(f"- {int8_sentence(summary.int8_check)}")
    if data.counts:
        lines += ["", "## Data", "", "| split | " + " | ".join(data.classes) + " |",
                  "|---|" + "---:|" * len(data.classes)]
        lines += [f"| {split} | " + " | ".join(str(c.get(name, 0)) for name in data.classes) + " |"
                  for split, c in data.counts.items()]
        lines.append(f"\nQuarantined files: {data.quarantined}")
        if data.label_overrides:
            lines.append(f"\nLabel overrides: {data.label_overrides.text()}")
    lines += _quality_lines(summary)
    decision = summary.decision
    if summary.test_metrics:
        champion = (decision.champion_metrics if decision else None) or {}
        lines += ["", "## Test metrics", "",
                  "| metric | this run | champion, on this run's test split |", "|---|---:|---:|"]
        for name in reported_metrics(data.classes):
            if name in summary.test_metrics:
                lines.append(f"| {name} | {metric_cell(summary.test_metrics.get(name))} | {metric_cell(champion.get(name))} |")
    if decision:
        verdict = "promoted to **champion**" if decision.promoted else f"kept as **{decision.alias}**"
        lines += ["", "## Promotion decision", "",
                  f"Version {decision.version} of `{decision.model_name}`: {verdict} "
                  f"({decision.metric}: this run {metric_cell(decision.candidate_value)}, "
                  f"champion {metric_cell(decision.champion_value)})."]
        lines += [f"- {reason}" for reason in decision.reasons]
    elif summary.reason:
        lines += ["", "## Decision", "", f"Training skipped: {summary.reason}.",
                  "Run with `force: true` (CLI `--force`) to train anyway."]
    lines += ["", "## Links", "", f"- MLflow run: [{summary.mlflow.run_id}]({summary.mlflow.run_url})",
              f"- All training runs: {experiment_url(summary.mlflow.experiment_id, summary.mlflow.tracking_uri)}",
              f"- Tracking URI: `{summary.mlflow.tracking_uri}`"]
    if decision:
        lines.append(f"- Model: `{decision.model_uri}`")
    if summary.report_url:
        lines.append(f"- Report: [report/index.html]({summary.report_url}) (also `{summary.report_path}`)")
    return "\n".join(lines) + "\n"
