"""Training examples for one session (DESIGN step 7): positives, negatives, replay, batch order.

Identity. A document is `<session>/<doc id>` (doc_key), a query `<session>/<query id>`
(query_key). A document example (below) has the query key `span:<doc_key>`.

Inputs. The candidate **pool** is a memory-like table (columns doc_key, cluster_id, session; more
are allowed) whose row i goes with row i of `pool_vectors` (N, d), the dense document vectors;
normally the memory after this session's assignment, i.e. the remembered documents plus the new
ones. Centroids are the `tasks.memory.CentroidTable` of the clusters. Queries are a table
(query_key, text) with their dense vectors (m, d) row by row. Token embeddings, for term-based
scoring, are ragged float16 arrays given as one (T, d) array plus (n + 1,) offsets
(`RaggedTokens`). Document texts are a Series doc_key -> text that the caller looks up.
Nothing here edits its inputs; every function returns new frames and arrays.

Rules (DESIGN step 7 leaves the details open; decided here):
- Labeled mode: a (query, positive) pair per `qrels/train.tsv` row with score > 0
  (`labeled_pairs`). Self-supervised mode: every query not judged in the test split
  (`training_queries`) gets as pseudo-positive the document with the highest exact MaxSim
  (`tasks.scoring`) among the pool members of its `n_probe` nearest clusters, nearest by the
  query's dense vector against the centroids (`pseudo_positives`).
- Negatives are scored by the dense similarity (cosine) of the anchor to the document. A
  candidate scoring above (positive score - margin) is skipped: it is likely an unlabeled
  positive ("hard but not too hard"; NV-Retriever, Moreira et al. 2024, calls this positive-aware
  mining). A document that is a known positive of the same query is never a negative.
  A hard negative is the best-scoring allowed member of the positive's own cluster. An easy
  negative is a random allowed document of another cluster. Each example draws one negative:
  easy with probability `easy_negative_ratio`, else hard; when the wanted kind has no allowed
  candidate the other kind is tried, then any allowed document of the pool ("random"), else
  none (negative_key None).
- Singleton clusters (one member in the pool). The document is its own positive: a document
  example whose anchor is a random span of `span_words` words of its text (the whole text when
  shorter; random cropping as in Contriever, Izacard et al. 2022), scored by the document's own
  vector. Its hard negatives, and those of any example whose positive sits alone in its cluster,
  are borrowed from the next-nearest cluster (nearest centroid with members in the pool).
- Fewer than 2 clusters. Nothing crashes: there is no other cluster for easy or borrowed
  negatives, so they become random allowed documents of the one cluster (in-batch negatives
  still apply), and batches cannot be stratified, so they stay mixed. `sample_session` says so in
  `SamplingResult.fallback`. With no allowed document at all an example has no negative, and
  fine-tuning then trains on in-batch negatives only.
- Replay (experience replay). `replay_count` examples join the new ones so that they make up
  `replay_ratio` of the mixed set. They come first from the query buffer (uniformly, without
  replacement, skipping queries whose positive left memory), then, if the buffer is short, from
  document examples of remembered documents of past sessions.
- Query buffer: a reservoir sample (Algorithm R, the same `tasks.memory` reservoir as document
  eviction) of every (query, positive) pair ever trained on, under its own budget: each pair
  offered so far has the same chance to be kept, whatever the session sizes. Chosen over a
  cluster-stratified buffer because cluster ids of old pairs go stale after a re-clustering;
  replay looks each positive's current cluster up in the pool instead.
- Batches (`plan_batches`). A curriculum from mixed to stratified: the first
  `curriculum_mixed_fraction` of the session's batches are drawn from all clusters, the rest from
  one cluster each ("Embedding And Clustering Your Data Can Improve Contrastive Pretraining",
  Merrick 2024). In a stratified pass each cluster's examples fill whole batches; what is
  left of every cluster (fewer than a batch) is pooled into mixed batches, flagged as such.
  No batch holds the same query twice, or a document that is one example's positive and another
  example's positive or negative (in-batch false negatives for the ranking loss); such an
  example waits for a later batch.
- Training budget (`training_budget`): steps = ceil(n_examples * epochs / batch_size) or a fixed
  number of steps, capped by max_steps; the batch plan cycles through the examples, a new seeded
  shuffle per pass.

Wiring, for the caller: `training_queries` -> embed them -> `sample_session` -> `training_budget`
-> `plan_batches` -> `training_texts` -> `tasks.finetune.fine_tune`; then `query_buffer_rows` and
`update_query_buffer` for the next session.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from infra.config import FinetuneConfig, SamplingConfig, SamplingMode
from tasks.memory import CentroidTable, _reservoir_rows, next_stream_index
from tasks.scoring import maxsim_matrix
from tasks.warmup import unit_rows

__all__ = [
    "EXAMPLE_COLUMNS",
    "QUERY_BUFFER_COLUMNS",
    "BatchPlan",
    "RaggedTokens",
    "SamplingResult",
    "TrainingBudget",
    "anchor_span",
    "document_examples",
    "empty_query_buffer",
    "examples_from_pairs",
    "labeled_pairs",
    "nearest_clusters",
    "plan_batches",
    "pseudo_positives",
    "query_buffer_rows",
    "replay_count",
    "replay_examples",
    "sample_session",
    "singleton_doc_keys",
    "training_budget",
    "training_queries",
    "training_texts",
    "update_query_buffer",
]

EXAMPLE_COLUMNS = ("query_key", "anchor", "positive_key", "negative_key", "negative_kind",
                   "cluster_id", "origin", "source")
QUERY_BUFFER_COLUMNS = ("query_key", "query_text", "positive_key", "cluster_id", "session",
                        "stream_index")
SPAN_PREFIX = "span:"
Seed = int | Sequence[int]

# Rounds of vectorized rejection sampling for easy / random negatives before giving up.
_DRAW_ROUNDS = 16
# Upper bound on one dense score block (anchors x cluster members) in hard-negative mining.
_MAX_SCORE_BLOCK = 1 << 22
# Stream tags: each random choice gets its own generator, so changing one leaves the others.
_NEGATIVES, _SPANS, _REPLAY, _BATCHES = 1, 2, 3, 4


def _seed_list(seed: Seed) -> list[int]:
    return [int(seed)] if isinstance(seed, int | np.integer) else [int(s) for s in seed]


def _rng(seed: Seed, stream: int) -> np.random.Generator:
    return np.random.default_rng([*_seed_list(seed), stream])


@dataclass(frozen=True)
class RaggedTokens:
    """Token embeddings of n texts: rows offsets[i]:offsets[i + 1] of `tokens` (T, d) are text i.

    offsets: (n + 1,) int64, non-decreasing, from 0 to T.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        if (len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(self.tokens)
                or (np.diff(offsets) < 0).any()):
            raise ValueError(f"offsets must rise from 0 to {len(self.tokens)} tokens")
        object.__setattr__(self, "offsets", offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, indices: np.ndarray) -> list[np.ndarray]:
        """The (t_i, d) token arrays of texts `indices` (views, not copies)."""
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in indices.tolist()]


