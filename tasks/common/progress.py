"""Progress of long steps: how far, how fast, how long still, where people look.

A step that takes more than a few seconds (downloading, inspecting images, extracting
features, training epochs, scoring a folder) reports through a `Progress`: a log line every
`every_s` seconds with the count, the rate and the time left (in the terminal, and in the
Prefect run's logs), and, inside a Prefect run, a progress artifact on the run's page that
moves from 0 to 100 %. Nothing is reported for steps that finish before the first interval,
so quick reruns stay quiet.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any

from tasks.common.logs import run_logger

DEFAULT_EVERY_S = 10.0
EVERY_ENV = "CATSDOGS_PROGRESS_SECONDS"
"""Seconds between progress lines (default 10; 0 reports every step, as the tests do)."""


def duration(seconds: float) -> str:
    """3s, 4m05s, 1h02m: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _progress_artifact(description: str) -> Any:
    """A Prefect progress artifact for this run, or None outside Prefect runs (tests, GPU hosts)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return None
        return create_progress_artifact(progress=0.0, description=description)
    except Exception:  # noqa: BLE001 - progress is a courtesy: an API hiccup must never fail the work
        return None


class Progress:
    """Count work done; report count, rate and time left every `every_s` seconds."""

    def __init__(self, what: str, total: int | None, unit: str = "images", *, every_s: float | None = None,
                 scale: float = 1.0, done: int = 0, logger_name: str = "tasks", artifact: bool = True) -> None:
        if every_s is None:
            every_s = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
        self.what, self.total, self.unit, self.every_s, self.scale = what, total, unit, every_s, scale
        self.done = self._base = done  # a resumed download starts part-way: its rate counts only new work
        self.detail = ""
        """Appended to each line (e.g. the last epoch's validation loss)."""
        self._logger = run_logger(logger_name)
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._artifact_wanted = artifact
        self._artifact: Any = None
        self._reported_at: int | None = None

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.done - self._base) / elapsed
        done, total = self.done / self.scale, (self.total or 0) / self.scale
        count = f"{done:,.0f}/{total:,.0f} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total \
            else f"{done:,.0f} {self.unit}"
        text = f"{self.what}: {count}, {rate / self.scale:,.1f} {self.unit}/s"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            text += f", {duration(left) if self.done < self.total else 'done in ' + duration(elapsed)}"
            text += " left" if self.done < self.total else ""
        return text + (f"; {self.detail}" if self.detail else "")

    def advance(self, count: int = 1) -> None:
        """Record `count` more units done (thread-safe); log when the interval has passed."""
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            self._last = now
            self._report()

    def _report(self) -> None:
        self._logger.info(self.line())
        self._reported_at = self.done
        if not (self._artifact_wanted and self.total):
            return
        if self._artifact is None:
            self._artifact = _progress_artifact(self.what)
            if self._artifact is None:
                self._artifact_wanted = False
                return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * self.done / self.total))
        except Exception:  # noqa: BLE001 - see _progress_artifact
            self._artifact_wanted = False

    def finish(self) -> None:
        """A last line (only when progress was shown: a quick step stays silent) and the artifact at 100 %."""
        with self._lock:
            if self._reported_at is not None and self._reported_at != self.done:
                self._report()
