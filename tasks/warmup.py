"""Warm-up clustering (DESIGN step 3): BisectingKMeans over a range of k, k chosen by silhouette.

Geometry. Document vectors (or LSH prototypes) are compared by cosine. Rows are L2-normalized
here (a copy; zero rows stay zero), and on unit vectors the squared Euclidean distance is
`2 - 2 cos`, so Euclidean k-means and the Euclidean silhouette rank points exactly as cosine
would (spherical k-means up to the centroid normalization). Returned centroids are the
normalized member means, and the rest of the pipeline (`tasks.memory`) measures a document's
distance to a cluster as the cosine distance `1 - x . c`.

Choosing k. BisectingKMeans (Steinbach, Karypis & Kumar 2000, "A comparison of document
clustering techniques") splits, one cluster at a time, the cluster of highest inertia in two, so
a single run to k_max passes through every k on its way down: the partition after k - 1 splits
is exactly what a run asked for k clusters returns (same seed, same random draws in the same
order). `bisecting_partitions` fits once and replays the splits in the order the greedy rule
made them, giving the labels for every k in [k_min, k_max] (checked against one fit per k in
`tests/test_warmup.py`). The k with the highest mean silhouette (Rousseeuw 1987) wins; ties go
to the smaller k. The winning partition is then refined by Lloyd iterations on the unit rows
(spherical k-means) from its member means, as Steinbach et al. recommend; a re-cluster started
from the refined centroids then finds the same partition (`tasks.recluster`). The silhouette
is O(n^2), so it is computed on one seeded sample of rows, the same rows for every k, so the
scores are comparable.

Degenerate inputs (fewer than 2 rows, all rows identical, fewer distinct rows than k_min) do not
raise: they come back as a single cluster (k = 1) with a `reason` the caller logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import BisectingKMeans
from sklearn.metrics import silhouette_score

DEFAULT_K_MAX = 20
DEFAULT_SILHOUETTE_SAMPLE = 2000
LLOYD_MAX_ITER = 30
_BLOCK_ROWS = 65_536


@dataclass(frozen=True)
class WarmupResult:
    """Outcome of the warm-up.

    labels: (n,) int64 in [0, k); centroids: (k, d) float32, L2-normalized member means;
    silhouette_by_k: sampled silhouette for every k tried (empty when none could be tried);
    reason: why the input was treated as one cluster, or None for a normal result.
    """

    labels: np.ndarray
    centroids: np.ndarray
    k: int
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    reason: str | None = None


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalized float32 copy of `vectors` (n, d); all-zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def normalized_cluster_means(
    vectors: np.ndarray, labels: np.ndarray, n_clusters: int
) -> np.ndarray:
    """(n_clusters, d) float32: L2-normalized mean of the rows of each label in [0, n_clusters).

    A label with no rows gets a zero row.
    """
    sums = np.zeros((n_clusters, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, vectors)
    return unit_rows(sums)


def count_distinct_rows(vectors: np.ndarray, stop_at: int | None = None) -> int:
    """Number of distinct rows of `vectors` (exact equality).

    With `stop_at`, a cheap check on the first `stop_at` rows is tried first: when those are
    already all distinct the answer is at least `stop_at`, and `stop_at` is returned.
    """
    if stop_at is not None and 0 < stop_at <= len(vectors):
        head = np.unique(vectors[:stop_at], axis=0)
        if len(head) >= stop_at:
            return stop_at
    return int(len(np.unique(vectors, axis=0)))


def silhouette_sample_rows(n: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted row indices of the seeded silhouette sample (all rows when n <= sample_size)."""
    if n <= sample_size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))


def unit_euclidean_distances(unit: np.ndarray) -> np.ndarray:
    """(m, m) float64 Euclidean distances between unit rows: sqrt(2 - 2 cos), zero diagonal."""
    unit = unit.astype(np.float64)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * (unit @ unit.T), 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances


def nearest_centroid(unit: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) int64 row of the highest cosine in `centroids` for each unit row, in blocks."""
    labels = np.empty(len(unit), dtype=np.int64)
    for start in range(0, len(unit), _BLOCK_ROWS):
        block = unit[start:start + _BLOCK_ROWS]
        labels[start:start + len(block)] = np.argmax(block @ centroids.T, axis=1)
    return labels


def spherical_lloyd(unit: np.ndarray, centroids: np.ndarray,
                    max_iter: int = LLOYD_MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations on unit rows from `centroids` (k, d) until no label changes.

    Returns (labels (n,) int64 in [0, k'), centroids (k', d) float32 normalized member means);
    a centroid that ends with no member is dropped and the labels are renumbered in order.
    """
    centroids = unit_rows(centroids)
    labels = nearest_centroid(unit, centroids)
    for _ in range(max_iter):
        used, labels = np.unique(labels, return_inverse=True)
        centroids = normalized_cluster_means(unit, labels, len(used))
        moved = nearest_centroid(unit, centroids)
        if np.array_equal(moved, labels):
            break
        labels = moved
    used, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64), normalized_cluster_means(unit, labels, len(used))


def _single_cluster(unit: np.ndarray, reason: str) -> WarmupResult:
    n, d = unit.shape
    centroids = (normalized_cluster_means(unit, np.zeros(n, dtype=np.int64), 1) if n
                 else np.zeros((1, d), dtype=np.float32))
    return WarmupResult(labels=np.zeros(n, dtype=np.int64), centroids=centroids, k=1,
                        silhouette_by_k={}, reason=reason)