class SamplingResult(NamedTuple):
    """Examples (`EXAMPLE_COLUMNS`) of one session, plus what the caller should log.

    notes: one line per skipped input or fallback; fallback: why the cluster rules could not
    apply (fewer than 2 clusters) and what was done instead, None when they applied.
    """

    examples: pd.DataFrame
    notes: tuple[str, ...]
    fallback: str | None


class TrainingBudget(NamedTuple):
    """Steps of one session's fine-tuning, examples they show (with repeats), passes."""

    steps: int
    examples: int
    epochs: float


@dataclass(frozen=True)
class BatchPlan:
    """Row positions of the examples of each batch, in training order.

    stratified: (n_batches,) bool, True for a batch drawn from one cluster by the stratified
    rule (a mixed batch may still happen to hold one cluster).
    """

    batches: list[np.ndarray]
    stratified: np.ndarray

    def __len__(self) -> int:
        return len(self.batches)


# --- the pool: rows grouped by cluster ---


@dataclass(frozen=True)
class _Pool:
    keys: np.ndarray  # (N,) object doc keys
    index: pd.Index  # doc_key -> row
    unit: np.ndarray  # (N, d) float32 L2-normalized vectors
    cluster_pos: np.ndarray  # (N,) position of each row's cluster in `clusters`
    clusters: np.ndarray  # (k,) sorted cluster ids with members in the pool
    order: np.ndarray  # (N,) rows sorted by cluster, stable
    starts: np.ndarray  # (k,) first position in `order` of each cluster
    sizes: np.ndarray  # (k,) members per cluster
    next_nearest: np.ndarray  # (k,) position of the nearest other cluster, -1 if none

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, position: int) -> np.ndarray:
        return self.order[self.starts[position]:self.starts[position] + self.sizes[position]]

    def rows_of(self, doc_keys: Sequence[str] | np.ndarray, what: str) -> np.ndarray:
        rows = self.index.get_indexer(np.asarray(doc_keys, dtype=object))
        if (rows < 0).any():
            missing = np.asarray(doc_keys, dtype=object)[rows < 0]
            raise KeyError(f"{what} not in the pool: {missing[:5].tolist()}")
        return rows


def _index_pool(pool: pd.DataFrame, pool_vectors: np.ndarray,
                centroids: CentroidTable) -> _Pool:
    if len(pool) != len(pool_vectors):
        raise ValueError(f"{len(pool)} pool rows for {len(pool_vectors)} vectors")
    keys = pool["doc_key"].to_numpy(dtype=object)
    index = pd.Index(keys)
    if not index.is_unique:
        duplicated = index[index.duplicated()][:5].tolist()
        raise ValueError(f"duplicate doc keys in the pool: {duplicated}")
    cluster_ids = pool["cluster_id"].to_numpy(np.int64)
    clusters, cluster_pos = np.unique(cluster_ids, return_inverse=True)
    order = np.argsort(cluster_pos, kind="stable")
    sizes = np.bincount(cluster_pos, minlength=len(clusters))
    starts = np.cumsum(sizes) - sizes
    next_nearest = np.full(len(clusters), -1, dtype=np.int64)
    if len(clusters) >= 2:
        c = centroids.vectors[centroids.rows_of(clusters)]  # (k, d)
        sims = c @ c.T
        np.fill_diagonal(sims, -np.inf)
        next_nearest = np.argmax(sims, axis=1).astype(np.int64)
    return _Pool(keys, index, unit_rows(pool_vectors), cluster_pos.astype(np.int64), clusters,
                 order, starts, sizes, next_nearest)


