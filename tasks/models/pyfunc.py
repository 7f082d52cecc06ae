"""The served model: an MLflow pyfunc that turns images into p(dog) and a label (or a probability per class).

Users meet the model in three places: `mlflow models serve` (JSON over HTTP), the batch
`predict` flow, and `mlflow.pyfunc.load_model(...).predict(...)` in a notebook. All three go
through `CatsDogsModel.predict`, which turns each input cell into pixels with
tasks/models/inputs.py (the one input pipeline of training) and scores them in batches.

Output: one row per input row: ``p_dog`` (nullable float: NA on error, null in JSON), ``label``
("cat"/"dog", "" on error), ``label_index`` (0/1, -1 on error) and ``error`` ("" or one
sentence). A corrupt, oversized or unreadable image yields an error row, never a failed request.
A model of other classes (its config's `classes`, in label order) answers one ``p_<class>``
column per class, then ``label`` (the class name), ``label_index`` and ``error``.

What one request may cost is bounded where the model gets control, that is after MLflow's
scoring server has read and parsed the body (what happens before that is bounded in front of
the server: README "Serving the champion"). Under `mlflow models serve`:

- a request of more than `max_rows` rows is refused as a whole (HTTP 400, one sentence),
  before any per-row work, so a small body that parses into a million rows costs no more;
- a request may spend `max_seconds` in the model (by default half the server's request
  timeout, `mlflow models serve --timeout`): rows not begun by then get an error row, so its
  work stops and its answer comes back before the server gives up on it (HTTP 504), whose
  worker would otherwise go on computing for a client that is gone;
- at most `max_concurrent` requests per process decode and score at once; the others wait
  within their own time budget, and get HTTP 503 if it runs out before their turn.

A request-level fault is raised as an MlflowException, which MLflow's server answers with its
status and message and no stack trace. All limits can be set where the model is served
(`MLFLOW_PYFUNC_INFERENCE_CONFIG`, see tasks/models/packaging.py's `model_config`). In-process
callers (the batch flow, a notebook) choose their own batches: rows and time are not limited.

Pixels: the model decodes with the decoder it was trained with, recorded in its config
(`decoder`: "opencv" or "pillow"; a model logged before decoders were recorded was trained
with Pillow). Where that decoder is not installed the model fails to load with a sentence
saying what to install, rather than serving pixels a level or two from training's under
scores that the gate never saw; the server may choose otherwise explicitly
(`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"decoder": "pillow"}'`).

Engine: the model computes on the engine it was logged with, recorded in its config (`engine`:
"keras", or "openvino" with its OpenVINO IR logged as the `openvino_model` artifact, made and
evaluated by the training run, int8 included, at the config's `precision`; a model logged before
engines were recorded is Keras). Where OpenVINO is not installed such a model fails to load with
one sentence saying what to install, or how to serve it on Keras instead
(`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"engine": "keras"}'`, which computes the saved Keras model:
float32 for an int8 model, so its scores differ a little from the gate's).

The prediction log: where the model's config names a folder (`prediction_log`, by default the
data folder's `predictions/` where it was trained; null turns it off), every scored row is
recorded there for the monitor (tasks/models/prediction_log.py: off the request's critical path,
bounded, never failing a request). The rows carry a 32-number summary of the head's input, which
the same forward returns beside the probabilities (tasks/learning/head_input.py): on Keras the
model with its second output, on OpenVINO the logged IR's second output (an IR logged before it
had one: rows without features). In-process scoring that is not traffic (the gate's test split,
the export's parity check) loads the model with the log off (tasks/models/registry.py).

What the server imports: this module, tasks.models.inputs, .prediction_log, tasks.learning.pixels, .forward,
.head_input,
.preprocess, .layers (test-time augmentation and the temperature live inside the Keras model) and
.openvino_engine, tasks.data.images and tasks.common: numpy, pandas, Pillow, Keras, MLflow and, for an
OpenCV-trained model, OpenCV, for an OpenVINO one OpenVINO, all in the model's requirements.
Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.learning.pixels import ImageError
from tasks.models.inputs import RequestError, input_cells, model_input_pixels, row_count
from tasks.models.prediction_log import LogSettings, ModelIdentity, PredictionLog

_log = logging.getLogger(__name__)

OUTPUT_COLUMNS: tuple[str, ...] = ("p_dog", "label", "label_index", "error")
"""Columns of every prediction frame, in order."""

KERAS_ARTIFACT = "keras_model"
"""Name of the `model.keras` artifact inside the logged pyfunc model."""

OPENVINO_ARTIFACT = "openvino_model"
"""Name of the OpenVINO IR folder artifact (model.xml, model.bin) of a model logged with the OpenVINO engine."""

DEFAULT_BATCH_SIZE = 64
"""Images per forward pass: bounds memory for large requests and batch prediction."""

MAX_ROWS = 512
"""Rows per served request; a larger request is refused whole (split big jobs, or use flows.predict)."""

MAX_CONCURRENT = 2
"""Requests decoding and scoring at once per server process; others wait their turn."""

REQUEST_TIME_SHARE = 0.5
"""Share of the server's request timeout a request may spend in the model by default.

