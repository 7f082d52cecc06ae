"""MLflow tracking: what one retrain leaves behind for people to read.

One retrain = one parent run (config, dataset, validation, test metrics, plots, comparison,
the pyfunc model) with one child run per backbone (its validation metrics and per-epoch
curves). The manifest is logged as an MLflow dataset per split, so a run page shows which
data it came from. Where the store is and how it is made ready: tasks/models/store.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.common.processes import ProcessId
from tasks.common.results import MlflowRun, PrepareSummary, QualitySummary, TrainResult
from tasks.data.datafolder import DataFolder
from tasks.models.naming import (
    DEFAULT_EXPERIMENT,
    MODEL_NAME,
    TAG_BACKBONE,
    TAG_CONFIG_HASH,
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_LABEL_OVERRIDES,
    TAG_SKIP_REASON,
)
from tasks.models.report import int8_sentence
from tasks.models.store import ensure_experiment, run_url, use_tracking

MAX_PARAM_LENGTH = 6000
_METRIC_BATCH = 1000


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


def owner_tags() -> dict[str, str]:
    """`catsdogs.owner.*`: the process that writes the run, set when the run starts.

    A run whose process is killed stays RUNNING; with its owner recorded the next retrain can
    prove that process dead and mark the run FAILED (tasks/models/reconcile.py).
    """
    return ProcessId.current().labels()


def log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (),
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


def log_json(client: MlflowClient, run_id: str, payload: Any, artifact_file: str) -> None:
    """Log a dict as a JSON artifact; paths and numpy scalars are written as text."""
    client.log_text(run_id, json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)


def now_ms() -> int:
    return int(time.time() * 1000)


def _existing(path: Any) -> Path | None:
    """A path from a summary dict if it exists on disk, else None (optional outputs)."""
    if not path:
        return None
    candidate = Path(path)
    return candidate if candidate.exists() else None


# --------------------------------------------------------------------------- history curves


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """{epoch (1-based): {metric: value}} from a Keras History JSON (what train_model writes)."""
    epochs: dict[int, dict[str, float]] = {}
    for key, values in json.loads(Path(path).read_text()).items():
        for index, value in enumerate(values):
            epochs.setdefault(index + 1, {})[key] = value
    return epochs


def history_metrics(path: Path, phase: str) -> list[Metric]:
    """Per-epoch metrics keyed `<phase>.<name>` (e.g. head.val_loss) with step = epoch (1-based)."""
    timestamp = now_ms()
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


def dataset_logging(data: PrepareSummary) -> tuple[dict[str, Any], dict[str, float]]:
    """Params and metrics that describe the dataset: fingerprint, layout, counts per split/class."""
    params: dict[str, Any] = {"data.fingerprint": data.fingerprint, "data.layout": data.layout,
                              "data.classes": ",".join(data.classes)}
    metrics: dict[str, float] = {}
    for split, per_class in data.counts.items():
        for label, count in per_class.items():
            metrics[f"data.{split}.{label}"] = float(count)
            params[f"data.{split}.{label}"] = int(count)
        metrics[f"data.{split}.total"] = float(sum(per_class.values()))
    metrics["data.unlabelled"] = float(data.unlabelled)
    metrics["data.quarantined"] = float(data.quarantined)
    for reason, count in data.quarantine_reasons.items():
        metrics[f"data.quarantined.{reason}"] = float(count)
    if data.label_overrides:
        params["data.label_overrides.digest"] = data.label_overrides.digest
        params["data.label_overrides.files"] = data.label_overrides.files
        metrics["data.relabelled"] = float(data.label_overrides.relabelled)
        metrics["data.excluded"] = float(data.label_overrides.excluded)
    return params, metrics


QUALITY_METRICS = ("label_issues", "near_duplicates", "leaked_test_images", "leaked_validation_images", "outliers",
                   "images")
"""QualitySummary fields logged as `quality.<field>` metrics."""


def quality_metrics(quality: QualitySummary | None) -> dict[str, float]:
    """`quality.label_issues`, `quality.near_duplicates`, `quality.leaked_test_images`, ...: the audit's counts."""
    if quality is None:
        return {}
    return {f"quality.{name}": float(getattr(quality, name)) for name in QUALITY_METRICS}


def _log_quality_artifacts(run_id: str, client: MlflowClient, quality: QualitySummary | None) -> None:
    """The audit's CSV (the one a person fills and passes back as labels.csv) and its checks, under `data/quality/`."""
    if quality is None:
        return
    for path, folder in ((quality.csv, "data/quality"), (quality.checks, "data/quality/checks")):
        found = _existing(path)
        if found is not None:
            client.log_artifact(run_id, str(found), folder)


