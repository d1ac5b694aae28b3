"""Clustered memory of past documents (DESIGN step 5): refresh, evict, assign.

State. The memory table is a DataFrame, one row per remembered document, with the columns of
`MEMORY_COLUMNS`: doc_key (str, `<session>/<doc id>`), cluster_id (int64, a stable id, see
`tasks.cluster_ids`), distance (float32, cosine distance to its cluster's centroid), session (str)
and stream_index (int64, the document's position in the stream of every document ever offered
to memory; the reservoir needs it). Row i of the table goes with row i of the caller's vector
array. Centroids live in a `CentroidTable` keyed by cluster id. Every function here returns new
tables and arrays; none edits its inputs.

Geometry. Vectors are L2-normalized embeddings or prototypes (normalized again here, on a copy).
Centroids are L2-normalized member means, and the distance of a document x to cluster c is the
cosine distance `1 - x . c` (in [0, 2]). Per-cluster statistics are the count, mean and population
standard deviation (ddof=0) of the members' distances.

One session, in the DESIGN order:
  (a) `refresh_memory`: centroids from the current members (`refresh_centroids`), every member's
      distance recomputed, statistics per cluster (`cluster_statistics`);
  (b) `evict`: back under the memory budget with the refreshed statistics;
  (c) `assign_to_nearest_cluster`: new documents join their nearest cluster, centroids and
      statistics held fixed, or open new clusters;
  then `append_to_memory` adds the new documents (their rows come from `memory_rows`).

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
- Statistics of a cluster with no member left in memory (after prototypes-only eviction, say)
  are carried over from the previous statistics when given, so its boundary survives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

from tasks.warmup import unit_rows

DISTANCE_ATOL = 1e-5
MEMORY_COLUMNS = ("doc_key", "cluster_id", "distance", "session", "stream_index")
STATS_COLUMNS = ("cluster_id", "count", "mean", "std")
EvictionStrategy = Literal["cluster_aware", "reservoir", "prototypes_only"]
SmallClusterRule = Literal["pooled", "join"]


@dataclass(frozen=True)
class CentroidTable:
    """Cluster centroids keyed by stable cluster id.

    ids: (k,) int64, sorted, unique; vectors: (k, d) float32, L2-normalized rows.
    """

    ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids for centroid array of shape {vectors.shape}")
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and (np.diff(ids) == 0).any():
            raise ValueError("duplicate cluster ids in centroid table")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "vectors", unit_rows(vectors[order]))

    @classmethod
    def from_mapping(cls, centroids_by_id: Mapping[int, np.ndarray], dim: int) -> CentroidTable:
        """Table from {cluster_id: (d,) vector}; `dim` fixes d when the mapping is empty."""
        ids = np.fromiter(centroids_by_id.keys(), dtype=np.int64, count=len(centroids_by_id))
        vectors = (np.stack([np.asarray(v, np.float32) for v in centroids_by_id.values()])
                   if centroids_by_id else np.zeros((0, dim), np.float32))
        return cls(ids, vectors)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def as_dict(self) -> dict[int, np.ndarray]:
        """{cluster_id: (d,) float32 vector}."""
        return {int(i): v for i, v in zip(self.ids, self.vectors, strict=True)}

    def rows_of(self, cluster_ids: np.ndarray) -> np.ndarray:
        """Row positions of `cluster_ids` in this table; KeyError for an unknown id."""
        return positions_in(self.ids, cluster_ids, "centroid table")

    def with_centroids(self, other: CentroidTable) -> CentroidTable:
        """New table: these centroids, replaced or extended by those of `other`."""
        keep = ~np.isin(self.ids, other.ids)
        return CentroidTable(np.concatenate([self.ids[keep], other.ids]),
                             np.concatenate([self.vectors[keep], other.vectors]))


class RefreshedMemory(NamedTuple):
    """Step (a): the memory table with fresh distances, the refreshed centroids, statistics."""

    memory: pd.DataFrame
    centroids: CentroidTable
    stats: pd.DataFrame


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


class Eviction(NamedTuple):
    """Step (b): the kept memory table, the evicted doc keys, the kept row positions of the
    input table (so the caller can take the matching vectors), the updated stream counter."""

    memory: pd.DataFrame
    evicted_doc_keys: np.ndarray
    kept_rows: np.ndarray
    seen: int


def positions_in(sorted_ids: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    """(n,) positions of `values` in the sorted unique array `sorted_ids`; KeyError if absent."""
    values = np.asarray(values, dtype=np.int64)
    rows = np.searchsorted(sorted_ids, values)
    found = rows < len(sorted_ids)
    found[found] = sorted_ids[rows[found]] == values[found]
    if not found.all():
        unknown = np.unique(values[~found])
        raise KeyError(f"cluster ids not in the {what}: {unknown[:10].tolist()}")
    return rows


# --- the memory table ---


def empty_memory() -> pd.DataFrame:
    """A memory table with no rows and the `MEMORY_COLUMNS` dtypes."""
    return memory_rows([], np.zeros(0, np.int64), np.zeros(0, np.float32), "", 0)


def memory_rows(
    doc_keys: Sequence[str] | np.ndarray,
    cluster_ids: np.ndarray,
    distances: np.ndarray,
    session: str,
    first_stream_index: int,
) -> pd.DataFrame:
    """Memory rows for one session's documents, stream indices from `first_stream_index` on."""
    n = len(doc_keys)
    return pd.DataFrame({
        "doc_key": pd.Series(np.asarray(doc_keys, dtype=object), dtype=str),
        "cluster_id": np.asarray(cluster_ids, dtype=np.int64),
        "distance": np.asarray(distances, dtype=np.float32),
        "session": pd.Series([session] * n, dtype=str),
        "stream_index": np.arange(first_stream_index, first_stream_index + n, dtype=np.int64),
    })


