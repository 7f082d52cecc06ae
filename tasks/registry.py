"""The model registry and its gate: who may become `champion`, and how we know it is better.

Every retrain that trains registers a new version of `cats-vs-dogs` (versions are never
deleted). The alias `champion` moves to the new version only when it passes an absolute
floor AND beats the current champion by a margin on the *same* test split: the champion's
metric is re-computed on the candidate's test split (a callback, usually
`evaluate_model_uri`), because numbers from different test splits cannot be compared.
Otherwise the new version gets the alias `challenger`. The decision and its reasons are
written as version tags and as tags of the training run.

Two retrains may finish at once. The champion is therefore re-read just before the alias
moves, under an exclusive file lock beside the sqlite store, and if it changed in the
meantime the new champion is evaluated and compared again. So exactly one champion remains,
and it is never displaced by a worse model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.errors import ConfigError, InputError
from tasks.tracking import (TAG_CONFIG_HASH, TAG_FINGERPRINT, local_store_dir, scalar_metrics,
                            use_tracking)

MODEL_NAME = "cats-vs-dogs"
"""The registered model every retrain adds a version to."""

CHAMPION = "champion"
"""Alias of the version that serves (`models:/cats-vs-dogs@champion`)."""

CHALLENGER = "challenger"
"""Alias of the latest trained version that did not pass the gate."""

DEFAULT_METRIC = "roc_auc"
LOCK_TIMEOUT_S = 900.0
"""How long a promotion waits for another one to finish before giving up."""

EvaluateFn = Callable[[str], Mapping[str, Any]]
"""evaluate_champion(model_uri) -> metrics of that model on the candidate's test split."""


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate becomes champion, and the reasons a person reads later."""

    promote: bool
    reasons: tuple[str, ...]
    candidate_value: float | None
    champion_value: float | None = None
    champion_version: str | None = None

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def _finite(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/inf values (which can never pass a gate)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def decide(candidate_value: Any, champion_value: Any, *, floor: float, margin: float,
           metric: str = DEFAULT_METRIC, champion_version: str | None = None,
           has_champion: bool | None = None) -> GateDecision:
    """The gate as a pure function (higher metric is better).

    Promote when the candidate reaches `floor` and either no champion exists or the
    candidate beats it by at least `margin` (and strictly, so a tie never churns the alias).
    """
    candidate = _finite(candidate_value)
    champion = _finite(champion_value)
    has_champion = champion_version is not None if has_champion is None else has_champion
    if candidate is None:
        return GateDecision(False, (f"the candidate has no finite {metric}",), None, champion, champion_version)
    if candidate < floor:
        return GateDecision(False, (f"{metric} {candidate:.4f} is below the floor {floor:.4f}",),
                            candidate, champion, champion_version)
    passed = f"{metric} {candidate:.4f} passes the floor {floor:.4f}"
    if not has_champion:
        return GateDecision(True, (passed, "no champion yet: the first version to pass the floor is promoted"),
                            candidate, None, None)
    if champion is None:
        return GateDecision(False, (passed, f"the champion (version {champion_version}) has no comparable "
                                            f"{metric}; it stays champion"), candidate, None, champion_version)
    gain = candidate - champion
    versus = (f"champion version {champion_version} scores {champion:.4f} on the same test split "
              f"(gain {gain:+.4f}, margin {margin:.4f})")
    if gain > 0 and gain >= margin:
        return GateDecision(True, (passed, f"beats the {versus}"), candidate, champion, champion_version)
    return GateDecision(False, (passed, f"does not beat the {versus}"), candidate, champion, champion_version)


# --------------------------------------------------------------------------- the lock


def lock_path(tracking_uri: str, model_name: str = MODEL_NAME) -> Path:
    """The promotion lock file: beside a local store, else per store in the temp folder.

    With a remote tracking server a file lock only serialises promotions on this host;
    retrains on several hosts would need the server side to arbitrate.
    """
    store_dir = local_store_dir(tracking_uri)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
        return store_dir / f".{model_name}.promotion.lock"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"catsdogs-{model_name}-{digest}.promotion.lock"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model_name: str = MODEL_NAME,
                   timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold an exclusive `flock` on the promotion lock file (threads and processes alike).

    Each call opens the file anew, so two threads of one process exclude each other too.
    The kernel drops the lock if the holder dies, so a killed retrain never blocks the next.
    """
    path = lock_path(tracking_uri, model_name)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another promotion holds {path} for over {timeout_s:.0f} s; "
                                       "check for a hung retrain") from None
                time.sleep(0.05)
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- registry reads


