"""The served pyfunc model in this process: decoding, scoring, parity with training.

The model under test is the session's champion (tests/conftest.py `champion_store`), a real
`.keras` file logged by `log_retrain` and promoted by the gate, so these checks exercise exactly
what users load with `models:/cats-vs-dogs@champion`. The same champion behind a real
`mlflow models serve` is tests/models/test_model_server.py's.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.learning.pixels import decode_image, read_image, resize_pixels
from tasks.models import inputs, packaging, pyfunc
from tests.imagegen import class_pixels, image_bytes, truncated_jpeg

pytestmark = pytest.mark.backends  # runs on TensorFlow and again on JAX (see README's test command)

CHAMPION_URI = "models:/cats-vs-dogs@champion"


@pytest.fixture(scope="module")
def champion(champion_store):
    """The champion loaded through MLflow, as the predict flow and notebooks load it."""

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
        from tasks.models.registry import load_pyfunc

        yield load_pyfunc(CHAMPION_URI)


def _png(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------ decoding (no model needed)


@pytest.mark.parametrize("decoder", ["pillow", "opencv"])
def test_cells_go_through_the_training_pipeline(decoder):
    data = image_bytes("cat", 1, exif_orientation=6)
    from_text = inputs.model_input_pixels("image", base64.b64encode(data).decode(), 32, decoder)
    from_bytes = inputs.model_input_pixels("image", data, 32, decoder)
    np.testing.assert_array_equal(from_text, decode_image(data, 32, decoder=decoder))  # the one decode of training
    np.testing.assert_array_equal(from_bytes, from_text)
    pixels = class_pixels("dog", 3)
    np.testing.assert_array_equal(inputs.model_input_pixels("pixels", pixels, 32, decoder),
                                  resize_pixels(pixels, 32, decoder=decoder))


def test_the_served_model_requires_and_records_the_decoder_it_was_trained_with():
    assert not [r for r in packaging.pip_requirements(decoder="pillow") if r.startswith("opencv")]
    assert [r for r in packaging.pip_requirements(decoder="opencv") if r.startswith("opencv-python-headless==")]
    assert packaging.model_config(32, "opencv")["decoder"] == "opencv"


@pytest.mark.parametrize("value, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (truncated_jpeg(), "cannot be decoded"),
    ("%%% not base64 %%%", "not valid base64"),
    (12345, "base64 text or bytes"),
])
def test_bad_cells_are_rejected_with_a_reason(value, message):
    with pytest.raises(ValueError, match=message):
        inputs.model_input_pixels("image", value, 32)


def test_coerce_pixels_accepts_grey_and_rejects_bad_shapes_and_ranges():
    assert inputs.coerce_pixels(np.zeros((5, 6))).shape == (5, 6, 3)
    assert inputs.coerce_pixels(np.full((2, 2, 3), 254.6)).dtype == np.uint8
    assert inputs.coerce_pixels(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="shape"):
        inputs.coerce_pixels(np.zeros((5, 6, 2)))
    with pytest.raises(ValueError, match="between 0 and 255"):
        inputs.coerce_pixels(np.full((5, 6, 3), 300.0))


def test_signature_declares_optional_image_and_pixels_columns_the_model_decodes_itself():
    signature = packaging.model_signature()
    inputs = {spec.name: spec for spec in signature.inputs.inputs}
    assert set(inputs) == {"image", "pixels"}
    assert not inputs["image"].required and not inputs["pixels"].required
    assert "binary" not in repr(inputs["image"].type)  # MLflow must not base64-decode the column for us
    assert signature.outputs.input_names() == list(pyfunc.OUTPUT_COLUMNS)


# ------------------------------------------------------------------ the logged model in-process


def test_champion_scores_images_and_gives_error_rows(champion):
    frame = pd.DataFrame({"image": [image_bytes("cat", 10), image_bytes("dog", 11),
                                    image_bytes("dog", 12, fmt="PNG"), b"garbage", truncated_jpeg()]})
    out = champion.predict(frame)
    assert list(out.columns) == list(pyfunc.OUTPUT_COLUMNS)
    assert out["label"].tolist() == ["cat", "dog", "dog", "", ""]
    assert out["label_index"].tolist() == [0, 1, 1, -1, -1]
    assert out["p_dog"][0] < 0.5 < out["p_dog"][1]
    assert out["error"][:3].tolist() == ["", "", ""]
    assert "not an image" in out["error"][3] and "cannot be decoded" in out["error"][4]
    assert out["p_dog"][3] is pd.NA and out["p_dog"][4] is pd.NA  # null in JSON, never NaN


def test_champion_accepts_pixels_and_base64_text(champion):
    batch = np.stack([class_pixels("cat", 20), class_pixels("dog", 21)])
    by_column = champion.predict(pd.DataFrame({"pixels": list(batch)}))
    by_dict = champion.predict({"pixels": batch})
    as_text = champion.predict(pd.DataFrame({"image": [base64.b64encode(image_bytes("dog", 22)).decode()]}))
    assert by_column["label"].tolist() == ["cat", "dog"] == by_dict["label"].tolist()
    np.testing.assert_allclose(by_column["p_dog"], by_dict["p_dog"], rtol=1e-6)
    assert as_text["label"].tolist() == ["dog"]


def test_unwrapped_model_accepts_a_bare_pixel_array(champion):
    model = champion.unwrap_python_model()
    out = model.predict(None, np.stack([class_pixels("dog", 30), class_pixels("cat", 31)]))
    assert out["label"].tolist() == ["dog", "cat"]


def test_input_without_image_or_pixels_is_refused_clearly(champion):
    with pytest.raises(Exception, match="needs a column 'image'"):
        champion.predict(pd.DataFrame({"photo": [b"x"]}))


def test_request_limits_apply_under_a_scoring_server_only(champion, monkeypatch):
    """Batch prediction and notebooks choose their own batches; a served request of too many rows is a 400."""
    from mlflow.exceptions import MlflowException

    many = pd.DataFrame({"image": [image_bytes("cat", 60)] * (pyfunc.MAX_ROWS + 1)})
    assert (champion.predict(many)["error"] == "").all()
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "60")  # what `mlflow models serve` sets
    with pytest.raises(MlflowException, match=f"at most {pyfunc.MAX_ROWS} are scored per request") as refused:
        champion.predict(many)
    assert refused.value.get_http_status_code() == 400


def test_a_served_request_may_take_half_the_servers_timeout_unless_configured():
    assert pyfunc.request_seconds(None, None) is None and pyfunc.request_seconds(5, None) is None  # not served
    assert pyfunc.request_seconds(None, 60.0) == 30.0
    assert pyfunc.request_seconds(12, 60.0) == 12.0


def test_serving_scores_equal_the_training_pipeline(champion_store, champion, tmp_path):
    """Served p(dog) equals the Keras model on the training pipeline's pixels (same decode and resize)."""
    import keras

    from tasks.learning.forward import compiled_forward, to_numpy

    paths = []
    for index, label in enumerate(["cat", "dog", "cat", "dog"]):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(image_bytes(label, 40 + index, size=(61, 47)))
        paths.append(path)
    model = keras.saving.load_model(champion_store.result.model_path, safe_mode=True)
    decoder = champion_store.result.decoder
    expected = to_numpy(compiled_forward(model)(np.stack([read_image(path, 32, decoder=decoder)
                                                          for path in paths]))).reshape(-1)
    served = champion.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))["p_dog"].to_numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


