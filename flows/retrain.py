"""The `retrain` flow: the product's main job, from a data source to a gated champion.

    hold the data folder (a second run waits) -> check weights files, the image decoder and
    the MLflow store (a folder, damaged or read-only: one sentence) -> set straight what killed runs left -> prepare the data (subflow prepare_data)
    -> a registered version built from this data and config? record "nothing changed", stop
       (unless force)
    -> open the MLflow run, train (subflow train_model, which audits the data on each backbone's features
       first), log it into the run
    -> score the candidate on the test split without its leaked images (near-copies of training
       images), register it, move `champion` only through the gate (the champion is scored on
       the same images)
    -> the version's HTML report (in the run folder, logged to the run, linked from the version)
    -> leave a markdown summary artifact in Prefect

It runs the same way from the command line (`python -m flows.retrain`, or the
`catsdogs-retrain` script), from Python (`retrain(RetrainConfig(...))`), and as the Prefect
deployment `retrain/weekly` (deployments/prefect.yaml, which holds its schedule). The one
parameter is a pydantic model, so the Prefect UI renders it as a form and the command line is
generated from it (flows/cli.py).
"""

# No `from __future__ import annotations` here: `flow.serve` pickles the flow function by value
# into each run's process, and Prefect validates the `config` parameter from the function's
# annotations, which must then be the RetrainConfig class itself, not the string "RetrainConfig".
import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from prefect import flow
from prefect.runtime import flow_run

from flows.config import ComputeConfig, DataConfig, QualityConfig, RetrainConfig, TrainConfig
from flows.prepare import prepare_data
from flows.runners import on_compute, workers_reach_the_api
from flows.train import train_model
from tasks.common.logs import run_logger
from tasks.common.processes import label_flow_run_owner
from tasks.common.results import RetrainSummary
from tasks.data.datafolder import DataFolder
from tasks.learning import steps as learning
from tasks.models import steps as models
from tasks.models.gate import check_metric
from tasks.models.report import unchanged_reason

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
"""The deployment file: the one place the weekly schedule is declared."""

UNCHANGED = "unchanged"
TRAINED = "trained"


@flow(name="retrain", on_running=[label_flow_run_owner])
def retrain(config: RetrainConfig = RetrainConfig()) -> RetrainSummary:
    """Prepare, skip if nothing changed, train, log, register and gate; returns the run summary."""
    folder = DataFolder.at(config.data_dir)
    with folder.lock("retrain"):  # a second run of this folder waits here, saying for whom
        return _retrain(config, str(folder.root))


def _retrain(config: RetrainConfig, data_dir: str) -> RetrainSummary:
    logger = run_logger(__name__)
    config_hash = config.config_hash()
    for backbone in config.backbones:
        learning.check_weights(backbone, config.weights)
    learning.check_decoder(config.decoder)
    models.check_store()
    logger.info("Reconcile: %s", models.reconcile(data_dir, config.experiment, config.model_name).summary)

    prepared = prepare_data(config.section(DataConfig).model_copy(update={"data_dir": data_dir}))
    check_metric(config.metric, prepared.classes)  # e.g. f1_dog on daisies: one sentence, before any training
    built = models.versions_built_from(prepared.fingerprint, config_hash, config.model_name)
    champion = models.read_champion(config.model_name)
    flow_run_id = str(flow_run.id) if flow_run.id else None

    reason = None if config.force else unchanged_reason(prepared.fingerprint, config_hash, built)
    if reason:
        logger.info("Training skipped: %s", reason)
        skipped = models.record_unchanged(reason, prepared.fingerprint, config_hash, config.experiment)
        stays = f"champion version {champion.version} stays" if champion else "no version is champion"
        summary = RetrainSummary(status=UNCHANGED, headline=f"nothing changed, {stays}", flow_run_id=flow_run_id,
                                 config_hash=config_hash, data=prepared, champion_before=champion, mlflow=skipped,
                                 reason=reason)
        models.publish_summary(summary)
        return summary

    compute = config.section(ComputeConfig)  # where shards are computed: in-process by default, else Dask
    with models.training_run(prepared.fingerprint, config_hash, config.experiment) as run:  # spans the work
        with workers_reach_the_api(compute):
            trained = on_compute(train_model, compute)(data_dir, config.section(TrainConfig), compute,
                                                       config.section(QualityConfig))
        logged = models.log_to_mlflow(run, prepared, trained, config.model_dump(mode="json"), config.source,
                                      config.model_name)
    leaked = trained.quality.report if trained.quality else None  # the audit's leaked test images: left out
    candidate = models.score_on_test_split(logged.model_uri, data_dir, leaked)
    decision = models.register_and_gate(logged.run_id, logged.model_uri, candidate, data_dir,
                                        config.floor, config.margin, config.metric, config.model_name, leaked)
    verdict = "promoted to champion" if decision.promoted else f"kept as {decision.alias}"
    logger.info("Version %s %s: %s", decision.version, verdict, "; ".join(decision.reasons))
    report = models.publish_report(prepared, trained, candidate, decision, logged, config.source, return_state=True)
    report_path, report_url = models.report_or_warning(report, decision)  # the version stands without its report
    summary = RetrainSummary(status=TRAINED, headline=f"version {decision.version} {verdict}",
                             flow_run_id=flow_run_id, config_hash=config_hash, data=prepared,
                             champion_before=champion, mlflow=logged, chosen_backbone=trained.chosen_backbone,
                             test_metrics=candidate, decision=decision, model_path=trained.model_path,
                             devices=trained.devices, int8_check=trained.first_member.int8_check,
                             report_path=report_path, report_url=report_url, quality=trained.quality)
    models.publish_summary(summary)
    return summary