# --- positives ---


def training_queries(queries: pd.DataFrame, qrels: pd.DataFrame, session: str,
                     mode: SamplingMode | str) -> pd.DataFrame:
    """DataFrame(query_key, text) of the session's queries that may train.

    `queries` (query_id, text) and `qrels` (query_id, doc_id, score, split) as ingested.
    Labeled: queries with a train qrels row of score > 0. Self-supervised: every query not
    judged in the test split (their labels are not used), so test queries never train.
    """
    mode = SamplingMode(mode)
    if mode == SamplingMode.labeled:
        train = qrels[(qrels["split"] == "train") & (qrels["score"] > 0)]
        keep = queries["query_id"].isin(train["query_id"])
    else:
        keep = ~queries["query_id"].isin(qrels.loc[qrels["split"] == "test", "query_id"])
    kept = queries[keep]
    return pd.DataFrame({"query_key": (session + "/" + kept["query_id"].astype(str)).to_numpy(),
                         "text": kept["text"].astype(str).to_numpy()})


def labeled_pairs(qrels: pd.DataFrame, session: str, split: str = "train") -> pd.DataFrame:
    """DataFrame(query_key, positive_key): the `split` qrels rows of score > 0, file order."""
    rows = qrels[(qrels["split"] == split) & (qrels["score"] > 0)]
    return pd.DataFrame({
        "query_key": (session + "/" + rows["query_id"].astype(str)).to_numpy(dtype=object),
        "positive_key": (session + "/" + rows["doc_id"].astype(str)).to_numpy(dtype=object),
    })


