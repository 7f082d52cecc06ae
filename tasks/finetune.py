"""The end-to-end model (pixels in, p(dog) out) and its optional fine-tuning.

The model that ships is always end to end, fine-tuned or not:

    float32 RGB pixels 0..255, (size, size, 3)
      -> augmentation (flip, small rotation, zoom; Keras runs them only when training)
      -> Preprocess (the backbone's own preprocess_input, a registered layer from tasks/backbones.py)
      -> backbone(training=False)  (BatchNorm always in inference mode)
      -> head_normalize -> head_dense -> head_dropout -> head_output (copied from the trained head)
      -> p(dog), float32, shape (batch, 1); cat = 0, dog = 1

Fine-tuning follows the Keras transfer-learning recipe: unfreeze the backbone's top block
(from the spec's `fine_tune_at` layer on), keep every BatchNormalization layer frozen so its
moving statistics never change, use a low learning rate, stop early on validation loss and
keep the best weights. If no fine-tuning epoch beats the head-only model on validation, the
head-only weights are kept: fine-tuning may only make the shipped model better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ConfigError
from tasks.evaluate import binary_metrics, predict_pixels, require_both_classes, split_rows
from tasks.files import atomic_path, atomic_write_json
from tasks.head import (
    HEAD_LAYER_NAMES,
    compile_binary,
    early_stopping,
    history_to_json,
    inference_copy,
    save_model,
)

AUGMENTATION = {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1}
"""Augmentation strengths: a mirrored pet is still the same pet; rotations beyond ~18 degrees are not typical photos."""


@dataclass(frozen=True)
class FineTuneParams:
    """Fine-tuning settings (plain values so a Prefect task can take them as a dict)."""

    epochs: int = 5
    learning_rate: float = 1e-5
    batch_size: int = 32
    patience: int = 3
    seed: int = 42


def augmentation_layers(seed: int) -> list[Any]:
    """Random flip, rotation and zoom; Keras applies them only with training=True (fit), never in predict."""
    import keras

    return [
        keras.layers.RandomFlip(AUGMENTATION["flip"], seed=seed, name="augment_flip"),
        keras.layers.RandomRotation(AUGMENTATION["rotation"], fill_mode="reflect", seed=seed + 1,
                                    name="augment_rotation"),
        keras.layers.RandomZoom(AUGMENTATION["zoom"], fill_mode="reflect", seed=seed + 2, name="augment_zoom"),
    ]


def build_end_to_end(backbone_name: str, weights: str | None, input_size: int, head_path: Path, seed: int = 42) -> Any:
    """Assemble pixels -> augmentation -> Preprocess -> frozen backbone -> trained head.

    The backbone is rebuilt with the same weights the features were extracted with (pass
    `random_weights_file(...)` rather than None for random weights), and the
    head layers are recreated from the saved head's configs with its weights copied, so
    before any fine-tuning this model computes what the head computed on cached features
    (`head_agreement` measures that).
    """
    import keras

    from tasks.backbones import Preprocess, build_backbone, get_backbone

    spec = get_backbone(backbone_name)
    backbone = build_backbone(backbone_name, weights, input_size)
    backbone.trainable = False
    trained_head = keras.saving.load_model(head_path, safe_mode=True)

    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="pixels")
    x = inputs
    for layer in augmentation_layers(seed):
        x = layer(x)
    x = Preprocess(spec.preprocess_mode, name="preprocess")(x)
    x = backbone(x, training=False)
    for name in HEAD_LAYER_NAMES:
        source = trained_head.get_layer(name)
        layer = source.__class__.from_config(source.get_config())
        x = layer(x)
        layer.set_weights(source.get_weights())
    return keras.Model(inputs, x, name=f"catsdogs_{backbone_name}")


def head_agreement(p_end_to_end: np.ndarray, head_path: Path, cache_dir: Path, sha256s: list[str]) -> float:
    """Largest |p(dog) difference| between the end-to-end model and the head on cached features.

    Near zero when preprocessing, resizing and backbone weights match the feature step; a
    large value means the shipped model is not the one that was validated.
    """
    import keras

    from tasks.features import load_features

    if not sha256s:
        return 0.0
    head = keras.saving.load_model(head_path, safe_mode=True)
    p_head = np.asarray(head.predict(load_features(cache_dir, sha256s), verbose=0)).reshape(-1)
    return float(np.max(np.abs(p_head - np.asarray(p_end_to_end).reshape(-1))))


def find_backbone(model: Any) -> Any:
    """The one nested model inside the end-to-end model: the backbone."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected exactly one backbone inside {model.name!r}, found {[m.name for m in nested]}")
    return nested[0]


def batchnorm_layers(model: Any) -> list[Any]:
    """Every BatchNormalization layer in the model, nested ones included."""
    import keras

    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def unfreeze_top(model: Any, backbone_name: str) -> dict[str, int]:
    """Make the backbone's top block trainable, everything below it and every BatchNorm frozen.

    Returns counts for the run record: {"trainable_layers", "frozen_batchnorm", "trainable_weights"}.
    """
    import keras

    from tasks.backbones import fine_tune_start

    backbone = find_backbone(model)
    start = fine_tune_start(backbone, backbone_name)
    backbone.trainable = True
    trainable = 0
    for index, layer in enumerate(backbone.layers):
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and not is_batchnorm
        trainable += int(layer.trainable and bool(layer.weights))
    for layer in batchnorm_layers(model):
        layer.trainable = False
    if trainable == 0:
        raise ConfigError(f"the top block of {backbone_name!r} (from layer {start}) has no weights to fine-tune; "
                          "check fine_tune_at in tasks/backbones.py")
    return {"trainable_layers": trainable, "frozen_batchnorm": len(batchnorm_layers(model)),
            "trainable_weights": len(model.trainable_weights)}


