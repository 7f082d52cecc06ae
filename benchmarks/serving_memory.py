"""Peak memory and lost time of `mlflow models serve` under hostile loads, before and after the serving limits.

    python benchmarks/serving_memory.py [--before a6198bf] [--probes parquet,bodies,timeout]
                                        [--side 12000] [--images 3] [--clients 2] [--requests 2]

For the serving code of commit `--before` and of this working tree, in turn: logs the tiny
end-to-end test model (tests/fake_training.py) with that code, serves it with `mlflow models serve
--env-manager local` started as that code's README starts it (the environment its serve command
sets), and puts each probe on a fresh server. The server's process tree is sampled every 20 ms
(tests/memory.py); each probe prints the server's resident memory at rest and at its peak, how
long it took and what the requests got back. A measurement, not a test: nothing here passes or
fails. The figures measured are in benchmarks/serving_memory.md.

Probes (each a probe that once broke the served model):

- parquet:  a 1,000,000-row zstd parquet body of a few KB;
- bodies:   8 concurrent requests of 31 MiB each (a 25 MP PNG, most of a second to decode, and
            a 31 MiB `image` cell), so that they wait for each other while their bodies are held;
- timeout:  2 concurrent requests of 30 MiB of 25 MP PNGs (most of a second each to decode, far
            more work than the server's 60 s request timeout), then a small request every 2 s:
            how long until the server answers again;
- jpegs:    `clients` x `requests` requests of `images` flat JPEGs of `side` x `side` pixels
            (the large-image load of the first serving limits; compare with commit 1f90b46);
- tall:     one request of a 2 KB PNG of 1 x 1,000,000 pixels and 3 small JPEGs, then a small
            request: what each got back and when, the server's CPU-seconds in the 5 s after them
            (idle, it should spend none), then SIGTERM to `mlflow models serve` and how long until
            its process tree is gone (compare with commit 763e005, before the one size rule).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

import psutil  # noqa: E402

from tests.memory import PeakRss, tree_rss  # noqa: E402
from tests.servers import BIN_DIR, base_env, cli, free_port, running, start_process, wait_for_http  # noqa: E402

MIB = 2**20

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

_SERVE_ENV = textwrap.dedent("""
    import json, sys
    try:
        from tests.test_readme import serve_command_env
    except ImportError:                                # before the README's serve command set any
        print("{}")
    else:
        print(json.dumps(serve_command_env()))
