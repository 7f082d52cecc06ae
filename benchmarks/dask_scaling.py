"""Feature extraction on 1 and 2 Dask workers of this machine, as a ratio, and what 2.5M images cost on N GPUs.

Run: python benchmarks/dask_scaling.py [--images 192] [--backbone resnet50] [--shard-size 24]

The same photo-like 500x375 JPEGs (quality 85, benchmarks/photos.py) are extracted, cold
cache each time, at the backbone's native size, weights=None (timing does not depend on
weight values), float32, through the project's own pieces: `plan_extraction` cuts the shards,
`flows.runners.cluster_spec` builds the local cluster exactly as `--workers N` does (one
single-threaded Nanny worker per core share, its thread pools sized so workers do not fight,
not pinned to cores), and each shard is `tasks.learning.features.extract_shard` (lease,
decode, forward, atomic write). Shards go to the workers through a Dask client directly, so the
figures leave out Prefect's per-task bookkeeping (tens of ms per shard, next to seconds of work).

Configurations, all on the same cores (the machine's, 2 here):
  in-process   extract_features in this process, decoder and model on every core (the default);
  1 x all      one Dask worker given every core;
  N x 1        N Dask workers, one core each.
Workers are warmed up first (model built, decoder started, one batch run), so the timed part
is steady-state throughput, and the cluster's start-up is printed apart. It prints img/s and
the ratio of each configuration to "1 x all" measured in the same run, then the cost model
for 2.5 million images (benchmarks/scaling.md explains it). Nothing passes or fails.
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

from benchmarks.photos import prepared_folder, write_photos  # noqa: E402

# One H200 box, 16 cores, 224 px, 500x375 JPEGs: the figures measured there (DESIGN.md).
H200_MODEL_IPS = 27_000        # Keras/JAX ResNet50 bf16 forward, model only
HOST_DECODE_IPS = {"Pillow (processes)": 5_000, "OpenCV (reduced decode)": 11_500}  # JPEG decode+resize, 16 cores
HOST_CORES = 16
IMAGES = 2_500_000
JPEG_KB = 40                   # a 500x375 quality-85 photo; the Kaggle originals average ~22 KB
RESNET50_DIM = 2048


def extract_on(compute, plan, warm_plan) -> tuple[float, float, set[str]]:
    """(start-up s, timed s, workers used): warm every worker on `warm_plan`, then time `plan`'s shards."""
    from distributed import Client, SpecCluster

    from flows.runners import cluster_spec, decode_workers
    from tasks.learning.features import extract_shard

    workers = decode_workers(compute)
    started = time.perf_counter()
    with SpecCluster(**cluster_spec(compute)) as cluster, Client(cluster) as client:
        names = list(client.scheduler_info()["workers"])
        warm = [client.submit(extract_shard, warm_plan, index, 16, decode_workers=workers, workers=[name],
                              pure=False) for index, name in enumerate(names)]
        client.gather(warm)
        startup = time.perf_counter() - started
        begin = time.perf_counter()
        futures = [client.submit(extract_shard, plan, index, 16, decode_workers=workers, pure=False)
                   for index in range(len(plan.shards))]
        results = client.gather(futures)
        return startup, time.perf_counter() - begin, {result.worker for result in results}


