"""What the prediction log costs a served request: latency with logging on, as a ratio of logging off, in one run.

    python benchmarks/prediction_log.py [--backbone resnet50] [--size 224] [--images 8] [--requests 30]

A served model of the README's main job's shape (a randomly initialised `--backbone` at `--size`,
the head's layers, a temperature: weights do not change the cost) is attached twice in this
process, once without a log and once logging to a scratch folder, on each engine (Keras, and
OpenVINO converted from it). A request is `--images` photo-like JPEGs (500x375, as the archive's,
benchmarks/photos.py) through `CatsDogsModel.predict`, everything a server's request does in the
model: decode, resize, the forward (with the head input as a second output when logging), and
handing the batch to the log's writer thread. Requests alternate off, on, off, on, so load from
elsewhere hits both alike; the median latency of each and their ratio are printed, the ratio
being the figure: the design allows on/off <= 1.05. The tiny test model (tests/fake_training.py)
is measured the same way: its forward costs nothing, so its ratio is the log's cost against
decoding alone, the worst case. A measurement: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def served_model(backbone: str, size: int):
    """Preprocess -> backbone -> head layers (head_normalize first), wrapped with a temperature."""
    import keras

    from tasks.learning.backbones import build_backbone, get_backbone
    from tasks.learning.head import head_layers
    from tasks.learning.layers import wrap
    from tasks.learning.preprocess import Preprocess

    inputs = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    net = build_backbone(backbone, None, size, "float32")
    x = net(Preprocess(get_backbone(backbone).preprocess_mode, name="preprocess")(inputs), training=False)
    dim = int(x.shape[-1])
    for layer in head_layers(256, 0.5, np.zeros(dim), np.ones(dim), seed=1):
        x = layer(x)
    return wrap(keras.Model(inputs, x, name=f"catsdogs_{backbone}"), tta=False, temperature=1.5)


def attached(model, size: int, engine: str, log_folder: Path | None):
    from tasks.models.prediction_log import LogSettings, ModelIdentity
    from tasks.models.pyfunc import CatsDogsModel

    return CatsDogsModel().attach(model, size, "auto", engine=engine,
                                  prediction_log=LogSettings(log_folder) if log_folder else None,
                                  projection={"seed": 28, "dims": 32}, identity=ModelIdentity("bench", "1", "run"))


def measure(name: str, model, size: int, request: pd.DataFrame, requests: int, scratch: Path) -> None:
    for engine in ("keras", "openvino"):
        off = attached(model, size, engine, None)
        on = attached(model, size, engine, scratch / f"{name}-{engine}")
        for served in (off, on):  # warm: the first calls compile
            served.predict(None, request)
            served.predict(None, request)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(requests):
            for label, served in (("off", off), ("on", on)):
                started = time.perf_counter()
                served.predict(None, request)
                times[label].append(time.perf_counter() - started)
        on.prediction_log.flush()
        rows = sum(1 for path in (scratch / f"{name}-{engine}").glob("*.jsonl") for _ in path.open())
        median = {label: statistics.median(values) for label, values in times.items()}
        print(f"{name:>22} {engine:>8}  off {median['off'] * 1000:8.1f} ms  on {median['on'] * 1000:8.1f} ms  "
              f"on/off {median['on'] / median['off']:.3f}  ({requests} requests each of {len(request)} images, "
              f"{rows} rows logged)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    from benchmarks.photos import write_photos
    from tasks.learning.layers import load_saved_model
    from tests.fake_training import tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="prediction-log-bench-"))
    photos = write_photos(Path(tempfile.gettempdir()) / "catsdogs-bench-photos", args.images)
    request = pd.DataFrame({"image": [path.read_bytes() for path in photos]})
    print(f"Latency of one request of {args.images} photo-like JPEGs (500x375) through CatsDogsModel.predict, "
          f"median of {args.requests}, off and on alternating:")
    measure(f"{args.backbone} {args.size} px", served_model(args.backbone, args.size), args.size, request,
            args.requests, scratch)
    measure("tiny test model 32 px", load_saved_model(tiny_model(scratch / "tiny.keras")), 32, request,
            args.requests, scratch)


if __name__ == "__main__":
    main()