@pytest.mark.parametrize("config, decoder", [({"decoder": "pillow"}, "pillow"), ({"decoder": "opencv"}, "opencv"),
                                             ({}, "pillow")])  # logged before decoders were recorded: Pillow
def test_the_served_model_decodes_with_the_decoder_in_its_config(champion_store, config, decoder, monkeypatch):
    model = pyfunc.CatsDogsModel()
    model.load_context(SimpleNamespace(artifacts={pyfunc.KERAS_ARTIFACT: champion_store.result.model_path},
                                       model_config={"input_size": 32, **config}))
    assert model.decoder == decoder
    used = []
    real = pyfunc.model_input_pixels
    monkeypatch.setattr(pyfunc, "model_input_pixels", lambda *args: used.append(args[-1]) or real(*args))
    data = image_bytes("dog", 70, size=(150, 110))
    out = model.predict(None, pd.DataFrame({"image": [data]}))
    assert used == [decoder] and out["error"][0] == ""


def test_an_opencv_trained_model_fails_to_load_clearly_where_opencv_is_missing(champion_store, monkeypatch):
    from tasks.common.errors import ConfigError
    from tasks.learning import pixels

    monkeypatch.setattr(pixels, "_opencv", lambda: None)
    context = SimpleNamespace(artifacts={pyfunc.KERAS_ARTIFACT: champion_store.result.model_path},
                              model_config={"input_size": 32, "decoder": "opencv"})
    with pytest.raises(ConfigError, match=r"trained on images decoded by OpenCV.*pip install opencv-python-headless"
                                          r".*MLFLOW_PYFUNC_INFERENCE_CONFIG"):
        pyfunc.CatsDogsModel().load_context(context)
    served = pyfunc.CatsDogsModel()
    served.load_context(SimpleNamespace(artifacts=context.artifacts, model_config={"input_size": 32,
                                                                                  "decoder": "pillow"}))
    assert served.decoder == "pillow"  # what a server chooses with MLFLOW_PYFUNC_INFERENCE_CONFIG



