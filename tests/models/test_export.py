"""`python -m flows.export`: the champion as OpenVINO IR and ONNX, run in their own runtimes, equal to MLflow's.

The session's champion (tests/conftest.py `champion_store`) is exported the way users call
the command; the parity check inside it runs the artifact with OpenVINO / ONNX Runtime alone
and compares with the MLflow model. What a user gets must also work without this project, so
the test runs each artifact again here on images of its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.export import main
from tasks.common.errors import ConfigError
from tasks.models import export
from tests.imagegen import class_pixels

CHAMPION_URI = "models:/cats-vs-dogs@champion"


@pytest.fixture
def store(champion_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    return champion_store


@pytest.mark.parametrize("format", ["openvino", "onnx"])
def test_the_exported_model_reproduces_the_mlflow_models_probabilities(store, tmp_path, capsys, format):
    output = tmp_path / format
    assert main([CHAMPION_URI, "--format", format, "--output", str(output), "--data-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    contract = json.loads((output / "export.json").read_text())
    assert contract["max_difference"] <= 1e-4 and f"{contract['max_difference']:.2e}" in printed  # fp32 parity
    assert contract["input"]["dtype"] == "uint8" and contract["input"]["shape"] == [None, 32, 32, 3]
    assert contract["classes"] == ["cat", "dog"] and contract["served_engine"] == "openvino"

    pixels = np.stack([class_pixels(label, seed, size=(32, 32)) for label in ("cat", "dog") for seed in (1, 2)])
    if format == "openvino":
        import openvino

        p_dog = openvino.Core().compile_model(str(output / "openvino" / "model.xml"), "CPU")(pixels)[0]
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
        p_dog = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    assert np.asarray(p_dog).reshape(-1).round().tolist() == [0, 0, 1, 1]  # the champion's verdicts, standalone


def test_an_export_that_does_not_reproduce_the_model_writes_nothing(store, tmp_path, monkeypatch):
    real = export._run_exported
    monkeypatch.setattr(export, "_run_exported", lambda *args: real(*args) + 1e-3)
    with pytest.raises(ConfigError, match=r"differs from the MLflow model by up to 1\.00e-03 in probability, above "
                                          r"the 0\.0001 allowed; nothing was written"):
        export.export_model(CHAMPION_URI, "openvino", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_unknown_model_is_one_sentence_and_exit_2(store, tmp_path, capsys):
    assert main(["models:/no-such-model/1", "--output", str(tmp_path / "out"), "--data-dir", str(tmp_path)]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()