def _is_not_found(exc: MlflowException) -> bool:
    """True when MLflow says a model/version/alias is absent (a missing alias comes back as
    INVALID_PARAMETER_VALUE "... alias champion not found"); any other failure propagates."""
    if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
        return True
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def alias_version(client: MlflowClient, alias: str, model_name: str = MODEL_NAME) -> Any | None:
    """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def version_uri(version: str, model_name: str = MODEL_NAME) -> str:
    """A URI pinned to one version (an alias may move while we evaluate it)."""
    return f"models:/{model_name}/{version}"


def _version_metrics(version: Any) -> dict[str, float]:
    """Metrics recorded on a version as `metric.<name>` tags."""
    return {key[len("metric."):]: float(value) for key, value in (version.tags or {}).items()
            if key.startswith("metric.") and _finite(value) is not None}


def champion_summary(model_name: str = MODEL_NAME) -> dict[str, Any] | None:
    """The current champion, for "nothing changed" checks and reports; None when there is none.

    Returns {"version", "run_id", "model_uri", "dataset_fingerprint", "config_hash",
    "metrics": {name: value} (test metrics recorded at registration), "tags"}.
    """
    _, client = use_tracking()
    version = alias_version(client, CHAMPION, model_name)
    if version is None:
        return None
    tags = dict(version.tags or {})
    return {"version": str(version.version), "run_id": version.run_id,
            "model_uri": version_uri(version.version, model_name),
            "dataset_fingerprint": tags.get(TAG_FINGERPRINT, ""),
            "config_hash": tags.get(TAG_CONFIG_HASH, ""),
            "metrics": _version_metrics(version), "tags": tags}


# --------------------------------------------------------------------------- register + gate


def _existing_version(client: MlflowClient, model_name: str, run_id: str, model_uri: str) -> Any | None:
    """A version already registered from this run and model (a retried task must not add one)."""
    try:
        versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    for version in versions:
        if version.source == model_uri or (model_id and getattr(version, "model_id", None) == model_id):
            return version
    return None


def _register(client: MlflowClient, model_name: str, run_id: str, model_uri: str,
              tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version (or return the one a previous attempt made)."""
    existing = _existing_version(client, model_name, run_id, model_uri)
    if existing is not None:
        return existing
    return mlflow.register_model(model_uri, model_name, tags=dict(tags))


@dataclass(frozen=True)
class ChampionScore:
    """The champion's metric on the candidate's test split, and how it was obtained."""

    version: str
    value: float | None
    how: str


def score_champion(evaluate: EvaluateFn | None, version: Any, metric: str, model_name: str) -> ChampionScore:
    """Score the champion version on the candidate's test split (pinned by version, not alias).

    Without a callback, or when the champion cannot be evaluated any more (its files are
    gone), the metric recorded at its registration is used and the reason says so.
    """
    recorded = _version_metrics(version).get(metric)
    number = str(version.version)
    if evaluate is None:
        return ChampionScore(number, recorded, "recorded at its registration (no evaluation callback given)")
    try:
        value = _finite(evaluate(version_uri(number, model_name)).get(metric))
    except Exception as exc:  # fall back, and say so in the reasons
        return ChampionScore(number, recorded, f"recorded at its registration (re-evaluation failed: {exc})")
    return ChampionScore(number, value, "re-computed on the candidate's test split")


