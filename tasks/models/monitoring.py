"""The drift check of a served model: what it sees now against what it learned on, in figures.

    the model (a registry URI) -> its training run's result (evaluation/train_result.json)
    -> reference: the train split's head inputs, summarised as the served model summarises them,
       the train split's class shares, the mean confidence on the test split when it was trained
    -> window: the prediction log's rows of the last hours written by this model, or a folder of
       new images scored by it
    -> figures (tasks/learning/drift.py) and the verdict, with a sentence for each figure past its threshold

Where the reference's features come from: the train split's cached features (the feature cache of
the model's backbone(s), summarised by the served model's own projection) when they are what the
served model computes, so they cost nothing; after fine-tuning (the backbone changed) or at int8 (the
served IR is quantized apart from the features'), the served model scores a sample of the train
images instead, kept in monitoring/reference-<run id>.npz for the next checks. Images the monitor
scores go through the served model exactly as a request does: loaded with its prediction log
pointed at a scratch folder, whose rows are then read back, so the two sides are measured alike.

Samples travel between the flow's steps as .npz files in the check's folder (paths, not arrays).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.errors import ConfigError, InputError
from tasks.common.files import atomic_path
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.common.logs import run_logger
from tasks.common.results import ChampionInfo, DriftSummary, TrainResult
from tasks.data.datafolder import DataFolder
from tasks.learning.drift import MAX_CLASS_SHIFT, MAX_CONFIDENCE_DROP, MAX_P_VALUE, MAX_ROWS, class_shares, \
    class_shift, feature_drift, mean_confidence
from tasks.models.prediction_log import read_window
from tasks.models.registry import alias_version, champion_info, logged_config, version_uri
from tasks.models.store import use_tracking

DRIFT_EVENT = "catsdogs.drift.detected"
"""The Prefect event a drift check emits when a figure is past its threshold (deployments/prefect.yaml reacts)."""

TRAIN_RESULT_ARTIFACT = "evaluation/train_result.json"
PREDICTIONS_ARTIFACT = "evaluation/predictions.csv"


def resource_id(model_name: str) -> str:
    """The Prefect resource a model's drift events are about (what a deployment trigger matches)."""
    return f"catsdogs.model.{model_name}"


@dataclass(frozen=True)
class Thresholds:
    """When a figure counts as drift (tasks/learning/drift.py has the defaults and why)."""

    max_p_value: float = MAX_P_VALUE
    max_class_shift: float = MAX_CLASS_SHIFT
    max_confidence_drop: float = MAX_CONFIDENCE_DROP
    min_rows: int = 100

    def as_dict(self) -> dict[str, float]:
        return {"max_p_value": self.max_p_value, "max_class_shift": self.max_class_shift,
                "max_confidence_drop": self.max_confidence_drop, "min_rows": float(self.min_rows)}


@dataclass
class Sample:
    """Scored rows: their summarised head inputs (None where none were logged), class probabilities, predicted labels."""

    features: np.ndarray | None
    probabilities: np.ndarray
    indexes: np.ndarray
    description: str
    extra: dict[str, Any]

    def save(self, path: Path) -> Path:
        arrays = {"probabilities": self.probabilities, "indexes": self.indexes}
        if self.features is not None:
            arrays["features"] = self.features
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays, meta=np.array(json.dumps({"description": self.description, **self.extra})))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sample:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(features=saved["features"] if "features" in saved.files else None,
                       probabilities=saved["probabilities"], indexes=saved["indexes"],
                       description=meta.pop("description"), extra=meta)


def rows_sample(rows: Sequence[dict[str, Any]], n_classes: int, description: str, **extra: Any) -> Sample:
    """The prediction log's rows as a sample (features only when every row has them)."""
    probabilities = np.array([row["probabilities"] for row in rows], dtype=np.float64).reshape(-1, n_classes)
    indexes = np.array([row["label_index"] for row in rows], dtype=np.int64)
    features = None
    if rows and all(row.get("features") is not None for row in rows):
        features = np.array([row["features"] for row in rows], dtype=np.float32)
    return Sample(features, probabilities, indexes, description, dict(extra))


# ---------------------------------------------------------------------- the model and its training run


def resolve_model(model_uri: str) -> ChampionInfo:
    """The registered version a `models:/<name>@<alias>` or `models:/<name>/<version>` URI names now."""
    from tasks.models.naming import parse_registry_uri

    parsed = parse_registry_uri(model_uri)
    if parsed is None or parsed[0] == "stage":
        raise ConfigError(f"{model_uri} is not a registered model's alias or version; pass models:/<name>@champion "
                          "or models:/<name>/<version>.")
    kind, name, ref = parsed
    _, client = use_tracking(create=False)
    version = alias_version(client, ref, name) if kind == "alias" else client.get_model_version(name, ref)
    if version is None:
        raise ConfigError(f"No version of {name} has the alias {ref}; run a retrain first.")
    return champion_info(client, version, name)


