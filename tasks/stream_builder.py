"""Write a stream of numbered session folders from BEIR collections (`driftlane make-stream`).

:mod:`driftlane.tasks.stream_plan` decides which documents and queries go where; this module
validates and indexes the collections (streaming, any fsspec URL, ``.jsonl.gz`` included),
writes the session folders, checks each one with ``validate_session`` and writes stream.json.
The same arguments write byte-identical folders.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import pandas as pd

from driftlane.infra.store import normalize_url
from driftlane.tasks.ingest import QRELS_HEADER, SessionFormatError, validate_session
from driftlane.tasks.stream_plan import (
    MAX_JUDGED_SHARE,
    MIXING_SPREAD,
    DatasetIndex,
    SessionPart,
    StreamBuildError,
    StreamMode,
    StreamPlan,
    check_stream_arguments,
    plan_stream,
)

__all__ = [
    "DEFAULT_DATASETS", "build_stream", "default_datasets_dir", "read_dataset_index",
    "resolve_datasets",
]

DEFAULT_DATASETS = ("scifact", "cosqa", "npl_vaswani", "cisi", "msmarco_agentset5k")
STREAM_FORMAT = 1
STREAM_MANIFEST = "stream.json"
_SESSION_FOLDER = re.compile(r"[0-9]+_[A-Za-z0-9_.-]+")
_PARTIAL_FOLDER = re.compile(r"\.[0-9]+_[A-Za-z0-9_.-]+\.partial")


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
    check_stream_arguments(names, mode, docs_per_session, queries_per_session, n_sessions,
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
