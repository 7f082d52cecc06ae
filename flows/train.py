"""The `train_model` flow: from a prepared data folder to a saved, evaluated end-to-end model.

A recipe of task calls (tasks/learning/steps.py), no ML inside:

    check the prepared folder -> configure devices -> the image decoder
    for each backbone: engine and precision -> plan features -> extract shards (mapped)
                       [-> the mirrors' too, --tta flip] -> audit the data on its features -> train a head
                       (-> int8 vs float32 check, at int8)
    several backbones: a head on their concatenated features (the ensemble candidate)
    comparison table -> choose the best candidate (validation AUC, then validation loss)
    -> end-to-end model (optionally fine-tuned) -> TTA and a temperature fitted on validation, inside it
    -> the served model as OpenVINO IR (on that engine)
    -> evaluate on the test split -> calibration before/after, plots, Grad-CAM of the worst mistakes
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
from tasks.common.results import BackboneResult, DeviceSetup, HeadScores, TrainResult, chosen_members
from tasks.data.datafolder import DataFolder
from tasks.learning import steps
from tasks.learning.ensemble import ensemble_members
from tasks.learning.features import FeatureSummary
from tasks.learning.runs import rank_backbones, with_tta, write_comparison

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
    """One backbone's cached features, and how they were computed (with its mirrored images' under `--tta flip`)."""

    weights: str
    input_size: int
    setup: DeviceSetup
    features: FeatureSummary
    mirrored: FeatureSummary | None = None


def backbone_features(data_dir: str, name: str, config: FeatureConfig, compute: ComputeConfig, devices: DeviceSetup,
                      decoder: str, tta: str = "none") -> BackboneFeatures:
    """Weights, engine, precision and the features of every labelled image for one backbone (only missing shards
    computed); with tta "flip" the mirrored images' too, a feature space of their own."""
    logger = run_logger(__name__)
    input_size = config.input_size_for(name)
    weights = steps.resolve_weights(data_dir, name, config.weights, config.seed)
    setup = steps.choose_compute(data_dir, name, weights, input_size, config.precision, config.engine, decoder,
                                 devices)
    logger.info("%s at %d px computes on %s (%s) in %s (%s)", name, input_size, setup.engine, setup.engine_reason,
                setup.precision, setup.reason)

    def extracted(view: str, label: str) -> FeatureSummary:
        plan = steps.plan_features(data_dir, name, weights, input_size, setup.precision, decoder, compute.shard_size,
                                   setup.engine, view)
        return steps.feature_summary(plan, steps.extract_all_shards(plan, config.batch_size, label,
                                                                    decode_workers(compute)))

    features = extracted("plain", name)
    mirrored = extracted("flip", f"mirrored {name}") if tta == "flip" else None
    return BackboneFeatures(weights, input_size, setup, features, mirrored)


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
        space = backbone_features(data_dir, name, config, compute, devices, decoder, config.tta)
        setups[name], features, mirrored = space.setup, space.features, space.mirrored
        audit = steps.audit_data(data_dir, features.cache_dir, steps.audit_settings(quality, config.seed))
        logger.info("%s data audit: %s; findings in %s", name, audit.text(), audit.csv)
        suspects = audit.report if config.exclude_suspected_labels else None
        head = steps.train_head(data_dir, features.cache_dir, work_dir, name, steps.head_params(config),
                                mirrored.cache_dir if mirrored else None, suspects)
        if head.left_out:
            logger.info("%s head trained without the %d training image(s) suspected of a wrong label", name,
                        head.left_out)
        precision, engine = space.setup.precision, space.setup.engine
        int8 = steps.check_int8(data_dir, name, space.weights, space.input_size, decoder, features.cache_dir,
                                head.head_path) if precision == "int8" else None
        if int8 is not None:
            logger.info("%s int8 vs float32 features of %d validation images: head accuracy %s vs %s, ROC AUC %s vs "
                        "%s (calibrated on %d train images)", name, int8.images, decimals4(int8.int8["accuracy"]),
                        decimals4(int8.float32["accuracy"]), decimals4(int8.int8["roc_auc"]),
                        decimals4(int8.float32["roc_auc"]), int8.calibration_images)
        backbones[name] = BackboneResult(
            **head.model_dump(include=set(HeadScores.model_fields)), backbone=name, weights=space.weights,
            input_size=space.input_size, precision=precision, engine=engine, int8_check=int8,
            feature_dim=head.feature_dim, feature_cache_dir=features.cache_dir, features_computed=features.computed,
            features_reused=features.reused, mirrored_cache_dir=mirrored.cache_dir if mirrored else None,
            quality=audit, suspects_left_out=head.left_out)
        logger.info("%s: %d features computed, %d reused, %d failed; head val AUC %s, val loss %s%s", name,
                    features.computed, features.reused, features.failed, decimals4(head.val_auc),
                    decimals4(head.val_loss), with_tta(head.val_tta))

    members, why = ensemble_members(backbones)
    ensemble = None
    if members:
        ensemble = steps.train_ensemble_head(data_dir, backbones, members, work_dir, steps.head_params(config),
                                             config.exclude_suspected_labels)
        logger.info("Ensemble %s (%s): head val AUC %s, val loss %s%s", ensemble.backbone, why,
                    decimals4(ensemble.val_auc), decimals4(ensemble.val_loss), with_tta(ensemble.val_tta))
    candidates = {**backbones, **({ensemble.backbone: ensemble} if ensemble else {})}
    ranking = rank_backbones(candidates)
    chosen = ranking[0]
    comparison_path = write_comparison(candidates, ranking, partial / "comparison.csv")
    logger.info("Chosen backbone: %s (ranking %s)", chosen, ranking)

    members_run = chosen_members(chosen, ensemble)
    best = backbones[members_run[0]]
    batch_size = config.batch_size or (GPU_TRAIN_BATCH_SIZE if devices.device == "GPU" else CPU_BATCH_SIZE)
    if len(members_run) > 1:
        if config.fine_tune:
            logger.info("An ensemble is not fine-tuned: %s ships on its frozen backbones.", chosen)
        exported = steps.export_ensemble(data_dir, work_dir, ensemble, backbones, batch_size, decoder)
    else:
        exported = steps.export_model(data_dir, work_dir, chosen, best.weights, best.input_size, best.head_path,
                                      best.feature_cache_dir, config.fine_tune,
                                      steps.fine_tune_params(config, batch_size), best.precision, decoder, best.engine,
                                      best.quality.report if config.exclude_suspected_labels and best.quality else None)
    mirrored_dirs = [backbones[name].mirrored_cache_dir for name in members_run]
    shipped = steps.ship_model(data_dir, exported.model_path, config.tta, exported.fine_tuned,
                               candidates[chosen].head_path,
                               [backbones[name].feature_cache_dir for name in members_run],
                               mirrored_dirs if all(mirrored_dirs) else None, batch_size, decoder)
    logger.info("Calibration: %s", shipped.calibration.reason)
    engine_model_path = exported.engine_model_path
    if best.engine != "keras" and (engine_model_path is None or shipped.wrapped):  # the IR of what ships
        engine_model_path = steps.engine_model(data_dir, shipped.model_path, best.precision, best.input_size, decoder)
    evaluation = steps.evaluate(shipped.model_path, data_dir, work_dir, best.input_size, batch_size, decoder,
                                engine_model_path, best.precision)
    calibration = steps.calibration_on_test(work_dir, data_dir, shipped.calibration, evaluation.predictions_path)
    history_paths = {f"head:{name}": entry.history_path for name, entry in candidates.items()}
    if exported.history_path:
        history_paths["fine_tune"] = exported.history_path
    plots = steps.plots(work_dir, data_dir, evaluation.predictions_path, evaluation.metrics, history_paths)
    plots["reliability"] = calibration.reliability_plot
    explanations = steps.explain_mistakes(shipped.model_path, data_dir, work_dir, evaluation.predictions_path, decoder)
    logger.info("Test accuracy %s, ROC AUC %s on %d images", decimals4(evaluation.metrics["accuracy"]),
                decimals4(evaluation.metrics["roc_auc"]), evaluation.count)
    if exported.head_agreement > HEAD_AGREEMENT_TOLERANCE:
        logger.warning("The end-to-end model differs from the validated head by up to %.4f in p(dog); "
                       "check that preprocessing and weights match the feature cache.", exported.head_agreement)

    fingerprint = folder.summary_fingerprint()
    result = TrainResult(
        chosen_backbone=chosen, backbones=backbones, test_metrics=evaluation.metrics,
        val_metrics=shipped.val_metrics, model_path=shipped.model_path, engine_model_path=engine_model_path,
        input_size=best.input_size,
        output_dir=work_dir, plots=plots, comparison_path=str(comparison_path), history_paths=history_paths,
        predictions_path=evaluation.predictions_path, metrics_path=str(partial / "metrics.json"),
        fine_tuned=exported.fine_tuned, fine_tune=exported.fine_tune, head_agreement=exported.head_agreement,
        devices=setups[members_run[0]], decoder=decoder, counts=counts, config=config.model_dump(mode="json"),
        config_hash=config.config_hash(), data_dir=data_dir, data_fingerprint=fingerprint, ensemble=ensemble,
        tta=config.tta, calibration=calibration, explanations=explanations)
    return steps.finish_run(result, work_dir, str(final))
