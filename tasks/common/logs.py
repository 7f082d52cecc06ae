"""Where a step's log lines go: the Prefect run's logger inside a run, the module's logger outside.

Lines written inside a flow or task run must reach the Prefect UI; the same functions called
from a test, a benchmark or a GPU host without Prefect log through `logging` as usual. Prefect
is only consulted when it is already imported, so modules that log stay importable (and
cheap to import) where Prefect is not installed: the served model and the compute path.

Every record written through `run_logger` carries the attribute `catsdogs` (see OURS): the
command lines show exactly those records on the terminal (steps, counts, progress, warnings)
and send everything else, libraries' start-up lines and engine chatter included, to the log
file (flows/cli.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

OURS = "catsdogs"
"""Record attribute marking a line the pipeline itself wrote for people."""


class _Marked(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), OURS: True}
        return msg, kwargs


def run_logger(name: str) -> logging.LoggerAdapter:
    """Prefect's run logger when called inside a flow or task run, else `logging.getLogger(name)`; marked as ours."""
    logger: logging.Logger | logging.LoggerAdapter = logging.getLogger(name)
    if "prefect" in sys.modules:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            logger = get_run_logger()
        except MissingContextError:
            pass
    return _Marked(logger, {})
