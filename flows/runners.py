"""The task runner of `train_model`, chosen at run time from a ComputeConfig.

    ComputeConfig()                              in-process, one shard after another (the default)
    ComputeConfig(workers=2)                     a local Dask cluster: 2 worker processes
    ComputeConfig(gpus="auto")                   a local Dask cluster: one worker per GPU
    ComputeConfig(dask_address="tcp://h:8786")   an existing Dask cluster (`dask scheduler` + `dask worker`s)

    flow = on_compute(train_model, compute)      # train_model.with_options(task_runner=...)
    with workers_reach_the_api(compute):
        flow(data_dir, config, compute=compute)

Why it is built this way:
- Dask through prefect-dask's DaskTaskRunner, the runner Prefect documents: every shard stays
  a Prefect task run (state, logs and retries in the UI) and Dask places it. The cluster of
  `workers`/`gpus` lives as long as the flow run; an existing cluster is only connected to.
- Each local worker runs one shard at a time (`nthreads=1`): its model and decoder are per
  process, and a second shard in the same process would only fight the first for the cores.
  Its model and decoder get `threads_per_worker` threads instead (thread-pool variables and
  the decoder's worker count), so N workers on one machine split it instead of each assuming
  it has all of it. Workers are not pinned to cores: on a machine shared with other work,
  pinning measured slower (benchmarks/scaling.md), as a pinned worker cannot move off a busy core.
- One worker per GPU: worker i sees only GPU i (CUDA_VISIBLE_DEVICES), the layout
  dask-cuda's LocalCUDACluster uses, without its extra dependency.
- Dask workers run Prefect tasks, so they need the Prefect API of the flow run. With a
  server (PREFECT_API_URL) they get it from the flow's settings. Without one Prefect runs an
  ephemeral server inside the flow process, and each worker would start its own, empty one:
  `workers_reach_the_api` pins the flow process's ephemeral server for the run instead.

Nothing here imports prefect-dask or distributed until a Dask runner is asked for, so the
default install (no `team` extra) never needs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

from flows.config import ComputeConfig
from tasks.common.errors import ConfigError
from tasks.common.prefect_api import prefect_api

F = TypeVar("F")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")


def in_process_runner() -> Any:
    """The default: shards one after another in the flow's process (the model is built once)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def task_runner(compute: ComputeConfig | None) -> Any:
    """The task runner `compute` asks for: in-process, a local Dask cluster, or an existing one."""
    if compute is None or not compute.uses_dask:
        return in_process_runner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise ConfigError("--workers, --gpus and --dask-address need prefect-dask; install the team extra: "
                          "pip install -e \".[team]\".") from error
    if compute.dask_address:
        return DaskTaskRunner(address=compute.dask_address)
    return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=cluster_spec(compute))


def on_compute(flow: F, compute: ComputeConfig | None) -> F:
    """`flow` with the task runner `compute` asks for (Prefect's `with_options`)."""
    return flow.with_options(task_runner=task_runner(compute))  # type: ignore[attr-defined]


def where_shards_run(runner: Any, compute: ComputeConfig | None) -> str | None:
    """One line for the terminal when shards go to Dask: local or existing cluster, its workers, its dashboard.

    Reads the runner's `client` (prefect-dask's public property), which starts or connects to
    the cluster as the first shard would. None for the in-process runner.
    """
    if compute is None or not compute.uses_dask or not hasattr(runner, "client"):
        return None
    client = runner.client
    workers = len(worker_devices(compute)) if not compute.dask_address else len(client.nthreads())
    kind = f"the Dask cluster at {compute.dask_address}" if compute.dask_address else "a local Dask cluster"
    link = client.dashboard_link
    if not link:
        dashboard = "no dashboard"
    elif importlib.util.find_spec("bokeh") is None and not compute.dask_address:
        dashboard = f"dashboard {link} (needs bokeh: pip install bokeh)"
    else:
        dashboard = f"dashboard {link}"
    return f"Feature shards on {kind}: {workers} worker(s), {dashboard}"


# ---------------------------------------------------------------- local clusters