def nearest_clusters(vectors: np.ndarray, centroids: CentroidTable, n: int) -> np.ndarray:
    """(m, min(n, k)) int64 ids of the clusters nearest (cosine) to each row of `vectors` (m, d).

    Nearest first; ties go to the smaller cluster id.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sims = unit_rows(vectors) @ centroids.vectors.T  # (m, k)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return centroids.ids[order]


def pseudo_positives(
    query_keys: Sequence[str] | np.ndarray,
    query_vectors: np.ndarray,
    query_tokens: RaggedTokens,
    pool: pd.DataFrame,
    doc_tokens: RaggedTokens,
    centroids: CentroidTable,
    n_probe: int,
) -> pd.DataFrame:
    """Self-supervised positives: the best exact-MaxSim document in each query's nearest clusters.

    query_vectors (m, d): vectors in the centroids' space (dense vectors, or query prototypes
    when clusters live on prototypes); query_tokens: m texts; doc_tokens: one per pool row.
    Only clusters with members in the pool are probed. Each probed cluster is scored once
    against all queries probing it (one `maxsim_matrix` call per cluster). Ties: the smaller
    cluster id, then the earlier pool row.

    Returns DataFrame(query_key, positive_key, cluster_id, score), one row per query that had a
    candidate, in query order.
    """
    keys = np.asarray(query_keys, dtype=object)
    if not len(keys) == len(query_vectors) == len(query_tokens):
        raise ValueError("query_keys, query_vectors and query_tokens differ in length")
    if len(doc_tokens) != len(pool):
        raise ValueError(f"{len(doc_tokens)} token arrays for {len(pool)} pool rows")
    empty = pd.DataFrame({"query_key": pd.Series(dtype=object),
                          "positive_key": pd.Series(dtype=object),
                          "cluster_id": pd.Series(dtype=np.int64),
                          "score": pd.Series(dtype=np.float32)})
    cluster_ids = pool["cluster_id"].to_numpy(np.int64)
    populated = np.unique(cluster_ids)
    if not len(keys) or not len(populated):
        return empty
    probe_table = CentroidTable(populated, centroids.vectors[centroids.rows_of(populated)])
    probes = nearest_clusters(query_vectors, probe_table, n_probe)  # (m, p)
    best_score = np.full(len(keys), -np.inf, dtype=np.float32)
    best_row = np.full(len(keys), -1, dtype=np.int64)
    for cluster in np.unique(probes):
        asking = np.flatnonzero((probes == cluster).any(axis=1))  # queries probing it
        members = np.flatnonzero(cluster_ids == cluster)
        scores = maxsim_matrix(query_tokens.rows(asking), doc_tokens.rows(members))  # (q, s)
        top = np.argmax(scores, axis=1)
        top_score = scores[np.arange(len(asking)), top]
        better = top_score > best_score[asking]
        best_score[asking[better]] = top_score[better]
        best_row[asking[better]] = members[top[better]]
    found = best_row >= 0
    rows = best_row[found]
    return pd.DataFrame({
        "query_key": keys[found],
        "positive_key": pool["doc_key"].to_numpy(dtype=object)[rows],
        "cluster_id": cluster_ids[rows],
        "score": best_score[found],
    })


def singleton_doc_keys(pool: pd.DataFrame, session: str | None = None) -> np.ndarray:
    """Doc keys alone in their cluster in the pool (of documents of `session` only, if given)."""
    counts = pool["cluster_id"].map(pool["cluster_id"].value_counts())
    alone = (counts == 1).to_numpy()
    if session is not None:
        alone = alone & (pool["session"] == session).to_numpy()
    return pool["doc_key"].to_numpy(dtype=object)[alone]


def anchor_span(text: str, span_words: int, rng: np.random.Generator) -> str:
    """A random run of `span_words` whitespace-separated words of `text` (all when shorter)."""
    words = text.split()
    if len(words) <= span_words:
        return " ".join(words)
    start = int(rng.integers(0, len(words) - span_words + 1))
    return " ".join(words[start:start + span_words])


# --- negatives ---


def _excluded_codes(pairs_query_keys: np.ndarray, positive_rows: np.ndarray,
                    known_positives: pd.DataFrame | None, pool: _Pool) -> np.ndarray:
    """Sorted codes example * N + row of the (example, document) pairs that may not be negatives."""
    n_pool = len(pool)
    codes = [np.arange(len(positive_rows), dtype=np.int64) * n_pool + positive_rows]
    if known_positives is not None and len(known_positives):
        rows = pool.index.get_indexer(known_positives["positive_key"].to_numpy(dtype=object))
        known = pd.DataFrame({"query_key": known_positives["query_key"].to_numpy(dtype=object),
                              "row": rows})
        known = known[known["row"] >= 0]
        examples = pd.DataFrame({"query_key": pairs_query_keys,
                                 "example": np.arange(len(pairs_query_keys), dtype=np.int64)})
        joined = examples.merge(known, on="query_key", how="inner")
        codes.append(joined["example"].to_numpy(np.int64) * n_pool
                     + joined["row"].to_numpy(np.int64))
    return np.unique(np.concatenate(codes))


def _hard_negatives(examples: np.ndarray, target: np.ndarray, anchors: np.ndarray,
                    threshold: np.ndarray, excluded: np.ndarray, pool: _Pool) -> np.ndarray:
    """(len(examples),) best allowed member of each example's target cluster, -1 if none."""
    found = np.full(len(examples), -1, dtype=np.int64)
    for position in np.unique(target[target >= 0]):
        chosen = np.flatnonzero(target == position)
        members = pool.members(int(position))  # (s,)
        step = max(1, _MAX_SCORE_BLOCK // max(len(members), 1))
        for first in range(0, len(chosen), step):
            block = chosen[first:first + step]
            ex = examples[block]
            scores = anchors[ex] @ pool.unit[members].T  # (b, s)
            codes = ex[:, None] * len(pool) + members[None, :]
            allowed = (scores <= threshold[ex, None]) & ~np.isin(codes, excluded)
            scores = np.where(allowed, scores, -np.inf)
            top = np.argmax(scores, axis=1)
            ok = allowed[np.arange(len(block)), top]
            found[block[ok]] = members[top[ok]]
    return found


def _drawn_negatives(examples: np.ndarray, positive_rows: np.ndarray, anchors: np.ndarray,
                     threshold: np.ndarray, excluded: np.ndarray, pool: _Pool,
                     rng: np.random.Generator, other_cluster: bool) -> np.ndarray:
    """Random allowed documents (from another cluster if `other_cluster`), -1 where none found."""
    found = np.full(len(examples), -1, dtype=np.int64)
    left = np.arange(len(examples))
    n_pool = len(pool)
    for _ in range(_DRAW_ROUNDS):
        if not len(left):
            break
        ex = examples[left]
        if other_cluster:
            own = pool.cluster_pos[positive_rows[ex]]
            span = n_pool - pool.sizes[own]  # rows outside the own cluster
            possible = span > 0
            if not possible.any():
                break
            drawn = rng.integers(0, np.maximum(span, 1))
            drawn = np.where(drawn >= pool.starts[own], drawn + pool.sizes[own], drawn)
            rows = pool.order[np.minimum(drawn, n_pool - 1)]
        else:
            possible = np.ones(len(ex), dtype=bool)
            rows = rng.integers(0, n_pool, size=len(ex))
        scores = np.einsum("nd,nd->n", anchors[ex], pool.unit[rows])
        good = (possible & (scores <= threshold[ex])
                & ~np.isin(ex * n_pool + rows, excluded))
        found[left[good]] = rows[good]
        left = left[~good]
    return found


def examples_from_pairs(
    pairs: pd.DataFrame,
    anchor_vectors: np.ndarray,
    pool: pd.DataFrame,
    pool_vectors: np.ndarray,
    centroids: CentroidTable,
    *,
    margin: float,
    easy_ratio: float,
    seed: Seed,
    origin: str,
    source: str = "new",
    known_positives: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Training examples (`EXAMPLE_COLUMNS`) with one negative each, for (anchor, positive) pairs.

    pairs: DataFrame(query_key, anchor, positive_key), e rows; anchor_vectors (e, d): the dense
    vector standing for each anchor (the query's, or the document's own for document examples).
    known_positives: DataFrame(query_key, positive_key) of every known positive of the queries,
    none of which may be a negative of that query. Negative rules: see the module docstring.
    A positive missing from the pool is a KeyError. The same seed gives the same examples.
    """
    if len(pairs) != len(anchor_vectors):
        raise ValueError(f"{len(pairs)} pairs for {len(anchor_vectors)} anchor vectors")
    index = _index_pool(pool, pool_vectors, centroids)
    return _examples(pairs, anchor_vectors, index, margin=margin, easy_ratio=easy_ratio,
                     rng=_rng(seed, _NEGATIVES), origin=origin, source=source,
                     known_positives=known_positives)


def _examples(pairs: pd.DataFrame, anchor_vectors: np.ndarray, pool: _Pool, *, margin: float,
              easy_ratio: float, rng: np.random.Generator, origin: str, source: str,
              known_positives: pd.DataFrame | None) -> pd.DataFrame:
    n = len(pairs)
    query_keys = pairs["query_key"].to_numpy(dtype=object)
    positive_rows = pool.rows_of(pairs["positive_key"].to_numpy(dtype=object), "positives")
    anchors = unit_rows(anchor_vectors) if n else np.zeros((0, pool.unit.shape[1]), np.float32)
    threshold = np.einsum("nd,nd->n", anchors, pool.unit[positive_rows]) - margin  # (n,)
    excluded = _excluded_codes(query_keys, positive_rows, known_positives, pool)
    wants_easy = rng.random(n) < easy_ratio
    own = pool.cluster_pos[positive_rows]
    # singleton rule: a positive alone in its cluster borrows from the next-nearest cluster
    target = np.where(pool.sizes[own] >= 2, own, pool.next_nearest[own])

    negative = np.full(n, -1, dtype=np.int64)
    kind = np.full(n, "none", dtype=object)
    everyone = np.arange(n)

    def fill(which: np.ndarray, label: str, rows: np.ndarray) -> None:
        hit = rows >= 0
        negative[which[hit]] = rows[hit]
        kind[which[hit]] = label

    def hard(which: np.ndarray) -> None:
        fill(which, "hard", _hard_negatives(which, target[which], anchors, threshold, excluded,
                                            pool))

    def easy(which: np.ndarray) -> None:
        fill(which, "easy", _drawn_negatives(which, positive_rows, anchors, threshold, excluded,
                                             pool, rng, other_cluster=True))

    def anywhere(which: np.ndarray) -> None:
        fill(which, "random", _drawn_negatives(which, positive_rows, anchors, threshold,
                                               excluded, pool, rng, other_cluster=False))

    # hard-first examples: hard, easy, random; easy-first examples: easy, random, hard
    for wanted, chain in ((everyone[~wants_easy], (hard, easy, anywhere)),
                          (everyone[wants_easy], (easy, anywhere, hard))):
        for pick in chain:
            pick(wanted[negative[wanted] < 0])
    return pd.DataFrame({
        "query_key": query_keys,
        "anchor": pairs["anchor"].astype(str).to_numpy(dtype=object),
        "positive_key": pool.keys[positive_rows],
        "negative_key": np.where(negative >= 0, pool.keys[np.maximum(negative, 0)], None),
        "negative_kind": kind,
        "cluster_id": pool.clusters[own] if n else np.zeros(0, np.int64),
        "origin": np.full(n, origin, dtype=object),
        "source": np.full(n, source, dtype=object),
    })


def document_examples(
    doc_keys: Sequence[str] | np.ndarray,
    doc_texts: pd.Series,
    pool: pd.DataFrame,
    pool_vectors: np.ndarray,
    centroids: CentroidTable,
    *,
    span_words: int,
    margin: float,
    easy_ratio: float,
    seed: Seed,
    source: str = "new",
) -> pd.DataFrame:
    """Examples where a pool document is its own positive, anchored by a random span of its text.

    Used for singleton clusters (the singleton rule) and for replaying remembered documents.
    The anchor's vector is the document's own, so negatives must score at most 1 - margin
    against it. query_key is `span:<doc_key>`, origin "span".
    """
    index = _index_pool(pool, pool_vectors, centroids)
    return _document_examples(np.asarray(doc_keys, dtype=object), doc_texts, index,
                              span_words=span_words, margin=margin, easy_ratio=easy_ratio,
                              seed=seed, source=source)


def _document_examples(doc_keys: np.ndarray, doc_texts: pd.Series, pool: _Pool, *,
                       span_words: int, margin: float, easy_ratio: float, seed: Seed,
                       source: str) -> pd.DataFrame:
    rows = pool.rows_of(doc_keys, "documents")
    texts = _texts_of(doc_texts, doc_keys)
    span_rng = _rng(seed, _SPANS)
    anchors = [anchor_span(text, span_words, span_rng) for text in texts]
    pairs = pd.DataFrame({"query_key": np.array([SPAN_PREFIX + k for k in doc_keys], dtype=object),
                          "anchor": np.array(anchors, dtype=object), "positive_key": doc_keys})
    return _examples(pairs, pool.unit[rows], pool, margin=margin, easy_ratio=easy_ratio,
                     rng=_rng(seed, _NEGATIVES), origin="span", source=source,
                     known_positives=None)


def _texts_of(doc_texts: pd.Series, doc_keys: np.ndarray) -> np.ndarray:
    positions = doc_texts.index.get_indexer(doc_keys)
    if (positions < 0).any():
        raise KeyError(f"no text for documents {doc_keys[positions < 0][:5].tolist()}")
    return doc_texts.to_numpy(dtype=object)[positions]


# --- replay and the query buffer ---


def replay_count(n_new: int, replay_ratio: float) -> int:
    """Replay examples so that they make up `replay_ratio` of new + replay (0 <= ratio < 1)."""
    if not 0.0 <= replay_ratio < 1.0:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
    return int(round(n_new * replay_ratio / (1.0 - replay_ratio)))


def replay_examples(
    query_buffer: pd.DataFrame,
    buffer_vectors: np.ndarray,
    pool: pd.DataFrame,
    pool_vectors: np.ndarray,
    centroids: CentroidTable,
    doc_texts: pd.Series,
    n_replay: int,
    *,
    session: str,
    span_words: int,
    margin: float,
    easy_ratio: float,
    seed: Seed,
) -> pd.DataFrame:
    """Up to `n_replay` replay examples (source "replay"): buffered queries, then documents.

    query_buffer (`QUERY_BUFFER_COLUMNS`) with buffer_vectors (b, d), the current encoder's
    vectors of its query texts. Buffer rows whose positive is not in the pool are skipped; the
    rest are drawn uniformly without replacement (origin "buffer"). If they are fewer than
    `n_replay`, document examples of pool documents from sessions other than `session` fill up,
    also drawn without replacement. Fewer than `n_replay` come back when memory is small.
    """
    index = _index_pool(pool, pool_vectors, centroids)
    return _replay(query_buffer, buffer_vectors, index, pool, doc_texts, n_replay,
                   session=session, span_words=span_words, margin=margin,
                   easy_ratio=easy_ratio, seed=seed)


def _replay(query_buffer: pd.DataFrame, buffer_vectors: np.ndarray, index: _Pool,
            pool: pd.DataFrame, doc_texts: pd.Series, n_replay: int, *, session: str,
            span_words: int, margin: float, easy_ratio: float, seed: Seed) -> pd.DataFrame:
    if len(query_buffer) != len(buffer_vectors):
        raise ValueError(f"{len(query_buffer)} buffer rows for {len(buffer_vectors)} vectors")
    rng = _rng(seed, _REPLAY)
    usable = np.flatnonzero(
        index.index.get_indexer(query_buffer["positive_key"].to_numpy(dtype=object)) >= 0)
    take = np.sort(rng.choice(usable, size=min(n_replay, len(usable)), replace=False))
    parts = []
    if len(take):
        chosen = query_buffer.iloc[take]
        pairs = pd.DataFrame({"query_key": chosen["query_key"].to_numpy(dtype=object),
                              "anchor": chosen["query_text"].to_numpy(dtype=object),
                              "positive_key": chosen["positive_key"].to_numpy(dtype=object)})
        parts.append(_examples(pairs, buffer_vectors[take], index, margin=margin,
                               easy_ratio=easy_ratio, rng=_rng(seed, _NEGATIVES),
                               origin="buffer", source="replay",
                               known_positives=query_buffer[["query_key", "positive_key"]]))
    n_docs = n_replay - len(take)
    past = np.flatnonzero((pool["session"] != session).to_numpy())
    if n_docs > 0 and len(past):
        rows = np.sort(rng.choice(past, size=min(n_docs, len(past)), replace=False))
        parts.append(_document_examples(index.keys[rows], doc_texts, index,
                                        span_words=span_words, margin=margin,
                                        easy_ratio=easy_ratio, seed=[*_seed_list(seed), 1],
                                        source="replay"))
    return _concat_examples(parts)


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
    new = examples[(examples["source"] == "new")
                   & ~examples["query_key"].astype(str).str.startswith(SPAN_PREFIX)]
    n = len(new)
    return pd.DataFrame({
        "query_key": new["query_key"].to_numpy(dtype=object),
        "query_text": new["anchor"].to_numpy(dtype=object),
        "positive_key": new["positive_key"].to_numpy(dtype=object),
        "cluster_id": new["cluster_id"].to_numpy(np.int64),
        "session": np.full(n, session, dtype=object),
        "stream_index": np.arange(first_stream_index, first_stream_index + n, dtype=np.int64),
    })


def update_query_buffer(buffer: pd.DataFrame, new_rows: pd.DataFrame, budget: int, seen: int,
                        seed: int) -> tuple[pd.DataFrame, int]:
    """Reservoir update: (the new buffer of at most `budget` rows, the new `seen` count).

    `seen` counts the pairs ever offered before `new_rows`; new rows carry stream indices
    >= seen. Uses the reservoir of `tasks.memory` (Algorithm R, vectorized), so every pair
    offered so far stays with the same probability. Same seed and inputs, same buffer.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    first = next_stream_index(buffer, seen)
    if len(new_rows) and int(new_rows["stream_index"].min()) < first:
        raise ValueError(f"new rows must have stream_index >= {first}")
    both = pd.concat([buffer, new_rows], ignore_index=True)[list(QUERY_BUFFER_COLUMNS)]
    stream_index = both["stream_index"].to_numpy(np.int64)
    kept = _reservoir_rows(stream_index, budget, seen, seed)
    new_seen = seen + int((stream_index >= seen).sum())
    return both.iloc[np.sort(kept)].reset_index(drop=True), new_seen


# --- the session ---


def _concat_examples(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "cluster_id" else object)
                             for c in EXAMPLE_COLUMNS})
    return pd.concat(parts, ignore_index=True)[list(EXAMPLE_COLUMNS)]


