"""The other side of tests/learning/test_backends.py, in a process on another Keras backend.

    python -m tests.learning.other_backend DATA_DIR WEIGHTS SIZE MODEL.keras PIXELS.npy OUT_DIR

Extracts mobilenet_v2 features of DATA_DIR with WEIGHTS (OUT_DIR/features.npy), predicts
PIXELS with the model saved on the first backend (OUT_DIR/predicted.npy), and saves a model of
its own from the same weights (OUT_DIR/there.keras). Prints the backend it ran on and its feature
cache's name, so the caller can check it really was another backend. One process for all of it:
starting a backend costs more than the work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    from tests.without_tensorflow import hide_tensorflow_off_its_backend

    hide_tensorflow_off_its_backend()  # JAX's side must not need it
    import keras

    from tasks.data.datafolder import DataFolder
    from tasks.learning.extractor import feature_model
    from tasks.learning.features import extract_features
    from tasks.learning.forward import compiled_forward, to_numpy
    from tasks.learning.preprocess import Preprocess  # noqa: F401  (registered for loading)
    from tasks.learning.shards import load_features

    data_dir, weights, size, model_path, pixels, out = argv
    out = Path(out)
    result = extract_features(data_dir, "mobilenet_v2", weights, int(size), batch_size=8)
    rows = DataFolder.at(data_dir).labelled_rows()
    np.save(out / "features.npy", load_features(result.cache_dir, rows["sha256"].tolist()))
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    np.save(out / "predicted.npy", to_numpy(compiled_forward(model)(np.load(pixels))))
    feature_model("mobilenet_v2", weights, int(size)).save(out / "there.keras")
    print(keras.config.backend(), Path(result.cache_dir).name)


if __name__ == "__main__":
    main(sys.argv[1:])
