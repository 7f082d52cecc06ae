"""Nearest neighbours in the audit's feature view: near-copies and outliers from one all-pairs scan.

One exact scan (the reduced vectors multiplied block by block, so memory stays at a block of
rows times all images) keeps, for each image, its NEIGHBOURS most similar others by cosine and
its NEIGHBOURS nearest by Euclidean distance. The two findings come from it:

- **Near-copies** (re-encoded, resized, recompressed images) by cosine similarity. A pair is one
  when its similarity reaches `min_similarity` (an option, default NEAR_DUPLICATE_SIMILARITY)
  and it stands apart from everything else, in one of two ways:
  * *locally*: its cosine distance is at most GAP_RATIO times the distance from the image to its
    NEIGHBOURS-th nearest other (a ratio test against the image's own neighbourhood, so a group
    of copies, up to NEIGHBOURS - 1 of them, is found whole, however close they are to each other);
  * *globally*: at most RELATIVE_DISTANCE times the folder's median nearest-neighbour distance
    (cleanlab Datalab's rule and factor), for larger groups.
  The similarity alone cannot tell a copy: in a folder of look-alike images (generated test
  images, product shots on white) distinct images are as similar as a photo and its re-encoded
  copy are elsewhere (measured with random backbones: up to 0.99 between distinct generated
  images, 0.92-0.96 between a scene and its re-encoded copy). How far copies stand apart is what
  tells them, and benchmarks/near_copies.py measures it per backbone and kind of copy (README,
  "The data audit": with random weights only re-encoded and mildly resized copies stand out).
- **Outliers** (a blank frame, a screenshot) by Euclidean distance: the distance to the
  NEIGHBOURS-th nearest image (the k-th, so a few odd images that resemble each other still
  stand out), far above the folder's (Tukey's far-out fence, Q3 + 3 IQR). Distance, not angle: a blank frame's
  standardised features are small and point anywhere, so only their distance from every real
  image gives them away (measured: blank frames 3-4x the fence with a random VGG16, where their
  cosine scores stayed inside it).

scikit-learn's NearestNeighbors (and through it cleanlab's Datalab) makes the same scan; this one
shares one pass between both findings and works in the reduced view (tasks/learning/embedding.py),
which benchmarks/audit_throughput.py compares with NearestNeighbors on the full features. An exact
O(n^2) scan suits one host's datasets (25,000 images: seconds); millions of images would need an
approximate index (FAISS), which the pipeline does not ship.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEIGHBOURS = 10
"""Neighbours kept per image: the outlier score's k, and the local near-copy rule's yardstick (the k-th)."""

NEAR_DUPLICATE_SIMILARITY = 0.9
"""Default absolute floor of a near-copy's cosine similarity (standardised features)."""

GAP_RATIO = 0.1
"""A near-copy is at most this share as far as the image's NEIGHBOURS-th nearest other (the local rule)."""

RELATIVE_DISTANCE = 0.13
"""Or at most this share of the folder's median nearest-neighbour distance (Datalab's rule and factor)."""

OUTLIER_FENCE = 3.0
"""Outliers score above Q3 + OUTLIER_FENCE x IQR of the scores (Tukey's far-out fence)."""

_BLOCK = 1024


@dataclass(frozen=True)
class Neighbours:
    """Each image's nearest others, (n, k) each: by cosine similarity (most similar first) and by Euclidean distance."""

    index: np.ndarray
    similarity: np.ndarray
    distance: np.ndarray
    """Euclidean distances to the k nearest others, nearest first (not necessarily the same images as `index`)."""

    @property
    def nearest_distance(self) -> np.ndarray:
        """Cosine distance of each image to its most similar other image."""
        return 1.0 - self.similarity[:, 0]


