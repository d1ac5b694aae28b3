"""Cut BEIR collections into a stream of numbered session folders (`driftlane make-stream`).

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

The planning functions at the top take ids and qrels frames (no file access); the functions at
the end stream the collections (any fsspec URL, ``.jsonl.gz`` included) and write the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import pandas as pd

from infra.store import normalize_url
from tasks.ingest import QRELS_HEADER, SessionFormatError, validate_session

__all__ = [
    "DEFAULT_DATASETS", "DatasetIndex", "SessionPart", "SessionPlan", "StreamBuildError",
    "StreamMode", "StreamPlan", "assign_query_splits", "build_stream", "default_datasets_dir",
    "document_quotas", "largest_remainder", "mixing_weights", "plan_dataset", "plan_stream",
    "query_quotas", "read_dataset_index", "resolve_datasets",
]

StreamMode = Literal["domain", "mixed"]
DEFAULT_DATASETS = ("scifact", "cosqa", "npl_vaswani", "cisi", "msmarco_agentset5k")
STREAM_FORMAT = 1
STREAM_MANIFEST = "stream.json"
MIXING_SPREAD = 1.0  # Gaussian width, in collections: a session draws mostly from ~3 neighbours
MAX_JUDGED_SHARE = 0.5
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SESSION_FOLDER = re.compile(r"[0-9]+_[A-Za-z0-9_.-]+")
_PARTIAL_FOLDER = re.compile(r"\.[0-9]+_[A-Za-z0-9_.-]+\.partial")


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


# --- planning (pure) ------------------------------------------------------------------------


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
    _check_arguments(names, mode, docs_per_session, queries_per_session, n_sessions,
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


def _check_arguments(names: Sequence[str], mode: str, docs_per_session: int | None,
                     queries_per_session: int | None, n_sessions: int | None,
                     test_fraction: float, max_judged_share: float) -> None:
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


# --- reading --------------------------------------------------------------------------------


def default_datasets_dir() -> str:
    """$DRIFTLANE_DATASETS, else ``../shared/datasets`` next to the repository root."""
    env = os.environ.get("DRIFTLANE_DATASETS")
    if env:
        return normalize_url(env)
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets")


def resolve_datasets(datasets: Sequence[str],
                     datasets_dir: str | None = None) -> list[tuple[str, str]]:
    """(collection name, normalized URL) per argument. A bare name (no '/', no '://') is looked
    up in ``datasets_dir`` (default :func:`default_datasets_dir`); anything else is a path or
    URL. The name is the folder's last component."""
    base = normalize_url(datasets_dir) if datasets_dir else default_datasets_dir()
    resolved = []
    for given in datasets or DEFAULT_DATASETS:
        bare = "/" not in given and "://" not in given and given not in (".", "..")
        url = base.rstrip("/") + "/" + given if bare else normalize_url(given)
        resolved.append((url.rstrip("/").rsplit("/", 1)[-1], url))
    return resolved


def _session_file(fs: fsspec.AbstractFileSystem, root: str, logical: str) -> str | None:
    """Path of ``logical`` or ``logical.gz`` under root (validate_session has checked that at
    most one exists)."""
    for path in (f"{root}/{logical}", f"{root}/{logical}.gz"):
        if fs.isfile(path):
            return path
    return None


