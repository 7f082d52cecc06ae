"""The ensemble candidate: one head on the concatenated cached features of several backbones.

The best frozen-feature results on Dogs vs. Cats come from concatenating several backbones'
pooled features under one dense layer (ResNet50 + Xception + InceptionV3: 99.6% validation
accuracy, Kaggle log loss 0.041, in the public ypwhs/dogs_vs_cats write-up). With the features
cached, that head costs what a single backbone's does, so whenever several backbones are given
it is one more candidate, ranked on validation with the single ones (tasks/learning/runs.py).

Its name is its members joined by "+" ("vgg16+mobilenet_v2"), which is what the comparison,
the logs and `chosen_backbone` show. Members share one input size, since one image feeds them
all; backbones of another size (InceptionV3's native 299 beside 224) are left out of it, and
the log says so. Chosen, it is served end to end: one uint8 input, the shared augmentation,
then per member its own `Preprocess` and backbone, their pooled features concatenated, the
head. Each backbone runs once per image. It is not fine-tuned (unfreezing several backbones on
a CPU costs hours); its frozen backbones are the ones its features came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.results import BackboneResult, EnsembleResult
from tasks.data.datafolder import DataFolder
from tasks.learning.head import HeadParams, train_head_on
from tasks.learning.head_input import HEAD_LAYER_NAMES

SEPARATOR = "+"
"""Joins the members' names into the candidate's name."""

FEATURES_LAYER = "ensemble_features"
"""The Concatenate layer of the served ensemble (Grad-CAM finds the head after it by name)."""


def ensemble_name(members: list[str]) -> str:
    return SEPARATOR.join(members)


def is_ensemble(name: str) -> bool:
    return SEPARATOR in name


def preprocess_layer_name(backbone_model_name: str) -> str:
    """The name of a member's own `Preprocess` layer in the served ensemble, from its backbone model's name."""
    return f"preprocess_{backbone_model_name}"


def ensemble_members(backbones: dict[str, BackboneResult]) -> tuple[list[str], str]:
    """The backbones an ensemble can join (the largest group of one input size, config order) and why others are not in it.

    Fewer than two such backbones: no ensemble (an empty list), and the reason.
    """
    if len(backbones) < 2:
        return [], "one backbone: no ensemble"
    sizes = Counter(entry.input_size for entry in backbones.values())
    size, count = max(sizes.items(), key=lambda item: (item[1], -list(sizes).index(item[0])))
    if count < 2:
        return [], f"no two backbones share an input size ({dict(sizes)}), and one image feeds an ensemble"
    members = [name for name, entry in backbones.items() if entry.input_size == size]
    left_out = [name for name in backbones if name not in members]
    why = f"left out {left_out}: their input size is not {size}" if left_out else "every backbone joins"
    return members, why


def train_ensemble_head(folder: DataFolder, backbones: dict[str, BackboneResult], members: list[str],
                        output_dir: Path, params: HeadParams, callbacks: list[Any] | None = None,
                        leave_out: frozenset[str] = frozenset()) -> EnsembleResult:
    """Fit the head on the members' concatenated cached features (and their mirrors' for TTA when cached), without
    the train images in `leave_out` (the members' suspected labels, with exclude_suspected_labels)."""
    entries = [backbones[name] for name in members]
    mirrored = [entry.mirrored_cache_dir for entry in entries]
    head = train_head_on(folder, [Path(entry.feature_cache_dir) for entry in entries], Path(output_dir),
                         ensemble_name(members), params, callbacks,
                         mirrored_dirs=[Path(path) for path in mirrored] if all(mirrored) else None,
                         leave_out=leave_out)
    scores = {key: getattr(head, key) for key in ("head_path", "history_path", "val_accuracy", "val_loss", "val_auc",
                                                  "epochs_run", "best_epoch", "val_tta")}
    return EnsembleResult(**scores, backbone=head.backbone, members=list(members), input_size=entries[0].input_size,
                          feature_dim=head.feature_dim)


@dataclass(frozen=True)
class Member:
    """What rebuilds one member's backbone exactly as its features were computed."""

    backbone: str
    weights: str
    precision: str


def build_ensemble_end_to_end(members: list[Member], input_size: int, head_path: Path, seed: int = 42) -> Any:
    """pixels -> augmentation -> per member: its Preprocess -> its frozen backbone -> concatenation -> the trained head.

    Augmentation (training only) runs once on the 0..255 pixels, before the members' own
    scalings, so every member sees the same augmented image; it commutes with their per-channel
    affine preprocessing as in the single-backbone model.
    """
    import keras

    from tasks.learning.backbones import build_backbone, get_backbone
    from tasks.learning.finetune import augmentation_layers
    from tasks.learning.preprocess import Preprocess

    trained_head = keras.saving.load_model(head_path, safe_mode=True)
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name="pixels")
    x = _cast_float(inputs)
    for layer in augmentation_layers(seed):
        x = layer(x)
    features = []
    for member in members:
        backbone = build_backbone(member.backbone, member.weights, input_size, member.precision)
        backbone.trainable = False
        branch = Preprocess(get_backbone(member.backbone).preprocess_mode,
                            name=preprocess_layer_name(backbone.name))(x)
        features.append(backbone(branch, training=False))
    y = keras.layers.Concatenate(name=FEATURES_LAYER, dtype="float32")(features)
    for name in HEAD_LAYER_NAMES:
        source = trained_head.get_layer(name)
        layer = source.__class__.from_config(source.get_config())
        y = layer(y)
        layer.set_weights(source.get_weights())
    return keras.Model(inputs, y, name=f"catsdogs_{ensemble_name([m.backbone for m in members])}".replace("+", "_"))


def _cast_float(inputs: Any) -> Any:
    """The uint8 pixels as float32 0..255 (a registered Preprocess in mode "none"), for the shared augmentation."""
    from tasks.learning.preprocess import Preprocess

    return Preprocess("none", name="pixels_float")(inputs)


def export_ensemble(folder: DataFolder, output_dir: Path, members: list[Member], input_size: int, head_path: Path,
                    cache_dirs: list[Path], batch_size: int, *, decoder: str = "auto") -> Any:
    """Build the served ensemble, score validation with it, compare with its head on cached features, save model.keras.

    Returns an `ExportedModel` like `export_model` (never fine-tuned).
    """
    from tasks.learning.evaluate import class_metrics, predict_paths
    from tasks.learning.finetune import ExportedModel, head_agreement
    from tasks.learning.head import inference_copy, save_model

    model = build_ensemble_end_to_end(members, input_size, head_path)
    rows = folder.split_rows("validation")
    scores, errors = predict_paths(model, rows["path"].tolist(), input_size, batch_size, decoder=decoder)
    ok = np.array([not error for error in errors], dtype=bool)
    agreement = head_agreement(scores[ok], head_path, cache_dirs, rows["sha256"][ok].tolist())
    val_metrics = class_metrics(rows["y"].to_numpy()[ok], scores[ok], folder.classes())
    model_path = save_model(inference_copy(model), Path(output_dir) / "model.keras")
    return ExportedModel(model_path=str(model_path), fine_tuned=False, history_path=None, val_metrics=val_metrics,
                         head_agreement=agreement, fine_tune=None)