The rest is for what comes before the model (reading and parsing a body of up to 32 MiB takes
seconds) and for finishing the image and batch in hand when the time is up.
"""

THRESHOLD = 0.5
"""p(dog) at or above which the label is "dog" (dog = 1, the Kaggle convention)."""

LEGACY_DECODER = "pillow"
"""The decoder of a logged model whose config names none: every model before decoders were recorded used Pillow."""


def output_columns(classes: ClassMap = CATS_DOGS) -> tuple[str, ...]:
    """The prediction frame's columns: OUTPUT_COLUMNS for cats vs. dogs, else `p_<class>`..., label, label_index, error."""
    return (*classes.probability_columns, "label", "label_index", "error")


def class_probabilities(outputs: np.ndarray, classes: ClassMap) -> np.ndarray:
    """The model's outputs as one probability per class, (n, classes): a sigmoid's p gives [1 - p, p]."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if classes.binary:
        p = outputs.reshape(-1)
        return np.stack([1.0 - p, p], axis=1)
    return outputs.reshape(len(outputs), len(classes.names))


def predicted_indexes(probabilities: np.ndarray, classes: ClassMap) -> np.ndarray:
    """The label index of each row of (n, classes) probabilities: p(label 1) >= THRESHOLD for two, the largest for more."""
    probabilities = np.asarray(probabilities).reshape(-1, len(classes.names))
    return (probabilities[:, 1] >= THRESHOLD).astype(np.int64) if classes.binary else np.argmax(probabilities, axis=1)


def predictions_frame(scores: Sequence[Any], errors: Sequence[str], classes: ClassMap = CATS_DOGS) -> pd.DataFrame:
    """The output frame: probabilities for scored rows, an error (and null probabilities) for the others.

    `scores` holds, per row, None or the model's output: p(positive) for two classes (the
    sigmoid), a probability per class for more.
    """
    columns = classes.probability_columns
    rows = []
    for score, error in zip(scores, errors):
        if error or score is None:
            rows.append({**dict.fromkeys(columns), "label": "", "label_index": -1, "error": error or "not scored"})
            continue
        probabilities = class_probabilities(np.asarray([score]), classes)[0]
        index = int(predicted_indexes(probabilities, classes)[0])
        values = [probabilities[1]] if classes.kaggle else probabilities
        rows.append({**{column: float(value) for column, value in zip(columns, values)},
                     "label": classes.names[index], "label_index": index, "error": ""})
    frame = pd.DataFrame(rows, columns=list(output_columns(classes))).astype(
        {"label": object, "label_index": "int64", "error": object})
    # nullable Float64: a missing score is NA, which MLflow's JSON writes as null (NaN is not JSON)
    for column in columns:
        frame[column] = pd.array([row[column] for row in rows], dtype="Float64")
    return frame


def load_keras_model(path: str | Path) -> Any:
    """Load an end-to-end `.keras` model in safe mode, after registering the project's layers."""
    from tasks.learning.layers import load_saved_model

    return load_saved_model(path)


