"""Shard leases: two live workers never compute one shard; a dead worker's shard is computed again.

Workers are real processes here (a worker is a process, on a Dask cluster as anywhere): one
holds a shard's lease in the middle of computing it, the test process is the second worker.
VGG16 with weights=None at 32 px, as in test_features.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tasks.data.datafolder import DataFolder
from tasks.learning.features import extract_shard, load_plan, plan_extraction
from tasks.learning.leases import LeaseHolder, ShardLease, lease_is_stale, lease_path
from tasks.learning.shards import read_shard, shard_index, shard_name
from tests.prepared import make_prepared_dir

REPO = Path(__file__).resolve().parents[2]
BACKBONE, SIZE = "vgg16", 32


@pytest.fixture
def plan(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 4, "validation": 2, "test": 2})  # 16 images
    return plan_extraction(DataFolder.at(data_dir), BACKBONE, None, SIZE, shard_size=8)


def _target(plan, index: int = 0) -> Path:
    return Path(plan.cache_dir) / shard_name([sha for sha, _ in plan.shards[index]])


def _holder(plan, *, release: str) -> subprocess.Popen:
    """A second worker that computes shard 0 and stops after its first batch, lease held, until told.

    `release` is what it does on a line from stdin: "finish" the shard, or wait to be killed.
    """
    script = textwrap.dedent(f"""
        import sys, time
        from tasks.learning.features import extract_shard, load_plan
        paused = []
        def pause(done):
            if paused:
                return
            paused.append(done)
            print("computing", flush=True)
            if {release!r} == "finish":
                sys.stdin.readline()
            else:
                time.sleep(300)   # killed here, mid-shard, the lease still on disk
        extract_shard(load_plan({plan.plan_path!r}), 0, 4, on_progress=pause)
        print("wrote", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "computing"
    return child


def test_a_live_lease_makes_the_second_worker_wait_and_reuse_the_shard(plan):
    child = _holder(plan, release="finish")
    try:
        holder = LeaseHolder.model_validate_json(lease_path(_target(plan)).read_text())
        assert holder.pid == child.pid
        results = []
        second = threading.Thread(target=lambda: results.append(extract_shard(load_plan(plan.plan_path), 0, 4)))
        second.start()
        time.sleep(2.0)
        assert second.is_alive() and not _target(plan).exists()  # waiting, not computing
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "wrote"
        second.join(timeout=120)
        [result] = results
    finally:
        child.kill()
        child.wait(timeout=30)
    assert result.reused and result.computed == 0
    assert result.worker == read_shard(_target(plan)).worker == f"{socket.gethostname()}:{child.pid}"
    assert not lease_path(_target(plan)).exists()


def test_a_worker_killed_mid_shard_loses_only_that_shard_and_its_lease_is_taken_over(plan):
    extract_shard(load_plan(plan.plan_path), 1, 4)  # a finished shard, which the kill must not touch
    finished = _target(plan, 1).stat().st_mtime_ns
    child = _holder(plan, release="never")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    lease = lease_path(_target(plan))
    assert lease.exists() and not _target(plan).exists()  # a dead lease and no half shard
    assert "is dead" in lease_is_stale(lease)

    result = extract_shard(load_plan(plan.plan_path), 0, 4)
    assert not result.reused and result.computed == 8 and result.worker.endswith(f":{os.getpid()}")
    assert not lease.exists()
    assert _target(plan, 1).stat().st_mtime_ns == finished
    assert len(shard_index(plan.cache_dir).rows) == 16


def test_a_silent_lease_from_another_host_is_broken_after_the_stale_time(plan):
    lease = lease_path(_target(plan))
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"host": "elsewhere/1", "pid": 1, "worker": "gpu-7", "token": "t", "since": 0.0}))
    assert lease_is_stale(lease, stale_s=60) is None  # fresh: another host's pid means nothing here
    old = time.time() - 120
    os.utime(lease, (old, old))
    assert "gpu-7 has not renewed it for" in lease_is_stale(lease, stale_s=60)
    result = extract_shard(load_plan(plan.plan_path), 0, 4, lease_stale_s=60)
    assert result.computed == 8 and not lease.exists()


def test_only_one_of_many_takes_a_lease_and_a_fresh_one_is_never_broken(tmp_path):
    path = tmp_path / ".lease-shard-x.json"
    barrier = threading.Barrier(8)
    taken: list[ShardLease] = []

    def race() -> None:
        barrier.wait()
        lease = ShardLease.acquire(path, "racer", heartbeat_s=0.1)
        if lease is not None:
            taken.append(lease)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 1
    time.sleep(0.3)
    assert ShardLease.break_stale(path, stale_s=0.25) is None  # the heartbeat keeps it fresh (same pid lives)
    taken[0].release()
    assert not path.exists()
