"""Where a session folder's files are, and how their bytes are read and hashed.

A session is ``corpus.jsonl`` (required), optional ``queries.jsonl`` and optional
``qrels/test.tsv`` / ``qrels/train.tsv``; each file may instead be gzipped (``.gz``).
This module finds them and checks the folder's structure (no file both plain and gzipped, no
symlink leading out of the folder), opens them with gzip handled, streams their lines while
hashing every raw byte, and computes the content digest without parsing. What the lines must
contain is checked in :mod:`driftlane.tasks.ingest`. No Prefect; file access only via fsspec.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from fsspec.compression import compr
from fsspec.implementations.local import LocalFileSystem

from driftlane.infra.store import normalize_url

__all__ = [
    "SessionFile", "SessionFormatError", "SessionLayout", "locate_session", "numbered_lines",
    "session_digest",
]

# Canonical order of the logical files: it fixes the digest and the order of validation
# (qrels are checked against the corpus and queries read before them).
CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_SPLITS = ("test", "train")

_CHUNK_BYTES = 1 << 20


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
class SessionFile:
    logical: str  # name without .gz, e.g. "qrels/test.tsv"; enters the digest
    url: str  # for messages
    path: str  # for the filesystem
    gzipped: bool


@dataclass(frozen=True)
class SessionLayout:
    name: str
    url: str
    fs: fsspec.AbstractFileSystem
    corpus: SessionFile
    queries: SessionFile | None
    qrels: dict[str, SessionFile]  # split -> file, canonical order

    def files(self) -> list[SessionFile]:
        """Present files in canonical (digest) order."""
        present = [self.corpus, self.queries, *self.qrels.values()]
        return [f for f in present if f is not None]


def session_digest(url: str | os.PathLike[str]) -> str:
    """The digest ``read_session(url)`` would report, from raw bytes only (no parsing).

    sha256 over, per present file in canonical order: logical name + NUL + decompressed
    bytes + NUL. Layout problems (missing corpus, escaping symlink...) still raise.
    """
    layout = locate_session(url)
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


def locate_session(url: str | os.PathLike[str]) -> SessionLayout:
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

    def find(logical: str) -> SessionFile | None:
        found = [
            SessionFile(
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
    return SessionLayout(name, url, fs, corpus, queries, qrels)


# --- streaming ------------------------------------------------------------------------------


@contextmanager
def _open(fs: fsspec.AbstractFileSystem, session_file: SessionFile) -> Iterator[BinaryIO]:
    """Open for binary reading, decompressing .gz files on the fly."""
    # Not fs.open(..., compression="gzip"): closing that GzipFile leaves the raw file open.
    with fs.open(session_file.path, "rb") as raw:
        if not session_file.gzipped:
            yield raw
            return
        with compr["gzip"](raw, mode="rb") as stream:
            yield stream


@contextmanager
def _gzip_errors(session_file: SessionFile) -> Iterator[None]:
    """Turn a corrupt or truncated gzip stream into a SessionFormatError."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise SessionFormatError(session_file.url, None, f"corrupt gzip data ({exc})") from exc


def numbered_lines(
    fs: fsspec.AbstractFileSystem, session_file: SessionFile, hasher
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
