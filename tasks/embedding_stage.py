"""The embed stage (DESIGN step 2): texts embedded through the cache, shard by shard.

`embed_with_cache` embeds only what the `EmbeddingCache` lacks; `embed_stage` does the same for
a flow stage, spreading the missing texts over the run's task runner (`infra.runners`) as
`embed_shard` tasks that each write one cache shard. Every stage that embeds documents (the
session's documents here, the memory, training texts, re-embedded sources) goes through
`embed_stage`, so a text is embedded once per encoder and chunking config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.config import ChunkingConfig, EmbeddingConfig
from driftlane.infra.embedding_cache import (
    EMBEDDING_ALGORITHM_VERSION,
    EmbeddedTexts,
    EmbeddingCache,
)
from driftlane.infra.faults import crash_point
from driftlane.infra.io import save_npy
from driftlane.tasks.embedding import embed_texts
from driftlane.tasks.models import load_encoder
from driftlane.tasks.stage_results import EmbeddedSession, IngestedSession
from driftlane.tasks.texts import document_text, text_digest

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["EMBED_VERSION", "embed_documents", "embed_shard", "embed_stage", "embed_with_cache"]


def embed_with_cache(
    model: SentenceTransformer | Callable[[], SentenceTransformer],
    texts: Sequence[str],
    chunking: ChunkingConfig,
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    keep_token_embeddings: bool = False,
) -> tuple[EmbeddedTexts, int]:
    """Embeddings of all `texts` in order, embedding only texts the cache does not hold.

    Identical texts are embedded once. `model` may be a loader, called only when something is
    missing from the cache. Returns (embeddings, number of texts actually embedded).
    """
    texts = list(texts)
    if cache is not None and cache.keep_token_embeddings != keep_token_embeddings:
        raise ValueError(
            f"cache keeps token embeddings={cache.keep_token_embeddings}, "
            f"but keep_token_embeddings={keep_token_embeddings} was asked"
        )
    if cache is not None and cache.chunking != chunking:
        raise ValueError("the cache was opened for another chunking config")
    digests = [text_digest(text) for text in texts]
    position: dict[str, int] = {}
    unique_first: list[int] = []  # index in `texts` of each distinct digest's first occurrence
    for i, digest in enumerate(digests):
        if digest not in position:
            position[digest] = len(unique_first)
            unique_first.append(i)
    inverse = np.array([position[digest] for digest in digests], dtype=np.int64)
    unique_digests = [digests[i] for i in unique_first]

    if cache is not None:
        found, cached = cache.lookup(unique_digests)
    else:
        found, cached = np.zeros(len(unique_digests), dtype=bool), None
    missing = np.flatnonzero(~found)
    if not isinstance(model, torch.nn.Module):  # a loader
        model = model() if len(missing) or cached is None else None
    fresh = _empty_like(cached) if model is None else embed_texts(
        model,
        [texts[unique_first[i]] for i in missing],
        chunking,
        batch_size,
        keep_token_embeddings,
    )
    if cache is not None and len(missing):
        cache.add([unique_digests[i] for i in missing], fresh)

    dim = fresh.vectors.shape[1] if len(missing) or cached is None else cached.vectors.shape[1]
    vectors = np.empty((len(unique_digests), dim), dtype=np.float32)
    n_windows = np.empty(len(unique_digests), dtype=np.int32)
    tokens: list[np.ndarray | None] | None = (
        [None] * len(unique_digests) if keep_token_embeddings else None
    )
    hit = np.flatnonzero(found)
    for source, where in ((fresh, missing), (cached, hit)):
        if source is None or not len(where):
            continue
        vectors[where] = source.vectors
        n_windows[where] = source.n_windows
        if tokens is not None and source.token_embeddings is not None:
            for slot, array in zip(where.tolist(), source.token_embeddings, strict=True):
                tokens[slot] = array
    unique = EmbeddedTexts(vectors, n_windows, tokens)  # type: ignore[arg-type]
    return unique.take(inverse), int(len(missing))


def _empty_like(embedded: EmbeddedTexts | None) -> EmbeddedTexts:
    dim = 0 if embedded is None else embedded.vectors.shape[1]
    tokens = None if embedded is None or embedded.token_embeddings is None else []
    return EmbeddedTexts(np.zeros((0, dim), np.float32), np.zeros(0, np.int32), tokens)


# --- Prefect task wrappers ---

# 2: embed_documents takes an IngestedSession and returns an EmbeddedSession
EMBED_VERSION = f"2-e{EMBEDDING_ALGORITHM_VERSION}"


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{label} shard {shard}")
def embed_shard(label: str, shard: str, texts: list[str], embedding: EmbeddingConfig,
                model_version: str, cache_url: str, keep_token_embeddings: bool) -> int:
    """Embed one shard of texts into the embedding cache; returns how many were embedded.

    Runs wherever the flow's task runner puts it (a thread, a Dask worker): it reads the
    encoder from `embedding.model` and writes only to the cache at `cache_url`.
    """
    model = load_encoder(embedding.model, embedding.device)
    embedded = embed_texts(model, texts, embedding.chunking, embedding.batch_size,
                           keep_token_embeddings)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking, keep_token_embeddings)
    cache.add([text_digest(text) for text in texts], embedded)
    return len(texts)


def embed_stage(label: str, texts: Sequence[str], embedding: EmbeddingConfig,
                cache: EmbeddingCache) -> tuple[EmbeddedTexts, int]:
    """`embed_with_cache` for a flow stage: what the cache lacks is embedded shard by shard on
    the run's task runner (`infra.runners`), then everything is read back from the cache.

    Outside a `shard_runner` it embeds in-process. Either way each shard computes the same
    vectors, so the runner never changes a result. Returns (embeddings, number embedded).
    """
    from driftlane.infra.progress import Progress
    from driftlane.infra.runners import current_runner, map_shards, split

    runner = current_runner()
    keep = cache.keep_token_embeddings
    texts = list(texts)

    def loader() -> SentenceTransformer:
        return load_encoder(embedding.model, embedding.device)

    if runner is None:
        return embed_with_cache(loader, texts, embedding.chunking, cache,
                                embedding.batch_size, keep)
    unique = list(dict.fromkeys(texts))
    todo = [text for text, have in zip(unique, cache.contains(
        [text_digest(text) for text in unique]), strict=True) if not have]
    ranges = split(len(todo), runner.shard_docs)
    shards = [{"label": label, "shard": f"{i + 1}/{len(ranges)}",
               "texts": todo[r.start:r.stop], "embedding": embedding,
               "model_version": cache.model_version, "cache_url": cache.root_url,
               "keep_token_embeddings": keep} for i, r in enumerate(ranges)]
    if shards:
        with Progress(f"embed-{label}", len(todo), f"embedding {label}", unit="texts") as bar:
            map_shards(embed_shard, shards, lambda _i, n: bar.advance(n))
    embedded, _ = embed_with_cache(loader, texts, embedding.chunking, cache,
                                   embedding.batch_size, keep)
    return embedded, len(todo)


@task(cache_key_fn=cache_key_for("embed", EMBED_VERSION), persist_result=True,
      result_serializer="json", task_run_name="embed {session_name}")
def embed_documents(session_name: str, ingested: IngestedSession, embedding: EmbeddingConfig,
                    model_version: str, cache_url: str, scratch_dir: str) -> EmbeddedSession:
    """Embed the session's documents (chunked, cached) into a vectors file in scratch."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("embed", EMBED_VERSION, scratch_dir)
    docs = pd.read_parquet(ingested.docs_path)
    texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking,
                           embedding.keep_token_embeddings)
    crash_point("embed.start")
    embedded, n_embedded = embed_stage(session_name, texts, embedding, cache)
    save_npy(out / "doc_vectors.npy", embedded.vectors)
    tokens_path = token_offsets_path = None
    if embedded.token_embeddings is not None:
        tokens, offsets = embedded.stacked_tokens()
        save_npy(out / "token_offsets.npy", offsets)
        save_npy(out / "token_embeddings.npy", tokens)
        tokens_path = str(out / "token_embeddings.npy")
        token_offsets_path = str(out / "token_offsets.npy")
    n_windows = int(embedded.n_windows.sum())
    logger.info("session %s: %d documents, %d embedded (%d from cache), %d windows",
                session_name, len(texts), n_embedded, len(texts) - n_embedded, n_windows)
    return EmbeddedSession(
        vectors_path=str(out / "doc_vectors.npy"), n_docs=len(texts), n_embedded=n_embedded,
        dim=int(embedded.vectors.shape[1]), n_windows=n_windows, tokens_path=tokens_path,
        token_offsets_path=token_offsets_path, seconds=time.perf_counter() - started)

