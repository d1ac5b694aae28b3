"""One session's memory update (DESIGN steps 3-6), composed from the clustering building blocks.

`update_memory` takes the previous memory state (None for the first session) and the session's
new documents, and returns the next state:

- First session, a forced re-cluster, or a change of cluster representation: warm-up
  (`tasks.warmup`) over the documents in memory plus the new ones. A re-cluster keeps cluster
  ids by Hungarian matching on member overlap or centroid distance (`tasks.cluster_ids`);
  unmatched clusters get fresh ids, ids are never reused.
- Otherwise, streaming, in the DESIGN order: (a) refresh centroids and per-cluster statistics
  from the current members (`tasks.memory`); (c) assign the new documents to the nearest cluster
  with those centroids held fixed, opening clusters for outliers (`tasks.cluster_assignment`);
  (b) evict with the refreshed statistics (`tasks.eviction`). Eviction runs over the old members
  and the newly assigned documents together, so memory never holds more than the budget at the
  end of a session (docs/decisions.md). The assignment does not depend on whether eviction runs
  before or after it: centroids and statistics are fixed.

Every document ever seen keeps a row in the assignment table (doc_key, cluster_id, session),
which `driftlane export-clusters` writes for downstream models. Documents outside memory keep
the id they were given; after a re-cluster that id may belong to a retired cluster, which is
still never reused. How many of the documents assigned before a session that session gave
another id (`id_changes`; only a re-cluster can) goes into the report and the state's
`id_history`, the ID-stability figure downstream models watch.

Cluster prototypes (SimHash encodings of token embeddings, `tasks.prototypes`) are running
sums indexed by stable cluster id over every document assigned to the cluster; eviction does
not remove a document's contribution (the cluster still holds the document, memory does not),
so prototypes-only memory keeps its cluster prototypes. A re-cluster rebuilds them from the
documents it clustered.

The state is plain arrays and tables (`tasks.memory_state.MemoryState`). `reembedded_state`,
last, is the state after the encoder changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from driftlane.infra.config import ClusterRepresentation, MemoryConfig
from driftlane.tasks.cluster_assignment import assign_to_nearest_cluster
from driftlane.tasks.cluster_ids import apply_mapping, issue_cluster_ids, match_clusters
from driftlane.tasks.cluster_quality import cluster_report
from driftlane.tasks.eviction import evict
from driftlane.tasks.memory import (
    MEMORY_COLUMNS,
    CentroidTable,
    append_to_memory,
    distances_to_centroids,
    empty_memory,
    memory_rows,
    next_stream_index,
    refresh_memory,
    statistics_from_distances,
)
from driftlane.tasks.memory_state import (
    MemoryState,
    concat_ragged,
    empty_id_history,
    split_tokens,
    take_ragged,
)
from driftlane.tasks.prototypes import (
    PrototypeSpec,
    add_members,
    cluster_prototype_sums,
    document_prototypes,
)
from driftlane.tasks.warmup import choose_k_and_cluster

ASSIGNMENT_COLUMNS = ("doc_key", "cluster_id", "session")


@dataclass(frozen=True)
class NewDocuments:
    """A session's documents: keys (m,), dense vectors (m, d), tokens (T, d) + offsets (m+1,)."""

    doc_keys: np.ndarray
    vectors: np.ndarray
    tokens: np.ndarray
    token_offsets: np.ndarray


@dataclass(frozen=True)
class MemoryUpdate:
    state: MemoryState
    report: dict[str, Any]
    notes: list[str]


def cluster_space(vectors: np.ndarray, tokens: np.ndarray, offsets: np.ndarray,
                  representation: str, spec: PrototypeSpec,
                  planes: dict[str, np.ndarray]) -> np.ndarray:
    """The vectors clusters are computed on: dense vectors, or document prototypes."""
    if representation == ClusterRepresentation.dense:
        return np.asarray(vectors, dtype=np.float32)
    return document_prototypes(split_tokens(tokens, offsets), spec, planes)


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


