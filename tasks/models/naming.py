"""The names people type and read in MLflow: experiment, registered model, aliases, tags.

Kept apart from the modules that talk to MLflow so that configs and command lines can name
them without importing MLflow.
"""

from __future__ import annotations

MODEL_NAME = "cats-vs-dogs"
"""The registered model every retrain adds a version to, unless `--model-name` names another (one per class set)."""

DEFAULT_EXPERIMENT = MODEL_NAME
"""Experiment of the default model's retrains (and skipped retrains); any other model's is named after it."""

DEFAULT_DATA_DIR = "data"
"""The default model's data folder; any other model's is `data-<model name>` (`default_data_dir`)."""

CHAMPION = "champion"
"""Alias of the version that serves (`models:/cats-vs-dogs@champion`)."""

CHALLENGER = "challenger"
"""Alias of the latest trained version that did not pass the gate."""

DEFAULT_MODEL_URI = f"models:/{MODEL_NAME}@{CHAMPION}"
"""What batch prediction and serving use unless told otherwise."""

TAG_KIND = "catsdogs.kind"
"""Run tag: "retrain" or "skipped"."""
TAG_FINGERPRINT = "dataset_fingerprint"
TAG_CONFIG_HASH = "config_hash"
TAG_BACKBONE = "chosen_backbone"
TAG_SKIP_REASON = "skip_reason"


def default_data_dir(model_name: str) -> str:
    """The data folder of a model's class set unless one is given: `data` for cats-vs-dogs, `data-<name>` for others.

    One folder per class set: a folder arranged for one set is never silently rearranged for another
    (tasks/data/datafolder.py refuses it).
    """
    return DEFAULT_DATA_DIR if model_name == MODEL_NAME else f"{DEFAULT_DATA_DIR}-{model_name}"


def parse_registry_uri(model_uri: str) -> tuple[str, str, str] | None:
    """("alias"|"version"|"stage", model name, ref) for models:/ registry URIs, else None."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return "alias", name, alias
    if "/" in rest:
        name, ref = rest.rsplit("/", 1)
        return ("version" if ref.isdigit() else "stage"), name, ref
    return None  # models:/<model id> (a logged model, not a registered one)
TAG_LABEL_OVERRIDES = "data.label_overrides"
"""Run and version tag: what a person's labels.csv changed in the data (absent without one)."""
