"""Experience replay: old training pairs and remembered documents, and the query buffer.

- Replay. `replay_count` examples join a session's new ones so that they make up
  `replay_ratio` of the mixed set. They come first from the query buffer (skipping queries
  whose positive left memory; uniformly, without replacement, or, given a `rank` function, the
  highest-ranked ones, e.g. MIR's interference of `tasks.interference`), then, if the buffer
  is short, from document examples of remembered documents of past sessions
  (`replay_examples`).
- Query buffer: a reservoir sample (Algorithm R, the same `tasks.eviction` reservoir as document
  eviction) of every (query, positive) pair ever trained on, under its own budget: each pair
  offered so far has the same chance to be kept, whatever the session sizes. Chosen over a
  cluster-stratified buffer because cluster ids of old pairs go stale after a re-clustering;
  replay looks each positive's current cluster up in the pool instead. After a session,
  `query_buffer_rows` and `update_query_buffer` make the next session's buffer.

A buffer is a table of `QUERY_BUFFER_COLUMNS`; nothing here edits its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from driftlane.tasks.eviction import reservoir_rows
from driftlane.tasks.memory import next_stream_index
from driftlane.tasks.negatives import (
    REPLAY_STREAM,
    SPAN_PREFIX,
    CandidatePool,
    Seed,
    concat_examples,
    document_examples,
    examples_from_pairs,
    seed_list,
    seeded_rng,
)

__all__ = [
    "QUERY_BUFFER_COLUMNS",
    "buffer_pairs",
    "empty_query_buffer",
    "new_query_examples",
    "query_buffer_rows",
    "replay_count",
    "replay_examples",
    "update_query_buffer",
]

QUERY_BUFFER_COLUMNS = ("query_key", "query_text", "positive_key", "cluster_id", "session",
                        "stream_index")


def replay_count(n_new: int, replay_ratio: float) -> int:
    """Replay examples so that they make up `replay_ratio` of new + replay (0 <= ratio < 1)."""
    if not 0.0 <= replay_ratio < 1.0:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
    return int(round(n_new * replay_ratio / (1.0 - replay_ratio)))


def replay_examples(
    query_buffer: pd.DataFrame,
    buffer_vectors: np.ndarray,
    pool: CandidatePool,
    doc_texts: pd.Series,
    n_replay: int,
    *,
    session: str,
    span_words: int,
    margin: float,
    easy_ratio: float,
    seed: Seed,
    rank: Callable[[pd.DataFrame], np.ndarray] | None = None,
) -> pd.DataFrame:
    """Up to `n_replay` replay examples (source "replay"): buffered queries, then documents.

    query_buffer (`QUERY_BUFFER_COLUMNS`) with buffer_vectors (b, d), the current encoder's
    vectors of its query texts. Buffer rows whose positive is not in the pool are skipped; the
    rest are drawn uniformly without replacement (origin "buffer"). With `rank`, every one of
    them becomes an example, `rank(examples)` scores them, and the `n_replay` best replay
    (ties in buffer order). If they are fewer than `n_replay`, document examples of pool
    documents from sessions other than `session` fill up, also drawn without replacement.
    Fewer than `n_replay` come back when memory is small.
    """
    if len(query_buffer) != len(buffer_vectors):
        raise ValueError(f"{len(query_buffer)} buffer rows for {len(buffer_vectors)} vectors")
    rng = seeded_rng(seed, REPLAY_STREAM)
    usable = np.flatnonzero(
        pool.index.get_indexer(query_buffer["positive_key"].to_numpy(dtype=object)) >= 0)
    if rank is None:
        take = np.sort(rng.choice(usable, size=min(n_replay, len(usable)), replace=False))
    else:
        take = usable
    parts = []
    if len(take):
        parts.append(examples_from_pairs(
            buffer_pairs(query_buffer.iloc[take]), buffer_vectors[take], pool, margin=margin,
            easy_ratio=easy_ratio, seed=seed,
            origin="buffer", source="replay",
            known_positives=query_buffer[["query_key", "positive_key"]]))
        if rank is not None:
            scores = np.asarray(rank(parts[0]), dtype=np.float64)
            if scores.shape != (len(take),):
                raise ValueError(f"rank gave {scores.shape} scores for {len(take)} candidates")
            best = np.sort(np.lexsort((np.arange(len(take)), -scores))[:n_replay])
            parts[0] = parts[0].iloc[best].reset_index(drop=True)
            take = take[best]
    n_docs = n_replay - len(take)
    past = np.flatnonzero(pool.sessions != session)
    if n_docs > 0 and len(past):
        rows = np.sort(rng.choice(past, size=min(n_docs, len(past)), replace=False))
        parts.append(document_examples(pool.keys[rows], doc_texts, pool, span_words=span_words,
                                       margin=margin, easy_ratio=easy_ratio,
                                       seed=[*seed_list(seed), 1], source="replay"))
    return concat_examples(parts)


def buffer_pairs(rows: pd.DataFrame) -> pd.DataFrame:
    """DataFrame(query_key, anchor, positive_key) of buffer rows, for `examples_from_pairs`."""
    return pd.DataFrame({"query_key": rows["query_key"].to_numpy(dtype=object),
                         "anchor": rows["query_text"].to_numpy(dtype=object),
                         "positive_key": rows["positive_key"].to_numpy(dtype=object)})


def empty_query_buffer() -> pd.DataFrame:
    """A query buffer with no rows and the `QUERY_BUFFER_COLUMNS` dtypes."""
    return pd.DataFrame({
        "query_key": pd.Series(dtype=object), "query_text": pd.Series(dtype=object),
        "positive_key": pd.Series(dtype=object), "cluster_id": pd.Series(dtype=np.int64),
        "session": pd.Series(dtype=object), "stream_index": pd.Series(dtype=np.int64)})


def query_buffer_rows(examples: pd.DataFrame, session: str,
                      first_stream_index: int) -> pd.DataFrame:
    """Buffer rows for the session's new query examples (document examples are not buffered).

    Stream indices run from `first_stream_index` (see `tasks.memory.next_stream_index`).
    """
    new = examples[new_query_examples(examples)]
    n = len(new)
    return pd.DataFrame({
        "query_key": new["query_key"].to_numpy(dtype=object),
        "query_text": new["anchor"].to_numpy(dtype=object),
        "positive_key": new["positive_key"].to_numpy(dtype=object),
        "cluster_id": new["cluster_id"].to_numpy(np.int64),
        "session": np.full(n, session, dtype=object),
        "stream_index": np.arange(first_stream_index, first_stream_index + n, dtype=np.int64),
    })


def new_query_examples(examples: pd.DataFrame) -> pd.Series:
    """Mask of the examples that enter the query buffer: new, and anchored by a query."""
    return ((examples["source"] == "new")
            & ~examples["query_key"].astype(str).str.startswith(SPAN_PREFIX))


def update_query_buffer(buffer: pd.DataFrame, new_rows: pd.DataFrame, budget: int, seen: int,
                        seed: int) -> tuple[pd.DataFrame, int]:
    """Reservoir update: (the new buffer of at most `budget` rows, the new `seen` count).

    `seen` counts the pairs ever offered before `new_rows`; new rows carry stream indices
    >= seen. Uses the reservoir of `tasks.eviction` (Algorithm R, vectorized), so every pair
    offered so far stays with the same probability. Same seed and inputs, same buffer.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    first = next_stream_index(buffer, seen)
    if len(new_rows) and int(new_rows["stream_index"].min()) < first:
        raise ValueError(f"new rows must have stream_index >= {first}")
    both = pd.concat([buffer, new_rows], ignore_index=True)[list(QUERY_BUFFER_COLUMNS)]
    stream_index = both["stream_index"].to_numpy(np.int64)
    kept = reservoir_rows(stream_index, budget, seen, seed)
    new_seen = seen + int((stream_index >= seen).sum())
    return both.iloc[np.sort(kept)].reset_index(drop=True), new_seen