def _top(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's k largest values, largest first."""
    top = np.argpartition(values, -k, axis=1)[:, -k:]
    picked = np.take_along_axis(values, top, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(picked, order, axis=1)


def nearest(vectors: np.ndarray, k: int = NEIGHBOURS) -> Neighbours:
    """The k most cosine-similar and the k Euclidean-nearest other images of every image, by an exact blocked scan.

    Each block of rows is multiplied with all images once; both rankings come from those dot
    products with one column scaling each (a row's own norm changes neither its cosine order nor
    its distance order), which is most of what the scan costs besides the product itself.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    k = max(0, min(k, n - 1))
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k), dtype=np.float32)
    distance = np.zeros((n, k), dtype=np.float32)
    if k == 0:
        return Neighbours(index, similarity, distance)
    norms = np.linalg.norm(vectors, axis=1)
    inverse = (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    half_squares = (0.5 * norms ** 2).astype(np.float32)
    for start in range(0, n, _BLOCK):
        rows = slice(start, start + _BLOCK)
        dots = vectors[rows] @ vectors.T
        own = np.arange(len(dots)), start + np.arange(len(dots))
        scaled = dots * inverse[None, :]  # row i: cosine x |v_i|, the same order as the cosine
        scaled[own] = -np.inf  # never one's own neighbour
        top, values = _top(scaled, k)
        index[rows], similarity[rows] = top, values * inverse[rows, None]
        del scaled
        dots -= half_squares[None, :]  # row i: (|v_i|^2 - distance^2) / 2, the reverse order of the distance
        dots[own] = -np.inf
        _, values = _top(dots, k)
        distance[rows] = np.sqrt(np.maximum(2.0 * (half_squares[rows, None] - values), 0.0))
    return Neighbours(index, np.clip(similarity, -1.0, 1.0), distance)


def close_similarity(neighbours: Neighbours, min_similarity: float = NEAR_DUPLICATE_SIMILARITY) -> float:
    """The similarity above which a pair is a near-copy without a gap: the relative rule, never below the floor."""
    if neighbours.similarity.size == 0:
        return float(min_similarity)
    return float(max(min_similarity, 1.0 - RELATIVE_DISTANCE * float(np.median(neighbours.nearest_distance))))


def stands_apart(neighbours: Neighbours) -> np.ndarray:
    """(n, k) whether each kept neighbour is at most GAP_RATIO as far as the image's last kept (k-th) neighbour."""
    distance = 1.0 - neighbours.similarity
    if distance.shape[1] < 2:
        return np.zeros(distance.shape, dtype=bool)
    return distance <= GAP_RATIO * distance[:, -1:]


def near_copy_pairs(neighbours: Neighbours,
                    min_similarity: float = NEAR_DUPLICATE_SIMILARITY) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for every near-copy pair, each pair once, most similar first."""
    similar = neighbours.similarity >= min_similarity
    close = neighbours.similarity >= close_similarity(neighbours, min_similarity)
    rows, columns = np.nonzero(close | (similar & stands_apart(neighbours)))
    pairs: dict[tuple[int, int], float] = {}
    for row, column in zip(rows, columns):
        other = int(neighbours.index[row, column])
        pairs[(min(int(row), other), max(int(row), other))] = float(neighbours.similarity[row, column])
    return sorted(((i, j, s) for (i, j), s in pairs.items()), key=lambda pair: (-pair[2], pair[0], pair[1]))


def outlier_scores(neighbours: Neighbours) -> np.ndarray:
    """Euclidean distance of each image to its k-th nearest other: high for an image unlike any other.

    The k-th, not the mean of the k: a few odd images that resemble each other (three blank
    frames) are each other's nearest, and only beyond them does the distance say how odd they are.
    """
    if neighbours.distance.size == 0:
        return np.zeros(len(neighbours.index), dtype=np.float32)
    return neighbours.distance[:, -1].astype(np.float32)


def outlier_fence(scores: np.ndarray) -> float:
    """The score above which an image is an outlier: Q3 + OUTLIER_FENCE x IQR (inf with too few images)."""
    if len(scores) < 4:
        return float("inf")
    q1, q3 = np.quantile(scores, [0.25, 0.75])
    return float(q3 + OUTLIER_FENCE * (q3 - q1))
