"""Plan a stream: which documents and queries of which BEIR collection go to which session.

Two stream shapes:

- ``domain``: one session per collection, in the order given (a new domain per session), each
  subsampled to ``docs_per_session`` documents (all of them when no size is given).
- ``mixed``: every session draws from several collections with shifting proportions, in the
  spirit of CREAM's LoTTE streams (KDD 2026): session i weights collection j by a Gaussian
  kernel over the collection index whose centre moves from the first collection to the last one
  (:func:`mixing_weights`). Ids are prefixed ``<collection>:<id>`` so that collections that reuse
  ids ("1", "2", ...) cannot collide inside one session.

Rules shared by both: a document or query arrives at most once in the whole stream (exactly once
when no size limit drops any); a kept query brings every document it is judged against into its
own session (a session's qrels may only name its own documents, docs/decisions.md), and at most
``max_judged_share`` of a subsampled session's documents are judged ones, so that the rest are
distractors; a collection whose qrels have a single split gets its judged queries split (seeded)
into train and test. Everything random derives from ``seed`` and the collection name, so the same
arguments write byte-identical folders.

Everything here takes ids and qrels frames (no file access); :mod:`driftlane.tasks.stream_builder`
reads the collections and writes the planned session folders.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "DatasetIndex", "SessionPart", "SessionPlan", "StreamBuildError", "StreamMode", "StreamPlan",
    "assign_query_splits", "check_stream_arguments", "document_quotas", "largest_remainder",
    "mixing_weights", "plan_dataset", "plan_stream", "query_quotas", "session_folder_names",
]

StreamMode = Literal["domain", "mixed"]
MIXING_SPREAD = 1.0  # Gaussian width, in collections: a session draws mostly from ~3 neighbours
MAX_JUDGED_SHARE = 0.5
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class StreamBuildError(ValueError):
    """The stream cannot be built as asked (bad collection, arguments or output folder)."""


@dataclass(frozen=True)
class DatasetIndex:
    """What planning needs from one collection: ids and judgments, no texts."""

    name: str
    doc_ids: list[str]  # corpus file order
    query_ids: list[str]  # queries file order
    qrels: pd.DataFrame  # query_id, doc_id, score, split; test file rows then train file rows


@dataclass(frozen=True)
class SessionPart:
    """What one collection contributes to one session (raw, unprefixed ids)."""

    dataset: str
    docs_requested: int
    doc_ids: frozenset[str]
    query_ids: tuple[str, ...]  # queries file order
    qrels: pd.DataFrame  # rows of the kept queries, final split, file order


@dataclass(frozen=True)
class SessionPlan:
    name: str  # folder name, e.g. "00_scifact"
    weights: dict[str, float]  # collection -> share of the session's document quota
    parts: tuple[SessionPart, ...]  # in collection order; empty contributions left out

    @property
    def n_docs(self) -> int:
        return sum(len(p.doc_ids) for p in self.parts)


@dataclass(frozen=True)
class StreamPlan:
    mode: StreamMode
    prefix_ids: bool
    split_by_seed: dict[str, bool]  # collection -> its train/test split was drawn here
    sessions: tuple[SessionPlan, ...]

def mixing_weights(n_sessions: int, n_datasets: int,
                   spread: float = MIXING_SPREAD) -> np.ndarray:
    """Share of each collection in each session of a mixed stream, shape (n_sessions, n_datasets).

    Session i is a Gaussian over the collection index (width ``spread``) centred at
    i * (n_datasets - 1) / (n_sessions - 1): the mass moves from the first collections to the
    last ones, as the domain distribution drifts in CREAM's LoTTE sessions. Rows sum to 1.
    """
    centres = (np.linspace(0.0, n_datasets - 1, n_sessions) if n_sessions > 1
               else np.zeros(1))
    offsets = np.arange(n_datasets)[None, :] - centres[:, None]  # (n_sessions, n_datasets)
    kernel = np.exp(-0.5 * (offsets / spread) ** 2)
    return kernel / kernel.sum(axis=1, keepdims=True)


def largest_remainder(shares: Sequence[float] | np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``shares`` that sum exactly to ``total`` (Hamilton's method;
    ties go to the earlier entry)."""
    shares = np.asarray(shares, dtype=np.float64)
    if total <= 0 or shares.sum() <= 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    missing = int(total - counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:missing]] += 1
    return counts


def document_quotas(mode: StreamMode, dataset_sizes: Sequence[int], n_sessions: int,
                    docs_per_session: int | None,
                    spread: float = MIXING_SPREAD) -> np.ndarray:
    """Documents requested from collection j for session i, shape (n_sessions, n_datasets).

    domain: the diagonal, ``docs_per_session`` (or the whole collection). mixed with a size:
    each row splits ``docs_per_session`` by :func:`mixing_weights`; mixed without a size: each
    collection is split over the sessions by its column of weights, so every document arrives.
    Requests may exceed what is left of a collection; :func:`plan_dataset` caps them.
    """
    sizes = np.asarray(dataset_sizes, dtype=np.int64)
    if mode == "domain":
        assert n_sessions == len(sizes)
        wanted = sizes if docs_per_session is None else np.minimum(sizes, docs_per_session)
        return np.diag(wanted)
    weights = mixing_weights(n_sessions, len(sizes), spread)
    if docs_per_session is not None:
        return np.stack([largest_remainder(row, docs_per_session) for row in weights])
    return np.stack([largest_remainder(weights[:, j], int(sizes[j]))
                     for j in range(len(sizes))], axis=1)