def next_stream_index(memory: pd.DataFrame, seen: int) -> int:
    """First unused stream index: after every document seen or still held in memory."""
    held = int(memory["stream_index"].max()) + 1 if len(memory) else 0
    return max(seen, held)


def append_to_memory(memory: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """New table: `memory` followed by `rows`; a doc_key already in memory is an error."""
    clash = np.intersect1d(memory["doc_key"].to_numpy(str), rows["doc_key"].to_numpy(str))
    if clash.size:
        raise ValueError(f"documents already in memory: {clash[:5].tolist()}")
    return pd.concat([memory, rows], ignore_index=True)[list(MEMORY_COLUMNS)]


# --- step (a): centroids, distances, statistics ---


def distances_to_centroids(
    vectors: np.ndarray, cluster_ids: np.ndarray, centroids: CentroidTable
) -> np.ndarray:
    """(n,) float32 cosine distance of each row of `vectors` (n, d) to its cluster's centroid."""
    unit = unit_rows(vectors)
    own = centroids.vectors[centroids.rows_of(cluster_ids)]  # (n, d)
    return (1.0 - np.einsum("nd,nd->n", unit, own)).astype(np.float32)


def statistics_from_distances(
    cluster_ids: np.ndarray,
    distances: np.ndarray,
    all_cluster_ids: np.ndarray,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per-cluster count, mean and population std of `distances`, one row per `all_cluster_ids`.

    A cluster without members takes its row from `previous` when it has one there, and is
    otherwise count 0 with NaN mean and std. Sorted by cluster_id.
    """
    all_ids = np.unique(np.asarray(all_cluster_ids, dtype=np.int64))
    rows = positions_in(all_ids, cluster_ids, "all_cluster_ids")
    d = np.asarray(distances, dtype=np.float64)
    count = np.bincount(rows, minlength=len(all_ids)).astype(np.int64)
    total = np.bincount(rows, weights=d, minlength=len(all_ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        # second pass around the mean: no cancellation for tight clusters
        centred = d - mean[rows] if len(d) else d
        var = np.bincount(rows, weights=centred * centred, minlength=len(all_ids)) / count
    std = np.sqrt(var)
    if previous is not None and len(previous):
        carried = previous.set_index("cluster_id").reindex(all_ids)
        take = (count == 0) & carried["count"].notna().to_numpy()
        count = np.where(take, carried["count"].fillna(0).to_numpy(np.int64), count)
        mean = np.where(take, carried["mean"].to_numpy(np.float64), mean)
        std = np.where(take, carried["std"].to_numpy(np.float64), std)
    return pd.DataFrame({"cluster_id": all_ids, "count": count.astype(np.int64),
                         "mean": mean.astype(np.float64), "std": std.astype(np.float64)})


def cluster_statistics(
    vectors: np.ndarray,
    cluster_ids: np.ndarray,
    centroids: CentroidTable,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """DataFrame(cluster_id, count, mean, std) of member-to-centroid cosine distances.

    vectors: (n, d) members; cluster_ids: (n,) their clusters; one row per centroid id.
    Clusters without members: see `statistics_from_distances`.
    """
    distances = distances_to_centroids(vectors, cluster_ids, centroids)
    return statistics_from_distances(np.asarray(cluster_ids, np.int64), distances,
                                     centroids.ids, previous)


def refresh_centroids(
    vectors: np.ndarray, cluster_ids: np.ndarray, centroids: CentroidTable
) -> CentroidTable:
    """New table: each cluster's centroid is the normalized mean of its members (n, d).

    Clusters with no member in `vectors` keep their centroid (e.g. prototypes-only memory).
    """
    rows = centroids.rows_of(cluster_ids)
    sums = np.zeros(centroids.vectors.shape, dtype=np.float64)
    np.add.at(sums, rows, unit_rows(vectors))
    has_members = np.bincount(rows, minlength=len(centroids)) > 0
    refreshed = np.where(has_members[:, None], unit_rows(sums), centroids.vectors)
    return CentroidTable(centroids.ids, refreshed)


def refresh_memory(
    memory: pd.DataFrame,
    vectors: np.ndarray,
    centroids: CentroidTable,
    previous_stats: pd.DataFrame | None = None,
) -> RefreshedMemory:
    """Step (a): refreshed centroids, the memory table with fresh distances, statistics.

    memory: n rows, vectors: (n, d) in the same order.
    """
    if len(memory) != len(vectors):
        raise ValueError(f"{len(memory)} memory rows for {len(vectors)} vectors")
    cluster_ids = memory["cluster_id"].to_numpy(np.int64)
    refreshed = refresh_centroids(vectors, cluster_ids, centroids)
    distances = distances_to_centroids(vectors, cluster_ids, refreshed)
    stats = statistics_from_distances(cluster_ids, distances, refreshed.ids, previous_stats)
    return RefreshedMemory(memory.assign(distance=distances), refreshed, stats)


# --- step (c): assignment with fixed centroids ---


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


# --- step (b): eviction ---


def evict(
    memory: pd.DataFrame,
    stats: pd.DataFrame | None,
    budget: int,
    strategy: EvictionStrategy = "cluster_aware",
    z: float = 2.0,
    min_per_cluster: int = 2,
    seed: int = 0,
    seen: int = 0,
) -> Eviction:
    """Step (b): bring `memory` within `budget` rows; the result never holds more than budget.

    - cluster_aware: when over budget, rank rows and keep the first `budget`: first each cluster's
      `min_per_cluster` closest members (closest of every cluster before any second; between
      clusters, bigger first), then members within mean + z * std of their cluster, then those
      beyond it; inside a tier by standardized distance (d - mean) / std, so the farthest go
      first. Uses the `distance` column (refreshed in step (a)) and `stats`.
    - reservoir: Algorithm R (Vitter 1985) over the stream, vectorized. Rows with
      stream_index < seen are the current reservoir (in slot order); the others arrived since,
      and are offered in stream order: the t-th item (0-based) fills a free slot, or replaces slot
      r ~ U{0..t} when r < budget. The same seed and state give the same sample.
    - prototypes_only: keeps no member documents (the centroids stay with the caller).

    Returns the kept table (a new frame), the evicted doc keys, kept row positions and the new
    `seen` (seen plus the number of rows with stream_index >= seen).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    stream_index = memory["stream_index"].to_numpy(np.int64)
    new_seen = seen + int((stream_index >= seen).sum())
    if strategy == "prototypes_only":
        kept_rows = np.zeros(0, dtype=np.int64)
    elif strategy == "reservoir":
        kept_rows = _reservoir_rows(stream_index, budget, seen, seed)
    elif strategy == "cluster_aware":
        if stats is None:
            raise ValueError("cluster_aware eviction needs the refreshed cluster statistics")
        kept_rows = _cluster_aware_rows(memory, stats, budget, z, min_per_cluster)
    else:
        raise ValueError(f"unknown eviction strategy {strategy!r}")
    kept_mask = np.zeros(len(memory), dtype=bool)
    kept_mask[kept_rows] = True
    evicted = memory["doc_key"].to_numpy(dtype=object)[~kept_mask]
    kept = memory.iloc[kept_rows].reset_index(drop=True)
    return Eviction(kept, evicted, kept_rows, new_seen)


def _cluster_aware_rows(
    memory: pd.DataFrame, stats: pd.DataFrame, budget: int, z: float, min_per_cluster: int
) -> np.ndarray:
    n = len(memory)
    if n <= budget:
        return np.arange(n)
    cluster_ids = memory["cluster_id"].to_numpy(np.int64)
    distance = memory["distance"].to_numpy(np.float64)
    aligned = stats.set_index("cluster_id").reindex(cluster_ids)
    if aligned["count"].isna().any():
        missing = np.unique(cluster_ids[aligned["count"].isna().to_numpy()])
        raise KeyError(f"no statistics for clusters {missing[:10].tolist()}")
    mean = aligned["mean"].to_numpy(np.float64)
    std = aligned["std"].fillna(0.0).to_numpy(np.float64)
    mean = np.where(np.isnan(mean), distance, mean)
    excess = distance - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        standardized = np.where(std > 0, excess / std,
                                np.where(excess > DISTANCE_ATOL, np.inf, 0.0))
    outlier = distance > mean + z * std + DISTANCE_ATOL

    rows = np.arange(n)
    by_cluster = np.lexsort((rows, distance, cluster_ids))  # closest first inside each cluster
    sorted_ids = cluster_ids[by_cluster]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.empty(n, dtype=np.int64)
    rank[by_cluster] = np.arange(n) - np.repeat(starts, sizes)
    cluster_size = np.empty(n, dtype=np.int64)
    cluster_size[by_cluster] = np.repeat(sizes, sizes)

    protected = rank < min_per_cluster
    tier = np.where(protected, 0, np.where(outlier, 2, 1))
    within = np.where(protected, rank.astype(np.float64), standardized)
    bigger_first = np.where(protected, -cluster_size, 0)
    order = np.lexsort((rows, cluster_ids, bigger_first, within, tier))
    return np.sort(order[:budget])


def _reservoir_rows(stream_index: np.ndarray, budget: int, seen: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, seen])  # a fresh stream per call: draws stay independent
    old = np.flatnonzero(stream_index < seen)
    arrived = np.flatnonzero(stream_index >= seen)
    arrived = arrived[np.argsort(stream_index[arrived], kind="stable")]
    if len(old) > budget:  # budget shrank: a uniform subsample of a uniform sample
        old = old[np.sort(rng.choice(len(old), size=budget, replace=False))]
    n_fill = min(len(arrived), budget - len(old))
    slots = np.concatenate([old, arrived[:n_fill]])
    rest = arrived[n_fill:]
    if len(rest):
        position = seen + n_fill + np.arange(len(rest))  # 0-based place in the stream
        slot = rng.integers(0, position + 1)  # r ~ U{0..t}, one draw per arriving item
        takes = slot < budget
        winners, slot = rest[takes], slot[takes]
        # sequential semantics: a later arrival overwrites an earlier one in the same slot
        unique_slots, last = np.unique(slot[::-1], return_index=True)
        slots = slots.copy()
        slots[unique_slots] = winners[::-1][last]
    return slots
