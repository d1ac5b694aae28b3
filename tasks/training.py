"""The training stage of a session as two cached Prefect tasks (DESIGN steps 7-8).

`sample_training` builds the candidate pool (the memory after this session's update, plus the
session's documents eviction left out), embeds the training queries and the query buffer with
the model the session started from, samples examples (`tasks.sampling.sample_session`), plans
the batches (`tasks.batching`) and updates the query buffer (`tasks.replay`).
`fine_tune_session` trains on them (`tasks.finetune.fine_tune`). Two tasks, so a failed
fine-tune retries without sampling again. Both return frozen results of `tasks.stage_results`.
"""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.config import (
    BufferPolicy,
    EmbeddingConfig,
    FinetuneConfig,
    NegativeScoring,
    ReplaySelection,
    SamplingConfig,
    SamplingMode,
)
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.infra.faults import crash_point
from driftlane.infra.io import read_npy, read_parquet
from driftlane.tasks.batching import plan_batches, training_budget
from driftlane.tasks.cluster_assignment import block_rows_for
from driftlane.tasks.compatibility_loss import CompatibilityTargets
from driftlane.tasks.embedding_stage import embed_stage
from driftlane.tasks.finetune import FINETUNE_VERSION, fine_tune
from driftlane.tasks.gradient_diversity import gss_update_query_buffer
from driftlane.tasks.interference import interference_scores
from driftlane.tasks.memory import next_stream_index
from driftlane.tasks.memory_state import load_memory_state, split_tokens, take_ragged
from driftlane.tasks.negatives import CandidatePool
from driftlane.tasks.prototypes import PrototypeSpec, document_prototype_blocks, query_prototypes
from driftlane.tasks.pseudo_positives import RaggedTokens
from driftlane.tasks.replay import (
    QUERY_BUFFER_COLUMNS,
    empty_query_buffer,
    new_query_examples,
    query_buffer_rows,
    update_query_buffer,
)
from driftlane.tasks.sampling import sample_session, training_queries, training_texts
from driftlane.tasks.stage_results import (
    EmbeddedSession,
    EncoderModel,
    IngestedSession,
    PreviousTraining,
    SampledTraining,
    StoredMemory,
    TrainedModel,
)
from driftlane.tasks.texts import doc_texts_of

SAMPLE_VERSION = "4"  # 4: negatives scored on prototypes; false-negative rate


def _embed(label: str, texts: list[str], embedding: EmbeddingConfig, model_version: str,
           cache_url: str, tokens: bool) -> tuple[np.ndarray, RaggedTokens | None]:
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking, tokens)
    embedded, _ = embed_stage(label, texts, embedding, cache)
    if not tokens:
        return embedded.vectors, None
    return embedded.vectors, RaggedTokens(*embedded.stacked_tokens())


def example_vectors(examples: pd.DataFrame, pool_keys: pd.Series,
                    pool_vectors: np.ndarray) -> np.ndarray:
    """(n_examples, 2, d) float32: the pool vectors of each example's positive and negative
    document; a row of NaN where the document is not in the pool (or there is no negative)."""
    where = pd.Index(pool_keys.astype(str))
    out = np.full((len(examples), 2, pool_vectors.shape[1]), np.nan, dtype=np.float32)
    for column, slot in (("positive_key", 0), ("negative_key", 1)):
        if column not in examples.columns:
            continue
        keys = examples[column].astype(object).where(examples[column].notna(), "")
        rows = where.get_indexer(keys.astype(str).to_numpy())
        found = rows >= 0
        out[found, slot] = pool_vectors[rows[found]]
    return out


def pool_prototypes(doc_tokens: RaggedTokens, spec: PrototypeSpec,
                    planes: dict[str, np.ndarray]) -> np.ndarray:
    """(N, P) float32 document prototypes of the pool's token embeddings, built in blocks
    (`block_rows_for`: the float32 copies of their tokens stay small)."""
    blocks = [block for _, block in document_prototype_blocks(
        doc_tokens.tokens, doc_tokens.offsets, spec, planes, block_rows_for(spec.output_dim))]
    return (np.concatenate(blocks) if blocks
            else np.zeros((0, spec.output_dim), dtype=np.float32))


def mir_rank(model_path: str, doc_texts: pd.Series, sampling: SamplingConfig,
             finetune: FinetuneConfig):
    """The replay ranking of `sampling.replay_selection` (None: uniform replay): MIR's loss
    increase under a virtual update of the starting model (`tasks.interference`)."""
    if sampling.replay_selection != ReplaySelection.mir:
        return None

    def rank(new: pd.DataFrame, candidates: pd.DataFrame) -> np.ndarray:
        return interference_scores(model_path, training_texts(new, doc_texts),
                                   training_texts(candidates, doc_texts), finetune,
                                   sampling.mir_virtual_steps, sampling.seed)

    return rank


@task(cache_key_fn=cache_key_for("sample", SAMPLE_VERSION), persist_result=True,
      result_serializer="json", task_run_name="sample {session_name}")
