"""The data audit at the size of the real dataset: 25,000 images of 2,048 features, and its alternatives.

    python benchmarks/audit_throughput.py [--images 25000] [--dims 2048] [--skip-baselines]

Features are synthetic but shaped like pooled CNN features (non-negative, a few directions
carry the class, most carry the image), with 5% of the labels flipped and 50 near-copies across
splits planted (outliers are measured where they mean something, on a real backbone's features:
tests/learning/test_audit.py). It prints the wall and CPU time of the audit as the
pipeline runs it (`audit_features`) and of its three parts, then, measured in the same run,
what the choices it made are worth, as ratios:

    neighbour scan  the audit's blocked scan in the reduced 256-dimension view
                    vs scikit-learn NearestNeighbors (brute force, cosine) on all 2,048
    out-of-fold     logistic regression on the reduced view (5 folds)
                    vs logistic regression on all 2,048 features
                    vs the project's own head (tasks/learning/head.py, 5 epochs per fold)

with the recall and precision among the top k (k = flipped) of the flipped labels for each
out-of-fold choice, so speed is never bought with worse findings unawares.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic(n: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], set[int]]:
    """(features, true labels, given labels with 5% flipped, splits, planted copies' indices)."""
    rng = np.random.default_rng(seed)
    latent, classes = 64, 2
    mixing = rng.normal(0, 1 / np.sqrt(latent), (latent, dims)).astype(np.float32)
    centres = rng.normal(0, 1.0, (classes, latent)).astype(np.float32)
    truth = rng.integers(0, classes, n)
    codes = centres[truth] + rng.normal(0, 1, (n, latent)).astype(np.float32)
    features = np.maximum(codes @ mixing + 0.3 * rng.normal(0, 1, (n, dims)).astype(np.float32), 0)
    splits = rng.choice(["train", "validation", "test"], n, p=[0.8, 0.1, 0.1]).tolist()
    train, test = [i for i, s in enumerate(splits) if s == "train"], [i for i, s in enumerate(splits) if s == "test"]
    copies = set()
    for source, target in zip(train[:50], test[:50]):  # near-copies: the same image, a little noise
        features[target] = features[source] * rng.normal(1, 0.01, dims) + 0.01 * rng.random(dims)
        truth[target] = truth[source]
        copies.add(target)
    given = truth.copy()
    flipped = rng.choice(n, n // 20, replace=False)
    given[flipped] = 1 - given[flipped]
    return features.astype(np.float32), truth, given, splits, copies


def timed(what: str, work: Callable[[], object]) -> tuple[object, float, float]:
    """Run `work`, print its wall and CPU seconds (this process and its children), return (result, wall, cpu)."""
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    wall, used = time.perf_counter(), cpu()
    result = work()
    wall, used = time.perf_counter() - wall, cpu() - used
    print(f"  {what:58s} {wall:7.1f} s wall {used:7.1f} s CPU")
    return result, wall, used


def found(probabilities: np.ndarray, given: np.ndarray, truth: np.ndarray) -> str:
    """Recall of the flipped labels among cleanlab's suspects, and precision among the top k."""
    import cleanlab.filter

    flipped = set(np.flatnonzero(given != truth))
    suspects = cleanlab.filter.find_label_issues(given, probabilities, filter_by="prune_by_noise_rate",
                                                 return_indices_ranked_by="self_confidence", n_jobs=1)
    recall = len(flipped & set(suspects)) / len(flipped)
    precision = len(flipped & set(suspects[:len(flipped)])) / len(flipped)
    return f"recall {recall:.2f}, precision@k {precision:.2f}"


def head_out_of_fold(vectors: np.ndarray, labels: np.ndarray, folds: int = 5) -> np.ndarray:
    """The project's head trained per fold (5 epochs, its defaults otherwise): the alternative to logistic regression."""
    from sklearn.model_selection import StratifiedKFold

    from tasks.learning.head import HeadParams, fit_head

    params = HeadParams(epochs=5, patience=5)
    probabilities = np.zeros((len(labels), 2))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=0).split(vectors, labels):
        model, _ = fit_head(vectors[train], labels[train], vectors[held_out[:256]], labels[held_out[:256]], params)
        p = np.asarray(model.predict(vectors[held_out], batch_size=1024, verbose=0)).reshape(-1)
        probabilities[held_out] = np.stack([1 - p, p], axis=1)
    return probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--skip-baselines", action="store_true", help="time the audit only")
    args = parser.parse_args()

    from tasks.common.labels import CATS_DOGS
    from tasks.learning.audit import audit_features
    from tasks.learning.embedding import embed, standardise
    from tasks.learning.label_issues import out_of_fold_probabilities
    from tasks.learning.neighbours import nearest

    features, truth, given, splits, copies = synthetic(args.images, args.dims)
    rows = pd.DataFrame({"sha256": [f"{i:064x}" for i in range(args.images)], "label": np.array(["cat", "dog"])[given],
                         "y": given, "split": splits, "arranged_path": [f"{i}.jpg" for i in range(args.images)]})
    print(f"{args.images:,} images x {args.dims:,} features, {(given != truth).sum()} labels flipped, "
          f"{len(copies)} near-copies in test:")
    import sklearn  # noqa: F401  (imports outside the timings: a training run has them loaded already)
    import cleanlab.filter  # noqa: F401

    findings, audit_wall, audit_cpu = timed("the audit (audit_features), as every training run runs it",
                                            lambda: audit_features(features, rows, CATS_DOGS))
    kinds = findings.report["kind"].value_counts().to_dict()
    def indices(kind: str) -> set[int]:
        return set(findings.report.loc[findings.report["kind"] == kind, "sha256"].map(lambda sha: int(sha, 16)))

    print(f"  found: {kinds}; planted copies found {len(copies & indices('leakage'))}/{len(copies)}")

    vectors, *_ = timed("  standardise + PCA to 256 dimensions", lambda: embed(features))
    probabilities, *lr = timed("  out-of-fold logistic regression, 5 folds (reduced view)",
                                      lambda: out_of_fold_probabilities(vectors, given, 2, 5))
    print(f"    {found(probabilities, given, truth)}")
    _, *scan = timed("  neighbour scan, k=10 (reduced view)", lambda: nearest(vectors))
    if args.skip_baselines:
        return

    print("baselines (same data, same run):")
    standard = standardise(features)
    from sklearn.neighbors import NearestNeighbors

    _, *brute = timed("NearestNeighbors brute cosine, k=11, all 2,048 features",
                          lambda: NearestNeighbors(n_neighbors=11, metric="cosine", algorithm="brute")
                          .fit(standard).kneighbors(standard))
    full, *full_lr = timed("out-of-fold logistic regression, all 2,048 features",
                               lambda: out_of_fold_probabilities(standard, given, 2, 5))
    print(f"    {found(full, given, truth)}")
    head, *heads = timed("out-of-fold project head, 5 epochs per fold, all features",
                               lambda: head_out_of_fold(features, given))
    print(f"    {found(head, given, truth)}")
    print("ratios (baseline / the audit's choice; CPU seconds, less skewed than wall time by other jobs, then wall):")
    for what, baseline, chosen in (("neighbour scan: NearestNeighbors on all features / the audit's scan", brute, scan),
                                   ("out-of-fold: logistic regression on all features / on the reduced view", full_lr, lr),
                                   ("out-of-fold: project head / logistic regression on the reduced view", heads, lr)):
        print(f"  {what:72s} {baseline[1] / chosen[1]:5.1f}x CPU {baseline[0] / chosen[0]:5.1f}x wall")
    print(f"the whole audit: {audit_wall:.1f} s wall, {audit_cpu:.1f} s CPU on this machine "
          f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
