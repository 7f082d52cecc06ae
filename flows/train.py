"""The `train_model` flow: from a prepared data folder to a saved, evaluated end-to-end model.

A recipe of task calls, no ML inside:

    check the prepared folder -> configure devices
    for each backbone: extract (cached) features -> train a head -> validation metrics
    comparison table -> choose the best backbone (validation AUC, then validation loss)
    -> end-to-end model (optionally fine-tuned) -> evaluate on the test split -> plots

Between tasks travel paths and small dicts; features, images and models stay on disk.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import TrainConfig
from tasks.backbones import resolve_weights
from tasks.evaluate import evaluate_task, labelled_counts_task, write_csv
from tasks.features import extract_features_task
from tasks.files import atomic_write_json
from tasks.finetune import FineTuneParams, export_model_task
from tasks.head import HeadParams, train_head_task
from tasks.plots import plots_task

COMPARISON_COLUMNS: tuple[str, ...] = (
    "backbone", "chosen", "val_auc", "val_accuracy", "val_loss", "input_size", "feature_dim",
    "epochs_run", "best_epoch", "features_computed", "features_reused",
)
"""Columns of comparison.csv, one row per backbone, best first."""

HEAD_AGREEMENT_TOLERANCE = 1e-3
"""Largest p(dog) gap between the end-to-end model and the head on cached features before the flow warns."""


@task(name="configure-devices", cache_policy=NO_CACHE)
def configure_devices_task(mixed_precision: bool) -> dict[str, Any]:
    """GPU memory growth and the dtype policy (a clean no-op on CPU)."""
    from tasks.devices import configure_devices

    return configure_devices(mixed_precision)


@task(name="resolve-weights", cache_policy=NO_CACHE)
def resolve_weights_task(data_dir: str, backbone: str, weights: str | None, seed: int) -> str:
    """The weights every step of this backbone uses: None becomes the folder's kept random draw."""
    return resolve_weights(data_dir, backbone, weights, seed)


def default_output_dir(data_dir: Path, config: TrainConfig, now: datetime | None = None) -> Path:
    """data_dir/training/<UTC timestamp>-<config hash[:8]>: sortable by time, grouped by config."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = Path(data_dir) / "training" / f"{stamp}-{config.config_hash()[:8]}"
    candidate, counter = base, 1
    while candidate.exists():  # two runs in the same second never share a folder
        counter += 1
        candidate = base.with_name(f"{base.name}-{counter}")
    return candidate


def head_params(config: TrainConfig) -> dict[str, Any]:
    """The config's head settings as the plain dict the head task takes."""
    return asdict(HeadParams(dense_units=config.dense_units, dropout=config.dropout,
                             learning_rate=config.head_learning_rate, epochs=config.head_epochs,
                             batch_size=config.head_batch_size, patience=config.patience, seed=config.seed))


def fine_tune_params(config: TrainConfig) -> dict[str, Any]:
    """The config's fine-tuning settings as the plain dict the export task takes."""
    return asdict(FineTuneParams(epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate,
                                 batch_size=config.batch_size, patience=config.patience, seed=config.seed))


def backbone_summary(features: dict[str, Any], head: dict[str, Any], input_size: int, weights: str) -> dict[str, Any]:
    """Per-backbone entry of the result: validation metrics, cache counters and file paths."""
    return {
        "val_accuracy": head["val_accuracy"], "val_loss": head["val_loss"], "val_auc": head["val_auc"],
        "input_size": input_size, "feature_dim": head["feature_dim"], "weights": weights,
        "epochs_run": head["epochs_run"], "best_epoch": head["best_epoch"],
        "features_computed": int(features["computed"]), "features_reused": int(features["reused"]),
        "feature_cache_dir": str(features["cache_dir"]),
        "head_path": head["head_path"], "history_path": head["history_path"],
    }


def rank_backbones(backbones: dict[str, dict[str, Any]]) -> list[str]:
    """Backbones best first: highest validation AUC, then lowest validation loss, then config order."""
    order = list(backbones)

    def key(name: str) -> tuple[float, float, int]:
        auc = backbones[name]["val_auc"]
        loss = backbones[name]["val_loss"]
        return (-(auc if auc is not None else -math.inf), loss if loss is not None else math.inf, order.index(name))

    return sorted(order, key=key)


def write_comparison(backbones: dict[str, dict[str, Any]], ranking: list[str], target: Path) -> Path:
    """comparison.csv: the backbone comparison table, best first (the first row is the chosen one)."""
    rows = [{"backbone": name, "chosen": index == 0, **{k: backbones[name].get(k) for k in COMPARISON_COLUMNS[2:]}}
            for index, name in enumerate(ranking)]
    return write_csv(pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS)), target)