def bisecting_partitions(unit: np.ndarray, k_low: int, k_high: int, seed: int,
                         n_init: int = 1) -> dict[int, np.ndarray]:
    """{k: labels (n,) int64} for every k in [k_low, k_high], from one BisectingKMeans fit.

    Fits to k_high, then replays the bisections in the order the greedy rule made them (the
    leaf of highest score, the first one in depth-first order on ties, as scikit-learn picks
    it) and numbers each partition's clusters in depth-first leaf order, as a fit to that k
    does. Where the fitted model does not expose its tree (another scikit-learn), it falls
    back to one fit per k, with the same result.
    """
    n = unit.shape[0]
    model = BisectingKMeans(n_clusters=k_high, random_state=seed, n_init=n_init).fit(unit)
    root = getattr(model, "_bisecting_tree", None)
    if root is None or not hasattr(root, "left"):  # pragma: no cover - other sklearn versions
        return {k: BisectingKMeans(n_clusters=k, random_state=seed, n_init=n_init)
                .fit_predict(unit).astype(np.int64) for k in range(k_low, k_high + 1)}

    # the fit keeps each leaf's label and drops its rows: rows of a node are its leaves' rows
    leaf_rows = np.split(np.argsort(model.labels_, kind="stable"),
                         np.cumsum(np.bincount(model.labels_, minlength=k_high))[:-1])

    def members(node) -> np.ndarray:
        if node.left is None:
            return leaf_rows[node.label]
        return np.concatenate([members(node.left), members(node.right)])

    partitions: dict[int, np.ndarray] = {}
    frontier = [root]  # the leaves of the tree after len(frontier) - 1 splits, depth-first
    for k in range(1, k_high + 1):
        if k >= k_low:
            labels = np.empty(n, dtype=np.int64)
            for label, node in enumerate(frontier):
                labels[members(node)] = label
            partitions[k] = labels
        if k == k_high:
            break
        scores = [node.score for node in frontier]
        chosen = scores.index(max(scores))  # the first leaf of highest score
        node = frontier[chosen]
        frontier[chosen:chosen + 1] = [node.left, node.right]
    return partitions


def choose_k_and_cluster(
    vectors: np.ndarray,
    k_min: int = 2,
    k_max: int = DEFAULT_K_MAX,
    sample_size: int = DEFAULT_SILHOUETTE_SAMPLE,
    seed: int = 0,
    n_init: int = 1,
) -> WarmupResult:
    """Cluster `vectors` (n, d) with BisectingKMeans for each k in [k_min, k_max]; keep the best.

    One bisecting run gives every k (`bisecting_partitions`).

    The best k has the highest silhouette on a seeded sample of `sample_size` rows (Euclidean on
    L2-normalized rows, i.e. monotone in cosine distance; see the module docstring). k_max is
    capped at the number of distinct rows and at n - 1 (the silhouette needs 2 <= k <= n - 1).
    The same `seed` gives the same result bit for bit (on the same machine and thread count).
    `n_init` is BisectingKMeans' number of tries per bisection.

    Returns a `WarmupResult`; when no k >= max(k_min, 2) is possible it is a single cluster with
    `reason` set, instead of an exception.
    """
    if k_min < 1 or k_max < k_min:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if sample_size < 2:
        raise ValueError(f"sample_size must be at least 2, got {sample_size}")
    unit = unit_rows(vectors)
    n = unit.shape[0]
    k_low = max(k_min, 2)
    if n < 2:
        return _single_cluster(unit, f"{n} document(s): nothing to cluster, one cluster")
    n_distinct = count_distinct_rows(unit, stop_at=min(n, k_max + 1))
    if n_distinct == 1:
        return _single_cluster(unit, f"all {n} documents have the same vector: one cluster")
    k_high = min(k_max, n_distinct, n - 1)
    if k_high < k_low:
        return _single_cluster(
            unit, f"{n} documents with {n_distinct} distinct vectors: too few for "
                  f"k_min={k_low} clusters (silhouette needs 2 <= k <= n - 1), one cluster")

    sample = silhouette_sample_rows(n, sample_size, seed)
    sample_distances = unit_euclidean_distances(unit[sample])  # once, reused for every k
    best: tuple[float, int, np.ndarray] | None = None
    silhouette_by_k: dict[int, float] = {}
    partitions = bisecting_partitions(unit, k_low, k_high, seed, n_init)  # one fit for all k
    for k, labels in partitions.items():
        sample_labels = labels[sample]
        if np.unique(sample_labels).size < 2 or np.unique(sample_labels).size >= len(sample):
            score = -1.0  # undefined on this sample; never preferred over a defined score
        else:
            score = float(silhouette_score(sample_distances, sample_labels,
                                           metric="precomputed"))
        silhouette_by_k[k] = score
        if best is None or score > best[0]:
            best = (score, k, labels)
    assert best is not None
    _, k, labels = best
    # Lloyd from the chosen bisection's means: a partition that k-means leaves as it is,
    # so a re-cluster started from its centroids (tasks.recluster) returns it unchanged
    refined, centroids = spherical_lloyd(unit, normalized_cluster_means(unit, labels, k))
    if len(centroids) >= k_low:  # a cluster emptied below the asked range: keep the bisection
        labels = refined
    else:
        centroids = normalized_cluster_means(unit, labels, k)
    return WarmupResult(labels=labels, centroids=centroids, k=len(centroids),
                        silhouette_by_k=silhouette_by_k, reason=None)
