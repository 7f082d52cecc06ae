"""Suspected label errors: out-of-fold probabilities from K classifiers, ranked by cleanlab.

Every labelled image gets its class probabilities from a classifier that never saw it (K folds,
stratified, over every labelled split), and cleanlab's confident learning
(`cleanlab.filter.find_label_issues`, pruning by the estimated noise rate) picks the images
whose given label the data does not support. Each suspect comes with the class it more
likely belongs to and its score, one minus the probability of its given label (cleanlab's
self-confidence, turned so that higher is more suspicious).

The K classifiers are scikit-learn's multinomial logistic regression on the audit's reduced
features (tasks/learning/embedding.py): on cached features a linear classifier is what the
head's own hidden layer adds little to, and it fits in a fraction of a second per fold with
no Keras graph to build (benchmarks/audit_throughput.py measures it against the project's
head trained per fold).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FOLDS = 5
"""Folds of the out-of-fold probabilities (fewer when the smallest class has fewer images)."""

REGULARISATION = 1.0
"""Inverse regularisation strength C of the logistic regressions (scikit-learn's default)."""


@dataclass(frozen=True)
class LabelIssues:
    """Suspects among n images: a mask, each image's score and suggested class, and the folds used (0: none)."""

    suspected: np.ndarray
    score: np.ndarray
    suggested: np.ndarray
    folds: int


def fold_count(labels: np.ndarray, wanted: int = FOLDS) -> int:
    """K for stratified folds: every class must have an image in every fold (0 when one class has fewer than two)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    present = int((counts > 0).sum())
    k = min(wanted, smallest)
    return k if k >= 2 and present >= 2 else 0


def out_of_fold_probabilities(vectors: np.ndarray, labels: np.ndarray, n_classes: int, folds: int,
                              seed: int = 0) -> np.ndarray:
    """(n, n_classes) probabilities of each image from a logistic regression fitted on the other folds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.zeros((len(labels), n_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(vectors, labels):
        model = LogisticRegression(C=REGULARISATION, max_iter=500)
        with warnings.catch_warnings():  # a fold that does not fully converge still ranks; quiet output
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(vectors[train], labels[train])
        probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(vectors[held_out])
    return probabilities


def find_label_issues(vectors: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
                      folds: int = FOLDS) -> LabelIssues:
    """Suspected label errors of `labels` given the images' `vectors` (nothing suspected with too few images)."""
    import cleanlab.filter

    labels = np.asarray(labels, dtype=np.int64)
    k = fold_count(labels, folds)
    n = len(labels)
    if k == 0 or len(np.unique(labels)) < 2:
        return LabelIssues(np.zeros(n, bool), np.zeros(n, np.float32), labels.copy(), 0)
    probabilities = out_of_fold_probabilities(vectors, labels, n_classes, k, seed)
    with warnings.catch_warnings():  # cleanlab warns about tiny classes; the audit reports counts instead
        warnings.simplefilter("ignore")
        suspected = cleanlab.filter.find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate",
                                                      n_jobs=1)
    given = probabilities[np.arange(n), labels]
    others = probabilities.copy()
    others[np.arange(n), labels] = -1.0
    return LabelIssues(np.asarray(suspected, dtype=bool), (1.0 - given).astype(np.float32),
                       others.argmax(axis=1), k)
