"""The end-to-end model (pixels in, p(dog) out) and its optional fine-tuning.

The model that ships is always end to end, fine-tuned or not:

    uint8 RGB pixels, (size, size, 3)            (from the one input pipeline, tasks/learning/pixels.py)
      -> Preprocess (the backbone's own preprocess_input, float32; tasks/learning/preprocess.py)
      -> augmentation (flip, small rotation, zoom; Keras runs them only when training; they commute
         with Preprocess's per-channel affine scaling, so augmenting after it is the same)
      -> backbone(training=False)  (BatchNorm always in inference mode; at the run's precision)
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
from pydantic import BaseModel

from tasks.common.devices import seed_everything
from tasks.common.errors import ConfigError
from tasks.common.files import atomic_write_json
from tasks.common.results import FineTuneReport
from tasks.data.datafolder import DataFolder
from tasks.learning.evaluate import class_metrics, predict_paths
from tasks.learning.head import (
    HEAD_LAYER_NAMES,
    class_weights,
    compile_classifier,
    early_stopping,
    history_to_json,
    inference_copy,
    save_model,
)

ENGINE_MODEL_DIR = "model.openvino"
"""Where a run on the OpenVINO engine keeps its shipped model's IR, beside model.keras."""

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
    class_weight: str = "none"


def augmentation_layers(seed: int) -> list[Any]:
    """Random flip, rotation and zoom; Keras applies them only with training=True (fit), never in predict."""
    import keras

    return [
        keras.layers.RandomFlip(AUGMENTATION["flip"], seed=seed, name="augment_flip", dtype="float32"),
        keras.layers.RandomRotation(AUGMENTATION["rotation"], fill_mode="reflect", seed=seed + 1,
                                    name="augment_rotation", dtype="float32"),
        keras.layers.RandomZoom(AUGMENTATION["zoom"], fill_mode="reflect", seed=seed + 2, name="augment_zoom",
                                dtype="float32"),
    ]


def build_end_to_end(backbone_name: str, weights: str | None, input_size: int, head_path: Path, seed: int = 42,
                     precision: str = "float32") -> Any:
    """Assemble pixels -> Preprocess -> augmentation -> frozen backbone -> trained head.

    The backbone is rebuilt with the same weights the features were extracted with (pass
    `random_weights_file(...)` rather than None for random weights), and the
    head layers are recreated from the saved head's configs with its weights copied, so
    before any fine-tuning this model computes what the head computed on cached features
    (`head_agreement` measures that).
    """
    import keras

    from tasks.learning.backbones import build_backbone, get_backbone
    from tasks.learning.preprocess import Preprocess

    spec = get_backbone(backbone_name)
    backbone = build_backbone(backbone_name, weights, input_size, precision)
    backbone.trainable = False
    trained_head = keras.saving.load_model(head_path, safe_mode=True)

    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name="pixels")
    x = Preprocess(spec.preprocess_mode, name="preprocess")(inputs)
    for layer in augmentation_layers(seed):
        x = layer(x)
    x = backbone(x, training=False)
    for name in HEAD_LAYER_NAMES:
        source = trained_head.get_layer(name)
        layer = source.__class__.from_config(source.get_config())
        x = layer(x)
        layer.set_weights(source.get_weights())
    return keras.Model(inputs, x, name=f"catsdogs_{backbone_name}")


def head_agreement(p_end_to_end: np.ndarray, head_path: Path, cache_dir: Path | list[Path],
                   sha256s: list[str]) -> float:
    """Largest |p(dog) difference| (any class's probability for N classes) between the end-to-end model
    and the head on cached features (an ensemble's: the list of its backbones' feature spaces).

    Near zero when preprocessing, resizing and backbone weights match the feature step; a
    large value means the shipped model is not the one that was validated.
    """
    import keras

    from tasks.learning.feature_spaces import joint_features

    if not sha256s:
        return 0.0
    head = keras.saving.load_model(head_path, safe_mode=True)
    features = joint_features(cache_dir if isinstance(cache_dir, list) else [cache_dir], sha256s)
    p_head = np.asarray(head.predict(features, verbose=0)).reshape(-1)  # (n,) or (n * N,)
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

    from tasks.learning.backbones import fine_tune_start

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
                          "check fine_tune_at in tasks/learning/backbones.py")
    return {"trainable_layers": trainable, "frozen_batchnorm": len(batchnorm_layers(model)),
            "trainable_weights": len(model.trainable_weights)}


