"""What one memory update writes down (`tasks.memory_update`): the next state and its report.

Every document ever seen keeps a row in the assignment table (doc_key, cluster_id, session),
which `driftlane export-clusters` writes for downstream models. Documents outside memory keep
the id they were given; after a re-cluster that id may belong to a retired cluster, which is
still never reused. How many of the documents assigned before a session that session gave
another id (`id_changes`; only a re-cluster can) goes into the report and the state's
`id_history`, the ID-stability figure downstream models watch.

`kept_state` builds the next `tasks.memory_state.MemoryState` from the eviction's kept rows,
taken from the (old, new) vectors and tokens without stacking them all (`take_rows`), and
appends the session to the size and ID histories. The per-cluster statistics a streaming
session keeps are running ones over every document a cluster was given: `running_statistics`
aligns them to the refreshed clusters and `pool_statistics` adds a session's documents (law of
total variance). `grown_prototype_sums` widens the cluster prototype sums to new ids;
`no_prototype_sums` is what dense clusters keep instead. `memory_report` is the update's
cluster report (JSON-ready).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from driftlane.infra.config import MemoryConfig
from driftlane.tasks.cluster_quality import cluster_report
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.memory_state import MemoryState, empty_id_history, take_ragged_parts

ASSIGNMENT_COLUMNS = ("doc_key", "cluster_id", "session")


def pool_statistics(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per-cluster count/mean/std of two populations taken together (law of total variance).

    Rows are the union of both tables' cluster ids; a cluster missing from one side (or with
    count 0 there) takes the other side's row.
    """
    ids = np.union1d(a["cluster_id"].to_numpy(np.int64), b["cluster_id"].to_numpy(np.int64))

    def aligned(t: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = t.set_index("cluster_id").reindex(ids)
        n = t["count"].fillna(0).to_numpy(np.float64)
        live = n > 0
        mean = np.where(live, t["mean"].fillna(0).to_numpy(np.float64), 0.0)
        std = np.where(live, t["std"].fillna(0).to_numpy(np.float64), 0.0)
        return n, mean, std

    (na, ma, sa), (nb, mb, sb) = aligned(a), aligned(b)
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (na * ma + nb * mb) / n
        second = (na * (sa**2 + ma**2) + nb * (sb**2 + mb**2)) / n
    std = np.sqrt(np.maximum(second - mean**2, 0.0))
    return pd.DataFrame({"cluster_id": ids, "count": n.astype(np.int64),
                         "mean": np.where(n > 0, mean, np.nan),
                         "std": np.where(n > 0, std, np.nan)})


def running_statistics(running: pd.DataFrame, refreshed: pd.DataFrame) -> pd.DataFrame:
    """The running statistics, aligned to the refreshed clusters; a cluster without a
    running row keeps its refreshed one."""
    ids = refreshed["cluster_id"].to_numpy(np.int64)
    have = running[running["cluster_id"].isin(ids) & (running["count"] > 0)]
    rest = refreshed[~refreshed["cluster_id"].isin(have["cluster_id"])]
    return (pd.concat([have, rest], ignore_index=True).sort_values("cluster_id")
            .reset_index(drop=True))


def grown_prototype_sums(sums: np.ndarray, counts: np.ndarray,
                         n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster prototype sums (ids, D) and counts (ids,) with zero rows up to `n_ids` ids."""
    if sums.shape[0] >= n_ids:
        return sums, counts
    grown = np.zeros((n_ids, sums.shape[1]), np.float64)
    grown[: sums.shape[0]] = sums
    return grown, np.concatenate([counts, np.zeros(n_ids - len(counts), np.int64)])


def no_prototype_sums() -> tuple[np.ndarray, np.ndarray]:
    """The state's cluster prototype arrays when clusters are dense: empty, not computed."""
    return np.zeros((0, 0), np.float64), np.zeros(0, np.int64)


def _size_history(previous: pd.DataFrame | None, assignments: pd.DataFrame,
                  session: str) -> pd.DataFrame:
    sizes = assignments.groupby("cluster_id").size()
    rows = pd.DataFrame({"session": session, "cluster_id": sizes.index.to_numpy(np.int64),
                         "n_documents": sizes.to_numpy(np.int64)})
    return rows if previous is None else pd.concat([previous, rows], ignore_index=True)


def id_changes(previous: pd.DataFrame, assignments: pd.DataFrame) -> int:
    """How many documents of the `previous` assignment table have another cluster id in
    `assignments` (both doc_key, cluster_id; every previous document must be in it)."""
    n = len(previous)
    old_keys = previous["doc_key"].to_numpy(object)
    new_ids = assignments["cluster_id"].to_numpy(np.int64)
    head = assignments["doc_key"].to_numpy(object)[:n]
    if len(head) < n or not (head == old_keys).all():
        # the update keeps previous rows first and in order; look keys up otherwise
        rows = pd.Index(assignments["doc_key"]).get_indexer(old_keys)
        if (rows < 0).any():
            missing = old_keys[rows < 0][:5].tolist()
            raise ValueError(f"documents missing from the new assignments: {missing}")
        new_ids = new_ids[rows]
    return int((new_ids[:n] != previous["cluster_id"].to_numpy(np.int64)).sum())


def _id_history(previous: MemoryState | None, assignments: pd.DataFrame,
                session: str) -> pd.DataFrame:
    history = previous.id_history if previous is not None else empty_id_history()
    before = previous.assignments if previous is not None else assignments.iloc[:0]
    row = pd.DataFrame({"session": pd.Series([session], dtype=str),
                        "n_assigned_before": np.array([len(before)], np.int64),
                        "n_changed": np.array([id_changes(before, assignments)], np.int64)})
    return row if not len(history) else pd.concat([history, row], ignore_index=True)


def take_rows(parts: tuple[np.ndarray, ...], rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (in that order) of the parts stacked, without stacking them."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), parts[0].shape[1]), np.float32)
    first = 0
    for part in parts:
        inside = (rows >= first) & (rows < first + len(part))
        out[inside] = part[rows[inside] - first]
        first += len(part)
    return out


def kept_state(eviction: Any, vectors: tuple[np.ndarray, np.ndarray],
               tokens: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
               centroids: CentroidTable, stats: pd.DataFrame, assignments: pd.DataFrame,
               sums: np.ndarray, counts: np.ndarray, previous: MemoryState | None,
               next_id: int, config: MemoryConfig, representation: str,
               session: str) -> MemoryState:
    """The state keeping the evicted table's rows, taken from (old, new) vectors and tokens."""
    kept = eviction.kept_rows
    size_history = previous.size_history if previous is not None else None
    kept_tokens, offsets = take_ragged_parts(tokens, kept)
    return MemoryState(
        memory=eviction.memory, vectors=take_rows(vectors, kept),
        tokens=kept_tokens.astype(np.float16), token_offsets=offsets, centroids=centroids,
        stats=stats, assignments=assignments.reset_index(drop=True), prototype_sums=sums,
        prototype_counts=counts, size_history=_size_history(size_history, assignments, session),
        id_history=_id_history(previous, assignments, session),
        next_cluster_id=int(next_id), seen=int(eviction.seen), representation=representation,
        budget=config.budget)


def memory_report(sample: np.ndarray, sample_rows: np.ndarray, candidates: pd.DataFrame,
                  opened: np.ndarray, eviction: Any, state: MemoryState, config: MemoryConfig,
                  n_new: int) -> dict[str, Any]:
    """The cluster report of the candidates (memory plus new documents), on their sample
    `sample` (rows `sample_rows` of the candidates)."""
    report = cluster_report(sample, candidates["cluster_id"].to_numpy(np.int64),
                            config.silhouette_sample, config.seed,
                            new_cluster_ids=opened.tolist(),
                            n_evicted=len(eviction.evicted_doc_keys), sample_rows=sample_rows)
    sizes = state.assignments.groupby("cluster_id").size()
    ids = state.id_history.iloc[-1]
    before, changed = int(ids["n_assigned_before"]), int(ids["n_changed"])
    report.update({
        "n_clusters": len(state.centroids),
        "n_new_documents": n_new,
        "memory_size": len(state.memory),
        "memory_budget": config.budget,
        "eviction": config.eviction.value,
        "representation": state.representation,
        "sizes_all_documents": {int(k): int(v) for k, v in sizes.items()},
        # ID stability: of the documents assigned before this session, how many it moved
        "n_assigned_before": before,
        "id_changed": changed,
        "id_changed_share": changed / before if before else None,
    })
    return report
