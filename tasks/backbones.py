"""Registry of frozen ImageNet backbones: what each one needs to be used correctly.

Transfer learning goes wrong quietly when a backbone gets the wrong input scaling, an input
smaller than its stem allows, or a weights file saved from another architecture. Each
`BackboneSpec` keeps that knowledge in one place, and `Preprocess` puts the backbone's own
`preprocess_input` *inside* the model as a serialisable layer, so the saved end-to-end model
takes plain 0..255 RGB pixels and loads in Keras' safe mode (no Lambda layers).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from keras import applications as apps

from tasks.errors import AcquireError, ConfigError
from tasks.files import atomic_path, sha256_file

PREPROCESS_MODES: tuple[str, ...] = ("caffe", "tf", "torch", "none")
"""Input scalings used by Keras applications (see `keras.applications.imagenet_utils`)."""

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="catsdogs")
class Preprocess(keras.layers.Layer):
    """A backbone's `preprocess_input` as a layer: 0..255 RGB pixels in, backbone input out.

    Modes mirror `keras.applications.imagenet_utils.preprocess_input`:
    "caffe" (RGB->BGR, minus the ImageNet mean; VGG16, ResNet50), "tf" (scale to -1..1;
    InceptionV3, MobileNetV2), "torch" (0..1 then ImageNet mean/std) and "none" (backbones
    such as EfficientNetV2 and ConvNeXt that rescale inside themselves). Registered so that
    `keras.saving.load_model(path)` rebuilds it with `safe_mode=True` once this module is
    imported.
    """

    def __init__(self, mode: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ConfigError(f"Preprocess mode {mode!r} is unknown; use one of {', '.join(PREPROCESS_MODES)}.")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        ops = keras.ops
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class BackboneSpec:
    """What a Keras application needs to serve as a frozen feature extractor and be fine-tuned.

    `fine_tune_at` names the first layer of the top block: every layer from it onward (in
    `model.layers` order) forms the block to unfreeze. `preprocess_mode` is the `Preprocess`
    mode equal to `preprocess_input`; `constructor_kwargs` pins options that change the input
    contract (EfficientNetV2/ConvNeXt keep their built-in rescaling, so their mode is "none").
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[..., Any]
    preprocess_mode: str
    native_size: int
    feature_dim: int
    min_size: int
    fine_tune_at: str
    constructor_kwargs: tuple[tuple[str, Any], ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("vgg16", apps.VGG16, apps.vgg16.preprocess_input, "caffe",
                     224, 512, 32, "block5_conv1"),
        BackboneSpec("resnet50", apps.ResNet50, apps.resnet50.preprocess_input, "caffe",
                     224, 2048, 32, "conv5_block1_1_conv"),
        BackboneSpec("inception_v3", apps.InceptionV3, apps.inception_v3.preprocess_input, "tf",
                     299, 2048, 75, "mixed9"),
        BackboneSpec("efficientnetv2b0", apps.EfficientNetV2B0, apps.efficientnet_v2.preprocess_input,
                     "none", 224, 1280, 32, "block6a_expand_conv",
                     (("include_preprocessing", True),)),
        BackboneSpec("mobilenet_v2", apps.MobileNetV2, apps.mobilenet_v2.preprocess_input, "tf",
                     224, 1280, 32, "block_13_expand"),
        BackboneSpec("convnext_tiny", apps.ConvNeXtTiny, apps.convnext.preprocess_input, "none",
                     224, 768, 32, "convnext_tiny_downsampling_block_2",
                     (("include_preprocessing", True),)),
    )
}
"""Supported backbones by name (the names used in configs and feature-cache folders)."""


def get_backbone(name: str) -> BackboneSpec:
    """The spec for `name`; an unknown name is a config error that lists the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"Backbone {name!r} is unknown; choose one of: {', '.join(sorted(BACKBONES))}."
        ) from None


def resolve_input_size(name: str, input_size: int | None) -> int:
    """`input_size` checked against the backbone's minimum; None means its native size."""
    spec = get_backbone(name)
    if input_size is None:
        return spec.native_size
    if int(input_size) < spec.min_size:
        raise ConfigError(
            f"Input size {input_size} is too small for backbone {name!r}; use at least {spec.min_size}."
        )
    return int(input_size)


def _is_weights_file(weights: str | os.PathLike[str] | None) -> bool:
    return weights is not None and str(weights) != "imagenet"


def _check_weights_file(weights: str | os.PathLike[str]) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Weights {str(weights)!r} is neither 'imagenet', None nor an existing weights file; "
            "pass a path to a Keras .weights.h5/.h5 file."
        )
    return path


