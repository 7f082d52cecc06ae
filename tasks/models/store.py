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

Every function resolves the URI at call time (never at import), so a process that changes
`MLFLOW_TRACKING_URI` (tests, a Prefect worker) is always honoured.
"""

from __future__ import annotations

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


def check_store(uri: str | None = None) -> str:
    """Check a local sqlite store page by page (DamagedDatabase names the file and the repair); what was checked.

    A server store (http://...) is its server's to keep; only its URI is returned.
    """
    uri = uri or resolve_tracking_uri()
    database = sqlite_path(uri)
    if database is None:
        return f"MLflow store {uri}: a server, which keeps its own database"
    if not database.is_file():
        return f"MLflow store {database}: not created yet"
    check_database(database, "The MLflow store")
    return f"MLflow store {database}: intact"


def check_store_exists(uri: str | None = None) -> None:
    """A reader's store must be there: a local one that is not is one sentence (and never created), before any work.

    Needs no MLflow import, so a command can say it before it starts anything.
    """
    database = sqlite_path(uri or resolve_tracking_uri())
    if database is not None and not database.is_file():
        raise ConfigError(f"The MLflow store {database} does not exist; run a retrain first "
                          "(python -m flows.retrain), or point MLFLOW_TRACKING_URI at your store.")


def _prepare(uri: str, *, create: bool) -> None:
    """Check, create or migrate a local sqlite store once per process, serialised across processes."""
    with _READY_LOCK:
        if uri in _READY:
            return
        database = sqlite_path(uri)
        if database is not None:
            if not create:
                check_store_exists(uri)
            check_store(uri)  # a damaged store is named before a run relies on it (or trains for nothing)
            from mlflow.tracking import MlflowClient

            with exclusive_flock(database.with_name(f".{database.name}.init.lock"), timeout_s=INIT_LOCK_TIMEOUT_S):
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
