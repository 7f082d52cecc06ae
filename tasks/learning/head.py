"""The classifier head: a small dense network trained on cached bottleneck features.

Training on cached features instead of images is what makes comparing backbones cheap: the
backbone ran once per image (tasks/learning/features.py), and an epoch over 25,000 ResNet50 vectors
(2048 floats) takes about a second on a 2-core CPU. The end-to-end model (tasks/learning/finetune.py)
recreates these layers from the saved head by name (HEAD_LAYER_NAMES) with their weights.
Two classes end in Dense(1, sigmoid) = p(label 1) (cat = 0, dog = 1 by default); more end in
Dense(N, softmax), trained with sparse categorical cross-entropy on the label indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.devices import keras_without_tensorflow, seed_everything
from tasks.common.files import atomic_path, atomic_write_json
from tasks.common.results import HeadScores
from tasks.data.datafolder import DataFolder
from tasks.learning.evaluate import class_metrics
from tasks.learning.head_input import HEAD_LAYER_NAMES


VARIANCE_FLOOR = 0.01
"""Share of the features' mean variance added to each feature's variance before standardising.

Pooled features of a backbone include near-constant ones (a ReLU that hardly fires on these
images). Divided by their own tiny spread, their noise would dominate every other feature: on
small datasets the head then fits that noise (measured: a randomly initialised ResNet50 at
32 px gave test accuracy 0.75 and ROC AUC 0.59-0.75 on three draws of generated images,
VGG16 once 0.75; with this floor 1.0 on all, and no change for backbones without such features).
"""


@dataclass(frozen=True)
class HeadParams:
    """Hyperparameters of one head fit (plain values, so a Prefect task can take them as a dict)."""

    dense_units: int = 256
    dropout: float = 0.5
    learning_rate: float = 1e-3
    epochs: int = 30
    batch_size: int = 256
    patience: int = 3
    seed: int = 42
    class_weight: str = "none"


def output_units(n_classes: int) -> int:
    """One sigmoid unit for two classes (p of label 1), one softmax unit per class for more."""
    return 1 if n_classes == 2 else n_classes


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """n_samples / (n_classes * count) per label (scikit-learn's "balanced"): each class weighs the same in the loss.

    A class absent from `labels` gets weight 0 (nothing of it to weigh); split_rows refuses that anyway.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=n_classes)
    total = int(counts.sum())
    return {index: (total / (n_classes * int(n)) if n else 0.0) for index, n in enumerate(counts)}


def class_weights(mode: str, labels: np.ndarray, n_classes: int) -> dict[int, float] | None:
    """Keras `class_weight` for the config's `class_weight` ("none" or "balanced")."""
    if mode == "none":
        return None
    if mode == "balanced":
        return balanced_class_weights(labels, n_classes)
    raise ValueError(f"class_weight {mode!r} is not one of none, balanced")


def head_layers(dense_units: int, dropout: float, mean: np.ndarray, variance: np.ndarray, seed: int,
                n_classes: int = 2) -> list[Any]:
    """Standardise -> Dense(relu) -> Dropout -> Dense(1, sigmoid) = p(dog), or Dense(N, softmax) for N classes.

    Standardising with the training features' mean and variance (fixed numbers in the
    layer's config, not trained; the variance floored, see VARIANCE_FLOOR) makes one learning
    rate work for every backbone, whose pooled features range from ~1e-3 (EfficientNetV2) to
    ~10 (ResNet50). Initialisers and
    dropout get explicit seeds: Keras would otherwise draw them from Python's process-wide
    `random`, which Prefect's background threads also consume. The output stays float32
    under mixed precision.
    """
    import keras

    return [
        keras.layers.Normalization(mean=mean, variance=variance, name=HEAD_LAYER_NAMES[0]),
        keras.layers.Dense(dense_units, activation="relu", name=HEAD_LAYER_NAMES[1],
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
        keras.layers.Dropout(dropout, seed=seed + 1, name=HEAD_LAYER_NAMES[2]),
        keras.layers.Dense(output_units(n_classes), activation="sigmoid" if n_classes == 2 else "softmax",
                           dtype="float32", name=HEAD_LAYER_NAMES[3],
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2)),
    ]