def training_result(run_id: str | None) -> TrainResult:
    """What the model's training run returned (logged as evaluation/train_result.json)."""
    _, client = use_tracking(create=False)
    if not run_id:
        raise ConfigError("This model version has no MLflow run; it cannot be compared with its training data.")
    with tempfile.TemporaryDirectory(prefix="catsdogs-train-result-") as scratch:
        try:
            path = client.download_artifacts(run_id, TRAIN_RESULT_ARTIFACT, scratch)
        except Exception as error:  # noqa: BLE001 - an MlflowException or OSError: said in one sentence
            raise ConfigError(f"The model's run {run_id} has no {TRAIN_RESULT_ARTIFACT} ({str(error).splitlines()[0]}); "
                              "it was not trained by this pipeline's retrain.") from None
        return TrainResult.model_validate_json(Path(path).read_text())


def baseline_confidence(trained: TrainResult, run_id: str) -> float | None:
    """Mean probability of the predicted class on the test split when the model was trained (its predictions.csv)."""
    import pandas as pd

    path = Path(trained.predictions_path)
    with tempfile.TemporaryDirectory(prefix="catsdogs-predictions-") as scratch:
        if not path.is_file():
            try:
                _, client = use_tracking(create=False)
                path = Path(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, scratch))
            except Exception:  # noqa: BLE001 - without it the confidence is only not compared
                return None
        frame = pd.read_csv(path)
    columns = [column for column in frame.columns if column.startswith("p_")]
    if not columns or frame.empty:
        return None
    values = frame[columns].to_numpy(dtype=np.float64)
    probabilities = np.hstack([1.0 - values, values]) if len(columns) == 1 else values
    return mean_confidence(probabilities)


# ---------------------------------------------------------------------- scoring through the served model


class ScoringModel:
    """The model loaded as a server loads it, its prediction log pointed at a scratch folder this object reads back."""

    def __init__(self, model_uri: str, scratch: Path, batch_size: int = 32) -> None:
        from tasks.models.registry import load_pyfunc

        self.scratch = Path(scratch)
        self.batch_size = batch_size
        self.pyfunc = load_pyfunc(model_uri, prediction_log=str(self.scratch / "log"))
        self.served = self.pyfunc.unwrap_python_model()
        self.classes: ClassMap = self.served.classes

    @property
    def summary(self) -> Any:
        """The served model's summary of its head input (None for a model logged before it had one)."""
        return self.served.prediction_log.summary

    def score(self, paths: Sequence[Path], description: str, **extra: Any) -> Sample:
        """Score image files as a request would; the rows the served model logged for them, as a sample."""
        from tasks.models.scoring import score_table

        log = self.served.prediction_log
        log.flush()
        before = len(read_window(log.settings.folder).rows)
        scored = score_table(self.pyfunc, list(paths), self.batch_size)
        log.flush()
        rows = read_window(log.settings.folder).rows[before:]  # one process, one writer: its rows in order
        errors = sum(1 for error in scored.errors if error)
        return rows_sample(rows, len(self.classes.names), description, errors=errors, **extra)


# ---------------------------------------------------------------------- the two samples


def reference_sample(model: ScoringModel, trained: TrainResult, folder: DataFolder, run_id: str,
                     sample: int = MAX_ROWS, seed: int = 0) -> Sample:
    """The train split's summarised head inputs (at most `sample` images), its class shares and the test baseline."""
    classes = model.classes
    rows = folder.labelled_rows("train")
    if rows.empty:
        raise InputError(f"{folder.root} holds no train images of the model; pass the --data-dir it was trained on.")
    counts = rows["label"].value_counts()
    prior = np.array([counts.get(name, 0) for name in classes.names], dtype=np.float64)
    extra = {"prior": (prior / max(prior.sum(), 1)).tolist(), "baseline_confidence": baseline_confidence(trained, run_id)}
    chosen = rows.sample(n=min(sample, len(rows)), random_state=seed).sort_values("sha256")
    cache_dirs = [trained.backbones[name].feature_cache_dir for name in trained.chosen_members]
    summary = model.summary
    if summary is None:
        return Sample(None, np.zeros((0, len(classes.names))), np.zeros(0, np.int64),
                      "no features: the model was logged before it summarised its head input", extra)
    if not trained.fine_tuned and trained.devices.precision != "int8" and all(Path(d).is_dir() for d in cache_dirs):
        from tasks.learning.feature_spaces import joint_features
        from tasks.learning.shards import shard_index

        indexes = [shard_index(cache_dir) for cache_dir in cache_dirs]
        known = set.intersection(*(set(index.rows) for index in indexes))
        sha256s = [sha for sha in chosen["sha256"] if sha in known]
        if sha256s:
            features = summary(joint_features(cache_dirs, sha256s, indexes))
            names = ", ".join(Path(d).name for d in cache_dirs)
            return Sample(features, np.zeros((0, len(classes.names))), np.zeros(0, np.int64),
                          f"the cached features of {len(sha256s)} train images ({names})", extra)
    cached = folder.monitoring_reference(run_id)
    if cached.is_file():
        kept = Sample.load(cached)
        if kept.features is not None and kept.extra.get("requested") == len(chosen):
            return Sample(kept.features, kept.probabilities, kept.indexes, kept.description, extra)
    why = "fine-tuned" if trained.fine_tuned else "int8" if trained.devices.precision == "int8" else "no feature cache"
    scored = model.score([Path(path) for path in chosen["path"]],
                         f"the model's own features of {len(chosen)} train images ({why})", requested=len(chosen))
    scored.save(cached)
    return Sample(scored.features, scored.probabilities, scored.indexes, scored.description, extra)


