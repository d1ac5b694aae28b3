"""One writer per store for a whole run: a Prefect global concurrency limit and the store lock.

`store_writer(store_url, label, settings)` is held by every flow that writes a store, from
planning to publishing:

1. where a Prefect server is configured (PREFECT_API_URL), a strict global concurrency limit
   of one slot named after the store (`driftlane-store-<digest of the URL>`), created if
   missing. Runs waiting for it are visible in the UI's concurrency page; a killed holder's
   slot comes back when its lease (at least 60 s, Prefect's minimum) lapses.
2. the store lock (`infra.lock.StoreLock`, NFS-safe lease with a heartbeat), which holds
   whether or not a server exists.

Both wait at most `settings.wait_seconds`, then raise `StoreLocked` naming the holder. Within
one run the guard is re-entrant per store, so a stage that must be sure it holds the
store (publishing) calls `held_store_lock(url)` and checks the lease instead of locking twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from fsspec.core import url_to_fs

from driftlane.infra.config import LockConfig
from driftlane.infra.lock import StoreLock, StoreLocked

LIMIT_PREFIX = "driftlane-store-"
# Prefect refuses concurrency leases shorter than a minute.
MIN_LIMIT_LEASE_S = 60.0

# Store URL -> the lock this run holds. A context variable, not a process-wide dict: tasks of
# the run see it (Prefect copies the context into them), another run in a thread does not.
_held: ContextVar[tuple[tuple[str, StoreLock], ...]] = ContextVar("driftlane_held_stores",
                                                                 default=())


def limit_name(store_url: str) -> str:
    """The global concurrency limit guarding one store."""
    return LIMIT_PREFIX + hashlib.sha256(store_url.encode()).hexdigest()[:16]


def server_configured() -> bool:
    """Whether runs report to a Prefect server (not a temporary one started per process)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def lease_seconds(settings: LockConfig) -> float:
    """The store lock's lease; `DRIFTLANE_LOCK_LEASE_S` overrides the config (tests, ops)."""
    return float(os.environ.get("DRIFTLANE_LOCK_LEASE_S", settings.lease_seconds))


def held_store_lock(store_url: str) -> StoreLock | None:
    """The store lock this run holds on `store_url`, if any."""
    return dict(_held.get()).get(store_url)


def _enter_global_limit(stack: contextlib.ExitStack, store_url: str,
                        settings: LockConfig) -> None:
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = limit_name(store_url)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    started = time.monotonic()
    try:
        stack.enter_context(concurrency(
            name, occupy=1, strict=True, timeout_seconds=max(settings.wait_seconds, 0.1),
            lease_duration=max(MIN_LIMIT_LEASE_S, lease_seconds(settings))))
    except TimeoutError as exc:
        raise StoreLocked(
            store_url, None, time.monotonic() - started,
            holder=f"it holds the Prefect global concurrency limit {name!r} (one run per "
            "store; the UI's Concurrency page shows it)") from exc


def _remove_if_empty(fs: Any, root: str) -> None:
    with contextlib.suppress(OSError, NotImplementedError):
        if not fs.ls(root, detail=False):
            fs.rmdir(root)


@contextlib.contextmanager
def store_writer(store_url: str, label: str,
                 settings: LockConfig = LockConfig()) -> Iterator[StoreLock]:  # noqa: B008
    """Hold the store for one writing run (re-entrant within a run); see module doc."""
    held = held_store_lock(store_url)
    if held is not None:
        yield held
        return
    fs, root = url_to_fs(store_url)
    new_store = not fs.exists(root)
    with contextlib.ExitStack() as stack:
        if new_store:  # a run that published nothing leaves no empty store behind
            stack.callback(_remove_if_empty, fs, root)
        if settings.global_limit and server_configured():
            _enter_global_limit(stack, store_url, settings)
        lock = StoreLock(store_url, owner_label=label, lease_seconds=lease_seconds(settings),
                         wait_seconds=settings.wait_seconds, keep_alive=True)
        stack.enter_context(lock)
        token = _held.set((*_held.get(), (store_url, lock)))
        try:
            yield lock
        finally:
            _held.reset(token)
