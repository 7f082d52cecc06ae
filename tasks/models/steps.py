"""The models wing's Prefect tasks: the steps of `retrain` and `predict` after training, and of `monitor`.

They talk to the tracking store and the Prefect API, so they retry transient failures (a
server restarting, a locked database) and never bad input; none is cached by Prefect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common.errors import InputError, retry_unless_input_error
from tasks.common.results import ChampionInfo, DriftSummary, MlflowRun, PredictSummary, PrepareSummary, Promotion, RetrainSummary, \
    TrainResult

if TYPE_CHECKING:
    from tasks.models.reconcile import Reconciled

IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_input_error,
                              "cache_policy": NO_CACHE}
"""Retry policy of tasks that talk to a store or server: transient failures only, never cached."""

SUMMARY_ARTIFACT_KEY = "retrain-summary"
"""Prefect artifact key: every run adds a version, so the UI shows the history under one key."""


@task(name="check-store", **IO_RETRIES)
def check_store() -> str:
    """Fail before any work, in one sentence, when the MLflow store is a folder, damaged or read-only; what was checked."""
    from tasks.models.store import check_writable_store

    return check_writable_store()


@task(name="reconcile", **IO_RETRIES)
def reconcile(data_dir: str, experiment: str, model_name: str) -> Reconciled:
    """Set straight what killed runs left: stuck runs and flow runs, pending models, half-registered
    versions, half-written folders (see tasks/models/reconcile.py); what was done, in a summary."""
    from tasks.models.reconcile import reconcile as run

    return run(data_dir, experiment, model_name)


@task(name="read-champion", **IO_RETRIES)
def read_champion(model_name: str) -> ChampionInfo | None:
    """The current champion's version, dataset fingerprint, config hash and logged metrics."""
    from tasks.models.registry import champion_summary

    return champion_summary(model_name)


@task(name="find-identical-versions", **IO_RETRIES)
def versions_built_from(fingerprint: str, config_hash: str, model_name: str) -> list[ChampionInfo]:
    """Registered versions trained on this data with this config (the "nothing changed" check)."""
    from tasks.models.registry import versions_built_from as find

    return find(fingerprint, config_hash, model_name)


@task(name="record-unchanged", **IO_RETRIES)
def record_unchanged(reason: str, fingerprint: str, config_hash: str, experiment: str) -> MlflowRun:
    """A short MLflow run that says why nothing was trained, so the schedule's history is complete."""
    from tasks.models.tracking import log_skipped_run

    return log_skipped_run(reason, fingerprint, config_hash, experiment=experiment)


@contextlib.contextmanager
def training_run(fingerprint: str, config_hash: str, experiment: str) -> Iterator[MlflowRun]:
    """The retrain's MLflow run, opened as training starts and closed after it is logged (a context, not a
    task: it spans the training subflow and the logging, so its duration and system metrics cover the work)."""
    from tasks.models.tracking import training_run as opened

    with opened(fingerprint, config_hash, experiment=experiment) as run:
        yield run


@task(name="log-to-mlflow", **IO_RETRIES)
def log_to_mlflow(run: MlflowRun, prepared: PrepareSummary, trained: TrainResult, config: dict[str, Any],
                  source: str, model_name: str) -> MlflowRun:
    """Into the open run: config, data (datasets named after the model), metrics, plots, the model, and one child
    run per backbone."""
    from tasks.models.tracking import log_retrain

    return log_retrain(prepared, trained, config, source=source, run=run, model_name=model_name)


def _leaked(audit_report: str | None) -> frozenset[str]:
    """The test images the data audit found to be near-copies of training images (none without a report)."""
    from tasks.learning.audit import leaked_test_hashes

    return leaked_test_hashes(audit_report)