# --------------------------------------------------------------------------- command line


def weekly_schedule(prefect_yaml: Path = PREFECT_YAML) -> dict[str, Any]:
    """The `retrain/weekly` schedule as deployments/prefect.yaml declares it (cron and timezone)."""
    import yaml

    spec = yaml.safe_load(prefect_yaml.read_text())
    [weekly] = [deployment for deployment in spec["deployments"] if deployment["name"] == "weekly"]
    [schedule] = weekly["schedules"]
    return {"cron": schedule["cron"], "timezone": schedule.get("timezone", "UTC")}


def serve_weekly(config: RetrainConfig) -> NoReturn:
    """Serve `retrain/weekly` from this process (no work pool, no worker) until Ctrl-C, which raises KeyboardInterrupt.

    Prefect's Runner polls for the deployment's runs and starts each in a child process, whose
    pipeline lines reach the terminal like a command's own (flows/console.py). Its runs need this
    process: stopped, the deployment is paused (Prefect's default) and runs nowhere until it is
    served or deployed to the work pool again, which the terminal says at the start.
    """
    from prefect.schedules import Cron

    from flows.console import child_runs_console

    schedule = weekly_schedule()
    logger = run_logger(__name__)
    logger.info("Serving retrain/weekly from this process, without a work pool: its runs (cron %s %s, or `prefect "
                "deployment run 'retrain/weekly'`) start here; Ctrl-C stops serving and pauses it.",
                schedule["cron"], schedule["timezone"])
    for notice in _serving_notices():
        logger.warning("%s", notice)
    with child_runs_console():
        retrain.serve(name="weekly", schedule=Cron(schedule["cron"], timezone=schedule["timezone"]),
                      parameters={"config": config.model_dump(mode="json")}, tags=["catsdogs", "retrain"],
                      print_starting_message=False)
    raise KeyboardInterrupt  # serve returns only once interrupted (Ctrl-C or SIGTERM): the command ends with 130


def _serving_notices() -> list[str]:
    """What serving from here changes: a deployment of the work pool taken over, or a server that goes with us."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tasks.common.prefect_api import prefect_api

    api = prefect_api()
    if api is None or api.temporary:
        return ["No PREFECT_API_URL: the Prefect server is this command's own and stops with it, so only the "
                "schedule starts runs; start a server and set PREFECT_API_URL to run it from elsewhere (README)."]
    with get_client(sync_client=True) as client:
        try:
            deployed = client.read_deployment_by_name("retrain/weekly")
        except ObjectNotFound:
            return []
    if deployed.work_pool_name:
        return [f"retrain/weekly was deployed to work pool {deployed.work_pool_name!r}; serving takes it over until "
                "you deploy again (prefect deploy --prefect-file deployments/prefect.yaml --all)."]
    return []


def _own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of markdown")
    parser.add_argument("--serve", action="store_true",
                        help="instead of one run, serve the deployment retrain/weekly (its schedule is "
                             "deployments/prefect.yaml's) with these options as its parameters")
    parser.add_argument("--store-check", action="store_true",
                        help="instead of a run, check the MLflow store and Prefect's local database page by "
                             "page and say which is damaged and how to repair it (every run checks them too)")


def build_parser() -> argparse.ArgumentParser:
    from flows.options import build_parser as generated
    from flows.options import program_name

    return generated(RetrainConfig, program_name("flows.retrain", "catsdogs-retrain"),
                     "Prepare the images (Dogs vs. Cats by default, or your own classes: one folder per class, "
                     "with a --model-name of their own), train, log to MLflow and promote a champion through the "
                     "gate.",
                     _own_options)


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    """A RetrainConfig from the options that were given; the others keep their defaults."""
    from flows.options import model_from_args

    return model_from_args(RetrainConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.retrain` / `catsdogs-retrain`: one retrain, summary on stdout.

    Exit codes: 0 done (trained or nothing changed), 2 bad input (one sentence on stderr).
    """
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import parse
    from tasks.models.report import summary_markdown

    parsed = parse(RetrainConfig, build_parser(), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        if args.store_check:
            from flows.prefect_server import check_local_database
            from tasks.common.prefect_api import prefect_api
            from tasks.models.store import check_store

            api = prefect_api()
            print(check_store())
            print(check_local_database() if api is None or api.temporary else
                  f"Prefect server {api.url}: keeps its own database")
            return 0
        if args.serve:
            serve_weekly(config)
        summary = retrain(config)
        print(json.dumps(summary.model_dump(mode="json"), indent=2) if args.json else summary_markdown(summary))
        return 0

    def preflight() -> None:
        from tasks.data.acquire import check_source

        check_source(config.source)

    return run_main(work, log_path=log_path_for(config.data_dir, "retrain"), verbose=args.verbose,
                    preflight=None if args.store_check else preflight)


if __name__ == "__main__":
    # Run the importable module's main, not this `__main__` copy: a served flow is pickled
    # into its run process, and only functions of a real module travel by reference.
    from flows.retrain import main as _main

    sys.exit(_main())
