"""Run one compute step in a process on another Keras backend (the backend is fixed per process).

    python -m tests.learning.other_backend features DATA_DIR WEIGHTS SIZE OUT.npy
    python -m tests.learning.other_backend predict MODEL.keras PIXELS.npy OUT.npy

Prints the backend it ran on, so the caller can check it really was another one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    import keras

    command, *args = argv
    if command == "features":
        from tasks.data.datafolder import DataFolder
        from tasks.learning.features import extract_features, load_features

        data_dir, weights, size, out = args
        result = extract_features(data_dir, "mobilenet_v2", weights, int(size), batch_size=8)
        rows = DataFolder.at(data_dir).labelled_rows()
        np.save(out, load_features(result.cache_dir, rows["sha256"].tolist()))
        print(keras.config.backend(), Path(result.cache_dir).name)
    elif command == "predict":
        from tasks.learning.forward import compiled_forward, to_numpy
        from tasks.models.pyfunc import load_keras_model

        model_path, pixels, out = args
        model = load_keras_model(model_path)
        np.save(out, to_numpy(compiled_forward(model)(np.load(pixels))))
        print(keras.config.backend())
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
