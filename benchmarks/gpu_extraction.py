"""Extraction and fine-tuning throughput on a GPU host, through the project's own code, as ratios.

Made for a host with Keras 3 on JAX (or PyTorch) and no TensorFlow, Prefect, MLflow or Great
Expectations: it imports only the compute modules. On a lent H200 box (see README "GPU hosts"):

    bash benchmarks/gpu_wheels.sh              # here, once: the few wheels the GPU image lacks (.whl/)
    # there, with .whl carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    KERAS_BACKEND=jax python3 benchmarks/gpu_extraction.py --images 4096

Per backbone it prints, measured in the same run on the same photo-like 500x375 JPEGs at 224 px,
with the --decoder (OpenCV by default; `--decoder pillow` for the old figure):
  decode-only img/s   the one input pipeline on all cores, no model;
  model-only img/s    the compiled forward on a uint8 batch already on the device;
  end-to-end img/s    tasks.learning.features.extract_features (plan, decode, forward, shards on disk);
  e2e / min(decode, model), the share of the attainable bound the pipeline reaches;
and for the first backbone the fine-tuning throughput of the top block from JPEG files on disk
(augmentation on). Targets on one H200 (16 cores): ResNet50 e2e >= 8,000 img/s and >= 0.8 of
the bound; VGG16 >= 6,000; fine-tuning >= 5,000 img/s. It also runs on a CPU (small --images)
as a smoke test. Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.photos import photo, prepared_folder  # noqa: E402


def _write(args: tuple[str, int]) -> str:
    path, seed = args
    if not os.path.exists(path):
        photo(seed).save(path, quality=85)
    return path


def make_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{index:05d}.jpg"), index) for index in range(count)]
    with ProcessPoolExecutor() as pool:
        return [Path(p) for p in pool.map(_write, jobs, chunksize=16)]


def block(outputs):
    """Wait until the device has finished (JAX and torch dispatch asynchronously)."""
    from tasks.learning.forward import to_numpy

    return to_numpy(outputs)


def decode_only(paths: list[Path], size: int, batch_size: int, workers: int, decoder_name: str) -> float:
    from tasks.learning.pixels import Decoder

    with Decoder(size, batch_size, decoder=decoder_name, workers=workers) as decoder:
        for _ in decoder.batches(paths[: batch_size * 4]):  # start the workers
            pass
        start = time.perf_counter()
        for _ in decoder.batches(paths):
            pass
        return len(paths) / (time.perf_counter() - start)


def model_only(forward, size: int, batch_size: int, steps: int) -> float:
    import keras

    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8)
    if keras.config.backend() == "jax":
        import jax

        batch = jax.device_put(batch)  # already on the device: the model alone
    block(forward(batch))
    start = time.perf_counter()
    outputs = [forward(batch) for _ in range(steps)]
    block(outputs[-1])
    return steps * batch_size / (time.perf_counter() - start)


def fine_tune_rate(folder, backbone: str, weights: str, size: int, cache_dir: str, batch_size: int,
                   precision: str, work: Path, decoder: str) -> float:
    import keras

    from tasks.learning.finetune import FineTuneParams, build_end_to_end, fine_tune_model
    from tasks.learning.head import HeadParams, train_head

    head = train_head(folder, Path(cache_dir), work, backbone, HeadParams(epochs=2, dense_units=64))
    model = build_end_to_end(backbone, weights, size, Path(head.head_path), precision=precision)
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    params = FineTuneParams(epochs=3, batch_size=batch_size, learning_rate=1e-5, patience=10)
    fine_tune_model(model, folder, backbone, size, params, float("inf"), callbacks=[EpochTimer()], decoder=decoder)
    train = len(folder.split_rows("train"))
    validation = len(folder.split_rows("validation"))
    return (train + validation) / min(times[1:] or times)  # later epochs: compiled, steady


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="photo-like JPEGs to generate and extract")
    parser.add_argument("--backbones", default="resnet50,vgg16")
    parser.add_argument("--precision", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the GPU probe (32 on CPU)")
    parser.add_argument("--decode-workers", type=int, default=None, help="default: every core")
    parser.add_argument("--decoder", default="opencv", choices=["auto", "opencv", "pillow"])
    parser.add_argument("--fine-tune-images", type=int, default=4096)
    parser.add_argument("--model-steps", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "catsdogs-gpu-bench")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    photos = make_photos(args.work / "photos", args.images)  # before JAX starts its threads (the pool forks)
    print(f"{len(photos)} photo-like JPEGs ready in {time.perf_counter() - started:.0f} s")

    import keras

    from tasks.common.devices import configure_devices, pick_batch_size
    from tasks.data.datafolder import DataFolder
    from tasks.learning.backbones import build_backbone, weights_fingerprint
    from tasks.learning.extractor import cached_extractor, close_decoders
    from tasks.learning.features import extract_features
    from tasks.learning.pixels import default_workers, resolve_decoder
    from tasks.learning.precision import resolve_precision

    setup = configure_devices(args.precision)
    workers = args.decode_workers or default_workers()
    decoder = resolve_decoder(args.decoder)
    print(f"Keras {keras.__version__} on {setup.backend}, {setup.device_name} ({setup.gpus} GPU), {workers} decode "
          f"workers, {decoder} decoder; TensorFlow loaded: {'tensorflow' in sys.modules}; load average "
          f"{'/'.join(f'{value:.1f}' for value in os.getloadavg())}")
    size = 224
    try:
        for number, backbone in enumerate(args.backbones.split(",")):
            weights = args.work / f"{backbone}.weights.h5"
            if not weights.exists():
                build_backbone(backbone, None, size).save_weights(str(weights))
            # the GPU rule, or on a CPU what auto measures here (cached under --work between runs)
            precision, why = resolve_precision(DataFolder(args.work / "verdicts"), backbone, str(weights), size,
                                               args.precision)
            print(f"{backbone:<10} precision {precision} ({why})")
            _, forward = cached_extractor(backbone, str(weights), size, precision, weights_fingerprint(weights))
            batch = args.batch_size or pick_batch_size(forward, size, on_gpu=setup.device == "GPU")
            decode = decode_only(photos, size, batch, workers, decoder)
            model = model_only(forward, size, batch, args.model_steps)
            shutil.rmtree(args.work / "data", ignore_errors=True)
            folder = DataFolder(prepared_folder(args.work / "data", photos))
            start = time.perf_counter()
            result = extract_features(folder, backbone, str(weights), size, batch, precision=precision,
                                      decoder=decoder, decode_workers=workers, shard_size=max(512, batch * 8))
            e2e = result.computed / (time.perf_counter() - start)
            bound = min(decode, model)
            print(f"{backbone:<10} batch {batch:>4}: decode-only {decode:>8.0f} img/s, model-only {model:>8.0f} img/s, "
                  f"end-to-end {e2e:>8.0f} img/s, e2e/min(decode, model) {e2e / bound:.2f}")
            if number == 0 and args.fine_tune_images:
                tune = prepared_folder(args.work / "tune", photos[: args.fine_tune_images], splits=("train", "validation"))
                tuned = extract_features(tune, backbone, str(weights), size, batch, precision=precision,
                                         decoder=decoder, decode_workers=workers)
                rate = fine_tune_rate(DataFolder(tune), backbone, str(weights), size, tuned.cache_dir,
                                      min(batch, 128), precision, args.work / "run", decoder)
                print(f"{backbone:<10} fine-tuning the top block from JPEG files (augmentation on): {rate:>8.0f} img/s")
    finally:
        close_decoders()
    print("targets on one H200: resnet50 e2e >= 8000 img/s and >= 0.8 of the bound; vgg16 >= 6000; "
          "fine-tuning >= 5000 img/s")


if __name__ == "__main__":
    main()
