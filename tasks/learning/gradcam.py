"""Grad-CAM: where in the picture the served model looked for the class it named.

As in the Keras example (keras.io/examples/vision/grad_cam, after Selvaraju et al. 2017): take
the last convolutional feature maps A_k of the backbone, the gradient of the class's logit with
respect to them, average each map's gradient over the picture into a weight alpha_k, and keep
relu(sum_k alpha_k A_k), scaled to 0..1. Here "the last convolutional block" is what the
backbone's final global pooling averages, so it is found the same way for every backbone in
tasks/learning/backbones.py; the class score is the head's logit (the example removes the
softmax too), so a saturated probability cannot hide the gradient.

The model is the served one: its core (tasks/learning/shipped.py) is split in two at the maps,

    pixels -> Preprocess -> backbone up to its last maps           (no gradient needed)
    maps -> the backbone's pooling -> [concatenation] -> head      (the tail, differentiated)

and the tail is differentiated with each backbone's own API: `tf.GradientTape` on TensorFlow,
`jax.grad` over the tail's `stateless_call` on JAX. An ensemble gets one map per member, each
scaled to the image and averaged. Test-time augmentation and the temperature are left out: the
plain view is the one explained, and a temperature divides every logit alike, so it changes
no map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OVERLAY_SIDE = 192
"""Pixels per side of an overlay PNG (a 32-pixel input is drawn larger, a 299-pixel one smaller)."""

OVERLAY_ALPHA = 0.45
"""Share of the heatmap's colour in an overlay (the Keras example uses 0.4 over the full image)."""