def usable_cpus() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def visible_gpus(gpus: str) -> list[str]:
    """The GPU ids `gpus` means: its list, or for "auto" CUDA_VISIBLE_DEVICES' entries, else nvidia-smi's GPUs."""
    if gpus != "auto":
        return gpus.split(",")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"]
    else:
        smi = shutil.which("nvidia-smi")
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout if smi else ""
        ids = [str(index) for index, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
    if not ids:
        raise ConfigError("--gpus auto found no GPU (CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists none); "
                          "name the GPUs (--gpus 0,1) or use --workers N for CPU workers.")
    return ids


def threads_for(compute: ComputeConfig, workers: int, cpus: int | None = None) -> int:
    """Cores each of `workers` local workers uses: `threads_per_worker`, else an equal share of this machine."""
    cpus = cpus or len(usable_cpus())
    return compute.threads_per_worker or max(1, cpus // max(1, workers))


def decode_workers(compute: ComputeConfig | None) -> int | None:
    """Decoder workers per Dask worker: its share of the cores on a local cluster, else the worker's default."""
    if compute is None or not compute.uses_dask:
        return None
    if compute.threads_per_worker:
        return compute.threads_per_worker
    if compute.dask_address:
        return None  # a remote worker's own cores; `dask worker` was given them
    return threads_for(compute, len(worker_devices(compute)))


def worker_devices(compute: ComputeConfig) -> list[str | None]:
    """One entry per local worker: its GPU id, or None for a CPU worker."""
    if compute.gpus:
        return list(visible_gpus(compute.gpus))
    return [None] * compute.workers


def worker_env(threads: int, gpu: str | None) -> dict[str, str]:
    """The environment of one local worker: the size of its thread pools, and its one GPU."""
    env = {"OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
           "TF_NUM_INTEROP_THREADS": "2", "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def cluster_spec(compute: ComputeConfig) -> dict[str, Any]:
    """SpecCluster arguments: a scheduler in this process and one single-threaded Nanny worker per device.

    Workers are named `<host>-cpu<i>` or `<host>-gpu<id>`: that name is what each shard
    records as its `worker`.
    """
    from distributed import Nanny, Scheduler

    devices = worker_devices(compute)
    threads = threads_for(compute, len(devices))
    host = socket.gethostname().split(".")[0]
    workers = {}
    for index, gpu in enumerate(devices):
        name = f"{host}-gpu{gpu}" if gpu is not None else f"{host}-cpu{index}"
        workers[name] = {"cls": Nanny, "options": {
            "nthreads": 1, "name": name, "env": worker_env(threads, gpu), "host": "127.0.0.1", "silence_logs": 40}}
    # The dashboard on a free port (never a clash on 8787); without bokeh its page says how to get it.
    return {"scheduler": {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": True,
                                                        "dashboard_address": "127.0.0.1:0"}},
            "workers": workers, "silence_logs": 40}


# ---------------------------------------------------------------- the Prefect API the workers report to


@contextlib.contextmanager
def workers_reach_the_api(compute: ComputeConfig | None) -> Iterator[str | None]:
    """Make the Prefect API of this flow run the one every Dask worker reports its task runs to.

    With a configured server nothing is needed. In ephemeral mode (no PREFECT_API_URL) the
    flow process's own ephemeral server is pinned as PREFECT_API_URL for the block; Dask
    workers receive the flow's settings with each task, so they report to it instead of each
    starting an empty server of its own. That server listens on 127.0.0.1, so a cluster on
    other hosts needs a real one.
    """
    if compute is None or not compute.uses_dask:
        yield None
        return
    api = prefect_api()
    if api is not None and api.shared:
        yield api.url
        return
    host = urlparse(compute.dask_address).hostname if compute.dask_address else ""
    if host not in LOCAL_HOSTS and host != socket.gethostname():
        raise ConfigError(f"--dask-address {compute.dask_address} is another host, whose workers cannot reach this "
                          "process's temporary Prefect server; start a Prefect server and set PREFECT_API_URL "
                          "(README: Run it for a team).")
    if api is not None:  # this command's own temporary server: local workers inherit PREFECT_API_URL
        yield api.url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # the ephemeral server of this process (started on first use)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url