def sample_training(session_name: str, ingested: IngestedSession, embedded: EmbeddedSession,
                    memory: StoredMemory, docs_urls: dict[str, str],
                    previous_training: PreviousTraining | None, sampling: SamplingConfig,
                    finetune: FinetuneConfig, embedding: EmbeddingConfig, model_version: str,
                    cache_url: str, scratch_dir: str,
                    stored_vectors: bool = False) -> SampledTraining:
    """Sample the session's training examples and plan its batches.

    stored_vectors: also write each example's positive and negative document vectors of the
    starting model (stored_vectors.npy, NaN where a document is not in the pool), the targets
    of compatible training (`tasks.compatibility_loss`).
    """
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("sample", SAMPLE_VERSION, scratch_dir)
    state, spec, planes = load_memory_state(memory.state_dir)
    selfsup = sampling.mode == SamplingMode.self_supervised

    # the pool: memory after this session's update, plus new documents eviction left out
    docs = read_parquet(ingested.docs_path)
    new_keys = (session_name + "/" + docs["doc_id"].astype(str)).to_numpy(dtype=object)
    outside = ~pd.Index(new_keys).isin(state.memory["doc_key"])
    new_clusters = state.assignments.set_index("doc_key")["cluster_id"]
    extra = pd.DataFrame({"doc_key": new_keys[outside],
                          "cluster_id": new_clusters.loc[new_keys[outside]].to_numpy(np.int64),
                          "session": session_name})
    pool = pd.concat([state.memory[["doc_key", "cluster_id", "session"]], extra],
                     ignore_index=True)
    new_vectors = read_npy(embedded.vectors_path)
    pool_vectors = np.concatenate([state.vectors, new_vectors[outside]])
    proto_negatives = sampling.negative_scoring == NegativeScoring.prototypes
    doc_tokens = None
    if selfsup or proto_negatives:
        new_tokens, new_offsets = take_ragged(read_npy(embedded.tokens_path),
                                              read_npy(embedded.token_offsets_path),
                                              np.flatnonzero(outside))
        doc_tokens = RaggedTokens(np.concatenate([state.tokens, new_tokens]),
                                  np.concatenate([state.token_offsets,
                                                  new_offsets[1:] + state.token_offsets[-1]]))
    doc_texts = doc_texts_of(pool["session"].tolist(), {**docs_urls,
                                                        session_name: ingested.docs_path})

    qrels = read_parquet(ingested.qrels_path)
    queries = training_queries(read_parquet(ingested.queries_path), qrels, session_name,
                               sampling.mode)
    query_vectors, query_tokens = _embed(f"training queries {session_name}",
                                         queries["text"].tolist(), embedding, model_version,
                                         cache_url, tokens=selfsup or proto_negatives)
    prototype_space = None
    if proto_negatives:
        prototype_space = (pool_prototypes(doc_tokens, spec, planes),
                           query_prototypes(split_tokens(query_tokens.tokens,
                                                         query_tokens.offsets), spec, planes))
    probe_vectors = None
    if selfsup and state.representation == "prototypes":
        probe_vectors = query_prototypes(split_tokens(query_tokens.tokens,
                                                      query_tokens.offsets), spec, planes)
    buffer, seen = empty_query_buffer(), 0
    if previous_training is not None:
        buffer = read_parquet(previous_training.query_buffer_url)
        seen = previous_training.buffer_seen
    buffer_vectors, _ = _embed(f"query buffer {session_name}",
                               buffer["query_text"].astype(str).tolist(), embedding,
                               model_version, cache_url, tokens=False)

    result = sample_session(
        session_name, pool, pool_vectors, state.centroids, doc_texts, queries, query_vectors,
        sampling, qrels=qrels, query_tokens=query_tokens,
        doc_tokens=doc_tokens, query_buffer=buffer, buffer_vectors=buffer_vectors,
        probe_vectors=probe_vectors, prototype_space=prototype_space,
        replay_rank=mir_rank(embedding.model, doc_texts, sampling, finetune))
    for note in result.notes:
        logger.info("session %s: %s", session_name, note)
    examples = result.examples
    budget = training_budget(len(examples), finetune)
    plan = plan_batches(examples, finetune.batch_size, budget.steps,
                        stratified=sampling.stratified_batches and result.fallback is None,
                        mixed_fraction=sampling.curriculum_mixed_fraction, seed=sampling.seed)
    texts = training_texts(examples, doc_texts)

    rows = query_buffer_rows(examples, session_name, next_stream_index(buffer, seen))
    if sampling.query_buffer_policy == BufferPolicy.gss:
        new = examples[new_query_examples(examples)]
        rows_of_queries = pd.Index(queries["query_key"].to_numpy(dtype=object)).get_indexer(
            new["query_key"].to_numpy(dtype=object))
        if (rows_of_queries < 0).any():  # every new query example comes from `queries`
            raise ValueError("new query examples without an embedded query")
        anchors = query_vectors[rows_of_queries]
        buffer, seen = gss_update_query_buffer(
            buffer, buffer_vectors, rows, new, anchors,
            CandidatePool.from_table(pool, pool_vectors, state.centroids),
            budget=sampling.query_buffer_budget, seen=seen, compared=sampling.gss_compared,
            margin=sampling.hard_negative_margin, easy_ratio=sampling.easy_negative_ratio,
            seed=[sampling.seed, zlib.crc32(session_name.encode())])
    else:
        buffer, seen = update_query_buffer(buffer[list(QUERY_BUFFER_COLUMNS)], rows,
                                           sampling.query_buffer_budget, seen, sampling.seed)
    examples.to_parquet(out / "examples.parquet", index=False)
    texts.to_parquet(out / "texts.parquet", index=False)
    sizes = np.array([len(b) for b in plan.batches], dtype=np.int64)
    np.save(out / "batches.npy", np.concatenate(plan.batches).astype(np.int64)
            if len(plan.batches) else np.zeros(0, np.int64), allow_pickle=False)
    np.save(out / "batch_sizes.npy", sizes, allow_pickle=False)
    buffer.to_parquet(out / "query_buffer.parquet", index=False)
    stored_path = None
    if stored_vectors:
        stored_path = str(out / "stored_vectors.npy")
        np.save(stored_path, example_vectors(examples, pool["doc_key"], pool_vectors),
                allow_pickle=False)
    counts = examples.groupby(["source", "negative_kind"]).size()
    summary = {"n_examples": len(examples), "steps": len(plan.batches),
               "n_stratified_batches": int(plan.stratified.sum()),
               "examples_by_source_and_negative": {f"{a}/{b}": int(n)
                                                   for (a, b), n in counts.items()},
               "fallback": result.fallback, "notes": list(result.notes),
               "query_buffer_size": len(buffer), "buffer_seen": int(seen),
               "diagnostics": result.diagnostics or {}}
    (out / "sampling.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    logger.info("session %s: %d training examples in %d batches (%d stratified); query "
                "buffer %d", session_name, len(examples), len(plan.batches),
                summary["n_stratified_batches"], len(buffer))
    return SampledTraining(**summary, examples_path=str(out / "examples.parquet"),
                           texts_path=str(out / "texts.parquet"),
                           batches_path=str(out / "batches.npy"),
                           batch_sizes_path=str(out / "batch_sizes.npy"),
                           query_buffer_path=str(out / "query_buffer.parquet"),
                           summary_path=str(out / "sampling.json"),
                           stored_vectors_path=stored_path,
                           seconds=time.perf_counter() - started)