def _grow(sums: np.ndarray, counts: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    if sums.shape[0] >= n_ids:
        return sums, counts
    grown = np.zeros((n_ids, sums.shape[1]), np.float64)
    grown[: sums.shape[0]] = sums
    return grown, np.concatenate([counts, np.zeros(n_ids - len(counts), np.int64)])


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


def update_memory(previous: MemoryState | None, new: NewDocuments, config: MemoryConfig,
                  spec: PrototypeSpec, planes: dict[str, np.ndarray],
                  session: str) -> MemoryUpdate:
    """The next memory state after `session` (see the module docstring); inputs unchanged."""
    notes: list[str] = []
    representation = config.representation.value
    new_protos = document_prototypes(split_tokens(new.tokens, new.token_offsets), spec, planes)
    new_space = (np.asarray(new.vectors, np.float32)
                 if representation == ClusterRepresentation.dense else new_protos)
    m = len(new.doc_keys)

    warmup_reason = None
    if previous is None:
        warmup_reason = "first session"
    elif config.recluster:
        warmup_reason = "re-cluster asked for in the configuration"
    elif previous.representation != representation:
        warmup_reason = (f"cluster representation changed from {previous.representation} "
                         f"to {representation}")
    elif len(previous.centroids) == 0:
        warmup_reason = "the previous state holds no cluster"

    if warmup_reason is not None:
        notes.append(f"warm-up: {warmup_reason}")
        return _warm_up(previous, new, new_space, new_protos, config, spec, planes, session,
                        notes)

    # (a) refresh centroids and statistics from the current members
    prev_space = cluster_space(previous.vectors, previous.tokens, previous.token_offsets,
                               representation, spec, planes)
    refreshed = refresh_memory(previous.memory, prev_space, previous.centroids, previous.stats)
    # (c) assign with the refreshed centroids held fixed. The boundaries use the running
    # statistics (every document the cluster was given): the surviving members alone are the
    # closest ones, and their spread would shrink every boundary after each eviction.
    boundary_stats = running_statistics(previous.stats, refreshed.stats)
    assignment = assign_to_nearest_cluster(
        new_space, refreshed.centroids, boundary_stats, z=config.z,
        min_cluster_size=config.min_cluster_size, next_cluster_id=previous.next_cluster_id,
        max_new_clusters=config.max_new_clusters)
    centroids = refreshed.centroids.with_centroids(assignment.new_centroids)
    opened = assignment.new_centroids.ids
    if len(opened):
        notes.append(f"{int(assignment.opened_new.sum())} document(s) beyond their nearest "
                     f"cluster's boundary opened {len(opened)} new cluster(s): "
                     f"{opened.tolist()}")
    new_rows = memory_rows(new.doc_keys, assignment.cluster_ids, assignment.distances, session,
                           next_stream_index(previous.memory, previous.seen))
    candidates = append_to_memory(refreshed.memory, new_rows)
    in_new = np.isin(assignment.cluster_ids, opened)
    opened_stats = statistics_from_distances(assignment.cluster_ids[in_new],
                                             assignment.distances[in_new], opened)
    eviction_stats = pd.concat([refreshed.stats, opened_stats], ignore_index=True)
    # (b) evict with the refreshed statistics, over old members and new documents together
    eviction = evict(candidates, eviction_stats, config.budget, config.eviction.value,
                     z=config.z, min_per_cluster=config.min_per_cluster, seed=config.seed,
                     seen=previous.seen)
    final_stats = pool_statistics(
        boundary_stats, statistics_from_distances(assignment.cluster_ids,
                                                  assignment.distances, centroids.ids))

    sums, counts = _grow(previous.prototype_sums, previous.prototype_counts,
                         assignment.next_cluster_id)
    sums, counts = add_members(sums, counts, new_protos, assignment.cluster_ids)
    assignments = pd.concat([previous.assignments, pd.DataFrame({
        "doc_key": pd.Series(new.doc_keys, dtype=str), "cluster_id": assignment.cluster_ids,
        "session": session})], ignore_index=True)
    all_vectors = np.concatenate([previous.vectors, new.vectors]).astype(np.float32)
    all_tokens = concat_ragged((previous.tokens, previous.token_offsets),
                               (new.tokens, new.token_offsets))
    state = _kept_state(eviction, all_vectors, all_tokens, centroids, final_stats,
                        assignments, sums, counts, previous, assignment.next_cluster_id,
                        config, representation, session)
    candidate_space = np.concatenate([prev_space, new_space])
    report = _report(candidate_space, candidates, opened, eviction, state, config, m)
    return MemoryUpdate(state, report, notes)


def _warm_up(previous: MemoryState | None, new: NewDocuments, new_space: np.ndarray,
             new_protos: np.ndarray, config: MemoryConfig, spec: PrototypeSpec,
             planes: dict[str, np.ndarray], session: str, notes: list[str]) -> MemoryUpdate:
    """Warm-up over memory plus the new documents; ids matched to the previous clusters."""
    if previous is None:
        old_memory, old_vectors = empty_memory(), np.zeros((0, new.vectors.shape[1]), np.float32)
        old_tokens = (np.zeros((0, new.tokens.shape[1]), np.float16), np.zeros(1, np.int64))
        old_space = np.zeros((0, new_space.shape[1]), np.float32)
        old_protos = np.zeros((0, new_protos.shape[1]), np.float32)
        next_id, seen = 0, 0
    else:
        old_memory, old_vectors = previous.memory, previous.vectors
        old_tokens = (previous.tokens, previous.token_offsets)
        old_space = cluster_space(previous.vectors, previous.tokens, previous.token_offsets,
                                  config.representation.value, spec, planes)
        old_protos = document_prototypes(split_tokens(*old_tokens), spec, planes)
        next_id, seen = previous.next_cluster_id, previous.seen
    space = np.concatenate([old_space, new_space])
    keys = np.concatenate([old_memory["doc_key"].to_numpy(str),
                           np.asarray(new.doc_keys, dtype=str)])
    result = choose_k_and_cluster(space, config.k_min, config.k_max, config.silhouette_sample,
                                  config.seed)
    if result.reason:
        notes.append(f"warm-up: {result.reason}")
    else:
        notes.append(f"warm-up chose k={result.k} over {len(space)} documents (silhouette "
                     f"{result.silhouette_by_k.get(result.k, float('nan')):.3f})")

    labels = result.labels
    n_old = len(old_memory)
    if previous is not None:
        same_space = previous.representation == config.representation.value
        method = config.match_method.value if same_space else "jaccard"
        new_centroids = CentroidTable(np.arange(result.k), result.centroids)
        # Old and new clusters are compared on the same documents, the old memory: the new
        # session's documents would inflate the new clusters' side of the overlap, so a
        # topic that many new documents join would lose its id.
        match = match_clusters(
            pd.Series(old_memory["cluster_id"].to_numpy(np.int64), index=old_memory["doc_key"]),
            pd.Series(labels[:n_old], index=keys[:n_old]), next_id,
            min_jaccard=config.min_jaccard,
            method=method, old_centroids=previous.centroids if same_space else None,
            new_centroids=new_centroids, max_centroid_distance=config.max_centroid_distance)
        mapping, next_id = match.mapping, match.next_id
        kept_ids = sorted(set(mapping.values()) & set(previous.centroids.ids.tolist()))
        notes.append(f"re-cluster kept {len(kept_ids)} of {len(previous.centroids)} cluster "
                     f"ids by {method} matching; {result.k - len(kept_ids)} fresh id(s)")
    else:
        fresh, next_id = issue_cluster_ids(next_id, result.k)
        mapping = dict(zip(range(result.k), fresh.tolist(), strict=True))
    stable = apply_mapping(labels, mapping)
    label_ids = apply_mapping(np.arange(result.k), mapping)
    centroids = CentroidTable(label_ids, result.centroids)
    distances = distances_to_centroids(space, stable, centroids)
    stats = statistics_from_distances(stable, distances, centroids.ids)
    old_ids = set(previous.centroids.ids.tolist()) if previous is not None else set()
    opened = np.array(sorted(set(label_ids.tolist()) - old_ids), dtype=np.int64)

    candidates = pd.concat([
        old_memory.assign(cluster_id=stable[:n_old], distance=distances[:n_old]),
        memory_rows(new.doc_keys, stable[n_old:], distances[n_old:], session,
                    next_stream_index(old_memory, seen)),
    ], ignore_index=True)[list(MEMORY_COLUMNS)]
    eviction = evict(candidates, stats, config.budget, config.eviction.value, z=config.z,
                     min_per_cluster=config.min_per_cluster, seed=config.seed, seen=seen)

    sums, counts = cluster_prototype_sums(np.concatenate([old_protos, new_protos]), stable,
                                          next_id)
    previous_assignments = (previous.assignments if previous is not None
                            else pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                                               zip(ASSIGNMENT_COLUMNS, (str, np.int64, str),
                                                   strict=True)}))
    reassigned = dict(zip(keys[:n_old], stable[:n_old], strict=True))
    old_rows = previous_assignments.assign(cluster_id=[
        int(reassigned.get(k, c)) for k, c in zip(previous_assignments["doc_key"],
                                                  previous_assignments["cluster_id"],
                                                  strict=True)])
    assignments = pd.concat([old_rows, pd.DataFrame({
        "doc_key": pd.Series(new.doc_keys, dtype=str), "cluster_id": stable[n_old:],
        "session": session})], ignore_index=True)
    assignments["cluster_id"] = assignments["cluster_id"].astype(np.int64)
    all_vectors = np.concatenate([old_vectors, new.vectors]).astype(np.float32)
    all_tokens = concat_ragged(old_tokens, (new.tokens, new.token_offsets))
    state = _kept_state(eviction, all_vectors, all_tokens, centroids, stats, assignments,
                        sums, counts, previous, next_id, config, config.representation.value,
                        session)
    report = _report(space, candidates, opened, eviction, state, config, len(new.doc_keys))
    report["warmup"] = {"k": result.k, "reason": result.reason,
                        "silhouette_by_k": {str(k): v for k, v in
                                            result.silhouette_by_k.items()}}
    return MemoryUpdate(state, report, notes)


