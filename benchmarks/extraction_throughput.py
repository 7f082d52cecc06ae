"""Feature-extraction throughput on this machine, as ratios measured in the same run.

Run: python benchmarks/extraction_throughput.py [--images 256] [--backbones resnet50] [--precisions float32,bfloat16]
     KERAS_BACKEND=jax python benchmarks/extraction_throughput.py      # the same on Keras' JAX backend

On photo-like 500x375 JPEGs (quality 85), weights=None (timing does not depend on weight values):
  - decode img/s per core, OpenCV and Pillow (benchmarks/decode_throughput.py: one thread, bytes in
    memory, 500x375 -> 224, interleaved rounds; target OpenCV / Pillow >= 2.5), once in a process
    without TensorFlow or JAX (as the decode worker processes of a many-core host run) and once in
    this one (as the thread workers of a small host run; Pillow is faster here, OpenCV is not),
  - what `--precision auto` measures on this host for each backbone (bfloat16 / float32) and picks,
and at the backbone's native size, for each backbone and precision, with the --decoder (OpenCV by default):
  - bare:   the compiled forward pass on uint8 batches already decoded in memory (the compute bound),
  - e2e:    the project's own extraction (plan -> decode in parallel -> model -> shards on disk),
  - e2e / bare at the same precision (target >= 0.9),
  - e2e / today's float32 bare forward (target >= 1.5 for ResNet50, reachable only if bf16 pays),
  - bf16 bare / fp32 bare, and the largest relative difference of bf16 features from fp32,
  - a naive loop (Pillow on the main thread, model.predict per batch) and e2e / naive,
  - a warm second run as a fraction of the cold one.
Nothing here passes or fails; it is for people to read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.decode_throughput import decode_per_core, summary  # noqa: E402
from benchmarks.photos import prepared_folder, write_photos  # noqa: E402
from tasks.data.datafolder import DataFolder  # noqa: E402
from tasks.learning.backbones import build_backbone, resolve_input_size  # noqa: E402
from tasks.learning.extractor import cached_extractor, close_decoders  # noqa: E402
from tasks.learning.features import extract_features  # noqa: E402
from tasks.learning.backbones import weights_fingerprint  # noqa: E402
from tasks.learning.forward import to_numpy  # noqa: E402
from tasks.learning.pixels import Decoder  # noqa: E402
from tasks.learning.precision import resolve_precision  # noqa: E402
from tasks.learning.shards import load_features  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def naive_loop(model, paths: list[str], size: int, batch_size: int) -> None:
    """The loop people write first: Pillow decode on the main thread, then predict per batch."""
    for start in range(0, len(paths), batch_size):
        batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR))
                          for p in paths[start:start + batch_size]])
        model.predict(batch, verbose=0)


def bench(root: Path, photos: list[Path], backbone: str, precision: str, weights: Path, batch_size: int,
          repeats: int, naive: bool, decoder: str) -> dict:
    size = resolve_input_size(backbone, None)
    model, forward = cached_extractor(backbone, str(weights), size, precision, weights_fingerprint(weights))
    with Decoder(size, batch_size, decoder=decoder) as batch_decoder:
        batches = [batch.pixels.copy() for batch in batch_decoder.batches(photos)]
    for batch in (batches[0], batches[-1]):
        to_numpy(forward(batch))  # compile every batch shape before timing
    n = len(photos)
    bare, e2e, naive_t, warm = [], [], [], []
    for repeat in range(repeats):  # interleaved, so load from other processes hits all alike
        bare.append(timed(lambda: [to_numpy(forward(batch)) for batch in batches])[0])
        folder = prepared_folder(root / f"{backbone}-{precision}-{repeat}", photos)
        seconds, result = timed(extract_features, folder, backbone,
                                str(weights), size, batch_size, precision=precision, decoder=decoder)
        assert result.computed == n and result.decoder == decoder, result
        e2e.append(seconds)
        warm.append(timed(extract_features, folder, backbone, str(weights), size, batch_size, precision=precision,
                          decoder=decoder)[0])
        if naive and precision == "float32":
            naive_t.append(timed(naive_loop, model, [str(p) for p in photos], size, batch_size)[0])
    features = load_features(result.cache_dir, DataFolder.at(folder).labelled_rows()["sha256"].tolist())
    bare_t, e2e_t = np.asarray(bare), np.asarray(e2e)
    return {"bare_ips": n / float(np.median(bare_t)), "e2e_ips": n / float(np.median(e2e_t)),
            "e2e_vs_bare": float(np.median(bare_t / e2e_t)),
            "naive_ips": n / float(np.median(naive_t)) if naive_t else None,
            "warm_fraction": float(np.median(np.asarray(warm) / e2e_t)), "features": features}


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbones", default="resnet50")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder", default="opencv", choices=["opencv", "pillow"], help="decoder of the e2e runs")
    parser.add_argument("--decode-images", type=int, default=128, help="photos in each per-core decode round")
    parser.add_argument("--decode-repeats", type=int, default=7)
    parser.add_argument("--decode-only", action="store_true", help="only the per-core decode comparison")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    parser.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "catsdogs-bench-photos")
    args = parser.parse_args(argv)

    import keras

    from tasks.common.devices import configure_devices

    photos = write_photos(args.photos, max(args.images, args.decode_images))
    setup = configure_devices("float32")
    print(f"{args.images} photo-like JPEGs 500x375 q85, batch {args.batch_size}, Keras {keras.__version__} on "
          f"{setup.backend}, {setup.device_name}, {os.cpu_count()} cpus, e2e decoder {args.decoder}, median of "
          f"{args.repeats} interleaved repeats, load average {_load()}")

    clean = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_throughput.py"), "--images",
                            str(args.decode_images), "--repeats", str(args.decode_repeats), "--photos", str(args.photos)],
                           check=True, capture_output=True, text=True).stdout
    print("\n" + clean.rstrip())
    print(f"the same inside this process, with Keras on {setup.backend} loaded (thread workers on a small host):")
    print("  " + summary(decode_per_core(photos[:args.decode_images], 224, args.decode_repeats)))
    if args.decode_only:
        return
    root = Path(tempfile.mkdtemp(prefix="extraction-bench-"))
    try:
        for backbone in args.backbones.split(","):
            size = resolve_input_size(backbone, None)
            weights = root / f"{backbone}.weights.h5"
            build_backbone(backbone, None, size).save_weights(str(weights))
            auto, why = resolve_precision(DataFolder.at(root / "auto"), backbone, str(weights), size, "auto")
            print(f"\n--precision auto for {backbone} at {size} px: {auto} ({why}; load average {_load()})")
            results = {precision: bench(root, photos[:args.images], backbone, precision, weights, args.batch_size,
                                        args.repeats, not args.no_naive, args.decoder)
                       for precision in args.precisions.split(",")}
            today = results.get("float32", next(iter(results.values())))["bare_ips"]
            print(f"\n{backbone} at {size} px, {args.decoder} decoder (load average {_load()})")
            print(f"{'precision':<10}{'bare img/s':>11}{'e2e img/s':>10}{'e2e/bare':>9}{'e2e/fp32 bare':>14}"
                  f"{'bare/fp32 bare':>15}{'warm/cold':>10}{'naive img/s':>12}{'e2e/naive':>10}")
            for precision, r in results.items():
                naive = f"{r['naive_ips']:>12.1f}{r['e2e_ips'] / r['naive_ips']:>10.2f}" if r["naive_ips"] else ""
                print(f"{precision:<10}{r['bare_ips']:>11.1f}{r['e2e_ips']:>10.1f}{r['e2e_vs_bare']:>9.2f}"
                      f"{r['e2e_ips'] / today:>14.2f}{r['bare_ips'] / today:>15.2f}{r['warm_fraction']:>10.4f}{naive}")
            if {"float32", "bfloat16"} <= set(results):
                full, half = results["float32"]["features"], results["bfloat16"]["features"]
                print(f"bf16 vs fp32 features: max |diff| / max |f| = {np.abs(full - half).max() / np.abs(full).max():.4f}, "
                      f"relative L2 {np.linalg.norm(full - half) / np.linalg.norm(full):.4f}")
        print("\ntargets: e2e/bare >= 0.9 at each precision; ResNet50 e2e >= 1.5x today's float32 bare forward")
    finally:
        close_decoders()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
