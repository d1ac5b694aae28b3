"""Decide what a session run has to do, and publish its outputs into the store (DESIGN 11).

`plan_session` looks at the store before any work: a session already published with the
same content is a no-op, a different session under a published name is an error.
`publish_session` gathers the outputs of the cached stages into one local folder and hands
it to the store, which stages, renames and writes the manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from driftlane.infra.caching import StageResult, current_attempt, scratch_for
from driftlane.infra.config import SessionConfig
from driftlane.infra.store import REINDEX_DIR, REINDEX_RECORD, SessionManifest, Store
from driftlane.infra.writer import held_store_lock
from driftlane.tasks.ingest import MAX_DOCUMENT_CHARS, SessionFormatError, validate_session
from driftlane.tasks.session_files import session_digest
from driftlane.tasks.stage_results import (
    BuiltIndex,
    EmbeddedSession,
    IndexBlock,
    IngestedSession,
    PreviousMemory,
    PreviousModel,
    PreviousTraining,
    ReembeddedSources,
    SampledTraining,
    SearchableIndex,
    SessionEvaluation,
    SessionPlan,
    Source,
    StoredMemory,
    TrainedModel,
)

INDEX_BLOCKS = "index_blocks.json"
MEMORY_STATE = "memory/state.json"
MODEL_WEIGHTS = "model/model.safetensors"
QUERY_BUFFER = "training/query_buffer.parquet"
ALIGNMENT_MAP = "alignment.npy"



def published_sources(store: Store, manifests: list[SessionManifest]) -> list[Source]:
    """Each published session's documents, vectors, queries and qrels, in order."""
    return [Source(session=m.name,
                   docs_url=store.session_url(m, "docs.parquet"),
                   vectors_url=store.session_url(m, "doc_vectors.npy"),
                   vectors_sha256=m.files["doc_vectors.npy"]["sha256"],
                   queries_url=store.session_url(m, "queries.parquet"),
                   qrels_url=store.session_url(m, "qrels.parquet"),
                   qrels_sha256=m.files["qrels.parquet"]["sha256"],
                   metrics_url=store.session_url(m, "metrics.json"),
                   # aligned and compatible sessions store vectors of another model
                   model_version=m.summary.get("vectors_model_version", m.model_version))
            for m in manifests]


def published_blocks(store: Store, manifests: list[SessionManifest]) -> list[IndexBlock]:
    """The blocks the latest session searches, with their URLs: those of its re-index when
    `driftlane reindex` wrote one (reindex/<folder>/), else its own index_blocks.json.

    A session published before shards existed searched its own index.faiss: one block.
    """
    if not manifests:
        return []
    last = manifests[-1]
    reindexed = f"{REINDEX_DIR}/{last.folder}"
    if store.fs.exists(store.path(reindexed, REINDEX_RECORD)):
        with store.fs.open(store.path(reindexed, INDEX_BLOCKS), "rb") as f:
            record = json.load(f)
    elif INDEX_BLOCKS in last.files:
        record = store.read_json(last, INDEX_BLOCKS)
    else:
        record = {"blocks": [{"session": last.name, "shard": f"sessions/{last.folder}",
                              "n_docs": sum(m.n_docs for m in manifests),
                              "model_version": last.model_version, "factory": ""}]}
    return [block_at(store, entry) for entry in record["blocks"]]


def block_at(store: Store, entry: dict) -> IndexBlock:
    """An index_blocks.json entry with the URLs of its shard and maps in `store`."""
    shard = entry["shard"].split("/")
    return IndexBlock(**{**entry, "index_url": store.url_of(*shard, "index.faiss"),
                         "ids_url": store.url_of(*shard, "index_ids.parquet"),
                         "map_urls": [store.url_of(*f.split("/"))
                                      for f in entry.get("map_files", [])]})


def index_blocks_record(searchable: SearchableIndex, mode: str, model_version: str) -> dict:
    """What a session's index_blocks.json says: the update mode, the model queries are
    encoded with, and each block's provenance."""
    return {"update_mode": mode, "model_version": model_version,
            "n_docs": searchable.n_docs,
            "blocks": [block.provenance() for block in searchable.blocks]}


