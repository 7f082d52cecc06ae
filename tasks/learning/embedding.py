"""The audit's view of cached features: standardised, reduced to at most 256 dimensions by PCA.

Why this view:
- Pooled backbone features are all positive and share a large common part, so the cosine of two
  raw feature vectors is near 1 for any two images (measured: 0.98-0.999 for distinct images of
  random backbones, benchmarks/near_copies.py). Centred and standardised with the folder's own
  statistics (the variance floored as the head does, tasks/learning/head.py), similarity measures
  how much two images differ *compared with the rest of this data*.
- A principal-component projection keeps the directions along which the images differ and makes
  every later step cheap: the all-pairs neighbour scan of 25,000 images costs 256 instead of
  2,048 multiply-adds per pair, and the out-of-fold classifiers fit in a second
  (benchmarks/audit_throughput.py). With no more images than that, the images span no more
  dimensions than they are: the standardised features are used as they are.
"""

from __future__ import annotations

import numpy as np

from tasks.learning.head import VARIANCE_FLOOR

EMBEDDING_DIMS = 256
"""Principal components kept (fewer when there are fewer images or features)."""

PCA_SAMPLE = 5000
"""Images the components are estimated from (a seeded sample): 256 directions need no more, and it is 5x cheaper at 25,000."""


def standardise(features: np.ndarray) -> np.ndarray:
    """Each feature centred and divided by its spread, floored like the head's (float32)."""
    features = np.asarray(features, dtype=np.float32)
    mean = features.mean(axis=0, dtype=np.float64)
    variance = features.var(axis=0, dtype=np.float64)
    scale = np.sqrt(variance + VARIANCE_FLOOR * variance.mean())
    scale[scale == 0] = 1.0
    return ((features - mean) / scale).astype(np.float32)


def embed(features: np.ndarray, seed: int = 0, dims: int = EMBEDDING_DIMS) -> np.ndarray:
    """Standardised features projected on their first `dims` principal components (float32, (n, <= dims))."""
    from sklearn.decomposition import PCA

    standard = standardise(features)
    n, d = standard.shape
    if n <= dims or d <= dims:  # nothing to drop: n points span at most n dimensions, and distances stay as they are
        return standard
    sample = np.random.default_rng(seed).choice(n, PCA_SAMPLE, replace=False) if n > PCA_SAMPLE else slice(None)
    pca = PCA(n_components=dims, random_state=seed).fit(standard[sample])
    return pca.transform(standard).astype(np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), so a dot product is a cosine similarity."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
