"""Step (b) of the clustered memory (DESIGN step 5): back under the memory budget.

`evict` takes the memory table (`tasks.memory.MEMORY_COLUMNS`, distances refreshed in step (a))
and the per-cluster statistics, and returns a new kept table with the evicted doc keys and the
kept row positions, so that the caller can take the matching vectors. Strategies: cluster-aware
(each cluster keeps its closest members, the farthest go first), reservoir (Algorithm R over
the stream of every document offered to memory; `reservoir_rows` also serves the query buffer
of `tasks.replay`) and prototypes-only (no member documents).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

from driftlane.tasks.memory import DISTANCE_ATOL

EvictionStrategy = Literal["cluster_aware", "reservoir", "prototypes_only"]


class Eviction(NamedTuple):
    """Step (b): the kept memory table, the evicted doc keys, the kept row positions of the
    input table (so the caller can take the matching vectors), the updated stream counter."""

    memory: pd.DataFrame
    evicted_doc_keys: np.ndarray
    kept_rows: np.ndarray
    seen: int


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
        kept_rows = reservoir_rows(stream_index, budget, seen, seed)
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


def reservoir_rows(stream_index: np.ndarray, budget: int, seen: int, seed: int) -> np.ndarray:
    """Row positions the reservoir keeps (Algorithm R, see `evict`): at most `budget`, by slot.

    stream_index: (n,) int64 place of each row in the stream; rows below `seen` are the current
    reservoir in slot order, the others arrived since. Shared with the query buffer of
    `tasks.replay`, so both keep every item offered so far with the same probability.
    """
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