@task(name="score-on-test-split", **IO_RETRIES)
def score_on_test_split(model_uri: str, data_dir: str, audit_report: str | None = None) -> dict[str, float]:
    """Test metrics of the logged model through the serving code: the gate's one yardstick.

    The champion is re-scored by the same function on the same split inside the gate, so the
    comparison never mixes two evaluation paths. Test images the audit (`audit_report`) found
    to be near-copies of training images are left out of both (`n_left_out` counts them).
    """
    from tasks.models.scoring import evaluate_model_uri

    return evaluate_model_uri(model_uri, data_dir, leave_out=_leaked(audit_report))


@task(name="register-and-gate", **IO_RETRIES)
def register_and_gate(run_id: str, model_uri: str, candidate_metrics: dict[str, float], data_dir: str,
                      floor: float, margin: float, metric: str, model_name: str,
                      audit_report: str | None = None) -> Promotion:
    """Register a new version; `champion` moves to it only through the gate (else `challenger`).

    The champion is scored on the candidate's test split without the leaked images, as the candidate was.
    """
    from tasks.models.promotion import register_and_gate as gate
    from tasks.models.scoring import evaluate_model_uri

    leaked = _leaked(audit_report)
    return gate(run_id, model_uri, candidate_metrics,
                evaluate_champion=lambda uri: evaluate_model_uri(uri, data_dir, leave_out=leaked),
                floor=floor, margin=margin, metric=metric, model_name=model_name)


@task(name="publish-report", **IO_RETRIES)
def publish_report(prepared: PrepareSummary, trained: TrainResult, candidate_metrics: dict[str, float],
                   decision: Promotion, logged: MlflowRun, source: str) -> tuple[str, str]:
    """The version's HTML report: in the run folder, logged to the run, linked from the version; (path, link)."""
    from tasks.models.model_report import publish_report as publish

    return publish(prepared, trained, candidate_metrics, decision, logged, source)


def report_or_warning(report: Any, decision: Promotion) -> tuple[str | None, str | None]:
    """The report's (path, link) from publish_report's final state, or (None, None) with one warning line.

    The version is registered and gated before its report is written, so a report that cannot be
    written (a full disk, a store gone) must not fail the run: a failed run over a registered
    version reads as "nothing shipped", and its rerun would find the version and skip.
    """
    from tasks.common.logs import run_logger

    if report.is_completed():
        return report.result()
    error = report.result(raise_on_failure=False)
    run_logger(__name__).warning("Version %s is registered, but its report could not be written (%s); the run's "
                                 "log has the details.", decision.version, error)
    return None, None


@task(name="publish-summary", **IO_RETRIES)
def publish_summary(summary: RetrainSummary) -> str:
    """The markdown summary artifact of this flow run (metrics table, decision, MLflow link)."""
    from tasks.models.report import summary_markdown

    markdown = summary_markdown(summary)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description=f"Retrain: {summary.headline}")
    return markdown


@task(name="check-model", **IO_RETRIES)
def check_model(model_uri: str) -> str:
    """Fail in a second, with one sentence, when the alias/version/model or the store does not exist."""
    from tasks.models.registry import check_model_uri

    check_model_uri(model_uri)
    return model_uri


@task(name="locate-images", cache_policy=NO_CACHE)
def locate_images(images: str, extracted_root: str) -> str:
    """The folder to score (an archive is extracted safely, once)."""
    from tasks.models.predictions import locate_images as locate

    return str(locate(images, extracted_root))


@task(name="score-images", cache_policy=NO_CACHE)
def score_images(folder: str, model_uri: str, output_csv: str, batch_size: int, engine: str = "auto") -> PredictSummary:
    """Score every image of `folder` and write the submission; the CSV appears only when every row is ready."""
    from tasks.models.predictions import predict_folder

    return predict_folder(Path(folder), model_uri, Path(output_csv), batch_size, engine)


@task(name="explain-images", cache_policy=NO_CACHE)
def explain_images(folder: str, model_uri: str, output_csv: str, count: int) -> tuple[str, int]:
    """Grad-CAM overlays of the first `count` images, beside the submission; (their folder, how many)."""
    from tasks.models.explain import explain_images as explain

    return explain(Path(folder), model_uri, Path(output_csv), count)