def model_input_size(model: Any, configured: int | None = None) -> int:
    """The square input size the model expects: from the logged config, else its input shape."""
    if configured:
        return int(configured)
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    height, width = shape[1], shape[2]
    if not height or height != width:
        raise ValueError(f"the model input shape {shape} is not a fixed square image size")
    return int(height)


def check_engine(engine: str) -> None:
    """A model logged with the OpenVINO engine, where OpenVINO is missing: one sentence on what to do."""
    from tasks.common.errors import ConfigError
    from tasks.learning import openvino_engine

    if engine not in openvino_engine.ENGINES:
        raise ConfigError(f"this model's engine {engine!r} is unknown; serve it with MLFLOW_PYFUNC_INFERENCE_CONFIG="
                          "'{\"engine\": \"keras\"}'")
    if engine == "openvino" and not openvino_engine.installed():
        raise ConfigError("this model was logged with the OpenVINO engine, which is not installed here; "
                          "pip install openvino (it is in the model's requirements), or serve it on Keras with "
                          "MLFLOW_PYFUNC_INFERENCE_CONFIG='{\"engine\": \"keras\"}'")


def _openvino_forward(keras_model: Any, engine_model: str | None, precision: str,
                      head_input: bool = False) -> tuple[Any, bool]:
    """(the OpenVINO forward of a logged IR, or of the Keras model converted now, into a folder that lives as long as
    the process: the IR's weights are read from it; whether it returns the head's input too, as asked, which an IR
    logged before it had that output cannot). No compiled blobs are cached: MLflow hands a server a fresh copy of the
    artifacts each start, so they would only fill its temporary folder."""
    import tempfile

    from tasks.learning.head_input import with_head_input
    from tasks.learning.openvino_engine import export_ir, ir_forward, output_count

    if engine_model is None:
        converted = with_head_input(keras_model) if head_input else keras_model
        engine_model = str(export_ir(converted, Path(tempfile.mkdtemp(prefix="catsdogs-openvino-")) / "ir"))
    outputs = 2 if head_input and output_count(engine_model) >= 2 else 1
    return ir_forward(engine_model, precision, cache=False, outputs=outputs), outputs == 2


def _feature_summary(keras_model: Any, projection: dict[str, int] | None) -> Any:
    """The head input's summary the model was logged with, or None (logged before it had one, or no head to tap)."""
    from tasks.learning.head_input import FeatureSummary

    if not projection:
        return None
    try:
        return FeatureSummary.of(keras_model, int(projection["seed"]), int(projection["dims"]))
    except (KeyError, ValueError) as error:
        _log.warning("The prediction log records rows without features: %s.", error)
        return None


def server_request_timeout() -> float | None:
    """The scoring server's request timeout in seconds, or None outside a scoring server.

    `mlflow models serve` (and every MLflow scoring server) sets MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    in the environment of the process that loads the model, from its `--timeout` (default 60):
    this is how the model knows that it answers requests, and how long each may take.
    """
    return float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()) if MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.is_set() \
        else None


def request_seconds(max_seconds: float | None, server_timeout: float | None) -> float | None:
    """Seconds a served request may spend in the model: `max_seconds`, else a share of the server's timeout."""
    if server_timeout is None:
        return None
    return float(max_seconds) if max_seconds else server_timeout * REQUEST_TIME_SHARE


