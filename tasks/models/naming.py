"""The names people type and read in MLflow: experiment, registered model, aliases, tags.

Kept apart from the modules that talk to MLflow so that configs and command lines can name
them without importing MLflow.
"""

from __future__ import annotations

DEFAULT_EXPERIMENT = "cats-vs-dogs"
"""Experiment that holds every retrain (and every skipped retrain)."""

MODEL_NAME = "cats-vs-dogs"
"""The registered model every retrain adds a version to."""

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
TAG_LABEL_OVERRIDES = "data.label_overrides"
"""Run and version tag: what a person's labels.csv changed in the data (absent without one)."""