def labelled_dataset(data_dir: Path, split: str, input_size: int, batch_size: int, shuffle_seed: int | None) -> Any:
    """(pixels, label) batches of one split, decoded exactly like the feature extractor does it.

    With a seed, the (path, label) pairs are reshuffled every epoch (seeded, so runs repeat);
    only paths sit in the shuffle buffer, so memory stays flat however large the split.
    """
    import tensorflow as tf

    from tasks.features import decode_and_resize

    rows = split_rows(data_dir, split)
    require_both_classes(rows, split, data_dir)
    paths = [str(Path(data_dir) / relative) for relative in rows["arranged_path"]]
    labels = rows["y"].to_numpy(dtype=np.float32).reshape(-1, 1)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda path, label: (decode_and_resize(tf.io.read_file(path), input_size), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def keep_if_better(model: Any, before: list[np.ndarray], history: dict[str, list[float]],
                   baseline_val_loss: float) -> bool:
    """Keep the fine-tuned weights only if some epoch beat the head-only validation loss; else restore `before`.

    Early stopping restores the best *fine-tuning* epoch, which can still be worse than not
    fine-tuning at all; this closes that gap. Returns whether the fine-tuned weights were kept.
    """
    improved = min(history["val_loss"]) < baseline_val_loss - 1e-6  # float noise is no improvement
    if not improved:
        model.set_weights(before)
    return bool(improved)


def fine_tune_model(model: Any, data_dir: Path, backbone_name: str, input_size: int,
                    params: FineTuneParams, baseline_val_loss: float) -> dict[str, Any]:
    """Fine-tune in place; returns {"history", "baseline_val_loss", "improved", ...unfreeze counts}.

    `baseline_val_loss` is the head-only model's validation loss (see `keep_if_better`).
    """
    import keras

    keras.utils.set_random_seed(params.seed)
    train = labelled_dataset(data_dir, "train", input_size, params.batch_size, shuffle_seed=params.seed)
    validation = labelled_dataset(data_dir, "validation", input_size, params.batch_size, shuffle_seed=None)
    counts = unfreeze_top(model, backbone_name)
    compile_binary(model, params.learning_rate)
    before = model.get_weights()
    history = history_to_json(model.fit(train, validation_data=validation, epochs=params.epochs, shuffle=False,
                                        callbacks=[early_stopping(params.patience)], verbose=0).history)
    improved = keep_if_better(model, before, history, baseline_val_loss)
    return {"history": history, "baseline_val_loss": float(baseline_val_loss), "improved": improved, **counts}


def export_model(data_dir: Path, output_dir: Path, backbone_name: str, weights: str | None, input_size: int,
                 head_path: Path, cache_dir: Path, fine_tune: bool, params: FineTuneParams) -> dict[str, Any]:
    """Build the end-to-end model, fine-tune it if asked, save output_dir/model.keras.

    Returns {"model_path", "fine_tuned" (the saved weights come from fine-tuning),
    "history_path" (None without fine-tuning), "val_metrics" (of the saved model),
    "head_agreement" (see `head_agreement`), "fine_tune": details or None}.
    """
    model = build_end_to_end(backbone_name, weights, input_size, head_path, seed=params.seed)
    rows = split_rows(data_dir, "validation")
    p_dog = predict_pixels(model, data_dir, rows["arranged_path"].tolist(), input_size, params.batch_size)
    agreement = head_agreement(p_dog, head_path, cache_dir, rows["sha256"].tolist())
    val_metrics = binary_metrics(rows["y"].to_numpy(), p_dog)
    details: dict[str, Any] | None = None
    history_path: str | None = None
    output_dir = Path(output_dir)
    if fine_tune:
        details = fine_tune_model(model, data_dir, backbone_name, input_size, params, val_metrics["log_loss"])
        history_path = str(atomic_write_json(output_dir / "fine_tune.history.json", details.pop("history")))
        details["params"] = asdict(params)
        if details["improved"]:
            p_dog = predict_pixels(model, data_dir, rows["arranged_path"].tolist(), input_size, params.batch_size)
            val_metrics = binary_metrics(rows["y"].to_numpy(), p_dog)
    model_path = save_model(inference_copy(model), output_dir / "model.keras")
    return {"model_path": str(model_path), "fine_tuned": bool(details and details["improved"]),
            "history_path": history_path, "val_metrics": val_metrics, "head_agreement": agreement,
            "fine_tune": details}


@task(name="build-and-fine-tune", cache_policy=NO_CACHE)
def export_model_task(data_dir: str, output_dir: str, backbone: str, weights: str | None, input_size: int,
                      head_path: str, cache_dir: str, fine_tune: bool, params: dict[str, Any]) -> dict[str, Any]:
    """End-to-end model from the chosen backbone and its head, fine-tuned when asked, saved as .keras."""
    return export_model(Path(data_dir), Path(output_dir), backbone, weights, input_size, Path(head_path),
                        Path(cache_dir), fine_tune, FineTuneParams(**params))
