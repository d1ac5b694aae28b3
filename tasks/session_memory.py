"""The clustered-memory stage of a session flow: thin Prefect tasks over `tasks.memory_update`.

`update_session_memory` reads the session's documents, their embeddings and the previous memory
state, runs `update_memory` (warm-up or streaming update) and writes the next state
(`tasks.memory_state`), a cluster report (JSON and a Prefect table artifact) and a PNG of cluster
sizes across sessions, with the share of earlier documents whose cluster id each session
changed under it (ID stability). `reembed_memory` re-embeds the memory documents with a new model.
`MEMORY_VERSION` is part of both tasks' cache keys, and the cache does not see changes in the
modules these tasks call.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from driftlane.infra.caching import cache_key_for, current_attempt, stage_output_dir
from driftlane.infra.config import EmbeddingConfig, MemoryConfig, PrototypeConfig
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.infra.faults import crash_point
from driftlane.infra.io import read_npy, read_parquet
from driftlane.infra.progress import artifact_key
from driftlane.tasks.embedding_stage import embed_stage
from driftlane.tasks.memory_state import load_memory_state, plot_cluster_sizes, save_memory_state
from driftlane.tasks.memory_update import NewDocuments, reembedded_state, update_memory
from driftlane.tasks.prototypes import PrototypeSpec, make_hyperplanes
from driftlane.tasks.stage_results import (
    EmbeddedSession,
    IngestedSession,
    PreviousMemory,
    StoredMemory,
)
from driftlane.tasks.texts import doc_texts_of

MEMORY_VERSION = "5"  # 5: no prototypes for dense clusters, sampled report, cluster cap
# 4: ID stability (id_history, id_changed_share, second panel)


def prototype_spec_for(config: PrototypeConfig, dim: int) -> PrototypeSpec:
    return PrototypeSpec(n_bits=config.n_bits, n_repetitions=config.n_repetitions,
                         projection_dim=config.projection_dim, seed=config.seed, dim=dim)


# --- Prefect task wrapper ---


def _report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("n_clusters", "n_new_clusters", "new_clusters", "n_new_documents", "evictions",
            "memory_size", "memory_budget", "silhouette", "davies_bouldin", "calinski_harabasz",
            "dunn", "wcss", "sample_size", "n_assigned_before", "id_changed",
            "id_changed_share", "max_live_clusters", "retired_clusters", "capped_documents",
            "reason")
    return [{"measure": k, "value": json.dumps(report.get(k))} for k in keys]


@task(cache_key_fn=cache_key_for("memory", MEMORY_VERSION), persist_result=True,
      result_serializer="json", task_run_name="memory after {session_name}")
def update_session_memory(session_name: str, ingested: IngestedSession,
                          embedded: EmbeddedSession, previous_memory: PreviousMemory | None,
                          memory: MemoryConfig, scratch_dir: str) -> StoredMemory:
    """Warm up or update the clustered memory with the session's documents."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("memory", MEMORY_VERSION, scratch_dir)
    docs = read_parquet(ingested.docs_path)
    doc_keys = (session_name + "/" + docs["doc_id"].astype(str)).to_numpy(str)
    new = NewDocuments(doc_keys, read_npy(embedded.vectors_path), read_npy(embedded.tokens_path),
                       read_npy(embedded.token_offsets_path))
    previous, stored_spec, planes = None, None, None
    if previous_memory is not None:
        previous, stored_spec, planes = load_memory_state(previous_memory.url)
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
    logger.info("session %s: memory update steps (s): %s", session_name,
                ", ".join(f"{k} {v:.2f}" for k, v in update.seconds_by_step.items()))

    crash_point("memory.write")
    state_dir = out / "memory"
    save_memory_state(state_dir, update.state, spec, planes)
    clusters = update.state.assignments
    (out / "cluster_report.json").write_text(json.dumps(update.report, indent=2,
                                                         sort_keys=True))
    plot_cluster_sizes(update.state.size_history, out / "cluster_sizes.png",
                       update.state.id_history)
    create_table_artifact(
        key=artifact_key(f"cluster report {session_name}"), table=_report_table(update.report),
        description=f"Cluster report after session {session_name}")
    logger.info("session %s: %d clusters, memory %d/%d documents, %d evicted, %d new clusters",
                session_name, update.report["n_clusters"], update.report["memory_size"],
                update.report["memory_budget"], update.report["evictions"],
                update.report["n_new_clusters"])
    files = {f"memory/{p.relative_to(state_dir).as_posix()}": str(p)
             for p in sorted(state_dir.rglob("*")) if p.is_file()}
    files["cluster_report.json"] = str(out / "cluster_report.json")
    files["cluster_sizes.png"] = str(out / "cluster_sizes.png")
    return StoredMemory(files=files, n_clusters=update.report["n_clusters"],
                        memory_size=update.report["memory_size"], memory_budget=memory.budget,
                        n_assigned=int(len(clusters)), seconds=time.perf_counter() - started)


@task(cache_key_fn=cache_key_for("memory-reembed", MEMORY_VERSION), persist_result=True,
      result_serializer="json", task_run_name="re-embed-memory after {session_name}")
def reembed_memory(session_name: str, memory: StoredMemory, docs_urls: dict[str, str],
                   embedding: EmbeddingConfig, model_version: str, cache_url: str,
                   scratch_dir: str) -> StoredMemory:
    """Re-embed the memory documents with the session's new model."""
    started = time.perf_counter()
    out = stage_output_dir("memory-reembed", MEMORY_VERSION, scratch_dir)
    state, spec, planes = load_memory_state(memory.state_dir)
    keys = state.memory["doc_key"].to_numpy(dtype=object)
    texts = doc_texts_of(state.memory["session"].tolist(), docs_urls)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking, True)
    embedded, _ = embed_stage(f"memory {session_name}", texts.loc[keys].tolist(), embedding,
                              cache)
    tokens, offsets = embedded.stacked_tokens()
    new_state = reembedded_state(state, embedded.vectors, tokens, offsets, spec, planes)
    state_dir = out / "memory"
    save_memory_state(state_dir, new_state, spec, planes)
    files = {**memory.files, **{f"memory/{p.relative_to(state_dir).as_posix()}": str(p)
                                for p in sorted(state_dir.rglob("*")) if p.is_file()}}
    get_run_logger().info("re-embedded %d memory documents with model %s", len(keys),
                          model_version)
    return memory.model_copy(update={"files": files, "attempt": current_attempt(),
                                     "reembed_seconds": time.perf_counter() - started})