def query_quotas(doc_quotas: np.ndarray, queries_per_session: int | None) -> np.ndarray | None:
    """Most queries collection j may bring to session i: ``queries_per_session`` split in
    proportion to the session's document quotas; None means no limit."""
    if queries_per_session is None:
        return None
    return np.stack([largest_remainder(row, queries_per_session) for row in doc_quotas])


def _rng(seed: int, dataset: str, purpose: str) -> np.random.Generator:
    """A generator per (seed, collection, purpose): adding a collection to the stream or
    reordering it does not change what is drawn from the others."""
    key = int.from_bytes(hashlib.sha256(f"{dataset}/{purpose}".encode()).digest()[:8], "big")
    return np.random.default_rng([seed, key])


def assign_query_splits(qrels: pd.DataFrame, test_fraction: float, seed: int,
                        dataset: str) -> tuple[pd.DataFrame, bool]:
    """Give a collection with a single qrels split a seeded train/test split of its queries.

    Returns (new qrels frame, whether a split was drawn). A collection that has both splits is
    returned as is. Otherwise round(test_fraction * n) judged queries (at least one of each
    split when 0 < test_fraction < 1 and n >= 2) become test queries, the others train ones.
    """
    if qrels["split"].nunique() != 1:
        return qrels, False
    queries = pd.unique(qrels["query_id"])
    n_test = int(round(test_fraction * len(queries)))
    if 0.0 < test_fraction < 1.0 and len(queries) >= 2:
        n_test = min(max(n_test, 1), len(queries) - 1)
    shuffled = queries[_rng(seed, dataset, "split").permutation(len(queries))]
    test = set(shuffled[:n_test].tolist())
    split = np.where(qrels["query_id"].isin(test), "test", "train")
    return qrels.assign(split=pd.Series(split, index=qrels.index, dtype="str")), True


def _interleaved_query_order(qrels: pd.DataFrame, seed: int, dataset: str) -> list[str]:
    """Judged queries in a seeded order that keeps the test/train ratio in every prefix, so a
    session that keeps only a few queries still gets both kinds (test first on ties)."""
    is_test = qrels.groupby("query_id", sort=False)["split"].agg(lambda s: (s == "test").any())
    rng = _rng(seed, dataset, "queries")
    keyed: list[tuple[float, int, str]] = []
    for rank, flag in ((0, True), (1, False)):
        ids = is_test.index[is_test.values == flag].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        keyed += [(i / len(ids), rank, q) for i, q in enumerate(ids.tolist())]
    return [q for _, _, q in sorted(keyed)]


def plan_dataset(index: DatasetIndex, doc_quota: Sequence[int],
                 query_quota: Sequence[int] | None, seed: int,
                 max_judged_share: float = MAX_JUDGED_SHARE) -> list[SessionPart | None]:
    """Choose, session by session, which queries and documents of one collection go where.

    ``doc_quota[i]`` documents are requested for session i (capped by what is left). Queries
    are taken in :func:`_interleaved_query_order`; a query is kept when its judged documents
    (all of them, which come along) fit the judged budget (``max_judged_share`` of the quota, or
    the whole quota when the session takes everything left) and none of them arrived earlier;
    a query that does not fit may still fit a later session. The rest of the quota is filled in
    a seeded order, first with documents that no waiting query needs. Returns one SessionPart
    per session (None where nothing was requested). ``index.qrels`` must carry final splits.
    """
    judged: dict[str, frozenset[str]] = {
        q: frozenset(docs) for q, docs in index.qrels.groupby("query_id", sort=False)["doc_id"]
    }
    pool = _interleaved_query_order(index.qrels, seed, index.name)
    doc_order = [index.doc_ids[k] for k in _rng(seed, index.name, "docs").permutation(
        len(index.doc_ids))]
    last_session = max((i for i, q in enumerate(doc_quota) if q > 0), default=-1)
    used: set[str] = set()
    parts: list[SessionPart | None] = []
    for i, requested in enumerate(doc_quota):
        if requested <= 0:
            parts.append(None)
            continue
        available = len(index.doc_ids) - len(used)
        quota = min(int(requested), available)
        judged_budget = quota if quota == available else int(quota * max_judged_share)
        max_queries = None if query_quota is None else int(query_quota[i])
        chosen: list[str] = []
        judged_docs: set[str] = set()
        waiting: list[str] = []
        for query in pool:
            docs = judged[query]
            if not docs.isdisjoint(used):
                continue  # one of its documents arrived in an earlier session: drop the query
            if max_queries is None or len(chosen) < max_queries:
                if len(judged_docs | docs) <= judged_budget:
                    chosen.append(query)
                    judged_docs |= docs
                    continue
            waiting.append(query)
        pool = waiting
        # Documents judged for waiting queries are the last choice as filler: taking one
        # would make that query unusable later in the stream.
        reserved = set().union(*(judged[q] for q in pool)) if i < last_session else set()
        need = quota - len(judged_docs)
        free = [d for d in doc_order if d not in used and d not in judged_docs]
        fill = [d for d in free if d not in reserved][:need]
        if len(fill) < need:
            fill += [d for d in free if d in reserved][: need - len(fill)]
        session_docs = frozenset(judged_docs.union(fill))
        used |= session_docs
        kept = set(chosen)
        parts.append(SessionPart(
            dataset=index.name,
            docs_requested=int(requested),
            doc_ids=session_docs,
            query_ids=tuple(q for q in index.query_ids if q in kept),
            qrels=index.qrels[index.qrels["query_id"].isin(kept)].reset_index(drop=True),
        ))
    return parts