def log_datasets(data: PrepareSummary, source: str, model_name: str = MODEL_NAME) -> None:
    """The manifest as one MLflow dataset per split (`<model name>-<split>`, digest = the data fingerprint), in the
    active run.

    The run page's *Datasets* section then names the data it trained and was tested on, and
    the logged model inherits that lineage.
    """
    import warnings

    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    from tasks.data.acquire import source_uri

    uri = source_uri(source)
    manifest = pd.read_parquet(data.paths.manifest, columns=["sha256", "label", "split", "status", "arranged_path"])
    for split in data.counts:
        rows = manifest[(manifest["split"] == split) & (manifest["status"] == "ok")].reset_index(drop=True)
        with warnings.catch_warnings():  # MLflow registers two equal local-file source types and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = from_pandas(rows, source=uri, name=f"{model_name}-{split}", digest=data.fingerprint[:16])
        mlflow.log_input(dataset, context=split)


def _log_dataset_artifacts(run_id: str, client: MlflowClient, data: PrepareSummary) -> None:
    """The prepare summary as JSON, the GX validation result and the Data Docs site."""
    log_json(client, run_id, data.model_dump(mode="json"), "data/prepare_summary.json")
    result = _existing(data.paths.validation_result)
    if result is not None and result.is_file():
        client.log_artifact(run_id, str(result), "data/validation")
    docs = _existing(data.paths.data_docs)
    if docs is not None:
        client.log_artifacts(run_id, str(docs if docs.is_dir() else docs.parent), "data/validation/data_docs")


def _log_training_artifacts(run_id: str, client: MlflowClient, trained: TrainResult) -> None:
    """Plots, the backbone comparison, test predictions and the full test metrics as JSON."""
    for plot in trained.plots.values():
        path = _existing(plot)
        if path is not None:
            client.log_artifact(run_id, str(path), "plots")
    for source in (trained.comparison_path, trained.predictions_path):
        path = _existing(source)
        if path is not None:
            client.log_artifact(run_id, str(path), "evaluation")
    log_json(client, run_id, trained.test_metrics, "evaluation/test_metrics.json")
    log_json(client, run_id, trained.model_dump(mode="json"), "evaluation/train_result.json")


def _log_backbone_runs(client: MlflowClient, experiment_id: str, parent_id: str, trained: TrainResult,
                       tags: Mapping[str, str]) -> dict[str, str]:
    """One child run per backbone: its validation metrics and its head (and fine-tune) curves.

    A second try of the logging (the task retries a store that hiccuped) finds the children the
    first one made instead of adding twins.
    """
    child_ids: dict[str, str] = {}
    made = {run.data.tags.get("backbone"): run for run in client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}
    for name, backbone in trained.backbones.items():
        child = made.get(name) or client.create_run(experiment_id, run_name=name, tags={
            **tags, "mlflow.parentRunId": parent_id, "backbone": name,
            "chosen": str(name == trained.chosen_backbone).lower()})
        metrics = [Metric(key, value, now_ms(), 0) for key, value in scalar_metrics(backbone.model_dump()).items()]
        curves = [("head", trained.history_paths.get(f"head:{name}"))]
        if name == trained.chosen_backbone:
            curves.append(("fine_tune", trained.history_paths.get("fine_tune")))
        for phase, path in curves:
            if path and Path(path).is_file():
                metrics.extend(history_metrics(Path(path), phase))
                client.log_artifact(child.info.run_id, path, "history")
        log_batch(client, child.info.run_id, metrics=metrics,
                   params={"backbone": name, "input_size": backbone.input_size, "precision": backbone.precision,
                           "engine": backbone.engine,
                           "weights": Path(backbone.weights).name, "feature_cache": Path(backbone.feature_cache_dir).name})
        client.set_terminated(child.info.run_id, "FINISHED")
        child_ids[name] = child.info.run_id
    return child_ids


