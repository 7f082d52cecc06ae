"""The OpenVINO engine: a Keras model converted once to OpenVINO IR, compiled for the CPU, run on an async queue.

Why it is built this way:
- Keras/TensorFlow runs these backbones on a CPU at the speed of its bare forward, and that
  forward is slow; OpenVINO's CPU plugin runs the same graph 1.3-3.4x faster (benchmarks/
  extraction_throughput.py). The graph is the Keras model itself, preprocessing included
  (uint8 pixels in), so nothing is computed outside the model on either engine.
- Conversion follows the documented Keras 3 route, `model.export(path, format="openvino")`
  (OpenVINO's "Converting a Keras Model" guide names it for every backend). On TensorFlow it
  runs here; on JAX it fails with these versions (jax2tf now always emits `XlaCallModule`,
  which OpenVINO cannot convert, and OpenVINO's own JAX frontend rejects Keras' jaxprs), so on
  any other backend the model is saved as `.keras` and exported by a TensorFlow child process
  (`python -m tasks.learning.openvino_engine`). No network is used.
- The IR is written once, atomically, as a folder (model.xml + model.bin + the compiled
  blobs of OpenVINO's CACHE_DIR), and reused by every later run and process: a second run
  neither converts nor compiles again. The folder lives where its results live (a feature
  cache keeps the IR that computed its features; a run folder keeps the shipped model's).
- The engine's precision is what the cache key and the params say: the CPU plugin would pick
  bfloat16 by itself on AMX hosts, so INFERENCE_PRECISION_HINT is always given ("int8" runs
  NNCF's quantized IR with float32 for what was not quantized).
- A batch is cut into one slice per infer request of an `AsyncInferQueue` compiled at the
  THROUGHPUT hint (one stream per core pair here), so every core works on one batch; the
  call returns at once (`Pending`), which lets `run_ahead` decode the next batch meanwhile.
- OpenVINO and NNCF send usage telemetry unless told not to; `opt_out_of_telemetry` makes
  both use their own no-telemetry stubs (what they do when `openvino-telemetry` is absent)
  before either is imported, and nothing is written to the user's home.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.errors import ConfigError
from tasks.common.files import atomic_directory

ENGINES: tuple[str, ...] = ("keras", "openvino")
"""What computes a model: Keras on its backend, or OpenVINO's CPU plugin."""

PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
"""INFERENCE_PRECISION_HINT per precision (an int8 IR keeps float32 for what NNCF left unquantized)."""

IR_FILE = "model.xml"
BLOBS = "compiled"
"""Subfolder of an IR folder where OpenVINO caches compiled blobs (CACHE_DIR)."""

INSTALL_HINT = "pip install 'openvino>=2026.4,<2027' (a dependency of this project: pip install -e .)"


def installed() -> bool:
    """True where OpenVINO can be imported (the engine is then available)."""
    return importlib.util.find_spec("openvino") is not None


def require(what: str) -> None:
    """A ConfigError naming `what` needed OpenVINO, where it is not installed."""
    if not installed():
        raise ConfigError(f"{what} needs OpenVINO, which is not installed here; {INSTALL_HINT}.")