def register_and_gate(run_id: str, model_uri: str, candidate_metrics: Mapping[str, Any], *,
                      evaluate_champion: EvaluateFn | None, floor: float, margin: float,
                      metric: str = DEFAULT_METRIC, dataset_fingerprint: str | None = None,
                      config_hash: str | None = None, model_name: str = MODEL_NAME) -> dict[str, Any]:
    """Register the run's model as a new version and move `champion` only through the gate.

    `candidate_metrics` are the candidate's test metrics (train_result["test_metrics"], or
    better `evaluate_model_uri(model_uri, data_dir)`, the same yardstick the champion gets).
    `evaluate_champion(model_uri) -> metrics` scores another version on the candidate's test
    split, e.g. `lambda uri: evaluate_model_uri(uri, data_dir)`; None falls back to the
    champion's recorded metric. The dataset fingerprint and config hash default to the
    run's tags (set by `log_retrain`) and are stored on the version for `champion_summary`.
    Safe to retry: a second call for the same run and model reuses its version.

    Returns {"version", "model_uri" (models:/cats-vs-dogs/<v>), "alias" ("champion" or
    "challenger"), "promoted", "reasons", "metric", "candidate_value", "champion_value",
    "previous_champion_version"}.
    """
    uri, client = use_tracking()
    run_tags = client.get_run(run_id).data.tags
    tags = {TAG_FINGERPRINT: run_tags.get(TAG_FINGERPRINT, "") if dataset_fingerprint is None else dataset_fingerprint,
            TAG_CONFIG_HASH: run_tags.get(TAG_CONFIG_HASH, "") if config_hash is None else config_hash,
            **{f"metric.{key}": repr(value) for key, value in scalar_metrics(candidate_metrics).items()}}
    with promotion_lock(uri, model_name):  # sqlite copes badly with concurrent writers
        version = str(_register(client, model_name, run_id, model_uri, tags).version)

    candidate = candidate_metrics.get(metric)
    passes_floor = _finite(candidate) is not None and _finite(candidate) >= floor
    # Score the champion outside the lock (it can take minutes); usually nobody else is promoting.
    seen = alias_version(client, CHAMPION, model_name) if passes_floor else None
    score = (score_champion(evaluate_champion, seen, metric, model_name)
             if seen is not None and str(seen.version) != version else None)

    with promotion_lock(uri, model_name):
        current = alias_version(client, CHAMPION, model_name)  # re-read: another retrain may have won meanwhile
        if current is not None and str(current.version) == version:
            decision = GateDecision(True, ("already champion (a retried promotion)",), _finite(candidate))
        else:
            if passes_floor and current is not None and (score is None or score.version != str(current.version)):
                score = score_champion(evaluate_champion, current, metric, model_name)  # compare with the new one
            decision = decide(candidate, score.value if score else None, floor=floor, margin=margin, metric=metric,
                              champion_version=str(current.version) if current is not None else None)
            if score is not None and decision.champion_version is not None:
                decision = replace(decision, reasons=decision.reasons + (f"champion {metric} {score.how}",))
            client.set_registered_model_alias(model_name, decision.alias, version)
            if decision.promote and current is not None:
                client.set_model_version_tag(model_name, str(current.version), "gate.superseded_by", version)
        _record(client, run_id, model_name, version, decision, metric, floor, margin)
    return {"version": version, "model_uri": version_uri(version, model_name), "alias": decision.alias,
            "promoted": decision.promote, "reasons": list(decision.reasons), "metric": metric,
            "candidate_value": decision.candidate_value, "champion_value": decision.champion_value,
            "previous_champion_version": decision.champion_version}