def build_head(train_x: np.ndarray, dense_units: int, dropout: float, seed: int = 42, n_classes: int = 2) -> Any:
    """The head as a model over feature vectors, standardised with `train_x`'s statistics."""
    import keras

    features = np.asarray(train_x, dtype=np.float64)
    variance = features.var(axis=0)
    inputs = keras.Input(shape=(features.shape[1],), name="features")
    outputs = inputs
    for layer in head_layers(dense_units, dropout, features.mean(axis=0), variance + VARIANCE_FLOOR * variance.mean(),
                             seed, n_classes):
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name="head")


def compile_binary(model: Any, learning_rate: float) -> None:
    """Adam + binary cross-entropy, with accuracy and AUC logged per epoch (head and fine-tuning alike)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def compile_classifier(model: Any, learning_rate: float, n_classes: int) -> None:
    """`compile_binary` for two classes; Adam + sparse categorical cross-entropy and accuracy for more."""
    import keras

    if n_classes == 2:
        compile_binary(model, learning_rate)
        return
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def target_array(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as Keras wants them: (n, 1) floats for the sigmoid, (n,) label indices for the softmax."""
    labels = np.asarray(labels)
    return labels.astype(np.float32).reshape(-1, 1) if n_classes == 2 else labels.astype(np.int64).reshape(-1)