def session_folder_names(mode: StreamMode, datasets: Sequence[str],
                         n_sessions: int) -> list[str]:
    """``00_<collection>`` per domain session, ``00_mixed`` per mixed one; the numbers are
    zero-padded so that names sort in stream order."""
    width = max(2, len(str(n_sessions - 1)))
    if mode == "domain":
        return [f"{i:0{width}d}_{name}" for i, name in enumerate(datasets)]
    return [f"{i:0{width}d}_mixed" for i in range(n_sessions)]


def plan_stream(indexes: Sequence[DatasetIndex], *, mode: StreamMode = "domain",
                docs_per_session: int | None = None, queries_per_session: int | None = None,
                n_sessions: int | None = None, seed: int = 0, test_fraction: float = 0.5,
                max_judged_share: float = MAX_JUDGED_SHARE) -> StreamPlan:
    """Plan a whole stream from the collections' ids and qrels (see the module docstring)."""
    names = [index.name for index in indexes]
    check_stream_arguments(names, mode, docs_per_session, queries_per_session, n_sessions,
                           test_fraction, max_judged_share)
    n_sessions = len(indexes) if n_sessions is None else n_sessions
    doc_quota = document_quotas(mode, [len(x.doc_ids) for x in indexes], n_sessions,
                                docs_per_session)
    query_quota = query_quotas(doc_quota, queries_per_session)
    columns: list[list[SessionPart | None]] = []
    split_by_seed: dict[str, bool] = {}
    for j, index in enumerate(indexes):
        qrels, drawn = assign_query_splits(index.qrels, test_fraction, seed, index.name)
        split_by_seed[index.name] = drawn
        index = DatasetIndex(index.name, index.doc_ids, index.query_ids, qrels)
        columns.append(plan_dataset(index, doc_quota[:, j],
                                    None if query_quota is None else query_quota[:, j],
                                    seed, max_judged_share))
    weights = doc_quota / np.maximum(doc_quota.sum(axis=1, keepdims=True), 1)
    sessions = []
    for i, folder in enumerate(session_folder_names(mode, names, n_sessions)):
        parts = tuple(col[i] for col in columns if col[i] is not None and col[i].doc_ids)
        if not parts:
            raise StreamBuildError(
                f"session {folder} would have no documents: the collections are used up "
                f"({sum(len(x.doc_ids) for x in indexes)} documents for {n_sessions} sessions)")
        sessions.append(SessionPlan(
            folder, {name: round(float(w), 6) for name, w in zip(names, weights[i], strict=True)
                     if w > 0}, parts))
    return StreamPlan(mode, mode == "mixed", split_by_seed, tuple(sessions))


def check_stream_arguments(names: Sequence[str], mode: str, docs_per_session: int | None,
                           queries_per_session: int | None, n_sessions: int | None,
                           test_fraction: float, max_judged_share: float) -> None:
    """Raise StreamBuildError for arguments no stream can be built from (before any reading)."""
    if not names:
        raise StreamBuildError("no collections given")
    if mode not in ("domain", "mixed"):
        raise StreamBuildError(f"mode must be 'domain' or 'mixed', not {mode!r}")
    for name in names:
        if not _NAME.fullmatch(name):
            raise StreamBuildError(f"collection name {name!r} must use only letters, digits, "
                                   "'_', '-' and '.' (it names session folders and id prefixes)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StreamBuildError(f"collection {duplicates[0]!r} is given twice; a document may "
                               "arrive only once in a stream")
    if mode == "domain" and n_sessions is not None and n_sessions != len(names):
        raise StreamBuildError("--sessions applies to mixed streams; a domain stream has one "
                               "session per collection")
    for label, value in (("--docs-per-session", docs_per_session),
                         ("--queries-per-session", queries_per_session),
                         ("--sessions", n_sessions)):
        if value is not None and value < 1:
            raise StreamBuildError(f"{label} must be at least 1, got {value}")
    if not 0.0 <= test_fraction <= 1.0:
        raise StreamBuildError(f"--test-fraction must be within [0, 1], got {test_fraction}")
    if not 0.0 < max_judged_share <= 1.0:
        raise StreamBuildError(f"max judged share must be within (0, 1], got {max_judged_share}")

