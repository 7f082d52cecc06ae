"""`python -m flows.retrain`, made to stop in the gate so that a test can `kill -9` it there.

    python -m tests.killable_retrain MARKER [retrain options...]

The run registers its version as usual; where the gate would decide, it writes MARKER and
sleeps, so the test kills it exactly there, like the OOM killer or a closed laptop would: the
MLflow run and logged model are complete, the version has no alias and no verdict, the Prefect
flow run is RUNNING and the data folder and promotion locks are held. Only this child process
is altered; everything it talks to is real.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

PAUSE_S = 3600


def pause_in_the_gate(marker: Path) -> None:
    from tasks.models import promotion

    def decide(*args, **kwargs):
        marker.write_text("paused\n")
        time.sleep(PAUSE_S)
        raise SystemExit("never killed")

    promotion.decide = decide


if __name__ == "__main__":
    pause_in_the_gate(Path(sys.argv[1]))
    from flows.retrain import main

    sys.exit(main(sys.argv[2:]))