class CatsDogsModel(mlflow.pyfunc.PythonModel):
    """Scores images with the end-to-end Keras model logged as the `keras_model` artifact.

    Pickled by reference (`tasks.models.pyfunc.CatsDogsModel`); the `tasks` package is logged
    as the model's code path, so a server process can import it without the project installed.
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, max_rows: int = MAX_ROWS,
                 max_concurrent: int = MAX_CONCURRENT, max_seconds: float | None = None) -> None:
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.max_concurrent = max_concurrent
        self.max_seconds = max_seconds
        self._model: Any = None
        self._input_size: int | None = None
        self.decoder: str | None = None
        self.engine: str = "keras"
        self._forward: Any = None
        self.classes: ClassMap = CATS_DOGS
        self.prediction_log: PredictionLog | None = None
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings only: the Keras model is an artifact, loaded by `load_context`."""
        return {"batch_size": self.batch_size, "max_rows": self.max_rows, "max_concurrent": self.max_concurrent,
                "max_seconds": self.max_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def load_context(self, context: Any) -> None:
        """Load the Keras model once per process (server worker or batch flow).

        The backend the model was logged with is used unless the environment names one:
        Keras reads KERAS_BACKEND when it is first imported, which happens here.
        """
        config = getattr(context, "model_config", None) or {}
        if config.get("keras_backend"):
            os.environ.setdefault("KERAS_BACKEND", str(config["keras_backend"]))
        self.max_rows = int(config.get("max_rows") or self.max_rows)
        self.max_seconds = float(config["max_seconds"]) if config.get("max_seconds") else self.max_seconds
        if int(config.get("max_concurrent") or self.max_concurrent) != self.max_concurrent:
            self.max_concurrent = int(config["max_concurrent"])
            self._slots = threading.BoundedSemaphore(self.max_concurrent)
        decoder = str(config.get("decoder") or LEGACY_DECODER)
        classes = ClassMap.from_names(config["classes"]) if config.get("classes") else CATS_DOGS
        engine, precision = str(config.get("engine") or "keras"), str(config.get("precision") or "float32")
        check_engine(engine)  # before Keras loads the weights: a missing engine costs a second, not a model load
        ir = context.artifacts.get(OPENVINO_ARTIFACT)
        keras_file = Path(context.artifacts[KERAS_ARTIFACT])
        self.attach(load_keras_model(keras_file), config.get("input_size"), decoder, classes,
                    engine=engine, engine_model=str(Path(ir) / "model.xml") if ir else None, precision=precision,
                    prediction_log=LogSettings.from_config(config), projection=config.get("feature_projection"),
                    identity=ModelIdentity.of_folder(keras_file.parents[1]))  # <model>/artifacts/model.keras

    def attach(self, keras_model: Any, input_size: int | None = None, decoder: str = "auto",
               classes: ClassMap = CATS_DOGS, *, engine: str = "keras", engine_model: str | None = None,
               precision: str = "float32", prediction_log: LogSettings | None = None,
               projection: dict[str, int] | None = None, identity: ModelIdentity = ModelIdentity()) -> CatsDogsModel:
        """Use an in-memory Keras model (tests, evaluation before anything is logged).

        `decoder` is the one the model was trained with; one that is not installed here is a
        ConfigError that says what to install. `classes` are the model's classes in label
        order (a model logged before class maps were recorded is cats vs. dogs). On `engine`
        "openvino" the model runs `engine_model` (an IR file) at `precision`, or, without one,
        the Keras model converted here (float32 or bfloat16 only: int8 needs its calibrated IR).
        With `prediction_log` every scored row is recorded there, as `identity`'s, with its head
        input summarised by `projection` (`{"seed", "dims"}`; without one, no features).
        """
        from tasks.common.errors import ConfigError
        from tasks.learning.forward import compiled_forward
        from tasks.learning.head_input import with_head_input
        from tasks.learning.pixels import OPENCV, opencv_installed, resolve_decoder

        if decoder == OPENCV and not opencv_installed():
            raise ConfigError("this model was trained on images decoded by OpenCV, which is not installed here; "
                              "pip install opencv-python-headless (it is in the model's requirements), or serve it "
                              "with MLFLOW_PYFUNC_INFERENCE_CONFIG='{\"decoder\": \"pillow\"}' to accept pixels a "
                              "level or two from training's")
        self.decoder = resolve_decoder(decoder)
        self.classes = classes
        self._model = keras_model
        self._input_size = model_input_size(keras_model, input_size)
        check_engine(engine)
        self.engine = engine
        summary = _feature_summary(keras_model, projection) if prediction_log is not None else None
        if engine == "keras":
            self._forward = compiled_forward(with_head_input(keras_model) if summary else keras_model)
        else:
            self._forward, both = _openvino_forward(keras_model, engine_model, "float32" if engine_model is None and
                                                    precision == "int8" else precision, head_input=summary is not None)
            if summary is not None and not both:
                _log.warning("This model's OpenVINO IR was logged without its head input; the prediction log records "
                             "its rows without features (retrain to log them).")
                summary = None
        self.prediction_log = None if prediction_log is None else \
            PredictionLog(prediction_log, identity, classes.names, summary)
        return self

    @property
    def keras_model(self) -> Any:
        """The loaded end-to-end Keras model (Grad-CAM explains it; scoring goes through `predict`)."""
        return self._model

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score every usable row in batches; every other row becomes an error row, in input order.

        MLflow passes a DataFrame; called directly, `model_input` may be anything
        `input_cells` accepts. (The DataFrame hint is one MLflow does not turn into a schema.)
        A fault of the whole request is an MlflowException (HTTP 400 under `mlflow models serve`).
        """
        if self._model is None:
            raise RuntimeError("the model is not loaded; call load_context or attach first")
        started = time.monotonic()
        server_timeout = server_request_timeout()
        try:
            if server_timeout is not None and (rows := row_count(model_input)) > self.max_rows:
                raise RequestError(f"the request has {rows:,} rows; at most {self.max_rows} are scored per request, "
                                   "so send them in several requests")
            seconds = request_seconds(self.max_seconds, server_timeout)
            return self._score(input_cells(model_input), int((params or {}).get("batch_size") or self.batch_size),
                               started + seconds if seconds else math.inf, seconds)
        except RequestError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from None
        except MlflowException:
            raise
        except Exception as error:
            if server_timeout is None:
                raise
            # a 500 with one sentence for the client; the trace goes to the server's log, not the response
            _log.exception("scoring a request failed")
            raise MlflowException(f"the model failed on this request ({type(error).__name__}); the server's log "
                                  "has the details") from None

    def _score(self, cells: list[tuple[str, Any]], batch_size: int, deadline: float,
               seconds: float | None) -> pd.DataFrame:
        """Decode and score `cells` in batches while time is left; rows not begun by `deadline` are error rows."""
        from tasks.learning.forward import to_numpy

        size = int(self._input_size)
        scores: list[Any] = [None] * len(cells)
        errors = [""] * len(cells)
        wait = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        if cells and not self._slots.acquire(timeout=wait):
            raise MlflowException(f"the server was busy for the {seconds:g} s a request may wait and be scored "
                                  "here; send it again", error_code=TEMPORARILY_UNAVAILABLE)
        try:
            for start in range(0, len(cells), batch_size):
                rows = range(start, min(start + batch_size, len(cells)))
                batch = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
                good = []
                for offset, index in enumerate(rows):
                    if time.monotonic() > deadline:
                        break
                    try:
                        batch[offset] = model_input_pixels(*cells[index], size, self.decoder)
                        good.append(offset)
                    except ImageError as error:
                        errors[index] = str(error)
                    except Exception as error:  # noqa: BLE001 - a per-image fault must never stop the batch
                        errors[index] = f"the image could not be read ({type(error).__name__}: {error})"
                if good:
                    outputs = to_numpy(self._forward(batch[good]))
                    outputs, head_input = outputs if isinstance(outputs, tuple) else (outputs, None)
                    outputs = outputs.reshape(len(good), -1)
                    for offset, output in zip(good, outputs):
                        scores[rows[offset]] = float(output[0]) if self.classes.binary else output
                    if self.prediction_log is not None:  # the hook: hands the batch over, never waits
                        probabilities = class_probabilities(outputs, self.classes)
                        self.prediction_log.record(probabilities, predicted_indexes(probabilities, self.classes),
                                                   head_input, [cells[rows[offset]] for offset in good])
                if time.monotonic() > deadline:
                    break
        finally:
            if cells:
                self._slots.release()
        if seconds is not None:
            for index in range(len(cells)):
                if scores[index] is None and not errors[index]:
                    errors[index] = (f"not scored: the request used up the {seconds:g} s it may take here; "
                                     "send this row again in a smaller request")
        return predictions_frame(scores, errors, self.classes)
