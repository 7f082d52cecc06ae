"""The served model's own layers besides `Preprocess` (the mirror of test-time augmentation and the temperature), and
how they wrap the trained model.

Both are registered Keras layers (no Lambda), so a saved model that holds them reloads with
`safe_mode=True` on any backend once this module is imported, and every scoring path (the
served model, batch prediction, the gate's test scoring, evaluation) computes the same
probabilities by construction: they are inside the model, not beside it. Like preprocess.py,
this module imports Keras and nothing heavier, because the served model imports it.

    pixels (uint8) -> core                             core: Preprocess -> backbone(s) -> head (finetune.py,
                   -> core(MirrorImages(pixels))         ensemble.py), fine-tuned or not
                   -> Average                          only with `--tta flip`
                   -> Temperature(T)                   only when T lowers validation log loss

With neither, the core itself ships. The core is one nested model called once or twice (shared
weights: the mirror costs a second pass through the backbone, not a second backbone).
tasks/learning/shipped.py decides what wraps it; tasks/learning/head_input.py rebuilds the same
wrapping around a core that also returns its head's input.
"""

from __future__ import annotations

from typing import Any

import keras

TTA_LAYER = "tta_average"
TEMPERATURE_LAYER = "temperature"

PROBABILITY_FLOOR = 1e-7
"""Probabilities are clipped to [floor, 1 - floor] before they are turned back into logits (float32 keeps 1 - 1e-7)."""


@keras.saving.register_keras_serializable(package="catsdogs")
class MirrorImages(keras.layers.Layer):
    """A batch of (height, width, channels) images, each mirrored left to right (test-time augmentation's second view).

    It keeps the input's dtype (uint8 pixels stay uint8), so the mirrored batch goes through
    the same `Preprocess` as the plain one.
    """

    def call(self, inputs: Any) -> Any:
        return keras.ops.flip(inputs, axis=-2)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


@keras.saving.register_keras_serializable(package="catsdogs")
class Temperature(keras.layers.Layer):
    """Probabilities in, the same probabilities at temperature T out: sigmoid(logit(p) / T), or softmax(log(p) / T).

    The head ends in a sigmoid (one unit, two classes) or a softmax (N units); this layer turns
    its output back into logits, divides them by T and applies the same function again. T > 1
    makes an over-confident model less sure; the order of the scores, and for N classes the
    predicted class, never change. Computed in float32 whatever the model's precision.
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.temperature = float(temperature)

    def call(self, inputs: Any) -> Any:
        ops = keras.ops
        p = ops.clip(ops.cast(inputs, "float32"), PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
        if inputs.shape[-1] == 1:
            # log(1 - p), not log1p(-p): ONNX has no Log1p, and p is clipped away from 1
            return ops.sigmoid((ops.log(p) - ops.log(1.0 - p)) / self.temperature)
        return ops.softmax(ops.log(p) / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}


def load_saved_model(path: Any) -> Any:
    """A saved end-to-end or served `.keras` model in safe mode, every project layer registered first."""
    import tasks.learning.preprocess  # noqa: F401  (registers Preprocess)

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def wrap(core: Any, tta: bool, temperature: float | None) -> Any:
    """The served model around `core`: mirrored view averaged in (tta), then the temperature; `core` itself for neither.

    A core of two outputs (probabilities, and its head's input: tasks/learning/head_input.py)
    gives a served model of two: the wrapped probabilities, and the plain view's head input.
    """
    if not tta and temperature is None:
        return core
    inputs = keras.Input(shape=core.input_shape[1:] if not isinstance(core.input_shape, list)
                         else core.input_shape[0][1:], dtype="uint8", name="pixels")
    outputs, extra = _first_and_rest(core(inputs))
    if tta:
        mirrored, _ = _first_and_rest(core(MirrorImages(name="mirror")(inputs)))
        outputs = keras.layers.Average(name=TTA_LAYER, dtype="float32")([outputs, mirrored])
    if temperature is not None:
        outputs = Temperature(temperature, name=TEMPERATURE_LAYER)(outputs)
    return keras.Model(inputs, [outputs, *extra] if extra else outputs, name=f"{core.name}_served")


def _first_and_rest(outputs: Any) -> tuple[Any, list[Any]]:
    return (outputs[0], list(outputs[1:])) if isinstance(outputs, list | tuple) else (outputs, [])


def core_of(model: Any) -> Any:
    """The end-to-end model inside a served one (the model itself when nothing wraps it)."""
    names = {layer.name for layer in model.layers}
    if not names & {TTA_LAYER, TEMPERATURE_LAYER}:
        return model
    [core] = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return core


def wrapping_of(model: Any) -> tuple[bool, float | None]:
    """(test-time augmentation, temperature) of a served model: what `wrap` put around its core."""
    names = {layer.name for layer in model.layers}
    temperature = model.get_layer(TEMPERATURE_LAYER).temperature if TEMPERATURE_LAYER in names else None
    return TTA_LAYER in names, temperature
