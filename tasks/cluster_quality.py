"""Cluster quality report for one session (DESIGN step 10).

All indices are computed on L2-normalized rows with Euclidean distance, the chord distance
sqrt(2 - 2 cos), which orders pairs as cosine does and is what k-means minimizes:
- silhouette (Rousseeuw 1987): mean over a seeded sample of rows (it is O(n^2)); higher is better;
- Davies-Bouldin (Davies & Bouldin 1979): full data; lower is better;
- Calinski-Harabasz (Calinski & Harabasz 1974): full data; higher is better;
- Dunn (Dunn 1974), centroid form: min distance between two cluster means divided by the largest
  cluster diameter, each diameter taken as 2 x the largest member-to-mean distance. This is the
  generalized Dunn index with centroid linkage (Bezdek & Pal 1998), O(n d + k^2 d); the diameter
  used bounds the exact one from above (triangle inequality). Higher is better;
- WCSS: sum of squared distances from each member to its cluster mean (k-means inertia).
An index that is undefined for the input (one cluster, every row its own cluster, all clusters
single points) is None, and `reason` says why.

Scale. Past `REPORT_SAMPLE` documents every index is computed on a seeded uniform sample of
that many rows (`report_sample_rows`; the silhouette on a sub-sample of it), so a session of a
million documents costs what 20k cost; `sample_size` in the report says how many rows, and
WCSS, a sum, is scaled by n / sample_size to estimate all documents' WCSS. The document count
and the cluster sizes always cover every document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)

from driftlane.tasks.warmup import silhouette_sample_rows, unit_euclidean_distances, unit_rows

REPORT_SAMPLE = 20_000  # rows the indices are computed on, at most


def report_sample_rows(n: int, report_sample: int = REPORT_SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted rows of the report's seeded sample of n documents (all of them when n is small)."""
    if n <= report_sample:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=report_sample,
                                                            replace=False))


def cluster_means(unit: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64 mean of the rows of `unit` (n, d) with each code in [0, k) (unnormalized)."""
    membership = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                                   shape=(k, len(codes)))  # (k, n) 0/1
    sums = np.asarray(membership @ np.asarray(unit, np.float64))
    return sums / np.bincount(codes, minlength=k)[:, None]


def within_cluster_sum_of_squares(unit: np.ndarray, codes: np.ndarray, k: int) -> float:
    """WCSS: sum over rows of the squared distance to their cluster's mean."""
    means = cluster_means(unit, codes, k)
    return float(((unit - means[codes]) ** 2).sum())


def dunn_index(unit: np.ndarray, codes: np.ndarray, k: int) -> float | None:
    """Centroid-form Dunn index (module docstring); None for k < 2 or zero diameters."""
    if k < 2:
        return None
    means = cluster_means(unit, codes, k)
    reach = np.zeros(k)
    np.maximum.at(reach, codes, np.linalg.norm(unit - means[codes], axis=1))
    diameter = 2.0 * reach.max()
    squared = (means**2).sum(1)
    between = squared[:, None] + squared[None, :] - 2.0 * means @ means.T  # (k, k)
    np.fill_diagonal(between, np.inf)
    separation = float(np.sqrt(max(between.min(), 0.0)))
    return None if diameter == 0 else separation / diameter


def cluster_report(
    vectors: np.ndarray,
    labels: np.ndarray,
    sample_size: int = 2000,
    seed: int = 0,
    *,
    new_cluster_ids: Sequence[int] = (),
    n_evicted: int = 0,
    report_sample: int = REPORT_SAMPLE,
    sample_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Quality report of the clustering `labels` (n,) int of `vectors` (n, d); JSON-ready.

    Keys: n_documents, n_clusters, sizes ({cluster id: member count}), new_clusters (the ids
    given), n_new_clusters, evictions (`n_evicted`), sample_size (rows the indices below are
    computed on: at most `report_sample`, seeded), silhouette (on a seeded sub-sample of
    `sample_size` rows), davies_bouldin, calinski_harabasz, dunn, wcss (scaled to all n
    documents), reason.

    With `sample_rows` (sorted rows of `report_sample_rows`, say), `vectors` holds only those
    rows of the n labelled documents, so that a caller never gathers the others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if sample_rows is None:
        if len(vectors) != n:
            raise ValueError(f"{n} labels for {len(vectors)} vectors")
        sample_rows = report_sample_rows(n, report_sample, seed)
        vectors = vectors if len(sample_rows) == n else vectors[sample_rows]
    elif len(vectors) != len(sample_rows):
        raise ValueError(f"{len(sample_rows)} sample rows for {len(vectors)} vectors")
    ids, counts = np.unique(labels, return_counts=True)
    k = len(ids)
    unit = unit_rows(vectors).astype(np.float64)  # (s, d), the sample
    sample_ids, codes = np.unique(labels[sample_rows], return_inverse=True)
    s, k_sample = len(unit), len(sample_ids)
    report: dict[str, Any] = {
        "n_documents": n,
        "n_clusters": k,
        "sizes": {int(i): int(c) for i, c in zip(ids, counts, strict=True)},
        "new_clusters": sorted(int(i) for i in new_cluster_ids),
        "n_new_clusters": len(new_cluster_ids),
        "evictions": int(n_evicted),
        "sample_size": s,
        "silhouette": None,
        "davies_bouldin": None,
        "calinski_harabasz": None,
        "dunn": None,
        "wcss": (within_cluster_sum_of_squares(unit, codes, k_sample) * n / s) if s else 0.0,
        "reason": None,
    }
    if not 2 <= k_sample <= s - 1:
        sampled = "" if s == n else f" in the report's sample of {s}"
        report["reason"] = (f"{k_sample} cluster(s) for {s} document(s){sampled}: silhouette, "
                            "Davies-Bouldin, Calinski-Harabasz and Dunn need 2 <= clusters <= "
                            "documents - 1")
        return report
    sample = silhouette_sample_rows(s, sample_size, seed)
    sample_codes = codes[sample]
    n_sampled_clusters = np.unique(sample_codes).size
    if 2 <= n_sampled_clusters <= len(sample) - 1:
        report["silhouette"] = float(silhouette_score(
            unit_euclidean_distances(unit[sample]), sample_codes, metric="precomputed"))
    else:
        report["reason"] = (f"the silhouette sample of {len(sample)} rows holds "
                            f"{n_sampled_clusters} cluster(s)")
    with np.errstate(divide="ignore", invalid="ignore"):
        report["davies_bouldin"] = float(davies_bouldin_score(unit, codes))
        report["calinski_harabasz"] = float(calinski_harabasz_score(unit, codes))
    report["dunn"] = dunn_index(unit, codes, k_sample)
    if report["dunn"] is None:
        report["reason"] = "every cluster is a single point: the Dunn index is undefined"
    return report
