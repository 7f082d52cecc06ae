"""The `train_model` flow: from a prepared data folder to a saved, evaluated end-to-end model.

A recipe of task calls (tasks/learning/steps.py), no ML inside:

    check the prepared folder -> configure devices -> the image decoder
    for each backbone: precision -> plan features -> extract shards (mapped)
                       -> audit the data on its features -> train a head
    comparison table -> choose the best backbone (validation AUC, then validation loss)
    -> end-to-end model (optionally fine-tuned) -> evaluate on the test split -> plots
    -> the run folder gets its name

Feature shards are mapped over the flow's task runner: in-process, one shard after another,
by default; a Dask cluster when asked (`flows.runners.on_compute(train_model, compute)`, which
retrain uses). Between tasks travel paths and small typed results; features, images and
models stay on disk, where every worker reads and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import ComputeConfig, FeatureConfig, QualityConfig, TrainConfig
from flows.runners import decode_workers, where_shards_run
from tasks.common.devices import CPU_BATCH_SIZE
from tasks.common.logs import run_logger
from tasks.common.numbers import decimals4
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import BackboneResult, DeviceSetup, HeadScores, TrainResult
from tasks.data.datafolder import DataFolder
from tasks.learning import steps
from tasks.learning.features import FeatureSummary
from tasks.learning.runs import rank_backbones, write_comparison

GPU_TRAIN_BATCH_SIZE = 128
"""Fine-tuning and evaluation batch on a GPU when the config leaves batch_size to the hardware."""

HEAD_AGREEMENT_TOLERANCE = 1e-3
"""Largest p(dog) gap between the end-to-end model and the head on cached features before the flow warns."""


@flow(name="train_model", task_runner=ThreadPoolTaskRunner(max_workers=1),
      on_running=[label_flow_run_owner])
def train_model(data_dir: str | Path, config: TrainConfig = TrainConfig(),
                compute: ComputeConfig = ComputeConfig(), quality: QualityConfig = QualityConfig()) -> TrainResult:
    """Audit the data and train heads on cached features for each backbone, keep the best, optionally fine-tune,
    evaluate on test.

    Returns the TrainResult (also written to <run folder>/train_summary.json): chosen backbone,
    per-backbone validation metrics, test metrics, and the paths of model.keras, plots,
    comparison.csv, histories and predictions.csv. The run folder is
    data_dir/training/<UTC time>-<config hash[:8]>; it appears only when the run has succeeded.
    `compute` says how shards are cut and how many cores a Dask worker's decoder gets; which
    runner computes them is the flow's task runner (`flows.runners.on_compute`), and a Dask
    config on the in-process runner gets a warning. The data audit of each backbone's features
    (data/quality/<feature space>/) is judged by `quality`'s checks before its head trains.
    """
    folder = DataFolder.at(data_dir)
    with folder.lock("train_model", create=False):
        return _train(folder, config, compute, quality)


@dataclass(frozen=True)
class BackboneFeatures:
    """One backbone's cached features, and how they were computed."""

    weights: str
    input_size: int
    setup: DeviceSetup
    features: FeatureSummary


def backbone_features(data_dir: str, name: str, config: FeatureConfig, compute: ComputeConfig, devices: DeviceSetup,
                      decoder: str) -> BackboneFeatures:
    """Weights, precision and the features of every labelled image for one backbone (only missing shards computed)."""
    logger = run_logger(__name__)
    input_size = config.input_size_for(name)
    weights = steps.resolve_weights(data_dir, name, config.weights, config.seed)
    setup = steps.choose_precision(data_dir, name, weights, input_size, config.precision, devices)
    logger.info("%s at %d px computes in %s: %s", name, input_size, setup.precision, setup.reason)
    plan = steps.plan_features(data_dir, name, weights, input_size, setup.precision, decoder, compute.shard_size)
    shards = steps.extract_all_shards(plan, config.batch_size, name, decode_workers(compute))
    return BackboneFeatures(weights, input_size, setup, steps.feature_summary(plan, shards))


