"""Feature-extraction throughput on this machine, as ratios measured in the same run.

Run: python benchmarks/extraction_throughput.py [--images 256] [--backbones resnet50,mobilenet_v2]
         [--computes keras:float32,keras:bfloat16,openvino:float32,openvino:bfloat16,openvino:int8]
     KERAS_BACKEND=jax python benchmarks/extraction_throughput.py      # the same on Keras' JAX backend

On photo-like 500x375 JPEGs (quality 85), weights=None (timing does not depend on weight values):
  - decode img/s per core, OpenCV and Pillow (benchmarks/decode_throughput.py: one thread, bytes in
    memory, 500x375 -> 224, interleaved rounds; target OpenCV / Pillow >= 2.5), once in a process
    without TensorFlow or JAX (as the decode worker processes of a many-core host run) and once in
    this one (as the thread workers of a small host run; Pillow is faster here, OpenCV is not),
  - what `--engine auto` and `--precision auto` (on each engine) measure on this host for each backbone,
and at the backbone's native size, for each backbone and engine/precision (Keras or OpenVINO; float32,
bfloat16, int8 on OpenVINO), with the --decoder (OpenCV by default), all interleaved round by round
and given as medians of per-round ratios to the first (Keras float32):
  - bare:   the compiled forward pass on uint8 batches already decoded in memory (the compute bound),
  - e2e:    the project's own extraction (plan -> decode in parallel -> model -> shards on disk),
  - bare / base bare and e2e / base e2e (the engines' gain, decode included),
  - e2e / bare of the same compute (target >= 0.9), and e2e / the base's bare forward,
  - the relative L2 difference of its features from the base's,
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
from tasks.learning.engines import resolve_engine  # noqa: E402
from tasks.learning.precision import resolve_precision  # noqa: E402
from tasks.learning.quantize import float32_ir_dir  # noqa: E402
from tasks.learning.shards import engine_dir, feature_cache_dir, load_features  # noqa: E402


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


def bench(root: Path, photos: list[Path], backbone: str, computes: list[tuple[str, str]], weights: Path,
          batch_size: int, repeats: int, naive: bool, decoder: str) -> dict[tuple[str, str], dict]:
    """Bare and e2e seconds of every (engine, precision), interleaved round by round; ratios are per round.

    One round times each compute's bare forward and a cold e2e extraction into a fresh folder,
    in turn, so load from other processes hits all of them alike; ratios to Keras float32 are
    taken within a round and their median reported.
    """
    size = resolve_input_size(backbone, None)
    with Decoder(size, batch_size, decoder=decoder) as batch_decoder:
        batches = [batch.pixels.copy() for batch in batch_decoder.batches(photos)]
    forwards, models, irs = {}, {}, {}
    for engine, precision in computes:  # a first folder makes each engine's IR (int8: calibrated on its images)
        first = prepared_folder(root / f"{backbone}-{engine}-{precision}-first", photos)
        cache_dir = Path(extract_features(first, backbone, str(weights), size, batch_size, precision=precision,
                                          decoder=decoder, engine=engine).cache_dir)
        irs[engine, precision] = engine_dir(cache_dir)
        models[engine, precision], forwards[engine, precision] = cached_extractor(
            backbone, str(weights), size, precision, weights_fingerprint(weights), engine, str(irs[engine, precision]))
        for batch in (batches[0], batches[-1]):
            to_numpy(forwards[engine, precision](batch))  # compile every batch shape before timing
    n = len(photos)
    times: dict[tuple[str, str], dict[str, list[float]]] = {c: {"bare": [], "e2e": [], "warm": []} for c in computes}
    naive_t = []
    for repeat in range(repeats):
        for compute in computes:
            engine, precision = compute
            times[compute]["bare"].append(timed(lambda: [to_numpy(forwards[compute](b)) for b in batches])[0])
            folder = prepared_folder(root / f"{backbone}-{engine}-{precision}-{repeat}", photos)
            if irs[compute].is_dir():  # the IR is made once per data folder: the e2e rate is of extraction alone
                shutil.copytree(irs[compute], engine_dir(feature_cache_dir(DataFolder.at(folder), backbone,
                                                                           str(weights), size, precision, decoder,
                                                                           engine)))
            seconds, result = timed(extract_features, folder, backbone, str(weights), size, batch_size,
                                    precision=precision, decoder=decoder, engine=engine)
            assert result.computed == n and result.decoder == decoder and result.engine == engine, result
            times[compute]["e2e"].append(seconds)
            times[compute]["warm"].append(timed(extract_features, folder, backbone, str(weights), size, batch_size,
                                                precision=precision, decoder=decoder, engine=engine)[0])
            times[compute]["cache_dir"] = result.cache_dir
            times[compute]["folder"] = folder
        if naive:
            model = models.get(("keras", "float32"))
            if model is not None:
                naive_t.append(timed(naive_loop, model, [str(p) for p in photos], size, batch_size)[0])
    base = computes[0]
    results = {}
    for compute in computes:
        bare, e2e = np.asarray(times[compute]["bare"]), np.asarray(times[compute]["e2e"])
        rows = DataFolder.at(times[compute]["folder"]).labelled_rows()["sha256"].tolist()
        results[compute] = {
            "bare_ips": n / float(np.median(bare)), "e2e_ips": n / float(np.median(e2e)),
            "e2e_vs_bare": float(np.median(bare / e2e)),
            "bare_ratio": float(np.median(np.asarray(times[base]["bare"]) / bare)),
            "e2e_ratio": float(np.median(np.asarray(times[base]["e2e"]) / e2e)),
            "e2e_vs_base_bare": float(np.median(np.asarray(times[base]["bare"]) / e2e)),
            "warm_fraction": float(np.median(np.asarray(times[compute]["warm"]) / e2e)),
            "naive_ips": n / float(np.median(naive_t)) if naive_t and compute == base else None,
            "features": load_features(times[compute]["cache_dir"], rows)}
    return results


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbones", default="resnet50")
    parser.add_argument("--computes", default="keras:float32,keras:bfloat16,openvino:float32,openvino:bfloat16,"
                                                 "openvino:int8",
                        help="engine:precision pairs to compare; the first is the base of the ratios")
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
    computes = [tuple(item.split(":")) for item in args.computes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="extraction-bench-"))
    try:
        for backbone in args.backbones.split(","):
            size = resolve_input_size(backbone, None)
            weights = root / f"{backbone}.weights.h5"
            build_backbone(backbone, None, size).save_weights(str(weights))
            auto_folder = DataFolder.at(root / "auto")
            ir_dir = str(float32_ir_dir(auto_folder, backbone, str(weights), size, args.decoder))
            engine, engine_why = resolve_engine(auto_folder, backbone, str(weights), size, "auto", ir_dir)
            print(f"\n--engine auto for {backbone} at {size} px: {engine} ({engine_why}; load average {_load()})")
            for on in ("keras", "openvino"):
                auto, why = resolve_precision(auto_folder, backbone, str(weights), size, "auto", on, ir_dir)
                print(f"--precision auto on {on}: {auto} ({why})")
            results = bench(root, photos[:args.images], backbone, computes, weights, args.batch_size,
                            args.repeats, not args.no_naive, args.decoder)
            base = "/".join(computes[0])
            print(f"\n{backbone} at {size} px, {args.decoder} decoder, ratios to {base} as medians of per-round "
                  f"ratios (load average {_load()})")
            print(f"{'engine/precision':<18}{'bare img/s':>11}{'e2e img/s':>10}{'bare/base':>10}{'e2e/base e2e':>13}"
                  f"{'e2e/bare':>9}{'e2e/base bare':>14}{'warm/cold':>10}{'naive img/s':>12}{'e2e/naive':>10}"
                  f"{'features rel L2':>16}")
            reference = results[computes[0]]["features"]
            for compute, r in results.items():
                naive = f"{r['naive_ips']:>12.1f}{r['e2e_ips'] / r['naive_ips']:>10.2f}" if r["naive_ips"] else \
                    f"{'':>22}"
                gap = np.linalg.norm(r["features"] - reference) / max(np.linalg.norm(reference), 1e-12)
                print(f"{'/'.join(compute):<18}{r['bare_ips']:>11.1f}{r['e2e_ips']:>10.1f}{r['bare_ratio']:>10.2f}"
                      f"{r['e2e_ratio']:>13.2f}{r['e2e_vs_bare']:>9.2f}{r['e2e_vs_base_bare']:>14.2f}"
                      f"{r['warm_fraction']:>10.4f}{naive}{gap:>16.4f}")
        print("\ntargets: e2e/bare >= 0.9 for each; OpenVINO float32 e2e >= 1.3x Keras float32 e2e for ResNet50 "
              "and >= 2.5x for MobileNetV2; OpenVINO int8 e2e >= 3.5x for ResNet50 (its accuracy: "
              "benchmarks/int8_accuracy.py)")
    finally:
        close_decoders()
        shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__":
    main()
