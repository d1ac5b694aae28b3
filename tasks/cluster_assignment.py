"""Step (c) of the clustered memory (DESIGN step 5): new documents join their nearest cluster.

The centroids (`tasks.memory.CentroidTable`) and per-cluster statistics of step (a)
(`tasks.memory.refresh_memory`) are held fixed while a batch is assigned: they stay valid until
the next refresh. Distances are the cosine distances `1 - x . c` of `tasks.memory`.

Rules decided here (DESIGN leaves them open):
- Boundary of a cluster: mean + z * std of its members' distances, plus `DISTANCE_ATOL` so that
  a cluster of identical members (std 0) still accepts an identical document.
- Small clusters. A cluster with fewer than `min_cluster_size` members has unreliable statistics
  (a singleton's std is 0, so its own boundary would reject every other document). It therefore
  uses the pooled boundary instead: mean + z * std of the member distances of all reliable
  clusters (count >= min_cluster_size) taken together, a typical cluster radius. With no reliable
  cluster at all, small clusters accept every document (`small_cluster_rule="pooled"`).
  `small_cluster_rule="join"` makes a small cluster accept every document whose nearest cluster
  it is, until it reaches the minimum size.
- Outliers of one batch are grouped before they open clusters, so a new topic arriving as 500
  documents opens a handful of clusters, not 500: divisive 2-means splitting (Steinbach et al.
  2000) of the outliers, starting from one group, splitting the group whose members reach
  farthest from its centroid until every group fits within the pooled boundary (the typical
  cluster radius) or `max_new_clusters` groups exist. Each group opens one cluster.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

from driftlane.tasks.memory import DISTANCE_ATOL, CentroidTable
from driftlane.tasks.warmup import unit_rows

SmallClusterRule = Literal["pooled", "join"]


class Assignment(NamedTuple):
    """Step (c) for m new documents.

    cluster_ids: (m,) int64; distances: (m,) float32 cosine distance to the assigned centroid;
    opened_new: (m,) bool, True where the document opened (or joined) a cluster created in this
    batch; new_centroids: table of the opened clusters only; next_cluster_id: first unused id.
    """

    cluster_ids: np.ndarray
    distances: np.ndarray
    opened_new: np.ndarray
    new_centroids: CentroidTable
    next_cluster_id: int


def pooled_boundary(stats: pd.DataFrame, z: float, min_cluster_size: int) -> float:
    """mean + z * std of all member distances of the clusters with count >= min_cluster_size.

    Computed from the per-cluster rows (law of total variance); inf when no cluster qualifies.
    """
    reliable = stats[(stats["count"] >= max(min_cluster_size, 1)) & stats["mean"].notna()]
    n = float(reliable["count"].sum())
    if n == 0:
        return float("inf")
    count, mean, std = (reliable[c].to_numpy(np.float64) for c in ("count", "mean", "std"))
    pooled_mean = float((count * mean).sum() / n)
    pooled_var = float((count * (std**2 + mean**2)).sum() / n) - pooled_mean**2
    return pooled_mean + z * float(np.sqrt(max(pooled_var, 0.0)))


def cluster_boundaries(
    centroids: CentroidTable,
    stats: pd.DataFrame,
    z: float,
    min_cluster_size: int,
    small_cluster_rule: SmallClusterRule = "pooled",
) -> np.ndarray:
    """(k,) float64 acceptance radius of each centroid's cluster (see the module docstring)."""
    aligned = stats.set_index("cluster_id").reindex(centroids.ids)
    count = aligned["count"].fillna(0).to_numpy(np.float64)
    own = (aligned["mean"] + z * aligned["std"]).to_numpy(np.float64)
    small = (count < max(min_cluster_size, 1)) | np.isnan(own)
    fallback = (pooled_boundary(stats, z, min_cluster_size) if small_cluster_rule == "pooled"
                else float("inf"))
    return np.where(small, fallback, own)


def _split_in_two(unit: np.ndarray, iterations: int = 10) -> np.ndarray:
    """(g,) bool side of a deterministic spherical 2-means split of `unit` (g, d), g >= 2.

    Seeds: the row farthest from the centroid, then the row farthest from that one.
    """
    centre = unit_rows(unit.mean(axis=0, keepdims=True))[0]
    first = int(np.argmin(unit @ centre))
    second = int(np.argmin(unit @ unit[first]))
    seeds = unit[[first, second]]  # (2, d)
    side = np.zeros(len(unit), dtype=bool)
    for _ in range(iterations):  # Lloyd steps on a group, not a loop over documents
        sims = unit @ seeds.T  # (g, 2)
        new_side = sims[:, 1] > sims[:, 0]
        if new_side.all() or not new_side.any():
            break
        if (new_side == side).all():
            break
        side = new_side
        seeds = np.stack([unit_rows(unit[~side].mean(0, keepdims=True))[0],
                          unit_rows(unit[side].mean(0, keepdims=True))[0]])
    if side.all() or not side.any():  # cannot happen for distinct rows; keep groups non-empty
        side = np.arange(len(unit)) >= len(unit) // 2
    return side