class GradCam:
    """The pieces of a served model that Grad-CAM needs, found once: per backbone its maps, and the tail."""

    def __init__(self, model: Any) -> None:
        import keras

        from tasks.learning.ensemble import FEATURES_LAYER, preprocess_layer_name
        from tasks.learning.head_input import HEAD_LAYER_NAMES
        from tasks.learning.layers import core_of

        core = core_of(model)
        backbones = [layer for layer in core.layers if isinstance(layer, keras.Model)]
        if not backbones:
            raise ValueError(f"model {model.name!r} has no backbone to explain")
        names = {layer.name for layer in core.layers}
        self.branches = []
        for backbone in backbones:
            pooling = backbone.layers[-1]
            if not isinstance(pooling, keras.layers.GlobalAveragePooling2D):
                raise ValueError(f"backbone {backbone.name!r} does not end in global average pooling")
            preprocess = core.get_layer(preprocess_layer_name(backbone.name) if len(backbones) > 1 else "preprocess")
            maps = keras.Model(backbone.inputs, pooling.input, name=f"{backbone.name}_maps")
            self.branches.append((preprocess, maps))
        head = [core.get_layer(name) for name in HEAD_LAYER_NAMES if name in names]
        if not head or not isinstance(head[-1], keras.layers.Dense):
            raise ValueError(f"model {model.name!r} has no dense head output ({HEAD_LAYER_NAMES[-1]!r}) to explain")
        self.output = head[-1]
        map_inputs = [keras.Input(shape=maps.output.shape[1:], name=f"maps_{index}")
                      for index, (_, maps) in enumerate(self.branches)]
        # the backbones' global average pooling, computed afresh (it has no weights; reusing the
        # backbone's own layer would give it a second call and make its `input` ambiguous)
        pooled = [keras.ops.mean(keras.ops.cast(tensor, "float32"), axis=(1, 2)) for tensor in map_inputs]
        x = core.get_layer(FEATURES_LAYER)(pooled) if len(pooled) > 1 else pooled[0]
        for layer in head[:-1]:
            x = layer(x)
        self.tail = keras.Model(map_inputs if len(map_inputs) > 1 else map_inputs[0], x, name="gradcam_tail")
        self.size = int(core.input_shape[1])

    def maps(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The last feature maps of each backbone for a uint8 batch, float32 (n, h, w, channels) each."""
        import keras

        return [np.asarray(keras.ops.convert_to_numpy(maps(preprocess(pixels), training=False)), dtype=np.float32)
                for preprocess, maps in self.branches]

    def logits(self, hidden: Any) -> Any:
        """The head's output before its sigmoid or softmax: (n, 1) or (n, N)."""
        import keras

        return keras.ops.matmul(hidden, keras.ops.cast(self.output.kernel, "float32")) + \
            keras.ops.cast(self.output.bias, "float32")

    def gradients(self, maps: list[np.ndarray], classes: np.ndarray) -> list[np.ndarray]:
        """d(sum of each image's class logit) / d(maps), with the backend's own gradient API."""
        import keras

        backend = keras.config.backend()
        select = np.zeros((len(classes), int(self.output.units)), dtype=np.float32)
        if self.output.units == 1:
            select[:, 0] = np.where(np.asarray(classes) == 1, 1.0, -1.0)  # the cat's logit is minus the dog's
        else:
            select[np.arange(len(classes)), np.asarray(classes)] = 1.0
        if backend == "tensorflow":
            import tensorflow as tf

            tensors = [tf.convert_to_tensor(value) for value in maps]
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                hidden = self.tail(tensors if len(tensors) > 1 else tensors[0], training=False)
                score = tf.reduce_sum(self.logits(hidden) * select)
            return [np.asarray(grad) for grad in tape.gradient(score, tensors)]
        if backend == "jax":
            import jax

            trainable = [variable.value for variable in self.tail.trainable_variables]
            non_trainable = [variable.value for variable in self.tail.non_trainable_variables]
            kernel, bias = self.output.kernel.value, self.output.bias.value

            def score(values: list[Any]) -> Any:
                hidden, _ = self.tail.stateless_call(trainable, non_trainable,
                                                     values if len(values) > 1 else values[0], training=False)
                logits = hidden @ kernel.astype("float32") + bias.astype("float32")
                return (logits * select).sum()

            return [np.asarray(grad) for grad in jax.grad(score)([jax.numpy.asarray(value) for value in maps])]
        raise RuntimeError(f"Grad-CAM runs on the TensorFlow and JAX backends, not {backend!r}")

    def heatmaps(self, pixels: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Grad-CAM of each image for its class: float32 (n, size, size), each scaled to 0..1 (all zero where nothing counts)."""
        maps = self.maps(pixels)
        grads = self.gradients(maps, classes)
        heat = np.zeros((len(pixels), self.size, self.size), dtype=np.float64)
        for values, grad in zip(maps, grads):
            weights = grad.mean(axis=(1, 2), keepdims=True)  # alpha_k: each map's mean gradient
            cam = np.maximum((values * weights).sum(axis=-1), 0.0)
            heat += np.stack([_normalised(_resized(one, self.size)) for one in cam])
        return np.stack([_normalised(one) for one in heat]).astype(np.float32)


def _resized(heatmap: np.ndarray, side: int) -> np.ndarray:
    """A coarse map scaled to side x side (bilinear), so it lies over the image it explains."""
    from PIL import Image

    return np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize((side, side), Image.BILINEAR))  # mode "F"


def _normalised(heatmap: np.ndarray) -> np.ndarray:
    top = float(heatmap.max())
    return heatmap / top if top > 0 else np.zeros_like(heatmap)


def region_mass(heatmap: np.ndarray, rows: slice, columns: slice) -> float:
    """Share of a heatmap's total that lies in a rectangle (1.0 = it looked only there)."""
    total = float(heatmap.sum())
    return float(heatmap[rows, columns].sum()) / total if total > 0 else 0.0


def overlay(pixels: np.ndarray, heatmap: np.ndarray, side: int = OVERLAY_SIDE) -> np.ndarray:
    """The image with its heatmap in the jet colour map laid over it, uint8 (side, side, 3)."""
    from matplotlib import colormaps
    from PIL import Image

    image = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR), dtype=np.float64)
    colours = colormaps["jet"](_resized(heatmap, side).clip(0, 1))[..., :3] * 255
    return np.clip(image * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA, 0, 255).astype(np.uint8)


