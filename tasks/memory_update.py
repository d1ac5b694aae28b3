"""One session's memory update (DESIGN steps 3-6): the warm-up and streaming paths, the cluster
cap and retirement rules, and re-embedding; composed from the clustering building blocks.

`update_memory` takes the previous memory state (None for the first session) and the session's
new documents, and returns the next state:

- First session, a forced re-cluster, or a change of cluster representation: warm-up
  (`tasks.warmup`) over the documents in memory plus the new ones. A re-cluster keeps the
  previous clusters, refined, unless a fresh warm-up is clearly better (`tasks.recluster`), and
  keeps cluster ids by Hungarian matching on member overlap or centroid distance
  (`tasks.cluster_ids`); unmatched clusters get fresh ids, ids are never reused.
- Otherwise, streaming, in the DESIGN order: (a) refresh centroids and per-cluster statistics
  from the current members (`tasks.memory`); (c) assign the new documents to the nearest cluster
  with those centroids held fixed, opening clusters for outliers (`tasks.cluster_assignment`);
  (b) evict with the refreshed statistics (`tasks.eviction`). Eviction runs over the old members
  and the newly assigned documents together, so memory never holds more than the budget at the
  end of a session (docs/decisions.md). The assignment does not depend on whether eviction runs
  before or after it: centroids and statistics are fixed.

What both paths write down (the next state's tables, the assignment table and its ID-stability
figure, running statistics, the report) is built by `tasks.memory_records`.

Cluster prototypes (SimHash encodings of token embeddings, `tasks.prototypes`) exist only when
the clusters are computed on prototypes (`representation = prototypes`): running sums indexed
by stable cluster id over every document assigned to the cluster; eviction does not remove a
document's contribution (the cluster still holds the document, memory does not), so
prototypes-only memory keeps its cluster prototypes. A re-cluster rebuilds them from the
documents it clustered. With dense clusters (the default) no document prototype and no cluster
prototype sum is computed (nothing would read them): the state holds empty arrays instead.
On prototypes, the new documents' prototypes are built block by block while they are assigned
(`tasks.cluster_assignment`), and only the outliers' and the report sample's are kept (a
warm-up on prototypes still builds every clustered document's: the clustering needs them all).

Bounded cluster count (decided here; DESIGN leaves it open). Two rules keep the number of live
clusters (those in the centroid table, the ones new documents can join) bounded over a long
stream without renaming anything:
- a cap: at most `max_live_clusters(config)` live clusters, by default the warm-up's largest k
  plus one session's new clusters (`k_max + max_new_clusters`, 84 with the defaults; a config
  field `max_clusters`, when there is one, overrides it). A session opens clusters only for
  the room left; the documents of the outlier groups that find no room join their nearest
  cluster (`tasks.cluster_assignment`, the largest groups open first);
- retirement: a cluster with no member left in memory that was given no new document in the
  last `RETIRE_AFTER_SESSIONS` sessions leaves the centroid table before the assignment (its
  room goes to new topics). Its id is never reused, and its documents keep it in the
  assignment table (downstream models still see the id they learned); it is listed in the
  report's `retired_clusters`.
With cluster-aware eviction every cluster keeps `min_per_cluster` members while the budget
allows, so there the cap is what bounds the count; retirement matters for reservoir and
prototypes-only memory.

Cost at scale. Every step over the new documents is a vectorized pass over blocks of rows
(assignment as one float32 matrix product per block, distances, statistics, eviction ranks);
the quality report runs on a seeded sample (`tasks.cluster_quality.REPORT_SAMPLE`); the kept
members' vectors and tokens are taken from the previous state and the new documents without
stacking them all. `MemoryUpdate.seconds_by_step` gives each step's wall time.

The state is plain arrays and tables (`tasks.memory_state.MemoryState`, assembled by
`tasks.memory_records.kept_state`). `reembedded_state`, last, is the state after the encoder
changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from driftlane.infra.config import ClusterRepresentation, MemoryConfig
from driftlane.tasks.cluster_assignment import assign_to_nearest_cluster, block_rows_for
from driftlane.tasks.cluster_ids import apply_mapping, issue_cluster_ids, match_clusters
from driftlane.tasks.cluster_quality import REPORT_SAMPLE, report_sample_rows
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
from driftlane.tasks.memory_records import (
    ASSIGNMENT_COLUMNS,
    grown_prototype_sums,
    kept_state,
    memory_report,
    no_prototype_sums,
    pool_statistics,
    running_statistics,
    take_rows,
)
from driftlane.tasks.memory_state import MemoryState, split_tokens
from driftlane.tasks.prototypes import (
    PrototypeSpec,
    cluster_prototype_sums,
    document_prototype_blocks,
    document_prototypes,
)
from driftlane.tasks.recluster import warm_up_notes, warm_up_partition

# A memberless cluster given no new document in this many sessions retires (module docstring).
RETIRE_AFTER_SESSIONS = 3
# Floats of the report sample on prototypes (its rows are output_dim wide): 64M, 256 MB.
_REPORT_FLOATS = 1 << 26


@dataclass(frozen=True)
class NewDocuments:
    """A session's documents: keys (m,), dense vectors (m, d), tokens (T, d) + offsets (m+1,)."""

    doc_keys: np.ndarray
    vectors: np.ndarray
    tokens: np.ndarray
    token_offsets: np.ndarray


