"""What int8 costs a head, and what it gains: OpenVINO int8 vs float32 features of the same backbone, same images.

Run: python benchmarks/int8_accuracy.py [--backbone resnet50] [--datasets generated,digits] [--size 224]

For each data set, in memory (no data folder): the backbone's float32 IR (the project's own
conversion, tasks/learning/openvino_engine.py) and its int8 IR (NNCF, calibrated on at most
300 *train* images, as `--precision int8` does) compute features of the train and test images;
the same head recipe is trained on each and scored on the test images. Printed: test accuracy
on float32 and on int8 features (the difference in points), the features' relative L2
difference, and int8's throughput as a ratio to float32 on the same batches (interleaved).

Data sets, both offline:
  - generated: tests/imagegen.py's warm-striped cats and cool-checkered dogs (2 classes);
  - digits: scikit-learn's 8x8 handwritten digits (real data, 1,797 images, 10 classes),
    upscaled to the input size and made RGB.

Weights: ImageNet weights cannot be downloaded here, so the backbone is randomly initialised.
A random ResNet50's BatchNorm layers hold the initial statistics (mean 0, variance 1), so its
activations grow block after block and a few channels dominate: the int8 ranges NNCF
calibrates are then set by outliers that trained networks do not have. `--bn-from-data`
(default on) gives every BatchNorm layer its batch statistics on the calibration images first
(one training-mode pass with momentum 0), which is what a trained network's statistics are;
`--no-bn-from-data` shows the raw random network. Trained (ImageNet) weights are what decides
in practice; the run's own int8 check (validation metrics on int8 vs float32) is the measure there.
Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tasks.learning import openvino_engine  # noqa: E402
from tasks.learning.backbones import build_backbone  # noqa: E402
from tasks.learning.extractor import feature_model  # noqa: E402
from tasks.learning.forward import to_numpy  # noqa: E402
from tasks.learning.head import HeadParams, fit_head  # noqa: E402
from tasks.learning.quantize import CALIBRATION_IMAGES  # noqa: E402


def generated(size: int, train: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from tests.imagegen import class_pixels

    def draw(count: int, seed0: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % 2
        images = np.stack([class_pixels(("cat", "dog")[y], seed0 + i, size=(size, size)) for i, y in enumerate(labels)])
        return images, labels

    return (*draw(train, 0), *draw(test, 100_000))


def digits(size: int, train: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import cv2
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    grey = (data.images[order] * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.repeat(cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)[..., None], 3, -1)
                       for image in grey])
    labels = data.target[order]
    train = min(train, len(labels) - test)
    return images[:train], labels[:train], images[train:train + test], labels[train:train + test]


def bn_from_data(model, images: np.ndarray) -> None:
    """Every BatchNorm layer's moving statistics := its batch statistics on `images` (one pass, momentum 0)."""
    import keras

    layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.BatchNormalization)]
    momentum = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, value in zip(layers, momentum):
        layer.momentum = value


def features(forward, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([to_numpy(forward(images[start:start + batch])) for start in range(0, len(images), batch)])


def head_accuracy(train_x, train_y, test_x, test_y, classes: int, seed: int = 0) -> float:
    cut = int(len(train_y) * 0.85)
    params = HeadParams(dense_units=256, dropout=0.3, learning_rate=1e-3, epochs=60, batch_size=64, patience=8,
                        seed=seed)
    scale = np.abs(train_x).max() or 1.0  # the head's input normalisation copes; this keeps Adam's steps sane
    head, _ = fit_head(train_x[:cut] / scale, train_y[:cut], train_x[cut:] / scale, train_y[cut:], params,
                       n_classes=classes)
    scores = np.asarray(head.predict(test_x / scale, verbose=0))
    predicted = (scores.reshape(-1) >= 0.5).astype(int) if classes == 2 else scores.argmax(axis=1)
    return float((predicted == test_y).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--datasets", default="generated,digits")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--bn-from-data", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="int8-accuracy-"))
    try:
        _compare(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _compare(args: argparse.Namespace, root: Path) -> None:
    import keras

    print(f"{args.backbone} at {args.size} px, random weights, BatchNorm statistics "
          f"{'from the calibration images' if args.bn_from_data else 'as initialised'}, {os.cpu_count()} cpus, "
          f"load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{'data set':<10}{'classes':>8}{'train':>6}{'test':>6}{'fp32 acc':>9}{'int8 acc':>9}{'points':>8}"
          f"{'feat rel L2':>12}{'int8/fp32 img/s':>16}")
    for name in args.datasets.split(","):
        train_x, train_y, test_x, test_y = {"generated": generated, "digits": digits}[name](args.size, args.train,
                                                                                              args.test)
        classes = int(max(train_y.max(), test_y.max())) + 1
        calibration = train_x[:CALIBRATION_IMAGES]  # train images only, never test
        keras.utils.set_random_seed(0)
        weights = root / f"{name}.weights.h5"
        build_backbone(args.backbone, None, args.size).save_weights(str(weights))
        model = feature_model(args.backbone, str(weights), args.size)
        if args.bn_from_data:
            bn_from_data(model, calibration[:16])  # a training-mode pass keeps every activation: 16 at 224 px is ~2 GB
        ir = openvino_engine.export_ir(model, root / f"{name}-float32")
        int8_ir = openvino_engine.quantize_ir(ir, root / f"{name}-int8", list(calibration),
                                              [str(i) for i in range(len(calibration))])
        forwards = {"float32": openvino_engine.ir_forward(ir, "float32"),
                    "int8": openvino_engine.ir_forward(int8_ir, "int8")}
        seconds = {precision: [] for precision in forwards}
        batch = test_x[:64]
        for forward in forwards.values():
            to_numpy(forward(batch))
        for _ in range(args.rounds):
            for precision, forward in forwards.items():
                start = time.perf_counter()
                features(forward, batch)
                seconds[precision].append(time.perf_counter() - start)
        speed = float(np.median(np.asarray(seconds["float32"]) / np.asarray(seconds["int8"])))
        accuracy, computed = {}, {}
        for precision, forward in forwards.items():
            computed[precision] = (features(forward, train_x), features(forward, test_x))
            accuracy[precision] = head_accuracy(*computed[precision][:1], train_y, computed[precision][1], test_y,
                                                classes)
        full, quantized = np.concatenate(computed["float32"]), np.concatenate(computed["int8"])
        gap = np.linalg.norm(quantized - full) / max(np.linalg.norm(full), 1e-12)
        print(f"{name:<10}{classes:>8}{len(train_y):>6}{len(test_y):>6}{accuracy['float32']:>9.3f}"
              f"{accuracy['int8']:>9.3f}{100 * (accuracy['int8'] - accuracy['float32']):>+8.1f}{gap:>12.4f}"
              f"{speed:>16.2f}")


if __name__ == "__main__":
    main()
