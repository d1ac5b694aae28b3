"""Cache keys, persisted results and scratch folders for the session flow's tasks.

Tasks take and return URIs, ids and version strings. A task's cache key is a digest of its
parameters (which carry content digests) plus an explicit code version of the stage, so a
change in a helper module is picked up by bumping that version, which Prefect's
TASK_SOURCE policy would miss. A task's outputs go to a scratch folder named after the
same digest, so a cached result always points at the files it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from fsspec.implementations.local import LocalFileSystem
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem, WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field

from driftlane.infra.io import write_atomically
from driftlane.infra.store import Store


class StageResult(BaseModel):
    """Base of a cached stage's result: frozen, persisted as JSON by Prefect.

    `seconds` (and any other field in `timing_fields`) records what the stage cost when it
    ran; it is reported, but it never enters the cache key of a stage that takes this result
    as a parameter, so keys depend on content digests and versions only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    timing_fields: ClassVar[frozenset[str]] = frozenset({"seconds", "attempt"})

    seconds: float = 0.0
    # "<flow run id>#<attempt>" that computed it: a retry's report counts only its own work
    attempt: str = Field(default_factory=lambda: current_attempt())

    def cache_identity(self) -> dict[str, Any]:
        """The fields that say what the result is, without what it cost."""
        return self.model_dump(mode="json", exclude=set(self.timing_fields))


def current_attempt() -> str:
    """'<flow run id>#<run count>' of the running flow, '' outside a flow run."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return f"{run_id}#{flow_run.run_count}" if run_id else ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, StageResult):
        return _jsonable(value.cache_identity())
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_digest(stage: str, version: str, parameters: dict[str, Any]) -> str:
    """Digest of a stage's code version and its (JSON-able) parameters."""
    payload = json.dumps(
        {"stage": stage, "version": version, "parameters": _jsonable(parameters)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_key_for(stage: str, version: str) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` built from the stage's version and its parameters."""

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{stage_digest(stage, version, parameters)}"

    return cache_key


def stage_output_dir(stage: str, version: str, scratch_dir: str) -> Path:
    """Where the running task writes its outputs: named after the digest of its cache key.

    Reads the task's parameters from the Prefect run context, exactly the dict the cache key
    was computed from, so the two cannot drift apart.
    """
    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError("stage_output_dir() must be called inside a running Prefect task")
    out = Path(scratch_dir) / stage / stage_digest(stage, version, context.parameters)
    out.mkdir(parents=True, exist_ok=True)
    return out


def scratch_for(store: Store, scratch_base: str | None) -> str:
    """The local scratch folder of one store.

    Named after the store URL, so two stores never share scratch. A `generation` file gives
    the folder an identity: when scratch is wiped, a new generation changes every cache key
    (scratch folders are part of task parameters), so no cached result can point at files
    that are gone.
    """
    base = Path(scratch_base or os.environ.get("DRIFTLANE_SCRATCH")
                or Path.home() / ".cache" / "driftlane" / "scratch").expanduser()
    folder = base / hashlib.sha256(store.url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "generation"
    if not marker.exists():
        generation = uuid.uuid4().hex[:12]
        write_atomically(marker, lambda tmp: tmp.write_text(generation))
    return str(folder / marker.read_text().strip())


def result_storage_for(store: Store) -> Path | WritableFileSystem:
    """Prefect result storage inside the store, so results live where the store does.

    A local store gets a plain path. Any other fsspec store gets a RemoteFileSystem block,
    saved on the Prefect server under a name derived from the store URL (Prefect only accepts
    saved blocks as task result storage).
    """
    if isinstance(store.fs, LocalFileSystem):
        return Path(store.path("results"))
    block = RemoteFileSystem(basepath=store.results_url)
    name = "driftlane-results-" + hashlib.sha256(store.url.encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block
