"""The MLflow store: which one, made ready once, and where its runs are browsed.

The store is `MLFLOW_TRACKING_URI`, by default a sqlite file `mlruns/mlflow.db` in the
working directory with artifacts in folders beside it, so the whole store is one folder that
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` can browse. A tracking server URL
(`http://...`, e.g. `mlflow server` on PostgreSQL for a team) works the same way; the server
then decides where artifacts go.

A new sqlite store is created and migrated by the first client that touches it, and two
processes doing that at once leave it half-migrated for good (`_alembic_tmp_... already
exists`). So the first use in each process takes an exclusive lock beside the database while
it creates or migrates, and a second process waits for it.

What a sqlite store path may hold is checked before any work: a folder where the file should be,
or a store a retrain cannot write (a read-only disk or folder), is one sentence; an empty file
(0 bytes) is said, since it holds no runs, models or champion where some may have been expected.
Readers (batch prediction, `mlflow models serve`) need none of it writable: on a read-only store
they take no lock (nothing can be creating a store there), and an empty one is "no model" to them.

Every function resolves the URI at call time (never at import), so a process that changes
`MLFLOW_TRACKING_URI` (tests, a Prefect worker) is always honoured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tasks.common.databases import check_database
from tasks.common.errors import ConfigError
from tasks.common.flock import exclusive_flock
from tasks.common.logs import run_logger
from tasks.models.naming import DEFAULT_EXPERIMENT

DEFAULT_STORE_DIR = "mlruns"
"""Folder (relative to the working directory) of the default sqlite store and its artifacts."""

DB_NAME = "mlflow.db"

UI_URL_ENV = "MLFLOW_UI_URL"
"""Where people browse a local store (e.g. `mlflow ui` on http://127.0.0.1:5000); used for run links."""

DEFAULT_UI_URL = "http://127.0.0.1:5000"
"""`mlflow ui`'s default address, used for run links when the store is a local file."""

INIT_LOCK_TIMEOUT_S = 300.0

_READY: set[str] = set()
_READY_LOCK = threading.Lock()


def resolve_tracking_uri() -> str:
    """The tracking URI: `MLFLOW_TRACKING_URI` if set, else the sqlite store in ./mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or "sqlite:///" + str((Path.cwd() / DEFAULT_STORE_DIR / DB_NAME).resolve())


def local_store_dir(uri: str) -> Path | None:
    """The folder that holds a local store (sqlite db or file store); None for a server URL.

    `sqlite:///rel/mlflow.db` is relative to the working directory and
    `sqlite:////abs/mlflow.db` is absolute, as SQLAlchemy reads them.
    """
    if uri.startswith("sqlite:///"):
        path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path or path == ":memory:":
            return None
        return Path(path).expanduser().resolve().parent
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" and uri:
        return Path(uri).expanduser().resolve()
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for anything else)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if not path or path == ":memory:" else Path(path).expanduser().resolve()


EMPTY_STORE = ("it is empty (0 bytes): it holds no runs, models or champion, and a retrain starts a new store in "
               "its place; if it held them, restore it from a backup first")


def _is_writable(database: Path) -> bool:
    """Whether a retrain can write the store: the file (when it exists) and its folder (sqlite's journal goes there)."""
    folder = next((parent for parent in (database.parent, *database.parent.parents) if parent.exists()), None)
    return (folder is not None and os.access(folder, os.W_OK | os.X_OK)
            and (not database.exists() or os.access(database, os.W_OK)))


def check_store(uri: str | None = None) -> str:
    """Check a local sqlite store page by page (DamagedDatabase names the file and the repair); what was checked.

    A path that is a folder is a ConfigError; an empty file is said (see EMPTY_STORE), and so is
    a store that cannot be written here. A server store (http://...) is its server's to keep;
    only its URI is returned.
    """
    uri = uri or resolve_tracking_uri()
    database = sqlite_path(uri)
    if database is None:
        return f"MLflow store {uri}: a server, which keeps its own database"
    if database.is_dir():
        raise ConfigError(f"The MLflow store {database} is a folder, not a sqlite file; point MLFLOW_TRACKING_URI at "
                          f"the database file (sqlite:///{database / DB_NAME} for one inside it).")
    if not database.is_file():
        return f"MLflow store {database}: not created yet"
    if database.stat().st_size == 0:
        return f"MLflow store {database}: {EMPTY_STORE}"
    check_database(database, "The MLflow store")
    if not _is_writable(database):
        return f"MLflow store {database}: intact, read-only here (prediction and serving read it; a retrain cannot)"
    return f"MLflow store {database}: intact"


def _refuse_unwritable(database: Path) -> None:
    if not _is_writable(database):
        raise ConfigError(f"The MLflow store {database} is read-only here (a read-only disk or folder), and a retrain "
                          "records its run and model in it; make it writable, or point MLFLOW_TRACKING_URI at a "
                          "store you can write.")


def check_writable_store(uri: str | None = None) -> str:
    """What `check_store` says, for a store a retrain will write: one that cannot be written is a ConfigError too.

    Run before a retrain's work (flows/retrain.py), so a store it cannot record into stops it in
    one sentence instead of after an hour of training (or minutes of retries), and an empty one
    is a warning line before the retrain starts a new store in its place.
    """
    uri = uri or resolve_tracking_uri()
    checked = check_store(uri)
    database = sqlite_path(uri)
    if database is not None:
        _refuse_unwritable(database)
        if checked.endswith(EMPTY_STORE):
            run_logger(__name__).warning("The MLflow store %s: %s.", database, EMPTY_STORE)
    return checked


def check_store_exists(uri: str | None = None) -> None:
    """A reader's store must be there: a local one that is missing or empty is one sentence (and never created).

    Needs no MLflow import, so a command can say it before it starts anything.
    """
    database = sqlite_path(uri or resolve_tracking_uri())
    if database is None or database.is_dir():
        return  # a server keeps its own; a folder is check_store's sentence
    if not database.is_file() or database.stat().st_size == 0:
        state = "does not exist" if not database.is_file() else "is empty (0 bytes)"
        raise ConfigError(f"The MLflow store {database} {state}; run a retrain first (python -m flows.retrain), "
                          "or point MLFLOW_TRACKING_URI at your store.")


def _prepare(uri: str, *, create: bool) -> None:
    """Check, create or migrate a local sqlite store once per process, serialised across processes.

    Writers (`create`) are refused a store they cannot write; readers are refused one that holds
    nothing, and take the creation lock only where it can be taken (no one is creating a
    read-only store).
    """
    with _READY_LOCK:
        if uri in _READY:
            return
        database = sqlite_path(uri)
        if database is not None:
            check_store(uri)  # a damaged store is named before a run relies on it (or trains for nothing)
            if create:
                _refuse_unwritable(database)
            else:
                check_store_exists(uri)
            from mlflow.tracking import MlflowClient

            lock = database.with_name(f".{database.name}.init.lock")
            with exclusive_flock(lock, timeout_s=INIT_LOCK_TIMEOUT_S) if create or _is_writable(lock) \
                    else contextlib.nullcontext():
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates
        _READY.add(uri)


def use_tracking(*, create: bool = True) -> tuple[str, Any]:
    """Point MLflow's fluent API at the resolved URI; return it with a client for it.

    `create=False` is for readers (prediction, serving): a local store that does not exist is
    a ConfigError instead of a new, empty database.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri()
    _prepare(uri, create=create)
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return uri, MlflowClient(tracking_uri=uri)


def _slug(name: str) -> str:
    """A folder-safe form of an experiment name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
    if slug != name:
        slug = f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug


def experiment_artifact_location(uri: str, name: str) -> str | None:
    """Artifact folder for a new experiment: beside the sqlite db, or None to let MLflow decide.

    Without it MLflow's sqlite store puts artifacts under `./mlruns` of whatever directory the
    process runs in, and `mlflow server` defaults to `./mlartifacts`; both scatter one store.
    """
    store_dir = local_store_dir(uri)
    if store_dir is None or not uri.startswith("sqlite:"):
        return None
    return (store_dir / _slug(name)).as_uri()


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
"""The experiment kind the MLflow 3 UI reads: training runs, so it opens on the runs table, not its GenAI views."""


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """The id of experiment `name`, created (artifacts beside the db) or restored when needed.

    Two retrains may create it at the same moment; the loser of that race just reads it.
    """
    from mlflow.exceptions import MlflowException

    uri, client = use_tracking()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=experiment_artifact_location(uri, name),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if (experiment.tags or {}).get(EXPERIMENT_KIND_TAG) is None:  # made by an older version of this project
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return experiment.experiment_id


def experiment_url(experiment_id: str, tracking_uri: str | None = None) -> str:
    """A link to the experiment's runs table in the MLflow UI (see `run_url` for the address)."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"


def run_url(run_id: str, experiment_id: str, tracking_uri: str | None = None) -> str:
    """A link to the run in the MLflow UI.

    A tracking server serves its own UI; a local store is browsed with `mlflow ui`, whose
    address is `MLFLOW_UI_URL` when set, else its default http://127.0.0.1:5000.
    """
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_base(tracking_uri: str | None = None) -> str:
    """The MLflow UI's address: `MLFLOW_UI_URL`, a tracking server's own, else `mlflow ui`'s default."""
    uri = tracking_uri or resolve_tracking_uri()
    base = os.environ.get(UI_URL_ENV) or (uri if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL)
    return base.rstrip("/")
