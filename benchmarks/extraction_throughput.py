"""Feature-extraction throughput, measured against its compute bound and a naive loop.

Run: python benchmarks/extraction_throughput.py [--images 384] [--input-size 160]

On a few hundred generated JPEGs (weights=None: timing does not depend on weight values)
it prints, per backbone and measured in the same run on the same images:
  - images/s of the extraction pipeline (tf.data read+decode+resize -> model -> shards),
  - its ratio to the bare forward pass on the same batches already in memory (target >= 0.9),
  - its ratio to a naive loop: Pillow open each file, numpy stack, model.predict per batch
    (target >= 2x on 2 CPU cores),
  - a second run with a warm cache as a fraction of the first (target <= 0.02),
  - peak RSS of a fresh process extracting two dataset sizes (must not grow with the data).
Figures are printed as ratios for people to read; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import resource
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

from tasks.learning.backbones import resolve_weights  # noqa: E402
from tasks.learning.features import (  # noqa: E402
    compiled_forward,
    extract_features,
    feature_model,
    image_dataset,
    labelled_images,
    write_feature_shards,
)
from tests.prepared import make_prepared_dir  # noqa: E402

MEMORY_CHILD = """
import sys
from tasks.learning.features import extract_features
result = extract_features(sys.argv[1], sys.argv[2], None, int(sys.argv[3]), batch_size=int(sys.argv[4]))
# VmHWM is this process's own peak; ru_maxrss would also count the parent's peak before exec
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(result["computed"], peak_kb)
"""


def make_dataset(root: Path, images: int, image_size: int) -> Path:
    """A prepared data folder with `images` JPEGs (all in train, half cats, half dogs)."""
    return make_prepared_dir(root, {"train": images // 2}, size=(image_size, image_size))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def naive_loop(model, paths: list[str], input_size: int, batch_size: int) -> None:
    """The loop people write first: Pillow decode on the main thread, then predict per batch."""
    for start in range(0, len(paths), batch_size):
        batch = np.stack([
            np.asarray(Image.open(p).convert("RGB").resize((input_size, input_size), Image.BILINEAR),
                       dtype=np.float32)
            for p in paths[start:start + batch_size]
        ])
        model.predict(batch, verbose=0)


def bench_backbone(data_dir: Path, backbone: str, input_size: int, batch_size: int, repeats: int) -> dict:
    rows = labelled_images(data_dir)
    paths, shas = rows["path"].tolist(), rows["sha256"].tolist()
    n = len(paths)

    weights = resolve_weights(data_dir, backbone, None)  # draw the kept random weights outside the timings
    cold_s, cold = timed(extract_features, data_dir, backbone, weights, input_size, batch_size)
    warm_s, warm = timed(extract_features, data_dir, backbone, weights, input_size, batch_size)
    assert cold["computed"] == n and warm["computed"] == 0, (cold, warm)

    model = feature_model(backbone, weights, input_size)
    forward = compiled_forward(model)
    batches = list(image_dataset(paths, input_size, batch_size))  # decoded once, kept in memory
    forward(batches[0])
    forward(batches[-1])
    model.predict(batches[0].numpy(), verbose=0)  # warm Keras' predict function for the naive loop

    scratch = Path(tempfile.mkdtemp(dir=data_dir))
    pipeline, bare, naive = [], [], []
    for _ in range(repeats):  # interleaved, so load from other processes hits all three alike
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        pipeline.append(timed(write_feature_shards, forward, paths, shas, scratch, input_size,
                              batch_size, 512)[0])
        bare.append(timed(lambda: [np.asarray(forward(b)) for b in batches])[0])
        naive.append(timed(naive_loop, model, paths, input_size, batch_size)[0])
    shutil.rmtree(scratch, ignore_errors=True)
    # Ratios are paired per repeat (measured back to back) and the median taken: on a shared
    # machine the load of other processes drifts, and pairing cancels most of that drift.
    pipeline_t, bare_t, naive_t = (np.asarray(times) for times in (pipeline, bare, naive))
    return {
        "images": n,
        "pipeline_ips": n / float(np.median(pipeline_t)),
        "bare_ips": n / float(np.median(bare_t)),
        "naive_ips": n / float(np.median(naive_t)),
        "vs_bare": float(np.median(bare_t / pipeline_t)),
        "vs_naive": float(np.median(naive_t / pipeline_t)),
        "naive_ceiling": float(np.median(naive_t / bare_t)),  # the most any input pipeline could gain
        "cold_s": cold_s,
        "cold_ips": n / cold_s,
        "warm_s": warm_s,
        "warm_fraction": warm_s / cold_s,
    }


def peak_rss_mb(data_dir: Path, backbone: str, input_size: int, batch_size: int) -> tuple[int, float]:
    """(images computed, peak RSS in MiB) of a fresh process that extracts `data_dir` cold (Linux)."""
    shutil.rmtree(data_dir / "features", ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(data_dir), backbone, str(input_size),
                          str(batch_size)], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    computed, peak_kb = out.stdout.split()[-2:]
    return int(computed), int(peak_kb) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--input-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-backbone", default="mobilenet_v2")
    parser.add_argument("--memory-sizes", default="96,768", help="two dataset sizes for peak RSS")
    args = parser.parse_args(argv)

    import tensorflow as tf

    root = Path(tempfile.mkdtemp(prefix="extraction-bench-"))
    try:
        data_dir = make_dataset(root / "main", args.images, args.image_size)
        print(f"{args.images} JPEGs {args.image_size}x{args.image_size} -> input {args.input_size}, "
              f"batch {args.batch_size}, cpus {os.cpu_count()}, tf {tf.__version__}, "
              f"median of {args.repeats} interleaved repeats, load average {os.getloadavg()[0]:.1f}")
        header = (f"{'backbone':<14}{'pipeline img/s':>15}{'bare img/s':>11}{'naive img/s':>12}"
                  f"{'vs bare':>9}{'vs naive':>9}{'(ceiling)':>10}{'cold img/s':>11}{'warm/cold':>10}")
        print(header)
        for backbone in args.backbones.split(","):
            r = bench_backbone(data_dir, backbone, args.input_size, args.batch_size, args.repeats)
            print(f"{backbone:<14}{r['pipeline_ips']:>15.1f}{r['bare_ips']:>11.1f}{r['naive_ips']:>12.1f}"
                  f"{r['vs_bare']:>9.2f}{r['vs_naive']:>9.2f}{r['naive_ceiling']:>10.2f}"
                  f"{r['cold_ips']:>11.1f}{r['warm_fraction']:>10.4f}"
                  f"   (cold {r['cold_s']:.2f}s incl. model build, warm {r['warm_s'] * 1000:.0f} ms)")
        print("targets: vs bare >= 0.9, vs naive >= 2, warm/cold <= 0.02; (ceiling) = naive time / bare "
              "forward time, the largest gain over the naive loop that any input pipeline could give")

        sizes = [int(s) for s in args.memory_sizes.split(",")]
        peaks = []
        for size in sizes:
            mem_dir = make_dataset(root / f"mem{size}", size, args.image_size)
            computed, peak = peak_rss_mb(mem_dir, args.memory_backbone, args.input_size, args.batch_size)
            peaks.append(peak)
            print(f"peak RSS {args.memory_backbone} extracting {computed:>5} images: {peak:8.1f} MiB")
        print(f"peak RSS ratio {sizes[-1]}/{sizes[0]} images: {peaks[-1] / peaks[0]:.3f} "
              f"(dataset {sizes[-1] / sizes[0]:.0f}x larger; flat means ~1.0)")
        print(f"this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
