"""The extractor: the feature model and the image decoder, each built once per process.

Why it is built this way:
- The feature model takes uint8 pixels and holds the backbone's own preprocessing, so batches
  cross to the device as uint8 and the same graph starts the end-to-end model (nothing to
  preprocess outside a model, in training or in serving).
- Building and compiling a backbone costs seconds and its weights are large; a Dask worker
  computes many shards in a row. So the model and its compiled forward are cached per
  process and feature space (`cached_extractor`), and the decoder's worker processes, which
  are expensive to start, are shared by every shard and by evaluation (`shared_decoder`).
- Nothing here knows about shards or plans: evaluation uses the same decoder, and the
  benchmarks time the same cached model and forward that extraction runs.
- On the OpenVINO engine the forward runs the feature model's IR, kept in the feature cache's
  folder (tasks/learning/openvino_engine.py); the Keras model is built only to convert it.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from tasks.learning.backbones import build_backbone, get_backbone, resolve_input_size
from tasks.learning.pixels import Decoder, resolve_decoder


def feature_model(backbone: str, weights: str | os.PathLike[str] | None, input_size: int | None,
                  precision: str = "float32", view: str = "plain") -> Any:
    """uint8 RGB pixels (input_size x input_size x 3) -> pooled backbone features.

    Layers: Input (uint8) -> `Preprocess` (the backbone's own preprocess_input, float32) ->
    backbone (at `precision`), so the backbone is `model.layers[-1]`. The same graph starts the
    end-to-end model, which therefore needs no preprocessing outside the model either. View
    "flip" mirrors the pixels first (`MirrorImages`): the features test-time augmentation averages in.
    """
    import keras

    from tasks.learning.layers import MirrorImages
    from tasks.learning.preprocess import Preprocess
    from tasks.learning.shards import view_suffix

    spec = get_backbone(backbone)
    size = resolve_input_size(backbone, input_size)
    view_suffix(view)  # an unknown view fails before a backbone is built
    base = build_backbone(backbone, weights, size, precision)
    inputs = keras.Input(shape=(size, size, 3), dtype="uint8", name="pixels")
    x = MirrorImages(name="mirror")(inputs) if view == "flip" else inputs
    x = Preprocess(spec.preprocess_mode, name="preprocess")(x)
    outputs = base(x, training=False)
    return keras.Model(inputs, outputs, name=f"{backbone}_features")


@functools.lru_cache(maxsize=1)
def cached_extractor(backbone: str, weights: str, size: int, precision: str, fingerprint: str,
                     engine: str = "keras", ir_dir: str | None = None, view: str = "plain") -> tuple[Any, Any]:
    """(model, compiled forward), built once per process and feature space (Dask workers reuse it).

    Engine "openvino" runs the IR in `ir_dir` (the feature cache's own), converting the float32
    Keras model into it first when it is not there; the model is then None when the IR was
    there already (nothing was built). An int8 IR is made with its calibration images by
    `tasks.learning.quantize` before any shard runs, so here it is only read. `view` "flip"
    mirrors each image inside the model (test-time augmentation's second view).
    """
    from tasks.learning.forward import compiled_forward

    if engine == "keras":
        model = feature_model(backbone, weights, size, precision, view)
        return model, compiled_forward(model)
    from tasks.learning import openvino_engine

    if ir_dir is None:
        raise ValueError("the OpenVINO engine needs the folder of its IR (ir_dir)")
    model = None
    if not openvino_engine.has_ir(ir_dir):
        if precision == "int8":
            raise RuntimeError(f"no int8 IR in {ir_dir}; plan_extraction quantizes it before any shard runs")
        model = feature_model(backbone, weights, size, "float32", view)
        openvino_engine.export_ir(model, ir_dir)
    return model, openvino_engine.ir_forward(openvino_engine.ir_path(ir_dir), precision)


_DECODER: dict[tuple, Decoder] = {}
_DECODER_LOCK = threading.Lock()


def shared_decoder(size: int, batch_size: int, workers: int | None = None, decoder: str = "auto") -> Decoder:
    """One decoder per process (its worker processes are expensive to start), replaced on a new shape or decoder."""
    key = (size, batch_size, workers, resolve_decoder(decoder))
    with _DECODER_LOCK:
        if key not in _DECODER:
            for old in _DECODER.values():
                old.close()
            _DECODER.clear()
            _DECODER[key] = Decoder(size, batch_size, decoder=key[-1], workers=workers)
        return _DECODER[key]


def close_decoders() -> None:
    """Stop the shared decoder's workers (tests, and the end of a flow run)."""
    with _DECODER_LOCK:
        for decoder in _DECODER.values():
            decoder.close()
        _DECODER.clear()
