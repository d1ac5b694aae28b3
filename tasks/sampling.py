"""Training examples of one session (DESIGN step 7): which pairs train, and the session's mix.

Identity. A document is `<session>/<doc id>` (doc_key), a query `<session>/<query id>`
(query_key). A document example has the query key `span:<doc_key>`.

Inputs. The candidate **pool** is a memory-like table (columns doc_key, cluster_id, session; more
are allowed) whose row i goes with row i of `pool_vectors` (N, d), the dense document vectors;
normally the memory after this session's assignment, i.e. the remembered documents plus the new
ones. Centroids are the `tasks.memory.CentroidTable` of the clusters. Queries are a table
(query_key, text) with their dense vectors (m, d) row by row. Token embeddings, for term-based
scoring, are `tasks.pseudo_positives.RaggedTokens`. Document texts are a Series doc_key -> text
that the caller looks up. Nothing here edits its inputs; every function returns new frames.

Rules (DESIGN step 7 leaves the details open; decided here):
- Labeled mode: a (query, positive) pair per `qrels/train.tsv` row with score > 0
  (`labeled_pairs`). Self-supervised mode: every query not judged in the test split
  (`training_queries`) gets a pseudo-positive (`tasks.pseudo_positives`: by MaxSim, or with
  `pseudo_positive_scoring = "fusion"` by rank fusion with BM25 over the pool's texts,
  `tasks.lexical`).
- Each pair gets one mined negative (`tasks.negatives`: hard from the positive's cluster, easy
  from another one, never a likely unlabeled positive).
- Singleton clusters (one member in the pool). The document is its own positive: a document
  example anchored by a random span of its text (`tasks.negatives.document_examples`); its
  hard negatives come from the next-nearest cluster.
- Documents as queries (`document_example_ratio` > 0): that share of the session's other
  documents train the same way, a span of the document as its pseudo-query (the inverse cloze
  task, Lee et al. 2019; cropping as in Contriever, Izacard et al. 2022): a signal that needs
  no query at all.
- Negatives of the session's query examples are scored by dense cosine, or, with
  `negative_scoring = "prototypes"`, by the cosine of LSH token prototypes (query side against
  document side, approximating MaxSim: term-based scoring, DESIGN step 4); the clusters are
  the same either way. Document and replay examples are scored densely.
- Both modes report how often a mined hard negative is a judged positive of its query
  (`hard_negative_false_negative_rate`; the qrels of any split, read for that figure only).
- Self-supervised mode reads the session's qrels for diagnostics only: how often the
  pseudo-positive is a judged positive (`pseudo_positive_precision`) and the false-negative
  rate above, logged and written to the training summary; they never change which examples
  train.
- Fewer than 2 clusters. Nothing crashes: there is no other cluster for easy or borrowed
  negatives, so they become random allowed documents of the one cluster (in-batch negatives
  still apply), and batches cannot be stratified, so they stay mixed. `sample_session` says so in
  `SamplingResult.fallback`. With no allowed document at all an example has no negative, and
  fine-tuning then trains on in-batch negatives only.
- Replay (`tasks.replay`): old pairs from the query buffer, then remembered documents, make up
  `replay_ratio` of the examples.

Wiring, for the caller: `training_queries` -> embed them -> `sample_session` ->
`tasks.batching.training_budget` -> `tasks.batching.plan_batches` -> `training_texts` ->
`tasks.finetune.fine_tune`; then `tasks.replay.query_buffer_rows` and
`tasks.replay.update_query_buffer` for the next session.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd

from driftlane.infra.config import PseudoPositiveScoring, SamplingConfig, SamplingMode
from driftlane.tasks.lexical import Bm25Index
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.negatives import (
    REPLAY_STREAM,
    SPAN_STREAM,
    CandidatePool,
    concat_examples,
    document_examples,
    examples_from_pairs,
    seeded_rng,
    texts_of_keys,
)
from driftlane.tasks.pseudo_positives import RaggedTokens, pseudo_positives
from driftlane.tasks.replay import empty_query_buffer, replay_count, replay_examples

__all__ = [
    "SamplingResult",
    "labeled_pairs",
    "sample_session",
    "singleton_doc_keys",
    "training_queries",
    "training_texts",
]


class SamplingResult(NamedTuple):
    """Examples (`tasks.negatives.EXAMPLE_COLUMNS`) of one session, plus what to log.

    notes: one line per skipped input or fallback; fallback: why the cluster rules could not
    apply (fewer than 2 clusters) and what was done instead, None when they applied;
    diagnostics: figures for the training summary (`pseudo_positive_precision`).
    """

    examples: pd.DataFrame
    notes: tuple[str, ...]
    fallback: str | None
    diagnostics: dict | None = None


# Stream tag of `seeded_rng` for choosing documents that train as their own positive.
DOCUMENT_STREAM = 5


def pseudo_positive_precision(pairs: pd.DataFrame, qrels: pd.DataFrame | None,
                              session: str) -> dict:
    """How often a pseudo-positive is a judged positive, over the pseudo-labeled queries that
    have judgments (any split, score > 0). A diagnostic for the training summary only: it never
    changes which examples train. precision is None when no such query exists."""
    if qrels is None or not len(pairs):
        return {"pseudo_positive_precision": None, "pseudo_positives_judged": 0}
    judged = labeled_pairs(qrels, session, "train")
    judged = pd.concat([judged, labeled_pairs(qrels, session, "test")], ignore_index=True)
    truth = set(zip(judged["query_key"], judged["positive_key"], strict=True))
    checked = pairs[pairs["query_key"].isin(set(judged["query_key"]))]
    hits = sum((q, d) in truth for q, d in zip(checked["query_key"], checked["positive_key"],
                                               strict=True))
    return {"pseudo_positive_precision": hits / len(checked) if len(checked) else None,
            "pseudo_positives_judged": len(checked)}


def hard_negative_judgments(examples: pd.DataFrame, qrels: pd.DataFrame | None,
                            session: str) -> dict:
    """How often a hard negative of the session's query examples is a judged positive of its
    query (any split, score > 0): the false-negative rate of mining, over the examples whose
    query has judgments. A diagnostic only; None when no such example exists."""
    empty = {"hard_negative_false_negative_rate": None, "hard_negatives_judged": 0}
    if qrels is None or not len(examples):
        return empty
    judged = pd.concat([labeled_pairs(qrels, session, "train"),
                        labeled_pairs(qrels, session, "test")], ignore_index=True)
    hard = examples[(examples["negative_kind"] == "hard") & (examples["source"] == "new")
                    & examples["query_key"].isin(set(judged["query_key"]))]
    if not len(hard):
        return empty
    truth = set(zip(judged["query_key"], judged["positive_key"], strict=True))
    hits = sum((q, d) in truth for q, d in zip(hard["query_key"], hard["negative_key"],
                                               strict=True))
    return {"hard_negative_false_negative_rate": hits / len(hard),
            "hard_negatives_judged": len(hard)}


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


def singleton_doc_keys(pool: pd.DataFrame, session: str | None = None) -> np.ndarray:
    """Doc keys alone in their cluster in the pool (of documents of `session` only, if given)."""
    counts = pool["cluster_id"].map(pool["cluster_id"].value_counts())
    alone = (counts == 1).to_numpy()
    if session is not None:
        alone = alone & (pool["session"] == session).to_numpy()
    return pool["doc_key"].to_numpy(dtype=object)[alone]


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
    prototype_space: tuple[np.ndarray, np.ndarray] | None = None,
    replay_rank: Callable[[pd.DataFrame, pd.DataFrame], np.ndarray] | None = None,
) -> SamplingResult:
    """All training examples of one session: new ones, then replay (DESIGN step 7).

    queries: DataFrame(query_key, text) from `training_queries`, with query_vectors (m, d).
    Labeled mode needs `qrels` (ingested frame); self-supervised mode needs `query_tokens` and
    `doc_tokens` (one per pool row), and `probe_vectors` (m, d') when the centroids live in
    another space than query_vectors (query prototypes for prototype clusters).
    prototype_space: (pool prototypes (N, P), query prototypes (m, P)) to score the negatives
    of the query examples by token prototypes instead of dense vectors (`negative_scoring`).
    replay_rank: (new examples, candidate replay examples) -> one score per candidate; the
    highest-scored buffered pairs replay (MIR, `tasks.interference`) instead of a uniform
    draw.
    New examples: the session's query pairs, then (if `config.singleton_examples`) document
    examples of this session's documents that are alone in their cluster. Replay from
    `query_buffer` (+ `buffer_vectors`, the current encoder's vectors of its query texts) and
    past documents.
    Random choices are seeded by `config.seed` and the session name.
    """
    notes: list[str] = []
    seed = [config.seed, zlib.crc32(session.encode())]
    index = CandidatePool.from_table(pool, pool_vectors, centroids)
    fallback = None
    if len(index.clusters) < 2:
        fallback = (f"{len(index.clusters)} cluster(s) in the pool: no other cluster for easy "
                    "or borrowed negatives (random allowed documents instead) and no "
                    "stratified batches (mixed instead)")
        notes.append(fallback)
    if len(queries) != len(query_vectors):
        raise ValueError(f"{len(queries)} queries for {len(query_vectors)} vectors")
    query_row = pd.Index(queries["query_key"].to_numpy(dtype=object))

    diagnostics: dict = {}
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
        lexical = None
        if config.pseudo_positive_scoring == PseudoPositiveScoring.fusion:
            lexical = Bm25Index.build(texts_of_keys(
                doc_texts, pool["doc_key"].to_numpy(dtype=object))).scores(
                queries["text"].astype(str).tolist())
        found = pseudo_positives(queries["query_key"], probes, query_tokens, pool, doc_tokens,
                                 centroids, config.n_probe, lexical=lexical)
        pairs = found[["query_key", "positive_key"]]
        diagnostics = pseudo_positive_precision(pairs, qrels, session)
        if diagnostics["pseudo_positive_precision"] is not None:
            notes.append(f"pseudo-positive precision {diagnostics['pseudo_positive_precision']:.3f}"
                         f" over {diagnostics['pseudo_positives_judged']} judged queries "
                         "(qrels read for this figure only)")
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
    scored_by, anchor_vectors = index, query_vectors[rows]
    if prototype_space is not None:  # the same clusters, scored on token prototypes
        pool_prototypes, query_prototypes = prototype_space
        scored_by = CandidatePool.from_table(pool, pool_prototypes, centroids)
        anchor_vectors = query_prototypes[rows]
    parts = [examples_from_pairs(pairs, anchor_vectors, scored_by,
                                 margin=config.hard_negative_margin,
                                 easy_ratio=config.easy_negative_ratio, seed=seed,
                                 origin=origin, source="new", known_positives=known)]
    alone = singleton_doc_keys(pool, session) if config.singleton_examples else np.array([])
    if len(alone):
        parts.append(document_examples(
            alone, doc_texts, index, span_words=config.span_words,
            margin=config.hard_negative_margin, easy_ratio=config.easy_negative_ratio,
            seed=[*seed, SPAN_STREAM], source="new"))
    chosen = documents_as_queries(pool, session, alone, config.document_example_ratio,
                                  [*seed, DOCUMENT_STREAM])
    if len(chosen):
        parts.append(document_examples(
            chosen, doc_texts, index, span_words=config.span_words,
            margin=config.hard_negative_margin, easy_ratio=config.easy_negative_ratio,
            seed=[*seed, DOCUMENT_STREAM], source="new"))
    new = concat_examples(parts)
    n_replay = replay_count(len(new), config.replay_ratio)
    if config.replay_all:  # every buffered query, no past-document examples
        n_replay = 0 if query_buffer is None else len(query_buffer)
    if n_replay:
        buffer = query_buffer if query_buffer is not None else empty_query_buffer()
        vectors = (buffer_vectors if buffer_vectors is not None
                   else np.zeros((0, pool_vectors.shape[1]), np.float32))
        replay = replay_examples(buffer, vectors, index, doc_texts, n_replay, session=session,
                                 span_words=config.span_words,
                                 margin=config.hard_negative_margin,
                                 easy_ratio=config.easy_negative_ratio,
                                 seed=[*seed, REPLAY_STREAM],
                                 rank=None if replay_rank is None
                                 else (lambda candidates: replay_rank(new, candidates)))
        if len(replay) < n_replay:
            notes.append(f"replay: {len(replay)} of {n_replay} wanted examples (memory holds "
                         "too few queries and past documents)")
        examples = concat_examples([new, replay])
    else:
        examples = new
    diagnostics.update(hard_negative_judgments(examples, qrels, session))
    if diagnostics["hard_negative_false_negative_rate"] is not None:
        notes.append(f"hard negatives that are judged positives: "
                     f"{diagnostics['hard_negative_false_negative_rate']:.3f} of "
                     f"{diagnostics['hard_negatives_judged']} (qrels read for this figure only)")
    n_none = int((examples["negative_kind"] == "none").sum())
    if n_none:
        notes.append(f"{n_none} examples without any allowed negative (in-batch negatives only)")
    return SamplingResult(examples, tuple(notes), fallback, diagnostics)


def documents_as_queries(pool: pd.DataFrame, session: str, exclude: np.ndarray, ratio: float,
                         seed: list[int]) -> np.ndarray:
    """Doc keys of `session` in the pool (but `exclude`) that train as their own positive: a
    seeded `ratio` share of them, in pool order."""
    if ratio <= 0:
        return np.array([], dtype=object)
    own = pool.loc[pool["session"] == session, "doc_key"].to_numpy(dtype=object)
    own = own[~pd.Index(own).isin(set(exclude.tolist()))]
    n = int(round(ratio * len(own)))
    if n == 0:
        return np.array([], dtype=object)
    picked = seeded_rng(seed, DOCUMENT_STREAM).choice(len(own), size=n, replace=False)
    return own[np.sort(picked)]


def training_texts(examples: pd.DataFrame, doc_texts: pd.Series) -> pd.DataFrame:
    """DataFrame(anchor, positive, negative) of texts for `tasks.finetune.fine_tune`.

    negative is None where an example has no negative. A doc key without text is a KeyError.
    """
    positive = texts_of_keys(doc_texts, examples["positive_key"].to_numpy(dtype=object))
    negative_keys = examples["negative_key"].to_numpy(dtype=object)
    has = pd.notna(negative_keys)
    negative = np.full(len(examples), None, dtype=object)
    negative[has] = texts_of_keys(doc_texts, negative_keys[has])
    return pd.DataFrame({"anchor": examples["anchor"].to_numpy(dtype=object),
                         "positive": positive, "negative": negative})
