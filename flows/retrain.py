"""The `retrain` flow: the product's main job, from a data source to a gated champion.

    prepare the data (subflow prepare_data)
    -> read the champion; same dataset fingerprint and config hash? record "nothing changed", stop
       (unless force)
    -> train (subflow train_model)
    -> log the run to MLflow
    -> score the candidate on the test split, register it, move `champion` only through the gate
    -> leave a markdown summary artifact in Prefect

It runs the same way from the command line (`python -m flows.retrain --source ...`, or the
`catsdogs-retrain` script), from Python (`retrain(RetrainConfig(...))`), and as the Prefect
deployment `retrain/weekly` (deployments/prefect.yaml). The one parameter is a pydantic model,
so the Prefect UI renders it as a form.

Tasks here are thin wrappers over tasks/tracking.py and tasks/registry.py: they name a step and
retry I/O (the tracking store, the Prefect API), never bad input.
"""

# No `from __future__ import annotations` here: `flow.serve` pickles the flow function by value
# into each run's process, and Prefect validates the `config` parameter from the function's
# annotations, which must then be the RetrainConfig class itself, not the string "RetrainConfig".
import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field, ValidationError

from flows.config import TrainConfig
from flows.prepare import prepare_data
from flows.train import train_model
from tasks.arrange import DEFAULT_FRACTIONS
from tasks.errors import InputError, retry_unless_input_error
from tasks.registry import MODEL_NAME, champion_summary, evaluate_model_uri, register_and_gate
from tasks.tracking import DEFAULT_EXPERIMENT, log_retrain, log_skipped_run
from tasks.validate import ValidationThresholds

WEEKLY_CRON = "0 3 * * 1"
"""Monday 03:00 UTC: the schedule of `retrain/weekly` (deployments/prefect.yaml and --serve)."""

SUMMARY_ARTIFACT_KEY = "retrain-summary"
"""Prefect artifact key: every run adds a version, so the UI shows the history under one key."""

UNCHANGED = "unchanged"
TRAINED = "trained"

_IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_input_error,
               "cache_policy": NO_CACHE}
"""Retry policy of tasks that talk to a store or server: transient failures only, never cached."""


class RetrainConfig(TrainConfig):
    """Everything a retrain needs: where the data comes from, how to train, when to promote.

    The TrainConfig fields decide the model (they make up `config_hash()`); the fields added
    here decide where the data comes from and whether a model ships, so changing them never
    counts as "the config changed".
    """

    source: str = Field(
        default="petimages",
        description='"petimages", "kaggle", an https:// URL, a local .zip/.tar(.gz) archive or a folder.',
    )
    expected_sha256: str | None = Field(default=None, description="Pin the source archive's sha256 (else trust on first use).")
    data_dir: str = Field(default="data", description="Data folder (relative paths resolve against the working directory).")
    split_fractions: tuple[float, float, float] = Field(
        default=DEFAULT_FRACTIONS, description="Train/validation/test shares of the content-hash split.")
    thresholds: ValidationThresholds = Field(
        default_factory=ValidationThresholds,
        description="Dataset-level checks before training; the defaults suit the full 25,000-image dataset.")
    output_dir: str | None = Field(default=None, description="Training outputs; null = <data_dir>/training/<time>-<config hash>.")
    metric: Literal["roc_auc", "accuracy", "f1_cat", "f1_dog"] = Field(
        default="roc_auc", description="Test metric of the promotion gate (higher is better).")
    floor: float = Field(default=0.90, ge=0.0, le=1.0,
                         description="A model whose test metric is below this never becomes champion.")
    margin: float = Field(default=0.002, ge=0.0, le=1.0,
                          description="How much a candidate must beat the champion by, on the same test split.")
    force: bool = Field(default=False, description="Train even when data and config equal the champion's.")
    experiment: str = Field(default=DEFAULT_EXPERIMENT, min_length=1, description="MLflow experiment name.")

    def train_config(self) -> TrainConfig:
        """The TrainConfig part, for the train_model subflow (its parameter forbids extra keys)."""
        return TrainConfig.model_validate(self.training_fields())


# --------------------------------------------------------------------------- plain functions


