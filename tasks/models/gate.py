"""The promotion gate as a pure function: may a candidate replace the champion?

Promote when the candidate is better than chance, reaches an absolute floor AND either no
champion exists or the candidate beats the champion by a margin, strictly, on the *same* test
split (numbers from different test splits cannot be compared, so the champion is re-scored on
the candidate's split before this is asked). A tie never churns the alias. Higher metric is
better.

"Better than chance" is asked of accuracy whatever the gate's metric and floor: a model whose
scores rank the test images perfectly (ROC AUC 1.0) can still put every one of them on the
same side of the threshold, and then it answers no better than always naming the most
frequent class. Such a model is never promoted, not even with `--floor 0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.common.errors import ConfigError
from tasks.models.naming import CHALLENGER, CHAMPION

DEFAULT_METRIC = "roc_auc"
"""One-vs-rest macro ROC AUC for more than two classes (tasks/learning/evaluate.py names it `roc_auc` too)."""


def gate_metrics(classes: Sequence[str]) -> list[str]:
    """The test metrics a gate may use for these classes: roc_auc, accuracy, macro_f1 (N > 2) and f1_<class>."""
    return ["roc_auc", "accuracy", *(["macro_f1"] if len(classes) > 2 else []), *(f"f1_{name}" for name in classes)]


def check_metric(metric: str, classes: Sequence[str]) -> str:
    """The gate's metric, refused with one sentence before any training when these classes' evaluation has no such key."""
    allowed = gate_metrics(classes)
    if metric not in allowed:
        raise ConfigError(f"The gate metric {metric!r} is not measured for the classes {', '.join(classes)}; "
                          f"pass --metric with one of {', '.join(allowed)}.")
    return metric


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate becomes champion, and the reasons a person reads later."""

    promote: bool
    reasons: tuple[str, ...]
    candidate_value: float | None
    champion_value: float | None = None
    champion_version: str | None = None

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def finite(value: Any) -> float | None:
    """A finite float, or None for missing/NaN/inf values (which can never pass a gate)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def at_chance(metrics: Mapping[str, Any]) -> str | None:
    """Why a model's test metrics say it is no better than chance, or None when it is better (or it cannot be told)."""
    accuracy, chance = finite(metrics.get("accuracy")), finite(metrics.get("chance_accuracy"))
    if accuracy is None or chance is None or accuracy > chance:
        return None
    reason = (f"test accuracy {accuracy:.4f} is at chance: always answering the most frequent class scores "
              f"{chance:.4f}")
    auc, low, high = (finite(metrics.get(key)) for key in ("roc_auc", "score_min", "score_max"))
    if auc is not None and auc > 0.5 and low is not None and high is not None:
        reason += (f"; its ROC AUC {auc:.4f} only says that the scores rank the images, not that the 0.5 threshold "
                   f"sorts them (every score lies in {low:.4f}..{high:.4f}: the model is not calibrated)")
    return reason


def decide(candidate_value: Any, champion_value: Any, *, floor: float, margin: float,
           metric: str = DEFAULT_METRIC, champion_version: str | None = None,
           has_champion: bool | None = None, chance: str | None = None) -> GateDecision:
    """The gate as a pure function (higher metric is better).

    Promote when the candidate is not at `chance` (the reason from `at_chance`), reaches
    `floor`, and either no champion exists or it beats the champion by at least `margin`
    (and strictly, so a tie never churns the alias).
    """
    candidate = finite(candidate_value)
    champion = finite(champion_value)
    has_champion = champion_version is not None if has_champion is None else has_champion
    if candidate is None:
        return GateDecision(False, (f"the candidate has no finite {metric}",), None, champion, champion_version)
    if chance:
        return GateDecision(False, (chance,), candidate, champion, champion_version)
    if candidate < floor:
        return GateDecision(False, (f"{metric} {candidate:.4f} is below the floor {floor:.4f}",),
                            candidate, champion, champion_version)
    passed = f"{metric} {candidate:.4f} passes the floor {floor:.4f}"
    if not has_champion:
        return GateDecision(True, (passed, "no champion yet: the first version to pass the floor is promoted"),
                            candidate, None, None)
    if champion is None:
        return GateDecision(False, (passed, f"the champion (version {champion_version}) has no comparable "
                                            f"{metric}; it stays champion"), candidate, None, champion_version)
    gain = candidate - champion
    versus = (f"champion version {champion_version} scores {champion:.4f} on the same test split "
              f"(gain {gain:+.4f}, margin {margin:.4f})")
    if gain > 0 and gain >= margin:
        return GateDecision(True, (passed, f"beats the {versus}"), candidate, champion, champion_version)
    return GateDecision(False, (passed, f"does not beat the {versus}"), candidate, champion, champion_version)