""")


def flat_image(side: int, fmt: str = "JPEG", colour: tuple[int, int, int] = (90, 60, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def request_body(cells: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[cell] for cell in cells]}}).encode()


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


def readme_serve_env(code_root: Path) -> dict[str, str]:
    """What `code_root`'s README tells `mlflow models serve` to run with."""
    done = subprocess.run([sys.executable, "-c", _SERVE_ENV], cwd=code_root, capture_output=True, text=True,
                          env=base_env(PYTHONPATH=str(code_root)), timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkout(rev: str, work: Path) -> Path:
    """The tree of commit `rev`, unpacked under `work` (the code is all that is needed, not its history)."""
    root = work / f"code-{rev}"
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


@contextlib.contextmanager
def served(code_root: Path, work: Path, store: tuple[str, str]) -> Iterator[tuple[str, int]]:
    """The model `store` holds, served as `code_root`'s README serves it, warmed up: (url, pid)."""
    uri, model_uri = store
    port = free_port()
    env = base_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(code_root),
                   PATH=f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", **readme_serve_env(code_root))
    serve = [cli("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port),
             "-h", "127.0.0.1"]
    with running(start_process("mlflow models serve", serve, env=env, log_path=work / "serve.log",
                               cwd=work)) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/ping", timeout=300, process=server)
        post(url, request_body([base64.b64encode(flat_image(64)).decode()]))  # warm up: compile the model
        yield url, server.pid


def post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 900) -> str:
    """One request; its outcome in a few words (a status, error rows, or why no answer came)."""
    try:
        response = httpx.post(f"{url}/invocations", content=body, headers={"content-type": content_type},
                              timeout=timeout)
    except httpx.HTTPError as error:
        return f"no answer ({type(error).__name__})"
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    rows = response.json()["predictions"]
    errors = collections.Counter(row["error"][:60] for row in rows if row.get("error"))
    scored = len(rows) - sum(errors.values())
    parts = [f"{scored} scored"] if scored else []
    parts += [f"{count} x error row: {error}" for error, count in errors.most_common(2)]
    return f"HTTP 200, {len(response.content) / MIB:.1f} MiB: " + "; ".join(parts)


def measure(pid: int, load: Callable[[], list[str]]) -> dict:
    """RSS of the server at rest and at its peak while `load` runs; its outcomes and duration."""
    time.sleep(1.0)
    rest = tree_rss(pid)
    started = time.perf_counter()
    with PeakRss(pid) as rss:
        outcomes = load()
    return {"rest": rest, "peak": rss.peak, "seconds": time.perf_counter() - started,
            "outcomes": collections.Counter(outcomes)}


def parquet_probe(url: str, _pid: int, args: argparse.Namespace) -> Callable[[], list[str]]:
    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame({"image": ["x"] * args.parquet_rows}).to_parquet(buffer, compression="zstd", index=False)
    body = buffer.getvalue()
    print(f"  parquet: {args.parquet_rows:,} rows in {len(body):,} bytes of zstd parquet", flush=True)
    return lambda: [post(url, body, "application/vnd.apache.parquet")]


def bodies_probe(url: str, _pid: int, args: argparse.Namespace) -> Callable[[], list[str]]:
    png = base64.b64encode(flat_image(5000, "PNG", (200, 60, 90))).decode()
    body = request_body([png, "A" * (args.body_mib * MIB - len(png) - 100)])  # a slow image and a large cell
    print(f"  bodies: {args.bodies} concurrent requests of {len(body) / MIB:.1f} MiB (a 25 MP PNG and a "
          f"{(len(body) - len(png)) / MIB:.0f} MiB cell each)", flush=True)

    def load() -> list[str]:
        with ThreadPoolExecutor(args.bodies) as pool:
            return list(pool.map(lambda _: post(url, body), range(args.bodies)))
    return load


def timeout_probe(url: str, _pid: int, args: argparse.Namespace) -> Callable[[], list[str]]:
    png = base64.b64encode(flat_image(5000, "PNG", (200, 60, 90))).decode()
    rows = max(1, args.timeout_mib * MIB // len(png))
    body = request_body([png] * rows)
    small = request_body([base64.b64encode(flat_image(64)).decode()])
    print(f"  timeout: 2 concurrent requests of {rows} 25 MP PNGs ({len(body) / MIB:.1f} MiB each), then a small "
          "request every 2 s until one is answered", flush=True)

    def load() -> list[str]:
        outcomes: list[str] = []
        started = time.monotonic()
        big = [threading.Thread(target=lambda: outcomes.append(
            f"{post(url, body)} after {time.monotonic() - started:.0f} s")) for _ in range(2)]
        for thread in big:
            thread.start()
        time.sleep(1.0)
        while time.monotonic() - started < args.timeout_cap:
            answer = post(url, small, timeout=120)
            if answer.startswith("HTTP 200"):
                outcomes.append(f"small request answered {time.monotonic() - started:.0f} s after the large ones")
                break
            time.sleep(2.0)
        else:
            outcomes.append(f"no small request answered within {args.timeout_cap} s")
        for thread in big:
            thread.join()
        return outcomes
    return load


def jpegs_probe(url: str, _pid: int, args: argparse.Namespace) -> Callable[[], list[str]]:
    image = base64.b64encode(flat_image(args.side)).decode("ascii")
    body = request_body([image] * args.images)
    print(f"  jpegs: {args.clients} concurrent clients x {args.requests} requests x {args.images} JPEGs of "
          f"{args.side}x{args.side} ({len(body) / MIB:.1f} MiB per request)", flush=True)

    def load() -> list[str]:
        with ThreadPoolExecutor(args.clients) as pool:
            return [outcome for outcomes in pool.map(lambda _: [post(url, body) for _ in range(args.requests)],
                                                     range(args.clients)) for outcome in outcomes]
    return load


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU-seconds the processes have spent so far (those that ended count no more)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tall_probe(url: str, pid: int, args: argparse.Namespace) -> Callable[[], list[str]]:
    from PIL import Image

    from tests.imagegen import image_bytes

    buffer = io.BytesIO()
    Image.new("L", (1, 1_000_000)).save(buffer, format="PNG", optimize=True)
    tall = base64.b64encode(buffer.getvalue()).decode()
    good = [base64.b64encode(image_bytes(label, 60 + index)).decode()
            for index, label in enumerate(("cat", "dog", "cat"))]
    print(f"  tall: 1 request of a {len(buffer.getvalue()):,}-byte PNG of 1 x 1,000,000 pixels and 3 JPEGs, then "
          "a request of 1 JPEG, then SIGTERM", flush=True)

    def load() -> list[str]:
        tree = _tree(pid)
        started = time.monotonic()
        outcomes = [f"request: {post(url, request_body([tall, *good]), timeout=args.timeout_cap)} "
                    f"after {time.monotonic() - started:.1f} s"]
        asked = time.monotonic()
        outcomes.append(f"next request: {post(url, request_body(good[:1]), timeout=args.timeout_cap)} "
                        f"after {time.monotonic() - asked:.1f} s")
        tree = _tree(pid) or tree
        idle = tree_cpu_seconds(tree)
        time.sleep(5.0)
        outcomes.append(f"server CPU in the 5 s after both answers: {tree_cpu_seconds(tree) - idle:.1f} s")
        outcomes.append(f"server CPU from the first request on: {tree_cpu_seconds(tree):.1f} s in all "
                        "(its start and warm-up included)")
        os.kill(pid, signal.SIGTERM)
        termed = time.monotonic()
        while time.monotonic() - termed < args.sigterm_cap and not all(_gone(process) for process in tree):
            time.sleep(0.1)
        left = [process for process in tree if not _gone(process)]
        for process in left:  # reparented to init once `mlflow models serve` is gone: the server's stop misses them
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        outcomes.append(f"SIGTERM: the server's process tree gone after {time.monotonic() - termed:.1f} s" if not left
                        else f"SIGTERM: {len(left)} of the server's processes still running after "
                             f"{args.sigterm_cap} s (killed)")
        return outcomes
    return load


PROBES = {"parquet": parquet_probe, "bodies": bodies_probe, "timeout": timeout_probe, "jpegs": jpegs_probe,
          "tall": tall_probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="a6198bf", help="commit whose serving code is the baseline")
    parser.add_argument("--probes", default="parquet,bodies,timeout", help=f"comma-separated, of {list(PROBES)}")
    parser.add_argument("--parquet-rows", type=int, default=1_000_000)
    parser.add_argument("--bodies", type=int, default=8, help="concurrent large bodies")
    parser.add_argument("--body-mib", type=int, default=31)
    parser.add_argument("--timeout-mib", type=int, default=30, help="MiB of PNGs per timed-out request")
    parser.add_argument("--timeout-cap", type=int, default=600, help="seconds to wait for the server to answer")
    parser.add_argument("--sigterm-cap", type=int, default=120, help="tall: seconds to wait for the server to end")
    parser.add_argument("--side", type=int, default=12_000, help="jpegs: pixels per side of each image")
    parser.add_argument("--images", type=int, default=3, help="jpegs: images per request")
    parser.add_argument("--clients", type=int, default=2, help="jpegs: concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="jpegs: requests per client")
    args = parser.parse_args()
    probes = [name.strip() for name in args.probes.split(",") if name.strip()]

    work = Path(tempfile.mkdtemp(prefix="serving-memory-"))
    try:
        for label, root in ((f"before ({args.before})", checkout(args.before, work)), ("after (this tree)", REPO)):
            home = work / label.split()[0]
            home.mkdir()
            store = log_model(root, home)
            print(f"{label}: served with {readme_serve_env(root) or 'no extra environment'}", flush=True)
            for name in probes:  # a fresh server per probe: one probe's leftovers never hide another's peak
                with served(root, home, store) as (url, pid):
                    result = measure(pid, PROBES[name](url, pid, args))
                print(f"  {name}: server RSS at rest {result['rest'] / MIB:,.0f} MiB, peak "
                      f"{result['peak'] / MIB:,.0f} MiB (+{(result['peak'] - result['rest']) / MIB:,.0f}); "
                      f"took {result['seconds']:.1f} s", flush=True)
                for outcome, count in result["outcomes"].most_common():
                    print(f"    {count:3d} x {outcome}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
