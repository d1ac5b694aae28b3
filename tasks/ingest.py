"""Ingest and validate one session folder (BEIR layout), hashing its content while reading.

A session is ``corpus.jsonl`` (required), optional ``queries.jsonl`` and optional
``qrels/test.tsv`` / ``qrels/train.tsv``; each file may instead be gzipped (``.gz``).
Bad input is rejected with a :class:`SessionFormatError` naming file, line and problem,
so that it never reaches the store. Pure functions: no Prefect, file access only via fsspec.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pandas as pd
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger, task

from infra.caching import cache_key_for, stage_output_dir
from infra.store import normalize_url

__all__ = [
    "SessionData", "SessionFormatError", "ingest_session", "read_session", "session_digest",
    "validate_session",
]

# Canonical order of the logical files: it fixes the digest and the order of validation
# (qrels are checked against the corpus and queries read before them).
CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_SPLITS = ("test", "train")
QRELS_HEADER = "query-id\tcorpus-id\tscore"
_HEADER_WORDS = "'query-id<TAB>corpus-id<TAB>score'"

_CHUNK_BYTES = 1 << 20
_INTEGER = re.compile(r"-?[0-9]+")


class SessionFormatError(ValueError):
    """Bad session input: ``file`` (URL of the offending file or folder), ``line`` (1-based or
    None) and ``problem`` (plain words)."""

    def __init__(self, file: str, line: int | None, problem: str) -> None:
        self.file = file
        self.line = line
        self.problem = problem
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the three attributes when pickled across processes
        return (type(self), (self.file, self.line, self.problem))


@dataclass(frozen=True)
class SessionData:
    """A validated session: frames in file order plus the content digest."""

    name: str
    url: str
    digest: str
    corpus: pd.DataFrame  # doc_id, title, text
    queries: pd.DataFrame  # query_id, text
    qrels: pd.DataFrame  # query_id, doc_id, score (int64), split ("test" then "train")


@dataclass(frozen=True)
class _SessionFile:
    logical: str  # name without .gz, e.g. "qrels/test.tsv"; enters the digest
    url: str  # for messages
    path: str  # for the filesystem
    gzipped: bool


@dataclass(frozen=True)
class _SessionLayout:
    name: str
    url: str
    fs: fsspec.AbstractFileSystem
    corpus: _SessionFile
    queries: _SessionFile | None
    qrels: dict[str, _SessionFile]  # split -> file, canonical order

    def files(self) -> list[_SessionFile]:
        """Present files in canonical (digest) order."""
        present = [self.corpus, self.queries, *self.qrels.values()]
        return [f for f in present if f is not None]


def read_session(url: str | os.PathLike[str]) -> SessionData:
    """Read and validate the session folder at ``url`` (any fsspec URL; ``~`` expanded).

    One streaming pass per file: lines are decoded, validated and hashed as they are read.
    Raises SessionFormatError on the first problem found.
    """
    session = _read(url, keep_content=True)
    assert session is not None
    return session


def validate_session(url: str | os.PathLike[str]) -> str:
    """Check everything ``read_session`` checks and return the digest, keeping no texts.

    Memory holds only the ids (needed to check qrels), so a run can refuse bad input before
    it persists anything, without holding the corpus in memory.
    """
    return _read(url, keep_content=False)


def _read(url: str | os.PathLike[str], keep_content: bool):
    layout = _locate_session(url)
    hasher = hashlib.sha256()

    corpus, doc_lines = _read_corpus(layout, hasher, keep_content)
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


def session_digest(url: str | os.PathLike[str]) -> str:
    """The digest ``read_session(url)`` would report, from raw bytes only (no parsing).

    sha256 over, per present file in canonical order: logical name + NUL + decompressed
    bytes + NUL. Layout problems (missing corpus, escaping symlink...) still raise.
    """
    layout = _locate_session(url)
    hasher = hashlib.sha256()
    for session_file in layout.files():
        hasher.update(session_file.logical.encode() + b"\0")
        with _open(layout.fs, session_file) as stream, _gzip_errors(session_file):
            while chunk := stream.read(_CHUNK_BYTES):
                hasher.update(chunk)
        hasher.update(b"\0")
    return hasher.hexdigest()


# --- layout ---------------------------------------------------------------------------------


def _normalize_url(url: str | os.PathLike[str]) -> tuple[str, fsspec.AbstractFileSystem, str]:
    """Return (normalized URL, filesystem, path).

    Local paths are made absolute with `~` expanded and `..` resolved (they name one folder);
    a remote URL with `..` components is refused, since the store would not resolve it the
    same way everywhere.
    """
    normalized = normalize_url(os.fspath(url))
    protocol, rest = fsspec.core.split_protocol(normalized)
    if protocol not in (None, "file", "local") and ".." in re.split(r"[/\\]", rest):
        raise SessionFormatError(normalized, None,
                                 "session path must not contain '..' components")
    fs, path = fsspec.core.url_to_fs(normalized)
    return normalized, fs, path.rstrip("/") or "/"


def _locate_session(url: str | os.PathLike[str]) -> _SessionLayout:
    """Find the session's files and check the folder's structure (no file is read)."""
    url, fs, root = _normalize_url(url)
    if not fs.exists(root):
        raise SessionFormatError(url, None, "session folder does not exist")
    if not fs.isdir(root):
        raise SessionFormatError(url, None, "session path is not a folder")

    def join(base: str, rel: str) -> str:
        return base.rstrip("/") + "/" + rel

    if isinstance(fs, LocalFileSystem):
        # A symlink pointing outside would let a session smuggle in (or later publish) files
        # from elsewhere; check every candidate before reading anything.
        real_root = os.path.realpath(root)
        candidates = [QRELS_DIR] + [
            name + suffix
            for name in (CORPUS, QUERIES, *(f"{QRELS_DIR}/{s}.tsv" for s in QRELS_SPLITS))
            for suffix in ("", ".gz")
        ]
        for rel in candidates:
            path = join(root, rel)
            if not os.path.lexists(path):
                continue
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root:
                raise SessionFormatError(
                    join(url, rel), None, "resolves outside the session folder"
                )

    def find(logical: str) -> _SessionFile | None:
        found = [
            _SessionFile(
                logical, join(url, logical + suffix), join(root, logical + suffix), bool(suffix)
            )
            for suffix in ("", ".gz")
            if fs.exists(join(root, logical + suffix))
        ]
        if len(found) == 2:
            raise SessionFormatError(
                url, None, f"both {logical} and {logical}.gz are present; keep only one"
            )
        if found and not fs.isfile(found[0].path):
            raise SessionFormatError(found[0].url, None, "is not a file")
        return found[0] if found else None

    corpus = find(CORPUS)
    if corpus is None:
        raise SessionFormatError(url, None, f"no {CORPUS} or {CORPUS}.gz in the session folder")
    queries = find(QUERIES)
    qrels_root = join(root, QRELS_DIR)
    if fs.exists(qrels_root) and not fs.isdir(qrels_root):
        raise SessionFormatError(join(url, QRELS_DIR), None, "is not a folder")
    qrels = {}
    for split in QRELS_SPLITS:
        qrels_file = find(f"{QRELS_DIR}/{split}.tsv")
        if qrels_file is not None:
            qrels[split] = qrels_file
    name = root.rstrip("/").rsplit("/", 1)[-1]
    return _SessionLayout(name, url, fs, corpus, queries, qrels)


# --- streaming ------------------------------------------------------------------------------


@contextmanager
def _open(fs: fsspec.AbstractFileSystem, session_file: _SessionFile) -> Iterator[BinaryIO]:
    """Open for binary reading, decompressing .gz files on the fly."""
    # Not fs.open(..., compression="gzip"): closing that GzipFile leaves the raw file open.
    with fs.open(session_file.path, "rb") as raw:
        if not session_file.gzipped:
            yield raw
            return
        with compr["gzip"](raw, mode="rb") as stream:
            yield stream


@contextmanager
def _gzip_errors(session_file: _SessionFile) -> Iterator[None]:
    """Turn a corrupt or truncated gzip stream into a SessionFormatError."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise SessionFormatError(session_file.url, None, f"corrupt gzip data ({exc})") from exc


