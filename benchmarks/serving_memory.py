"""Peak memory of `mlflow models serve` under a bounded concurrent load of large-image requests.

    python benchmarks/serving_memory.py [--code-root PATH] [--side 12000] [--images 3]
                                        [--clients 4] [--requests 2]

Logs the tiny end-to-end test model (tests/fake_training.py) with the serving code of
`--code-root` (this checkout by default; pass an old checkout, e.g. `git archive 1f90b46 | tar
-x -C /tmp/old`, to measure the code before the limits), serves it with `mlflow models serve
--env-manager local`, and sends `clients` concurrent clients x `requests` requests, each holding
`images` flat-colour JPEGs of `side` x `side` pixels (a 12000 x 12000 one is about 2 MB on the
wire and 432 MB once decoded). The server's process tree is sampled every 20 ms with psutil; the
printout is its resident memory at rest, at its peak, and the peak over rest, with what the
requests got back. A measurement, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from tests.servers import BIN_DIR, base_env, cli, free_port, running, start_process, wait_for_http  # noqa: E402

_LOG_MODEL = textwrap.dedent("""
    import sys
    from pathlib import Path
    import mlflow
    from tests.fake_training import tiny_model
    mlflow.set_tracking_uri(sys.argv[1])
    path = tiny_model(Path(sys.argv[2]) / "model.keras")
    with mlflow.start_run():
        try:                                   # the layout since the three wings
            from tasks.models.tracking import log_pyfunc_model
            info = log_pyfunc_model(path, 32)
        except ImportError:                    # the flat layout before them
            from tasks.tracking import log_pyfunc_model
            info = log_pyfunc_model({"model_path": str(path), "input_size": 32})
    print(info.model_uri)
""")


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def flat_jpeg(side: int, colour: tuple[int, int, int] = (90, 60, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def log_model(code_root: Path, work: Path) -> tuple[str, str]:
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _LOG_MODEL, uri, str(work)], cwd=code_root,
                          env=base_env(PYTHONPATH=str(code_root), MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"logging the model with {code_root} failed:\n{done.stderr[-3000:]}")
    return uri, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-root", type=Path, default=REPO, help="checkout whose serving code is measured")
    parser.add_argument("--side", type=int, default=12_000, help="pixels per side of each image")
    parser.add_argument("--images", type=int, default=3, help="images per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    args = parser.parse_args()

    code_root = args.code_root.resolve()
    work = Path(tempfile.mkdtemp(prefix="serving-memory-"))
    commit = subprocess.run(["git", "-C", str(code_root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "not a git checkout"
    uri, model_uri = log_model(code_root, work)
    image = base64.b64encode(flat_jpeg(args.side)).decode("ascii")
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]] * args.images}}).encode()

    port = free_port()
    env = base_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(code_root),
                   PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    serve = [cli("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port),
             "-h", "127.0.0.1"]
    with running(start_process("mlflow models serve", serve, env=env, log_path=work / "serve.log",
                               cwd=work)) as server:
        url = f"http://127.0.0.1:{port}/invocations"
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=300, process=server)
        small = json.dumps({"dataframe_split": {"columns": ["image"],
                                                "data": [[base64.b64encode(flat_jpeg(64)).decode()]]}})
        httpx.post(url, content=small, headers={"content-type": "application/json"}, timeout=300)  # warm up
        time.sleep(1.0)
        rest = tree_rss(server.pid)
        peak, stop = [rest], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(server.pid))
                time.sleep(0.02)

        def client(_: int) -> list[str]:
            outcomes = []
            for _ in range(args.requests):
                try:
                    response = httpx.post(url, content=body, headers={"content-type": "application/json"},
                                          timeout=900)
                except httpx.HTTPError as error:
                    outcomes.append(f"no answer ({type(error).__name__})")
                    continue
                if response.status_code != 200:
                    outcomes.append(f"HTTP {response.status_code}")
                    continue
                for row in response.json()["predictions"]:
                    outcomes.append("error row: " + row["error"][:70] if row.get("error") else "scored")
            return outcomes

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = [outcome for outcomes in pool.map(client, range(args.clients)) for outcome in outcomes]
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        alive = server.alive()

    mib = 2**20
    print(f"serving code: {code_root} ({commit})")
    print(f"load: {args.clients} concurrent clients x {args.requests} requests x {args.images} JPEGs of "
          f"{args.side}x{args.side} ({len(image) / mib:.1f} MiB base64 each, {len(body) / mib:.1f} MiB per request)")
    print(f"server RSS at rest {rest / mib:,.0f} MiB, peak {peak[0] / mib:,.0f} MiB, "
          f"peak over rest {(peak[0] - rest) / mib:+,.0f} MiB ({peak[0] / rest:.2f}x); "
          f"load took {seconds:.1f} s; server alive after: {alive}")
    for outcome, count in collections.Counter(outcomes).most_common():
        print(f"  {count:3d} x {outcome}")


if __name__ == "__main__":
    main()