def _kept_state(eviction: Any, all_vectors: np.ndarray, all_tokens: tuple[np.ndarray, np.ndarray],
                centroids: CentroidTable, stats: pd.DataFrame, assignments: pd.DataFrame,
                sums: np.ndarray, counts: np.ndarray, previous: MemoryState | None,
                next_id: int, config: MemoryConfig, representation: str,
                session: str) -> MemoryState:
    kept = eviction.kept_rows
    size_history = previous.size_history if previous is not None else None
    tokens, offsets = take_ragged(*all_tokens, kept)
    return MemoryState(
        memory=eviction.memory, vectors=all_vectors[kept], tokens=tokens.astype(np.float16),
        token_offsets=offsets, centroids=centroids, stats=stats,
        assignments=assignments.reset_index(drop=True), prototype_sums=sums,
        prototype_counts=counts, size_history=_size_history(size_history, assignments, session),
        id_history=_id_history(previous, assignments, session),
        next_cluster_id=int(next_id), seen=int(eviction.seen), representation=representation,
        budget=config.budget)


def _report(space: np.ndarray, candidates: pd.DataFrame, opened: np.ndarray, eviction: Any,
            state: MemoryState, config: MemoryConfig, n_new: int) -> dict[str, Any]:
    report = cluster_report(space, candidates["cluster_id"].to_numpy(np.int64),
                            config.silhouette_sample, config.seed,
                            new_cluster_ids=opened.tolist(),
                            n_evicted=len(eviction.evicted_doc_keys))
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


def reembedded_state(state: MemoryState, vectors: np.ndarray, tokens: np.ndarray,
                     offsets: np.ndarray, spec: PrototypeSpec,
                     planes: dict[str, np.ndarray]) -> MemoryState:
    """The state after the encoder changed: members' vectors and tokens from the new model.

    Centroids and statistics are refreshed from the re-embedded members (clusters without a
    member keep their centroid), the running statistics restart from the members, and the
    cluster prototypes are rebuilt from the members, since old contributions came from
    another model.
    """
    space = cluster_space(vectors, tokens, offsets, state.representation, spec, planes)
    refreshed = refresh_memory(state.memory, space, state.centroids, state.stats)
    protos = document_prototypes(split_tokens(tokens, offsets), spec, planes)
    sums, counts = cluster_prototype_sums(
        protos, state.memory["cluster_id"].to_numpy(np.int64), state.next_cluster_id)
    return replace(state, memory=refreshed.memory, vectors=vectors.astype(np.float32),
                   tokens=tokens.astype(np.float16), token_offsets=offsets,
                   centroids=refreshed.centroids, stats=refreshed.stats,
                   prototype_sums=sums, prototype_counts=counts)