def unchanged_reason(fingerprint: str, config_hash: str, champion: Mapping[str, Any] | None) -> str | None:
    """Why training can be skipped, or None: the champion was built from this very data and config."""
    if not champion or not fingerprint:
        return None
    if champion.get("dataset_fingerprint") == fingerprint and champion.get("config_hash") == config_hash:
        return (f"nothing changed: dataset fingerprint {fingerprint[:12]} and config hash {config_hash[:12]} "
                f"equal those of champion version {champion.get('version')}")
    return None


def _number(value: Any) -> str:
    """A metric for a table cell: 4 decimals, or a dash when missing."""
    if isinstance(value, bool) or value is None:
        return "–"
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The run summary people read in the Prefect UI (and on the console): data, metrics, decision, links."""
    data = summary.get("data") or {}
    mlflow_run = summary.get("mlflow") or {}
    lines = [f"# Retrain: {summary.get('headline', summary.get('status'))}", ""]
    lines += [f"- Dataset fingerprint: `{str(data.get('fingerprint', ''))[:16]}`",
              f"- Config hash: `{str(summary.get('config_hash', ''))[:16]}`",
              f"- Data folder: `{data.get('data_dir', '')}`"]
    if summary.get("chosen_backbone"):
        lines.append(f"- Chosen backbone: **{summary['chosen_backbone']}**")
    counts = data.get("counts") or {}
    if counts:
        lines += ["", "## Data", "", "| split | cat | dog |", "|---|---:|---:|"]
        lines += [f"| {split} | {c.get('cat', 0)} | {c.get('dog', 0)} |" for split, c in counts.items()]
        lines.append(f"\nQuarantined files: {data.get('quarantined', 0)}")
    metrics = summary.get("test_metrics") or {}
    if metrics:
        champion = (summary.get("champion_before") or {}).get("metrics") or {}
        lines += ["", "## Test metrics", "", "| metric | this run | champion, as registered |", "|---|---:|---:|"]
        for name in ("roc_auc", "accuracy", "log_loss", "f1_cat", "f1_dog"):
            if name in metrics:
                lines.append(f"| {name} | {_number(metrics.get(name))} | {_number(champion.get(name))} |")
    decision = summary.get("decision")
    if decision:
        verdict = "promoted to **champion**" if decision.get("promoted") else f"kept as **{decision.get('alias')}**"
        lines += ["", "## Promotion decision", "",
                  f"Version {decision.get('version')} of `{MODEL_NAME}`: {verdict} "
                  f"({decision.get('metric')}: this run {_number(decision.get('candidate_value'))}, "
                  f"champion {_number(decision.get('champion_value'))})."]
        lines += [f"- {reason}" for reason in decision.get("reasons") or []]
    elif summary.get("reason"):
        lines += ["", "## Decision", "", f"Training skipped: {summary['reason']}.",
                  "Run with `force: true` (CLI `--force`) to train anyway."]
    if mlflow_run:
        lines += ["", "## Links", "", f"- MLflow run: [{mlflow_run.get('run_id')}]({mlflow_run.get('run_url')})",
                  f"- Tracking URI: `{mlflow_run.get('tracking_uri')}`"]
        if decision:
            lines.append(f"- Model: `{decision.get('model_uri')}`")
    return "\n".join(lines) + "\n"


def _data_summary(prepared: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """The part of prepare_data's summary that the retrain summary repeats."""
    return {"fingerprint": prepared.get("fingerprint", ""), "counts": prepared.get("counts", {}),
            "quarantined": prepared.get("quarantined", 0), "layout": prepared.get("layout", ""),
            "data_dir": str(data_dir)}


# --------------------------------------------------------------------------- tasks


@task(name="read-champion", **_IO_RETRIES)
def read_champion() -> dict[str, Any] | None:
    """The current champion's version, dataset fingerprint, config hash and recorded metrics."""
    return champion_summary()


@task(name="record-unchanged", **_IO_RETRIES)
def record_unchanged(reason: str, fingerprint: str, config_hash: str, experiment: str) -> dict[str, Any]:
    """A short MLflow run that says why nothing was trained, so the schedule's history is complete."""
    return log_skipped_run(reason, fingerprint, config_hash, experiment=experiment)