def opt_out_of_telemetry() -> None:
    """Keep OpenVINO's converter and NNCF from sending usage data (call before importing either).

    Both fall back to their own stubs when `openvino_telemetry` cannot be imported, which a
    None entry in sys.modules makes so; where it was imported already (by the user's code), it stays.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


def _openvino() -> Any:
    opt_out_of_telemetry()
    require("The OpenVINO engine")
    import openvino

    return openvino


def ir_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / IR_FILE


def has_ir(folder: str | os.PathLike[str]) -> bool:
    return ir_path(folder).is_file() and ir_path(folder).with_suffix(".bin").is_file()


def export_ir(model: Any, folder: str | os.PathLike[str]) -> Path:
    """Convert a Keras model to `folder`/model.xml (+ .bin), atomically; the folder's IR if it has one already.

    On TensorFlow the export runs in this process; on another backend in a TensorFlow child
    process, from the model saved as `.keras` (which any backend reads).
    """
    import keras

    folder = Path(folder)
    if has_ir(folder):
        return ir_path(folder)
    _openvino()
    with atomic_directory(folder) as building:
        if keras.config.backend() == "tensorflow":
            _export_here(model, building / IR_FILE)
        else:
            with tempfile.TemporaryDirectory(prefix="keras-to-openvino-") as scratch:
                saved = Path(scratch) / "model.keras"
                model.save(saved)
                _export_in_tensorflow(saved, building / IR_FILE)
    return ir_path(folder)


def without_augmentation(model: Any) -> Any:
    """The model with its random augmentation layers (active only in training) as identities, for export.

    Keras' export traces them with their random ops, which OpenVINO cannot convert (and which
    inference never runs). The model is cloned, nested models included (the served model wraps
    the end-to-end one with test-time augmentation and a temperature; an ensemble has a branch
    per backbone), every other layer shared as it is, with its weights.
    """
    import keras

    def clone(layer: Any) -> Any:
        if type(layer).__name__.startswith("Random"):
            return keras.layers.Identity(name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def _export_here(model: Any, xml: Path) -> None:
    model = without_augmentation(model)
    with warnings.catch_warnings():
        # Keras names the traced input after the model's Input while the export signature is positional.
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
        model.export(str(xml), format="openvino", verbose=False)


def _export_in_tensorflow(keras_file: Path, xml: Path) -> None:
    """Run this module as a child on Keras' TensorFlow backend to export `keras_file` to `xml`."""
    code_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tasks.learning.openvino_engine", str(keras_file), str(xml)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 and "No module named 'tensorflow'" in done.stderr:
        raise ConfigError(f"Converting a Keras/{_backend_name()} model to OpenVINO needs TensorFlow (Keras' OpenVINO "
                          "export of other backends' models fails with these versions), which is not installed "
                          "here; pip install tensorflow, or use --engine keras.")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exporting {keras_file} to OpenVINO in a TensorFlow process failed: {last}")


def _backend_name() -> str:
    import keras

    return keras.config.backend()


def compile_ir(xml: str | os.PathLike[str], precision: str, *, cache: bool = True) -> Any:
    """The IR compiled for this CPU at `precision`, throughput-hinted; blobs cached beside the IR when `cache`."""
    openvino = _openvino()
    if precision not in PRECISION_HINTS:
        raise ConfigError(f"precision {precision!r} has no OpenVINO inference precision; use one of "
                          f"{', '.join(PRECISION_HINTS)}.")
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "THROUGHPUT"}
    blobs = Path(xml).parent / BLOBS
    if cache and os.access(Path(xml).parent, os.W_OK):
        blobs.mkdir(exist_ok=True)
        config["CACHE_DIR"] = str(blobs)
    return core.compile_model(str(xml), "CPU", config)


class Pending:
    """A batch in flight on the queue; `wait()` is its float32 output (n, ...), or a tuple of them for several."""

    def __init__(self, parts: int, outputs: int = 1) -> None:
        self._parts: list[list[np.ndarray] | None] = [None] * parts
        self._left = parts
        self._outputs = outputs
        self._done = threading.Condition()

    def _finish(self, index: int, outputs: list[np.ndarray]) -> None:
        with self._done:
            self._parts[index] = outputs
            self._left -= 1
            self._done.notify_all()

    def wait(self) -> Any:
        with self._done:
            self._done.wait_for(lambda: self._left == 0)
        joined = tuple(np.concatenate([part[k] for part in self._parts]).astype(np.float32, copy=False)  # type: ignore[index]
                       for k in range(self._outputs))
        return joined[0] if self._outputs == 1 else joined


