"""Validate one session folder (BEIR layout) record by record, and the `ingest_session` task.

Corpus and queries are JSON lines with string-or-integer ``_id``s and string texts; qrels are
``query-id<TAB>corpus-id<TAB>score`` rows naming known ids. Bad input is rejected with a
:class:`SessionFormatError` naming file, line and problem, so that it never reaches the store.
Locating, opening and hashing the files is :mod:`driftlane.tasks.session_files`. Plain
functions (file access only via fsspec) first, the Prefect task wrapper at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pandas as pd
from prefect import get_run_logger, task

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.store import normalize_url
from driftlane.tasks.session_files import (
    SessionFile,
    SessionFormatError,
    SessionLayout,
    locate_session,
    numbered_lines,
)
from driftlane.tasks.stage_results import IngestedSession

__all__ = [
    "SessionData", "SessionFormatError", "ingest_session", "read_corpus_file", "read_session",
    "validate_session",
]

QRELS_HEADER = "query-id\tcorpus-id\tscore"
_HEADER_WORDS = "'query-id<TAB>corpus-id<TAB>score'"

# the default of `IngestConfig.max_document_chars`
MAX_DOCUMENT_CHARS = 1_000_000
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class SessionData:
    """A validated session: frames in file order plus the content digest."""

    name: str
    url: str
    digest: str
    corpus: pd.DataFrame  # doc_id, title, text
    queries: pd.DataFrame  # query_id, text
    qrels: pd.DataFrame  # query_id, doc_id, score (int64), split ("test" then "train")


def read_session(url: str | os.PathLike[str],
                 max_document_chars: int = MAX_DOCUMENT_CHARS) -> SessionData:
    """Read and validate the session folder at ``url`` (any fsspec URL; ``~`` expanded).

    One streaming pass per file: lines are decoded, validated and hashed as they are read.
    Raises SessionFormatError on the first problem found.
    """
    session = _read(url, keep_content=True, max_document_chars=max_document_chars)
    assert session is not None
    return session


def validate_session(url: str | os.PathLike[str],
                     max_document_chars: int = MAX_DOCUMENT_CHARS) -> str:
    """Check everything ``read_session`` checks and return the digest, keeping no texts.

    Memory holds only the ids (needed to check qrels), so a run can refuse bad input before
    it persists anything, without holding the corpus in memory.
    """
    return _read(url, keep_content=False, max_document_chars=max_document_chars)


def read_corpus_file(url: str | os.PathLike[str],
                     max_document_chars: int = MAX_DOCUMENT_CHARS) -> pd.DataFrame:
    """Read and validate one corpus file outside a session folder (``{"_id","title","text"}``
    lines, gzipped when its name ends in ``.gz``) by a session corpus's rules: doc_id, title,
    text in file order. Raises SessionFormatError naming the file and line."""
    url = normalize_url(os.fspath(url))
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise SessionFormatError(url, None, "is not a file" if fs.exists(path) else "no such file")
    corpus = SessionFile("corpus.jsonl", url, path, gzipped=url.endswith(".gz"))
    layout = SessionLayout(_basename(url), url, fs, corpus, queries=None, qrels={})
    frame, _ = _read_corpus(layout, hashlib.sha256(), True, max_document_chars)
    return frame


def _read(url: str | os.PathLike[str], keep_content: bool, max_document_chars: int):
    layout = locate_session(url)
    hasher = hashlib.sha256()

    corpus, doc_lines = _read_corpus(layout, hasher, keep_content, max_document_chars)
    if layout.queries is None:
        queries, query_lines = _frame({"query_id": [], "text": []}), {}
    else:
        queries, query_lines = _read_queries(layout, hasher, keep_content)

    known_queries = _KnownIds(
        query_lines, _basename(layout.queries.url) if layout.queries else None
    )
    known_docs = _KnownIds(doc_lines, _basename(layout.corpus.url))
    qrels_columns: dict[str, list] = {"query_id": [], "doc_id": [], "score": [], "split": []}
    for split, qrels_file in layout.qrels.items():
        _read_qrels(layout.fs, qrels_file, split, hasher, known_queries, known_docs, qrels_columns)
    if not keep_content:
        return hasher.hexdigest()
    qrels = _frame(qrels_columns, int_columns=("score",))

    return SessionData(
        name=layout.name,
        url=layout.url,
        digest=hasher.hexdigest(),
        corpus=corpus,
        queries=queries,
        qrels=qrels,
    )


# --- JSON lines -----------------------------------------------------------------------------


def _json_records(
    fs: fsspec.AbstractFileSystem, session_file: SessionFile, hasher, id_kind: str
) -> Iterator[tuple[int, str, dict]]:
    """Yield (line, id, object) for each JSON line, checking the shared '_id' rules."""
    url = session_file.url
    for line, text in numbered_lines(fs, session_file, hasher):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SessionFormatError(url, line, f"invalid JSON at column {exc.colno} "
                                     f"({exc.msg})") from None
        if not isinstance(record, dict):
            raise SessionFormatError(url, line, f"expected a JSON object, got {_json_type(record)}")
        if "_id" not in record:
            raise SessionFormatError(url, line, "missing '_id'")
        raw_id = record["_id"]
        # bool is an int subclass, but `true` is no id anybody meant
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            raise SessionFormatError(
                url, line, f"'_id' must be a string or an integer, got {_json_type(raw_id)}"
            )
        record_id = str(raw_id)
        if not record_id.strip():
            raise SessionFormatError(url, line, f"empty {id_kind} id")
        _check_id(record_id, id_kind, url, line)
        yield line, record_id, record


def _check_id(record_id: str, id_kind: str, url: str, line: int) -> None:
    """Ids become store keys `<session>/<id>` and file names of exports: no control
    characters (NUL, newline, ...) and no '/'."""
    control = next((c for c in record_id if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if control is not None:
        raise SessionFormatError(url, line, f"{id_kind} id {_short(record_id)!r} contains the "
                                 f"control character U+{ord(control):04X}")
    if "/" in record_id:
        raise SessionFormatError(url, line, f"{id_kind} id {_short(record_id)!r} contains '/' "
                                 "(store keys are <session>/<id>)")


def _string_field(record: dict, key: str, url: str, line: int, required: bool) -> str:
    if key not in record:
        if required:
            raise SessionFormatError(url, line, f"missing '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SessionFormatError(url, line, f"'{key}' must be a string, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "integer" if isinstance(value, int) else "number"


# --- the three file kinds -------------------------------------------------------------------


def _read_corpus(layout: SessionLayout, hasher, keep_content: bool = True,
                 max_document_chars: int = MAX_DOCUMENT_CHARS,
                 ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Corpus frame in file order and doc id -> line (for duplicates and qrels checks)."""
    session_file = layout.corpus
    doc_lines: dict[str, int] = {}
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    any_content = False
    for line, doc_id, record in _json_records(layout.fs, session_file, hasher, "doc"):
        if doc_id in doc_lines:
            raise SessionFormatError(
                session_file.url,
                line,
                f"duplicate doc id {_short(doc_id)!r} (first seen on line {doc_lines[doc_id]})",
            )
        title = _string_field(record, "title", session_file.url, line, required=False)
        text = _string_field(record, "text", session_file.url, line, required=True)
        if len(title) + len(text) > max_document_chars:
            raise SessionFormatError(
                session_file.url, line,
                f"document {_short(doc_id)!r} has {len(title) + len(text):,} characters, more "
                f"than the limit of {max_document_chars:,} ([ingest] max_document_chars)")
        # Real collections keep a few empty documents; only an all-empty corpus is an error.
        any_content = any_content or bool(title.strip() or text.strip())
        doc_lines[doc_id] = line
        if keep_content:
            ids.append(doc_id)
            titles.append(title)
            texts.append(text)
    if not doc_lines:
        raise SessionFormatError(session_file.url, None, "no documents")
    if not any_content:
        raise SessionFormatError(
            session_file.url, None, "every document has an empty title and text"
        )
    return _frame({"doc_id": ids, "title": titles, "text": texts}), doc_lines


