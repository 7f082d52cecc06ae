"""The learning wing's Prefect tasks: the steps of `train_model`, each a thin wrapper over its module.

No retries: the work is deterministic compute, and a rerun resumes from the finished feature
shards anyway. No Prefect result caching: the feature cache is the cache. Between steps travel
paths and small typed summaries, never arrays or models. The compute modules stay importable
without Prefect (a GPU host runs them with Keras on JAX and nothing else).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.results import (
    BackboneResult,
    CalibrationSummary,
    DeviceSetup,
    EnsembleResult,
    Explanation,
    Int8Check,
    QualitySummary,
    TrainResult,
)
from tasks.data.datafolder import DataFolder
from tasks.learning.evaluate import Evaluation
from tasks.learning.features import FeatureSummary, PlanRef, ShardResult, summarise
from tasks.learning.finetune import ExportedModel, FineTuneParams
from tasks.learning.head import HeadParams, HeadResult
from tasks.learning.shipped import ShippedModel


@task(name="check-prepared-data", cache_policy=NO_CACHE)
def check_prepared_data(data_dir: str) -> dict[str, dict[str, int]]:
    """Image counts per split and class; fails in a second on a folder prepare_data did not finish."""
    return DataFolder.at(data_dir).labelled_counts()


@task(name="configure-devices", cache_policy=NO_CACHE)
def configure_devices(precision: str) -> DeviceSetup:
    """Backend, device and precision of this run (and GPU memory growth on TensorFlow)."""
    from tasks.common.devices import configure_devices as configure

    return configure(precision)


@task(name="choose-engine-and-precision", cache_policy=NO_CACHE)
def choose_compute(data_dir: str, backbone: str, weights: str, input_size: int, precision: str, engine: str,
                   decoder: str, devices: DeviceSetup) -> DeviceSetup:
    """`devices` with this backbone's engine and precision: as configured, by a GPU's rule, or measured once on this CPU.

    The engine first (int8 means OpenVINO), then the precision on that engine; each `auto` is
    timed once per host and cached in the data folder.
    """
    from tasks.learning.engines import resolve_engine
    from tasks.learning.precision import resolve_precision
    from tasks.learning.quantize import float32_ir_dir

    folder = DataFolder.at(data_dir)
    ir_dir = str(float32_ir_dir(folder, backbone, weights, input_size, decoder))
    if precision == "int8" and engine == "auto":
        chosen_engine, engine_why = resolve_engine(folder, backbone, weights, input_size, "openvino", ir_dir)[0], \
            "int8 runs only on OpenVINO"
    else:
        chosen_engine, engine_why = resolve_engine(folder, backbone, weights, input_size, engine, ir_dir)
    chosen, why = resolve_precision(folder, backbone, weights, input_size, precision, chosen_engine, ir_dir)
    return devices.model_copy(update={"precision": chosen, "reason": why, "engine": chosen_engine,
                                      "engine_reason": engine_why})


@task(name="check-int8", cache_policy=NO_CACHE)
def check_int8(data_dir: str, backbone: str, weights: str, input_size: int, decoder: str, cache_dir: str,
               head_path: str) -> Int8Check:
    """The head's validation metrics on int8 vs float32 features of a validation sample (int8 runs only)."""
    from tasks.learning.quantize import int8_check

    return int8_check(DataFolder.at(data_dir), backbone, weights, input_size, decoder, cache_dir, head_path)


@task(name="check-decoder", cache_policy=NO_CACHE)
def check_decoder(decoder: str) -> str:
    """The image decoder that runs for the config's choice; one that is not installed fails here, before any data work."""
    from tasks.learning.pixels import resolve_decoder

    return resolve_decoder(decoder)


@task(name="check-weights", cache_policy=NO_CACHE)
def check_weights(backbone: str, weights: str | None) -> None:
    """A weights file that does not fit the backbone fails here, before any data work."""
    from tasks.learning.backbones import check_weights as check

    check(backbone, weights)


