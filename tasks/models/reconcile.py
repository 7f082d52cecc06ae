"""What a killed retrain left behind, set straight by the next one.

A retrain killed with `kill -9` (or by the OOM killer, a reboot, a closed laptop) cannot clean
up after itself. It can leave an MLflow run stuck RUNNING, a logged model stuck PENDING with no
artifacts, a registered version with no gate verdict, a Prefect flow run stuck RUNNING, and
half-written folders in the data folder. Each next retrain starts by reconciling them:

- MLflow runs of the experiment that are RUNNING while the process that owns them is provably
  dead become FAILED, with the reason as the tag `catsdogs.reconciled` and on the run's note.
  Every run records its owner (host, pid, process start time, boot id; tasks/common/processes.py)
  when it starts, which is what makes death provable; a run without that record, or owned by a
  process on another host, is left alone and counted as unprovable.
- Logged models still PENDING whose run's owner is dead become FAILED, with the same tag.
- Registered versions without a gate verdict whose run's owner is dead are labelled: a
  version that already holds an alias gets the verdict the alias shows (the gate decided and
  moved the alias, only its record was cut off); any other gets `gate.decision=incomplete`,
  which the "nothing changed" check ignores, so the data is trained and gated again.
- Prefect flow runs of the project's flows that are RUNNING while their owner (recorded as
  flow-run labels by `tasks.common.processes.label_flow_run_owner`, an `on_running` hook of
  each of these flows) is dead become CRASHED, their subflow runs with them.
- Hidden `.partial`/temporary folders and files in the data folder are removed: the caller
  holds the data folder's lock, so no live run can be writing them (DataFolder.remove_leftovers).

Nothing here guesses: what cannot be proven dead stays as it is, and the summary says how many.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.common.processes import ProcessId
from tasks.models.naming import DEFAULT_EXPERIMENT, MODEL_NAME
from tasks.models.registry import GATE_DECISION_TAG, search_versions

RECONCILED_TAG = "catsdogs.reconciled"
"""Tag (run, logged model, version) holding the sentence that says why a record was set straight."""

INCOMPLETE = "incomplete"
"""`gate.decision` of a version whose retrain died before the gate decided."""

FLOW_NAMES: tuple[str, ...] = ("retrain", "prepare-data", "train_model")
"""Prefect flows whose stuck runs are reconciled (subflows of a crashed retrain go with it)."""


class Reconciled(BaseModel):
    """What the reconciliation changed, and how many stuck records it could not judge."""

    failed_runs: list[str] = Field(default_factory=list, description="MLflow runs set FAILED")
    failed_models: list[str] = Field(default_factory=list, description="logged models set FAILED")
    labelled_versions: list[str] = Field(default_factory=list, description="registered versions given a verdict")
    crashed_flow_runs: list[str] = Field(default_factory=list, description="Prefect flow runs set CRASHED")
    removed: list[str] = Field(default_factory=list, description="leftovers removed from the data folder")
    unprovable: int = Field(default=0, description="stuck records whose owner may still run (or runs elsewhere)")

    def merged(self, other: Reconciled) -> Reconciled:
        return Reconciled(failed_runs=self.failed_runs + other.failed_runs,
                          failed_models=self.failed_models + other.failed_models,
                          labelled_versions=self.labelled_versions + other.labelled_versions,
                          crashed_flow_runs=self.crashed_flow_runs + other.crashed_flow_runs,
                          removed=self.removed + other.removed, unprovable=self.unprovable + other.unprovable)

    @property
    def summary(self) -> str:
        """One line for the retrain log."""
        parts = []
        for items, what in ((self.failed_runs, "stuck MLflow run(s) marked FAILED"),
                            (self.failed_models, "pending logged model(s) marked FAILED"),
                            (self.labelled_versions, "half-registered version(s) labelled"),
                            (self.crashed_flow_runs, "stuck Prefect flow run(s) marked CRASHED"),
                            (self.removed, "leftover(s) of killed runs removed from the data folder")):
            if items:
                shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
                parts.append(f"{len(items)} {what} ({shown})")
        if self.unprovable:
            parts.append(f"{self.unprovable} stuck record(s) left alone: their process may still run "
                         "or ran on another host")
        return "; ".join(parts) if parts else "nothing left behind by killed runs"


def _reason(death: str) -> str:
    return (f"set straight by the retrain of pid {ProcessId.current().pid} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {death}, so this record could never finish")


def _death(tags: dict[str, Any] | None) -> str | None:
    """Why the owner recorded in `tags` is provably dead, or None (alive, elsewhere, or not recorded)."""
    owner = ProcessId.from_labels(tags)
    return None if owner is None else owner.death()


# --------------------------------------------------------------------------- MLflow


def _fail_run(client: Any, run: Any, reason: str) -> None:
    note = run.data.tags.get("mlflow.note.content", "")
    client.set_tag(run.info.run_id, RECONCILED_TAG, reason[:5000])
    client.set_tag(run.info.run_id, "mlflow.note.content", f"{note}\n\n**FAILED**: {reason}".strip())
    client.set_terminated(run.info.run_id, "FAILED")


def _all_runs(client: Any, experiment_id: str, filter_string: str) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _pending_models(client: Any, experiment_id: str, pending: Any) -> Iterable[Any]:
    """Logged models of the experiment still PENDING (filtered here: the sqlite store's
    `status = 'PENDING'` filter matches nothing in MLflow 3.17)."""
    token = None
    while True:
        page = client.search_logged_models([experiment_id], max_results=100, page_token=token)
        yield from (model for model in page if model.status == pending)
        token = page.token
        if not token:
            return


def reconcile_mlflow(experiment: str = DEFAULT_EXPERIMENT, model_name: str = MODEL_NAME) -> Reconciled:
    """Fail stuck runs and pending models of dead owners; give half-registered versions a verdict."""
    from mlflow.entities import LoggedModelStatus

    from tasks.models.store import resolve_tracking_uri, sqlite_path, use_tracking

    database = sqlite_path(resolve_tracking_uri())
    if database is not None and not database.is_file():
        return Reconciled()  # no store yet, so nothing in it to set straight (and none is created here)
    _, client = use_tracking()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return Reconciled()
    experiment_id = found.experiment_id
    result = Reconciled()
    deaths: dict[str, str | None] = {}

    me = ProcessId.current()
    for run in _all_runs(client, experiment_id, "attributes.status = 'RUNNING'"):
        if ProcessId.from_labels(run.data.tags) == me:
            continue  # a run this process writes right now
        death = _death(run.data.tags)
        deaths[run.info.run_id] = death
        if death is None:
            result.unprovable += 1
            continue
        _fail_run(client, run, _reason(death))
        result.failed_runs.append(run.info.run_id)

    def run_death(run_id: str | None) -> str | None:
        if not run_id:
            return None
        if run_id not in deaths:
            try:
                deaths[run_id] = _death(client.get_run(run_id).data.tags)
            except Exception:  # noqa: BLE001 - a deleted run proves nothing
                deaths[run_id] = None
        return deaths[run_id]

    for model in _pending_models(client, experiment_id, LoggedModelStatus.PENDING):
        death = run_death(model.source_run_id)
        if death is None:
            result.unprovable += 1
            continue
        client.set_logged_model_tags(model.model_id, {RECONCILED_TAG: _reason(death)[:5000]})
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        result.failed_models.append(model.model_id)

    versions = search_versions(client, f"name='{model_name}'")
    unjudged = [version for version in versions if not (version.tags or {}).get(GATE_DECISION_TAG)]
    if unjudged:
        aliases = {str(version): alias for alias, version in (client.get_registered_model(model_name).aliases or {}).items()}
        for version in unjudged:
            death = run_death(version.run_id)
            if death is None:
                result.unprovable += 1
                continue
            number = str(version.version)
            reason = _reason(death)
            alias = aliases.get(number)
            if alias:
                decision, sentence = alias, (f"the gate moved alias {alias} here, but its retrain died before "
                                             "recording why")
            else:
                decision, sentence = INCOMPLETE, ("its retrain died before the gate decided; it never "
                                                  "became champion or challenger")
            client.set_model_version_tag(model_name, number, GATE_DECISION_TAG, decision)
            client.set_model_version_tag(model_name, number, "gate.reason", sentence[:500])
            client.set_model_version_tag(model_name, number, RECONCILED_TAG, reason[:5000])
            result.labelled_versions.append(f"{number} ({decision})")
    return result


# --------------------------------------------------------------------------- Prefect


def reconcile_prefect(flow_names: tuple[str, ...] = FLOW_NAMES) -> Reconciled:
    """Mark RUNNING flow runs of `flow_names` whose owner is dead CRASHED, and their RUNNING subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    result = Reconciled()
    with get_client(sync_client=True) as client:
        stuck = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(flow_names))),
                                      flow_run_filter=FlowRunFilter(state=running), limit=200)
        crashed: set[str] = set()
        me = ProcessId.current()
        for run in stuck:
            if str(run.id) in crashed:
                continue
            owner = ProcessId.from_labels(dict(run.labels or {}))
            if owner == me:
                continue  # this very run (and its subflows)
            death = owner.death() if owner else None
            if death is None:
                result.unprovable += 1
                continue
            message = f"Crashed: {_reason(death)}."
            family = [run]
            while family:
                member = family.pop()
                if str(member.id) in crashed:
                    continue
                client.set_flow_run_state(member.id, Crashed(message=message), force=True)
                crashed.add(str(member.id))
                result.crashed_flow_runs.append(f"{member.name} ({member.id})")
                family += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[member.id]), state=running))
    return result


# --------------------------------------------------------------------------- everything


def reconcile(data_dir: str | Path, experiment: str = DEFAULT_EXPERIMENT, model_name: str = MODEL_NAME, *,
              prefect: bool = True) -> Reconciled:
    """Set straight what killed runs left in the data folder (its lock must be held), the store and Prefect."""
    from tasks.data.datafolder import DataFolder

    result = Reconciled(removed=DataFolder.at(data_dir).remove_leftovers())
    result = result.merged(reconcile_mlflow(experiment, model_name))
    if prefect:
        result = result.merged(reconcile_prefect())
    return result