@dataclass(frozen=True)
class MemoryUpdate:
    """The next state, its cluster report (JSON-ready, the same for the same inputs), notes to
    log, and the wall seconds of each step (kept out of the report, which is published)."""

    state: MemoryState
    report: dict[str, Any]
    notes: list[str]
    seconds_by_step: dict[str, float] = field(default_factory=dict)


def cluster_space(vectors: np.ndarray, tokens: np.ndarray, offsets: np.ndarray,
                  representation: str, spec: PrototypeSpec,
                  planes: dict[str, np.ndarray]) -> np.ndarray:
    """The vectors clusters are computed on: dense vectors, or document prototypes."""
    if representation == ClusterRepresentation.dense:
        return np.asarray(vectors, dtype=np.float32)
    return document_prototypes(split_tokens(tokens, offsets), spec, planes)


def max_live_clusters(config: MemoryConfig) -> int:
    """The cap on live clusters (module docstring): a `max_clusters` config field when there
    is one, else the warm-up's largest k plus one session's new clusters."""
    configured = getattr(config, "max_clusters", None)
    return int(configured) if configured else config.k_max + config.max_new_clusters


def stale_clusters(previous: MemoryState, centroids: CentroidTable,
                   after: int = RETIRE_AFTER_SESSIONS) -> np.ndarray:
    """Sorted ids of the live clusters with no member in memory whose last document came
    `after` or more sessions before the coming one (the sessions of `size_history`)."""
    held = np.unique(previous.memory["cluster_id"].to_numpy(np.int64))
    memberless = centroids.ids[~np.isin(centroids.ids, held)]
    if not len(memberless):
        return memberless
    sessions = pd.unique(previous.size_history["session"].astype(str))
    age_of = {name: len(sessions) - 1 - i for i, name in enumerate(sessions)}  # latest: 0
    ids = previous.assignments["cluster_id"].to_numpy(np.int64)
    rows = np.flatnonzero(np.isin(ids, memberless))[::-1]  # latest row first
    found, first = np.unique(ids[rows], return_index=True)
    last_session = previous.assignments["session"].to_numpy(object)[rows[first]]
    age = dict(zip(found.tolist(), (age_of.get(str(name), 0) for name in last_session),
                   strict=True))
    # a live id that no document carries (none known) counts as stale
    stale = [cid for cid in memberless.tolist() if age.get(cid, len(sessions)) >= after]
    return np.asarray(stale, dtype=np.int64)