def _collect(request: Any, userdata: tuple[Pending, int, int]) -> None:
    """An infer request's outputs, handed to the batch it was part of."""
    pending, index, outputs = userdata
    pending._finish(index, [np.array(request.get_output_tensor(k).data, dtype=np.float32) for k in range(outputs)])


class OpenVINOForward:
    """A compiled IR as a `Forward`: uint8 (n, h, w, 3) -> `Pending`, its slices on parallel infer requests.

    It returns the IR's first `outputs` outputs: one (the probabilities, or a feature model's
    features) unless asked for more (the served model's head input, tasks/learning/head_input.py).
    """

    def __init__(self, compiled: Any, outputs: int = 1) -> None:
        openvino = _openvino()
        self.compiled = compiled
        if outputs > len(compiled.outputs):
            raise ValueError(f"the compiled model has {len(compiled.outputs)} output(s), not {outputs}")
        self.outputs = outputs
        self.jobs = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = openvino.AsyncInferQueue(compiled, self.jobs)
        # A plain function, not a bound method: the queue then holds no reference back to this forward, so a
        # replaced extractor (the next backbone's) frees its compiled model and threads at once, not at some
        # later garbage collection (alive, they cost the next backbone's extraction up to a third of its speed).
        self._queue.set_callback(_collect)
        self._dispatch = threading.Lock()  # served requests may call from two threads at once

    def __call__(self, pixels: np.ndarray) -> Pending:
        pixels = np.ascontiguousarray(pixels)
        slices = [part for part in np.array_split(pixels, min(self.jobs, max(len(pixels), 1))) if len(part)]
        pending = Pending(len(slices), self.outputs)
        if not slices:
            pending._parts, pending._left = [[np.zeros((0,), np.float32)] * self.outputs], 0
            return pending
        with self._dispatch:
            for index, part in enumerate(slices):
                self._queue.start_async({0: part}, (pending, index, self.outputs))
        return pending


def ir_forward(xml: str | os.PathLike[str], precision: str, *, cache: bool = True, outputs: int = 1) -> OpenVINOForward:
    """The `Forward` of an IR file at `precision`, returning its first `outputs` outputs."""
    return OpenVINOForward(compile_ir(xml, precision, cache=cache), outputs)


def output_count(xml: str | os.PathLike[str]) -> int:
    """How many outputs an IR file has (a served model logged with its head input has two), without compiling it."""
    return len(_openvino().Core().read_model(str(xml)).outputs)


def quantize_ir(source_xml: str | os.PathLike[str], folder: str | os.PathLike[str],
                calibration: Iterable[np.ndarray], calibration_ids: list[str]) -> Path:
    """NNCF's post-training int8 quantization of an IR, calibrated on `calibration` (uint8 images, one per item).

    Written atomically to `folder` with calibration.json naming the images (by sha256) it was
    calibrated on, and reused when it is there already.
    """
    folder = Path(folder)
    if has_ir(folder):
        return ir_path(folder)
    openvino = _openvino()
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)  # its notes per step: the run says what matters
    items = [np.ascontiguousarray(image[None]) for image in calibration]
    if not items:
        raise ConfigError("int8 needs calibration images from the train split, and it has none that decode.")
    model = openvino.Core().read_model(str(source_xml))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))  # its progress bars: not ours
    with atomic_directory(folder) as building:
        openvino.save_model(quantized, str(building / IR_FILE), compress_to_fp16=False)
        (building / "calibration.json").write_text(json.dumps({"images": len(items), "sha256": calibration_ids},
                                                              indent=1) + "\n")
    return ir_path(folder)


def _main(argv: list[str]) -> int:
    """Child entry point: export the `.keras` file argv[0] to the IR file argv[1] on Keras' TensorFlow backend."""
    from tasks.learning.layers import load_saved_model

    model = load_saved_model(argv[0])  # every project layer (Preprocess, MirrorImages, Temperature) registered
    opt_out_of_telemetry()
    _export_here(model, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