# --------------------------------------------------------------------------- monitor


@task(name="resolve-model", **IO_RETRIES)
def resolve_model(model_uri: str) -> ChampionInfo:
    """The registered version the URI names now (the champion moves; the check is of one version)."""
    from tasks.models.monitoring import resolve_model as resolve

    return resolve(model_uri)


@task(name="drift-samples", cache_policy=NO_CACHE)
def drift_samples(model_uri: str, run_id: str, data_dir: str, check_dir: str, images: str | None,
                  log_dir: str | None, window_hours: float, sample: int, seed: int,
                  batch_size: int) -> tuple[str, str]:
    """The training reference and the window (the log's recent rows, or the images scored), as .npz files; paths."""
    import shutil

    from tasks.data.datafolder import DataFolder
    from tasks.models import monitoring
    from tasks.models.predictions import list_images

    folder, check = DataFolder.at(data_dir), Path(check_dir)
    model = monitoring.ScoringModel(model_uri, check / "scratch", batch_size)
    trained = monitoring.training_result(run_id)
    reference = monitoring.reference_sample(model, trained, folder, run_id, sample, seed)
    if images:
        paths, _ = list_images(Path(images))
        if not paths:
            raise InputError(f"No images found in {images}; pass a folder of the new images to compare.")
        window = model.score(paths, f"{len(paths)} images in {images}")
    else:
        where = log_dir or monitoring.logged_folder(model_uri)
        if not where:
            raise InputError(f"{model_uri} records no predictions (its config's prediction_log is off); pass "
                             "--log-dir, or --images with a folder of new images.")
        window = monitoring.log_sample(where, run_id, model.classes, window_hours)
    window.extra["classes"] = list(model.classes.names)
    saved = (str(reference.save(check / "reference.npz")), str(window.save(check / "window.npz")))
    shutil.rmtree(check / "scratch", ignore_errors=True)  # what the model logged while it scored: read already
    return saved


@task(name="measure-drift", cache_policy=NO_CACHE)
def measure_drift(reference_path: str, window_path: str, identity: dict[str, str], thresholds: dict[str, float],
                  seed: int, sample: int) -> DriftSummary:
    """The window's figures against the training reference, and the verdict."""
    from tasks.common.labels import ClassMap
    from tasks.models.monitoring import Sample, Thresholds, measure

    reference, window = Sample.load(reference_path), Sample.load(window_path)
    limits = Thresholds(**{**thresholds, "min_rows": int(thresholds["min_rows"])})
    return measure(reference, window, ClassMap.from_names(window.extra["classes"]), limits, seed=seed,
                   max_rows=sample, **identity)


@task(name="publish-drift-check", **IO_RETRIES)
def publish_drift_check(summary: DriftSummary, check_dir: str, reference_path: str, window_path: str,
                        experiment: str | None) -> DriftSummary:
    """The check's page (in its folder) and its MLflow run in the monitoring experiment; the summary with both."""
    from tasks.models.drift_report import REPORT_ARTIFACT, log_check, write_report
    from tasks.models.monitoring import Sample

    page = write_report(Path(check_dir), summary, Sample.load(reference_path), Sample.load(window_path))
    run = log_check(summary, page, experiment)
    return summary.model_copy(update={"report_path": str(page), "mlflow_run_id": run.run_id,
                                      "report_url": f"{run.run_url}/artifactPath/{REPORT_ARTIFACT}"})


@task(name="emit-drift-event", **IO_RETRIES)
def emit_drift_event(summary: DriftSummary) -> str | None:
    """`catsdogs.drift.detected` about the model, with the figures: what starts a retrain where a trigger waits for it."""
    from prefect.events import emit_event

    from tasks.models.monitoring import drift_event

    event = emit_event(**drift_event(summary))
    return str(event.id) if event is not None else None
