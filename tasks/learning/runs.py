"""A training run's own files: the backbone comparison, metrics.json and train_summary.json.

Backbones are ranked on the validation split only (highest AUC, then lowest loss, then the
order the config lists them); the test split is read once, after the choice, by evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common.files import atomic_write_json, commit_directory
from tasks.common.results import BackboneResult, TrainResult
from tasks.learning.evaluate import write_csv

COMPARISON_COLUMNS: tuple[str, ...] = (
    "backbone", "chosen", "val_auc", "val_accuracy", "val_loss", "val_auc_tta", "val_accuracy_tta", "val_loss_tta",
    "input_size", "feature_dim", "epochs_run", "best_epoch", "features_computed", "features_reused",
)
"""Columns of comparison.csv, one row per candidate (each backbone, and the ensemble of several), best first.

The `_tta` columns are the same validation scores with test-time augmentation (`--tta flip`),
empty without it; an ensemble has no feature counts of its own (its members' rows have them).
"""

_TTA_KEYS = {"val_auc_tta": "roc_auc", "val_accuracy_tta": "accuracy", "val_loss_tta": "log_loss"}


def rank_backbones(backbones: dict[str, BackboneResult] | dict[str, dict]) -> list[str]:
    """Backbones best first: highest validation AUC, then lowest validation loss, then config order."""
    order = list(backbones)

    def value(name: str, key: str) -> float | None:
        entry = backbones[name]
        return entry[key] if isinstance(entry, dict) else getattr(entry, key)

    def key(name: str) -> tuple[float, float, int]:
        auc, loss = value(name, "val_auc"), value(name, "val_loss")
        return (-(auc if auc is not None else -math.inf), loss if loss is not None else math.inf, order.index(name))

    return sorted(order, key=key)


def write_comparison(backbones: dict[str, BackboneResult], ranking: list[str], target: Path) -> Path:
    """comparison.csv: the backbone comparison table, best first (the first row is the chosen one)."""
    rows = [{"backbone": name, "chosen": index == 0, **comparison_row(backbones[name])}
            for index, name in enumerate(ranking)]
    return write_csv(pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS)), target)


def comparison_row(entry: Any) -> dict[str, Any]:
    """One candidate's comparison columns (after `backbone` and `chosen`); what it lacks is None."""
    tta = getattr(entry, "val_tta", None) or {}
    return {key: tta.get(_TTA_KEYS[key]) if key in _TTA_KEYS else getattr(entry, key, None)
            for key in COMPARISON_COLUMNS[2:]}


def with_tta(val_tta: dict[str, Any] | None) -> str:
    """"" without test-time augmentation, else its validation AUC and loss, for a log line beside the plain ones."""
    if not val_tta:
        return ""
    from tasks.common.numbers import decimals4

    return f"; with TTA val AUC {decimals4(val_tta.get('roc_auc'))}, val loss {decimals4(val_tta.get('log_loss'))}"


def _relocate(value: Any, old: str, new: str) -> Any:
    """Every path string under `old` rewritten to the same place under `new`, recursively."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {key: _relocate(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocate(item, old, new) for item in value]
    return value


def finish_run(result: TrainResult, partial: Path, final: Path) -> TrainResult:
    """Write metrics.json and train_summary.json, then give the run folder its final name.

    The run was built in the hidden `partial` folder; the returned result (and the summary
    file) name the final paths, which exist from the moment the folder is renamed.
    """
    result = TrainResult.model_validate(_relocate(result.model_dump(mode="json"), str(partial), str(final)))
    atomic_write_json(partial / Path(result.metrics_path).name, {
        "chosen_backbone": result.chosen_backbone, "test": result.test_metrics, "validation": result.val_metrics,
        "backbones": {name: {key: getattr(entry, key) for key in ("val_accuracy", "val_loss", "val_auc")}
                      for name, entry in result.backbones.items()},
        **({"ensemble": {key: getattr(result.ensemble, key) for key in ("backbone", "val_accuracy", "val_loss",
                                                                      "val_auc", "val_tta")}}
           if result.ensemble else {}),
        **({"calibration": result.calibration.model_dump(mode="json")} if result.calibration else {}),
    })
    atomic_write_json(partial / "train_summary.json", result.model_dump(mode="json"))
    commit_directory(partial, final)
    return result