def data_fingerprint(data_dir: Path) -> str | None:
    """The prepared dataset's fingerprint from prepare_summary.json, when prepare_data wrote one."""
    summary = Path(data_dir) / "prepare_summary.json"
    try:
        return json.loads(summary.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def run_summary(config: TrainConfig, data_dir: Path, output_dir: Path, chosen: str, backbones: dict[str, Any],
                exported: dict[str, Any], evaluation: dict[str, Any], comparison_path: Path,
                history_paths: dict[str, str], plots: dict[str, str], devices: dict[str, Any],
                counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The flow's return value (CONTRACTS.md, issue 3), plus metrics.json for people and tools."""
    metrics_path = atomic_write_json(output_dir / "metrics.json", {
        "chosen_backbone": chosen, "test": evaluation["metrics"], "validation": exported["val_metrics"],
        "backbones": {name: {key: summary[key] for key in ("val_accuracy", "val_loss", "val_auc")}
                      for name, summary in backbones.items()},
    })
    return {
        "chosen_backbone": chosen,
        "backbones": backbones,
        "test_metrics": evaluation["metrics"],
        "val_metrics": exported["val_metrics"],
        "model_path": exported["model_path"],
        "input_size": int(backbones[chosen]["input_size"]),
        "output_dir": str(output_dir),
        "plots": plots,
        "comparison_path": str(comparison_path),
        "history_paths": history_paths,
        "predictions_path": evaluation["predictions_path"],
        "metrics_path": str(metrics_path),
        "fine_tuned": exported["fine_tuned"],
        "fine_tune": exported["fine_tune"],
        "head_agreement": exported["head_agreement"],
        "devices": devices,
        "counts": counts,
        "config": config.model_dump(mode="json"),
        "config_hash": config.config_hash(),
        "data_dir": str(data_dir),
        "data_fingerprint": data_fingerprint(data_dir),
    }


@flow(name="train_model")
def train_model(data_dir: str | Path, config: TrainConfig | None = None,
                output_dir: str | Path | None = None) -> dict[str, Any]:
    """Train heads on cached features for each backbone, keep the best, optionally fine-tune, evaluate on test.

    Returns the run summary (also written to output_dir/train_summary.json): chosen backbone,
    per-backbone validation metrics, test metrics, and the paths of model.keras, plots,
    comparison.csv, histories and predictions.csv. See CONTRACTS.md (issue 3).
    """
    logger = get_run_logger()
    config = config or TrainConfig()
    data_dir = Path(data_dir).expanduser().resolve()
    output_dir = Path(output_dir).expanduser().resolve() if output_dir else default_output_dir(data_dir, config)
    logger.info("Training %s on %s into %s", config.backbones, data_dir, output_dir)

    counts = labelled_counts_task(str(data_dir))
    output_dir.mkdir(parents=True, exist_ok=True)  # claims the run folder name early
    devices = configure_devices_task(config.mixed_precision)
    backbones: dict[str, dict[str, Any]] = {}
    for name in config.backbones:
        input_size = config.input_size_for(name)
        weights = resolve_weights_task(str(data_dir), name, config.weights, config.seed)
        features = extract_features_task(str(data_dir), name, weights, input_size, config.batch_size)
        head = train_head_task(str(data_dir), features["cache_dir"], str(output_dir), name, head_params(config))
        backbones[name] = backbone_summary(features, head, input_size, weights)
        logger.info("%s: %d features computed, %d reused; head val AUC %s, val loss %.4f", name,
                    features["computed"], features["reused"], head["val_auc"], head["val_loss"])

    ranking = rank_backbones(backbones)
    chosen = ranking[0]
    comparison_path = write_comparison(backbones, ranking, output_dir / "comparison.csv")
    input_size = backbones[chosen]["input_size"]
    logger.info("Chosen backbone: %s (ranking %s)", chosen, ranking)

    best = backbones[chosen]
    exported = export_model_task(str(data_dir), str(output_dir), chosen, best["weights"], input_size, best["head_path"],
                                 best["feature_cache_dir"], config.fine_tune, fine_tune_params(config))
    evaluation = evaluate_task(exported["model_path"], str(data_dir), str(output_dir), input_size, config.batch_size)
    history_paths = {f"head:{name}": summary["history_path"] for name, summary in backbones.items()}
    if exported["history_path"]:
        history_paths["fine_tune"] = exported["history_path"]
    plots = plots_task(str(output_dir), str(data_dir), evaluation["predictions_path"], evaluation["metrics"],
                       history_paths)
    logger.info("Test accuracy %.4f, ROC AUC %s on %d images", evaluation["metrics"]["accuracy"],
                evaluation["metrics"]["roc_auc"], evaluation["count"])

    if exported["head_agreement"] > HEAD_AGREEMENT_TOLERANCE:
        logger.warning("The end-to-end model differs from the validated head by up to %.4f in p(dog); "
                       "check that preprocessing and weights match the feature cache.", exported["head_agreement"])
    result = run_summary(config, data_dir, output_dir, chosen, backbones, exported, evaluation,
                         comparison_path, history_paths, plots, devices, counts)
    atomic_write_json(output_dir / "train_summary.json", result)
    return result