def save_overlay(pixels: np.ndarray, heatmap: np.ndarray, target: Path) -> Path:
    """Write the overlay as a PNG, atomically."""
    from PIL import Image

    from tasks.common.files import atomic_path

    with atomic_path(Path(target), suffix=".png") as tmp:
        Image.fromarray(overlay(pixels, heatmap)).save(tmp, format="PNG")
    return Path(target)


def explain_files(model: Any, paths: list[Path], output_dir: Path, *, decoder: str = "auto",
                  classes: Any = None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Grad-CAM overlays of `paths` for the class the served model names, as `output_dir/<name>.png`.

    Returns one row per image: path, predicted class, its probability and the overlay's path
    (an image that cannot be decoded gets its error instead). `names` are the overlays' file
    names (default: each image's stem).
    """
    from tasks.common.labels import CATS_DOGS
    from tasks.learning.pixels import ImageError, read_image

    classes = classes or CATS_DOGS
    cam = GradCam(model)
    rows: list[dict[str, Any]] = []
    decoded: list[tuple[int, np.ndarray]] = []
    for index, path in enumerate(paths):
        rows.append({"path": str(path), "predicted": "", "probability": float("nan"), "overlay": "", "error": ""})
        try:
            decoded.append((index, read_image(path, cam.size, decoder=decoder)))
        except ImageError as error:
            rows[index]["error"] = str(error)
    if not decoded:
        return rows
    pixels = np.stack([image for _, image in decoded])
    probabilities = _class_probabilities(model, pixels)
    predicted = probabilities.argmax(axis=1)
    heat = cam.heatmaps(pixels, predicted)
    for (index, image), label, probability, heatmap in zip(decoded, predicted, probabilities, heat):
        name = (names[index] if names else Path(paths[index]).stem) + ".png"
        target = save_overlay(image, heatmap, Path(output_dir) / name)
        rows[index].update(predicted=classes.names[int(label)], probability=float(probability[label]),
                           overlay=str(target))
    return rows


def _class_probabilities(model: Any, pixels: np.ndarray) -> np.ndarray:
    """The served model's probabilities, one column per class (two for a sigmoid)."""
    from tasks.learning.calibration import class_probabilities
    from tasks.learning.forward import compiled_forward, to_numpy

    return class_probabilities(to_numpy(compiled_forward(model)(pixels)))


def worst_mistakes(predictions: Any, classes: Any, per_class: int = 2) -> Any:
    """The `per_class` most confident mistakes of each true class (highest loss first), from a predictions table."""
    from tasks.learning.plots import true_class_probability

    loss = -np.log(np.clip(true_class_probability(predictions, classes), 1e-7, 1.0))
    ranked = predictions.assign(loss=loss)
    mistakes = ranked[ranked["label"] != ranked["predicted"]].sort_values(["label", "loss", "path"],
                                                                         ascending=[True, False, True])
    return mistakes.groupby("label", sort=True, group_keys=False).head(per_class).reset_index(drop=True)


def explain_mistakes(model_path: Path, folder: Any, output_dir: Path, predictions_path: Path, *,
                     decoder: str = "auto", per_class: int = 2) -> list[Any]:
    """Grad-CAM overlays of the worst test mistakes of each class, under output_dir/plots/gradcam/."""
    import pandas as pd

    from tasks.common.results import Explanation
    from tasks.learning.layers import load_saved_model

    classes = folder.classes()
    worst = worst_mistakes(pd.read_csv(predictions_path, dtype={"path": str, "sha256": str}), classes, per_class)
    if worst.empty:
        return []
    names = [f"{classes.names[int(label)]}-{rank}" for label, rank in
             zip(worst["label"], worst.groupby("label").cumcount() + 1)]
    rows = explain_files(load_saved_model(model_path), [folder.file(path) for path in worst["path"]],
                         Path(output_dir) / "plots" / "gradcam", decoder=decoder, classes=classes, names=names)
    return [Explanation(path=str(path), label=classes.names[int(label)], predicted=row["predicted"],
                        probability=row["probability"], overlay=row["overlay"])
            for path, label, row in zip(worst["path"], worst["label"], rows) if row["overlay"]]
