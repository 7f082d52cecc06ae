"""Which Prefect server this process reports to, and whether other hosts can reach it.

Three cases matter to the pipeline:

- a server someone configured (`PREFECT_API_URL` in the environment, the Prefect profile or
  settings): the team's server, which every host and worker meets;
- the temporary server a command line started for itself (flows/prefect_server.py): it is
  configured as PREFECT_API_URL too, so that Prefect's clients and the command's child
  processes use it, but it listens on 127.0.0.1 and dies with the command, so nothing that
  must hold across hosts (the promotion lock, remote Dask workers) may rely on it;
- none: Prefect's in-process ephemeral mode (flows called from Python).

Prefect is imported only when asked, so the compute and serving modules that import this
floor stay free of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TEMPORARY_API_ENV = "CATSDOGS_TEMPORARY_PREFECT_API"
"""Set, with PREFECT_API_URL, to the URL of a command line's own temporary server."""


@dataclass(frozen=True)
class PrefectApi:
    url: str
    temporary: bool
    """True for a command line's own temporary server (this host only, gone with the command)."""

    @property
    def shared(self) -> bool:
        """Whether other hosts and processes of the team meet at this server."""
        return not self.temporary


def prefect_api() -> PrefectApi | None:
    """The Prefect API this process is configured for, or None in ephemeral mode (or without Prefect)."""
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    try:
        url = get_current_settings().api.url
    except Exception:  # noqa: BLE001 - an unreadable profile means no server was configured
        return None
    if not url:
        return None
    url = str(url)
    return PrefectApi(url=url, temporary=os.environ.get(TEMPORARY_API_ENV) == url)
