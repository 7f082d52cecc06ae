"""The model that ships: the trained end-to-end model, with test-time augmentation and its temperature around it.

Both are registered layers inside the one saved `.keras` model, wrapped around the trained core
as tasks/learning/layers.py's `wrap` draws it, so the served model, batch prediction, the gate's
test scoring and evaluation all compute the same probabilities, and the pyfunc wrapper knows
nothing of them. With neither, the core itself ships, as before.

The temperature is fitted on the validation split's probabilities of the model it wraps
(tasks/learning/calibration.py): read off the cached features for free (the head on the plain
and, with TTA, the mirrored features), or, after fine-tuning changed the backbone, by scoring
the validation images once with the wrapped model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tasks.common.results import CalibrationSummary
from tasks.data.datafolder import DataFolder


def cached_validation_scores(folder: DataFolder, head_path: Path, cache_dirs: list[Path],
                             mirrored_dirs: list[Path] | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of the head on the cached validation features; with mirrored spaces, the TTA average."""
    import keras

    from tasks.learning.feature_spaces import joint_features, joint_split_features

    head = keras.saving.load_model(head_path, safe_mode=True)
    features, labels, sha256s = joint_split_features(folder, cache_dirs, "validation")

    def scores_of(values: np.ndarray) -> np.ndarray:  # one direct call: no predict function traced per head
        return np.asarray(keras.ops.convert_to_numpy(head(values, training=False)), dtype=np.float64)

    scores = scores_of(features)
    if mirrored_dirs:
        scores = (scores + scores_of(joint_features(mirrored_dirs, sha256s))) / 2
    return labels, (scores.reshape(-1) if scores.shape[-1] == 1 else scores)


class ShippedModel(BaseModel):
    """The saved served model and how its probabilities were calibrated."""

    model_path: str
    tta: str
    calibration: CalibrationSummary
    val_metrics: dict[str, Any]
    """Validation metrics of the served model (with TTA and temperature)."""
    wrapped: bool = False
    """Whether TTA or a temperature now wraps the saved model (so it is no longer the model that was exported)."""


def ship_model(folder: DataFolder, core_path: Path, *, tta: str, fine_tuned: bool, head_path: Path,
               cache_dirs: list[Path], mirrored_dirs: list[Path] | None, batch_size: int,
               decoder: str = "auto") -> ShippedModel:
    """Wrap the saved end-to-end model with TTA and a fitted temperature, and save it in its place.

    Validation scores come from the cached features unless fine-tuning changed the backbone,
    in which case the wrapped model scores the validation images once.
    """
    from tasks.learning.calibration import apply_temperature, calibrate
    from tasks.learning.evaluate import class_metrics, predict_paths
    from tasks.learning.head import save_model
    from tasks.learning.layers import load_saved_model, wrap

    flip = tta == "flip"
    core = load_saved_model(core_path)
    if fine_tuned or (flip and not mirrored_dirs):
        rows = folder.split_rows("validation")
        scores, errors = predict_paths(wrap(core, flip, None), rows["path"].tolist(), int(core.input_shape[1]),
                                       batch_size, decoder=decoder)
        ok = np.array([not error for error in errors], dtype=bool)
        labels, scores = rows["y"].to_numpy()[ok], scores[ok]
    else:
        labels, scores = cached_validation_scores(folder, head_path, cache_dirs, mirrored_dirs if flip else None)
    calibration = calibrate(labels, scores)
    served = wrap(core, flip, calibration.temperature if calibration.applied else None)
    model_path = Path(core_path)
    if served is not core:
        save_model(served, model_path)
    val_metrics = class_metrics(labels, apply_temperature(scores, calibration.temperature), folder.classes())
    return ShippedModel(model_path=str(model_path), tta=tta, calibration=calibration, val_metrics=val_metrics,
                        wrapped=served is not core)
