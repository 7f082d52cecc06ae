"""The one configuration model of a training run: the `train_model` flow's parameter.

It is a pydantic model made of JSON-friendly fields so that Prefect renders it as a form,
MLflow can log it as parameters, and a run can be reproduced from its `model_dump()`.
Values are checked here, before any image is read, so a typo in a backbone name costs a
second instead of a feature-extraction pass.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TrainConfig(BaseModel):
    """What to train and how; every field has a default that works on a CPU."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backbones: list[str] = Field(
        default_factory=lambda: ["resnet50"],
        description="Backbones to compare; the best by validation AUC is kept (see tasks/backbones.py).",
    )
    weights: str | None = Field(
        default="imagenet",
        description='"imagenet", a local weights file (one backbone only), or null for random weights (tests).',
    )
    input_size: int | None = Field(
        default=None, ge=16, le=1024,
        description="Square input side in pixels; null uses each backbone's native size.",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per batch (features and fine-tuning).")
    head_batch_size: int = Field(default=256, ge=1, le=65536, description="Feature vectors per batch for the head.")
    head_epochs: int = Field(default=30, ge=1, le=1000, description="Maximum head epochs (early stopping ends sooner).")
    head_learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    dense_units: int = Field(default=256, ge=1, le=16384)
    fine_tune: bool = Field(default=False, description="Unfreeze the top block(s) and train end to end (slow on CPU).")
    fine_tune_epochs: int = Field(default=5, ge=1, le=1000)
    fine_tune_learning_rate: float = Field(default=1e-5, gt=0, le=1.0)
    patience: int = Field(default=3, ge=1, le=100, description="Epochs without validation improvement before stopping.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    mixed_precision: bool = Field(default=False, description="float16 compute on a GPU; ignored on CPU.")

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        """Reject unknown or repeated names with the list of choices (a ValueError pydantic reports)."""
        from tasks.backbones import BACKBONES  # lazy: importing Keras is not free

        cleaned = [name.strip().lower() for name in names]
        if not cleaned:
            raise ValueError(f"backbones is empty; choose at least one of {sorted(BACKBONES)}")
        unknown = [name for name in cleaned if name not in BACKBONES]
        if unknown:
            raise ValueError(f"unknown backbone(s) {unknown}; choose from {sorted(BACKBONES)}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"backbones {cleaned} names one backbone twice; list each once")
        return cleaned

    @field_validator("weights")
    @classmethod
    def _weights_value(cls, weights: str | None) -> str | None:
        """Empty strings and the word "none" mean random weights, as a form user would expect."""
        if weights is None or weights.strip().lower() in ("", "none", "null"):
            return None
        return "imagenet" if weights.strip().lower() == "imagenet" else weights.strip()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        """Cross-field rules: one weights file fits one architecture; inputs not below a backbone's minimum."""
        from tasks.backbones import get_backbone

        if self.weights not in (None, "imagenet") and len(self.backbones) > 1:
            raise ValueError(
                f"weights file {self.weights!r} fits one architecture but backbones lists "
                f"{self.backbones}; name a single backbone or use weights='imagenet'"
            )
        if self.input_size is not None:
            for name in self.backbones:
                minimum = get_backbone(name).min_size
                if self.input_size < minimum:
                    raise ValueError(
                        f"input_size {self.input_size} is below {name}'s minimum {minimum}; use >= {minimum}"
                    )
        return self

    def input_size_for(self, backbone: str) -> int:
        """The input side actually used for a backbone: the configured one or its native size."""
        from tasks.backbones import get_backbone

        return int(self.input_size or get_backbone(backbone).native_size)

    def training_fields(self) -> dict[str, Any]:
        """The TrainConfig fields only, JSON-ready: subclasses (RetrainConfig) add fields that do not change a model."""
        dumped = self.model_dump(mode="json")
        return {name: dumped[name] for name in TrainConfig.model_fields}

    def config_hash(self) -> str:
        """A stable sha256 (hex) of the training fields: equal configs hash equally across processes.

        Used to name run folders and to tell whether "nothing changed" since the last run.
        A local weights file enters by its content (`weights_fingerprint`), not its path, so
        replacing the file at the same path counts as a change and moving it does not.
        """
        fields = self.training_fields()
        if self.weights not in (None, "imagenet"):
            from tasks.backbones import weights_fingerprint

            fields["weights"] = weights_fingerprint(self.weights)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
