"""The drift figures on generated feature matrices: calibrated false alarms, drift found, shares and confidence.

The rows are shaped like the prediction log's: two classes of pooled features (64 numbers, the
classes apart in a few of them) projected to 32 as tasks/learning/head_input.py projects them.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks.learning.drift import MAX_P_VALUE, class_shares, class_shift, feature_drift, mean_confidence
from tasks.learning.head_input import projection_matrix

PROJECTION = projection_matrix(64)


def features(rng: np.random.Generator, n: int, *, shift: float = 0.0, new_cluster: float = 0.0) -> np.ndarray:
    """Two classes apart in 8 features; `shift` moves 6 others (another camera's colours and textures) for every row;
    `new_cluster` is the share of rows from somewhere the training data never was (a new breed)."""
    centres = np.zeros((2, 64))
    centres[1, :8] = 2.0
    x = centres[rng.integers(0, 2, n)] + rng.normal(size=(n, 64))
    x[:, 10:16] += shift
    novel = rng.random(n) < new_cluster
    x[novel, 20:30] += 3.0
    return x @ PROJECTION


def test_the_same_distribution_raises_at_most_one_false_alarm_in_20_seeds():
    alarms = [feature_drift(features(np.random.default_rng(seed), 300), features(np.random.default_rng(seed + 99), 200),
                            seed=seed).p_value < MAX_P_VALUE for seed in range(20)]
    assert sum(alarms) <= 1, alarms


@pytest.mark.parametrize("change", [{"shift": 1.0}, {"new_cluster": 0.25}])
def test_a_shifted_distribution_is_found_on_200_rows(change):
    for seed in range(5):
        found = feature_drift(features(np.random.default_rng(seed), 300),
                              features(np.random.default_rng(seed + 99), 200, **change), seed=seed)
        assert found.p_value < MAX_P_VALUE and found.mmd2 > 0, (seed, found)
        assert (found.reference_rows, found.current_rows) == (300, 200)


def test_large_samples_are_subsampled_and_narrow_ones_refused():
    rng = np.random.default_rng(0)
    found = feature_drift(features(rng, 1500), features(rng, 50), max_rows=400)
    assert (found.reference_rows, found.current_rows) == (400, 50)
    with pytest.raises(ValueError, match="two samples"):
        feature_drift(features(rng, 10), features(rng, 1))


def test_class_shares_shift_and_confidence():
    shares = class_shares(np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 1]), 2)
    assert shares.tolist() == [0.2, 0.8]
    assert class_shift(shares, [0.5, 0.5]) == pytest.approx(0.3)
    assert class_shift([1.0, 0.0, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(1.0)  # disjoint
    assert mean_confidence(np.array([[0.9, 0.1], [0.4, 0.6]])) == pytest.approx(0.75)