def sample_session(
    session: str,
    pool: pd.DataFrame,
    pool_vectors: np.ndarray,
    centroids: CentroidTable,
    doc_texts: pd.Series,
    queries: pd.DataFrame,
    query_vectors: np.ndarray,
    config: SamplingConfig,
    *,
    qrels: pd.DataFrame | None = None,
    query_tokens: RaggedTokens | None = None,
    doc_tokens: RaggedTokens | None = None,
    query_buffer: pd.DataFrame | None = None,
    buffer_vectors: np.ndarray | None = None,
    probe_vectors: np.ndarray | None = None,
) -> SamplingResult:
    """All training examples of one session: new ones, then replay (DESIGN step 7).

    queries: DataFrame(query_key, text) from `training_queries`, with query_vectors (m, d).
    Labeled mode needs `qrels` (ingested frame); self-supervised mode needs `query_tokens` and
    `doc_tokens` (one per pool row), and `probe_vectors` (m, d') when the centroids live in
    another space than query_vectors (query prototypes for prototype clusters).
    New examples: the session's query pairs, then (if `config.singleton_examples`) document
    examples of this session's documents that are alone in their cluster. Replay from
    `query_buffer` (+ `buffer_vectors`, the current encoder's vectors of its query texts) and
    past documents.
    Random choices are seeded by `config.seed` and the session name.
    """
    notes: list[str] = []
    seed = [config.seed, zlib.crc32(session.encode())]
    index = _index_pool(pool, pool_vectors, centroids)
    fallback = None
    if len(index.clusters) < 2:
        fallback = (f"{len(index.clusters)} cluster(s) in the pool: no other cluster for easy "
                    "or borrowed negatives (random allowed documents instead) and no "
                    "stratified batches (mixed instead)")
        notes.append(fallback)
    if len(queries) != len(query_vectors):
        raise ValueError(f"{len(queries)} queries for {len(query_vectors)} vectors")
    query_row = pd.Index(queries["query_key"].to_numpy(dtype=object))

    if config.mode == SamplingMode.labeled:
        if qrels is None:
            raise ValueError("labeled sampling needs the session's qrels")
        pairs = labeled_pairs(qrels, session)
        known = pairs
        origin = "labeled"
    else:
        if query_tokens is None or doc_tokens is None:
            raise ValueError("self-supervised sampling needs query and document token embeddings")
        probes = query_vectors if probe_vectors is None else probe_vectors
        found = pseudo_positives(queries["query_key"], probes, query_tokens, pool, doc_tokens,
                                 centroids, config.n_probe)
        pairs = found[["query_key", "positive_key"]]
        if len(pairs) < len(queries):
            notes.append(f"{len(queries) - len(pairs)} queries without a pseudo-positive "
                         "(no pool member in their nearest clusters)")
        known = pairs
        origin = "pseudo"
    rows = query_row.get_indexer(pairs["query_key"].to_numpy(dtype=object))
    in_pool = index.index.get_indexer(pairs["positive_key"].to_numpy(dtype=object)) >= 0
    usable = (rows >= 0) & in_pool
    if (~usable).any():
        notes.append(f"{int((rows < 0).sum())} pairs without an embedded query and "
                     f"{int((~in_pool).sum())} with a positive outside the pool were skipped")
    pairs, rows = pairs[usable], rows[usable]
    pairs = pairs.assign(anchor=queries["text"].to_numpy(dtype=object)[rows])
    parts = [_examples(pairs, query_vectors[rows], index, margin=config.hard_negative_margin,
                       easy_ratio=config.easy_negative_ratio, rng=_rng(seed, _NEGATIVES),
                       origin=origin, source="new", known_positives=known)]
    if config.singleton_examples:
        alone = singleton_doc_keys(pool, session)
        if len(alone):
            parts.append(_document_examples(
                alone, doc_texts, index, span_words=config.span_words,
                margin=config.hard_negative_margin, easy_ratio=config.easy_negative_ratio,
                seed=[*seed, _SPANS], source="new"))
    new = _concat_examples(parts)
    n_replay = replay_count(len(new), config.replay_ratio)
    if config.replay_all:  # every buffered query, no past-document examples
        n_replay = 0 if query_buffer is None else len(query_buffer)
    if n_replay:
        buffer = query_buffer if query_buffer is not None else empty_query_buffer()
        vectors = (buffer_vectors if buffer_vectors is not None
                   else np.zeros((0, pool_vectors.shape[1]), np.float32))
        replay = _replay(buffer, vectors, index, pool, doc_texts, n_replay, session=session,
                         span_words=config.span_words, margin=config.hard_negative_margin,
                         easy_ratio=config.easy_negative_ratio, seed=[*seed, _REPLAY])
        if len(replay) < n_replay:
            notes.append(f"replay: {len(replay)} of {n_replay} wanted examples (memory holds "
                         "too few queries and past documents)")
        examples = _concat_examples([new, replay])
    else:
        examples = new
    n_none = int((examples["negative_kind"] == "none").sum())
    if n_none:
        notes.append(f"{n_none} examples without any allowed negative (in-batch negatives only)")
    return SamplingResult(examples, tuple(notes), fallback)


