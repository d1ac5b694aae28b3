"""The store: published sessions under an fsspec URL, written scratch-then-publish.

Layout (everything relative to the store root):

    store.json                      store id and format version, written once
    sessions/<index>_<name>/        one folder per published session
        manifest.json               written last: a folder without it is not a session
        ...                         parquet / npy / faiss / JSON outputs of the session
    reindex/<index>_<name>/         `driftlane reindex` of that session: a full index;
        reindex.json                written last, with its files' sizes and digests
    .staging/                       uploads in progress (ignored by readers)
    cache/                          content-addressed caches (embeddings)
    results/                        Prefect's persisted task results

A session's files are uploaded to `.staging/` under a unique name, the staged folder is
renamed into `sessions/`, and the manifest is written (to a temporary name, then renamed)
last. On a POSIX or NFS filesystem each rename is atomic; on object stores a rename is a
copy, which is why the manifest, not the folder, marks a session complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from driftlane.infra.faults import crash_point
from driftlane.infra.integrity import DigestCache, stream_sha256
from driftlane.infra.io import naming_path, write_fs_atomically

STORE_FORMAT = 1
MANIFEST = "manifest.json"
# Beside a manifest, never in it: the published files `driftlane gc` removed on purpose.
GC_RECORD = "gc.json"
# `driftlane reindex` publishes reindex/<session folder>/ with this record written last
REINDEX_DIR = "reindex"
REINDEX_RECORD = "reindex.json"


class StoreError(RuntimeError):
    """The store refused an operation; the message says which session and why."""


class DamagedStore(StoreError):
    """A published file or manifest is unreadable or differs from what its manifest records."""


def normalize_url(url: str) -> str:
    """Expand `~` in a local path or a `file://` URL; leave other protocols as they are."""
    url = str(url)
    if url.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(url[len("file://") :]))
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/")


@dataclass(frozen=True)
class SessionManifest:
    """What a published session is: written last, read first."""

    name: str
    index: int
    digest: str
    model_version: str
    n_docs: int
    n_queries: int
    config_digest: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # n_clusters, memory_size, ...
    created_at: str = ""
    format: int = STORE_FORMAT

    @property
    def folder(self) -> str:
        return f"{self.index:05d}_{self.name}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SessionManifest:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


class Store:
    """A driftlane store at an fsspec URL (a local folder by default)."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """Full URL (with protocol) of a path inside the store, for fsspec.open."""
        return self.fs.unstrip_protocol(self.path(*parts))

    @property
    def results_url(self) -> str:
        return self.url_of("results")

    @property
    def cache_url(self) -> str:
        return self.url_of("cache")

    # -- identity ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path("store.json"))

    def ensure(self) -> str:
        """Create the store if it is new; return its id. Idempotent."""
        meta = self.path("store.json")
        if not self.fs.exists(meta):
            self.fs.makedirs(self.root, exist_ok=True)
            info = {"store_id": uuid.uuid4().hex, "format": STORE_FORMAT,
                    "created_at": _now()}
            self._write_atomic(meta, json.dumps(info, indent=2).encode())
        return self.store_id

    @property
    def store_id(self) -> str:
        try:
            with self.fs.open(self.path("store.json"), "rb") as f:
                return json.loads(f.read())["store_id"]
        except FileNotFoundError:
            raise StoreError(f"{self.url}: not a driftlane store (no store.json)") from None

    # -- reading -----------------------------------------------------------------------
    def sessions(self) -> list[SessionManifest]:
        """Published sessions in order. Folders without a manifest are ignored."""
        base = self.path("sessions")
        if not self.fs.exists(base):
            return []
        manifests = []
        for folder in sorted(self.fs.ls(base, detail=False)):
            mpath = posixpath.join(folder, MANIFEST)
            try:
                with self.fs.open(mpath, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                manifest = SessionManifest.from_json(data.decode())
            except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
                raise DamagedStore(f"{self.fs.unstrip_protocol(mpath)}: damaged manifest "
                                   f"({type(exc).__name__}: {exc})") from None
            if posixpath.basename(folder.rstrip("/")) != manifest.folder:
                continue
            manifests.append(manifest)
        return sorted(manifests, key=lambda m: m.index)

    def damaged_files(self, manifests: list[SessionManifest],
                      digests: DigestCache | None = None) -> list[str]:
        """One line per published file that is missing or whose size differs from its
        manifest's record (one listing per folder, no file read) or, given `digests`, whose
        sha256 differs (each file read once, then remembered locally: `infra.integrity`).
        Files `driftlane gc` removed on purpose (`gc.json`) are left out."""
        problems = []
        for m in manifests:
            folder = ("sessions", m.folder)
            found = self._listing(folder)
            removed = self.removed_files(m) if GC_RECORD in found else set()
            problems += self._damaged(folder, found, m.files, removed, digests, "manifest")
        # re-indexes (`driftlane reindex`) of published sessions, checked against their record
        names = {m.folder for m in manifests}
        for folder in self._reindexed_folders():
            if folder[-1] not in names:
                continue
            found = self._listing(folder)
            if REINDEX_RECORD not in found:
                continue  # an interrupted re-index: not published, replaced by the next one
            with self.fs.open(self.path(*folder, REINDEX_RECORD), "rb") as f:
                record = json.loads(f.read())
            problems += self._damaged(folder, found, record.get("files", {}), set(), digests,
                                      REINDEX_RECORD)
        return problems

    def _listing(self, folder: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """{relative path: fsspec info} of every file under the store folder `folder`."""
        root = self.path(*folder)
        try:
            return {posixpath.relpath(info["name"], root): info
                    for info in self.fs.find(root, detail=True).values()}
        except FileNotFoundError:
            return {}

    def _reindexed_folders(self) -> list[tuple[str, ...]]:
        root = self.path(REINDEX_DIR)
        if not self.fs.exists(root):
            return []
        return [(REINDEX_DIR, posixpath.basename(p.rstrip("/")))
                for p in self.fs.ls(root, detail=False)]

    def _damaged(self, folder: tuple[str, ...], found: dict[str, dict[str, Any]],
                 files: dict[str, dict[str, Any]], removed: set[str],
                 digests: DigestCache | None, what: str) -> list[str]:
        """Problems of the files `files` records in `folder`, `found` there (see above)."""
        problems = []
        for rel, record in sorted(files.items()):
            if rel in removed:
                continue
            url = self.url_of(*folder, rel)
            size = found[rel].get("size") if rel in found else None
            if rel not in found:
                problems.append(f"{url}: missing (the {what} lists it)")
            elif record.get("bytes") is not None and size != record["bytes"]:
                problems.append(f"{url}: {size} bytes, the {what} records "
                                f"{record['bytes']} (truncated or changed)")
            elif digests is not None and record.get("sha256") is not None:
                try:
                    changed = digests.sha256(self.fs, found[rel]) != record["sha256"]
                except FileNotFoundError:
                    problems.append(f"{url}: missing (the {what} lists it)")
                    continue
                if changed:
                    problems.append(f"{url}: sha256 differs from the {what}'s record "
                                    "(changed in place, same size)")
        return problems

    def _removals(self, manifest: SessionManifest) -> list[dict[str, Any]]:
        try:
            record = self.read_json(manifest, GC_RECORD)
        except FileNotFoundError:
            return []
        return list(record.get("removed", [])) if isinstance(record, dict) else []

    def removed_files(self, manifest: SessionManifest) -> set[str]:
        """The session's files that `driftlane gc` removed, from its `gc.json`."""
        return {rel for entry in self._removals(manifest) for rel in entry.get("files", [])}

    def record_removed(self, manifest: SessionManifest, files: list[str], why: str) -> None:
        """Add `files` to the session's `gc.json` (written atomically, before they go)."""
        removed = [*self._removals(manifest), {"at": _now(), "why": why, "files": files}]
        self._write_atomic(self.path("sessions", manifest.folder, GC_RECORD),
                           json.dumps({"removed": removed}, indent=2).encode())

    def check_published(self, digests: bool = True) -> list[SessionManifest]:
        """The published sessions, after checking every file's size and (`digests`) sha256
        against its manifest; a digest is read once per file and machine, then remembered.

        Raises DamagedStore naming the first damaged file (and how many there are), so a run
        refuses to build on a damaged earlier session before it starts working.
        """
        manifests = self.sessions()
        with DigestCache.local() if digests else contextlib.nullcontext() as cache:
            problems = self.damaged_files(manifests, cache)
        if problems:
            more = f" (and {len(problems) - 1} more; `driftlane verify` lists them)" \
                if len(problems) > 1 else ""
            raise DamagedStore(f"{problems[0]}{more}")
        return manifests

    def session_url(self, manifest: SessionManifest, filename: str = "") -> str:
        return self.url_of("sessions", manifest.folder, filename) if filename else \
            self.url_of("sessions", manifest.folder)

    def read_json(self, manifest: SessionManifest, filename: str) -> Any:
        path = self.path("sessions", manifest.folder, filename)
        with self.fs.open(path, "rb") as f:
            data = f.read()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DamagedStore(f"{self.fs.unstrip_protocol(path)}: damaged file "
                               f"({type(exc).__name__}: {exc})") from None

    def find_published(self, name: str, digest: str) -> SessionManifest | None:
        """The published session this input already is, or None if it is new.

        Raises StoreError when a different session was published under the same name:
        that is a mistake upstream, never a reason to overwrite.
        """
        sessions = self.sessions()
        for m in sessions:
            if m.digest == digest:
                return m
        for m in sessions:
            if m.name == name:
                raise StoreError(
                    f"{self.url}: already holds a session named {name!r} (index {m.index}) with "
                    f"different content (stored digest {m.digest[:12]}, new {digest[:12]}); "
                    "give the new session folder another name to add it"
                )
        return None

    # -- writing -----------------------------------------------------------------------
    def publish_session(self, local_dir: Path, manifest: SessionManifest) -> SessionManifest:
        """Move a finished session from local scratch into the store.

        Steps: upload every file into `.staging/<folder>.<uuid>/`, rename the staged folder to
        `sessions/<folder>/`, then write the manifest last. A crash at any step leaves no
        visible session, and publishing again completes it.
        """
        local_dir = Path(local_dir)
        held = len(self.sessions())
        if manifest.index != held:
            raise StoreError(
                f"{self.url}: cannot publish {manifest.name!r} as session #{manifest.index}: "
                f"the store now holds {held} sessions (another run published while this one "
                "was running); run it again to add it as the next session"
            )
        files = _local_files(local_dir, skip=MANIFEST)
        manifest = SessionManifest(**{**asdict(manifest), "files": files,
                                      "created_at": manifest.created_at or _now()})
        final = self.path("sessions", manifest.folder)
        self._remove_leftovers(manifest.folder, final)
        self._upload(local_dir, files, final, f"{manifest.folder}.{uuid.uuid4().hex[:12]}",
                     "sessions")
        crash_point("publish.manifest")
        self._write_atomic(posixpath.join(final, MANIFEST), manifest.to_json().encode())
        crash_point("publish.done")
        return manifest

    def publish_reindex(self, local_dir: Path, session: SessionManifest, folder: str,
                        record_name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Publish a re-index of `session` into `folder` (store-relative) the way sessions
        are published: upload to `.staging/`, rename, then write `record_name` last (the
        record gets the files' sizes and digests). A folder without its record is a leftover
        of an interrupted run and is replaced."""
        local_dir = Path(local_dir)
        files = _local_files(local_dir, skip=record_name)
        record = {**record, "session": session.name, "session_index": session.index,
                  "files": files, "created_at": _now()}
        final = self.path(*folder.split("/"))
        if self.fs.exists(posixpath.join(final, record_name)):
            raise StoreError(f"{self.url}: {folder} is already published")
        self._remove_leftovers(folder, final)
        self._upload(local_dir, files, final, f"{posixpath.basename(final)}.reindex."
                     f"{uuid.uuid4().hex[:12]}", posixpath.dirname(folder))
        crash_point("publish.manifest")
        self._write_atomic(posixpath.join(final, record_name),
                           json.dumps(record, indent=2, sort_keys=True).encode())
        return record

    def _upload(self, local_dir: Path, files: dict[str, Any], final: str, staged_name: str,
                parent: str) -> None:
        """Upload `files` of `local_dir` into `.staging/<staged_name>/`, then rename it to
        `final` (under the store folder `parent`). A failure removes the staged copy."""
        staged = self.path(".staging", staged_name)
        crash_point("publish.stage")
        try:
            for rel in files:
                target = posixpath.join(staged, rel)
                with naming_path(self.fs.unstrip_protocol(target)):
                    self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                    self.fs.put_file(str(local_dir / rel), target)
                crash_point("publish.stage.file")
            crash_point("publish.rename")
            self.fs.makedirs(self.path(*parent.split("/")), exist_ok=True)
            self.fs.mv(staged, final, recursive=True)
        except Exception:
            # a failed upload (a full disk, a lost connection) leaves nothing half-written
            with contextlib.suppress(OSError):
                if self.fs.exists(staged):
                    self.fs.rm(staged, recursive=True)
            raise

    def _remove_leftovers(self, folder: str, final: str) -> None:
        """Clear what an interrupted publish left behind."""
        if self.fs.exists(final):
            if self.fs.exists(posixpath.join(final, MANIFEST)):
                raise StoreError(f"{self.url}: session folder {folder} is already published")
            self.fs.rm(final, recursive=True)
        # Publishing runs while the run holds the store (one writer), so whatever is in
        # `.staging/` is left over from an interrupted upload: remove all of it.
        staging = self.path(".staging")
        if self.fs.exists(staging):
            for leftover in self.fs.ls(staging, detail=False):
                self.fs.rm(leftover, recursive=True)

    def _write_atomic(self, path: str, data: bytes) -> None:
        write_fs_atomically(self.fs, path, lambda handle: handle.write(data))


def _local_files(local_dir: Path, skip: str) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file under `local_dir` but `skip`."""
    files = {}
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(local_dir).as_posix()
            if rel != skip:
                files[rel] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    return files


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


