"""Who a process is, written down so that a later run can prove it dead.

A killed run leaves records that say RUNNING (an MLflow run, a Prefect flow run). Marking one
failed is only safe when its process is provably gone, so every such record carries the
identity of the process that owns it: host (and PID namespace), pid, the process's start time
and the host's boot id. A pid alone is not enough, because pids are reused; a pid with its start time names one
process for ever. The owner is provably dead when it ran on this host and either the host has
rebooted since (another boot id), or no process has that pid, or the process with that pid
started at another time (a reused pid), or it is a zombie waiting to be reaped.

A record from another host can never be proven dead from here, and is left alone.

MLflow runs get the identity as tags when they start (tasks/models/tracking.py); Prefect flow
runs as labels, from `label_flow_run_owner`, an `on_running` hook of every project flow.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

OWNER_PREFIX = "catsdogs.owner."
"""Prefix of the tag (MLflow) or label (Prefect) keys that record a run's owning process."""

_FIELDS = ("host", "pid", "started", "boot")


def host_id() -> str:
    """This host and PID namespace: two containers on one host may share a hostname, never a namespace,
    and a pid means something only inside its namespace."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def boot_id() -> str:
    """This boot of this host ("" where the kernel does not say): every process of an older boot is gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state field on (the command name may hold spaces), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but it is there
    return True


@dataclass(frozen=True)
class ProcessId:
    """One process, for ever: host, pid, start time and boot id."""

    host: str
    pid: int
    started: str
    boot: str

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(host=host_id(), pid=pid, started=start_time(pid), boot=boot_id())

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        """Another process of this host (its start time read now)."""
        return cls(host=host_id(), pid=pid, started=start_time(pid), boot=boot_id())

    def labels(self, prefix: str = OWNER_PREFIX) -> dict[str, str]:
        """As tags or labels: {"catsdogs.owner.host": ..., "catsdogs.owner.pid": ..., ...}."""
        return {f"{prefix}{name}": str(getattr(self, name)) for name in _FIELDS}

    @classmethod
    def from_labels(cls, labels: Mapping[str, object] | None, prefix: str = OWNER_PREFIX) -> ProcessId | None:
        """The owner recorded in tags or labels, or None when they record none (then nothing is provable)."""
        labels = labels or {}
        try:
            return cls(host=str(labels[f"{prefix}host"]), pid=int(str(labels[f"{prefix}pid"])),
                       started=str(labels.get(f"{prefix}started", "")), boot=str(labels.get(f"{prefix}boot", "")))
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def death(self) -> str | None:
        """Why this process is provably gone, or None when it may still run (or runs elsewhere)."""
        if self.host != host_id():
            return None
        current_boot = boot_id()
        if self.boot and current_boot and self.boot != current_boot:
            return f"{self.describe()} ran before this host last rebooted"
        if self == ProcessId.current():
            return None
        fields = _stat_fields(self.pid)
        if fields is None:
            if _exists(self.pid):
                return None  # no /proc here, and the pid is taken: cannot tell
            return f"{self.describe()} no longer exists"
        if self.started and len(fields) > 19 and fields[19] != self.started:
            return f"{self.describe()} no longer exists (the pid now belongs to a newer process)"
        if fields[0] in ("Z", "X"):
            return f"{self.describe()} was killed (it is a zombie)"
        return None

    def alive(self) -> bool:
        """Not provably dead (the safe reading: a process elsewhere counts as alive)."""
        return self.death() is None


def label_flow_run_owner(flow: Any, flow_run: Any, state: Any) -> None:
    """A flow's `on_running` hook: record this process as the flow run's owner (labels `catsdogs.owner.*`).

    A run killed later can then be proven dead and marked CRASHED by the next retrain
    (tasks/models/reconcile.py). A failure here (a server without labels) only costs that
    proof, never the run.
    """
    import logging

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run.id, ProcessId.current().labels())
    except Exception as error:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("Could not record this process as the owner of flow run %s (%s); "
                                            "if it is killed, the next retrain cannot mark it crashed.",
                                            getattr(flow_run, "name", "?"), error)
