"""The promotion lock: one champion decision at a time per registered model, on every host.

The champion is re-read and the alias moved under this lock, so two retrains finishing at
once cannot both promote. The lock must live where every retrain meets:

- With a Prefect server configured (PREFECT_API_URL, from the environment or the profile;
  not a command line's own temporary server, see tasks/common/prefect_api.py),
  a Prefect global concurrency limit of one slot, `catsdogs-promotion-<model>`, on that
  server. Every worker of every host talks to it. It is created idempotently on first use,
  taken with `strict=True` (a limit that cannot be created is an error, never a silent
  "no limit"), and held under a lease the holder renews: a retrain killed mid-promotion
  gives its slot back when the lease runs out (LEASE_S, plus the server's sweep) instead of
  blocking promotions for good. The name has no tracking URI in it, because two hosts may
  spell the same MLflow server differently.
- Without one (the single-host default: ephemeral Prefect), a `flock` beside a local store,
  or in the temp folder for a server store. The kernel drops it when its holder dies. It
  serialises the processes of one host only, which is all a local store ever has.

A local (sqlite) store always takes the file lock too, inside the server's limit: sqlite
wants one writer at a time even when the Prefect server already serialises promotions, and
the file is what a retrain without a Prefect server on the same host meets.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.models.naming import MODEL_NAME
from tasks.common.flock import LockTimeout, exclusive_flock
from tasks.common.prefect_api import prefect_api
from tasks.models.store import local_store_dir

LOCK_TIMEOUT_S = 900.0
"""How long a promotion waits for another one to finish before giving up."""

LEASE_S = 60.0
"""Lease of the Prefect slot, renewed while held; a dead holder's slot is free this long after it died.

60 s is the shortest lease the Prefect server accepts for a concurrency slot.
"""

LIMIT_PREFIX = "catsdogs-promotion-"


def lock_path(tracking_uri: str, model_name: str = MODEL_NAME) -> Path:
    """The promotion lock file: beside a local store, else per store in the temp folder."""
    store_dir = local_store_dir(tracking_uri)
    if store_dir is not None:
        return store_dir / f".{model_name}.promotion.lock"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"catsdogs-{model_name}-{digest}.promotion.lock"


def limit_name(model_name: str = MODEL_NAME) -> str:
    """The Prefect global concurrency limit that serialises promotions of `model_name`."""
    return f"{LIMIT_PREFIX}{model_name}"


def ensure_limit(name: str) -> None:
    """Create the one-slot limit `name` on the Prefect server, or leave it (set to one slot) if it exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:
            pass  # another host created it between our read and our create


@contextlib.contextmanager
def server_lock(name: str, timeout_s: float) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit `name` (TimeoutError after `timeout_s`)."""
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S, strict=True):
            yield
    except TimeoutError as error:
        if "another promotion" in str(error):
            raise
        raise TimeoutError(f"another promotion holds the Prefect concurrency limit {name!r} for over "
                           f"{timeout_s:g} s; check for a hung retrain in the Prefect UI (Concurrency).") from error


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, model_name: str = MODEL_NAME,
                   timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the exclusive promotion lock of `model_name`; yields what was locked, in words.

    The Prefect server's global concurrency limit where one is configured, else the file lock
    (see the module docstring), and the file lock as well for a local store.
    """
    api = prefect_api()
    server = api.url if api is not None and api.shared else None
    local = local_store_dir(tracking_uri) is not None
    with contextlib.ExitStack() as held:
        what = []
        if server:
            held.enter_context(server_lock(limit_name(model_name), timeout_s))
            what.append(f"Prefect concurrency limit {limit_name(model_name)!r} on {server}")
        if local or not server:
            path = lock_path(tracking_uri, model_name)
            try:
                held.enter_context(exclusive_flock(path, timeout_s=timeout_s))
            except LockTimeout:
                raise TimeoutError(f"another promotion holds {path} for over {timeout_s:g} s; "
                                   "check for a hung retrain") from None
            what.append(f"file lock {path}")
        yield " and ".join(what)
