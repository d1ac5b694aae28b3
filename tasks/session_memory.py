"""One session's memory update (DESIGN steps 3-6), composed from the clustering building blocks.

`update_memory` takes the previous memory state (None for the first session) and the session's
new documents, and returns the next state:

- First session, a forced re-cluster, or a change of cluster representation: warm-up
  (`tasks.warmup`) over the documents in memory plus the new ones. A re-cluster keeps cluster
  ids by Hungarian matching on member overlap or centroid distance (`tasks.cluster_ids`);
  unmatched clusters get fresh ids, ids are never reused.
- Otherwise, streaming, in the DESIGN order: (a) refresh centroids and per-cluster statistics
  from the current members; (c) assign the new documents to the nearest cluster with those
  centroids held fixed, opening clusters for outliers; (b) evict with the refreshed statistics.
  Eviction runs over the old members and the newly assigned documents together, so memory never
  holds more than the budget at the end of a session (docs/decisions.md). The assignment does
  not depend on whether eviction runs before or after it: centroids and statistics are fixed.

Every document ever seen keeps a row in the assignment table (doc_key, cluster_id, session),
which `driftlane export-clusters` writes for downstream models. Documents outside memory keep
the id they were given; after a re-cluster that id may belong to a retired cluster, which is
still never reused.

Cluster prototypes (SimHash encodings of token embeddings, `tasks.prototypes`) are running
sums indexed by stable cluster id over every document assigned to the cluster; eviction does
not remove a document's contribution (the cluster still holds the document, memory does not),
so prototypes-only memory keeps its cluster prototypes. A re-cluster rebuilds them from the
documents it clustered.

The state is plain arrays and tables (`MemoryState`); saving and loading it (parquet, npy
without pickle, JSON), the cluster-size plot and the Prefect task wrapper come last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from infra.caching import cache_key_for, stage_output_dir
from infra.config import ClusterRepresentation, EmbeddingConfig, MemoryConfig, PrototypeConfig
from infra.faults import crash_point
from infra.io import read_npy, read_parquet
from tasks.cluster_ids import apply_mapping, issue_cluster_ids, match_clusters
from tasks.cluster_quality import cluster_report
from tasks.embedding import EmbeddingCache, doc_texts_of, embed_stage
from tasks.memory import (
    MEMORY_COLUMNS,
    CentroidTable,
    append_to_memory,
    assign_to_nearest_cluster,
    distances_to_centroids,
    empty_memory,
    evict,
    memory_rows,
    next_stream_index,
    refresh_memory,
    statistics_from_distances,
)
from tasks.prototypes import (
    PrototypeSpec,
    add_members,
    cluster_prototype_sums,
    document_prototypes,
    load_prototype_spec,
    make_hyperplanes,
    save_prototype_spec,
)
from tasks.warmup import choose_k_and_cluster

MEMORY_VERSION = "1"
ASSIGNMENT_COLUMNS = ("doc_key", "cluster_id", "session")
STATE_FORMAT = 1


@dataclass(frozen=True)
class MemoryState:
    """The clustered memory after a session.

    memory: n rows, `tasks.memory.MEMORY_COLUMNS`; vectors: (n, d) float32 dense vectors of the
    memory documents; tokens: (T, d) float16 token embeddings of the memory documents, document
    i owning rows token_offsets[i]:token_offsets[i+1]; centroids: in the cluster representation's
    space; stats: per-cluster count/mean/std; assignments: every document seen (doc_key,
    cluster_id, session); prototype_sums (next_cluster_id, D) float64 and prototype_counts
    (next_cluster_id,) int64, indexed by stable id; size_history: (session, cluster_id,
    n_documents) after every session so far.
    """

    memory: pd.DataFrame
    vectors: np.ndarray
    tokens: np.ndarray
    token_offsets: np.ndarray
    centroids: CentroidTable
    stats: pd.DataFrame
    assignments: pd.DataFrame
    prototype_sums: np.ndarray
    prototype_counts: np.ndarray
    size_history: pd.DataFrame
    next_cluster_id: int
    seen: int
    representation: str
    budget: int


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


def prototype_spec_for(config: PrototypeConfig, dim: int) -> PrototypeSpec:
    return PrototypeSpec(n_bits=config.n_bits, n_repetitions=config.n_repetitions,
                         projection_dim=config.projection_dim, seed=config.seed, dim=dim)


def split_tokens(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Views of each document's token rows."""
    return [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def take_ragged(tokens: np.ndarray, offsets: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token rows of documents `rows` (in that order) and their new offsets."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # index of every kept token: its document's start plus its place inside the document
    within = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1], lengths)
    return tokens[np.repeat(starts, lengths) + within], new_offsets


