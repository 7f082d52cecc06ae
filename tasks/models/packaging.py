"""What is logged with the served model, so that it loads and serves anywhere: signature, example,
requirements, settings and code.

tasks/models/tracking.py's `log_pyfunc_model` puts these next to `CatsDogsModel`
(tasks/models/pyfunc.py): the signature MLflow checks requests against, a neutral input
example, the exact requirements of a fresh environment (`--env-manager virtualenv`,
`mlflow models build-docker`), the settings a server may override through
`MLFLOW_PYFUNC_INFERENCE_CONFIG`, and the `tasks` package as the model's code.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.models.inputs import IMAGE_COLUMN, PIXELS_COLUMN
from tasks.models.pyfunc import MAX_CONCURRENT, MAX_ROWS

SERVING_PACKAGES: tuple[str, ...] = ("mlflow", "keras", "pillow", "numpy", "pandas", "h5py")
"""What the served model imports, whatever the backend (h5py: Keras reads .keras weights with it)."""

DECODER_PACKAGES: dict[str, tuple[str, ...]] = {"opencv": ("opencv-python-headless",), "pillow": ()}
"""What the image decoder the model was trained with adds (Pillow reads every image's header either way)."""

ENGINE_PACKAGES: dict[str, tuple[str, ...]] = {"keras": (), "openvino": ("openvino",)}
"""What the engine the model was logged with adds (OpenVINO's IR runs on the openvino package alone)."""

BACKEND_PACKAGES: dict[str, tuple[str, ...]] = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"),
                                                "torch": ("torch",)}


def model_signature(classes: ClassMap = CATS_DOGS) -> Any:
    """The logged signature: optional `image` and `pixels` (both Any, see below) in; scores out.

    Out: `p_dog` for cats vs. dogs, else one `p_<class>` per class in label order; then label
    (the class name), label_index and error. The class map is readable from the signature.

    `image` is typed Any, not binary: a binary column makes MLflow base64-decode it before the
    model sees it, and one bad row would then fail the whole request. `pixels` is Any because
    MLflow's nested-array checks would walk every pixel of every image in Python.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(AnyType(), IMAGE_COLUMN, required=False),
                     ColSpec(AnyType(), PIXELS_COLUMN, required=False)])
    outputs = Schema([*(ColSpec(DataType.double, column, required=False) for column in classes.probability_columns),
                      ColSpec(DataType.string, "label"), ColSpec(DataType.long, "label_index"),
                      ColSpec(DataType.string, "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image_bytes(size: int = 32) -> bytes:
    """A small neutral JPEG used as the logged input example (no user data leaks into it)."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1),
                       np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def input_example() -> pd.DataFrame:
    """The logged input example: one row with a base64 JPEG in the `image` column, as JSON sends it."""
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_bytes()).decode("ascii")]})


def pip_requirements(backend: str | None = None, decoder: str = "pillow", engine: str = "keras") -> list[str]:
    """Pinned requirements of the served model: what it imports, the Keras backend it was logged on, its decoder
    and its engine.

    Given explicitly (not inferred by MLflow, which would load the model in a subprocess) and
    exactly: a fresh virtualenv made from these alone loads and serves the model (tested).
    """
    from importlib.metadata import PackageNotFoundError, version

    if backend is None:
        import keras

        backend = keras.config.backend()
    pins = []
    for package in (*SERVING_PACKAGES, *BACKEND_PACKAGES.get(backend, ()), *DECODER_PACKAGES[decoder],
                    *ENGINE_PACKAGES[engine]):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def model_config(input_size: int, decoder: str = "pillow", classes: ClassMap = CATS_DOGS, engine: str = "keras",
                 precision: str = "float32", prediction_log: str | None = None) -> dict[str, Any]:
    """Settings stored with the logged model: input size, decoder, classes, the backend to load it on, its engine and
    precision, the request limits, the prediction log and the projection of its head input.

    `classes` are the class names in label order: what the model's outputs mean.

    `decoder` is the image decoder the model was trained with ("opencv" or "pillow"), so that
    served pixels are training's. Each setting can be changed where the model is served, without
    logging it again, through MLflow's `MLFLOW_PYFUNC_INFERENCE_CONFIG` (e.g.
    `'{"max_rows": 128, "max_concurrent": 1, "max_seconds": 20}'`, or `'{"decoder": "pillow"}'` to
    serve an OpenCV-trained model where OpenCV cannot be installed, accepting pixels a level or two
    apart); MLflow takes only keys logged here, so `max_seconds` is logged as null: half the
    server's `--timeout` unless set.

    `prediction_log` is the folder every scored row is recorded in (by default the training data
    folder's `predictions/`; `'{"prediction_log": "/var/log/catsdogs"}'` moves it, `null` turns it
    off), kept for `prediction_log_days`, within `prediction_log_mb`; `prediction_log_images` keeps
    the scored images too. `feature_projection` is the seed and size of the random projection that
    summarises each row's head input (tasks/learning/head_input.py): the monitor projects the
    training features with the same one, so it is not a setting to change where the model is served.
    """
    import keras

    from tasks.learning.head_input import PROJECTION_DIMS, PROJECTION_SEED
    from tasks.models.prediction_log import DEFAULT_DAYS, DEFAULT_MB

    return {"input_size": int(input_size), "decoder": decoder, "classes": list(classes.names),
            "keras_backend": keras.config.backend(), "engine": engine, "precision": precision,
            "max_rows": MAX_ROWS, "max_concurrent": MAX_CONCURRENT, "max_seconds": None,
            "prediction_log": prediction_log, "prediction_log_days": DEFAULT_DAYS, "prediction_log_mb": DEFAULT_MB,
            "prediction_log_images": False,
            "feature_projection": {"seed": PROJECTION_SEED, "dims": PROJECTION_DIMS}}


def tasks_code_path() -> str:
    """The `tasks` package folder, logged with the model so a server can unpickle `CatsDogsModel`."""
    return str(Path(__file__).resolve().parents[1])