@task(name="log-to-mlflow", **_IO_RETRIES)
def log_to_mlflow(prepared: dict[str, Any], trained: dict[str, Any], config: dict[str, Any],
                  experiment: str) -> dict[str, Any]:
    """Parent run (config, data, metrics, plots, model) and one child run per backbone."""
    return log_retrain(prepared, trained, config, experiment=experiment)


@task(name="score-on-test-split", **_IO_RETRIES)
def score_on_test_split(model_uri: str, data_dir: str) -> dict[str, float]:
    """Test metrics of the logged model through the serving code: the gate's one yardstick.

    The champion is re-scored by the same function on the same split inside the gate, so the
    comparison never mixes two evaluation paths.
    """
    return evaluate_model_uri(model_uri, data_dir)


@task(name="register-and-gate", **_IO_RETRIES)
def register_and_decide(run_id: str, model_uri: str, candidate_metrics: dict[str, float], data_dir: str,
                        floor: float, margin: float, metric: str) -> dict[str, Any]:
    """Register a new version; `champion` moves to it only through the gate (else `challenger`)."""
    return register_and_gate(run_id, model_uri, candidate_metrics,
                             evaluate_champion=lambda uri: evaluate_model_uri(uri, data_dir),
                             floor=floor, margin=margin, metric=metric)


@task(name="publish-summary", **_IO_RETRIES)
def publish_summary(summary: dict[str, Any]) -> str:
    """The markdown summary artifact of this flow run (metrics table, decision, MLflow link)."""
    markdown = summary_markdown(summary)
    create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY,
                             description=f"Retrain: {summary.get('headline', summary.get('status'))}")
    return markdown


# --------------------------------------------------------------------------- the flow


@flow(name="retrain")
def retrain(config: RetrainConfig = RetrainConfig()) -> dict[str, Any]:
    """Prepare, skip if nothing changed, train, log, register and gate; returns the run summary.

    The summary: {"status": "trained"|"unchanged", "headline", "flow_run_id", "config_hash",
    "data": {fingerprint, counts, quarantined, layout, data_dir}, "champion_before", "mlflow":
    {run_id, run_url, tracking_uri, ...}, and when trained: "chosen_backbone", "test_metrics",
    "decision" (register_and_gate's dict), "model_path"}.
    """
    logger = get_run_logger()
    data_dir = Path(config.data_dir).expanduser().resolve()
    config_hash = config.config_hash()

    prepared = prepare_data(source=config.source, data_dir=data_dir, expected_sha256=config.expected_sha256,
                            split_fractions=config.split_fractions, thresholds=config.thresholds)
    data = _data_summary(prepared, data_dir)
    champion = read_champion()
    summary: dict[str, Any] = {"flow_run_id": str(flow_run.id) if flow_run.id else None,
                               "config_hash": config_hash, "data": data, "champion_before": champion}

    reason = None if config.force else unchanged_reason(data["fingerprint"], config_hash, champion)
    if reason:
        logger.info("Training skipped: %s", reason)
        skipped = record_unchanged(reason, data["fingerprint"], config_hash, config.experiment)
        summary |= {"status": UNCHANGED, "reason": reason, "mlflow": skipped,
                    "headline": f"nothing changed, champion version {champion['version']} stays"}
        publish_summary(summary)
        return summary

    trained = train_model(data_dir=data_dir, config=config.train_config(), output_dir=config.output_dir)
    logged = log_to_mlflow(prepared, trained, config.model_dump(mode="json"), config.experiment)
    candidate = score_on_test_split(logged["model_uri"], str(data_dir))
    decision = register_and_decide(logged["run_id"], logged["model_uri"], candidate, str(data_dir),
                                   config.floor, config.margin, config.metric)
    verdict = "promoted to champion" if decision["promoted"] else f"kept as {decision['alias']}"
    summary |= {"status": TRAINED, "chosen_backbone": trained["chosen_backbone"], "test_metrics": candidate,
                "decision": decision, "mlflow": logged, "model_path": trained["model_path"],
                "headline": f"version {decision['version']} {verdict}"}
    logger.info("Version %s %s: %s", decision["version"], verdict, "; ".join(decision["reasons"]))
    publish_summary(summary)
    return summary


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """Options map one to one onto RetrainConfig fields; left out, a field keeps its default."""
    parser = argparse.ArgumentParser(
        prog="catsdogs-retrain",
        description="Prepare the Dogs vs. Cats data, train, log to MLflow and promote a champion through the gate.",
    )
    add = parser.add_argument
    add("--source", help='"petimages" (default), "kaggle", an https:// URL, a local archive or folder')
    add("--sha256", dest="expected_sha256", help="expected sha256 of the source archive")
    add("--data-dir", dest="data_dir", help="data folder (default: data)")
    add("--split-fractions", dest="split_fractions", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
        help="shares of the content-hash split (default 0.8 0.1 0.1)")
    add("--min-per-class", dest="min_per_class", type=int,
        help="dataset check: fewest images of each class (default 1000; lower it for small datasets)")
    add("--min-per-class-per-split", dest="min_per_class_per_split", type=int,
        help="dataset check: fewest images of each class in each split (default 50)")
    add("--max-class-imbalance", dest="max_class_imbalance", type=float,
        help="dataset check: largest majority/minority class ratio, overall and per split (default 1.5)")
    add("--max-quarantined-share", dest="max_quarantined_share", type=float,
        help="dataset check: largest share of files quarantined (default 0.05)")
    add("--output-dir", dest="output_dir", help="training outputs (default: <data-dir>/training/...)")
    add("--backbones", nargs="+", metavar="NAME", help="one or more backbones, e.g. resnet50 mobilenet_v2 (default: resnet50)")
    add("--weights", help='"imagenet" (default), "none" for random weights, or a local weights file')
    add("--input-size", dest="input_size", type=int, help="square input side (default: each backbone's native size)")
    add("--epochs", dest="head_epochs", type=int, help="maximum head epochs")
    add("--fine-tune", dest="fine_tune", action="store_true", default=None, help="also fine-tune the top block")
    add("--fine-tune-epochs", dest="fine_tune_epochs", type=int)
    add("--batch-size", dest="batch_size", type=int)
    add("--seed", type=int)
    add("--metric", help="gate metric: roc_auc (default), accuracy, f1_cat, f1_dog")
    add("--floor", type=float, help="minimum test metric for a champion (default 0.90)")
    add("--margin", type=float, help="how much a new champion must beat the old one by (default 0.002)")
    add("--experiment", help="MLflow experiment name")
    add("--force", action="store_true", default=None, help="train even if data and config are unchanged")
    add("--json", action="store_true", help="print the summary as JSON instead of markdown")
    add("--serve", action="store_true",
        help="instead of one run, serve the deployment retrain/weekly (Monday 03:00 UTC) with these options")
    return parser


