"""The promotion lock: one champion decision at a time per registered model.

The champion is re-read and the alias moved under this lock, so two retrains finishing at
once cannot both promote. For a local store the lock is a `flock` beside the database (the
kernel drops it when its holder dies, so a killed retrain never blocks the next one).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.models.naming import MODEL_NAME
from tasks.models.store import file_lock, local_store_dir

LOCK_TIMEOUT_S = 900.0
"""How long a promotion waits for another one to finish before giving up."""


def lock_path(tracking_uri: str, model_name: str = MODEL_NAME) -> Path:
    """The promotion lock file: beside a local store, else per store in the temp folder."""
    store_dir = local_store_dir(tracking_uri)
    if store_dir is not None:
        return store_dir / f".{model_name}.promotion.lock"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"catsdogs-{model_name}-{digest}.promotion.lock"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model_name: str = MODEL_NAME,
                   timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the exclusive promotion lock of `model_name` in the store at `tracking_uri`."""
    path = lock_path(tracking_uri, model_name)
    with file_lock(path, timeout_s, "promotion"):
        yield path
