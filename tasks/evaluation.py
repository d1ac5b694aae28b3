"""Evaluate every session seen so far against the whole corpus seen so far (DESIGN step 10).

Metrics come from ranx: nDCG@10, Success@5 (ranx's `hit_rate@5`), Recall@10, Recall@100.
A document is identified across sessions as `<session>/<doc id>`, since collections reuse
doc ids ("1", "2", ...); qrels of a session refer to that session's own documents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from infra.caching import cache_key_for, stage_output_dir
from infra.config import EmbeddingConfig, EvaluationConfig
from infra.faults import crash_point
from infra.io import read_parquet
from tasks.embedding import EmbeddingCache, embed_with_cache, load_encoder
from tasks.indexing import search

EVALUATION_VERSION = "1"

# Our metric name -> ranx metric name.
METRICS = {
    "ndcg@10": "ndcg@10",
    "success@5": "hit_rate@5",
    "recall@10": "recall@10",
    "recall@100": "recall@100",
}


def global_doc_key(session: str, doc_id: str) -> str:
    return f"{session}/{doc_id}"


def ranking_from_search(query_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray,
                        doc_keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Turn Faiss output (n_queries, k) into a ranx-style run {query: {doc key: score}}."""
    run: dict[str, dict[str, float]] = {}
    for qid, q_scores, q_rows in zip(query_ids, scores, rows, strict=True):
        run[qid] = {doc_keys[r]: float(s) for s, r in zip(q_scores, q_rows, strict=True) if r >= 0}
    return run


def retrieval_metrics(qrels: dict[str, dict[str, int]],
                      run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean metrics over the judged queries (those in `qrels`) with ranx."""
    from ranx import Qrels, Run, evaluate  # slow import (numba); only when evaluating

    judged = {q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())}
    # A judged query that retrieved nothing scores 0; ranx needs an entry for it.
    ranking = {q: run.get(q) or {"__none__": 0.0} for q in judged}
    scores = evaluate(Qrels.from_dict(judged), Run.from_dict(ranking), list(METRICS.values()),
                      make_comparable=True)
    return {ours: float(scores[theirs]) for ours, theirs in METRICS.items()}


def qrels_dict(qrels: pd.DataFrame, session: str, split: str) -> dict[str, dict[str, int]]:
    """{query id: {global doc key: score}} for one split of a session's qrels table."""
    rows = qrels[qrels["split"] == split]
    out: dict[str, dict[str, int]] = {}
    for qid, did, score in zip(rows["query_id"], rows["doc_id"], rows["score"], strict=True):
        out.setdefault(qid, {})[global_doc_key(session, did)] = int(score)
    return out


# --- Prefect task wrappers ---


@task(cache_key_fn=cache_key_for("evaluate", EVALUATION_VERSION), persist_result=True,
      result_serializer="json", task_run_name="evaluate after {session_name}")
def evaluate_sessions(session_name: str, index: dict, sessions: list[dict],
                      embedding: EmbeddingConfig, evaluation: EvaluationConfig,
                      model_version: str, cache_url: str, scratch_dir: str) -> dict:
    """Evaluate each session's test queries against the index of everything seen so far."""
    import faiss

    logger = get_run_logger()
    out = stage_output_dir("evaluate", EVALUATION_VERSION, scratch_dir)
    faiss_index = faiss.read_index(index["index_path"])
    ids = pd.read_parquet(index["ids_path"])
    doc_keys = [global_doc_key(s, d) for s, d in zip(ids["session"], ids["doc_id"], strict=True)]
    model = load_encoder(embedding.model, embedding.device)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking)

    metrics: dict[str, dict[str, float]] = {}
    for src in sessions:
        qrels = qrels_dict(read_parquet(src["qrels_url"]), src["session"], evaluation.split)
        if not qrels:
            logger.info("session %s has no %s qrels: not evaluated", src["session"],
                        evaluation.split)
            continue
        queries = read_parquet(src["queries_url"])
        queries = queries[queries["query_id"].isin(qrels)]
        embedded, _ = embed_with_cache(model, list(queries["text"]), embedding.chunking, cache,
                                       batch_size=embedding.batch_size)
        scores, rows = search(faiss_index, embedded.vectors, evaluation.top_k)
        run = ranking_from_search(list(queries["query_id"]), scores, rows, doc_keys)
        metrics[src["session"]] = {**retrieval_metrics(qrels, run), "n_queries": len(queries)}
        logger.info("after %s, session %s: %s", session_name, src["session"],
                    {k: round(v, 4) for k, v in metrics[src["session"]].items()})
    crash_point("evaluate.write")
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return {"metrics_path": str(path), "metrics": metrics}