_CLI_ONLY = ("json", "serve")
_THRESHOLD_OPTIONS = ("min_per_class", "min_per_class_per_split", "max_class_imbalance", "max_quarantined_share")


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    """A RetrainConfig from the options that were given (comma lists accepted for --backbones)."""
    values = {key: value for key, value in vars(args).items() if key not in _CLI_ONLY and value is not None}
    thresholds = {key: values.pop(key) for key in _THRESHOLD_OPTIONS if key in values}
    if thresholds:
        values["thresholds"] = ValidationThresholds(**thresholds)
    if "backbones" in values:
        values["backbones"] = [name for item in values["backbones"] for name in item.split(",") if name.strip()]
    return RetrainConfig(**values)


def _one_sentence(error: ValidationError) -> str:
    """The first pydantic error as one sentence naming the option."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    option = f"--{field.replace('_', '-')}" if field else "options"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid {option}: {message}."


def serve_weekly(config: RetrainConfig) -> None:
    """Serve `retrain/weekly` from this process (no work pool needed); blocks until interrupted."""
    retrain.serve(name="weekly", cron=WEEKLY_CRON, parameters={"config": config.model_dump(mode="json")},
                  tags=["catsdogs", "retrain"])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.retrain` / `catsdogs-retrain`: one retrain, summary on stdout.

    Exit codes: 0 done (trained or nothing changed), 2 bad input (one sentence on stderr).
    """
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.serve:
            serve_weekly(config)
            return 0
        summary = retrain(config)
    except ValidationError as exc:
        print(f"error: {_one_sentence(exc)}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str) if args.json else summary_markdown(summary))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this `__main__` copy: a served flow is pickled
    # into its run process, and only functions of a real module travel by reference.
    from flows.retrain import main as _main

    sys.exit(_main())
