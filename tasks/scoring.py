"""Exact term-based scoring: MaxSim / Chamfer similarity (DESIGN step 4).

The late-interaction score of a query Q and a document D, both sets of token vectors, is

    MaxSim(Q, D) = sum over q in Q of max over d in D of cos(q, d)

(ColBERT, Khattab & Zaharia, SIGIR 2020; called Chamfer similarity in MUVERA, Dhulipala et al.,
NeurIPS 2024). It is the reference that the LSH prototypes of `tasks.prototypes` approximate.

Documents of different lengths are padded into one (n, max_tokens, dim) batch with a boolean
mask; a padded slot never wins a max. By convention a document without tokens contributes 0
for every query token, and a query without tokens scores 0 against every document.

Pure functions over numpy arrays or torch tensors; the heavy lifting is a torch matmul, so it
runs on the CPU or a GPU (`device=`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DocTokenBatch",
    "maxsim_against_batches",
    "maxsim_matrix",
    "maxsim_scores",
    "normalize_rows",
    "pad_token_batch",
    "prepare_doc_batches",
]

ArrayLike = np.ndarray | torch.Tensor

# Upper bound on the float32 similarity block (query tokens x document token slots) held at
# once by `maxsim_matrix`: 2**25 floats = 128 MiB.
_DEFAULT_MAX_BLOCK = 1 << 25


def normalize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (all-zero rows, e.g. padding, stay zero). Shape kept."""
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    return vectors / norms.clamp_min(1e-12)