def training_texts(examples: pd.DataFrame, doc_texts: pd.Series) -> pd.DataFrame:
    """DataFrame(anchor, positive, negative) of texts for `tasks.finetune.fine_tune`.

    negative is None where an example has no negative. A doc key without text is a KeyError.
    """
    positive = _texts_of(doc_texts, examples["positive_key"].to_numpy(dtype=object))
    negative_keys = examples["negative_key"].to_numpy(dtype=object)
    has = pd.notna(negative_keys)
    negative = np.full(len(examples), None, dtype=object)
    negative[has] = _texts_of(doc_texts, negative_keys[has])
    return pd.DataFrame({"anchor": examples["anchor"].to_numpy(dtype=object),
                         "positive": positive, "negative": negative})


# --- budget and batch order ---


def training_budget(n_examples: int, config: FinetuneConfig) -> TrainingBudget:
    """Steps of one session: ceil(n_examples * epochs / batch_size) or `config.steps`.

    Capped by `config.max_steps`; 0 steps when there is nothing to train on.
    """
    if n_examples <= 0:
        return TrainingBudget(0, 0, 0.0)
    if config.budget_unit == "epochs":
        steps = max(1, math.ceil(n_examples * config.epochs / config.batch_size))
    else:
        steps = config.steps
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    shown = steps * config.batch_size
    return TrainingBudget(steps, shown, shown / n_examples)


