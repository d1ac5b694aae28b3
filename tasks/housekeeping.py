"""What no published session needs any more, and removing it (`driftlane gc`).

A store only grows: embedding-cache blocks of every model version that ever embedded,
Prefect's persisted task results of every run, `.staging/` folders of interrupted uploads and a
fine-tuned model per session. `plan_gc` lists what can go, by category:

- `cache`: the embedding-cache folder (`cache/<model version>/`, `infra.embedding_cache`) of
  every version that is no published session's `model_version` (later runs embed with the
  latest session's model, so only published versions are ever read again), and blocks written
  by an older embedding algorithm (`-e<N>` below `EMBEDDING_ALGORITHM_VERSION`, never read);
- `results`: Prefect results (`results/`) last modified before the last published session was
  created: they belong to runs that published (or were superseded); a failed run since then
  keeps its results, so its retry still resumes;
- `staging`: `.staging/` folders untouched for longer than the store lock's lease (gc holds the
  lock, so no live writer can own them);
- `models` (only with `keep_models`): the `model/` folders of sessions beyond the newest
  `keep_models` that hold one, never the model a later session still uses (a session that
  did not train keeps the model of the last session that did: `publishing.previous_model`)
  nor the one the next run starts from. The session's `gc.json` records the removal, so
  `verify` and the pre-run check do not report the files as missing.

A cache folder modified after the last publication is kept even when unreferenced: it belongs
to a run that has not published yet. Times compare file mtimes with the manifest's `created_at`
and this machine's clock, so clocks are assumed to agree within seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from driftlane.infra.embedding_cache import EMBEDDING_ALGORITHM_VERSION
from driftlane.infra.store import SessionManifest, Store
from driftlane.tasks.publishing import MODEL_WEIGHTS, previous_model

CATEGORIES = {"cache": "embedding cache", "results": "Prefect results",
              "staging": "orphaned .staging", "models": "session models"}
_BLOCK_ALGORITHM = re.compile(r"-e(\d+)$")


@dataclass(frozen=True)
class Removal:
    """One thing gc removes: a folder or file of the store, what it frees and why."""

    category: str  # a key of CATEGORIES
    path: str  # inside the store's filesystem
    bytes: int
    why: str
    session: SessionManifest | None = None  # models: the session whose gc.json records it
    files: tuple[str, ...] = field(default=())  # models: the manifest's paths removed


def modified_at(info: dict[str, Any]) -> float | None:
    """An fsspec entry's modification time in epoch seconds (None when not reported)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                continue
    return None


def published_at(manifests: list[SessionManifest]) -> float | None:
    """When the last session was published (its manifest's `created_at`), None if none."""
    if not manifests or not manifests[-1].created_at:
        return None
    return datetime.fromisoformat(manifests[-1].created_at).timestamp()


def models_in_use(store: Store, manifests: list[SessionManifest]) -> set[str]:
    """Sessions whose `model/` folder a later session ended with, or the next run starts from.

    Session j ended with the model `previous_model(manifests[:j + 1])` names: its own when it
    trained, else the last one with its model version.
    """
    owners = [previous_model(store, manifests[: j + 1]) for j in range(len(manifests))]
    used = {owner.session for owner, m in zip(owners, manifests, strict=True)
            if owner is not None and owner.session != m.name}
    if owners and owners[-1] is not None:
        used.add(owners[-1].session)
    return used


def removable_models(store: Store, manifests: list[SessionManifest],
                     keep_models: int) -> list[SessionManifest]:
    """Sessions whose `model/` folder goes: beyond the newest `keep_models` that still hold
    one, and used by no later session (`models_in_use`)."""
    holding = [m for m in manifests
               if MODEL_WEIGHTS in m.files and MODEL_WEIGHTS not in store.removed_files(m)]
    kept = {m.name for m in holding[len(holding) - keep_models:]} if keep_models else set()
    kept |= models_in_use(store, manifests)
    return [m for m in holding if m.name not in kept]