def log_sample(log_dir: str | os.PathLike[str], run_id: str, classes: ClassMap, hours: float,
               now: datetime | None = None) -> Sample:
    """The rows this model (its run) logged in the last `hours`; rows of other models and corrupt files are counted."""
    now = now or datetime.now(timezone.utc)
    since = now - timedelta(hours=hours)
    window = read_window(log_dir, since=since, until=now + timedelta(minutes=1))
    for path, why in window.skipped:
        run_logger(__name__).warning("Prediction log %s skipped: %s.", path, why)
    mine = [row for row in window.rows if not run_id or row.get("run_id") == run_id]
    return rows_sample(mine, len(classes.names), f"the prediction log of the last {hours:g} h in {log_dir}",
                       other_rows=len(window.rows) - len(mine), skipped=[f"{path}: {why}" for path, why in window.skipped],
                       cut_short=window.cut_short)


def logged_folder(model_uri: str) -> str | None:
    """Where the model records its predictions, as its config says (None: it records none)."""
    return logged_config(model_uri).get("prediction_log") or None


# ---------------------------------------------------------------------- the figures


def measure(reference: Sample, current: Sample, classes: ClassMap, thresholds: Thresholds, *, seed: int = 0,
            max_rows: int = MAX_ROWS, **identity: Any) -> DriftSummary:
    """The figures of the current sample against the reference, and the verdict with its reasons."""
    prior = np.asarray(reference.extra["prior"], dtype=np.float64)
    baseline = reference.extra.get("baseline_confidence")
    rows = len(current.indexes)
    base = dict(**identity, rows=rows, reference=reference.description, thresholds=thresholds.as_dict(),
                training_shares=dict(zip(classes.names, map(float, prior))),
                reference_rows=0 if reference.features is None else len(reference.features),
                skipped_files=list(current.extra.get("skipped", [])), other_rows=int(current.extra.get("other_rows", 0)),
                baseline_confidence=baseline)
    if rows < thresholds.min_rows:
        return DriftSummary(**base, status="too few rows",
                            reasons=[f"{rows} rows to judge, fewer than the {thresholds.min_rows} a check needs"])
    reasons: list[str] = []
    figures: dict[str, Any] = {}
    if reference.features is not None and current.features is not None and len(reference.features) >= 2:
        found = feature_drift(reference.features, current.features, seed=seed, max_rows=max_rows)
        figures.update(mmd2=found.mmd2, p_value=found.p_value)
        if found.p_value < thresholds.max_p_value:
            reasons.append(f"the head's inputs differ from the training images' (MMD permutation p-value "
                           f"{found.p_value:.3g} < {thresholds.max_p_value:g})")
    shares = class_shares(current.indexes, len(classes.names))
    shift = class_shift(shares, prior)
    figures.update(class_shares=dict(zip(classes.names, map(float, shares))), class_shift=shift)
    if shift >= thresholds.max_class_shift:
        reasons.append(f"the predicted class shares moved {shift:.2f} from the training split's "
                       f"(>= {thresholds.max_class_shift:g})")
    confidence = mean_confidence(current.probabilities)
    figures["mean_confidence"] = confidence
    if baseline is not None:
        drop = float(baseline) - confidence
        figures["confidence_drop"] = drop
        if drop >= thresholds.max_confidence_drop:
            reasons.append(f"the mean confidence fell from {baseline:.2f} to {confidence:.2f} "
                           f"(>= {thresholds.max_confidence_drop:g})")
    return DriftSummary(**base, **figures, status="drift" if reasons else "no drift", reasons=reasons)


def drift_event(summary: DriftSummary) -> dict[str, Any]:
    """The arguments of the Prefect event a drift emits: its name, the model as resource, the figures as payload."""
    figures = {key: getattr(summary, key) for key in ("rows", "p_value", "mmd2", "class_shift", "class_shares",
                                                      "mean_confidence", "baseline_confidence", "confidence_drop")}
    return {"event": DRIFT_EVENT,
            "resource": {"prefect.resource.id": resource_id(summary.model_name),
                         "prefect.resource.name": summary.model_name, "catsdogs.version": summary.version},
            "payload": {**figures, "model_uri": summary.model_uri, "version": summary.version, "source": summary.source,
                        "reasons": summary.reasons, "report": summary.report_url or summary.report_path}}