@task(name="resolve-weights", cache_policy=NO_CACHE)
def resolve_weights(data_dir: str, backbone: str, weights: str | None, seed: int) -> str:
    """The weights every step of this backbone uses: None becomes the folder's kept random draw."""
    from tasks.learning.backbones import resolve_weights as resolve

    return resolve(DataFolder.at(data_dir), backbone, weights, seed)


@task(name="plan-features", cache_policy=NO_CACHE)
def plan_features(data_dir: str, backbone: str, weights: str, input_size: int, precision: str, decoder: str,
                  shard_size: int = 512, engine: str = "keras", view: str = "plain") -> PlanRef:
    """Which images still need features, cut into shards (a warm cache plans nothing; OpenVINO's IR is made here);
    view "flip": their mirrors'."""
    from tasks.learning.features import plan_extraction

    return plan_extraction(DataFolder.at(data_dir), backbone, weights, input_size, precision, shard_size,
                           decoder, engine, view).ref()


@task(name="extract-shard", cache_policy=NO_CACHE)
def extract_shard(plan_path: str, index: int, batch_size: int | None, decode_workers: int | None = None) -> ShardResult:
    """Features of one shard of images, written atomically, wherever the task runner runs it.

    On a Dask cluster the plan and the images are read, and the shard written, on storage
    every worker sees; the shard's lease keeps two live workers off the same shard.
    """
    from tasks.learning.features import extract_shard as extract
    from tasks.learning.features import load_plan

    return extract(load_plan(plan_path), index, batch_size, decode_workers=decode_workers)


def extract_all_shards(plan: PlanRef, batch_size: int | None, backbone: str,
                       decode_workers: int | None = None) -> list[ShardResult]:
    """Map `extract_shard` over the plan on the flow's task runner, reporting progress as shards land.

    In-process (the default runner, one shard at a time) or on Dask workers, the shards finish
    in any order; the count of images done is what people need to see.
    """
    from prefect.futures import as_completed

    from tasks.common.progress import Progress

    if not plan.shards:
        return []
    progress = Progress(f"Extracting {backbone} features", plan.todo, "images", logger_name=__name__)
    futures = extract_shard.map(plan.plan_path, range(plan.shards), batch_size, decode_workers)
    results = []
    for future in as_completed(futures):
        result = future.result()
        results.append(result)
        progress.advance(result.images)
    progress.finish()
    return results


def feature_summary(plan: PlanRef, shards: list[ShardResult]) -> FeatureSummary:
    """The features of one backbone, counted as `extract_features` counts them (one `summarise` for both)."""
    return summarise(plan, shards)


@task(name="audit-data", cache_policy=NO_CACHE)
def audit_data(data_dir: str, cache_dir: str, settings: dict[str, Any]) -> QualitySummary:
    """The data audit on one backbone's cached features (reused while data and settings are unchanged).

    Fails, after writing its findings, when too many test images are near-copies of training ones.
    """
    from tasks.learning.audit import AuditSettings, audit_folder

    return audit_folder(DataFolder.at(data_dir), Path(cache_dir), AuditSettings(**settings))


def _suspects(audit_report: str | None) -> frozenset[str]:
    """The audit's suspected training labels, or none (no report given: exclude_suspected_labels is off)."""
    from tasks.learning.audit import suspected_train_hashes

    return suspected_train_hashes(audit_report)


@task(name="train-head", cache_policy=NO_CACHE)
def train_head(data_dir: str, cache_dir: str, output_dir: str, backbone: str, params: dict[str, Any],
               mirrored_dir: str | None = None, leave_out_suspects_of: str | None = None) -> HeadResult:
    """Head on cached features for one backbone (seconds on a CPU), scored with TTA too when mirrors are cached,
    without the audit's suspects when given its report."""
    from tasks.learning.head import train_head as train

    return train(DataFolder.at(data_dir), Path(cache_dir), Path(output_dir), backbone, HeadParams(**params),
                 mirrored_dir=Path(mirrored_dir) if mirrored_dir else None,
                 leave_out=_suspects(leave_out_suspects_of))


