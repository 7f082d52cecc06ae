"""Registry of frozen ImageNet backbones: what each one needs to be used correctly.

Transfer learning goes wrong quietly when a backbone gets the wrong input scaling, an input
smaller than its stem allows, or a weights file saved from another architecture. Each
`BackboneSpec` keeps that knowledge in one place; `Preprocess` (tasks/learning/preprocess.py)
puts the backbone's own `preprocess_input` inside the model.

Importing this module does not import Keras (the registry is plain data), so configs can be
checked, and `--help` printed, without loading a deep-learning backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.devices import seed_everything
from tasks.common.errors import AcquireError, ConfigError
from tasks.common.files import atomic_path, sha256_file
from tasks.data.datafolder import DataFolder


@dataclass(frozen=True)
class BackboneSpec:
    """What a Keras application needs to serve as a frozen feature extractor and be fine-tuned.

    `fine_tune_at` names the first layer of the top block: every layer from it onward (in
    `model.layers` order) forms the block to unfreeze. `preprocess_mode` is the `Preprocess`
    mode equal to `preprocess_input`; `constructor_kwargs` pins options that change the input
    contract (EfficientNetV2/ConvNeXt keep their built-in rescaling, so their mode is "none").
    """

    name: str
    application: str
    """Class name in `keras.applications` (e.g. "ResNet50")."""
    module: str
    """Module in `keras.applications` holding its `preprocess_input` (e.g. "resnet50")."""
    preprocess_mode: str
    native_size: int
    feature_dim: int
    min_size: int
    fine_tune_at: str
    constructor_kwargs: tuple[tuple[str, Any], ...] = ()

    def constructor(self) -> Callable[..., Any]:
        """The Keras application class (imports Keras)."""
        from keras import applications

        return getattr(applications, self.application)

    def preprocess_input(self, pixels: Any) -> Any:
        """Keras' own `preprocess_input` of this backbone (the reference `Preprocess` must equal)."""
        from keras import applications

        return getattr(applications, self.module).preprocess_input(pixels)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("vgg16", "VGG16", "vgg16", "caffe",
                     224, 512, 32, "block5_conv1"),
        BackboneSpec("resnet50", "ResNet50", "resnet50", "caffe",
                     224, 2048, 32, "conv5_block1_1_conv"),
        BackboneSpec("inception_v3", "InceptionV3", "inception_v3", "tf",
                     299, 2048, 75, "mixed9"),
        BackboneSpec("efficientnetv2b0", "EfficientNetV2B0", "efficientnet_v2",
                     "none", 224, 1280, 32, "block6a_expand_conv",
                     (("include_preprocessing", True),)),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf",
                     224, 1280, 32, "block_13_expand"),
        BackboneSpec("convnext_tiny", "ConvNeXtTiny", "convnext", "none",
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
            f"Backbone {name!r} is unknown; choose one of: {', '.join(sorted(BACKBONES))} (--backbones)."
        ) from None


def resolve_input_size(name: str, input_size: int | None) -> int:
    """`input_size` checked against the backbone's minimum; None means its native size."""
    spec = get_backbone(name)
    if input_size is None:
        return spec.native_size
    if int(input_size) < spec.min_size:
        raise ConfigError(
            f"Input size {input_size} is too small for backbone {name!r}; use --input-size {spec.min_size} or more."
        )
    return int(input_size)


def _is_weights_file(weights: str | os.PathLike[str] | None) -> bool:
    return weights is not None and str(weights) != "imagenet"


def _check_weights_file(weights: str | os.PathLike[str]) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Weights {str(weights)!r} is neither 'imagenet', None nor an existing weights file; "
            "pass --weights with a Keras .weights.h5/.h5 file, imagenet, or none."
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


def random_weights_file(folder: DataFolder, name: str, seed: int = 42) -> Path:
    """The weights=None backbone of a data folder, drawn once and kept as a weights file.

    Random weights must be the *same* in the feature extractor and in the end-to-end model,
    or the head would sit on a different backbone than the one it was trained on. Keras
    draws unseeded initial weights from Python's process-wide `random`, which Prefect's
    background threads also use, so seeding cannot make two builds agree. Keeping the draw
    as a file makes "random weights" real weights: the feature cache keys it by content, the
    end-to-end model loads it, and a second run reuses both. include_top=False weights fit
    every input size.
    """
    target = folder.random_weights(get_backbone(name).name)
    if not target.is_file():
        seed_everything(seed)
        model = build_backbone(name, None, get_backbone(name).min_size)
        with atomic_path(target, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return target


def resolve_weights(folder: DataFolder, name: str, weights: str | os.PathLike[str] | None, seed: int = 42) -> str:
    """The weights a data folder's steps share: None becomes its kept random draw, the rest is unchanged."""
    return str(random_weights_file(folder, name, seed)) if weights is None else str(weights)


def build_backbone(name: str, weights: str | os.PathLike[str] | None, input_size: int | None,
                   precision: str = "float32") -> Any:
    """The headless backbone (`include_top=False`, global average pooling) for square inputs.

    Input: the backbone's own preprocessed input (see `Preprocess`), not raw pixels.
    `precision` "bfloat16" builds it under Keras' `mixed_bfloat16` policy (bf16 compute,
    float32 variables), scoped to this build. `weights="imagenet"` downloads once into the
    Keras cache (which honours `KERAS_HOME`); a file path is loaded strictly (no by-name or
    skip-mismatch), so a file saved from another architecture fails here with a
    `ConfigError` instead of silently leaving random layers.
    """
    from tasks.common.devices import dtype_policy

    spec = get_backbone(name)
    size = resolve_input_size(name, input_size)
    kwargs = dict(spec.constructor_kwargs)
    base_weights = "imagenet" if weights is not None and str(weights) == "imagenet" else None
    try:
        with dtype_policy(precision):
            model = spec.constructor()(include_top=False, weights=base_weights, input_shape=(size, size, 3),
                                       pooling="avg", **kwargs)
    except Exception as error:
        if base_weights is None or "URL fetch failure" not in str(error):
            raise
        raise AcquireError(
            f"Could not download the ImageNet weights of {name!r} into the Keras cache "
            f"({os.environ.get('KERAS_HOME', '~/.keras')}/models): {str(error).splitlines()[0][:300]}; "
            "connect to the internet once, or download that file elsewhere and pass it with --weights PATH "
            "(weights=PATH from Python)."
        ) from None
    if _is_weights_file(weights):
        _load_weights_file(model, name, _check_weights_file(weights))
    return model


def check_weights(name: str, weights: str | os.PathLike[str] | None) -> None:
    """Fail in seconds, before any data work, when a weights file does not fit the backbone.

    Builds the backbone at its smallest input (include_top=False weights fit every size) and
    loads the file strictly; "imagenet" and None need no check here.
    """
    if _is_weights_file(weights):
        build_backbone(name, weights, get_backbone(name).min_size)


def _load_weights_file(model: Any, name: str, path: Path) -> None:
    """Load `path` into `model`, turning Keras' many failure shapes into one ConfigError."""
    try:
        with warnings.catch_warnings():
            # A mismatched file makes Keras warn once per layer before it raises; the error says it all.
            warnings.simplefilter("ignore", UserWarning)
            model.load_weights(str(path))
    except Exception as error:  # ValueError (mismatch), OSError (not HDF5), KeyError (bad groups)
        raise ConfigError(
            f"Weights file {str(path)!r} does not fit backbone {name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); pass weights saved from {name} with include_top=False "
            "(--weights PATH), or --weights imagenet."
        ) from None


def fine_tune_start(model: Any, name: str) -> int:
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