class _Steps:
    """Wall seconds per step of one update, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0)
                                       + time.perf_counter() - started, 4)


def _prototype_blocks(new: NewDocuments, spec: PrototypeSpec, planes: dict[str, np.ndarray],
                      keep: np.ndarray, kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    """The new documents' prototypes, one block of documents at a time; the prototypes of
    the (sorted) documents `keep` are appended to `kept` on the way."""
    for start, block in document_prototype_blocks(new.tokens, new.token_offsets, spec, planes,
                                                  block_rows_for(spec.output_dim)):
        wanted = keep[(keep >= start) & (keep < start + len(block))]
        kept.append(block[wanted - start])
        yield block


def _report_rows(n: int, dim: int, config: MemoryConfig) -> np.ndarray:
    """The report's seeded sample of n candidates, smaller for wide (prototype) rows."""
    size = max(config.silhouette_sample, min(REPORT_SAMPLE, _REPORT_FLOATS // max(dim, 1)))
    return report_sample_rows(n, size, config.seed)


def update_memory(previous: MemoryState | None, new: NewDocuments, config: MemoryConfig,
                  spec: PrototypeSpec, planes: dict[str, np.ndarray],
                  session: str) -> MemoryUpdate:
    """The next memory state after `session` (see the module docstring); inputs unchanged."""
    notes: list[str] = []
    steps = _Steps()
    representation = config.representation.value
    on_prototypes = representation == ClusterRepresentation.prototypes
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
        return _warm_up(previous, new, config, spec, planes, session, notes, steps)

    with steps("refresh"):
        # (a) refresh centroids and statistics from the current members
        prev_space = cluster_space(previous.vectors, previous.tokens, previous.token_offsets,
                                   representation, spec, planes)
        refreshed = refresh_memory(previous.memory, prev_space, previous.centroids,
                                   previous.stats)
        retired = stale_clusters(previous, refreshed.centroids)
        if len(retired):
            live = ~np.isin(refreshed.centroids.ids, retired)
            refreshed = refreshed._replace(
                centroids=CentroidTable(refreshed.centroids.ids[live],
                                        refreshed.centroids.vectors[live]),
                stats=refreshed.stats[~refreshed.stats["cluster_id"].isin(retired)]
                .reset_index(drop=True))
            notes.append(f"retired {len(retired)} cluster(s) with no member in memory and no "
                         f"new document in {RETIRE_AFTER_SESSIONS} sessions: {retired.tolist()}")
        # The boundaries use the running statistics (every document the cluster was given):
        # the surviving members alone are the closest ones, and their spread would shrink
        # every boundary after each eviction.
        boundary_stats = running_statistics(previous.stats, refreshed.stats)

    n_prev = len(refreshed.memory)
    sample_rows = _report_rows(n_prev + m, refreshed.centroids.dim, config)
    new_sample: list[np.ndarray] = []
    with steps("assign"):
        # (c) assign with the refreshed centroids held fixed
        vectors = (_prototype_blocks(new, spec, planes, sample_rows[sample_rows >= n_prev]
                                     - n_prev, new_sample)
                   if on_prototypes else new.vectors)
        cap = max_live_clusters(config)
        assignment = assign_to_nearest_cluster(
            vectors, refreshed.centroids, boundary_stats, z=config.z,
            min_cluster_size=config.min_cluster_size, next_cluster_id=previous.next_cluster_id,
            max_new_clusters=config.max_new_clusters, max_clusters=cap,
            member_sums=on_prototypes, seed=config.seed)
    centroids = refreshed.centroids.with_centroids(assignment.new_centroids)
    opened = assignment.new_centroids.ids
    if len(opened):
        notes.append(f"{int(assignment.opened_new.sum())} document(s) beyond their nearest "
                     f"cluster's boundary opened {len(opened)} new cluster(s): "
                     f"{opened.tolist()}")
    n_capped = int(assignment.capped.sum())
    if n_capped:
        notes.append(f"{n_capped} document(s) beyond their nearest cluster's boundary joined "
                     f"their nearest cluster: {len(refreshed.centroids)} live clusters, at "
                     f"most {cap}")

    with steps("evict"):
        new_rows = memory_rows(new.doc_keys, assignment.cluster_ids, assignment.distances,
                               session, next_stream_index(previous.memory, previous.seen))
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

    with steps("state"):
        sums, counts = no_prototype_sums()
        if on_prototypes:
            sums, counts = grown_prototype_sums(previous.prototype_sums,
                                                previous.prototype_counts,
                                                assignment.next_cluster_id)
            sums = sums + assignment.member_sums[:len(sums)]
            counts = counts + np.bincount(assignment.cluster_ids, minlength=len(counts))
        assignments = pd.concat([previous.assignments, pd.DataFrame({
            "doc_key": pd.Series(new.doc_keys, dtype=str), "cluster_id": assignment.cluster_ids,
            "session": session})], ignore_index=True)
        state = kept_state(eviction, (previous.vectors, new.vectors),
                           ((previous.tokens, previous.token_offsets),
                            (new.tokens, new.token_offsets)),
                           centroids, final_stats, assignments, sums, counts, previous,
                           assignment.next_cluster_id, config, representation, session)
    with steps("report"):
        if on_prototypes:
            sample = np.concatenate([prev_space[sample_rows[sample_rows < n_prev]], *new_sample])
        else:
            sample = take_rows((prev_space, new.vectors), sample_rows)
        report = memory_report(sample, sample_rows, candidates, opened, eviction, state,
                               config, m)
    report["retired_clusters"] = retired.tolist()
    report["max_live_clusters"] = cap
    report["capped_documents"] = n_capped
    return MemoryUpdate(state, report, notes, steps.seconds)


def _warm_up(previous: MemoryState | None, new: NewDocuments, config: MemoryConfig,
             spec: PrototypeSpec, planes: dict[str, np.ndarray], session: str,
             notes: list[str], steps: _Steps) -> MemoryUpdate:
    """Warm-up over memory plus the new documents; ids matched to the previous clusters."""
    representation = config.representation.value
    on_prototypes = representation == ClusterRepresentation.prototypes
    with steps("space"):
        new_space = cluster_space(new.vectors, new.tokens, new.token_offsets, representation,
                                  spec, planes)
        if previous is None:
            old_memory = empty_memory()
            old_vectors = np.zeros((0, new.vectors.shape[1]), np.float32)
            old_tokens = (np.zeros((0, new.tokens.shape[1]), np.float16), np.zeros(1, np.int64))
            old_space = np.zeros((0, new_space.shape[1]), np.float32)
            next_id, seen = 0, 0
        else:
            old_memory, old_vectors = previous.memory, previous.vectors
            old_tokens = (previous.tokens, previous.token_offsets)
            old_space = cluster_space(previous.vectors, previous.tokens,
                                      previous.token_offsets, representation, spec, planes)
            next_id, seen = previous.next_cluster_id, previous.seen
        space = np.concatenate([old_space, new_space])
        del new_space, old_space
    keys = np.concatenate([old_memory["doc_key"].to_numpy(str),
                           np.asarray(new.doc_keys, dtype=str)])
    n_old = len(old_memory)
    with steps("warm-up"):
        old_ids = None if previous is None else old_memory["cluster_id"].to_numpy(np.int64)
        result, chosen = warm_up_partition(space, old_ids, config)
    notes.extend(warm_up_notes(result, chosen, len(space), config.recluster_margin))

    labels = result.labels
    if previous is not None:
        same_space = previous.representation == representation
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
    with steps("evict"):
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

    with steps("state"):
        sums, counts = (cluster_prototype_sums(space, stable, next_id) if on_prototypes
                        else no_prototype_sums())
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
        state = kept_state(eviction, (old_vectors, new.vectors),
                           (old_tokens, (new.tokens, new.token_offsets)), centroids, stats,
                           assignments, sums, counts, previous, next_id, config,
                           representation, session)
    with steps("report"):
        sample_rows = _report_rows(len(space), space.shape[1], config)
        report = memory_report(space[sample_rows], sample_rows, candidates, opened, eviction,
                               state, config, len(new.doc_keys))
    report["warmup"] = {"k": result.k, "reason": result.reason,
                        "silhouette_by_k": {str(k): v for k, v in
                                            result.silhouette_by_k.items()}}
    if chosen is not None:
        report["warmup"]["recluster"] = chosen.record(config.recluster_margin)
    report["retired_clusters"] = []
    report["max_live_clusters"] = max_live_clusters(config)
    report["capped_documents"] = 0
    return MemoryUpdate(state, report, notes, steps.seconds)


def reembedded_state(state: MemoryState, vectors: np.ndarray, tokens: np.ndarray,
                     offsets: np.ndarray, spec: PrototypeSpec,
                     planes: dict[str, np.ndarray]) -> MemoryState:
    """The state after the encoder changed: members' vectors and tokens from the new model.

    Centroids and statistics are refreshed from the re-embedded members (clusters without a
    member keep their centroid), the running statistics restart from the members, and the
    cluster prototypes (on prototypes only; dense clusters keep none) are rebuilt from the
    members, since old contributions came from another model.
    """
    space = cluster_space(vectors, tokens, offsets, state.representation, spec, planes)
    refreshed = refresh_memory(state.memory, space, state.centroids, state.stats)
    sums, counts = no_prototype_sums()
    if state.representation == ClusterRepresentation.prototypes:  # space holds the prototypes
        sums, counts = cluster_prototype_sums(
            space, state.memory["cluster_id"].to_numpy(np.int64), state.next_cluster_id)
    return replace(state, memory=refreshed.memory, vectors=vectors.astype(np.float32),
                   tokens=tokens.astype(np.float16), token_offsets=offsets,
                   centroids=refreshed.centroids, stats=refreshed.stats,
                   prototype_sums=sums, prototype_counts=counts)