@task(name="train-ensemble-head", cache_policy=NO_CACHE)
def train_ensemble_head(data_dir: str, backbones: dict[str, BackboneResult], members: list[str], output_dir: str,
                        params: dict[str, Any], leave_out_suspects: bool = False) -> EnsembleResult:
    """Head on the members' concatenated cached features: the ensemble candidate (without the suspected labels of
    any member's audit, when asked)."""
    from tasks.learning.ensemble import train_ensemble_head as train

    leave_out = frozenset().union(*(_suspects(backbones[name].quality.report) for name in members
                                    if backbones[name].quality)) if leave_out_suspects else frozenset()
    return train(DataFolder.at(data_dir), backbones, members, Path(output_dir), HeadParams(**params),
                 leave_out=leave_out)


@task(name="build-ensemble", cache_policy=NO_CACHE)
def export_ensemble(data_dir: str, output_dir: str, ensemble: EnsembleResult, backbones: dict[str, BackboneResult],
                    batch_size: int, decoder: str) -> ExportedModel:
    """The chosen ensemble end to end (each member's backbone once per image), saved as .keras (never fine-tuned)."""
    from tasks.learning.ensemble import Member
    from tasks.learning.ensemble import export_ensemble as export

    # On OpenVINO the Keras model is float32 and the engine applies the precision (the served IR: engine_model)
    members = [Member(name, backbones[name].weights,
                      backbones[name].precision if backbones[name].engine == "keras" else "float32")
               for name in ensemble.members]
    return export(DataFolder.at(data_dir), Path(output_dir), members, ensemble.input_size, Path(ensemble.head_path),
                  [Path(backbones[name].feature_cache_dir) for name in ensemble.members], batch_size, decoder=decoder)


@task(name="calibrate-and-wrap", cache_policy=NO_CACHE)
def ship_model(data_dir: str, model_path: str, tta: str, fine_tuned: bool, head_path: str, cache_dirs: list[str],
               mirrored_dirs: list[str] | None, batch_size: int, decoder: str) -> ShippedModel:
    """Test-time augmentation and a temperature fitted on validation, inside the saved model."""
    from tasks.learning.shipped import ship_model as ship

    return ship(DataFolder.at(data_dir), Path(model_path), tta=tta, fine_tuned=fine_tuned, head_path=Path(head_path),
                cache_dirs=[Path(path) for path in cache_dirs],
                mirrored_dirs=[Path(path) for path in mirrored_dirs] if mirrored_dirs else None,
                batch_size=batch_size, decoder=decoder)


@task(name="calibration-on-test", cache_policy=NO_CACHE)
def calibration_on_test(output_dir: str, data_dir: str, calibration: CalibrationSummary,
                        predictions_path: str) -> CalibrationSummary:
    """ECE, log loss and Brier before and after the temperature on the test split, and the reliability diagram."""
    from tasks.learning.calibration import on_test_split

    return on_test_split(calibration, Path(predictions_path), Path(output_dir) / "plots" / "reliability.png",
                         DataFolder.at(data_dir).classes())


@task(name="explain-mistakes", cache_policy=NO_CACHE)
def explain_mistakes(model_path: str, data_dir: str, output_dir: str, predictions_path: str,
                     decoder: str) -> list[Explanation]:
    """Grad-CAM overlays of the worst test mistakes of each class."""
    from tasks.learning.gradcam import explain_mistakes as explain

    return explain(Path(model_path), DataFolder.at(data_dir), Path(output_dir), Path(predictions_path),
                   decoder=decoder)