# ------------------------------------------------------------------ the engine it was logged with


def test_the_champion_runs_on_the_openvino_engine_it_was_logged_with_as_keras_would(champion, champion_store):
    import mlflow

    served = champion.unwrap_python_model()
    assert served.engine == "openvino"
    keras_model = pyfunc.load_keras_model(champion_store.result.model_path)
    on_keras = pyfunc.CatsDogsModel().attach(keras_model, 32, served.decoder)
    frame = pd.DataFrame({"pixels": [class_pixels(label, seed) for label in ("cat", "dog") for seed in range(3)]})
    np.testing.assert_allclose(champion.predict(frame)["p_dog"].to_numpy(float),
                               on_keras.predict(None, frame)["p_dog"].to_numpy(float), atol=1e-5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
        requirements = mlflow.pyfunc.get_model_dependencies(CHAMPION_URI)
    assert any(line.startswith("openvino==") for line in open(requirements).read().split())


def test_an_openvino_model_fails_to_load_in_one_sentence_where_openvino_is_missing(champion_store, monkeypatch):
    from tasks.common.errors import ConfigError
    from tasks.learning import openvino_engine

    monkeypatch.setattr(openvino_engine, "installed", lambda: False)
    artifacts = {pyfunc.KERAS_ARTIFACT: champion_store.result.model_path,
                 pyfunc.OPENVINO_ARTIFACT: str(Path(champion_store.result.engine_model_path).parent)}
    context = SimpleNamespace(artifacts=artifacts, model_config={"input_size": 32, "engine": "openvino"})
    with pytest.raises(ConfigError, match=r"^this model was logged with the OpenVINO engine, which is not installed "
                                          r"here; pip install openvino .*MLFLOW_PYFUNC_INFERENCE_CONFIG='\{\"engine\": "
                                          r"\"keras\"\}'$"):
        pyfunc.CatsDogsModel().load_context(context)
    served = pyfunc.CatsDogsModel()
    served.load_context(SimpleNamespace(artifacts=artifacts, model_config={"input_size": 32, "engine": "keras"}))
    assert served.engine == "keras"  # what a server chooses with MLFLOW_PYFUNC_INFERENCE_CONFIG


# ------------------------------------------------------------------ the prediction log


def test_the_champion_logs_each_scored_row_with_the_head_input_its_engine_returned(champion_store, tmp_path):
    """Scored rows go to the log (by default the training data folder's predictions/; here one the loader names) as
    the registered version's, with the head input the OpenVINO IR returned in the same forward, summarised as the
    Keras model's would be; error rows are not rows, and the gate's scoring logs nothing."""
    from tasks.learning.forward import compiled_forward, to_numpy
    from tasks.learning.head_input import FeatureSummary, with_head_input
    from tasks.models.prediction_log import read_window
    from tasks.models.registry import load_pyfunc, logged_config

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
        default = logged_config(CHAMPION_URI)["prediction_log"]
        model = load_pyfunc(CHAMPION_URI, prediction_log=str(tmp_path / "log"))
        quiet = load_pyfunc(CHAMPION_URI, prediction_log=False)
    assert default == str(Path(champion_store.result.data_dir) / "predictions")
    assert quiet.unwrap_python_model().prediction_log is None
    served = model.unwrap_python_model()
    pixels = [class_pixels(label, 80 + index) for index, label in enumerate(("cat", "dog", "dog"))]
    out = model.predict(pd.DataFrame({"pixels": [*pixels, np.zeros((2, 2, 2))]}))
    served.prediction_log.flush()
    rows = read_window(tmp_path / "log").rows
    assert served.engine == "openvino" and out["error"][3]
    assert [row["label"] for row in rows] == out["label"][:3].tolist() == ["cat", "dog", "dog"]
    assert [row["probabilities"][1] for row in rows] == pytest.approx(out["p_dog"][:3].to_numpy(float), abs=1e-6)
    assert {(row["model"], row["version"]) for row in rows} == {("cats-vs-dogs", "1")} and rows[0]["run_id"]
    keras_model = pyfunc.load_keras_model(champion_store.result.model_path)
    batch = np.stack([resize_pixels(image, 32, decoder=served.decoder) for image in pixels])
    _, head_input = to_numpy(compiled_forward(with_head_input(keras_model))(batch))
    np.testing.assert_allclose([row["features"] for row in rows], FeatureSummary.of(keras_model)(head_input),
                               atol=1e-3)