def _tree(store: Store, path: str) -> tuple[int, float | None]:
    """Bytes under `path` and the newest modification time found there (or of `path`)."""
    infos = list(store.fs.find(path, detail=True, withdirs=True).values())
    infos = infos or [store.fs.info(path)]
    times = [t for t in map(modified_at, infos) if t is not None]
    size = sum(int(i.get("size") or 0) for i in infos if i.get("type") != "directory")
    return size, max(times) if times else None


def _children(store: Store, *parts: str) -> list[str]:
    path = store.path(*parts)
    return sorted(store.fs.ls(path, detail=False)) if store.fs.exists(path) else []


def _stale_cache(store: Store, manifests: list[SessionManifest],
                 before: float | None) -> list[Removal]:
    referenced = {m.model_version for m in manifests}
    removals = []
    for folder in _children(store, "cache"):
        version = folder.rstrip("/").rsplit("/", 1)[-1]
        if version not in referenced:
            size, newest = _tree(store, folder)
            if before is not None and newest is not None and newest < before:
                removals.append(Removal("cache", folder, size, f"model version {version} is "
                                        "no published session's"))
            continue
        for block in _children(store, "cache", version):
            found = _BLOCK_ALGORITHM.search(block)
            if found and int(found.group(1)) < EMBEDDING_ALGORITHM_VERSION:
                removals.append(Removal("cache", block, _tree(store, block)[0],
                                        f"written by embedding algorithm {found.group(1)}, "
                                        f"now {EMBEDDING_ALGORITHM_VERSION}"))
    return removals


def _stale_results(store: Store, before: float | None) -> list[Removal]:
    path = store.path("results")
    if before is None or not store.fs.exists(path):
        return []
    return [Removal("results", name, int(info.get("size") or 0),
                    "older than the last published session")
            for name, info in sorted(store.fs.find(path, detail=True).items())
            if (t := modified_at(info)) is not None and t < before]


def _orphaned_staging(store: Store, now: float, lease_seconds: float) -> list[Removal]:
    removals = []
    for folder in _children(store, ".staging"):
        size, newest = _tree(store, folder)
        if newest is not None and newest < now - lease_seconds:
            removals.append(Removal("staging", folder, size, f"untouched for "
                                    f"{now - newest:.0f} s (lease {lease_seconds:.0f} s)"))
    return removals


def _old_models(store: Store, manifests: list[SessionManifest],
                keep_models: int) -> list[Removal]:
    removals = []
    for m in removable_models(store, manifests, keep_models):
        folder = store.path("sessions", m.folder, "model")
        files = tuple(sorted(rel for rel in m.files if rel.startswith("model/")))
        size = _tree(store, folder)[0] if store.fs.exists(folder) else 0
        removals.append(Removal("models", folder, size, f"model {m.model_version} of session "
                                f"#{m.index}, beyond the newest {keep_models} and unused",
                                session=m, files=files))
    return removals


def plan_gc(store: Store, manifests: list[SessionManifest], *, now: float,
            lease_seconds: float, keep_models: int | None = None) -> list[Removal]:
    """Everything gc would remove from `store` (see the module doc), reading listings only."""
    before = published_at(manifests)
    removals = _stale_cache(store, manifests, before) + _stale_results(store, before)
    removals += _orphaned_staging(store, now, lease_seconds)
    if keep_models is not None:
        removals += _old_models(store, manifests, keep_models)
    return removals


def freed_bytes(removals: list[Removal]) -> dict[str, int]:
    """Bytes per category (every category of CATEGORIES, 0 when nothing goes)."""
    freed = dict.fromkeys(CATEGORIES, 0)
    for removal in removals:
        freed[removal.category] += removal.bytes
    return freed


def remove(store: Store, removals: list[Removal], still_held: Callable[[], None]) -> None:
    """Remove what `plan_gc` listed; `still_held()` raises when the store lock was lost, and
    is asked before every removal. A model's removal is recorded in `gc.json` first."""
    for removal in removals:
        still_held()
        if removal.session is not None:
            store.record_removed(removal.session, list(removal.files),
                                 f"driftlane gc: {removal.why}")
        if store.fs.exists(removal.path):
            store.fs.rm(removal.path, recursive=True)
