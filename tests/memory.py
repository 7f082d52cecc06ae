"""Resident memory of a process and everything it started, sampled while something runs.

A served model's memory is that of the server's whole process tree (`mlflow models serve`
starts uvicorn, which loads the model), so that is what the serving test and
benchmarks/serving_memory.py measure.
"""

from __future__ import annotations

import threading
import time

import psutil


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakRss:
    """Samples a process tree's RSS every `interval_s` in a thread; `.peak` holds the largest seen."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, tree_rss(self.pid))
            except psutil.Error:  # the server died: the peak so far stands
                return
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