@task(cache_key_fn=cache_key_for("finetune", FINETUNE_VERSION), persist_result=True,
      result_serializer="json", task_run_name="fine-tune {session_name}")
def fine_tune_session(session_name: str, sampled: SampledTraining, finetune: FinetuneConfig,
                      start: EncoderModel, scratch_dir: str,
                      compatibility_weight: float | None = None) -> TrainedModel:
    """Fine-tune the session's starting model on its sampled examples; with a
    `compatibility_weight`, compatibly with the stored vectors `sample_training` wrote."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("finetune", FINETUNE_VERSION, scratch_dir)
    if sampled.steps == 0:
        logger.warning("session %s: no training example, the model stays %s", session_name,
                       start.version)
        return TrainedModel(model_path=start.path, model_version=start.version, trained=False,
                            steps=0, seconds=time.perf_counter() - started)
    texts = read_parquet(sampled.texts_path)
    flat, sizes = read_npy(sampled.batches_path), read_npy(sampled.batch_sizes_path)
    batches = np.split(flat, np.cumsum(sizes)[:-1])
    crash_point("train.start")
    targets = None
    if compatibility_weight is not None:
        if sampled.stored_vectors_path is None:
            raise ValueError("compatible training needs the examples' stored vectors "
                             "(sample_training with stored_vectors=True)")
        targets = CompatibilityTargets(read_npy(sampled.stored_vectors_path),
                                       compatibility_weight)
    result = fine_tune(start.path, texts, finetune, out, batch_order=batches,
                       session=session_name, compatibility=targets)
    crash_point("train.write")
    # what the run did, without wall times or scratch paths: a rerun writes the same bytes
    (out / "training.json").write_text(json.dumps(
        {k: v for k, v in result.items()
         if k not in ("model_path", "train_seconds", "tensorboard_dir")},
        indent=2, sort_keys=True))
    logger.info("session %s: %d steps, mean loss %.4f -> model %s (%.0f s)", session_name,
                result["steps"], result["mean_loss"], result["model_version"],
                result["train_seconds"])
    return TrainedModel(model_path=result["model_path"], model_version=result["model_version"],
                        trained=True, steps=result["steps"], final_loss=result["final_loss"],
                        summary_path=str(out / "training.json"),
                        tensorboard_dir=result["tensorboard_dir"],
                        seconds=time.perf_counter() - started)
