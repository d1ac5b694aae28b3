"""Training examples over the candidate pool: one mined negative per (anchor, positive) pair.

The candidate **pool** is a memory-like table (columns doc_key, cluster_id, session; more are
allowed) whose row i goes with row i of `pool_vectors` (N, d), the dense document vectors;
`CandidatePool.from_table` indexes it once by cluster for all the examples of a session.
An example is a row of `EXAMPLE_COLUMNS`; `examples_from_pairs` makes query examples and
`document_examples` examples where a document is its own positive. Nothing here edits its
inputs.

Rules (DESIGN step 7 leaves the details open; decided here):
- Negatives are scored by the dense similarity (cosine) of the anchor to the document. A
  candidate scoring above (positive score - margin) is skipped: it is likely an unlabeled
  positive ("hard but not too hard"; NV-Retriever, Moreira et al. 2024, calls this positive-aware
  mining). A document that is a known positive of the same query is never a negative.
  A hard negative is the best-scoring allowed member of the positive's own cluster. An easy
  negative is a random allowed document of another cluster. Each example draws one negative:
  easy with probability `easy_ratio`, else hard; when the wanted kind has no allowed candidate
  the other kind is tried, then any allowed document of the pool ("random"), else none
  (negative_key None).
- A positive alone in its cluster borrows its hard negatives from the next-nearest cluster
  (nearest centroid with members in the pool). With fewer than 2 clusters there is no other
  cluster, so easy and borrowed negatives become random allowed documents of the one cluster.
- Document examples: the anchor is a random span of `span_words` words of the document's text
  (the whole text when shorter; random cropping as in Contriever, Izacard et al. 2022), scored
  by the document's own vector; query_key `span:<doc_key>`.

Randomness: every choice draws from its own generator, seeded with the caller's seed plus a
stream tag (`seeded_rng`), so changing one kind of draw leaves the others as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.warmup import unit_rows

__all__ = [
    "EXAMPLE_COLUMNS",
    "REPLAY_STREAM",
    "SPAN_PREFIX",
    "SPAN_STREAM",
    "CandidatePool",
    "Seed",
    "anchor_span",
    "concat_examples",
    "document_examples",
    "examples_from_pairs",
    "seed_list",
    "seeded_rng",
    "texts_of_keys",
]

EXAMPLE_COLUMNS = ("query_key", "anchor", "positive_key", "negative_key", "negative_kind",
                   "cluster_id", "origin", "source")
SPAN_PREFIX = "span:"
Seed = int | Sequence[int]

# Stream tags of `seeded_rng` (tasks.batching draws the batch order from stream 4).
NEGATIVE_STREAM, SPAN_STREAM, REPLAY_STREAM = 1, 2, 3
# Rounds of vectorized rejection sampling for easy / random negatives before giving up.
_DRAW_ROUNDS = 16
# Upper bound on one dense score block (anchors x cluster members) in hard-negative mining.
_MAX_SCORE_BLOCK = 1 << 22


def seed_list(seed: Seed) -> list[int]:
    """The seed as a list of ints, to extend with stream tags."""
    return [int(seed)] if isinstance(seed, int | np.integer) else [int(s) for s in seed]


def seeded_rng(seed: Seed, stream: int) -> np.random.Generator:
    """The generator of one stream of random choices under `seed`."""
    return np.random.default_rng([*seed_list(seed), stream])


@dataclass(frozen=True)
class CandidatePool:
    """The pool indexed by cluster: what negative mining and replay look documents up in."""

    keys: np.ndarray  # (N,) object doc keys
    index: pd.Index  # doc_key -> row
    sessions: np.ndarray  # (N,) object session of each row
    unit: np.ndarray  # (N, d) float32 L2-normalized vectors
    cluster_pos: np.ndarray  # (N,) position of each row's cluster in `clusters`
    clusters: np.ndarray  # (k,) sorted cluster ids with members in the pool
    order: np.ndarray  # (N,) rows sorted by cluster, stable
    starts: np.ndarray  # (k,) first position in `order` of each cluster
    sizes: np.ndarray  # (k,) members per cluster
    next_nearest: np.ndarray  # (k,) position of the nearest other cluster, -1 if none

    @classmethod
    def from_table(cls, pool: pd.DataFrame, pool_vectors: np.ndarray,
                   centroids: CentroidTable) -> CandidatePool:
        """Index `pool` (doc_key, cluster_id, session) with its vectors (N, d).

        Duplicate doc keys are a ValueError; `centroids` must hold every cluster of the pool.
        """
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
        return cls(keys, index, pool["session"].to_numpy(dtype=object), unit_rows(pool_vectors),
                   cluster_pos.astype(np.int64), clusters, order, starts, sizes, next_nearest)

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, position: int) -> np.ndarray:
        """Rows of the cluster at `position` of `clusters`."""
        return self.order[self.starts[position]:self.starts[position] + self.sizes[position]]

    def rows_of(self, doc_keys: Sequence[str] | np.ndarray, what: str) -> np.ndarray:
        """Rows of `doc_keys`; a key outside the pool is a KeyError naming `what` they are."""
        rows = self.index.get_indexer(np.asarray(doc_keys, dtype=object))
        if (rows < 0).any():
            missing = np.asarray(doc_keys, dtype=object)[rows < 0]
            raise KeyError(f"{what} not in the pool: {missing[:5].tolist()}")
        return rows


# --- negatives ---


def _excluded_codes(pairs_query_keys: np.ndarray, positive_rows: np.ndarray,
                    known_positives: pd.DataFrame | None, pool: CandidatePool) -> np.ndarray:
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
                    threshold: np.ndarray, excluded: np.ndarray,
                    pool: CandidatePool) -> np.ndarray:
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
                     threshold: np.ndarray, excluded: np.ndarray, pool: CandidatePool,
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
    pool: CandidatePool,
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
    rng = seeded_rng(seed, NEGATIVE_STREAM)
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


# --- documents as their own positives ---


def anchor_span(text: str, span_words: int, rng: np.random.Generator) -> str:
    """A random run of `span_words` whitespace-separated words of `text` (all when shorter)."""
    words = text.split()
    if len(words) <= span_words:
        return " ".join(words)
    start = int(rng.integers(0, len(words) - span_words + 1))
    return " ".join(words[start:start + span_words])


def document_examples(
    doc_keys: Sequence[str] | np.ndarray,
    doc_texts: pd.Series,
    pool: CandidatePool,
    *,
    span_words: int,
    margin: float,
    easy_ratio: float,
    seed: Seed,
    source: str = "new",
) -> pd.DataFrame:
    """Examples where a pool document is its own positive, anchored by a random span of its text.

    Used for singleton clusters (the singleton rule) and for replaying remembered documents.
    doc_texts: Series doc_key -> text. The anchor's vector is the document's own, so negatives
    must score at most 1 - margin against it. query_key is `span:<doc_key>`, origin "span".
    """
    doc_keys = np.asarray(doc_keys, dtype=object)
    rows = pool.rows_of(doc_keys, "documents")
    texts = texts_of_keys(doc_texts, doc_keys)
    span_rng = seeded_rng(seed, SPAN_STREAM)
    anchors = [anchor_span(text, span_words, span_rng) for text in texts]
    pairs = pd.DataFrame({"query_key": np.array([SPAN_PREFIX + k for k in doc_keys], dtype=object),
                          "anchor": np.array(anchors, dtype=object), "positive_key": doc_keys})
    return examples_from_pairs(pairs, pool.unit[rows], pool, margin=margin,
                               easy_ratio=easy_ratio, seed=seed, origin="span", source=source)


# --- tables ---


def texts_of_keys(doc_texts: pd.Series, doc_keys: np.ndarray) -> np.ndarray:
    """(n,) object texts of `doc_keys` from the Series doc_key -> text; KeyError if one lacks it."""
    positions = doc_texts.index.get_indexer(doc_keys)
    if (positions < 0).any():
        raise KeyError(f"no text for documents {doc_keys[positions < 0][:5].tolist()}")
    return doc_texts.to_numpy(dtype=object)[positions]


def concat_examples(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The example frames one after the other (`EXAMPLE_COLUMNS`, typed even when empty)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "cluster_id" else object)
                             for c in EXAMPLE_COLUMNS})
    return pd.concat(parts, ignore_index=True)[list(EXAMPLE_COLUMNS)]
