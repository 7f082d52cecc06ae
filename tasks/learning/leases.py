"""Shard leases: one live worker computes a shard, a dead worker's shard is computed again.

Why it is built this way:
- Two live workers never compute the same shard: the one computing it holds a lease, a file
  created with O_EXCL beside the shard and touched every LEASE_HEARTBEAT_S. Another worker
  that is handed the same shard (Dask reschedules work freely) waits for the shard instead,
  and reuses it.
- A lease whose holder died (its process is gone, on this host; or no heartbeat for
  LEASE_STALE_S, from anywhere) is broken and the shard computed again, so a worker killed
  mid-shard costs exactly that shard.
- O_EXCL and rename are atomic on local filesystems and on NFSv3+, which is what "storage all
  workers see" must provide; no lock server, database or Dask primitive is needed, so the
  same code guards shards in one process, on one host and on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from tasks.common.logs import run_logger
from tasks.common.processes import ProcessId, host_id
from tasks.learning.shards import Shard, read_shard

LEASE_HEARTBEAT_S = 10.0
"""How often the worker computing a shard touches its lease."""

LEASE_STALE_S = 120.0
"""A lease not touched for this long belongs to a dead (or frozen) worker and may be broken.

Twelve missed heartbeats: long enough for a stalled NFS client or a stop-the-world pause,
short next to the minutes a large shard takes. On the holder's own host a dead holder is
seen at once (its pid is gone), so only a worker lost with its host costs the full wait.
"""

LEASE_POLL_S = 0.5
"""How often a worker waiting for another's shard looks again."""


def lease_path(shard: Path) -> Path:
    """The lease file of a shard: hidden (no shard glob sees it), beside the shard on the shared storage."""
    return shard.with_name(f".lease-{shard.stem}.json")


class LeaseHolder(BaseModel):
    """Who holds a lease, written into the lease file (read by the workers that wait, and by people)."""

    host: str
    pid: int
    worker: str
    token: str
    since: float


def read_lease(path: Path) -> LeaseHolder | None:
    """The lease's holder; None when there is no lease or its holder has not written it yet."""
    try:
        return LeaseHolder.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def lease_is_stale(path: Path, stale_s: float = LEASE_STALE_S) -> str | None:
    """Why the lease at `path` may be broken (its holder is dead or silent), or None while it holds."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_lease(path)
    death = ProcessId(host=holder.host, pid=holder.pid, started="", boot="").death() if holder else None
    if death:
        return f"its holder {holder.worker} is dead ({death})"
    if age > stale_s:
        who = holder.worker if holder else "a worker that never wrote its name"
        return f"{who} has not renewed it for {age:.0f} s"
    return None


class ShardLease:
    """The right to compute one shard, held while it is computed and renewed by a heartbeat thread.

    `acquire` creates the lease file with O_EXCL, so of any number of workers exactly one
    gets it. `break_stale` removes a stale lease under a second O_EXCL file, and only the
    very lease that was judged stale (same inode, same mtime), so two workers breaking it
    at once cannot break the fresh lease a third has just taken.
    """

    def __init__(self, path: Path, holder: LeaseHolder, heartbeat_s: float) -> None:
        self.path, self.holder, self.heartbeat_s = path, holder, heartbeat_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}", daemon=True)

    @classmethod
    def acquire(cls, path: Path, worker: str, heartbeat_s: float = LEASE_HEARTBEAT_S) -> ShardLease | None:
        holder = LeaseHolder(host=host_id(), pid=os.getpid(), worker=worker, token=uuid.uuid4().hex,
                             since=time.time())
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as handle:
            handle.write(holder.model_dump_json())
        lease = cls(path, holder, heartbeat_s)
        lease._thread.start()
        return lease

    @staticmethod
    def break_stale(path: Path, stale_s: float = LEASE_STALE_S) -> str | None:
        """Remove the lease at `path` if it is stale; the reason when this call removed it."""
        try:
            seen = path.stat()
        except FileNotFoundError:
            return None
        reason = lease_is_stale(path, stale_s)
        if reason is None:
            return None
        breaker = path.with_name(path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # a breaker that died within the last few lines
                if time.time() - breaker.stat().st_mtime > stale_s:
                    breaker.unlink()
            return None
        os.close(fd)
        try:
            now = path.stat()
            if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
                return None  # renewed or replaced meanwhile: not the lease judged stale
            path.unlink()
            return reason
        except FileNotFoundError:
            return None
        finally:
            breaker.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_lease(self.path)
            if holder is None or holder.token != self.holder.token:
                self.lost.set()  # broken as stale (this process was frozen): the shard may be computed twice
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this one."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost.is_set():
            run_logger(__name__).warning(
                "The lease %s was broken while this worker (%s) held it, so another worker may have computed the "
                "same shard; raise LEASE_STALE_S if workers freeze this long.", self.path, self.holder.worker)
        holder = read_lease(self.path)
        if holder is not None and holder.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def lease_shard(target: Path, worker: str, *, stale_s: float = LEASE_STALE_S, heartbeat_s: float = LEASE_HEARTBEAT_S,
                poll_s: float = LEASE_POLL_S) -> tuple[ShardLease | None, Shard | None]:
    """(the lease, None) once this worker may compute `target`, or (None, the shard) once another wrote it.

    Waits as long as another live worker holds the lease; breaks it when its holder has died.
    """
    path = lease_path(target)
    waiting_for: str | None = None
    while True:
        existing = read_shard(target) if target.exists() else None
        if existing is not None:
            return None, existing
        lease = ShardLease.acquire(path, worker, heartbeat_s)
        if lease is not None:
            existing = read_shard(target) if target.exists() else None  # written just before our lease
            if existing is not None:
                lease.release()
                return None, existing
            return lease, None
        reason = ShardLease.break_stale(path, stale_s)
        if reason is not None:
            run_logger(__name__).warning("Shard %s: lease broken (%s); computing it here.", target.name, reason)
            continue
        holder = read_lease(path)
        if holder is not None and holder.worker != waiting_for:
            waiting_for = holder.worker
            run_logger(__name__).info("Shard %s is being computed by %s; waiting for it.", target.name,
                                      holder.worker)
        time.sleep(poll_s)