def labelled_batches(folder: DataFolder, split: str, input_size: int, batch_size: int,
                     shuffle_seed: int | None, *, decoder: str = "auto",
                     class_weight: dict[int, float] | None = None, leave_out: frozenset[str] = frozenset()) -> Any:
    """(uint8 pixels, label, weight) batches of one split, decoded by the one input pipeline.

    A `keras.utils.PyDataset`, so Keras' fit runs it on every backend. With a seed the order is
    reshuffled every epoch (seeded, so runs repeat). An image that cannot be decoded gets
    weight 0: it is skipped by the loss instead of failing the epoch. `class_weight` (label ->
    weight) multiplies each image's weight: the one way to weigh classes that works with
    per-image weights on every backend. Labels are (n, 1) floats for two classes, indices for more.
    Images whose sha256 is in `leave_out` are not in it (the audit's suspects, when asked).
    """
    import keras

    from tasks.learning.pixels import Decoder

    from tasks.learning.head import target_array

    rows = folder.split_rows(split)
    rows = rows[~rows["sha256"].isin(leave_out)] if leave_out else rows
    paths = rows["path"].tolist()
    labels = target_array(rows["y"].to_numpy(), len(folder.classes().names))
    weights = np.ones(len(paths), dtype=np.float32) if not class_weight else \
        rows["y"].map(class_weight).to_numpy(dtype=np.float32)

    class Batches(keras.utils.PyDataset):
        """Keras asks for batches 0..n-1 in order each epoch; the decoder runs two batches ahead of it."""

        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder(input_size, batch_size, decoder=decoder)
            self.epoch = 0
            self.order = self._order()
            self._stream: Any = None
            self._next = 0

        def _order(self) -> np.ndarray:
            if shuffle_seed is None:
                return np.arange(len(paths))
            return np.random.default_rng([shuffle_seed, self.epoch]).permutation(len(paths))

        def __len__(self) -> int:
            return -(-len(paths) // batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if self._stream is None or index != self._next:
                self._stream = self.decoder.batches([paths[i] for i in self.order[index * batch_size:]])
            batch = next(self._stream)
            self._next = index + 1
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            return batch.pixels.copy(), labels[chosen], batch.ok.astype(np.float32) * weights[chosen]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()
            self._stream = None

    return Batches()


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


def fine_tune_model(model: Any, folder: DataFolder, backbone_name: str, input_size: int,
                    params: FineTuneParams, baseline_val_loss: float,
                    callbacks: list[Any] | None = None, *, decoder: str = "auto",
                    leave_out: frozenset[str] = frozenset()) -> tuple[dict[str, list[float]], FineTuneReport]:
    """Fine-tune in place; returns (history, report). `baseline_val_loss` is the head-only
    model's validation loss (see `keep_if_better`); train images in `leave_out` are not trained on."""
    seed_everything(params.seed)
    n_classes = len(folder.classes().names)
    train_rows = folder.split_rows("train")
    weights = None if params.class_weight == "none" else \
        class_weights(params.class_weight, train_rows[~train_rows["sha256"].isin(leave_out)]["y"].to_numpy(), n_classes)
    train = labelled_batches(folder, "train", input_size, params.batch_size, shuffle_seed=params.seed, decoder=decoder,
                             class_weight=weights, leave_out=leave_out)
    validation = labelled_batches(folder, "validation", input_size, params.batch_size, shuffle_seed=None,
                                  decoder=decoder)
    counts = unfreeze_top(model, backbone_name)
    compile_classifier(model, params.learning_rate, n_classes)
    before = model.get_weights()
    from tasks.learning.callbacks import training_progress

    progress = training_progress(f"Fine-tuning {backbone_name}", params.epochs, len(train), params.batch_size)
    try:
        history = history_to_json(model.fit(train, validation_data=validation, epochs=params.epochs,
                                            callbacks=[early_stopping(params.patience), progress,
                                                       *(callbacks or [])], verbose=0).history)
    finally:
        train.decoder.close()
        validation.decoder.close()
    improved = keep_if_better(model, before, history, baseline_val_loss)
    return history, FineTuneReport(**counts, baseline_val_loss=float(baseline_val_loss), improved=improved,
                                   epochs_run=len(history["loss"]), params=asdict(params))


class ExportedModel(BaseModel):
    """The shipped end-to-end model and how it relates to the validated head."""

    model_path: str
    fine_tuned: bool
    history_path: str | None
    val_metrics: dict[str, Any]
    head_agreement: float
    fine_tune: FineTuneReport | None
    engine_model_path: str | None = None
    """The shipped model as OpenVINO IR (model.xml) when the run's engine is OpenVINO, else None."""


def export_model(folder: DataFolder, output_dir: Path, backbone_name: str, weights: str | None, input_size: int,
                 head_path: Path, cache_dir: Path, fine_tune: bool, params: FineTuneParams,
                 precision: str = "float32", callbacks: list[Any] | None = None, *,
                 decoder: str = "auto", engine: str = "keras", leave_out: frozenset[str] = frozenset()) -> ExportedModel:
    """Build the end-to-end model, fine-tune it if asked, save output_dir/model.keras.

    `fine_tuned` says whether the saved weights come from fine-tuning; `val_metrics` are of
    the saved model; `head_agreement` (see `head_agreement`) compares it with the head, so
    `decoder` must be the one the head's features were computed with. On the OpenVINO engine
    the Keras model is float32 (OpenVINO applies the precision), and its IR, output_dir/
    model.openvino/ (int8: calibrated like the features), is what these numbers are of.
    Fine-tuning leaves out the train images in `leave_out`, as the head did.
    """
    from tasks.learning.forward import compiled_forward

    keras_precision = precision if engine == "keras" else "float32"
    model = build_end_to_end(backbone_name, weights, input_size, head_path, seed=params.seed, precision=keras_precision)
    output_dir = Path(output_dir)
    engine_dir = output_dir / ENGINE_MODEL_DIR

    def shipped_forward() -> Any:
        if engine == "keras":
            return compiled_forward(model)
        from tasks.learning.openvino_engine import ir_forward
        from tasks.learning.quantize import shipped_ir

        return ir_forward(shipped_ir(inference_copy(model), engine_dir, precision, folder, input_size, decoder),
                          precision)

    rows = folder.split_rows("validation")
    classes = folder.classes()
    p_dog, errors = predict_paths(model, rows["path"].tolist(), input_size, params.batch_size, shipped_forward(),
                                  decoder=decoder)
    ok = np.array([not error for error in errors], dtype=bool)
    agreement = head_agreement(p_dog[ok], head_path, cache_dir, rows["sha256"][ok].tolist())
    val_metrics = class_metrics(rows["y"].to_numpy()[ok], p_dog[ok], classes)
    report: FineTuneReport | None = None
    history_path: str | None = None
    if fine_tune:
        history, report = fine_tune_model(model, folder, backbone_name, input_size, params,
                                          val_metrics["log_loss"], callbacks, decoder=decoder, leave_out=leave_out)
        history_path = str(atomic_write_json(output_dir / "fine_tune.history.json", history))
        if report.improved:
            p_dog, _ = predict_paths(model, rows["path"].tolist(), input_size, params.batch_size,
                                     shipped_forward(), decoder=decoder)
            val_metrics = class_metrics(rows["y"].to_numpy()[ok], p_dog[ok], classes)
    model_path = save_model(inference_copy(model), output_dir / "model.keras")
    return ExportedModel(model_path=str(model_path), fine_tuned=bool(report and report.improved),
                         history_path=history_path, val_metrics=val_metrics, head_agreement=agreement,
                         fine_tune=report,
                         engine_model_path=None if engine == "keras" else str(engine_dir / "model.xml"))
