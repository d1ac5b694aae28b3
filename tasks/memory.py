"""Clustered memory of past documents (DESIGN step 5): the memory table, centroids, statistics.

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
standard deviation (ddof=0) of the members' distances. Distances closer than `DISTANCE_ATOL`
count as equal.

One session, in the DESIGN order:
  (a) `refresh_memory` (this module): centroids from the current members (`refresh_centroids`),
      every member's distance recomputed, statistics per cluster (`cluster_statistics`);
  (b) `tasks.eviction.evict`: back under the memory budget with the refreshed statistics;
  (c) `tasks.cluster_assignment.assign_to_nearest_cluster`: new documents join their nearest
      cluster, centroids and statistics held fixed, or open new clusters;
  then `append_to_memory` adds the new documents (their rows come from `memory_rows`).

Rule decided here (DESIGN leaves it open): statistics of a cluster with no member left in memory
(after prototypes-only eviction, say) are carried over from the previous statistics when given,
so its boundary survives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from driftlane.tasks.warmup import unit_rows

DISTANCE_ATOL = 1e-5
MEMORY_COLUMNS = ("doc_key", "cluster_id", "distance", "session", "stream_index")
STATS_COLUMNS = ("cluster_id", "count", "mean", "std")
# Input floats per block of `distances_to_centroids` (16M: 64 MB of float32 rows).
DISTANCE_BLOCK_FLOATS = 1 << 24


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
    clash = rows["doc_key"].isin(memory["doc_key"]).to_numpy()  # hashing, not sorting
    if clash.any():
        raise ValueError(f"documents already in memory: "
                         f"{rows['doc_key'][clash].head(5).tolist()}")
    return pd.concat([memory, rows], ignore_index=True)[list(MEMORY_COLUMNS)]


# --- step (a): centroids, distances, statistics ---


def distances_to_centroids(
    vectors: np.ndarray, cluster_ids: np.ndarray, centroids: CentroidTable
) -> np.ndarray:
    """(n,) float32 cosine distance of each row of `vectors` (n, d) to its cluster's centroid.

    Computed over blocks of rows, so that the normalized copy and the gathered centroids stay
    bounded (`DISTANCE_BLOCK_FLOATS`) whatever n.
    """
    rows = centroids.rows_of(cluster_ids)
    out = np.empty(len(rows), np.float32)
    step = max(1, DISTANCE_BLOCK_FLOATS // max(1, centroids.dim))
    for start in range(0, len(rows), step):
        unit = unit_rows(vectors[start:start + step])  # (b, d)
        own = centroids.vectors[rows[start:start + step]]  # (b, d)
        out[start:start + len(unit)] = 1.0 - np.einsum("nd,nd->n", unit, own)
    return out


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