def pad_token_batch(
    arrays: Sequence[np.ndarray], dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stack token arrays of different lengths into one zero-padded batch.

    `arrays`: n arrays of shape (n_tokens_i, dim), any float dtype. Returns `padded`
    (n, max_tokens, dim) float32 (max_tokens at least 1) and `mask` (n, max_tokens) bool, True
    where a real token sits. `dim` is needed only when `arrays` is empty.
    """
    if dim is None:
        if not len(arrays):
            raise ValueError("pad_token_batch needs `dim` when given no arrays")
        dim = int(arrays[0].shape[1])
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)  # (n,)
    width = max(1, int(lengths.max(initial=0)))
    padded = np.zeros((len(arrays), width, dim), dtype=np.float32)
    mask = np.arange(width)[None, :] < lengths[:, None]  # (n, width)
    if lengths.sum():
        padded[mask] = np.concatenate([np.asarray(a) for a in arrays], axis=0)
    return padded, mask


def _as_tensor(array: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    tensor = torch.as_tensor(array) if not isinstance(array, torch.Tensor) else array
    return tensor.to(device=device)


def maxsim_scores(
    query_tokens: ArrayLike,
    doc_tokens: ArrayLike,
    doc_mask: ArrayLike,
    normalize: bool = True,
) -> ArrayLike:
    """MaxSim of one query against a padded batch of documents.

    `query_tokens` (q_t, dim); `doc_tokens` (n, t, dim) padded; `doc_mask` (n, t) bool.
    With `normalize` the token vectors are L2-normalized first (cosine), else raw inner products
    are used. Returns (n,) float32: a numpy array for numpy input, else a tensor on the input's
    device.
    """
    as_numpy = not isinstance(doc_tokens, torch.Tensor)
    docs = _as_tensor(doc_tokens, None).float()
    device = docs.device
    query = _as_tensor(query_tokens, device).float()
    mask = _as_tensor(doc_mask, device).bool()
    if normalize:
        query, docs = normalize_rows(query), normalize_rows(docs)
    n, width, dim = docs.shape
    if query.shape[0] == 0 or n == 0:
        scores = torch.zeros(n, dtype=torch.float32, device=device)
    else:
        sims = (query @ docs.reshape(n * width, dim).T).reshape(-1, n, width)  # (q_t, n, t)
        scores = _masked_max(sims, mask).sum(dim=0)  # (n,)
    return scores.cpu().numpy() if as_numpy else scores


def _masked_max(sims: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the last axis of (q, n, t) similarities, padding excluded; 0 where all padded."""
    best = sims.masked_fill(~mask, float("-inf")).amax(dim=-1)  # (q, n)
    return torch.where(mask.any(dim=-1), best, torch.zeros((), dtype=best.dtype))


@dataclass(frozen=True)
class DocTokenBatch:
    """Documents of similar length, normalized and padded once, ready for repeated scoring.

    The token matrix carries one extra column: 0 for a real token, `_PADDING_PENALTY` for a
    padding slot. Query tokens get a matching column of ones, so a padding slot's similarity
    comes out of the matmul itself as a huge negative number and never wins a max, with no
    masking pass over the (large) similarity block.
    """

    doc_index: torch.Tensor  # (b,) int64 positions of these documents in the collection
    tokens: torch.Tensor  # (b, t, dim + 1) float32: token vectors, then the padding column
    has_tokens: torch.Tensor  # (b,) bool, False for a document without tokens


# Far below any similarity of real vectors, far above float32's lowest value.
_PADDING_PENALTY = -1e30


def prepare_doc_batches(
    docs: Sequence[np.ndarray],
    batch_docs: int = 256,
    device: str | torch.device = "cpu",
    normalize: bool = True,
    dim: int | None = None,
) -> list[DocTokenBatch]:
    """Sort `docs` (n_docs arrays (t_j, dim)) by length and pad them `batch_docs` at a time.

    Token vectors become float32 on `device`, L2-normalized unless `normalize` is False, plus
    the padding column (see `DocTokenBatch`). Sorting keeps padding small. Build once, score
    many query sets with `maxsim_against_batches`.
    """
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    lengths = np.array([d.shape[0] for d in docs], dtype=np.int64)  # (n_docs,)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for first in range(0, len(docs), batch_docs):
        batch = order[first : first + batch_docs]  # (b,) document indices, similar lengths
        padded, mask = pad_token_batch([docs[i] for i in batch], dim=dim)
        tokens = _as_tensor(padded, device)  # (b, t, dim)
        if normalize:
            tokens = normalize_rows(tokens)
        penalty = torch.where(_as_tensor(mask, device), 0.0, _PADDING_PENALTY)  # (b, t)
        batches.append(
            DocTokenBatch(
                doc_index=torch.as_tensor(batch, device=device),
                tokens=torch.cat([tokens, penalty[..., None].float()], dim=-1),
                has_tokens=torch.as_tensor(lengths[batch] > 0, device=device),
            )
        )
    return batches


def maxsim_against_batches(
    queries: Sequence[np.ndarray],
    batches: Sequence[DocTokenBatch],
    n_docs: int,
    max_block: int = _DEFAULT_MAX_BLOCK,
    normalize: bool = True,
) -> np.ndarray:
    """Exact MaxSim of every query against documents prepared by `prepare_doc_batches`.

    `queries`: n_queries arrays (q_t_i, dim). Returns (n_queries, n_docs) float32, column j for
    the document at position j. The query tokens of all queries are stacked and split so that
    one similarity block holds at most `max_block` floats (one buffer, reused: bounded memory);
    per block: one matmul, a max over each document's tokens, a per-query sum (index_add).
    """
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    device = batches[0].tokens.device if batches else torch.device("cpu")
    n_queries = len(queries)
    scores = torch.zeros((n_queries, n_docs), dtype=torch.float32, device=device)
    q_lengths = np.array([q.shape[0] for q in queries], dtype=np.int64)  # (n_queries,)
    if n_queries == 0 or not batches or q_lengths.sum() == 0:
        return scores.cpu().numpy()
    query_tokens = _as_tensor(np.concatenate([np.asarray(q) for q in queries]), device).float()
    if normalize:
        query_tokens = normalize_rows(query_tokens)  # (N_q, dim)
    ones = torch.ones((query_tokens.shape[0], 1), dtype=torch.float32, device=device)
    query_tokens = torch.cat([query_tokens, ones], dim=1)  # (N_q, dim + 1)
    owner = torch.as_tensor(np.repeat(np.arange(n_queries), q_lengths), device=device)  # (N_q,)
    widest = max(b.tokens.shape[0] * b.tokens.shape[1] for b in batches)
    buffer = torch.empty(
        min(max_block, query_tokens.shape[0] * widest) + widest, dtype=torch.float32,
        device=device,
    )
    for batch in batches:
        b, width, dim = batch.tokens.shape
        flat = batch.tokens.reshape(b * width, dim).T  # (dim + 1, b * t)
        rows_per_block = max(1, max_block // (b * width))
        block_scores = torch.zeros((n_queries, b), dtype=torch.float32, device=device)
        for start in range(0, query_tokens.shape[0], rows_per_block):
            rows = query_tokens[start : start + rows_per_block]
            sims = buffer[: rows.shape[0] * b * width].view(rows.shape[0], b * width)
            torch.mm(rows, flat, out=sims)
            best = sims.view(-1, b, width).amax(dim=-1)  # (rows, b)
            block_scores.index_add_(0, owner[start : start + rows_per_block], best)
        # A document without tokens contributes 0 per query token, not the padding penalty.
        block_scores = torch.where(batch.has_tokens, block_scores, 0.0)
        scores[:, batch.doc_index] = block_scores
    return scores.cpu().numpy()


def maxsim_matrix(
    queries: Sequence[np.ndarray],
    docs: Sequence[np.ndarray],
    batch_docs: int = 256,
    max_block: int = _DEFAULT_MAX_BLOCK,
    device: str | torch.device = "cpu",
    normalize: bool = True,
) -> np.ndarray:
    """Exact MaxSim of every query against every document.

    `queries`: n_queries arrays (q_t_i, dim); `docs`: n_docs arrays (t_j, dim), any float dtype
    (e.g. the float16 token embeddings of `tasks.embedding`). Token vectors are L2-normalized
    (cosine) unless `normalize` is False. Returns (n_queries, n_docs) float32.

    Documents are sorted by length and padded `batch_docs` at a time (`prepare_doc_batches`);
    a similarity block holds at most `max_block` floats, which bounds memory whatever the
    collection size (`maxsim_against_batches`).
    """
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    dim = int(queries[0].shape[1]) if len(queries) else None
    batches = prepare_doc_batches(docs, batch_docs, device, normalize, dim=dim)
    if not batches:
        return np.zeros((len(queries), len(docs)), dtype=np.float32)
    return maxsim_against_batches(queries, batches, len(docs), max_block, normalize)