def previous_memory(store: Store, manifests: list[SessionManifest]) -> PreviousMemory | None:
    """Where the latest session's memory state lies, with its digest (for cache keys)."""
    if not manifests or MEMORY_STATE not in manifests[-1].files:
        return None
    last = manifests[-1]
    return PreviousMemory(url=store.session_url(last, "memory"), session=last.name,
                          state_sha256=last.files[MEMORY_STATE]["sha256"],
                          memory_sha256=last.files["memory/memory.parquet"]["sha256"])


def previous_model(store: Store, manifests: list[SessionManifest]) -> PreviousModel | None:
    """The latest session's fine-tuned model, or None for the base model."""
    if not manifests:
        return None
    version = manifests[-1].model_version
    # a session that did not train keeps the model of the session that trained it last
    for m in reversed(manifests):
        if MODEL_WEIGHTS in m.files and m.model_version == version:
            return PreviousModel(url=store.session_url(m, "model"), version=version,
                                 session=m.name)
    return None  # the base model


def previous_training(store: Store, manifests: list[SessionManifest]) -> PreviousTraining | None:
    """The latest query buffer (training/query_buffer.parquet) and its reservoir counter."""
    for m in reversed(manifests):
        if QUERY_BUFFER in m.files:
            sampling = store.read_json(m, "training/sampling.json")
            return PreviousTraining(query_buffer_url=store.session_url(m, QUERY_BUFFER),
                                    query_buffer_sha256=m.files[QUERY_BUFFER]["sha256"],
                                    buffer_seen=sampling["buffer_seen"])
    return None


def stage_timings(embedded: EmbeddedSession, memory: StoredMemory | None,
                  reembedded_memory: StoredMemory | None,
                  sampled: SampledTraining | None, trained: TrainedModel | None,
                  reembedded: ReembeddedSources | None, indexing: list[StageResult],
                  evaluation: SessionEvaluation,
                  before: SessionEvaluation | None = None) -> dict[str, float]:
    """Wall seconds per stage of this attempt: a stage whose result came from the cache
    (computed by an earlier run, or an earlier attempt of this one that failed later) counts 0,
    so a retried run reports what the attempt that published did.

    embedding: the new documents, then re-embedding corpus and memory after fine-tuning.
    indexing: the shards built and the alignment fitted (`flows.index_update`).
    evaluation: the trained model's, plus the starting model's (`before`) when it changed.
    """
    attempt = current_attempt()

    def seconds(result: StageResult | None, field: str = "seconds") -> float:
        if result is None or result.attempt != attempt:
            return 0.0
        return float(getattr(result, field))

    timings = {
        "embedding": (seconds(embedded) + seconds(reembedded)
                      + seconds(reembedded_memory, "reembed_seconds")),
        "clustering": seconds(memory),
        "training": seconds(sampled) + seconds(trained),
        "indexing": sum(seconds(result) for result in indexing),
        "evaluation": seconds(evaluation) + seconds(before),
    }
    timings["total"] = sum(timings.values())
    return timings


def _folder_files(prefix: str, folder: Path) -> dict[str, str]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": str(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def training_files(sampled: SampledTraining | None,
                   trained: TrainedModel | None) -> dict[str, str]:
    """What a session publishes of its training: examples, query buffer, model, logs."""
    files: dict[str, str] = {}
    if sampled is not None:
        files.update({"training/examples.parquet": sampled.examples_path,
                      "training/sampling.json": sampled.summary_path,
                      QUERY_BUFFER: sampled.query_buffer_path})
    if trained is not None and trained.trained:
        files.update(_folder_files("model", Path(trained.model_path)))
        files["training/training.json"] = trained.summary_path
        if trained.tensorboard_dir and Path(trained.tensorboard_dir).is_dir():
            files.update(_folder_files("training/tensorboard", Path(trained.tensorboard_dir)))
    return files