def _numbered_lines(
    fs: fsspec.AbstractFileSystem, session_file: _SessionFile, hasher
) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) for non-blank lines; hash every raw byte.

    Must be consumed to the end for the digest to be complete.
    """
    hasher.update(session_file.logical.encode() + b"\0")
    with _open(fs, session_file) as stream, _gzip_errors(session_file):
        for line_number, raw in enumerate(stream, start=1):
            hasher.update(raw)
            if not raw.strip():
                continue  # blank lines are allowed but still count for line numbers
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start]
                raise SessionFormatError(
                    session_file.url,
                    line_number,
                    f"not valid UTF-8 (byte 0x{bad:02x} at byte {exc.start + 1} of the line)",
                ) from None
            yield line_number, text
    hasher.update(b"\0")


def _json_records(
    fs: fsspec.AbstractFileSystem, session_file: _SessionFile, hasher, id_kind: str
) -> Iterator[tuple[int, str, dict]]:
    """Yield (line, id, object) for each JSON line, checking the shared '_id' rules."""
    url = session_file.url
    for line, text in _numbered_lines(fs, session_file, hasher):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SessionFormatError(url, line, f"invalid JSON ({exc.msg})") from None
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
        yield line, record_id, record


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


def _read_corpus(layout: _SessionLayout, hasher,
                 keep_content: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
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


def _read_queries(layout: _SessionLayout, hasher,
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
    session_file: _SessionFile,
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
    for line, text in _numbered_lines(fs, session_file, hasher):
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

INGEST_VERSION = "1"


@task(cache_key_fn=cache_key_for("ingest", INGEST_VERSION), persist_result=True,
      result_serializer="json", task_run_name="ingest {session_url}")
def ingest_session(session_url: str, digest: str, scratch_dir: str) -> dict:
    """Validate the session folder and write it as parquet tables to scratch."""
    session = read_session(session_url)
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
    return {**{k: str(v) for k, v in paths.items()}, "name": session.name, "digest": digest,
            "n_docs": len(session.corpus), "n_queries": len(session.queries),
            "n_qrels": len(session.qrels)}
