"""GSS-Greedy for the query buffer (issue 13): keep the pairs whose loss gradients differ.

Gradient-based sample selection (Aljundi et al. 2019, GSS-Greedy, their Algorithm 2) fills a
replay buffer so that the gradients of its samples point in diverse directions. Each new sample
is compared with `compared` random buffered ones: s = the highest cosine between its gradient
and theirs. While the buffer has room, the sample enters with score s. When it is full, a
sample with s < 0 (its gradient opposes or is orthogonal to all compared ones) may replace a
buffered one: slot i is drawn with probability C_i / sum C (C = score + 1, so redundant slots
are drawn more often) and replaced with probability C_i / (C_i + c), c = s + 1. A sample with
s >= 0 is left out.

The gradient (decided here; the paper takes the full network's). A pair trains on the InfoNCE
term against its mined negative, L = -log softmax(scale * [q.p, q.n])[0], on unit vectors q
(query), p (positive), n (negative). Per sample gradients of the encoder's 22M weights are out of
reach on 2 CPU cores for thousands of pairs a session, so the gradient is the one a linear head
W on the embeddings (outputs W e, taken at W = I) would get:

    dL/dW = scale * pi_n * (u q^T + q u^T),   u = n - p,   pi_n the negative's softmax weight

so the cosine of two pairs' gradients needs only (q, u):

    <G_i, G_j> = 2 (u_i.u_j)(q_i.q_j) + 2 (u_i.q_j)(q_i.u_j)

A pair without a negative has u = -p (the alignment term alone). Buffered pairs whose positive
left memory have no vectors: they are never compared with, but can be replaced.

`gss_greedy` is pure and seeded; `gss_update_query_buffer` applies it to the query buffer of
`tasks.replay` (the buffer then carries a `gss_score` column).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftlane.tasks.memory import next_stream_index
from driftlane.tasks.negatives import CandidatePool, Seed, examples_from_pairs, seeded_rng
from driftlane.tasks.replay import QUERY_BUFFER_COLUMNS, buffer_pairs

__all__ = ["GSS_SCORE", "gradient_cosines", "gss_greedy", "gss_update_query_buffer",
           "pair_gradients"]

GSS_SCORE = "gss_score"
GSS_STREAM = 41  # rng stream of the greedy choices


def pair_gradients(q: np.ndarray, p: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """(k, 2, d) float64 gradient factors [q, u] of k pairs (see the module docstring).

    q, p, n (k, d) are normalized here; a row of n that is NaN (no negative), or n None,
    gives u = -p.
    """
    q, p = _unit(q), _unit(p)
    if n is None:
        u = -p
    else:
        missing = np.isnan(n).any(axis=1)
        u = np.where(missing[:, None], -p, _unit(np.nan_to_num(n)) - p)
    return np.stack([q, u], axis=1)


def gradient_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(k, m) cosines between the linear-head gradients of pairs a (k, 2, d) and b (m, 2, d)."""
    qa, ua, qb, ub = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    inner = (ua @ ub.T) * (qa @ qb.T) + (ua @ qb.T) * (qa @ ub.T)
    norm_a = np.sqrt(np.maximum(np.einsum("kd,kd->k", ua, ua) * np.einsum("kd,kd->k", qa, qa)
                                + np.einsum("kd,kd->k", ua, qa) ** 2, 0.0))
    norm_b = np.sqrt(np.maximum(np.einsum("kd,kd->k", ub, ub) * np.einsum("kd,kd->k", qb, qb)
                                + np.einsum("kd,kd->k", ub, qb) ** 2, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = inner / (norm_a[:, None] * norm_b[None, :])
    return np.where(np.isfinite(cos), cos, 0.0)


def gss_greedy(buffer_scores: np.ndarray, buffer_gradients: np.ndarray,
               new_gradients: np.ndarray, budget: int, compared: int,
               seed: Seed) -> tuple[np.ndarray, np.ndarray]:
    """GSS-Greedy over the new pairs, in order: (kept, scores).

    buffer_scores (b,) and buffer_gradients (b, 2, d) of the current buffer (NaN gradient
    rows: not comparable; NaN scores count as 0), new_gradients (k, 2, d). kept: positions in
    [buffer rows, then new rows] of the slots, in slot order (at most `budget`); scores: the
    score of each kept slot. The same inputs and seed give the same result.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    rng = seeded_rng(seed, GSS_STREAM)
    gradients = np.concatenate([buffer_gradients, new_gradients]).astype(np.float64)
    comparable = ~np.isnan(gradients).any(axis=(1, 2))
    filled = min(len(buffer_scores), budget)
    slots = np.zeros(budget, dtype=np.int64)  # source row of each slot
    scores = np.zeros(budget, dtype=np.float64)
    slots[:filled] = np.arange(filled)
    scores[:filled] = np.nan_to_num(np.asarray(buffer_scores[:filled], np.float64), nan=0.0,
                                    posinf=0.0, neginf=0.0)
    for offset in range(len(new_gradients)):
        row = len(buffer_scores) + offset
        candidates = np.flatnonzero(comparable[slots[:filled]])
        score = 0.0
        if len(candidates) and comparable[row]:
            picked = rng.choice(len(candidates), size=min(compared, len(candidates)),
                                replace=False)
            sources = slots[candidates[picked]]
            score = float(gradient_cosines(gradients[row:row + 1], gradients[sources]).max())
        if filled < budget:
            slots[filled], scores[filled] = row, score
            filled += 1
            continue
        if budget == 0 or score >= 0.0:
            continue
        weights = scores + 1.0
        weights = weights / weights.sum() if weights.sum() > 0 else None
        slot = int(rng.choice(budget, p=weights))
        held, offered = scores[slot] + 1.0, score + 1.0
        if rng.random() < held / (held + offered):
            slots[slot], scores[slot] = row, score
    return slots[:filled].copy(), scores[:filled].copy()


def gss_update_query_buffer(buffer: pd.DataFrame, buffer_vectors: np.ndarray,
                            new_rows: pd.DataFrame, new_examples: pd.DataFrame,
                            new_vectors: np.ndarray, pool: CandidatePool, *, budget: int,
                            seen: int, compared: int, margin: float, easy_ratio: float,
                            seed: Seed) -> tuple[pd.DataFrame, int]:
    """The query buffer after GSS-Greedy over `new_rows`: (buffer with `gss_score`, seen).

    buffer (`QUERY_BUFFER_COLUMNS`, `gss_score` optional) with buffer_vectors, the current
    encoder's vectors of its query texts; new_rows (`tasks.replay.query_buffer_rows`) come from
    new_examples row by row (their negatives), new_vectors the vectors of their anchors. The
    buffered pairs' negatives are mined as replay mines them (margin, easy_ratio, seed).
    """
    if len(buffer) != len(buffer_vectors) or len(new_rows) != len(new_examples) \
            or len(new_rows) != len(new_vectors):
        raise ValueError("buffer, new rows and their vectors must have matching lengths")
    first = next_stream_index(buffer, seen)
    if len(new_rows) and int(new_rows["stream_index"].min()) < first:
        raise ValueError(f"new rows must have stream_index >= {first}")
    d = pool.unit.shape[1]
    old = np.full((len(buffer), 2, d), np.nan)
    usable = np.flatnonzero(
        pool.index.get_indexer(buffer["positive_key"].to_numpy(dtype=object)) >= 0)
    if len(usable):
        mined = examples_from_pairs(buffer_pairs(buffer.iloc[usable]), buffer_vectors[usable],
                                    pool, margin=margin,
                                    easy_ratio=easy_ratio, seed=seed, origin="buffer",
                                    source="replay",
                                    known_positives=buffer[["query_key", "positive_key"]])
        old[usable] = pair_gradients(buffer_vectors[usable], *_documents(mined, pool))
    new = pair_gradients(new_vectors, *_documents(new_examples, pool))
    scores = (buffer[GSS_SCORE].to_numpy(np.float64) if GSS_SCORE in buffer.columns
              else np.zeros(len(buffer)))
    kept, kept_scores = gss_greedy(scores, old, new, budget, compared, seed)
    both = pd.concat([buffer[list(QUERY_BUFFER_COLUMNS)], new_rows[list(QUERY_BUFFER_COLUMNS)]],
                     ignore_index=True)
    out = both.iloc[kept].reset_index(drop=True).assign(**{GSS_SCORE: kept_scores})
    return out, seen + int((new_rows["stream_index"].to_numpy(np.int64) >= seen).sum())


def _documents(examples: pd.DataFrame, pool: CandidatePool) -> tuple[np.ndarray, np.ndarray]:
    """Pool vectors of the examples' positives, and of their negatives (NaN where none)."""
    positives = pool.unit[pool.rows_of(examples["positive_key"].to_numpy(dtype=object),
                                       "positives")]
    negative_keys = examples["negative_key"].to_numpy(dtype=object)
    rows = pool.index.get_indexer(np.where(pd.notna(negative_keys), negative_keys, ""))
    negatives = np.full(positives.shape, np.nan)
    negatives[rows >= 0] = pool.unit[rows[rows >= 0]]
    return positives, negatives


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