def weights_fingerprint(weights: str | os.PathLike[str] | None) -> str:
    """A short stable name for a weights choice: "none", "imagenet" or "file-<sha256[:12]>".

    A file is named by its content, not its path, so moving the file keeps the feature cache
    and replacing it with other weights invalidates it.
    """
    if weights is None:
        return "none"
    if str(weights) == "imagenet":
        return "imagenet"
    return f"file-{sha256_file(_check_weights_file(weights))[:12]}"


RANDOM_INIT_DIR = Path("features") / "random_init"
"""Where a data folder keeps its one random draw per backbone (relative to the data folder)."""


def random_weights_file(data_dir: str | os.PathLike[str], name: str, seed: int = 42) -> Path:
    """The weights=None backbone of a data folder, drawn once and kept as a weights file.

    Random weights must be the *same* in the feature extractor and in the end-to-end model,
    or the head would sit on a different backbone than the one it was trained on. Keras
    draws unseeded initial weights from Python's process-wide `random`, which Prefect's
    background threads also use, so seeding cannot make two builds agree. Keeping the draw
    as data_dir/features/random_init/<backbone>.weights.h5 makes "random weights" a real
    weights file: the feature cache keys it by content, the end-to-end model loads it, and a
    second run reuses both. include_top=False weights fit every input size.
    """
    target = Path(data_dir) / RANDOM_INIT_DIR / f"{get_backbone(name).name}.weights.h5"
    if not target.is_file():
        keras.utils.set_random_seed(seed)
        model = build_backbone(name, None, get_backbone(name).min_size)
        with atomic_path(target, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return target


def resolve_weights(data_dir: str | os.PathLike[str], name: str, weights: str | os.PathLike[str] | None,
                    seed: int = 42) -> str:
    """The weights a data folder's steps share: None becomes its kept random draw, the rest is unchanged."""
    return str(random_weights_file(data_dir, name, seed)) if weights is None else str(weights)


def build_backbone(name: str, weights: str | os.PathLike[str] | None, input_size: int | None) -> keras.Model:
    """The headless backbone (`include_top=False`, global average pooling) for square inputs.

    Input: the backbone's own preprocessed input (see `Preprocess`), not raw pixels.
    `weights="imagenet"` downloads once into the Keras cache (which honours `KERAS_HOME`); a
    file path is loaded strictly (no by-name or skip-mismatch), so a file saved from another
    architecture fails here with a `ConfigError` instead of silently leaving random layers.
    """
    spec = get_backbone(name)
    size = resolve_input_size(name, input_size)
    kwargs = dict(spec.constructor_kwargs)
    base_weights = "imagenet" if weights is not None and str(weights) == "imagenet" else None
    try:
        model = spec.constructor(include_top=False, weights=base_weights, input_shape=(size, size, 3),
                                 pooling="avg", **kwargs)
    except Exception as error:
        if base_weights is None or "URL fetch failure" not in str(error):
            raise
        raise AcquireError(
            f"Could not download the ImageNet weights of {name!r} into the Keras cache "
            f"({os.environ.get('KERAS_HOME', '~/.keras')}/models): {str(error).splitlines()[0][:400]}; "
            "connect to the internet once, or download that file elsewhere and pass its path as weights."
        ) from error
    if _is_weights_file(weights):
        _load_weights_file(model, name, _check_weights_file(weights))
    return model


def _load_weights_file(model: keras.Model, name: str, path: Path) -> None:
    """Load `path` into `model`, turning Keras' many failure shapes into one ConfigError."""
    try:
        with warnings.catch_warnings():
            # A mismatched file makes Keras warn once per layer before it raises; the error says it all.
            warnings.simplefilter("ignore", UserWarning)
            model.load_weights(str(path))
    except Exception as error:  # ValueError (mismatch), OSError (not HDF5), KeyError (bad groups)
        raise ConfigError(
            f"Weights file {str(path)!r} does not fit backbone {name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); pass weights saved from {name} with include_top=False."
        ) from error


def fine_tune_start(model: keras.Model, name: str) -> int:
    """Index in `model.layers` of the spec's `fine_tune_at` layer: layers from it on form the top block.

    Pass the backbone model from `build_backbone` (not a model that nests it). Layer names of
    Keras applications are fixed by Keras, so the index is stable for any input size.
    """
    target = get_backbone(name).fine_tune_at
    names = [layer.name for layer in model.layers]
    if target not in names:
        raise ConfigError(f"Layer {target!r} (top block of {name!r}) is not in model {model.name!r}; "
                          "pass the backbone model returned by build_backbone.")
    return names.index(target)
