"""Register a trained model and move `champion` only through the gate.

Every retrain that trains registers a new version. The alias `champion` moves to it only when
it passes the floor AND beats the current champion by the margin on the *same* test split:
the champion is re-scored on the candidate's split (a callback, usually
`scoring.evaluate_model_uri`), because numbers from different test splits cannot be compared.
Otherwise the new version gets `challenger`. The decision is written on the version (its
verdict in a sentence and a link) and, in full, on the training run.

Two retrains may finish at once. The champion is therefore re-read just before the alias
moves, under the promotion lock (tasks/models/lock.py), and if it changed meanwhile the new
champion is scored and compared again. So exactly one champion remains, and it is never
displaced by a worse model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from tasks.common.errors import ClassesDiffer
from tasks.common.logs import run_logger
from tasks.common.numbers import decimals4
from tasks.common.results import Promotion
from tasks.models.gate import DEFAULT_METRIC, GateDecision, at_chance, decide, finite
from tasks.models.lock import promotion_lock
from tasks.models.naming import (CHAMPION, MODEL_NAME, TAG_BACKBONE, TAG_CONFIG_HASH, TAG_FINGERPRINT,
                                 TAG_LABEL_OVERRIDES)
from tasks.models.registry import (GATE_DECISION_TAG, SERVED_TEST_PREFIX, alias_version, register, run_test_metrics,
                                   version_uri)
from tasks.models.store import run_url, use_tracking

EvaluateFn = Callable[[str], Mapping[str, Any]]
"""evaluate_champion(model_uri) -> metrics of that model on the candidate's test split."""


@dataclass(frozen=True)
class ChampionScore:
    """The champion's metrics on the candidate's test split, and how they were obtained."""

    version: str
    metrics: Mapping[str, Any]
    how: str


def score_champion(evaluate: EvaluateFn | None, client: Any, version: Any, model_name: str) -> ChampionScore:
    """Score the champion version on the candidate's test split (pinned by version, not alias).

    Without a callback, or when the champion cannot be evaluated any more (its files are
    gone), the test metrics its own run logged are used and the reason says so. A champion of
    other classes has no comparable metrics at all (so it stays champion, and the reason says why).
    """
    number = str(version.version)
    if evaluate is None:
        return ChampionScore(number, run_test_metrics(client, version.run_id),
                             "as logged by its own run (no evaluation callback given)")
    try:
        return ChampionScore(number, dict(evaluate(version_uri(number, model_name))),
                             "re-computed on the candidate's test split")
    except ClassesDiffer as exc:  # no number of the champion's means anything here: it stays, and says why
        return ChampionScore(number, {}, f"cannot be compared: {exc}")
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the reasons
        return ChampionScore(number, run_test_metrics(client, version.run_id),
                             f"as logged by its own run (re-evaluation failed: {exc})")