def group_outliers(unit: np.ndarray, radius: float, max_groups: int) -> np.ndarray:
    """(m,) int64 group of each outlier row of `unit` (m, d), groups numbered by first row.

    Divisive: start with one group; repeatedly split (spherical 2-means) the group whose members
    reach farthest from its normalized centroid, while that reach exceeds `radius` and fewer than
    `max_groups` groups exist. The loop runs once per split, at most 2 * max_groups times.
    """
    m = len(unit)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    groups = [np.arange(m)]
    reach = [_group_reach(unit, groups[0])]
    while len(groups) < max_groups:
        widest = int(np.argmax(reach))
        if reach[widest] <= radius + DISTANCE_ATOL or len(groups[widest]) < 2:
            break
        members = groups.pop(widest)
        reach.pop(widest)
        side = _split_in_two(unit[members])
        for part in (members[~side], members[side]):
            groups.append(part)
            reach.append(_group_reach(unit, part))
    labels = np.empty(m, dtype=np.int64)
    for number, members in enumerate(sorted(groups, key=lambda g: int(g[0]))):
        labels[members] = number
    return labels


def _group_reach(unit: np.ndarray, members: np.ndarray) -> float:
    if len(members) < 2:
        return 0.0
    centre = unit_rows(unit[members].mean(axis=0, keepdims=True))[0]
    return float((1.0 - unit[members] @ centre).max())


def assign_to_nearest_cluster(
    new_vectors: np.ndarray,
    centroids: CentroidTable,
    stats: pd.DataFrame,
    z: float = 2.0,
    min_cluster_size: int = 5,
    next_cluster_id: int = 0,
    small_cluster_rule: SmallClusterRule = "pooled",
    max_new_clusters: int = 64,
) -> Assignment:
    """Step (c): assign m new documents (m, d) to their nearest cluster, centroids held fixed.

    A document farther from its nearest centroid than that cluster's boundary (mean + z * std,
    or the small-cluster rule of the module docstring) is an outlier. The batch's outliers are
    grouped (`group_outliers`, radius = the pooled boundary) and each group opens a cluster with
    a fresh id from `next_cluster_id` on, centred on its members' normalized mean. Existing
    centroids and `stats` are not changed: they stay valid until the next refresh.
    """
    if max_new_clusters < 1:
        raise ValueError(f"max_new_clusters must be at least 1, got {max_new_clusters}")
    unit = unit_rows(new_vectors)
    m = len(unit)
    if len(centroids) and unit.shape[1] != centroids.dim:
        raise ValueError(f"vectors have dim {unit.shape[1]}, centroids {centroids.dim}")
    if len(centroids):
        sims = unit @ centroids.vectors.T  # (m, k)
        nearest = np.argmax(sims, axis=1)
        distances = (1.0 - sims[np.arange(m), nearest]).astype(np.float32)
        boundary = cluster_boundaries(centroids, stats, z, min_cluster_size, small_cluster_rule)
        outlier = distances > boundary[nearest] + DISTANCE_ATOL
        cluster_ids = centroids.ids[nearest]
    else:  # no cluster yet: the whole batch is grouped into new clusters
        distances = np.zeros(m, dtype=np.float32)
        outlier = np.ones(m, dtype=bool)
        cluster_ids = np.zeros(m, dtype=np.int64)

    outlier_rows = np.flatnonzero(outlier)
    group = group_outliers(unit[outlier_rows], pooled_boundary(stats, z, min_cluster_size),
                           max_new_clusters)
    n_new = int(group.max()) + 1 if len(group) else 0
    new_ids = np.arange(next_cluster_id, next_cluster_id + n_new, dtype=np.int64)
    new_vectors_by_group = np.zeros((n_new, unit.shape[1]), dtype=np.float64)
    np.add.at(new_vectors_by_group, group, unit[outlier_rows])
    new_centroids = CentroidTable(new_ids, new_vectors_by_group)

    cluster_ids = cluster_ids.copy()
    distances = distances.copy()
    cluster_ids[outlier_rows] = new_ids[group]
    distances[outlier_rows] = 1.0 - np.einsum(
        "nd,nd->n", unit[outlier_rows], new_centroids.vectors[group])
    return Assignment(cluster_ids, distances, outlier, new_centroids,
                      next_cluster_id + n_new)
