"""Local sqlite databases the pipeline relies on, checked before they are trusted.

The default MLflow store (`mlruns/mlflow.db`) and Prefect's database (`prefect.db` under
PREFECT_HOME, behind a command's temporary server) are single sqlite files. A disk fault or a
copy taken mid-write can damage one; sqlite then answers the pages it can still read and fails
on the others, so a run could report "nothing changed" from a broken store, or train for an
hour and fail to register the model. `PRAGMA integrity_check` reads every page and index (a
fraction of a second for these small files), so a damaged database is named, with its repair,
before any work starts.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from tasks.common.errors import ConfigError


class DamagedDatabase(ConfigError):
    """A sqlite database failed its integrity check; the message names the file and the repair."""


def integrity_problem(path: Path) -> str | None:
    """What `PRAGMA integrity_check` finds wrong with the sqlite file at `path` (None: intact or absent)."""
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as error:  # "file is not a database", "database disk image is malformed"
        return " ".join(str(error).split())
    problems = [" ".join(str(row[0]).split()) for row in rows if str(row[0]) != "ok"]  # one line, for one sentence
    return "; ".join(problems[:2]) if problems else None


def check_database(path: Path, what: str, *, disposable: bool = False) -> None:
    """Raise DamagedDatabase with the repair when the sqlite file `path` (`what` it is, in words) is damaged.

    `disposable`: the file only holds history that may be started afresh (Prefect's database
    of a command's temporary server), so moving it aside is offered first.
    """
    problem = integrity_problem(path)
    if problem is None:
        return
    salvage = f"sqlite3 {path} .recover | sqlite3 {path.with_name(path.stem + '.recovered' + path.suffix)}"
    if disposable:
        fix = (f"move it aside (mv {path} {path}.damaged) and the next run starts a new one, or salvage it with "
               f"`{salvage}`")
    else:
        fix = (f"restore it from a backup, or salvage what sqlite can still read with `{salvage}` and use the "
               "recovered file in its place")
    raise DamagedDatabase(f"{what} {path} is damaged (sqlite integrity check: {problem[:160]}); {fix}.")