def register_and_gate(run_id: str, model_uri: str, candidate_metrics: Mapping[str, Any], *,
                      evaluate_champion: EvaluateFn | None, floor: float, margin: float,
                      metric: str = DEFAULT_METRIC, dataset_fingerprint: str | None = None,
                      config_hash: str | None = None, model_name: str = MODEL_NAME) -> Promotion:
    """Register the run's model as a new version and move `champion` only through the gate.

    `candidate_metrics` are the candidate's test metrics, best measured by
    `evaluate_model_uri(model_uri, data_dir)`: the yardstick the champion gets too.
    `evaluate_champion(model_uri) -> metrics` scores another version on the candidate's test
    split; None falls back to the champion's logged metrics. The dataset fingerprint and
    config hash default to the run's tags (set by `log_retrain`). Safe to retry: a second call
    for the same run and model reuses its version.
    """
    uri, client = use_tracking()
    run_tags = client.get_run(run_id).data.tags
    tags = {TAG_FINGERPRINT: run_tags.get(TAG_FINGERPRINT, "") if dataset_fingerprint is None else dataset_fingerprint,
            TAG_CONFIG_HASH: run_tags.get(TAG_CONFIG_HASH, "") if config_hash is None else config_hash}
    if TAG_LABEL_OVERRIDES in run_tags:  # why this data differs: a person's corrections, on the version for all to see
        tags[TAG_LABEL_OVERRIDES] = run_tags[TAG_LABEL_OVERRIDES]
    with promotion_lock(uri, model_name) as how:  # sqlite copes badly with concurrent writers
        run_logger(__name__).info("Promotion of %s serialised by the %s.", model_name, how)  # once, though held twice
        version = str(register(client, model_name, run_id, model_uri, tags).version)

    candidate = candidate_metrics.get(metric)
    chance = at_chance(candidate_metrics)
    passes_floor = not chance and finite(candidate) is not None and finite(candidate) >= floor
    # Score the champion outside the lock (it can take minutes); usually nobody else is promoting.
    seen = alias_version(client, CHAMPION, model_name) if passes_floor else None
    score = (score_champion(evaluate_champion, client, seen, model_name)
             if seen is not None and str(seen.version) != version else None)

    with promotion_lock(uri, model_name):
        current = alias_version(client, CHAMPION, model_name)  # re-read: another retrain may have won meanwhile
        if current is not None and str(current.version) == version:
            decision = GateDecision(True, ("already champion (a retried promotion)",), finite(candidate))
        else:
            if passes_floor and current is not None and (score is None or score.version != str(current.version)):
                score = score_champion(evaluate_champion, client, current, model_name)  # compare with the new one
            decision = decide(candidate, score.metrics.get(metric) if score else None, floor=floor, margin=margin,
                              metric=metric, champion_version=str(current.version) if current is not None else None,
                              chance=chance)
            if score is not None and decision.champion_version is not None:
                decision = replace(decision, reasons=decision.reasons + (f"champion {metric} {score.how}",))
            client.set_registered_model_alias(model_name, decision.alias, version)
            if decision.promote and current is not None:
                client.set_model_version_tag(model_name, str(current.version), "gate.superseded_by", version)
        _record(client, uri, run_id, model_name, version, decision, metric, floor, margin, candidate_metrics)
        client.update_model_version(model_name, version, description=version_description(
            run_tags.get(TAG_BACKBONE, ""), candidate_metrics, decision, metric))
    champion_metrics = dict(score.metrics) if score is not None and decision.champion_version else None
    return Promotion(version=version, model_name=model_name, model_uri=version_uri(version, model_name), alias=decision.alias,
                     promoted=decision.promote, reasons=list(decision.reasons), metric=metric,
                     candidate_value=decision.candidate_value, champion_value=decision.champion_value,
                     champion_metrics=champion_metrics, previous_champion_version=decision.champion_version)


def version_description(backbone: str, metrics: Mapping[str, Any], decision: GateDecision, metric: str) -> str:
    """The version's one line in the registry: what it is, how it scored on its test split, what the gate said."""
    shown = [name for name in dict.fromkeys((metric, "roc_auc", "accuracy", "log_loss")) if name in metrics]
    scores = ", ".join(f"{name} {decimals4(metrics[name])}" for name in shown)
    return f"{backbone or 'model'}; test {scores}; gate: {decision.alias}, {'; '.join(decision.reasons[:2])}"


def _record(client: Any, tracking_uri: str, run_id: str, model_name: str, version: str, decision: GateDecision,
            metric: str, floor: float, margin: float, candidate_metrics: Mapping[str, Any]) -> None:
    """The verdict and a link on the version (what the versions table shows); all details on the run."""
    from mlflow.entities import Metric

    measured = [Metric(f"{SERVED_TEST_PREFIX}{key}", float(value), int(time.time() * 1000), 0)
                for key, value in candidate_metrics.items() if finite(value) is not None]
    if measured:
        client.log_batch(run_id, metrics=measured)
    experiment_id = client.get_run(run_id).info.experiment_id
    client.set_model_version_tag(model_name, version, GATE_DECISION_TAG, decision.alias)
    client.set_model_version_tag(model_name, version, "gate.reason", decision.reasons[-1][:500])
    client.set_model_version_tag(model_name, version, "run", run_url(run_id, experiment_id, tracking_uri))
    details = {"gate.decision": decision.alias, "gate.promoted": str(decision.promote).lower(),
               "gate.reasons": "; ".join(decision.reasons), "gate.metric": metric,
               "gate.floor": repr(floor), "gate.margin": repr(margin),
               "gate.candidate_value": repr(decision.candidate_value),
               "gate.champion_value": repr(decision.champion_value),
               "gate.previous_champion": decision.champion_version or "",
               "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "registered_model.name": model_name, "registered_model.version": version}
    for key, value in details.items():
        client.set_tag(run_id, key, value)
    payload = {**asdict(decision), "alias": decision.alias, "version": version, "metric": metric,
               "floor": floor, "margin": margin}
    client.log_text(run_id, json.dumps(payload, indent=2, default=str), "gate/decision.json")