@task(name="build-and-fine-tune", cache_policy=NO_CACHE)
def export_model(data_dir: str, output_dir: str, backbone: str, weights: str, input_size: int, head_path: str,
                 cache_dir: str, fine_tune: bool, params: dict[str, Any], precision: str,
                 decoder: str, engine: str = "keras", leave_out_suspects_of: str | None = None) -> ExportedModel:
    """End-to-end model from the chosen backbone and its head, fine-tuned when asked (without the audit's suspects
    when given its report), saved as .keras (and as OpenVINO IR on that engine)."""
    from tasks.learning.finetune import export_model as export

    return export(DataFolder.at(data_dir), Path(output_dir), backbone, weights, input_size, Path(head_path),
                  Path(cache_dir), fine_tune, FineTuneParams(**params), precision, decoder=decoder, engine=engine,
                  leave_out=_suspects(leave_out_suspects_of))


@task(name="engine-model", cache_policy=NO_CACHE)
def engine_model(data_dir: str, model_path: str, precision: str, input_size: int, decoder: str) -> str:
    """The saved served model as OpenVINO IR beside it (model.openvino/; int8: calibrated like its features)."""
    from tasks.learning.finetune import ENGINE_MODEL_DIR
    from tasks.learning.layers import load_saved_model
    from tasks.learning.quantize import shipped_ir

    target = Path(model_path).parent / ENGINE_MODEL_DIR
    return str(shipped_ir(load_saved_model(model_path), target, precision, DataFolder.at(data_dir), input_size,
                          decoder))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(model_path: str, data_dir: str, output_dir: str, input_size: int, batch_size: int,
             decoder: str, engine_model: str | None = None, precision: str = "float32") -> Evaluation:
    """Test-split evaluation of the saved end-to-end model, as it ships (on its OpenVINO IR when it has one)."""
    from tasks.learning.evaluate import evaluate_model

    return evaluate_model(Path(model_path), DataFolder.at(data_dir), Path(output_dir), input_size, batch_size,
                          decoder=decoder, engine_model=engine_model, precision=precision)


@task(name="plots", cache_policy=NO_CACHE)
def plots(output_dir: str, data_dir: str, predictions_path: str, test_metrics: dict[str, Any],
          history_paths: dict[str, str]) -> dict[str, str]:
    """PNG plots of a finished run."""
    from tasks.learning.plots import make_plots

    return make_plots(Path(output_dir), DataFolder.at(data_dir), Path(predictions_path), test_metrics, history_paths)


@task(name="finish-run", cache_policy=NO_CACHE)
def finish_run(result: TrainResult, partial_dir: str, final_dir: str) -> TrainResult:
    """metrics.json and train_summary.json, then the run folder gets its final name."""
    from tasks.learning.runs import finish_run as finish

    return finish(result, Path(partial_dir), Path(final_dir))


def audit_settings(quality: Any, seed: int) -> dict[str, Any]:
    """A QualityConfig's audit settings, and the run's seed for its folds, as the plain dict the audit task takes."""
    from tasks.learning.audit import AuditSettings

    return asdict(AuditSettings(near_duplicate_similarity=quality.near_duplicate_similarity,
                                max_label_issue_share=quality.max_label_issue_share,
                                max_leaked_test_share=quality.max_leaked_test_share, seed=seed))


def head_params(config: Any) -> dict[str, Any]:
    """A TrainConfig's head settings as the plain dict the head task takes."""
    return asdict(HeadParams(dense_units=config.dense_units, dropout=config.dropout,
                             learning_rate=config.head_learning_rate, epochs=config.head_epochs,
                             batch_size=config.head_batch_size, patience=config.patience, seed=config.seed,
                             class_weight=config.class_weight))


def fine_tune_params(config: Any, batch_size: int) -> dict[str, Any]:
    """A TrainConfig's fine-tuning settings as the plain dict the export task takes."""
    return asdict(FineTuneParams(epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate,
                                 batch_size=batch_size, patience=config.patience, seed=config.seed,
                                 class_weight=config.class_weight))
