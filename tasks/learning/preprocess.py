"""`Preprocess`: a backbone's own `preprocess_input` as a serialisable layer inside the model.

The saved models take plain 0..255 RGB pixels (uint8 batches straight from the input
pipeline); the cast and the backbone's scaling run inside the model, on whichever device and
backend runs it. Being a registered layer (no Lambda), it reloads with `safe_mode=True` on
any Keras backend once this module is imported, which is why the served model imports it
and nothing heavier.
"""

from __future__ import annotations

from typing import Any

import keras

from tasks.common.errors import ConfigError

PREPROCESS_MODES: tuple[str, ...] = ("caffe", "tf", "torch", "none")
"""Input scalings used by Keras applications (see `keras.applications.imagenet_utils`)."""

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="catsdogs")
class Preprocess(keras.layers.Layer):
    """0..255 RGB pixels (any dtype, uint8 in practice) in, the backbone's input out.

    Modes mirror `keras.applications.imagenet_utils.preprocess_input`: "caffe" (RGB->BGR,
    minus the ImageNet mean; VGG16, ResNet50), "tf" (scale to -1..1; InceptionV3, MobileNetV2),
    "torch" (0..1 then ImageNet mean/std) and "none" (EfficientNetV2 and ConvNeXt rescale
    inside themselves). It computes in float32 even in a bfloat16 model: subtracting a mean
    of ~120 in bf16 (8 bits of mantissa) would cost more precision than the backbone loses.
    """

    def __init__(self, mode: str = "none", **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
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
