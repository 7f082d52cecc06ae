"""The MLflow model registry: versions, aliases, and loading a model a URI names.

Every retrain that trains registers a new version of `cats-vs-dogs` (versions are never
deleted); the alias `champion` moves only through the gate (tasks/models/promotion.py). A
version carries few tags, the ones people read in the versions table: the dataset
fingerprint and config hash it was built from, the gate's verdict in a sentence, and a link
to its run, which holds everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.common.errors import ConfigError
from tasks.common.results import ChampionInfo
from tasks.models.gate import finite
from tasks.models.naming import CHAMPION, MODEL_NAME, TAG_CONFIG_HASH, TAG_FINGERPRINT, parse_registry_uri
from tasks.models.store import use_tracking

GATE_DECISION_TAG = "gate.decision"
"""Version tag: "champion", "challenger", or "incomplete" for a registration a killed run left."""


def _is_not_found(exc: Any) -> bool:
    """True when MLflow says a model/version/alias is absent (a missing alias comes back as
    INVALID_PARAMETER_VALUE "... alias champion not found"); any other failure propagates."""
    if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
        return True
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def alias_version(client: Any, alias: str, model_name: str = MODEL_NAME) -> Any | None:
    """The ModelVersion holding `alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def version_uri(version: str, model_name: str = MODEL_NAME) -> str:
    """A URI pinned to one version (an alias may move while we evaluate it)."""
    return f"models:/{model_name}/{version}"


def search_versions(client: Any, filter_string: str) -> list[Any]:
    """Model versions matching `filter_string` ([] when the registered model does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(filter_string))
    except MlflowException as exc:
        if _is_not_found(exc):
            return []
        raise


SERVED_TEST_PREFIX = "served_test_"
"""Run metrics the gate logs: the candidate's test metrics through the served model (its yardstick)."""


def run_test_metrics(client: Any, run_id: str | None) -> dict[str, float]:
    """What a version scored on its own test split: the gate's `served_test_*`, else training's `test_*`."""
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except Exception:  # noqa: BLE001 - a deleted run only costs the report its numbers
        return {}
    for prefix in (SERVED_TEST_PREFIX, "test_"):
        found = {key[len(prefix):]: value for key, value in metrics.items()
                 if key.startswith(prefix) and finite(value) is not None}
        if found:
            return found
    return {}


def champion_info(client: Any, version: Any, model_name: str = MODEL_NAME) -> ChampionInfo:
    tags = dict(version.tags or {})
    return ChampionInfo(version=str(version.version), run_id=version.run_id,
                        model_uri=version_uri(version.version, model_name),
                        dataset_fingerprint=tags.get(TAG_FINGERPRINT, ""), config_hash=tags.get(TAG_CONFIG_HASH, ""),
                        metrics=run_test_metrics(client, version.run_id))


def champion_summary(model_name: str = MODEL_NAME) -> ChampionInfo | None:
    """The current champion, for reports; None when there is none."""
    _, client = use_tracking()
    version = alias_version(client, CHAMPION, model_name)
    return None if version is None else champion_info(client, version, model_name)


def versions_built_from(fingerprint: str, config_hash: str, model_name: str = MODEL_NAME) -> list[ChampionInfo]:
    """Registered versions trained on this exact data with this exact config, newest first.

    Retraining would only register an identical twin of one of them, champion or not.
    """
    if not fingerprint or not config_hash:
        return []
    _, client = use_tracking()
    found = search_versions(client, f"name='{model_name}' and tags.{TAG_FINGERPRINT}='{fingerprint}' "
                                    f"and tags.{TAG_CONFIG_HASH}='{config_hash}'")
    found = [version for version in found if (version.tags or {}).get(GATE_DECISION_TAG) != "incomplete"]
    return [champion_info(client, version, model_name)
            for version in sorted(found, key=lambda version: int(version.version), reverse=True)]


def existing_version(client: Any, model_name: str, run_id: str, model_uri: str) -> Any | None:
    """A version already registered from this run and model (a retried task must not add one)."""
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    for version in search_versions(client, f"name='{model_name}' and run_id='{run_id}'"):
        if version.source == model_uri or (model_id and getattr(version, "model_id", None) == model_id):
            return version
    return None


def register(client: Any, model_name: str, run_id: str, model_uri: str, tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version (or return the one a previous attempt made)."""
    import mlflow

    existing = existing_version(client, model_name, run_id, model_uri)
    if existing is not None:
        return existing
    return mlflow.register_model(model_uri, model_name, tags=dict(tags))


# --------------------------------------------------------------------------- URIs users pass


def check_model_uri(model_uri: str) -> None:
    """Raise ConfigError with one actionable sentence when a registry URI points nowhere.

    Never creates a store: pointing at one that does not exist is an error too.
    """
    from mlflow.exceptions import MlflowException

    parsed = parse_registry_uri(model_uri)
    uri, client = use_tracking(create=False)
    if parsed is None:
        return
    kind, name, ref = parsed
    hint = "run a retrain first (python -m flows.retrain) or pass --model-uri"
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


def load_pyfunc(model_uri: str, engine: str = "auto", prediction_log: bool | str = True) -> Any:
    """Load a pyfunc model, turning "not there" into one sentence a person can act on.

    `engine` "auto" runs it on the engine it was logged with; "keras" or "openvino" override it
    (what `MLFLOW_PYFUNC_INFERENCE_CONFIG='{"engine": ...}'` does for a server). `prediction_log`
    True records its rows where its config says (batch prediction is traffic too), False records
    none (the gate's scoring, explanations), a folder records them there.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_model_uri(model_uri)
    config: dict[str, Any] = {} if engine == "auto" else {"engine": engine}
    if prediction_log is not True and "prediction_log" in logged_config(model_uri):
        config["prediction_log"] = prediction_log or None
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config=config or None)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"Cannot load the model '{model_uri}' ({str(exc).splitlines()[0]}); "
                          "check the URI or pass --model-uri.") from None


def logged_config(model_uri: str) -> dict[str, Any]:
    """The settings a logged pyfunc model was logged with, read from its MLmodel file alone (no Keras, no weights).

    {} where they cannot be read here (`load_pyfunc` says why in one sentence).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_model_uri(model_uri)
    try:
        flavor = mlflow.models.Model.load(model_uri).flavors.get("python_function", {})
    except (MlflowException, OSError):
        return {}
    return dict(flavor.get("config") or {})  # the pyfunc flavor keeps model_config as "config"


def logged_classes(model_uri: str) -> list[str] | None:
    """The class names a logged pyfunc model answers; None for a model logged before class maps were recorded (cats
    vs. dogs)."""
    classes = logged_config(model_uri).get("classes")
    return [str(name) for name in classes] if classes else None