def _place(src: Path, dst: Path) -> None:
    """Hard-link when scratch and the publish folder share a device, copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- Prefect task wrappers ---


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="plan {session_url}")
def plan_session(session_url: str, store_url: str, scratch_base: str | None,
                 max_document_chars: int = MAX_DOCUMENT_CHARS) -> SessionPlan:
    """Digest the input and look it up in the store: new, or already published."""
    store = Store(store_url)
    name = Path(session_url.rstrip("/")).name
    digest = session_digest(session_url)
    published = store.find_published(name, digest) if store.exists() else None
    if published is not None:
        return SessionPlan(name=name, digest=digest, store_url=store.url, status="published",
                           index=published.index, published_as=published.name)
    # Validate before any task persists a result: bad input must leave the store untouched,
    # and Prefect writes even a failed task's exception into the (in-store) result storage.
    if validate_session(session_url, max_document_chars) != digest:
        raise SessionFormatError(session_url, None, "session folder changed while it was "
                                 "being read (content digest differs); run it once complete")
    # refuse to build on a damaged earlier session before any work (sizes, and digests
    # read once per file and machine, then remembered locally: cheap)
    manifests = store.check_published() if store.exists() else []
    return SessionPlan(name=name, digest=digest, store_url=store.url, status="new",
                       index=len(manifests), previous=published_sources(store, manifests),
                       previous_memory=previous_memory(store, manifests),
                       previous_model=previous_model(store, manifests),
                       previous_training=previous_training(store, manifests),
                       previous_blocks=published_blocks(store, manifests),
                       scratch_dir=scratch_for(store, scratch_base))


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="publish {plan.name}")
def publish_session(plan: SessionPlan, ingested: IngestedSession, vectors: Source,
                    index: BuiltIndex, searchable: SearchableIndex,
                    evaluation: SessionEvaluation, config: SessionConfig,
                    model_version: str, memory: StoredMemory | None = None,
                    extra_files: dict[str, str] | None = None) -> SessionManifest:
    """Publish the session's outputs; the manifest is written last.

    vectors: the session's own document vectors (doc_vectors.npy) and the model that made
    them; index: the shard this session wrote; searchable: the blocks its searches combine
    (index_blocks.json).
    """
    store = Store(plan.store_url)
    folder = Path(plan.scratch_dir) / "publish" / plan.digest[:32]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # the files every published session holds
    files = {"docs.parquet": ingested.docs_path, "queries.parquet": ingested.queries_path,
             "qrels.parquet": ingested.qrels_path, "doc_vectors.npy": vectors.vectors_url,
             "index.faiss": index.index_path, "index_ids.parquet": index.ids_path,
             "metrics.json": evaluation.metrics_path, "runs.parquet": evaluation.runs_path}
    summary: dict = {"n_clusters": None, "memory_size": None, "memory_budget": None}
    if memory is not None:
        files.update(memory.files)
        summary = {"n_clusters": memory.n_clusters, "memory_size": memory.memory_size,
                   "memory_budget": memory.memory_budget}
    summary["update_mode"] = config.update.mode.value
    summary["vectors_model_version"] = vectors.model_version
    files.update(extra_files or {})
    for rel, path in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _place(Path(path), folder / rel)
    (folder / INDEX_BLOCKS).write_text(json.dumps(
        index_blocks_record(searchable, config.update.mode.value, model_version), indent=2,
        sort_keys=True))
    (folder / "config.json").write_text(
        json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
    manifest = SessionManifest(
        name=plan.name, index=plan.index, digest=plan.digest,
        model_version=model_version, n_docs=ingested.n_docs,
        n_queries=ingested.n_queries, config_digest=config.digest(), summary=summary,
    )
    # The flow holds the store for the whole run (`infra.writer.store_writer`); publishing
    # only confirms the lease is still ours, so a run that lost its lock never writes.
    lock = held_store_lock(store.url)
    if lock is None:
        raise RuntimeError(f"publishing into {store.url} outside a run that holds the store "
                           "(publish_session runs inside session_flow)")
    lock.check()
    store.ensure()
    manifest = store.publish_session(folder, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    get_run_logger().info("published session %s as #%d in %s", manifest.name, manifest.index,
                          store.url)
    return manifest