def _lines(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """Non-blank decoded lines, streamed, gunzipped when the name ends in .gz."""
    with fs.open(path, "rb", compression="infer") as stream:
        for raw in stream:
            if raw.strip():
                yield raw.decode("utf-8")


def read_dataset_index(name: str, url: str) -> DatasetIndex:
    """Doc ids, query ids and qrels of a validated collection, streaming (texts are skipped)."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    corpus = _session_file(fs, root, "corpus.jsonl")
    assert corpus is not None
    doc_ids = [json.loads(line)["_id"] for line in _lines(fs, corpus)]
    queries = _session_file(fs, root, "queries.jsonl")
    query_ids = [json.loads(line)["_id"] for line in _lines(fs, queries)] if queries else []
    rows: list[tuple[str, str, int, str]] = []
    for split in ("test", "train"):
        path = _session_file(fs, root, f"qrels/{split}.tsv")
        if path is None:
            continue
        lines = _lines(fs, path)
        next(lines)  # header
        for line in lines:
            query_id, doc_id, score = line.rstrip("\r\n").split("\t")
            rows.append((query_id, doc_id, int(score), split))
    qrels = pd.DataFrame(rows, columns=["query_id", "doc_id", "score", "split"]).astype(
        {"query_id": "str", "doc_id": "str", "score": "int64", "split": "str"})
    return DatasetIndex(name, doc_ids, query_ids, qrels)


# --- writing --------------------------------------------------------------------------------


def _prepare_out(out: Path, force: bool) -> list[Path]:
    """Check that ``out`` may receive a stream; return what --force will delete."""
    if out.exists() and not out.is_dir():
        raise StreamBuildError(f"{out}: --out exists and is not a folder")
    entries = sorted(out.iterdir()) if out.exists() else []
    if entries and not force:
        raise StreamBuildError(f"{out}: --out is not empty (use --force to replace the stream "
                               "written there)")
    for entry in entries:
        ours = (entry.name in (STREAM_MANIFEST, STREAM_MANIFEST + ".partial")
                or (entry.is_dir() and (_SESSION_FOLDER.fullmatch(entry.name)
                                        or _PARTIAL_FOLDER.fullmatch(entry.name))))
        if not ours:
            raise StreamBuildError(f"{out}: --force only replaces a stream, and {entry.name!r} "
                                   "is not part of one; choose another --out")
    return entries


def _scoped(dataset: str, item_id: str, prefix: bool) -> str:
    return f"{dataset}:{item_id}" if prefix else item_id


def _scoped_qrels(part: SessionPart, prefix: bool) -> pd.DataFrame:
    if not prefix:
        return part.qrels
    return part.qrels.assign(query_id=part.dataset + ":" + part.qrels["query_id"],
                             doc_id=part.dataset + ":" + part.qrels["doc_id"])


def _write_sessions(plan: StreamPlan, sources: dict[str, str], staging: dict[str, Path]) -> None:
    """Stream each collection once more and append its chosen documents and queries to the
    staged session folders (collection order, then file order)."""
    for session in plan.sessions:
        staging[session.name].mkdir(parents=True)
    for dataset, url in sources.items():
        doc_session: dict[str, str] = {}
        query_session: dict[str, str] = {}
        for session in plan.sessions:
            for part in session.parts:
                if part.dataset == dataset:
                    doc_session.update(dict.fromkeys(part.doc_ids, session.name))
                    query_session.update(dict.fromkeys(part.query_ids, session.name))
        if not doc_session:
            continue
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        for logical, wanted in (("corpus.jsonl", doc_session), ("queries.jsonl", query_session)):
            path = _session_file(fs, root, logical)
            if not wanted or path is None:
                continue
            handles = {name: open(staging[name] / logical, "a", encoding="utf-8", newline="\n")
                       for name in sorted(set(wanted.values()))}
            try:
                for line in _lines(fs, path):
                    record = json.loads(line)
                    target = wanted.get(record["_id"])
                    if target is None:
                        continue
                    out = {"_id": _scoped(dataset, record["_id"], plan.prefix_ids)}
                    if logical == "corpus.jsonl":
                        out["title"] = record.get("title", "")
                    out["text"] = record["text"]
                    handles[target].write(json.dumps(out, ensure_ascii=False) + "\n")
            finally:
                for handle in handles.values():
                    handle.close()
    for session in plan.sessions:
        qrels = pd.concat([_scoped_qrels(part, plan.prefix_ids) for part in session.parts])
        for split in ("test", "train"):
            rows = qrels[qrels["split"] == split]
            if rows.empty:
                continue
            (staging[session.name] / "qrels").mkdir(exist_ok=True)
            body = "".join(f"{q}\t{d}\t{s}\n" for q, d, s in
                           zip(rows["query_id"], rows["doc_id"], rows["score"], strict=True))
            (staging[session.name] / "qrels" / f"{split}.tsv").write_text(
                QRELS_HEADER + "\n" + body, encoding="utf-8", newline="\n")


def _stream_manifest(plan: StreamPlan, sources: dict[str, str], digests: dict[str, str],
                     indexes: Sequence[DatasetIndex], arguments: dict) -> dict:
    """What stream.json says: arguments, command, per collection and per session counts."""
    datasets = []
    for index in indexes:
        parts = [p for s in plan.sessions for p in s.parts if p.dataset == index.name]
        datasets.append({
            "name": index.name, "source": sources[index.name], "digest": digests[index.name],
            "docs": len(index.doc_ids), "judged_queries": int(index.qrels["query_id"].nunique()),
            "query_split": "seeded" if plan.split_by_seed[index.name] else "source",
            "docs_in_stream": sum(len(p.doc_ids) for p in parts),
            "queries_in_stream": sum(len(p.query_ids) for p in parts),
        })
    sessions = []
    for session in plan.sessions:
        composition = {}
        for part in session.parts:
            test_queries = part.qrels.loc[part.qrels["split"] == "test", "query_id"].nunique()
            composition[part.dataset] = {
                "docs": len(part.doc_ids), "docs_requested": part.docs_requested,
                "queries": len(part.query_ids), "test_queries": int(test_queries),
                "train_queries": len(part.query_ids) - int(test_queries),
                "qrels_rows": {s: int((part.qrels["split"] == s).sum()) for s in ("test", "train")},
            }
        sessions.append({
            "name": session.name, "docs": session.n_docs,
            "queries": sum(len(p.query_ids) for p in session.parts),
            "weights": session.weights, "datasets": composition,
        })
    return {"format": STREAM_FORMAT, **arguments, "ids_prefixed": plan.prefix_ids,
            "datasets": datasets, "sessions": sessions}


def _command(sources: dict[str, str], out: Path, arguments: dict) -> str:
    words = ["driftlane", "make-stream", *sources.values(), "--out", str(out),
             "--mode", arguments["mode"], "--seed", str(arguments["seed"]),
             "--test-fraction", str(arguments["test_fraction"])]
    for option, key in (("--docs-per-session", "docs_per_session"),
                        ("--queries-per-session", "queries_per_session"),
                        ("--sessions", "n_sessions")):
        if arguments[key] is not None:
            words += [option, str(arguments[key])]
    return shlex.join(words)


def build_stream(datasets: Sequence[str], out: str | os.PathLike[str], *,
                 mode: StreamMode = "domain", docs_per_session: int | None = None,
                 queries_per_session: int | None = None, n_sessions: int | None = None,
                 seed: int = 0, test_fraction: float = 0.5,
                 datasets_dir: str | None = None, force: bool = False) -> dict:
    """Write the stream of session folders ``out/NN_<name>/`` and ``out/stream.json``.

    ``datasets`` are names under ``datasets_dir`` or paths/URLs (empty: DEFAULT_DATASETS).
    Each collection is validated first (tasks.ingest.validate_session), then read twice more,
    streaming: ids and qrels to plan, then the chosen texts. Sessions are written under
    ``.NN_<name>.partial``, validated, renamed into place; stream.json, written last, marks the
    stream complete. ``out`` (a local folder) must be empty unless ``force``, which replaces
    a previous stream (and refuses to delete anything else). Returns stream.json's content.
    """
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    resolved = resolve_datasets(datasets, datasets_dir)
    names = [name for name, _ in resolved]
    _check_arguments(names, mode, docs_per_session, queries_per_session, n_sessions,
                     test_fraction, MAX_JUDGED_SHARE)
    _prepare_out(out, force)
    sources = dict(resolved)
    digests, indexes = {}, []
    for name, url in resolved:
        try:
            digests[name] = validate_session(url)
        except SessionFormatError as exc:
            raise StreamBuildError(f"collection {name!r} cannot be read: {exc}") from exc
        indexes.append(read_dataset_index(name, url))
    plan = plan_stream(indexes, mode=mode, docs_per_session=docs_per_session,
                       queries_per_session=queries_per_session, n_sessions=n_sessions,
                       seed=seed, test_fraction=test_fraction)
    arguments = {"mode": mode, "seed": seed, "docs_per_session": docs_per_session,
                 "queries_per_session": queries_per_session,
                 "n_sessions": len(plan.sessions) if mode == "mixed" else None,
                 "test_fraction": test_fraction, "max_judged_share": MAX_JUDGED_SHARE,
                 "mixing_spread": MIXING_SPREAD if mode == "mixed" else None}
    arguments["command"] = _command(sources, out, {**arguments, "n_sessions": n_sessions})
    manifest = _stream_manifest(plan, sources, digests, indexes, arguments)

    # Only now, with the plan made, is an old stream replaced.
    for entry in _prepare_out(out, force):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    staging = {s.name: out / f".{s.name}.partial" for s in plan.sessions}
    _write_sessions(plan, sources, staging)
    for session in plan.sessions:
        try:
            validate_session(staging[session.name])
        except SessionFormatError as exc:  # a bug here, not bad input
            raise StreamBuildError(f"session {session.name} came out invalid: {exc}") from exc
    for session in plan.sessions:
        os.replace(staging[session.name], out / session.name)
    partial = out / (STREAM_MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                       encoding="utf-8", newline="\n")
    os.replace(partial, out / STREAM_MANIFEST)
    return manifest