def early_stopping(patience: int) -> Any:
    """Stop when validation loss stops improving and keep the best epoch's weights, not the last."""
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def history_to_json(history: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Keras history values as plain floats (numpy scalars are not JSON)."""
    return {key: [float(value) for value in values] for key, values in history.items()}


def fit_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             params: HeadParams, callbacks: list[Any] | None = None,
             n_classes: int = 2) -> tuple[Any, dict[str, list[float]]]:
    """Train a head on feature arrays; returns (model with the best validation weights, history).

    Seeded layers plus seeding Python, NumPy and the backend (batch shuffling) right before the fit
    make it reproducible: the same features and params give the same weights in any process.
    """
    train_x = np.asarray(train_x, dtype=np.float32)
    val_x = np.asarray(val_x, dtype=np.float32)
    weights = class_weights(params.class_weight, train_y, n_classes)
    train_y = target_array(train_y, n_classes)
    val_y = target_array(val_y, n_classes)
    if train_x.ndim != 2 or len(train_x) == 0 or len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError(f"features must be (n, d) with one label per row; got {train_x.shape}/{train_y.shape} "
                         f"and {val_x.shape}/{val_y.shape}")
    if val_x.ndim != 2 or val_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"validation features have shape {val_x.shape}, expected (n, {train_x.shape[1]})")
    seed_everything(params.seed)
    model = build_head(train_x, params.dense_units, params.dropout, params.seed, n_classes)
    compile_classifier(model, params.learning_rate, n_classes)
    history = model.fit(
        train_x, train_y, validation_data=(val_x, val_y), epochs=params.epochs,
        batch_size=params.batch_size, shuffle=True, callbacks=[early_stopping(params.patience), *(callbacks or [])], verbose=0,
        class_weight=weights,
    )
    return model, history_to_json(history.history)


def best_epoch(history: dict[str, list[float]]) -> int:
    """1-based epoch with the lowest validation loss: the one early stopping restored."""
    return int(np.argmin(history["val_loss"])) + 1


def inference_copy(model: Any) -> Any:
    """The same layers and weights as a new, uncompiled model: what ships carries no optimizer state.

    Saving the compiled model would store Adam's moments (twice the trainable weights) and a
    compile config that loaders then try to restore; a served model needs neither.
    """
    import keras

    return keras.Model(model.input, model.output, name=model.name)


def save_model(model: Any, target: Path) -> Path:
    """Atomic `.keras` save (Keras infers the format from the suffix, hence the suffixed temp name)."""
    keras_without_tensorflow()  # saving looks for TensorFlow's types otherwise
    with atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)
    return Path(target)


class HeadResult(HeadScores):
    """One trained head, with what it was trained on."""

    backbone: str
    train_count: int
    val_count: int
    feature_dim: int
    params: dict[str, Any]
    left_out: int = 0
    """Train images left out as suspected label errors (`leave_out`, train hashes only)."""


def train_head(folder: DataFolder, cache_dir: Path, output_dir: Path, backbone: str, params: HeadParams,
               callbacks: list[Any] | None = None, *, mirrored_dir: Path | None = None,
               leave_out: frozenset[str] = frozenset()) -> HeadResult:
    """Fit the head for one backbone, save it and its history; return paths and validation metrics.

    Writes output_dir/heads/<backbone>.keras and output_dir/heads/<backbone>.history.json.
    Validation metrics are recomputed from the restored weights (not read off the last
    epoch), so they describe the head that is saved. With `mirrored_dir` (the feature space of
    the mirrored images, `--tta flip`) the validation metrics with test-time augmentation
    come too (`val_tta`). Train images whose sha256 is in `leave_out` are not trained on (the
    data audit's suspects, with exclude_suspected_labels).
    """
    return train_head_on(folder, [cache_dir], output_dir, backbone, params, callbacks,
                         mirrored_dirs=[mirrored_dir] if mirrored_dir else None, leave_out=leave_out)



def train_head_on(folder: DataFolder, cache_dirs: list[Path], output_dir: Path, name: str, params: HeadParams,
                  callbacks: list[Any] | None = None, *, mirrored_dirs: list[Path] | None = None,
                  leave_out: frozenset[str] = frozenset()) -> HeadResult:
    """`train_head` on the concatenated features of one or more feature spaces (an ensemble's backbones)."""
    from tasks.learning.callbacks import training_progress
    from tasks.learning.feature_spaces import joint_features, joint_split_features

    train_x, train_y, _ = joint_split_features(folder, cache_dirs, "train", leave_out)
    val_x, val_y, val_sha256s = joint_split_features(folder, cache_dirs, "validation")
    classes = folder.classes()
    n_classes = len(classes.names)
    progress = training_progress(f"Training the {name} head", params.epochs)
    model, history = fit_head(train_x, train_y, val_x, val_y, params, [progress, *(callbacks or [])], n_classes)

    def scores_of(features: np.ndarray) -> np.ndarray:
        scores = np.asarray(model.predict(features, batch_size=params.batch_size, verbose=0))
        return scores.reshape(-1) if n_classes == 2 else scores

    scores = scores_of(val_x)
    metrics = class_metrics(val_y, scores, classes)
    val_tta = None
    if mirrored_dirs:
        averaged = (scores + scores_of(joint_features(mirrored_dirs, val_sha256s))) / 2
        val_tta = {key: class_metrics(val_y, averaged, classes)[key] for key in ("accuracy", "log_loss", "roc_auc")}
    heads_dir = Path(output_dir) / "heads"
    head_path = save_model(inference_copy(model), heads_dir / f"{name}.keras")
    history_path = atomic_write_json(heads_dir / f"{name}.history.json", history)
    return HeadResult(backbone=name, head_path=str(head_path), history_path=str(history_path),
                      val_accuracy=metrics["accuracy"], val_loss=metrics["log_loss"], val_auc=metrics["roc_auc"],
                      epochs_run=len(history["loss"]), best_epoch=best_epoch(history), train_count=int(len(train_y)),
                      val_count=int(len(val_y)), feature_dim=int(train_x.shape[1]), params=asdict(params),
                      val_tta=val_tta, left_out=len(leave_out))
