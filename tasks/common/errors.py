"""Errors a person can act on, and the retry rule that follows from them.

An input error is deterministic: retrying cannot help, so Prefect tasks never retry it.
Its message is one sentence that names the file and the fix.
"""

from __future__ import annotations

import errno
from typing import Any


class InputError(Exception):
    """Bad input that a person must fix (a missing file, a hostile archive, a failed check)."""


class AcquireError(InputError):
    """The source could not be found, downloaded or verified."""


class UnsafeArchiveError(InputError):
    """The archive holds members that could escape the extraction folder or exhaust the disk."""


class LayoutError(InputError):
    """The extracted files are in no layout the pipeline recognises."""


class DatasetValidationError(InputError):
    """Dataset-level expectations failed; nothing downstream may run."""


class ConfigError(InputError):
    """A configuration value (backbone name, weights file, model alias) is not usable."""


class DiskFullError(InputError):
    """A disk the run writes to has no room left: a person frees space or points the run at another disk."""


class UnreachableError(OSError):
    """Something the run needs over the network stayed unreachable through every attempt.

    It is raised where the attempts were made, once they are spent (its sentence says how many),
    so tasks do not retry it again: a person must act, and the command line reports its sentence
    as it reports bad input.
    """


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures (network, I/O), never InputError, a full disk,
    nor an UnreachableError (its own attempts are spent)."""
    try:
        state.result()
    except (InputError, UnreachableError):
        return False
    except Exception as error:
        return not is_disk_full(error)
    return True


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""No space left on the device, or the user's quota on it is spent: waiting a few seconds frees nothing."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a write that met a full disk."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class ClassesDiffer(InputError):
    """A model answers other classes than the data it is asked to be scored on: its numbers there mean nothing."""