def log_pyfunc_model(model_path: str | Path, input_size: int, decoder: str = "auto", *, name: str = "model",
                     classes: ClassMap = CATS_DOGS, engine: str = "keras", engine_model: str | Path | None = None,
                     precision: str = "float32", prediction_log: str | None = None) -> Any:
    """Log a trained `.keras` file as the pyfunc serving model in the active run.

    The model is tasks/models/pyfunc.py's `CatsDogsModel`; what travels with it (signature,
    input example, settings, the `tasks` package as code so `mlflow models serve` can load it
    anywhere, requirements naming only what the served model imports) is
    tasks/models/packaging.py. `decoder` is the image decoder the model was trained with
    ("auto": the one that runs here); the served model decodes with it. `classes` (label order)
    go into its config and signature. On `engine` "openvino" the run's IR (`engine_model`, its
    model.xml) is logged beside the Keras model and served at `precision`. Wherever it is served or
    scores a batch, it records each row in the `prediction_log` folder (None: it does not). Returns
    MLflow's ModelInfo.
    """
    from tasks.learning.pixels import resolve_decoder

    decoder = resolve_decoder(decoder)
    from tasks.models import packaging, pyfunc
    from tasks.models.prediction_log import not_traffic

    with not_traffic():  # MLflow scores the input example once to check the model serves: not a request
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=pyfunc.CatsDogsModel(),
            artifacts={pyfunc.KERAS_ARTIFACT: str(model_path),
                       **({pyfunc.OPENVINO_ARTIFACT: _ir_files(engine_model)} if engine_model else {})},
            signature=packaging.model_signature(classes),
            input_example=packaging.input_example(),
            code_paths=[packaging.tasks_code_path()],
            pip_requirements=packaging.pip_requirements(decoder=decoder, engine=engine),
            model_config=packaging.model_config(input_size, decoder, classes, engine, precision, prediction_log),
        )


def _ir_files(model_xml: str | Path) -> str:
    """A folder holding only the IR's model.xml and model.bin (not its compiled blobs, which are this CPU's)."""
    import shutil
    import tempfile

    source = Path(model_xml)
    folder = Path(tempfile.mkdtemp(prefix="openvino-model-")) / "openvino_model"
    folder.mkdir()
    for suffix in (".xml", ".bin"):
        shutil.copy2(source.with_suffix(suffix), folder / f"model{suffix}")
    return str(folder)


@contextlib.contextmanager
def training_run(fingerprint: str, config_hash: str, *, experiment: str = DEFAULT_EXPERIMENT,
                 prefect_context: Mapping[str, Any] | None = None) -> Iterator[MlflowRun]:
    """The retrain's MLflow run, open (and active in this thread) while the block runs.

    Opened when training starts, so the run's duration, and its system metrics where MLflow is
    told to log them (`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true`), cover the work, not only the
    logging after it. It records its owner process at once: killed mid-training, it stays RUNNING
    and the next retrain proves the owner dead and marks it FAILED (tasks/models/reconcile.py).
    It ends FINISHED with the block, FAILED when the block raises.
    """
    uri, _ = use_tracking()
    experiment_id = ensure_experiment(experiment)
    tags = {TAG_KIND: "retrain", TAG_FINGERPRINT: fingerprint, TAG_CONFIG_HASH: config_hash,
            **prefect_tags(prefect_context), **owner_tags()}
    run_name = tags.get("prefect.flow_run_name") or f"retrain-{fingerprint[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        yield MlflowRun(run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=uri,
                        run_url=run_url(run.info.run_id, experiment_id, uri))