def _train(folder: DataFolder, config: TrainConfig, compute: ComputeConfig, quality: QualityConfig) -> TrainResult:
    logger = run_logger(__name__)
    task_runner = FlowRunContext.get().task_runner
    runner = type(task_runner).__name__
    if compute.uses_dask and runner != "DaskTaskRunner":
        logger.warning("compute asks for Dask workers but this run's task runner is %s; call "
                       "flows.runners.on_compute(train_model, compute) to run the shards on Dask.", runner)
    elif where := where_shards_run(task_runner, compute):
        logger.info("%s", where)
    data_dir = str(folder.root)

    counts = steps.check_prepared_data(data_dir)
    devices = steps.configure_devices(config.precision)
    decoder = steps.check_decoder(config.decoder)
    logger.info("Training %s on %s with Keras/%s on %s, images decoded by %s", config.backbones, data_dir,
                devices.backend, devices.device_name, decoder)
    partial, final = folder.new_training_run(config.config_hash())
    work_dir = str(partial)

    backbones: dict[str, BackboneResult] = {}
    setups = {}
    for name in config.backbones:
        space = backbone_features(data_dir, name, config, compute, devices, decoder)
        setups[name], features = space.setup, space.features
        audit = steps.audit_data(data_dir, features.cache_dir, steps.audit_settings(quality, config.seed))
        logger.info("%s data audit: %s; findings in %s", name, audit.text(), audit.csv)
        suspects = audit.report if config.exclude_suspected_labels else None
        head = steps.train_head(data_dir, features.cache_dir, work_dir, name, steps.head_params(config), suspects)
        if head.left_out:
            logger.info("%s head trained without the %d training image(s) suspected of a wrong label", name,
                        head.left_out)
        backbones[name] = BackboneResult(
            **head.model_dump(include=set(HeadScores.model_fields)), backbone=name, weights=space.weights,
            input_size=space.input_size, precision=space.setup.precision, feature_dim=head.feature_dim,
            feature_cache_dir=features.cache_dir, features_computed=features.computed,
            features_reused=features.reused, quality=audit, suspects_left_out=head.left_out)
        logger.info("%s: %d features computed, %d reused, %d failed; head val AUC %s, val loss %s", name,
                    features.computed, features.reused, features.failed, decimals4(head.val_auc),
                    decimals4(head.val_loss))

    ranking = rank_backbones(backbones)
    chosen = ranking[0]
    comparison_path = write_comparison(backbones, ranking, partial / "comparison.csv")
    logger.info("Chosen backbone: %s (ranking %s)", chosen, ranking)

    best = backbones[chosen]
    batch_size = config.batch_size or (GPU_TRAIN_BATCH_SIZE if devices.device == "GPU" else CPU_BATCH_SIZE)
    exported = steps.export_model(data_dir, work_dir, chosen, best.weights, best.input_size, best.head_path,
                                  best.feature_cache_dir, config.fine_tune, steps.fine_tune_params(config, batch_size),
                                  best.precision, decoder,
                                  best.quality.report if config.exclude_suspected_labels and best.quality else None)
    evaluation = steps.evaluate(exported.model_path, data_dir, work_dir, best.input_size, batch_size, decoder)
    history_paths = {f"head:{name}": entry.history_path for name, entry in backbones.items()}
    if exported.history_path:
        history_paths["fine_tune"] = exported.history_path
    plots = steps.plots(work_dir, data_dir, evaluation.predictions_path, evaluation.metrics, history_paths)
    logger.info("Test accuracy %s, ROC AUC %s on %d images", decimals4(evaluation.metrics["accuracy"]),
                decimals4(evaluation.metrics["roc_auc"]), evaluation.count)
    if exported.head_agreement > HEAD_AGREEMENT_TOLERANCE:
        logger.warning("The end-to-end model differs from the validated head by up to %.4f in p(dog); "
                       "check that preprocessing and weights match the feature cache.", exported.head_agreement)

    fingerprint = folder.summary_fingerprint()
    result = TrainResult(
        chosen_backbone=chosen, backbones=backbones, test_metrics=evaluation.metrics,
        val_metrics=exported.val_metrics, model_path=exported.model_path, input_size=best.input_size,
        output_dir=work_dir, plots=plots, comparison_path=str(comparison_path), history_paths=history_paths,
        predictions_path=evaluation.predictions_path, metrics_path=str(partial / "metrics.json"),
        fine_tuned=exported.fine_tuned, fine_tune=exported.fine_tune, head_agreement=exported.head_agreement,
        devices=setups[chosen], decoder=decoder, counts=counts, config=config.model_dump(mode="json"), config_hash=config.config_hash(),
        data_dir=data_dir, data_fingerprint=fingerprint)
    return steps.finish_run(result, work_dir, str(final))
