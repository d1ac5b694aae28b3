"""The sha256 of published files, read once per file and remembered on this machine.

A published file's manifest records its size and sha256. Checking sizes costs one listing per
session folder; checking digests means reading every byte, which a run should not pay for the
same files again and again. `DigestCache` remembers each file's digest in a small SQLite
database beside the scratch folders (`<scratch base>/published-digests.sqlite`, see
`digest_cache_path`), keyed by the file's URL and valid while its size and modification stamp
(mtime, inode or ETag, whatever the filesystem reports) are unchanged. The database is local on
purpose: a store may be shared, and a reader must not trust a digest another machine wrote.

A damaged or unwritable database only makes the check slower: every file is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import IO, Any

from driftlane.infra.logs import module_logger

logger = module_logger(__name__)

DIGEST_CACHE_NAME = "published-digests.sqlite"
_BLOCK = 1 << 20


def stream_sha256(handle: IO[bytes]) -> str:
    """Hex sha256 of everything left in a binary file object, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: handle.read(_BLOCK), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(fs: Any, path: str) -> str:
    """Hex sha256 of the file at `path` on the fsspec filesystem `fs` (reads it whole)."""
    with fs.open(path, "rb") as handle:
        return stream_sha256(handle)


def digest_cache_path() -> Path:
    """`$DRIFTLANE_SCRATCH` (else ~/.cache/driftlane/scratch) / published-digests.sqlite."""
    base = (os.environ.get("DRIFTLANE_SCRATCH")
            or Path.home() / ".cache" / "driftlane" / "scratch")
    return Path(base).expanduser() / DIGEST_CACHE_NAME


def _stamp(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: mtime and inode locally, ETag on object stores."""
    parts = [info.get(key) for key in ("mtime", "ino", "ETag", "etag", "LastModified",
                                       "last_modified", "created")]
    return "|".join("" if part is None else str(part) for part in parts)


class DigestCache:
    """Digests of files by (URL, size, stamp), in the SQLite file at `path`.

    `path=None` keeps nothing (every digest is read). `reuse=False` reads every file again but
    still records what it read (`driftlane verify`). Use it as a context manager, or `close()`.
    """

    def __init__(self, path: Path | None, reuse: bool = True) -> None:
        self.path = path
        self.reuse = reuse
        self.reads = 0  # files actually read: the cost of the check
        self._db: sqlite3.Connection | None = None

    @classmethod
    def local(cls, reuse: bool = True) -> DigestCache:
        """The cache in this machine's scratch base (`digest_cache_path`)."""
        return cls(digest_cache_path(), reuse)

    def __enter__(self) -> DigestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                db.execute("CREATE TABLE IF NOT EXISTS digests (url TEXT PRIMARY KEY, "
                           "size INTEGER, stamp TEXT, sha256 TEXT, checked_at REAL)")
                self._db = db
            except (sqlite3.Error, OSError) as exc:
                logger.warning("digest cache %s unusable (%s): every published file is read "
                               "again", self.path, exc)
                self.path = None
        return self._db

    def _lookup(self, url: str, size: Any, stamp: str) -> str | None:
        db = self._connection()
        if db is None or not self.reuse:
            return None
        try:
            row = db.execute("SELECT size, stamp, sha256 FROM digests WHERE url = ?",
                             (url,)).fetchone()
        except sqlite3.Error:
            return None
        return row[2] if row is not None and row[0] == size and row[1] == stamp else None

    def _remember(self, url: str, size: Any, stamp: str, sha256: str) -> None:
        db = self._connection()
        if db is None:
            return
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                           (url, size, stamp, sha256, time.time()))
        except sqlite3.Error as exc:
            logger.warning("digest cache %s not updated (%s)", self.path, exc)

    def sha256(self, fs: Any, info: dict[str, Any]) -> str:
        """The sha256 of the file `info` describes (an fsspec `info()` / `find(detail=True)`
        entry): remembered when its size and stamp are unchanged, read otherwise."""
        path = info["name"]
        url = fs.unstrip_protocol(path)
        size, stamp = info.get("size"), _stamp(info)
        known = self._lookup(url, size, stamp)
        if known is not None:
            return known
        digest = file_sha256(fs, path)
        self.reads += 1
        self._remember(url, size, stamp, digest)
        return digest
