"""`python -m flows.retrain`, made to stop at a chosen step so a test can `kill -9` it there.

    python -m tests.killable_retrain PAUSE_AT MARKER [retrain options...]

PAUSE_AT names the step to stop in; on reaching it the process writes MARKER and sleeps, so
the test kills it exactly there, like the OOM killer or a closed laptop would:

    log-model   inside MLflow's log_model: the run is RUNNING, its logged model PENDING
    gate        after the version is registered, before the gate decides: no alias, no verdict
    train       inside training, after the hidden `.partial` run folder was made
    none        do not stop (an ordinary run)

Only the test's own child process is altered; everything it talks to is real.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

PAUSE_S = 3600


def _pause(marker: Path):
    def stop_here(*args, **kwargs):
        marker.write_text("paused\n")
        time.sleep(PAUSE_S)
        raise SystemExit("never killed")

    return stop_here


def install(point: str, marker: Path) -> None:
    stop = _pause(marker)
    if point == "log-model":
        from tasks.models import serving

        original = serving.CatsDogsModel.__getstate__

        def getstate(self):  # pickled by MLflow's save_model, after the logged model was created
            stop()
            return original(self)

        serving.CatsDogsModel.__getstate__ = getstate
    elif point == "gate":
        from tasks.models import promotion

        promotion.decide = stop
    elif point == "train":
        from tasks.learning import steps

        original_fn = steps.train_head.fn

        def train_head(*args, **kwargs):
            stop()
            return original_fn(*args, **kwargs)

        steps.train_head.fn = train_head
    elif point != "none":
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], Path(sys.argv[2]))
    from flows.retrain import main

    sys.exit(main(sys.argv[3:]))
