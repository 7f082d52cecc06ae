"""Peak memory of `mlflow models serve` under a bounded concurrent load of large-image requests.

    python benchmarks/serving_memory.py [--before 1f90b46] [--side 12000] [--images 3]
                                        [--clients 2] [--requests 2]

For the serving code of commit `--before` (by default 1f90b46, before any serving limit) and
of this working tree, in turn: logs the tiny end-to-end test model (tests/fake_training.py)
with that code, serves it with `mlflow models serve --env-manager local`, and sends `clients`
concurrent clients x `requests` requests, each holding `images` flat-colour JPEGs of `side` x
`side` pixels (a 12000 x 12000 one is about 2 MB on the wire and 432 MB once decoded). The
server's process tree is sampled every 20 ms (tests/memory.py); the printout is its resident
memory at rest and at its peak, and what the requests got back. A measurement, not a test:
nothing here passes or fails. The figures measured are in benchmarks/serving_memory.md.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.memory import PeakRss, tree_rss  # noqa: E402
from tests.servers import BIN_DIR, base_env, cli, free_port, running, start_process, wait_for_http  # noqa: E402

_LOG_MODEL = textwrap.dedent("""
    import sys
    from pathlib import Path
    import mlflow
    from tests.fake_training import tiny_model
    mlflow.set_tracking_uri(sys.argv[1])
    path = tiny_model(Path(sys.argv[2]) / "model.keras")
    experiment = mlflow.create_experiment("serving-memory", artifact_location=(Path(sys.argv[2]) / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        # by file, not by trying imports: the project's editable install would supply new modules
        if (Path(sys.argv[3]) / "tasks/models/tracking.py").is_file():   # the layout since the three wings
            from tasks.models.tracking import log_pyfunc_model
            info = log_pyfunc_model(path, 32)
        else:                                          # the flat layout before them
            from tasks.tracking import log_pyfunc_model
            info = log_pyfunc_model({"model_path": str(path), "input_size": 32})
    import tasks
    print(tasks.__file__, flush=True)
    print(info.model_uri)
""")


def flat_jpeg(side: int, colour: tuple[int, int, int] = (90, 60, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def log_model(code_root: Path, work: Path) -> tuple[str, str]:
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _LOG_MODEL, uri, str(work), str(code_root)], cwd=work,
                          env=base_env(PYTHONPATH=str(code_root), MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"logging the model with {code_root} failed:\n{done.stderr[-3000:]}")
    *_, package, model_uri = done.stdout.strip().splitlines()
    if not Path(package).is_relative_to(code_root):
        raise SystemExit(f"the model was logged with {package}, not the code of {code_root}")
    return uri, model_uri


def checkout(rev: str, work: Path) -> Path:
    """The tree of commit `rev`, unpacked under `work` (the code is all that is needed, not its history)."""
    root = work / f"code-{rev}"
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def measure(code_root: Path, work: Path, body: bytes, clients: int, requests: int) -> dict:
    """Serve the model logged with `code_root`'s code, put the load on it; RSS at rest and peak, outcomes."""
    uri, model_uri = log_model(code_root, work)
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

        def client(_: int) -> list[str]:
            outcomes = []
            for _ in range(requests):
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

        started = time.perf_counter()
        with PeakRss(server.pid) as rss, ThreadPoolExecutor(clients) as pool:
            outcomes = [outcome for outcomes in pool.map(client, range(clients)) for outcome in outcomes]
        return {"rest": rest, "peak": rss.peak, "seconds": time.perf_counter() - started,
                "alive": server.alive(), "outcomes": collections.Counter(outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="1f90b46", help="commit whose serving code is the baseline")
    parser.add_argument("--side", type=int, default=12_000, help="pixels per side of each image")
    parser.add_argument("--images", type=int, default=3, help="images per request")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serving-memory-"))
    image = base64.b64encode(flat_jpeg(args.side)).decode("ascii")
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]] * args.images}}).encode()
    mib = 2**20
    print(f"load: {args.clients} concurrent clients x {args.requests} requests x {args.images} JPEGs of "
          f"{args.side}x{args.side} ({len(image) / mib:.1f} MiB base64 each, {len(body) / mib:.1f} MiB per request)")
    results = {}
    try:
        for label, root in ((f"before ({args.before})", checkout(args.before, work)), ("after (this tree)", REPO)):
            (work / label.split()[0]).mkdir()
            result = results[label] = measure(root, work / label.split()[0], body, args.clients, args.requests)
            print(f"{label}: server RSS at rest {result['rest'] / mib:,.0f} MiB, peak {result['peak'] / mib:,.0f} "
                  f"MiB ({result['peak'] / result['rest']:.2f}x rest); load took {result['seconds']:.1f} s; "
                  f"server alive after: {result['alive']}", flush=True)
            for outcome, count in result["outcomes"].most_common():
                print(f"  {count:3d} x {outcome}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before, after = results.values()
    print(f"peak over rest: before {(before['peak'] - before['rest']) / mib:+,.0f} MiB, "
          f"after {(after['peak'] - after['rest']) / mib:+,.0f} MiB; peak after / before "
          f"{after['peak'] / before['peak']:.2f}")


if __name__ == "__main__":
    main()
