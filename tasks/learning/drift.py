"""Has what the champion sees drifted from what it learned on? Three figures, on plain arrays.

- **Feature drift**: the maximum mean discrepancy (MMD; Gretton et al., "A Kernel Two-Sample
  Test", JMLR 2012) between the training images' and the recent rows' head inputs, as the
  prediction log summarises them (tasks/learning/head_input.py: 32 numbers a row), with a
  Gaussian kernel whose width is the median distance between the pooled rows, judged by a
  permutation test: the same statistic with the rows' origins shuffled, `permutations` times,
  gives its p-value. Drift when p < `max_p_value` (0.01).
- **Class shares**: the total variation distance between the shares of the predicted classes and
  the training split's class shares (half the sum of their absolute differences: 0 alike, 1
  disjoint; 70% dogs against a 50/50 prior is 0.2).
- **Confidence**: the mean probability of the predicted class, against the same figure on the
  held-out test images when the model was trained; a drop of `max_confidence_drop` (0.1) or more.

Why MMD with a permutation p-value rather than a domain classifier's cross-validated AUC: the
question is "could these two samples come from one distribution", and a permutation test
answers it with an exact false-alarm rate whatever the window's size: under no drift the p-value
is uniform, so the default threshold raises a false alarm in 1% of checks with 150 logged rows or
with 5,000 (tested on 20 seeds). A classifier's AUC has no such fixed meaning: around 0.5 it
wanders by ±0.03 with 200 rows a side and ±0.01 with 2,000, and cross-validation biases it, so
a fixed AUC threshold alarms too often on small windows or misses drift on large ones unless
it too is permutation-tested, at the price of refitting the classifier each time. MMD with a
kernel sees any difference of distribution (a shift, a spread, a new cluster), needs no fitting,
no folds and no seed beyond the shuffles, and costs one n x n kernel matrix (n <= 2 x `MAX_ROWS`),
in well under a second for every permutation together (one matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_P_VALUE = 0.01
"""Feature drift when the permutation p-value is below this."""

MAX_CLASS_SHIFT = 0.2
"""Class-share drift when the total variation distance to the training shares is at least this."""

MAX_CONFIDENCE_DROP = 0.1
"""Confidence drift when the mean probability of the predicted class fell by at least this."""

PERMUTATIONS = 500
"""Shuffles of the permutation test (p-values from 1/501)."""

MAX_ROWS = 1000
"""Rows of each sample the feature test uses at most (a seeded random subset beyond it)."""


@dataclass(frozen=True)
class FeatureDrift:
    """The two-sample test's figures: MMD^2 (biased estimate, >= 0), its permutation p-value, the rows it compared."""

    mmd2: float
    p_value: float
    reference_rows: int
    current_rows: int
    permutations: int


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= limit else rows[np.sort(rng.choice(len(rows), limit, replace=False))]


def feature_drift(reference: np.ndarray, current: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0,
                  max_rows: int = MAX_ROWS) -> FeatureDrift:
    """MMD^2 between two samples of feature rows (n, d) and its permutation p-value (small: they differ)."""
    rng = np.random.default_rng(seed)
    reference = _subsample(np.asarray(reference, dtype=np.float64), max_rows, rng)
    current = _subsample(np.asarray(current, dtype=np.float64), max_rows, rng)
    if len(reference) < 2 or len(current) < 2 or reference.shape[1:] != current.shape[1:]:
        raise ValueError(f"two samples of at least 2 rows of one width are needed, got {reference.shape} and "
                         f"{current.shape}")
    pooled = np.vstack([reference, current])
    norms = np.einsum("ij,ij->i", pooled, pooled)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    median = float(np.median(squared[np.triu_indices(len(pooled), k=1)]))
    kernel = np.exp(-squared / (median if median > 0 else 1.0))
    weights = np.concatenate([np.full(len(reference), 1.0 / len(reference)), np.full(len(current), -1.0 / len(current))])
    observed = float(weights @ kernel @ weights)
    shuffled = np.stack([rng.permutation(weights) for _ in range(permutations)], axis=1)  # (n, permutations)
    null = np.einsum("ip,ip->p", shuffled, kernel @ shuffled)
    p_value = (1.0 + float(np.sum(null >= observed - 1e-12))) / (1.0 + permutations)
    return FeatureDrift(mmd2=max(observed, 0.0), p_value=p_value, reference_rows=len(reference),
                        current_rows=len(current), permutations=permutations)


def class_shares(indexes: np.ndarray, n_classes: int) -> np.ndarray:
    """The share of each label index among `indexes` (zeros for none)."""
    counts = np.bincount(np.asarray(indexes, dtype=np.int64).reshape(-1), minlength=n_classes)[:n_classes]
    return counts / max(int(counts.sum()), 1)


def class_shift(shares: np.ndarray, prior: np.ndarray) -> float:
    """Total variation distance between two share vectors: half the sum of their absolute differences."""
    return float(0.5 * np.abs(np.asarray(shares, dtype=np.float64) - np.asarray(prior, dtype=np.float64)).sum())


def mean_confidence(probabilities: np.ndarray) -> float:
    """The mean probability of each row's most probable class ((n, classes) probabilities)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return float(probabilities.max(axis=1).mean()) if len(probabilities) else float("nan")