@contextlib.contextmanager
def _active(run: MlflowRun) -> Iterator[None]:
    """`run` as this thread's active run: it is already when `training_run` opened it here, else it is resumed."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.run_id:
        yield
        return
    with mlflow.start_run(run_id=run.run_id, log_system_metrics=False):
        yield


def log_retrain(data: PrepareSummary, trained: TrainResult, config: Mapping[str, Any], *, source: str,
                experiment: str = DEFAULT_EXPERIMENT, prefect_context: Mapping[str, Any] | None = None,
                run: MlflowRun | None = None, model_name: str = MODEL_NAME) -> MlflowRun:
    """Record one retrain in MLflow: in its parent run, a child run per backbone, and the model.

    `run` is the run `training_run` opened when training started (without one, a run is opened
    now). Parent run: the config as params (plus the backend and precision it ran at), the dataset
    (fingerprint, layout, counts as params and metrics, one MLflow dataset per split named after
    `model_name`, `data/prepare_summary.json`), the Great Expectations result and Data Docs
    (`data/validation/`), test metrics (`test_*`, plus the full dict with the confusion matrix
    as `evaluation/test_metrics.json`), the validation metrics of the shipped model (`val_*`),
    plots (`plots/`), the comparison table and test predictions (`evaluation/`), tags
    (`dataset_fingerprint`, `config_hash`, `chosen_backbone`, `prefect.*` links to the flow
    run, `catsdogs.owner.*` the process) and the pyfunc model (`model`, logging its predictions in the
    data folder's `predictions/`). A failure mid-way
    marks the run FAILED; a killed process leaves it RUNNING for the next retrain to reconcile.
    """
    if run is None:
        with training_run(data.fingerprint, trained.config_hash, experiment=experiment,
                          prefect_context=prefect_context) as opened:
            return log_retrain(data, trained, config, source=source, run=opened, model_name=model_name)
    _, client = use_tracking()
    run_id, experiment_id = run.run_id, run.experiment_id
    chosen = trained.chosen_backbone
    tags = {key: value for key, value in client.get_run(run_id).data.tags.items() if not key.startswith("mlflow.")}
    with _active(run):
        client.set_tag(run_id, TAG_BACKBONE, chosen)
        if data.label_overrides:
            tags[TAG_LABEL_OVERRIDES] = data.label_overrides.text()
            client.set_tag(run_id, TAG_LABEL_OVERRIDES, tags[TAG_LABEL_OVERRIDES])
        data_params, data_metrics = dataset_logging(data)
        validation = {key: value for key, value in trained.val_metrics.items() if key != "threshold"}
        int8 = trained.first_member.int8_check
        metrics = {**data_metrics, **scalar_metrics(trained.test_metrics, "test_"),
                   **scalar_metrics(validation, "val_"),
                   **(scalar_metrics({key: getattr(trained.calibration, key) for key in ("temperature", "validation",
                                                                                        "test")}, "calibration.")
                      if trained.calibration else {}),
                   **(scalar_metrics(int8.model_dump(), "int8_check.") if int8 else {}),
                   **quality_metrics(trained.quality)}
        params = {**flatten(dict(config)), **data_params, "resolved.input_size": trained.input_size,
                  "resolved.backbone": chosen, "resolved.backend": trained.devices.backend,
                  "resolved.precision": trained.devices.precision, "resolved.device": trained.devices.device_name,
                  "resolved.decoder": trained.decoder, "resolved.engine": trained.devices.engine}
        log_batch(client, run_id, params=params,
                   metrics=[Metric(key, value, now_ms(), 0) for key, value in metrics.items()])
        client.set_tag(run_id, "mlflow.note.content", _run_note(data, trained))
        log_datasets(data, source, model_name)
        _log_dataset_artifacts(run_id, client, data)
        _log_training_artifacts(run_id, client, trained)
        _log_quality_artifacts(run_id, client, trained.quality)
        child_ids = _log_backbone_runs(client, experiment_id, run_id, trained,
                                       {**{key: value for key, value in tags.items() if key != TAG_KIND},
                                        TAG_BACKBONE: chosen})
        model_info = log_pyfunc_model(trained.model_path, trained.input_size, trained.decoder,
                                      classes=ClassMap.from_names(data.classes), engine=trained.devices.engine,
                                      engine_model=trained.engine_model_path, precision=trained.devices.precision,
                                      prediction_log=str(DataFolder.at(trained.data_dir).predictions))
    return run.model_copy(update={"model_uri": model_info.model_uri, "child_run_ids": child_ids})


def _run_note(data: PrepareSummary, trained: TrainResult) -> str:
    """A short markdown description shown at the top of the run page."""
    test = scalar_metrics(trained.test_metrics)
    lines = [f"Retrain on dataset `{data.fingerprint[:12]}`, chosen backbone **{trained.chosen_backbone}** "
             f"(Keras/{trained.devices.backend}, {trained.devices.precision} on {trained.devices.engine}, "
             f"{trained.decoder} decoder).", "",
             "| split | " + " | ".join(data.classes) + " |", "|---" * (len(data.classes) + 1) + "|"]
    lines += [f"| {split} | " + " | ".join(str(c.get(name, 0)) for name in data.classes) + " |"
              for split, c in data.counts.items()]
    lines += ["", "Test: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(test.items()))]
    int8 = trained.first_member.int8_check
    if int8 is not None:
        lines += ["", int8_sentence(int8)]
    return "\n".join(lines)


def log_skipped_run(reason: str, fingerprint: str, config_hash: str, *, experiment: str = DEFAULT_EXPERIMENT,
                    prefect_context: Mapping[str, Any] | None = None) -> MlflowRun:
    """Record a retrain that stopped early ("nothing changed"): a short FINISHED run.

    Tags `catsdogs.kind=skipped`, `skip_reason`, `dataset_fingerprint`, `config_hash` and the
    Prefect links, so the history of scheduled runs stays complete in the UI.
    """
    uri, client = use_tracking()
    experiment_id = ensure_experiment(experiment)
    tags = {TAG_KIND: "skipped", TAG_SKIP_REASON: reason, TAG_FINGERPRINT: fingerprint,
            TAG_CONFIG_HASH: config_hash, "mlflow.note.content": f"Skipped: {reason}",
            **prefect_tags(prefect_context), **owner_tags()}
    run_name = tags.get("prefect.flow_run_name") or f"skipped-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return MlflowRun(run_id=run.info.run_id, experiment_id=experiment_id,
                     run_url=run_url(run.info.run_id, experiment_id, uri), tracking_uri=uri)