def _record(client: MlflowClient, run_id: str, model_name: str, version: str,
            decision: GateDecision, metric: str, floor: float, margin: float) -> None:
    """Write the decision on the version and on the run, where people look for it."""
    tags = {"gate.decision": decision.alias, "gate.promoted": str(decision.promote).lower(),
            "gate.reasons": "; ".join(decision.reasons), "gate.metric": metric,
            "gate.floor": repr(floor), "gate.margin": repr(margin),
            "gate.candidate_value": repr(decision.candidate_value),
            "gate.champion_value": repr(decision.champion_value),
            "gate.previous_champion": decision.champion_version or "",
            "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    for key, value in {**tags, "registered_model.name": model_name,
                       "registered_model.version": version}.items():
        client.set_tag(run_id, key, value)
    payload = {**asdict(decision), "alias": decision.alias, "version": version, "metric": metric,
               "floor": floor, "margin": margin}
    client.log_text(run_id, json.dumps(payload, indent=2, default=str), "gate/decision.json")


# --------------------------------------------------------------------------- evaluation


def _parse_registry_uri(model_uri: str) -> tuple[str, str, str] | None:
    """("alias"|"version"|"stage", model name, ref) for models:/ registry URIs, else None."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return "alias", name, alias
    if "/" in rest:
        name, ref = rest.rsplit("/", 1)
        return ("version" if ref.isdigit() else "stage"), name, ref
    return None  # models:/<model id> (a logged model, not a registered one)


def check_model_uri(model_uri: str) -> None:
    """Raise ConfigError with one actionable sentence when a registry URI points nowhere."""
    parsed = _parse_registry_uri(model_uri)
    if parsed is None:
        return
    kind, name, ref = parsed
    uri, client = use_tracking()
    hint = "run the retrain flow first or pass --model-uri"
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise ConfigError(f"Registered model '{name}' does not exist in the MLflow store {uri}; {hint}.") from None
        raise
    if kind == "alias" and alias_version(client, ref, name) is None:
        raise ConfigError(f"No model version has alias '{ref}' in registered model '{name}'; {hint}.")
    if kind == "version":
        try:
            client.get_model_version(name, ref)
        except MlflowException as exc:
            if _is_not_found(exc):
                raise ConfigError(f"Registered model '{name}' has no version {ref}; {hint}.") from None
            raise


def load_pyfunc(model_uri: str) -> Any:
    """Load a pyfunc model, turning "not there" into one sentence a person can act on."""
    use_tracking()
    check_model_uri(model_uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"Cannot load the model '{model_uri}' ({str(exc).splitlines()[0]}); "
                          "check the URI or pass --model-uri.") from None


def evaluate_model_uri(model_uri: str, data_dir: str | Path, *, split: str = "test",
                       batch_size: int = 64) -> dict[str, float]:
    """Metrics of any pyfunc model URI on `data_dir`'s arranged split, through the serving code.

    This is the gate's yardstick: champion and candidate are scored on the same images
    (the manifest's split, as tasks/evaluate.py reads it) by the decode/resize path that
    serves users, with the metric definitions of tasks/evaluate.py. Images that fail to
    decode are counted in `n_errors` and left out. Returns the scalar metrics
    ("accuracy", "roc_auc" (NaN with one class), "log_loss", per-class precision/recall/F1,
    ...) plus "n_images" and "n_errors".
    """
    import pandas as pd

    from tasks.evaluate import binary_metrics, split_rows

    data_dir = Path(data_dir)
    rows = split_rows(data_dir, split)
    if rows.empty:
        raise InputError(f"No arranged {split} images in {data_dir / 'manifest.parquet'}; run prepare_data on it first.")
    model = load_pyfunc(model_uri)
    paths = [data_dir / relative for relative in rows["arranged_path"]]
    frames = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        frames.append(model.predict(pd.DataFrame({"image": [path.read_bytes() for path in chunk]})))
    scored = pd.concat(frames, ignore_index=True)
    ok = (scored["error"] == "").to_numpy()
    if not ok.any():
        raise InputError(f"None of the {len(paths)} {split} images in {data_dir} could be scored by {model_uri}.")
    metrics = binary_metrics(rows["y"].to_numpy()[ok], scored["p_dog"].to_numpy()[ok])
    values = {key: float(value) if value is not None else float("nan") for key, value in metrics.items()
              if not isinstance(value, list) and key != "threshold"}
    return {**values, "n_images": float(ok.sum()), "n_errors": float((~ok).sum())}