def _read_queries(layout: SessionLayout, hasher,
                  keep_content: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
    """Queries frame in file order and query id -> line."""
    session_file = layout.queries
    assert session_file is not None
    query_lines: dict[str, int] = {}
    ids: list[str] = []
    texts: list[str] = []
    for line, query_id, record in _json_records(layout.fs, session_file, hasher, "query"):
        if query_id in query_lines:
            raise SessionFormatError(
                session_file.url,
                line,
                f"duplicate query id {_short(query_id)!r} "
                f"(first seen on line {query_lines[query_id]})",
            )
        text = _string_field(record, "text", session_file.url, line, required=True)
        if not text.strip():
            raise SessionFormatError(
                session_file.url, line, f"empty text for query {_short(query_id)!r}"
            )
        query_lines[query_id] = line
        if keep_content:
            ids.append(query_id)
            texts.append(text)
    return _frame({"query_id": ids, "text": texts}), query_lines


@dataclass(frozen=True)
class _KnownIds:
    lines: dict[str, int]  # id -> line where it was defined
    source: str | None  # file name for messages; None when the file is absent


def _read_qrels(
    fs: fsspec.AbstractFileSystem,
    session_file: SessionFile,
    split: str,
    hasher,
    queries: _KnownIds,
    docs: _KnownIds,
    columns: dict[str, list],
) -> None:
    """Validate one qrels TSV and append its rows to ``columns``."""
    url = session_file.url
    pair_lines: dict[tuple[str, str], int] = {}
    header_seen = False
    for line, text in numbered_lines(fs, session_file, hasher):
        fields = text.rstrip("\r\n").split("\t")
        if not header_seen:
            _check_qrels_header(url, line, text.rstrip("\r\n"))
            header_seen = True
            continue
        if len(fields) != 3:
            raise SessionFormatError(
                url, line, f"expected 3 tab-separated columns, got {len(fields)}"
            )
        query_id, doc_id, score_text = fields
        if not _INTEGER.fullmatch(score_text):
            raise SessionFormatError(url, line, f"score {_short(score_text)!r} is not an integer")
        score = int(score_text)
        if score < 0:
            raise SessionFormatError(url, line, f"negative score {score}")
        if query_id not in queries.lines:
            where = f"not in {queries.source}" if queries.source else "there is no queries file"
            raise SessionFormatError(url, line, f"unknown query-id {_short(query_id)!r} ({where})")
        if doc_id not in docs.lines:
            raise SessionFormatError(
                url, line, f"unknown corpus-id {_short(doc_id)!r} (not in {docs.source})"
            )
        pair = (query_id, doc_id)
        if pair in pair_lines:
            raise SessionFormatError(
                url,
                line,
                f"duplicate pair ({_short(query_id)!r}, {_short(doc_id)!r}) "
                f"(first seen on line {pair_lines[pair]})",
            )
        pair_lines[pair] = line
        columns["query_id"].append(query_id)
        columns["doc_id"].append(doc_id)
        columns["score"].append(score)
        columns["split"].append(split)
    if not header_seen:
        raise SessionFormatError(url, 1, f"missing header line {_HEADER_WORDS}")


def _check_qrels_header(url: str, line: int, header: str) -> None:
    if line == 1 and header == QRELS_HEADER:
        return
    fields = header.split("\t")
    # A first row shaped like data means the header was left out, not misspelled.
    looks_like_data = len(fields) == 3 and _INTEGER.fullmatch(fields[2]) is not None
    if line != 1 or looks_like_data:
        raise SessionFormatError(url, 1, f"missing header line {_HEADER_WORDS}")
    raise SessionFormatError(url, 1, f"header must be {_HEADER_WORDS}, got {_short(header)!r}")


def _short(value: str, limit: int = 60) -> str:
    """Cut long values so that messages stay one readable line."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _frame(columns: dict[str, list], int_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """DataFrame with explicit dtypes, so empty frames have the same schema as full ones."""
    return pd.DataFrame(
        {
            name: pd.Series(values, dtype="int64" if name in int_columns else "str")
            for name, values in columns.items()
        }
    )


# --- Prefect task wrappers ---

INGEST_VERSION = "2"  # 2: returns an IngestedSession


@task(cache_key_fn=cache_key_for("ingest", INGEST_VERSION), persist_result=True,
      result_serializer="json", task_run_name="ingest {session_url}")
def ingest_session(session_url: str, digest: str, scratch_dir: str,
                   max_document_chars: int = MAX_DOCUMENT_CHARS) -> IngestedSession:
    """Validate the session folder and write it as parquet tables to scratch."""
    session = read_session(session_url, max_document_chars)
    if session.digest != digest:
        raise SessionFormatError(session_url, None, "session folder changed while it was being "
                                 "read (content digest differs); run it again once it is complete")
    out = stage_output_dir("ingest", INGEST_VERSION, scratch_dir)
    paths = {"docs_path": out / "docs.parquet", "queries_path": out / "queries.parquet",
             "qrels_path": out / "qrels.parquet"}
    for frame, path in zip((session.corpus, session.queries, session.qrels), paths.values(),
                           strict=True):
        frame.to_parquet(path, index=False)
    get_run_logger().info("session %s: %d documents, %d queries, %d qrels rows", session.name,
                          len(session.corpus), len(session.queries), len(session.qrels))
    return IngestedSession(name=session.name, digest=digest,
                           **{k: str(v) for k, v in paths.items()},
                           n_docs=len(session.corpus), n_queries=len(session.queries),
                           n_qrels=len(session.qrels))