def cost_model(cpu_rates: dict[str, float]) -> list[str]:
    """2.5M images on N GPU workers, each with 16/N .. 16 cores of decode, from the H200 figures."""
    lines = [f"\nCost model: {IMAGES:,} images, ResNet50 at 224 px, one GPU per Dask worker "
             f"(H200: {H200_MODEL_IPS:,} img/s model-only; decode+resize on {HOST_CORES} cores: "
             + ", ".join(f"{name} {ips:,}" for name, ips in HOST_DECODE_IPS.items()) + " img/s)"]
    lines.append(f"{'decoder':<24}{'cores/GPU':>10}{'img/s/GPU':>11}{'bound':>7}"
                 + "".join(f"{f'N={n}':>10}" for n in (1, 2, 4, 8, 16)))
    for name, host_ips in HOST_DECODE_IPS.items():
        per_core = host_ips / HOST_CORES
        for cores in (16, 32, 64):
            per_gpu = min(H200_MODEL_IPS, per_core * cores)
            bound = "model" if per_gpu >= H200_MODEL_IPS else "decode"
            cells = "".join(f"{IMAGES / (per_gpu * n) / 60:>9.1f}m" for n in (1, 2, 4, 8, 16))
            lines.append(f"{name:<24}{cores:>10}{per_gpu:>11,.0f}{bound:>7}{cells}")
    cores_to_feed = {name: H200_MODEL_IPS / (ips / HOST_CORES) for name, ips in HOST_DECODE_IPS.items()}
    lines.append("cores one H200 needs to be model-bound: "
                 + ", ".join(f"{name} {cores:.0f}" for name, cores in cores_to_feed.items()))
    read_gb, write_gb = IMAGES * JPEG_KB / 1e6, IMAGES * RESNET50_DIM * 4 / 1e9
    lines.append(f"shared storage: {read_gb:.0f} GB of JPEGs read and {write_gb:.1f} GB of float32 features "
                 f"written in all; at 5,000 img/s per worker that is {5_000 * JPEG_KB / 1e3:.0f} MB/s read "
                 "per worker, so the filesystem must serve N times that")
    for name, ips in cpu_rates.items():
        lines.append(f"for scale, this machine ({name}): {IMAGES / ips / 3600:,.0f} h for {IMAGES:,} images")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--shard-size", type=int, default=24)
    parser.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "catsdogs-bench-photos")
    args = parser.parse_args(argv)

    import keras

    from flows.config import ComputeConfig
    from flows.runners import usable_cpus
    from tasks.data.datafolder import DataFolder
    from tasks.learning.backbones import build_backbone, resolve_input_size
    from tasks.learning.extractor import close_decoders
    from tasks.learning.features import extract_features, plan_extraction

    cores = len(usable_cpus())
    photos = write_photos(args.photos, args.images + 16)
    size = resolve_input_size(args.backbone, None)
    print(f"{args.images} photo-like JPEGs 500x375 q85, {args.backbone} at {size} px float32, shards of "
          f"{args.shard_size}, batch 16, Keras {keras.__version__} on {keras.config.backend()}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    root = Path(tempfile.mkdtemp(prefix="dask-scaling-"))
    try:
        weights = root / f"{args.backbone}.weights.h5"
        build_backbone(args.backbone, None, size).save_weights(str(weights))
        configs = [("in-process", None), (f"1 x {cores}", ComputeConfig(workers=1, threads_per_worker=cores))]
        configs += [(f"{n} x {cores // n}", ComputeConfig(workers=n, threads_per_worker=cores // n))
                    for n in range(2, cores + 1) if cores % n == 0]
        rows = []
        for label, compute in configs:
            folder = DataFolder.at(prepared_folder(root / label.replace(" ", ""), photos[:args.images]))
            if compute is None:
                extract_features(folder, args.backbone, str(weights), size, 16, 16)  # warm: build, compile, decode
                folder = DataFolder.at(prepared_folder(root / "in-process-timed", photos[:args.images]))
                begin = time.perf_counter()
                extract_features(folder, args.backbone, str(weights), size, 16, args.shard_size)
                rows.append((label, 0.0, time.perf_counter() - begin, {"this process"}))
                close_decoders()
                continue
            warm = DataFolder.at(prepared_folder(root / f"warm-{label.replace(' ', '')}", photos[args.images:]))
            warm_plan = plan_extraction(warm, args.backbone, str(weights), size, shard_size=8)
            plan = plan_extraction(folder, args.backbone, str(weights), size, shard_size=args.shard_size)
            rows.append((label, *extract_on(compute, plan, warm_plan)))
        base = next(seconds for label, _, seconds, _ in rows if label.startswith("1 x"))
        print(f"\n{'configuration':<14}{'start-up s':>11}{'img/s':>8}{'vs 1 x all':>11}  workers that computed shards")
        for label, startup, seconds, workers in rows:
            print(f"{label:<14}{startup:>11.1f}{args.images / seconds:>8.2f}{base / seconds:>11.2f}  "
                  f"{', '.join(sorted(workers))}")
        rates = {label: args.images / seconds for label, _, seconds, _ in rows}
        for line in cost_model({label: rates[label] for label in rates if not label.startswith("in")}):
            print(line)
    finally:
        close_decoders()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