def concat_ragged(a: tuple[np.ndarray, np.ndarray],
                  b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    (ta, oa), (tb, ob) = a, b
    return np.concatenate([ta, tb]), np.concatenate([oa, ob[1:] + oa[-1]]).astype(np.int64)


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
                        assignments, sums, counts, previous.size_history,
                        assignment.next_cluster_id, config, representation, session)
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
    if previous is not None:
        same_space = previous.representation == config.representation.value
        method = config.match_method.value if same_space else "jaccard"
        new_centroids = CentroidTable(np.arange(result.k), result.centroids)
        match = match_clusters(
            pd.Series(old_memory["cluster_id"].to_numpy(np.int64), index=old_memory["doc_key"]),
            pd.Series(labels, index=keys), next_id, min_jaccard=config.min_jaccard,
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

    n_old = len(old_memory)
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
                        sums, counts, previous.size_history if previous is not None else None,
                        next_id, config, config.representation.value, session)
    report = _report(space, candidates, opened, eviction, state, config, len(new.doc_keys))
    report["warmup"] = {"k": result.k, "reason": result.reason,
                        "silhouette_by_k": {str(k): v for k, v in
                                            result.silhouette_by_k.items()}}
    return MemoryUpdate(state, report, notes)


def _kept_state(eviction: Any, all_vectors: np.ndarray, all_tokens: tuple[np.ndarray, np.ndarray],
                centroids: CentroidTable, stats: pd.DataFrame, assignments: pd.DataFrame,
                sums: np.ndarray, counts: np.ndarray, size_history: pd.DataFrame | None,
                next_id: int, config: MemoryConfig, representation: str,
                session: str) -> MemoryState:
    kept = eviction.kept_rows
    tokens, offsets = take_ragged(*all_tokens, kept)
    return MemoryState(
        memory=eviction.memory, vectors=all_vectors[kept], tokens=tokens.astype(np.float16),
        token_offsets=offsets, centroids=centroids, stats=stats,
        assignments=assignments.reset_index(drop=True), prototype_sums=sums,
        prototype_counts=counts, size_history=_size_history(size_history, assignments, session),
        next_cluster_id=int(next_id), seen=int(eviction.seen), representation=representation,
        budget=config.budget)


def _report(space: np.ndarray, candidates: pd.DataFrame, opened: np.ndarray, eviction: Any,
            state: MemoryState, config: MemoryConfig, n_new: int) -> dict[str, Any]:
    report = cluster_report(space, candidates["cluster_id"].to_numpy(np.int64),
                            config.silhouette_sample, config.seed,
                            new_cluster_ids=opened.tolist(),
                            n_evicted=len(eviction.evicted_doc_keys))
    sizes = state.assignments.groupby("cluster_id").size()
    report.update({
        "n_clusters": len(state.centroids),
        "n_new_documents": n_new,
        "memory_size": len(state.memory),
        "memory_budget": config.budget,
        "eviction": config.eviction.value,
        "representation": state.representation,
        "sizes_all_documents": {int(k): int(v) for k, v in sizes.items()},
    })
    return report


# --- saving and loading (parquet, npy without pickle, JSON; any fsspec URL) ---

