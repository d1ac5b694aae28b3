"""Document vectors from overlapping token windows, through the model's own forward pass.

A document is tokenized once, cut into overlapping token windows (`tasks.chunking`), and every
window goes through the model's own forward pass, so the model's own pooling module (mean over
the attention mask for all-MiniLM-L6-v2) and its Normalize module apply per window. The window
vectors of a document are pooled (mean / max / first window) and L2-normalized into one
document vector. A text that fits in one window gets the same vector as
`model.encode(text, normalize_embeddings=True)`.

Token embeddings (for term-based MaxSim scoring and LSH prototypes) are the transformer's
output for the content tokens only, each averaged over the windows that contain it, stored as
float16.

Plain functions over a loaded model and in-memory texts. Embedding through the cache, shard by
shard, and the session's embed task are in `tasks.embedding_stage`; when `embed_texts` changes
what it computes, bump `infra.embedding_cache.EMBEDDING_ALGORITHM_VERSION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from driftlane.infra.config import ChunkingConfig, WindowPooling
from driftlane.infra.embedding_cache import EmbeddedTexts
from driftlane.infra.logs import module_logger
from driftlane.tasks.chunking import (
    SpecialTokens,
    build_window_batch,
    content_per_window,
    special_tokens_of,
    tokenize_content,
    window_table,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["effective_window_tokens", "embed_texts", "pool_windows"]

logger = module_logger(__name__)

# Texts are tokenized and embedded in groups bounded by characters (about 4 characters a
# token), so a corpus of very long documents never holds all its token ids or window vectors
# at once. A single longer text forms a group of its own.
_GROUP_CHARS = 2_000_000
_GROUP_TEXTS = 4096


def effective_window_tokens(model: SentenceTransformer, chunking: ChunkingConfig) -> int:
    """Window length in tokens (special tokens included), capped at `model.max_seq_length`."""
    limit = model.max_seq_length
    if limit is not None and chunking.window_tokens > limit:
        logger.warning(
            "window_tokens=%d exceeds the model's max_seq_length=%d; using %d-token windows",
            chunking.window_tokens,
            limit,
            limit,
        )
        return int(limit)
    return chunking.window_tokens


def pool_windows(
    window_vectors: np.ndarray, n_windows: np.ndarray, pooling: WindowPooling
) -> np.ndarray:
    """Document vectors from window vectors, L2-normalized.

    `window_vectors` (n_windows_total, dim) holds each document's windows contiguously and in
    order; `n_windows` (n_docs,) counts them (each >= 1). Returns (n_docs, dim) float32: the
    mean, the element-wise max, or the first window of each document, divided by its norm.
    """
    counts = np.asarray(n_windows, dtype=np.int64)
    first = np.cumsum(counts) - counts  # (n_docs,) index of each document's first window
    if pooling == WindowPooling.mean:
        pooled = np.add.reduceat(window_vectors, first, axis=0) / counts[:, None]
    elif pooling == WindowPooling.max:
        pooled = np.maximum.reduceat(window_vectors, first, axis=0)
    elif pooling == WindowPooling.first:
        pooled = window_vectors[first]
    else:  # pragma: no cover - WindowPooling is closed
        raise ValueError(f"unknown window pooling {pooling!r}")
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)  # (n_docs, 1)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class _TokenAverager:
    """Per-document running sums of token vectors over windows, finished as float16 means.

    Only documents with windows still in flight hold a float32 buffer; a document is turned
    into its float16 (n_tokens, hidden) average as soon as its last window has been seen.
    """

    def __init__(self, n_tokens: Sequence[int], n_windows: np.ndarray) -> None:
        self.n_tokens = n_tokens
        self.remaining = n_windows.astype(np.int64).copy()
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.done: list[np.ndarray | None] = [None] * len(n_tokens)

    def add(self, doc: int, start: int, end: int, vectors: np.ndarray) -> None:
        # vectors: (end - start, hidden) float32 outputs of the window's content tokens
        if doc not in self.sums:
            self.sums[doc] = np.zeros((self.n_tokens[doc], vectors.shape[1]), dtype=np.float32)
            self.counts[doc] = np.zeros(self.n_tokens[doc], dtype=np.float32)
        self.sums[doc][start:end] += vectors
        self.counts[doc][start:end] += 1.0
        self.remaining[doc] -= 1
        if self.remaining[doc] == 0:
            sums, counts = self.sums.pop(doc), self.counts.pop(doc)
            sums /= np.maximum(counts, 1.0)[:, None]
            self.done[doc] = sums.astype(np.float16)


def _embed_group(
    model: SentenceTransformer,
    content_ids: list[np.ndarray],
    special: SpecialTokens,
    per_window: int,
    chunking: ChunkingConfig,
    batch_size: int,
    keep_token_embeddings: bool,
) -> EmbeddedTexts:
    """Embed one group of tokenized texts; windows are batched longest first."""
    table = window_table([ids.shape[0] for ids in content_ids], per_window, chunking.overlap_tokens)
    lengths = table.end - table.start  # (n_windows,)
    # Longest first, as model.encode does: similar lengths share a batch (little padding) and
    # the largest batch runs first, so running out of memory shows up at once.
    order = np.argsort(-lengths, kind="stable")
    averager = (
        _TokenAverager([ids.shape[0] for ids in content_ids], table.n_windows)
        if keep_token_embeddings
        else None
    )
    device = model.device
    truncate_dim = getattr(model, "truncate_dim", None)
    window_vectors: np.ndarray | None = None  # (n_windows, dim)
    for first in range(0, order.shape[0], batch_size):
        batch = order[first : first + batch_size]  # (b,) window indices
        doc, start, end = table.doc[batch], table.start[batch], table.end[batch]
        arrays = build_window_batch(content_ids, doc, start, end, special)
        content_offset = arrays.pop("content_offset")  # (b,)
        features: dict[str, Any] = {
            name: torch.from_numpy(array).to(device) for name, array in arrays.items()
        }
        out = model(features)
        sentence = out["sentence_embedding"]  # (b, dim)
        if truncate_dim is not None:
            sentence = sentence[:, :truncate_dim]
        sentence_np = sentence.float().cpu().numpy()
        if window_vectors is None:
            window_vectors = np.empty((len(table), sentence_np.shape[1]), dtype=np.float32)
        window_vectors[batch] = sentence_np
        if averager is not None:
            tokens = out["token_embeddings"].float().cpu().numpy()  # (b, width, hidden)
            for row in range(batch.shape[0]):
                offset, n = int(content_offset[row]), int(end[row] - start[row])
                averager.add(
                    int(doc[row]), int(start[row]), int(end[row]), tokens[row, offset : offset + n]
                )
    assert window_vectors is not None  # every document has at least one window
    vectors = pool_windows(window_vectors, table.n_windows, chunking.pooling)
    token_embeddings = None
    if averager is not None:
        token_embeddings = [array for array in averager.done if array is not None]
        assert len(token_embeddings) == len(content_ids)
    return EmbeddedTexts(vectors, table.n_windows.astype(np.int32), token_embeddings)


def _text_groups(texts: Sequence[str]) -> list[range]:
    """Consecutive index ranges of at most _GROUP_TEXTS texts and about _GROUP_CHARS chars."""
    groups: list[range] = []
    begin, chars = 0, 0
    for i, text in enumerate(texts):
        if i > begin and (chars + len(text) > _GROUP_CHARS or i - begin >= _GROUP_TEXTS):
            groups.append(range(begin, i))
            begin, chars = i, 0
        chars += len(text)
    if begin < len(texts):
        groups.append(range(begin, len(texts)))
    return groups


def embed_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    chunking: ChunkingConfig,
    batch_size: int = 32,
    keep_token_embeddings: bool = False,
) -> EmbeddedTexts:
    """Document vectors of `texts` from overlapping token windows.

    Each text is tokenized once (no special tokens, no truncation) and cut into windows of
    `chunking.window_tokens` tokens including the special tokens (capped at the model's
    max_seq_length), consecutive windows sharing `chunking.overlap_tokens` tokens. Windows of a
    group of texts are sorted by length and run `batch_size` at a time through the model's own
    forward pass under `torch.inference_mode`, each batch padded to its own longest window. The
    document vector pools the window vectors per `chunking.pooling` and is L2-normalized.

    Returns vectors (n, dim) float32, n_windows (n,) int32 and, if `keep_token_embeddings`,
    per text a float16 (n_content_tokens, hidden) array: each content token's output averaged
    over the windows that contain it (special tokens excluded, not normalized).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    tokenizer = model.tokenizer
    special = special_tokens_of(tokenizer)
    window = effective_window_tokens(model, chunking)
    per_window = content_per_window(window, special)
    if per_window <= chunking.overlap_tokens:
        raise ValueError(
            f"{window}-token windows hold {per_window} content tokens after "
            f"{special.count} special tokens: not more than overlap_tokens="
            f"{chunking.overlap_tokens}"
        )
    if not texts:
        dim = model.get_embedding_dimension() or 0
        return EmbeddedTexts(
            np.zeros((0, dim), dtype=np.float32),
            np.zeros(0, dtype=np.int32),
            [] if keep_token_embeddings else None,
        )

    parts: list[EmbeddedTexts] = []
    was_training = model.training
    model.eval()  # no dropout; restored below so the caller's model is left as it was
    try:
        with torch.inference_mode():
            for group in _text_groups(texts):
                content_ids = tokenize_content(tokenizer, texts[group.start : group.stop])
                parts.append(
                    _embed_group(
                        model,
                        content_ids,
                        special,
                        per_window,
                        chunking,
                        batch_size,
                        keep_token_embeddings,
                    )
                )
    finally:
        if was_training:
            model.train()
    return _concat(parts)


def _concat(parts: Sequence[EmbeddedTexts]) -> EmbeddedTexts:
    tokens = None
    if parts and all(part.token_embeddings is not None for part in parts):
        tokens = [array for part in parts for array in part.token_embeddings or []]
    return EmbeddedTexts(
        np.concatenate([part.vectors for part in parts]),
        np.concatenate([part.n_windows for part in parts]),
        tokens,
    )
