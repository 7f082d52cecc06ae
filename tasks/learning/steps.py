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

from tasks.common.results import DeviceSetup, QualitySummary, TrainResult
from tasks.data.datafolder import DataFolder
from tasks.learning.evaluate import Evaluation
from tasks.learning.features import FeatureSummary, PlanRef, ShardResult, summarise
from tasks.learning.finetune import ExportedModel, FineTuneParams
from tasks.learning.head import HeadParams, HeadResult


@task(name="check-prepared-data", cache_policy=NO_CACHE)
def check_prepared_data(data_dir: str) -> dict[str, dict[str, int]]:
    """Image counts per split and class; fails in a second on a folder prepare_data did not finish."""
    return DataFolder.at(data_dir).labelled_counts()


@task(name="configure-devices", cache_policy=NO_CACHE)
def configure_devices(precision: str) -> DeviceSetup:
    """Backend, device and precision of this run (and GPU memory growth on TensorFlow)."""
    from tasks.common.devices import configure_devices as configure

    return configure(precision)


@task(name="choose-precision", cache_policy=NO_CACHE)
def choose_precision(data_dir: str, backbone: str, weights: str, input_size: int, requested: str,
                     devices: DeviceSetup) -> DeviceSetup:
    """`devices` at this backbone's precision: as configured, a GPU's rule, or measured once on this CPU and cached."""
    from tasks.learning.precision import resolve_precision

    precision, why = resolve_precision(DataFolder.at(data_dir), backbone, weights, input_size, requested)
    return devices.model_copy(update={"precision": precision, "reason": why})


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
                  shard_size: int = 512) -> PlanRef:
    """Which images still need features, cut into shards (a warm cache plans nothing)."""
    from tasks.learning.features import plan_extraction

    return plan_extraction(DataFolder.at(data_dir), backbone, weights, input_size, precision, shard_size,
                           decoder).ref()


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
               leave_out_suspects_of: str | None = None) -> HeadResult:
    """Head on cached features for one backbone (seconds on a CPU), without the audit's suspects when given its report."""
    from tasks.learning.head import train_head as train

    return train(DataFolder.at(data_dir), Path(cache_dir), Path(output_dir), backbone, HeadParams(**params),
                 leave_out=_suspects(leave_out_suspects_of))


@task(name="build-and-fine-tune", cache_policy=NO_CACHE)
def export_model(data_dir: str, output_dir: str, backbone: str, weights: str, input_size: int, head_path: str,
                 cache_dir: str, fine_tune: bool, params: dict[str, Any], precision: str,
                 decoder: str, leave_out_suspects_of: str | None = None) -> ExportedModel:
    """End-to-end model from the chosen backbone and its head, fine-tuned when asked, saved as .keras."""
    from tasks.learning.finetune import export_model as export

    return export(DataFolder.at(data_dir), Path(output_dir), backbone, weights, input_size, Path(head_path),
                  Path(cache_dir), fine_tune, FineTuneParams(**params), precision, decoder=decoder,
                  leave_out=_suspects(leave_out_suspects_of))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(model_path: str, data_dir: str, output_dir: str, input_size: int, batch_size: int,
             decoder: str) -> Evaluation:
    """Test-split evaluation of the saved end-to-end model, as it ships."""
    from tasks.learning.evaluate import evaluate_model

    return evaluate_model(Path(model_path), DataFolder.at(data_dir), Path(output_dir), input_size, batch_size,
                          decoder=decoder)


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
