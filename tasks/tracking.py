"""MLflow tracking: where runs live and what one retrain leaves behind for people to read.

One retrain = one parent run (config, dataset, validation, test metrics, plots, comparison,
the pyfunc model) with one child run per backbone (its validation metrics and per-epoch
curves). The store is `MLFLOW_TRACKING_URI`, by default a sqlite file `mlruns/mlflow.db` in
the working directory with artifacts in folders beside it, so the whole store is one folder
that `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` can browse. A tracking
server URL works the same way (the server then decides where artifacts go).

Every public function resolves the URI at call time (never at import), so a process that
changes `MLFLOW_TRACKING_URI` (tests, a Prefect worker) is always honoured.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "cats-vs-dogs"
"""Experiment that holds every retrain (and every skipped retrain)."""

DEFAULT_STORE_DIR = "mlruns"
"""Folder (relative to the working directory) of the default sqlite store and its artifacts."""

DB_NAME = "mlflow.db"

UI_URL_ENV = "MLFLOW_UI_URL"
"""Where people browse a local store (e.g. `mlflow ui` on http://127.0.0.1:5000); used for run links."""

DEFAULT_UI_URL = "http://127.0.0.1:5000"
"""`mlflow ui`'s default address, used for run links when the store is a local file."""

CONFIG_HASH_IGNORED: tuple[str, ...] = (
    "source", "data_dir", "floor", "margin", "force", "experiment", "output_dir",
)
"""Config keys that do not change the trained model, so they are left out of `config_hash`
(the data itself is covered by the dataset fingerprint)."""

MAX_PARAM_LENGTH = 6000
_METRIC_BATCH = 1000

# Tag keys shared with tasks/registry.py and engineer G's retrain flow.
TAG_KIND = "catsdogs.kind"  # "retrain" | "skipped"
TAG_FINGERPRINT = "dataset_fingerprint"
TAG_CONFIG_HASH = "config_hash"
TAG_BACKBONE = "chosen_backbone"
TAG_SKIP_REASON = "skip_reason"


# --------------------------------------------------------------------------- the store


def resolve_tracking_uri() -> str:
    """The tracking URI: `MLFLOW_TRACKING_URI` if set, else the sqlite store in ./mlruns/.

    For a local sqlite store the folder of the database is created here (sqlite cannot
    create it), at call time, never at import.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = "sqlite:///" + str((Path.cwd() / DEFAULT_STORE_DIR / DB_NAME).resolve())
    store_dir = local_store_dir(uri)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The folder that holds a local store (sqlite db or file store); None for a server URL.

    `sqlite:///rel/mlflow.db` is relative to the working directory and
    `sqlite:////abs/mlflow.db` is absolute, as SQLAlchemy reads them.
    """
    if uri.startswith("sqlite:///"):
        path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path or path == ":memory:":
            return None
        return Path(path).expanduser().resolve().parent
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" and uri:
        return Path(uri).expanduser().resolve()
    return None


def use_tracking() -> tuple[str, MlflowClient]:
    """Point MLflow's fluent API at the resolved URI and return it with a client for it."""
    uri = resolve_tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return uri, MlflowClient(tracking_uri=uri)


def _slug(name: str) -> str:
    """A folder-safe form of an experiment name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
    if slug != name:
        slug = f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug


def experiment_artifact_location(uri: str, name: str) -> str | None:
    """Artifact folder for a new experiment: beside the sqlite db, or None to let MLflow decide.

    Without it MLflow's sqlite store puts artifacts under `./mlruns` of whatever directory the
    process runs in, and `mlflow server` defaults to `./mlartifacts`; both scatter one store.
    """
    store_dir = local_store_dir(uri)
    if store_dir is None or not uri.startswith("sqlite:"):
        return None
    return (store_dir / _slug(name)).as_uri()


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """The id of experiment `name`, created (artifacts beside the db) or restored when needed.

    Two retrains may create it at the same moment; the loser of that race just reads it.
    """
    uri, client = use_tracking()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=experiment_artifact_location(uri, name))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def run_url(run_id: str, experiment_id: str, tracking_uri: str | None = None) -> str:
    """A link to the run in the MLflow UI.

    A tracking server serves its own UI; a local store is browsed with `mlflow ui`, whose
    address is `MLFLOW_UI_URL` when set, else its default http://127.0.0.1:5000.
    """
    uri = tracking_uri or resolve_tracking_uri()
    base = os.environ.get(UI_URL_ENV) or (uri if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# --------------------------------------------------------------------------- small helpers


def config_hash(config: Mapping[str, Any] | Any, ignore: tuple[str, ...] = CONFIG_HASH_IGNORED) -> str:
    """sha256 of the training-relevant config, for "nothing changed" checks.

    A TrainConfig/RetrainConfig hashes itself (`config.config_hash()`: its training fields
    only), so this equals `train_result["config_hash"]`. A plain dict is reduced to the
    TrainConfig fields when flows.config is importable, else to all keys but `ignore`
    (where the data comes from, gate thresholds, `force`: none of them changes the model).
    """
    if hasattr(config, "config_hash"):
        return str(config.config_hash())
    try:
        from flows.config import TrainConfig

        fields = set(TrainConfig.model_fields)
    except ImportError:  # pragma: no cover - tasks used without the flows package
        fields = None
    relevant = {key: value for key, value in dict(config).items()
                if (key in fields if fields is not None else key not in ignore)}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; lists stay values (rendered as JSON by callers)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    """A param as text: JSON for lists/None/bools so they read back unambiguously."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_LENGTH]


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric entries of a metrics dict (confusion matrices etc. are skipped)."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def prefect_tags(prefect_context: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that link a run to its Prefect flow run (id, name, flow, deployment, UI link).

    Taken from `prefect_context` when given (keys flow_run_id, flow_run_name, flow_name,
    deployment_name, flow_run_url), else read from `prefect.runtime` when called inside a
    flow run; outside Prefect this is empty.
    """
    context = dict(prefect_context or {})
    if not context:
        try:
            from prefect.runtime import deployment, flow_run
        except ImportError:  # pragma: no cover - prefect is a dependency
            return {}
        if flow_run.id is None:
            return {}
        context = {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name,
                   "flow_name": flow_run.flow_name, "deployment_name": deployment.name,
                   "flow_run_url": flow_run.ui_url}
    tags = {}
    for key in ("flow_run_id", "flow_run_name", "flow_name", "deployment_name", "flow_run_url"):
        value = context.get(key)
        if value is None or str(value).startswith("None/"):  # an unset PREFECT_UI_URL
            continue
        tags[f"prefect.{key}"] = str(value)
    return tags


def _log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (),
               params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Log many values in few requests (MLflow caps a batch at 1000 metrics / 100 params)."""
    param_list = [Param(key, _param_value(value)) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    for start in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[start:start + 100])
    for start in range(0, len(tag_list), 100):
        client.log_batch(run_id, tags=tag_list[start:start + 100])
    metric_list = list(metrics)
    for start in range(0, len(metric_list), _METRIC_BATCH):
        client.log_batch(run_id, metrics=metric_list[start:start + _METRIC_BATCH])


def _log_json(client: MlflowClient, run_id: str, payload: Any, artifact_file: str) -> None:
    """Log a dict as a JSON artifact; paths and numpy scalars are written as text."""
    client.log_text(run_id, json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _existing(path: Any) -> Path | None:
    """A path from a summary dict if it exists on disk, else None (optional outputs)."""
    if not path:
        return None
    candidate = Path(path)
    return candidate if candidate.exists() else None


# --------------------------------------------------------------------------- history curves


def history_files(history_paths: Any, backbones: list[str], chosen: str) -> list[tuple[str, str, Path]]:
    """(backbone, phase, file) for every history file in `train_result["history_paths"]`.

    train_model writes {"head:<backbone>": json, "fine_tune": json}; other nestings
    ({backbone: {phase: file}}, flat names like "resnet50_fine_tune") work too: the backbone
    and the phase ("head" or "fine_tune") are read from the keys and the file name, and the
    chosen backbone is the default (fine-tuning only ever runs on it).
    """
    found: list[tuple[str, str, Path]] = []

    def walk(node: Any, keys: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, keys + (str(key),))
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, keys)
        elif node:
            path = Path(node)
            if path.is_file():
                words = " ".join(keys + (path.stem,)).lower()
                backbone = next((k for k in keys if k in backbones), None) or next(
                    (b for b in sorted(backbones, key=len, reverse=True) if b.lower() in words), chosen)
                phase = "fine_tune" if re.search(r"fine|finetun|\bft\b", words) else "head"
                found.append((backbone, phase, path))

    walk(history_paths, ())
    return found


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """{epoch (1-based): {metric: value}} from a Keras History JSON or a CSVLogger file."""
    if path.suffix.lower() == ".json":
        history = json.loads(path.read_text())
        epochs: dict[int, dict[str, float]] = {}
        for key, values in history.items():
            for index, value in enumerate(values if isinstance(values, list) else []):
                epochs.setdefault(index + 1, {})[key] = value
        return epochs
    import pandas as pd

    frame = pd.read_csv(path)
    numbers = frame["epoch"].astype(int) + 1 if "epoch" in frame.columns else pd.Series(range(1, len(frame) + 1))
    columns = [c for c in frame.columns if c != "epoch" and pd.api.types.is_numeric_dtype(frame[c])]
    return {int(epoch): {c: frame[c].iloc[i] for c in columns} for i, epoch in enumerate(numbers)}


def history_metrics(path: Path, phase: str) -> list[Metric]:
    """Per-epoch metrics keyed `<phase>.<name>` (e.g. head.val_loss) with step = epoch (1-based)."""
    timestamp = _now_ms()
    metrics = []
    for epoch, values in sorted(read_history(path).items()):
        for key, value in values.items():
            number = _finite_float(value)
            if number is not None:
                metrics.append(Metric(f"{phase}.{key}", number, timestamp, epoch))
    return metrics


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------- logging a retrain


def dataset_logging(prepare_summary: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Params and metrics that describe the dataset: fingerprint, layout, counts per split/class."""
    params = {"data.fingerprint": prepare_summary.get("fingerprint", ""),
              "data.layout": prepare_summary.get("layout", "")}
    metrics: dict[str, float] = {}
    for split, per_class in (prepare_summary.get("counts") or {}).items():
        for label, count in per_class.items():
            metrics[f"data.{split}.{label}"] = float(count)
            params[f"data.{split}.{label}"] = int(count)
        metrics[f"data.{split}.total"] = float(sum(per_class.values()))
    for key in ("unlabelled", "quarantined"):
        if key in prepare_summary:
            metrics[f"data.{key}"] = float(prepare_summary[key])
    for reason, count in (prepare_summary.get("quarantine_reasons") or {}).items():
        metrics[f"data.quarantined.{reason}"] = float(count)
    return params, metrics


def validation_metrics(train_result: Mapping[str, Any]) -> dict[str, float]:
    """Validation metrics of the shipped model (`val_*`), else those of the chosen backbone's head."""
    saved = train_result.get("val_metrics")
    if saved:
        return scalar_metrics({key: value for key, value in saved.items() if key != "threshold"}, "val_")
    chosen = (train_result.get("backbones") or {}).get(train_result.get("chosen_backbone")) or {}
    return {key: value for key, value in scalar_metrics(chosen).items() if key.startswith("val_")}


def _log_dataset_artifacts(run_id: str, client: MlflowClient, prepare_summary: Mapping[str, Any]) -> None:
    """The prepare summary as JSON, the GX validation result and the Data Docs site."""
    _log_json(client, run_id, prepare_summary, "data/prepare_summary.json")
    paths = prepare_summary.get("paths") or {}
    result = _existing(paths.get("validation_result"))
    if result is not None and result.is_file():
        client.log_artifact(run_id, str(result), "data/validation")
    docs = _existing(paths.get("data_docs"))
    if docs is not None:
        docs_dir = docs if docs.is_dir() else docs.parent
        client.log_artifacts(run_id, str(docs_dir), "data/validation/data_docs")


def _log_training_artifacts(run_id: str, client: MlflowClient, train_result: Mapping[str, Any]) -> None:
    """Plots, the backbone comparison, test predictions and the full test metrics as JSON."""
    for name, plot in (train_result.get("plots") or {}).items():
        path = _existing(plot)
        if path is not None:
            client.log_artifact(run_id, str(path), "plots")
    for key, folder in (("comparison_path", "evaluation"), ("predictions_path", "evaluation")):
        path = _existing(train_result.get(key))
        if path is not None:
            client.log_artifact(run_id, str(path), folder)
    _log_json(client, run_id, train_result.get("test_metrics") or {}, "evaluation/test_metrics.json")
    _log_json(client, run_id, train_result, "evaluation/train_result.json")


def _log_backbone_runs(client: MlflowClient, experiment_id: str, parent_id: str,
                       train_result: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, str]:
    """One child run per backbone: its validation metrics and its head/fine-tune curves."""
    backbones = dict(train_result.get("backbones") or {})
    chosen = str(train_result.get("chosen_backbone") or "")
    names = list(backbones) or ([chosen] if chosen else [])
    curves = history_files(train_result.get("history_paths"), names, chosen)
    child_ids: dict[str, str] = {}
    for name in names:
        child = client.create_run(experiment_id, run_name=name, tags={
            **tags, "mlflow.parentRunId": parent_id, "backbone": name,
            "chosen": str(name == chosen).lower()})
        metrics = [Metric(key, value, _now_ms(), 0)
                   for key, value in scalar_metrics(backbones.get(name) or {}).items()]
        for backbone, phase, path in curves:
            if backbone == name:
                metrics.extend(history_metrics(path, phase))
                client.log_artifact(child.info.run_id, str(path), "history")
        _log_batch(client, child.info.run_id, metrics=metrics,
                   params={"backbone": name, "input_size": train_result.get("input_size")})
        client.set_terminated(child.info.run_id, "FINISHED")
        child_ids[name] = child.info.run_id
    return child_ids


def log_pyfunc_model(train_result: Mapping[str, Any], *, name: str = "model") -> Any:
    """Log the trained `.keras` file as the pyfunc serving model in the active run.

    Signature and input example come from tasks/serving.py; the `tasks` package travels as
    code so `mlflow models serve` can load it anywhere; requirements are pinned explicitly
    (inferring them would load TensorFlow in a subprocess). Returns MLflow's ModelInfo.
    """
    from tasks import serving

    input_size = train_result.get("input_size")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=serving.CatsDogsModel(),
        artifacts={serving.KERAS_ARTIFACT: str(train_result["model_path"])},
        signature=serving.model_signature(),
        input_example=serving.input_example(),
        code_paths=[serving.tasks_code_path()],
        pip_requirements=serving.pip_requirements(),
        model_config={"input_size": int(input_size)} if input_size else None,
    )


def log_retrain(prepare_summary: Mapping[str, Any], train_result: Mapping[str, Any],
                config: Mapping[str, Any] | Any, *, experiment: str = DEFAULT_EXPERIMENT,
                prefect_context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record one retrain in MLflow: a parent run, a child run per backbone, and the model.

    Parent run: the config as params, the dataset (fingerprint, layout, counts per split and
    class as params and metrics, `data/prepare_summary.json`), the Great Expectations result
    and Data Docs (`data/validation/`), test metrics (`test_*`, plus the full dict with the
    confusion matrix as `evaluation/test_metrics.json`), the validation metrics of the chosen
    backbone (`val_*`), plots (`plots/`), the comparison table and test predictions
    (`evaluation/`), tags (`dataset_fingerprint`, `config_hash`, `chosen_backbone`,
    `prefect.*` links to the flow run) and the pyfunc model (`model`, with signature and
    input example). A failure mid-way marks the run FAILED, never half-FINISHED.

    Returns {"run_id", "experiment_id", "model_uri" (models:/<model id>, the URI to register),
    "model_id", "run_url", "child_run_ids": {backbone: run id}, "tracking_uri",
    "dataset_fingerprint", "config_hash"}.
    """
    uri, client = use_tracking()
    experiment_id = ensure_experiment(experiment)
    fingerprint = str(prepare_summary.get("fingerprint") or train_result.get("data_fingerprint") or "")
    config_digest = str(train_result.get("config_hash") or config_hash(config))
    config = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    chosen = str(train_result.get("chosen_backbone") or "")
    tags = {TAG_KIND: "retrain", TAG_FINGERPRINT: fingerprint, TAG_CONFIG_HASH: config_digest,
            TAG_BACKBONE: chosen, **prefect_tags(prefect_context)}
    run_name = tags.get("prefect.flow_run_name") or f"retrain-{fingerprint[:8] or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"

    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        data_params, data_metrics = dataset_logging(prepare_summary)
        metrics = {**data_metrics, **scalar_metrics(train_result.get("test_metrics") or {}, "test_"),
                   **validation_metrics(train_result)}
        params = {**flatten(config), **data_params,
                  "resolved.input_size": train_result.get("input_size"), "resolved.backbone": chosen}
        _log_batch(client, run_id, params=params,
                   metrics=[Metric(key, value, _now_ms(), 0) for key, value in metrics.items()])
        client.set_tag(run_id, "mlflow.note.content", _run_note(prepare_summary, train_result, chosen))
        _log_dataset_artifacts(run_id, client, prepare_summary)
        _log_training_artifacts(run_id, client, train_result)
        child_ids = _log_backbone_runs(client, experiment_id, run_id, train_result,
                                       {key: value for key, value in tags.items() if key != TAG_KIND})
        model_info = log_pyfunc_model(train_result)
    return {"run_id": run_id, "experiment_id": experiment_id, "model_uri": model_info.model_uri,
            "model_id": getattr(model_info, "model_id", None), "run_url": run_url(run_id, experiment_id, uri),
            "child_run_ids": child_ids, "tracking_uri": uri, "dataset_fingerprint": fingerprint,
            "config_hash": config_digest}


def _run_note(prepare_summary: Mapping[str, Any], train_result: Mapping[str, Any], chosen: str) -> str:
    """A short markdown description shown at the top of the run page."""
    test = scalar_metrics(train_result.get("test_metrics") or {})
    counts = prepare_summary.get("counts") or {}
    lines = [f"Retrain on dataset `{str(prepare_summary.get('fingerprint', ''))[:12]}`, "
             f"chosen backbone **{chosen}**.", "", "| split | cat | dog |", "|---|---|---|"]
    lines += [f"| {split} | {c.get('cat', 0)} | {c.get('dog', 0)} |" for split, c in counts.items()]
    lines += ["", "Test: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(test.items()))]
    return "\n".join(lines)


def log_skipped_run(reason: str, fingerprint: str, config_hash: str, *,
                    experiment: str = DEFAULT_EXPERIMENT,
                    prefect_context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record a retrain that stopped early ("nothing changed"): a short FINISHED run.

    Tags `catsdogs.kind=skipped`, `skip_reason`, `dataset_fingerprint`, `config_hash` and the
    Prefect links, so the history of scheduled runs stays complete in the UI.
    Returns {"run_id", "experiment_id", "run_url", "tracking_uri"}.
    """
    uri, client = use_tracking()
    experiment_id = ensure_experiment(experiment)
    tags = {TAG_KIND: "skipped", TAG_SKIP_REASON: reason, TAG_FINGERPRINT: fingerprint,
            TAG_CONFIG_HASH: config_hash, "mlflow.note.content": f"Skipped: {reason}",
            **prefect_tags(prefect_context)}
    run_name = tags.get("prefect.flow_run_name") or f"skipped-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"run_id": run.info.run_id, "experiment_id": experiment_id,
            "run_url": run_url(run.info.run_id, experiment_id, uri), "tracking_uri": uri}