def plan_batches(
    examples: pd.DataFrame,
    batch_size: int,
    n_batches: int,
    *,
    stratified: bool = True,
    mixed_fraction: float = 0.3,
    seed: Seed = 0,
) -> BatchPlan:
    """The order of training: `n_batches` batches of example row positions.

    examples: `EXAMPLE_COLUMNS` (query_key, positive_key, negative_key, cluster_id are used).
    The first round(mixed_fraction * n_batches) batches are mixed, later ones stratified (one
    cluster each; leftovers of each cluster pooled into mixed batches), see the module
    docstring. Each pass over the examples uses every example once, in a new seeded shuffle;
    passes repeat until `n_batches`. With fewer than 2 clusters every batch is mixed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= mixed_fraction <= 1.0:
        raise ValueError(f"mixed_fraction must be in [0, 1], got {mixed_fraction}")
    n = len(examples)
    if n == 0 or n_batches <= 0:
        return BatchPlan([], np.zeros(0, dtype=bool))
    rng = _rng(seed, _BATCHES)
    clusters = examples["cluster_id"].to_numpy(np.int64)
    keys = _BatchKeys(examples)
    stratify = stratified and len(np.unique(clusters)) >= 2
    n_mixed = round(mixed_fraction * n_batches) if stratify else n_batches
    batches: list[np.ndarray] = []
    flags: list[bool] = []
    while len(batches) < n_batches:
        shuffled = rng.permutation(n)
        mixed = keys.batches(shuffled, batch_size)
        room = max(0, n_mixed - len(batches))
        batches.extend(mixed[:room])
        flags.extend([False] * len(mixed[:room]))
        if room >= len(mixed):
            continue
        # the rest of this pass, stratified
        rest = np.concatenate(mixed[room:])
        rest = rest[np.argsort(_positions_in(shuffled, rest), kind="stable")]  # pass order
        pure, leftover = [], []
        for cluster in np.unique(clusters[rest]):
            for batch in keys.batches(rest[clusters[rest] == cluster], batch_size):
                (pure if len(batch) == batch_size else leftover).append(batch)
        pooled = keys.batches(np.concatenate(leftover), batch_size) if leftover else []
        stage = [(b, True) for b in pure] + [(b, False) for b in pooled]
        for i in rng.permutation(len(stage)):
            batches.append(stage[i][0])
            flags.append(stage[i][1])
    return BatchPlan(batches[:n_batches], np.array(flags[:n_batches], dtype=bool))


def _positions_in(order: np.ndarray, items: np.ndarray) -> np.ndarray:
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    return where[items]


class _BatchKeys:
    """Greedy collision-free batching: no repeated query, no positive that is another example's
    positive or negative, no negative that is another example's positive."""

    def __init__(self, examples: pd.DataFrame) -> None:
        self.query = examples["query_key"].to_numpy(dtype=object)
        self.positive = examples["positive_key"].to_numpy(dtype=object)
        negative = examples["negative_key"].to_numpy(dtype=object)
        self.negative = np.where(pd.notna(negative), negative, None)

    def batches(self, items: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Consecutive batches of `items` (in order); a colliding example waits for the next."""
        out: list[np.ndarray] = []
        waiting: list[int] = []
        stream = iter(items.tolist())
        exhausted = False
        while not exhausted or waiting:
            batch = _OpenBatch()
            still: list[int] = []
            for i in waiting:
                if len(batch.members) < batch_size and batch.fits(*self._keys(i)):
                    batch.add(i, *self._keys(i))
                else:
                    still.append(i)
            while len(batch.members) < batch_size and not exhausted:
                i = next(stream, None)
                if i is None:
                    exhausted = True
                elif batch.fits(*self._keys(i)):
                    batch.add(i, *self._keys(i))
                else:
                    still.append(i)
            waiting = still
            if batch.members:
                out.append(np.array(batch.members, dtype=np.int64))
        return out

    def _keys(self, i: int) -> tuple[str, str, str | None]:
        return self.query[i], self.positive[i], self.negative[i]


class _OpenBatch:
    def __init__(self) -> None:
        self.members: list[int] = []
        self.queries: set[str] = set()
        self.positives: set[str] = set()
        self.documents: set[str] = set()  # positives and negatives

    def fits(self, query: str, positive: str, negative: str | None) -> bool:
        return (query not in self.queries and positive not in self.documents
                and (negative is None or negative not in self.positives))

    def add(self, i: int, query: str, positive: str, negative: str | None) -> None:
        self.members.append(i)
        self.queries.add(query)
        self.positives.add(positive)
        self.documents.add(positive)
        if negative is not None:
            self.documents.add(negative)
