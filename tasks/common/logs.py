"""Where a step's log lines go: the Prefect run's logger inside a run, the module's logger outside.

Lines written inside a flow or task run must reach the Prefect UI; the same functions called
from a test, a benchmark or a GPU host without Prefect log through `logging` as usual. Prefect
is only consulted when it is already imported, so modules that log stay importable (and
cheap to import) where Prefect is not installed: the served model and the compute path.
"""

from __future__ import annotations

import logging
import sys

Logger = logging.Logger | logging.LoggerAdapter


def run_logger(name: str) -> Logger:
    """Prefect's run logger when called inside a flow or task run, else `logging.getLogger(name)`."""
    if "prefect" in sys.modules:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    return logging.getLogger(name)
