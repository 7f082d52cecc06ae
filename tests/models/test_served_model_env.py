"""The served model is self-contained: a fresh virtualenv made from its own requirements loads it and predicts.

This is what `mlflow models serve --env-manager uv` (MLflow's default env manager) and
`mlflow models build-docker` do: a virtualenv of the model's `requirements.txt`, nothing else,
no project install, no Prefect, made with uv as MLflow makes it. It runs in the JAX job of the
test command, where those requirements are small (a TensorFlow wheel alone is ~600 MB); uv
takes the wheels from the cache the test command's own install filled.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from tests import servers
from tests.fake_training import promoted_champion
from tests.imagegen import image_bytes

pytestmark = [pytest.mark.backends, pytest.mark.slow]

SCRIPT = """
import json, sys
import pandas as pd
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"image": [line.strip() for line in open(sys.argv[2])]})
out = model.predict(frame)
print(json.dumps({"labels": out["label"].tolist(), "errors": out["error"].tolist(),
                  "modules": sorted(name for name in ("prefect", "tensorflow", "great_expectations", "flows")
                                    if name in sys.modules),
                  "decoder": model.unwrap_python_model().decoder, "opencv": "cv2" in sys.modules,
                  "engine": model.unwrap_python_model().engine}))
"""


@pytest.mark.skipif(keras.config.backend() == "tensorflow",
                    reason="run by the JAX job of the test command, whose model requirements are small")
def test_the_logged_model_predicts_a_jpeg_in_a_fresh_virtualenv_of_its_own_requirements(tmp_path, monkeypatch):
    import mlflow

    uri, _ = promoted_champion(tmp_path, engine="openvino")  # converted by a TensorFlow child: this job hides TF
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/cats-vs-dogs@champion", dst_path=str(tmp_path / "m")))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.split("==")[0] in ("prefect", "tensorflow", "great-expectations")]
    assert [r for r in requirements if r.startswith("opencv-python-headless==")]  # trained with the OpenCV decoder
    assert [r for r in requirements if r.startswith("openvino==")]  # logged with the OpenVINO engine

    venv = tmp_path / "venv"
    uv = str(servers.BIN_DIR / "uv")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120)
    install = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r",
                              str(model_dir / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    images = tmp_path / "images.txt"
    images.write_text("\n".join(base64.b64encode(data).decode() for data in
                                (image_bytes("cat", 7), image_bytes("dog", 8), b"not an image")))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, str(model_dir), str(images)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["cat", "dog", ""]
    assert result["errors"][:2] == ["", ""] and "not an image" in result["errors"][2]
    assert result["modules"] == []  # nothing outside the model's requirements was imported
    assert result["decoder"] == "opencv" and result["opencv"]  # it decodes as it was trained, with OpenCV
    assert result["engine"] == "openvino"  # and computes on the engine it was logged with
