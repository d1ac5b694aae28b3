"""Searching a session's index as the evaluation does: query vectors, alpha-QE and DBA.

`encode_queries` is the one way query texts become vectors. The evaluation
(`tasks.evaluation.evaluate_sessions`) and `driftlane search` both call it: a query is embedded
like a document (`tasks.embedding.embed_texts`: token windows, pooling, L2 normalization) with
the session's encoder and chunking config. Inside a session flow the call goes through the
store's embedding cache (`embed_stage`, which computes what the cache lacks with that same
`embed_texts`); without a cache (search) it calls `embed_texts` in process and writes nothing,
so a read-only store can be searched.

Two query-side options from the Faiss tips, both off by default (`NeighbourAveraging.n == 0`),
where the search is the plain top-k of the query vectors:

- alpha-query expansion (alpha-QE): a query vector q is replaced by
  normalize(q + sum_i s_i^alpha d_i) over its top-n documents d_i with similarities s_i.
- database-side augmentation (DBA): every indexed document vector d is replaced by
  normalize(d + sum_i s_i^alpha d_i) over its top-n other documents, found in the index itself.

Both come from image retrieval (Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with
no human annotation", TPAMI 2018; DBA from Arandjelovic & Zisserman, CVPR 2012). Similarities
below zero weigh nothing. Plain functions over arrays and Faiss indexes: no Prefect, no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from driftlane.infra.config import EmbeddingConfig, NeighbourAveraging
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.tasks.embedding import embed_texts
from driftlane.tasks.embedding_stage import embed_stage
from driftlane.tasks.index_shards import ShardedIndex, reconstruct
from driftlane.tasks.indexing import search
from driftlane.tasks.models import load_encoder

__all__ = [
    "alpha_query_expansion",
    "augment_database",
    "average_with_neighbours",
    "database_side_augmentation",
    "encode_queries",
    "search_queries",
    "stored_vectors",
]

# DBA gathers (block, n, dim) neighbour vectors at a time, so memory stays bounded.
_DBA_BLOCK = 8192


def encode_queries(texts: Sequence[str], embedding: EmbeddingConfig,
                   cache: EmbeddingCache | None = None, label: str = "queries") -> np.ndarray:
    """Query vectors (n, dim) float32, L2-normalized, as every evaluation computes them.

    embedding: the encoder (`embedding.model`, a folder), device, batch size and chunking of
    the session. cache: the store's embedding cache (session flow): vectors it holds are read,
    the rest computed shard by shard on the run's task runner and added to it. None (search):
    computed here, nothing written anywhere.
    """
    texts = list(texts)
    if cache is not None:
        embedded, _ = embed_stage(label, texts, embedding, cache)
        return embedded.vectors
    model = load_encoder(embedding.model, embedding.device)
    return embed_texts(model, texts, embedding.chunking, embedding.batch_size).vectors


def stored_vectors(index: faiss.Index | ShardedIndex, rows: np.ndarray) -> np.ndarray:
    """The vectors `index` holds at `rows` (int array of any shape, every row >= 0).

    Returns float32 of shape rows.shape + (index.d,). A sharded index answers with its shards'
    vectors carried through their alignment maps (`tasks.index_shards`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(index, ShardedIndex):
        flat = index.reconstruct_batch(rows.ravel())
    else:
        flat = reconstruct(index, rows.ravel())  # (rows.size, d)
    return flat.reshape(*rows.shape, index.d)


def average_with_neighbours(vectors: np.ndarray, neighbour_vectors: np.ndarray,
                            neighbour_scores: np.ndarray, alpha: float) -> np.ndarray:
    """normalize(v + sum_i w_i n_i), w_i = max(s_i, 0)^alpha: the step alpha-QE and DBA share.

    vectors (m, d); neighbour_vectors (m, n, d); neighbour_scores (m, n), NaN for a missing
    neighbour (it weighs nothing). Returns (m, d) float32, rows of norm 1.
    """
    scores = np.nan_to_num(neighbour_scores.astype(np.float32), nan=-1.0)
    weights = np.where(scores > 0, np.maximum(scores, 0.0) ** alpha, 0.0)  # (m, n)
    mixed = vectors + np.einsum("mn,mnd->md", weights, neighbour_vectors)  # (m, d)
    norms = np.linalg.norm(mixed, axis=1, keepdims=True)  # (m, 1)
    return (mixed / np.maximum(norms, 1e-12)).astype(np.float32)


def alpha_query_expansion(index: faiss.Index | ShardedIndex, queries: np.ndarray,
                          options: NeighbourAveraging) -> np.ndarray:
    """alpha-QE of `queries` (m, d): each averaged with its top `options.n` documents of
    `index`, weighted by similarity^alpha. `queries` itself when `options.n` is 0."""
    if options.n == 0 or index.ntotal == 0:
        return queries
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, rows = search(index, queries, options.n)  # (m, n) each
    found = rows >= 0
    neighbours = stored_vectors(index, np.where(found, rows, 0))  # (m, n, d)
    return average_with_neighbours(queries, neighbours, np.where(found, scores, np.nan),
                                   options.alpha)


def database_side_augmentation(index: faiss.Index | ShardedIndex,
                               options: NeighbourAveraging) -> np.ndarray:
    """DBA vectors (ntotal, d): each stored vector averaged with its top `options.n` other
    documents of `index` (neighbours found by searching `index` itself), weighted by
    similarity^alpha. A document is never its own neighbour."""
    total = index.ntotal
    vectors = stored_vectors(index, np.arange(total))  # (N, d)
    if options.n == 0 or total < 2:
        return vectors
    asked = min(options.n + 1, total)  # one more: the document itself is usually first
    augmented = np.empty_like(vectors)
    for start in range(0, total, _DBA_BLOCK):
        block = vectors[start:start + _DBA_BLOCK]  # (b, d)
        scores, rows = search(index, block, asked)  # (b, asked)
        own = np.arange(start, start + len(block))[:, None]  # (b, 1)
        keep = (rows >= 0) & (rows != own)
        keep &= np.cumsum(keep, axis=1) <= options.n  # the n best others
        neighbours = vectors[np.where(keep, rows, 0)]  # (b, asked, d)
        augmented[start:start + len(block)] = average_with_neighbours(
            block, neighbours, np.where(keep, scores, np.nan), options.alpha)
    return augmented


def augment_database(index: faiss.Index | ShardedIndex,
                     options: NeighbourAveraging) -> faiss.Index | ShardedIndex:
    """An index of the same kind (and training) holding the DBA vectors of `index`, row for
    row (a sharded index: an exact one); `index` itself when `options.n` is 0."""
    if options.n == 0:
        return index
    if isinstance(index, ShardedIndex):
        index = index.merged()
    vectors = database_side_augmentation(index, options)
    augmented = faiss.clone_index(index)
    augmented.reset()
    augmented.add(vectors)
    return augmented


def search_queries(index: faiss.Index | ShardedIndex, queries: np.ndarray, k: int,
                   expansion: NeighbourAveraging) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows), each (m, min(k, ntotal)), of `queries` (m, d) after alpha-QE
    (`expansion`; n = 0: the plain search)."""
    return search(index, alpha_query_expansion(index, queries, expansion), k)
