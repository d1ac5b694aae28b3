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
- Many outliers. The divisive grouping runs on a seeded sample of at most
  `MAX_GROUPED_OUTLIERS` outliers; every outlier then joins the group whose centroid (the
  normalized mean of its sampled members) is nearest. Below the cap nothing is sampled.
- Bounded cluster count. With `max_clusters`, a batch opens at most `max_clusters` minus the
  clusters that exist: the largest groups open clusters (ties: the group with the earlier first
  row), and the documents of the other groups join their nearest cluster among the existing
  and the just-opened ones, although they lie beyond its boundary (`Assignment.capped`).
  Nothing existing is renamed: ids are never reused and no document changes id.

Speed. The nearest-centroid search is one float32 matrix product per block of rows
(`nearest_centroids`; `BLOCK_FLOATS` floats of input per block), the cost of a brute-force
Faiss or BLAS search of the centroids, and memory stays bounded by the block whatever the
batch size: rows are not copied normalized (the similarity is divided by the row's norm),
the outliers are read again from the input block by block, and their (outliers, groups)
similarities are the only per-outlier matrix kept. The input may also be an iterable of
blocks, so a caller can build the vectors (document prototypes, say) block by block without
ever holding all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from driftlane.tasks.memory import DISTANCE_ATOL, CentroidTable
from driftlane.tasks.warmup import unit_rows

SmallClusterRule = Literal["pooled", "join"]

# Input floats per block of the nearest-centroid search: bounds the normalized copy of the
# block and its (block, k) similarities (16M floats: 64 MB of float32 rows).
BLOCK_FLOATS = 1 << 24
# Outliers the divisive grouping sees at most; the others join their nearest group.
MAX_GROUPED_OUTLIERS = 20_000


class Assignment(NamedTuple):
    """Step (c) for m new documents.

    cluster_ids: (m,) int64; distances: (m,) float32 cosine distance to the assigned centroid;
    opened_new: (m,) bool, True where the document opened (or joined) a cluster created in this
    batch; new_centroids: table of the opened clusters only; next_cluster_id: first unused id;
    capped: (m,) bool, True where an outlier joined a cluster beyond its boundary because
    `max_clusters` left no room for its group; member_sums: with `member_sums=True`, (n_ids, d)
    float64 sums of the normalized rows given to each cluster id below next_cluster_id, else
    None.
    """

    cluster_ids: np.ndarray
    distances: np.ndarray
    opened_new: np.ndarray
    new_centroids: CentroidTable
    next_cluster_id: int
    capped: np.ndarray | None = None
    member_sums: np.ndarray | None = None


def block_rows_for(dim: int) -> int:
    """Rows per block of the nearest-centroid search for vectors of width `dim`."""
    return max(1, BLOCK_FLOATS // max(1, dim))


def nearest_centroids(unit: np.ndarray, centroid_vectors: np.ndarray,
                      block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(m,) int64 row of the nearest centroid and (m,) float32 cosine similarity to it.

    unit: (m, d) L2-normalized rows; centroid_vectors: (k, d) unit rows, k >= 1. One float32
    matrix product per block of `block_rows` rows (default `block_rows_for(d)`); ties go to the
    first centroid row.
    """
    m = len(unit)
    block_rows = block_rows or block_rows_for(unit.shape[1])
    transposed = np.ascontiguousarray(np.asarray(centroid_vectors, np.float32).T)  # (d, k)
    nearest = np.empty(m, np.int64)
    similarity = np.empty(m, np.float32)
    for start in range(0, m, block_rows):
        sims = np.asarray(unit[start:start + block_rows], np.float32) @ transposed  # (b, k)
        best = np.argmax(sims, axis=1)
        nearest[start:start + len(best)] = best
        similarity[start:start + len(best)] = sims[np.arange(len(best)), best]
    return nearest, similarity


def unit_block(rows: np.ndarray) -> np.ndarray:
    """Row-normalized float32 copy of `rows` (b, d); zero rows stay zero. The same result as
    `tasks.warmup.unit_rows`, with the norms from one einsum (several times faster than
    `np.linalg.norm` on float32) and a single output allocation."""
    rows = np.asarray(rows, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # (b,)
    norms[norms == 0] = 1.0
    return rows / norms[:, None]


def _blocks(vectors: np.ndarray | Iterable[np.ndarray]
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, norms) blocks: float32 rows as given (slices of an array, no copy when it is
    float32 already, or the caller's blocks) and their L2 norms (1 for zero rows)."""
    if isinstance(vectors, np.ndarray):
        width = vectors.shape[1] if vectors.ndim == 2 else 0
        step = block_rows_for(width)
        blocks: Iterable[np.ndarray] = (vectors[start:start + step]
                                        for start in range(0, len(vectors), step))
        if not len(vectors):
            blocks = [np.zeros((0, width), np.float32)]
    else:
        blocks = vectors
    for block in blocks:
        rows = np.asarray(block, np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # (b,)
        norms[norms == 0] = 1.0
        yield rows, norms


def _add_rows(sums: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    """sums[ids[i]] += rows[i] in float64, as a sparse (n_ids, b) 0/1 matrix times the rows."""
    if not len(ids):
        return
    membership = sparse.csr_matrix((np.ones(len(ids)), (ids, np.arange(len(ids)))),
                                   shape=(len(sums), len(ids)))
    sums += membership @ rows.astype(np.float64)


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
    new_vectors: np.ndarray | Iterable[np.ndarray],
    centroids: CentroidTable,
    stats: pd.DataFrame,
    z: float = 2.0,
    min_cluster_size: int = 5,
    next_cluster_id: int = 0,
    small_cluster_rule: SmallClusterRule = "pooled",
    max_new_clusters: int = 64,
    *,
    max_clusters: int | None = None,
    member_sums: bool = False,
    seed: int = 0,
) -> Assignment:
    """Step (c): assign m new documents (m, d) to their nearest cluster, centroids held fixed.

    A document farther from its nearest centroid than that cluster's boundary (mean + z * std,
    or the small-cluster rule of the module docstring) is an outlier. The batch's outliers are
    grouped (`group_outliers`, radius = the pooled boundary; on a seeded sample past
    `MAX_GROUPED_OUTLIERS`) and each group opens a cluster with a fresh id from
    `next_cluster_id` on, centred on its (sampled) members' normalized mean. With
    `max_clusters`, groups beyond the room left join their nearest cluster instead (module
    docstring). Existing centroids and `stats` are not changed: they stay valid until the next
    refresh.

    `new_vectors` is an (m, d) array or an iterable of (b, d) blocks in document order (rows
    need not be normalized). An array is read again where the outliers are needed; from an
    iterable only the outliers' rows are kept past their block. With `member_sums`, the
    result carries the float64 sums of the normalized rows per cluster id.
    """
    if max_new_clusters < 1:
        raise ValueError(f"max_new_clusters must be at least 1, got {max_new_clusters}")
    if max_clusters is not None and max_clusters < 1:
        raise ValueError(f"max_clusters must be at least 1, got {max_clusters}")
    k = len(centroids)
    boundary = (cluster_boundaries(centroids, stats, z, min_cluster_size, small_cluster_rule)
                if k else None)
    dim = centroids.dim if k else None
    source = new_vectors if isinstance(new_vectors, np.ndarray) else None
    nearest_parts, similarity_parts, outlier_parts, kept_outliers = [], [], [], []
    existing_sums = None
    for block, norms in _blocks(new_vectors):  # (b, d) rows, not normalized: (b,) norms
        if dim is None:
            dim = block.shape[1]
        if block.shape[1] != dim:
            raise ValueError(f"vectors have dim {block.shape[1]}, centroids {dim}")
        if k:
            # the nearest centroid does not depend on the row's norm: divide the similarity
            # only, instead of copying the block normalized
            nearest, similarity = nearest_centroids(block, centroids.vectors)
            similarity /= norms
            outlier = (1.0 - similarity) > boundary[nearest] + DISTANCE_ATOL
        else:  # no cluster yet: the whole batch is grouped into new clusters
            nearest = np.zeros(len(block), np.int64)
            similarity = np.ones(len(block), np.float32)
            outlier = np.ones(len(block), dtype=bool)
        if member_sums and k:
            if existing_sums is None:
                existing_sums = np.zeros((k, dim), np.float64)
            inside = ~outlier
            _add_rows(existing_sums, nearest[inside], block[inside] / norms[inside, None])
        nearest_parts.append(nearest)
        similarity_parts.append(similarity)
        outlier_parts.append(outlier)
        if source is None:  # the caller's blocks cannot be read twice: keep the outliers
            kept_outliers.append(block[outlier] / norms[outlier, None])
    dim = dim if dim is not None else 0
    nearest = np.concatenate(nearest_parts) if nearest_parts else np.zeros(0, np.int64)
    similarity = (np.concatenate(similarity_parts) if similarity_parts
                  else np.zeros(0, np.float32))
    distances = (1.0 - similarity).astype(np.float32) if k else np.zeros(len(nearest),
                                                                          np.float32)
    outlier = np.concatenate(outlier_parts) if outlier_parts else np.zeros(0, dtype=bool)
    cluster_ids = centroids.ids[nearest] if k else np.zeros(len(nearest), np.int64)
    outlier_rows = np.flatnonzero(outlier)
    n_out = len(outlier_rows)
    if source is None:
        kept = (np.concatenate(kept_outliers) if kept_outliers
                else np.zeros((0, dim), np.float32))

        def outliers_at(positions: np.ndarray) -> np.ndarray:  # unit rows of those outliers
            return kept[positions]
    else:
        def outliers_at(positions: np.ndarray) -> np.ndarray:
            return unit_block(source[outlier_rows[positions]].reshape(len(positions), dim))

    # group the outliers (on a seeded sample past MAX_GROUPED_OUTLIERS)
    radius = pooled_boundary(stats, z, min_cluster_size)
    sampled = n_out > MAX_GROUPED_OUTLIERS
    sample = (np.sort(np.random.default_rng(seed).choice(n_out, size=MAX_GROUPED_OUTLIERS,
                                                         replace=False))
              if sampled else np.arange(n_out))
    sample_rows = outliers_at(sample)
    sample_group = group_outliers(sample_rows, radius, max_new_clusters)
    g = int(sample_group.max()) + 1 if len(sample_group) else 0
    centre_sums = np.zeros((g, dim), np.float64)
    _add_rows(centre_sums, sample_group, sample_rows)
    centres = unit_rows(centre_sums)  # (g, d)
    del sample_rows
    # every outlier's similarity to every group centre, block by block: (n_out, g)
    group_sims = np.empty((n_out, g), np.float32)
    step = block_rows_for(dim)
    for first in range(0, n_out, step):
        positions = np.arange(first, min(n_out, first + step))
        group_sims[positions] = outliers_at(positions) @ centres.T
    if sampled:  # every outlier joins its nearest group; a group nobody joins is dropped
        group = np.argmax(group_sims, axis=1) if g else np.zeros(n_out, np.int64)
        used, first_row = np.unique(group, return_index=True)
        order = used[np.argsort(first_row, kind="stable")]  # renumbered by first row
        number = np.full(g, -1, np.int64)
        number[order] = np.arange(len(order))
        group, centres, group_sims = number[group], centres[order], group_sims[:, order]
        g = len(order)
    else:
        group = sample_group

    # the cap: the largest groups open clusters, the others' documents join their nearest
    room = g if max_clusters is None else max(max_clusters - k, 0)
    opening = _groups_that_open(group, g, room if k else max(room, 1))
    n_new = len(opening)
    new_ids = np.arange(next_cluster_id, next_cluster_id + n_new, dtype=np.int64)
    new_centroids = CentroidTable(new_ids, centres[opening].reshape(n_new, dim))
    position = np.full(g, -1, np.int64)
    position[opening] = np.arange(n_new)
    joined = position[group]  # (n_out,) row in new_centroids, -1 for groups without room
    in_new = joined >= 0
    out_ids = cluster_ids[outlier_rows].copy()
    out_distances = distances[outlier_rows].copy()
    own = np.flatnonzero(in_new)
    out_ids[own] = new_ids[joined[own]]
    out_distances[own] = 1.0 - group_sims[own, group[own]]
    no_room = np.flatnonzero(~in_new)
    if len(no_room) and n_new:  # nearest among the existing and the just-opened clusters
        sims = group_sims[np.ix_(no_room, opening)]  # (r, n_new)
        best = np.argmax(sims, axis=1)
        best_sim = sims[np.arange(len(no_room)), best]
        closer = (1.0 - best_sim) < out_distances[no_room]
        out_ids[no_room[closer]] = new_ids[best[closer]]
        out_distances[no_room[closer]] = 1.0 - best_sim[closer]
        in_new[no_room[closer]] = True
    del group_sims

    cluster_ids = cluster_ids.copy()
    cluster_ids[outlier_rows] = out_ids
    distances = distances.copy()
    distances[outlier_rows] = out_distances
    opened_new = np.zeros(len(cluster_ids), dtype=bool)
    opened_new[outlier_rows[in_new]] = True
    capped = np.zeros(len(cluster_ids), dtype=bool)
    capped[outlier_rows[joined < 0]] = True
    next_id = next_cluster_id + n_new

    sums = None
    if member_sums:
        sums = np.zeros((max(next_id, int(centroids.ids.max(initial=-1)) + 1), dim), np.float64)
        if existing_sums is not None:
            sums[centroids.ids] = existing_sums
        for first in range(0, n_out, step):
            positions = np.arange(first, min(n_out, first + step))
            _add_rows(sums, out_ids[positions], outliers_at(positions))
    return Assignment(cluster_ids, distances, opened_new, new_centroids, next_id, capped, sums)


def _groups_that_open(group: np.ndarray, n_groups: int, room: int) -> np.ndarray:
    """Sorted numbers of the groups that open a cluster: all, or the `room` largest (ties: the
    group whose first row comes first; groups are numbered by first row)."""
    if n_groups <= room:
        return np.arange(n_groups)
    sizes = np.bincount(group, minlength=n_groups)
    by_size = np.lexsort((np.arange(n_groups), -sizes))
    return np.sort(by_size[:max(room, 0)])
