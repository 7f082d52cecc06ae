"""The run-time choice of task runner: in-process by default, a local Dask cluster, or an existing one.

The cluster specifications are checked as data (what each worker would get: its name, one
thread, its cores, its GPU); one real local cluster then runs Prefect tasks in ephemeral
mode, which is where the workers must be pointed at the flow's own server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.config import ComputeConfig, RetrainConfig, TrainConfig
from flows.retrain import build_parser, config_from_args
from flows.runners import cluster_spec, decode_workers, task_runner, visible_gpus
from tasks.common.errors import ConfigError
from tests.servers import base_env, seed_prefect_home

REPO = Path(__file__).resolve().parents[2]


def test_the_default_is_the_in_process_runner_and_the_options_never_change_the_config_hash():
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(task_runner(ComputeConfig()), ThreadPoolTaskRunner)
    assert RetrainConfig().section(ComputeConfig) == ComputeConfig()
    fast = RetrainConfig(workers=4, threads_per_worker=2, shard_size=64)
    assert fast.config_hash() == RetrainConfig().config_hash()
    assert fast.section(TrainConfig) == RetrainConfig().section(TrainConfig)  # train_model's config forbids compute fields
    args = build_parser().parse_args(["--workers", "2", "--shard-size", "16", "--dask-address", "none"])
    assert config_from_args(args).section(ComputeConfig) == ComputeConfig(workers=2, shard_size=16)


def test_a_local_cluster_gets_one_single_threaded_worker_per_share_of_the_cores(monkeypatch):
    """One shard at a time per worker; its model and decoder sized to its share of the cores."""
    from prefect_dask import DaskTaskRunner

    monkeypatch.setattr("flows.runners.usable_cpus", lambda: [0, 1, 2, 3])
    compute = ComputeConfig(workers=2)
    runner = task_runner(compute)
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_class == "distributed.SpecCluster"
    workers = cluster_spec(compute)["workers"]
    assert [spec["options"]["nthreads"] for spec in workers.values()] == [1, 1]
    assert [name.rsplit("-", 1)[1] for name in workers] == ["cpu0", "cpu1"]  # the name each shard records
    envs = [spec["options"]["env"] for spec in workers.values()]
    assert {env["TF_NUM_INTRAOP_THREADS"] for env in envs} == {"2"} and decode_workers(compute) == 2
    assert all("CUDA_VISIBLE_DEVICES" not in env for env in envs)
    chosen = cluster_spec(ComputeConfig(workers=3, threads_per_worker=1))["workers"]
    assert {spec["options"]["env"]["OMP_NUM_THREADS"] for spec in chosen.values()} == {"1"}


def test_one_worker_per_gpu_sees_only_its_gpu(monkeypatch):
    monkeypatch.setattr("flows.runners.usable_cpus", lambda: list(range(16)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus("auto") == ["2", "3"]
    workers = cluster_spec(ComputeConfig(gpus="auto"))["workers"]
    assert [spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for spec in workers.values()] == ["2", "3"]
    assert [name.rsplit("-", 1)[1] for name in workers] == ["gpu2", "gpu3"]
    assert decode_workers(ComputeConfig(gpus="0,1,2,3")) == 4  # 16 cores shared by 4 GPU workers' decoders
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="--gpus auto found no GPU"):
        visible_gpus("auto")


def test_an_existing_cluster_is_connected_to_and_bad_combinations_are_refused():
    runner = task_runner(ComputeConfig(dask_address="tcp://scheduler:8786"))
    assert runner.address == "tcp://scheduler:8786" and decode_workers(ComputeConfig(dask_address="tcp://s:1")) is None
    for bad, words in [({"dask_address": "scheduler:8786"}, "not a Dask scheduler address"),
                       ({"dask_address": "tcp://s:8786", "workers": 2}, "give one or the other"),
                       ({"gpus": "0,1", "workers": 3}, "one Dask worker per GPU"),
                       ({"gpus": "0,0"}, "names a GPU twice")]:
        with pytest.raises(ValidationError, match=words):
            ComputeConfig(**bad)


def test_a_remote_cluster_without_a_prefect_server_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    script = ("from flows.config import ComputeConfig\nfrom flows.runners import workers_reach_the_api\n"
              "with workers_reach_the_api(ComputeConfig(dask_address='tcp://gpu-box.example:8786')):\n    pass\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=base_env(PREFECT_API_URL=None))
    assert done.returncode != 0 and "set PREFECT_API_URL" in done.stderr


EPHEMERAL = textwrap.dedent("""
    import json, os
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL
    from flows.config import ComputeConfig
    from flows.runners import on_compute, workers_reach_the_api

    @task
    def where(index):
        from distributed import get_worker
        from prefect.runtime import flow_run
        return {"worker": get_worker().name, "api": PREFECT_API_URL.value(), "flow_run": flow_run.id}

    @flow
    def fan_out(n: int):
        from prefect.runtime import flow_run
        return {"flow_run": flow_run.id, "shards": where.map(range(n)).result()}

    if __name__ == "__main__":
        assert not PREFECT_API_URL.value()
        compute = ComputeConfig(workers=2, threads_per_worker=1)
        with workers_reach_the_api(compute) as api:
            result = on_compute(fan_out, compute)(6)
        print(json.dumps({"api": api, "after": PREFECT_API_URL.value(), **result}))
""")


@pytest.mark.slow
def test_dask_workers_report_to_the_flows_own_ephemeral_server(tmp_path):
    script = tmp_path / "fan_out.py"
    script.write_text(EPHEMERAL)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=base_env(PREFECT_API_URL=None, PREFECT_HOME=seed_prefect_home(tmp_path / "prefect"),
                                       PYTHONPATH=str(REPO),  # a busy CI core starts the server slowly:
                                       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["api"].startswith("http://127.0.0.1:") and result["after"] is None  # pinned for the run only
    assert {shard["api"] for shard in result["shards"]} == {result["api"]}  # no worker started a server of its own
    assert {shard["flow_run"] for shard in result["shards"]} == {result["flow_run"]}
    assert len({shard["worker"] for shard in result["shards"]}) == 2


def test_a_dask_run_says_where_its_shards_go_and_links_the_dashboard():
    """`--workers 2` is one line on the terminal: the local cluster, its workers, a dashboard that answers."""
    import httpx

    from flows.runners import in_process_runner, where_shards_run

    assert where_shards_run(in_process_runner(), ComputeConfig()) is None  # in-process: nothing to say
    compute = ComputeConfig(workers=2, threads_per_worker=1)
    with task_runner(compute) as runner:
        line = where_shards_run(runner, compute)
        assert line.startswith("Feature shards on a local Dask cluster: 2 worker(s), dashboard http://127.0.0.1:")
        link = line.split("dashboard ")[1].split()[0]
        assert link.endswith("/status") and ":8787/" not in link  # a free port: two runs never clash
        assert httpx.get(link, timeout=30).status_code == 200  # the page answers (or says it needs bokeh)
