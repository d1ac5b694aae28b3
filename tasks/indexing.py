"""Faiss index over the corpus seen so far (DESIGN step 9).

Vectors are L2-normalized, so inner product is cosine similarity. Row i of the index is
the document `ids[i]` (session name, doc id); the id table is stored beside the index.

The index family follows the corpus size (`choose_index`): exact (flat inner product) for
small corpora; IVF-Flat with nlist = c * sqrt(N), c in [4, 16] (the Faiss guideline); past
about a million vectors IVF with 4-bit PQ fast-scan codes and an exact re-ranking of the
candidates ("IVF<nlist>,PQ<m>x4fs,RFlat").
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.config import EmbeddingConfig, IndexConfig, IndexKind
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.infra.faults import crash_point
from driftlane.infra.io import read_npy, read_parquet, write_atomically
from driftlane.tasks.embedding_stage import embed_stage
from driftlane.tasks.stage_results import BuiltIndex, KnownVectors, ReembeddedSources, Source
from driftlane.tasks.texts import document_text

try:
    import faiss
except ImportError as exc:  # faiss-cpu and faiss-gpu are extras: exactly one is wanted
    raise ImportError("driftlane needs Faiss: pip install 'driftlane[cpu]' "
                      "(or 'driftlane[gpu]' for faiss-gpu)") from exc

INDEX_VERSION = "3"  # 3: typed stage results
REFINE_K_FACTOR = 32.0  # measured: recall@10 0.83 at 10, 0.98 at 32 (tests/test_indexing.py data)


def build_exact_index(vectors: np.ndarray) -> faiss.Index:
    """Flat inner-product index over `vectors` (n, dim) float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def choose_index(n: int, config: IndexConfig) -> str:
    """Faiss factory string for `n` vectors under `config` (see the module docstring)."""
    kind = config.kind
    if kind == IndexKind.auto:
        kind = (IndexKind.exact if n < config.exact_below
                else IndexKind.ivf if n < config.pq_from else IndexKind.ivfpq)
    if kind == IndexKind.exact:
        return "Flat"
    # at least 39 training points per list (Faiss warns below), at least one list
    nlist = max(1, min(int(round(config.nlist_per_sqrt_n * math.sqrt(n))), n // 39))
    if kind == IndexKind.ivf:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{{m}}x4fs,RFlat"


def build_index_from_factory(vectors: np.ndarray, factory: str, nprobe: int,
                             seed: int = 0) -> faiss.Index:
    """Train (when needed) and fill an inner-product index described by `factory`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if "{m}" in factory:  # PQ sub-quantizers: dim / 2, a divisor of dim
        factory = factory.format(m=max(m for m in range(1, dim // 2 + 1) if dim % m == 0))
    if factory == "Flat":
        return build_exact_index(vectors)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = vectors if len(vectors) <= 256 * 1024 else vectors[
        np.sort(rng.choice(len(vectors), 256 * 1024, replace=False))]
    index.train(train)
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = nprobe
    if "RFlat" in factory:  # re-rank 32x the asked candidates with exact distances
        faiss.downcast_index(index).k_factor = REFINE_K_FACTOR
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row ids), each (n_queries, min(k, ntotal)); row id -1 never returned."""
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows


# --- Prefect task wrappers ---


@task(cache_key_fn=cache_key_for("index", INDEX_VERSION), persist_result=True,
      result_serializer="json", task_run_name="index {session_name}")
def build_index(session_name: str, sources: list[Source], config: IndexConfig,
                scratch_dir: str) -> BuiltIndex:
    """Build the index over every session's document vectors."""
    started = time.perf_counter()
    out = stage_output_dir("index", INDEX_VERSION, scratch_dir)
    blocks, ids = [], []
    for src in sources:
        vectors = read_npy(src.vectors_url)
        doc_ids = read_parquet(src.docs_url)["doc_id"]
        if len(doc_ids) != len(vectors):
            raise ValueError(f"{src.vectors_url}: {len(vectors)} vectors for "
                             f"{len(doc_ids)} documents")
        blocks.append(vectors)
        ids.append(pd.DataFrame({"session": src.session, "doc_id": doc_ids}))
    vectors = np.concatenate(blocks)
    factory = choose_index(len(vectors), config)
    index = build_index_from_factory(vectors, factory, config.nprobe)
    crash_point("index.write")
    _write_index(index, out / "index.faiss")
    pd.concat(ids, ignore_index=True).to_parquet(out / "index_ids.parquet", index=False)
    get_run_logger().info("index %s over %d documents from %d sessions", factory,
                          index.ntotal, len(sources))
    return BuiltIndex(index_path=str(out / "index.faiss"),
                      ids_path=str(out / "index_ids.parquet"), n_docs=int(index.ntotal),
                      factory=factory, seconds=time.perf_counter() - started)


@task(cache_key_fn=cache_key_for("reembed", INDEX_VERSION), persist_result=True,
      result_serializer="json", task_run_name="re-embed-corpus after {session_name}")
def reembed_sources(session_name: str, sources: list[Source], embedding: EmbeddingConfig,
                    model_version: str, cache_url: str, scratch_dir: str,
                    known: KnownVectors | None = None) -> ReembeddedSources:
    """Sources whose vectors come from another model get vectors of `model_version`.

    known: documents already embedded with `model_version` (the re-embedded memory), taken
    instead of embedding them again.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("reembed", INDEX_VERSION, scratch_dir)
    stale = [src for src in sources if src.model_version != model_version]
    if not stale:
        return ReembeddedSources(sources=sources)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking)
    known_rows = pd.Series(dtype=np.int64)
    known_vectors = np.zeros((0, 0), np.float32)
    if known is not None:
        keys = read_parquet(known.keys_url)["doc_key"].astype(str)
        known_rows = pd.Series(np.arange(len(keys)), index=keys.to_numpy())
        known_vectors = read_npy(known.vectors_url)
    updated, n_embedded, n_known = [], 0, 0
    for src in sources:
        if src.model_version == model_version:
            updated.append(src)
            continue
        docs = read_parquet(src.docs_url)
        keys = (src.session + "/" + docs["doc_id"].astype(str)).to_numpy()
        rows = known_rows.reindex(keys).to_numpy()
        have = ~np.isnan(rows)
        todo = np.flatnonzero(~have)
        vectors = np.empty((len(docs), known_vectors.shape[1] or 1), np.float32)
        if len(todo):
            texts = [document_text(docs["title"].iat[i], docs["text"].iat[i]) for i in todo]
            embedded, fresh = embed_stage(f"corpus {src.session}", texts, embedding, cache)
            if vectors.shape[1] != embedded.vectors.shape[1]:
                vectors = np.empty((len(docs), embedded.vectors.shape[1]), np.float32)
            vectors[todo] = embedded.vectors
            n_embedded += fresh
        if have.any():
            vectors[have] = known_vectors[rows[have].astype(np.int64)]
        n_known += int(have.sum())
        path = out / f"{src.session}.npy"
        np.save(path, vectors, allow_pickle=False)
        updated.append(src.model_copy(update={"vectors_url": str(path),
                                              "model_version": model_version}))
    logger.info("re-embedded %d documents of %d sessions with model %s, %d taken from the "
                "re-embedded memory (%.0f s)", n_embedded, len(stale), model_version, n_known,
                time.perf_counter() - started)
    return ReembeddedSources(sources=updated, seconds=time.perf_counter() - started)


def _write_index(index: faiss.Index, path: Path) -> None:
    write_atomically(path, lambda tmp: faiss.write_index(index, str(tmp)))