_ARRAYS = ("vectors", "tokens", "token_offsets", "prototype_sums", "prototype_counts")
_TABLES = ("memory", "stats", "assignments", "size_history")


def save_memory_state(folder: Path, state: MemoryState, spec: PrototypeSpec,
                      planes: dict[str, np.ndarray]) -> None:
    """Write `state` and the prototype spec into a local folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(folder / f"{name}.npy", getattr(state, name), allow_pickle=False)
    np.save(folder / "centroid_ids.npy", state.centroids.ids, allow_pickle=False)
    np.save(folder / "centroids.npy", state.centroids.vectors, allow_pickle=False)
    for name in _TABLES:
        getattr(state, name).to_parquet(folder / f"{name}.parquet", index=False)
    (folder / "state.json").write_text(json.dumps({
        "format": STATE_FORMAT, "next_cluster_id": state.next_cluster_id, "seen": state.seen,
        "representation": state.representation, "budget": state.budget,
        "memory_size": len(state.memory), "n_clusters": len(state.centroids),
    }, indent=2, sort_keys=True))
    save_prototype_spec(str(folder / "prototypes"), spec, planes)


def load_memory_state(url: str) -> tuple[MemoryState, PrototypeSpec, dict[str, np.ndarray]]:
    """Read what `save_memory_state` wrote, from any fsspec URL."""
    url = url.rstrip("/")
    with fsspec.open(f"{url}/state.json", "r") as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{url}: memory state format {meta.get('format')}, "
                         f"this code reads format {STATE_FORMAT}")
    arrays = {name: read_npy(f"{url}/{name}.npy") for name in _ARRAYS}
    tables = {name: read_parquet(f"{url}/{name}.parquet") for name in _TABLES}
    centroids = CentroidTable(read_npy(f"{url}/centroid_ids.npy"),
                              read_npy(f"{url}/centroids.npy"))
    spec, planes = load_prototype_spec(f"{url}/prototypes")
    state = MemoryState(**arrays, **tables, centroids=centroids,
                        next_cluster_id=int(meta["next_cluster_id"]), seen=int(meta["seen"]),
                        representation=meta["representation"], budget=int(meta["budget"]))
    return state, spec, planes


def plot_cluster_sizes(size_history: pd.DataFrame, path: Path) -> None:
    """A PNG of cluster sizes across sessions: one stacked bar per session, one colour per id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = size_history.pivot_table(index="session", columns="cluster_id",
                                     values="n_documents", aggfunc="sum", sort=False).fillna(0)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table)), 4.0))
    bottom = np.zeros(len(table))
    cmap = plt.get_cmap("tab20")
    for i, cluster_id in enumerate(table.columns):
        values = table[cluster_id].to_numpy(float)
        ax.bar(range(len(table)), values, bottom=bottom, color=cmap(i % 20), width=0.7)
        bottom += values
    ax.set_xticks(range(len(table)), [str(s) for s in table.index], rotation=30, ha="right")
    ax.set_ylabel("documents")
    ax.set_title(f"cluster sizes across sessions ({len(table.columns)} cluster ids)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Prefect task wrapper ---


def _report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("n_clusters", "n_new_clusters", "new_clusters", "n_new_documents", "evictions",
            "memory_size", "memory_budget", "silhouette", "davies_bouldin", "calinski_harabasz",
            "dunn", "wcss", "reason")
    return [{"measure": k, "value": json.dumps(report.get(k))} for k in keys]


@task(cache_key_fn=cache_key_for("memory", MEMORY_VERSION), persist_result=True,
      result_serializer="json", task_run_name="memory after {session_name}")
def update_session_memory(session_name: str, ingested: dict, embedded: dict,
                          previous_memory: dict | None, memory: MemoryConfig,
                          scratch_dir: str) -> dict:
    """Warm up or update the clustered memory with the session's documents."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("memory", MEMORY_VERSION, scratch_dir)
    docs = read_parquet(ingested["docs_path"])
    doc_keys = (session_name + "/" + docs["doc_id"].astype(str)).to_numpy(str)
    new = NewDocuments(doc_keys, read_npy(embedded["vectors_path"]),
                       read_npy(embedded["tokens_path"]),
                       read_npy(embedded["token_offsets_path"]))
    previous, stored_spec, planes = None, None, None
    if previous_memory is not None:
        previous, stored_spec, planes = load_memory_state(previous_memory["url"])
    spec = prototype_spec_for(memory.prototypes, int(new.vectors.shape[1]))
    if stored_spec != spec:  # first session, or the prototype settings changed
        if previous is not None:
            logger.warning("prototype settings changed (%s -> %s): re-clustering so that "
                           "cluster prototypes are rebuilt", stored_spec, spec)
            memory = memory.model_copy(update={"recluster": True})
        planes = make_hyperplanes(spec)
    update = update_memory(previous, new, memory, spec, planes, session_name)
    for note in update.notes:
        logger.info("session %s: %s", session_name, note)

    crash_point("memory.write")
    state_dir = out / "memory"
    save_memory_state(state_dir, update.state, spec, planes)
    clusters = update.state.assignments
    (out / "cluster_report.json").write_text(json.dumps(update.report, indent=2,
                                                         sort_keys=True))
    plot_cluster_sizes(update.state.size_history, out / "cluster_sizes.png")
    create_table_artifact(
        key=_artifact_key(session_name), table=_report_table(update.report),
        description=f"Cluster report after session {session_name}")
    logger.info("session %s: %d clusters, memory %d/%d documents, %d evicted, %d new clusters",
                session_name, update.report["n_clusters"], update.report["memory_size"],
                update.report["memory_budget"], update.report["evictions"],
                update.report["n_new_clusters"])
    files = {f"memory/{p.relative_to(state_dir).as_posix()}": str(p)
             for p in sorted(state_dir.rglob("*")) if p.is_file()}
    files["cluster_report.json"] = str(out / "cluster_report.json")
    files["cluster_sizes.png"] = str(out / "cluster_sizes.png")
    return {"files": files, "n_clusters": update.report["n_clusters"],
            "memory_size": update.report["memory_size"], "memory_budget": memory.budget,
            "n_assigned": int(len(clusters)), "seconds": time.perf_counter() - started}


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


@task(cache_key_fn=cache_key_for("memory-reembed", MEMORY_VERSION), persist_result=True,
      result_serializer="json", task_run_name="re-embed-memory after {session_name}")
def reembed_memory(session_name: str, memory: dict, docs_urls: dict[str, str],
                   embedding: EmbeddingConfig, model_version: str, cache_url: str,
                   scratch_dir: str) -> dict:
    """Re-embed the memory documents with the session's new model."""
    started = time.perf_counter()
    out = stage_output_dir("memory-reembed", MEMORY_VERSION, scratch_dir)
    state, spec, planes = load_memory_state(str(Path(memory["files"]["memory/state.json"]).parent))
    keys = state.memory["doc_key"].to_numpy(dtype=object)
    texts = doc_texts_of(state.memory["session"].tolist(), docs_urls)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking, True)
    embedded, _ = embed_stage(f"memory {session_name}", texts.loc[keys].tolist(), embedding,
                              cache)
    tokens, offsets = embedded.stacked_tokens()
    new_state = reembedded_state(state, embedded.vectors, tokens, offsets, spec, planes)
    state_dir = out / "memory"
    save_memory_state(state_dir, new_state, spec, planes)
    files = {**memory["files"], **{f"memory/{p.relative_to(state_dir).as_posix()}": str(p)
                                   for p in sorted(state_dir.rglob("*")) if p.is_file()}}
    get_run_logger().info("re-embedded %d memory documents with model %s", len(keys),
                          model_version)
    return {**memory, "files": files, "reembed_seconds": time.perf_counter() - started}


def _artifact_key(session_name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(c if c.isalnum() else "-" for c in session_name.lower()).strip("-")
    return f"cluster-report-{cleaned or 'session'}"

