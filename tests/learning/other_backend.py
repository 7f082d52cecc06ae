"""The other side of tests/learning/test_backends.py, in a process on another Keras backend.

    python -m tests.learning.other_backend DATA_DIR WEIGHTS SIZE MODEL.keras PIXELS.npy OUT_DIR

Extracts mobilenet_v2 features of DATA_DIR with WEIGHTS (OUT_DIR/features.npy), fits a small head
on them, predicts PIXELS with the model saved on the first backend (OUT_DIR/predicted.npy), and
saves a model of its own from the same weights (OUT_DIR/there.keras). Prints the backend it ran on,
its feature cache's name and whether TensorFlow was imported, so the caller can check it really was
another backend and that off TensorFlow nothing imported it although it is installed (the GPU hosts
have none; the test command's JAX pass hides it, so only this process can see an import). One
process for all of it: starting a backend costs more than the work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    import keras

    from tasks.data.datafolder import DataFolder
    from tasks.learning.extractor import feature_model
    from tasks.learning.features import extract_features
    from tasks.learning.forward import compiled_forward, to_numpy
    from tasks.learning.head import HeadParams, fit_head, save_model
    from tasks.learning.preprocess import Preprocess  # noqa: F401  (registered for loading)
    from tasks.learning.shards import load_features

    data_dir, weights, size, model_path, pixels, out = argv
    out = Path(out)
    result = extract_features(data_dir, "mobilenet_v2", weights, int(size), batch_size=8)
    rows = DataFolder.at(data_dir).labelled_rows()
    features = load_features(result.cache_dir, rows["sha256"].tolist())
    np.save(out / "features.npy", features)
    fit_head(features, rows["y"].to_numpy(), features, rows["y"].to_numpy(), HeadParams(epochs=1, dense_units=4))
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    np.save(out / "predicted.npy", to_numpy(compiled_forward(model)(np.load(pixels))))
    save_model(feature_model("mobilenet_v2", weights, int(size)), out / "there.keras")
    print(keras.config.backend(), Path(result.cache_dir).name, "tensorflow" in sys.modules)


if __name__ == "__main__":
    main(sys.argv[1:])
