"""Scheduled ingestion: run every new complete session folder of a landing folder, in order.

A landing folder (any fsspec URL) receives session folders from upstream. A folder is complete
once it holds the marker file (`_READY` by default), which the producer writes after
everything else; a half-copied folder has no marker and is never picked up. Each run lists the
complete folders, sorts them by name, skips the ones the store already holds (by name, a cheap
look at the manifests), and runs the rest in order, each as a `session_flow` subflow.

Exactly once: the ingestion deployment has a concurrency limit of 1, so two ingestion runs
never overlap, and `session_flow` itself is a no-op for a session already published with the
same content (by digest), so a folder published between the listing and its run is harmless.
A session that fails stops the run: the folders after it wait, because session order is
part of the result (each session is evaluated against everything before it). The next
scheduled run tries the failed folder again.
"""

from __future__ import annotations

import posixpath

from fsspec.core import url_to_fs
from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from driftlane.infra.config import SessionConfig
from driftlane.infra.store import Store, normalize_url

DEFAULT_MARKER = "_READY"


def ready_session_folders(landing_url: str, marker: str = DEFAULT_MARKER
                          ) -> tuple[list[str], list[str]]:
    """(complete, incomplete) subfolder names of a landing folder, each sorted by name.

    A subfolder is complete when it holds `marker`. A landing folder that does not exist
    (yet) is empty: on object stores an empty prefix and a missing one look the same.
    """
    fs, root = url_to_fs(normalize_url(landing_url))
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return [], []
    complete, incomplete = [], []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        path = entry["name"].rstrip("/")
        name = posixpath.basename(path)
        (complete if fs.exists(posixpath.join(path, marker)) else incomplete).append(name)
    return sorted(complete), sorted(incomplete)


def landing_run_name() -> str:
    """'<landing> -> <store>' for the UI's run list."""
    params = flow_run.parameters
    return (f"landing {normalize_url(params['landing_url'])} -> "
            f"{normalize_url(params['store_url'])}")


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="list {landing_url}")
def list_landing(landing_url: str, store_url: str, marker: str) -> dict:
    """Complete folders not yet in the store, those already in it, incomplete ones (by name)."""
    complete, incomplete = ready_session_folders(landing_url, marker)
    store = Store(store_url)
    published = {m.name for m in store.sessions()} if store.exists() else set()
    return {"new": [n for n in complete if n not in published],
            "published": [n for n in complete if n in published],
            "incomplete": incomplete}


@flow(name="driftlane-ingestion", flow_run_name=landing_run_name, log_prints=False)
def landing_flow(landing_url: str, store_url: str,
                 config: SessionConfig = SessionConfig(),  # noqa: B008
                 marker: str = DEFAULT_MARKER) -> dict:
    """Run every new complete session folder of the landing folder, in name order, once."""
    logger = get_run_logger()
    landing_url, store_url = normalize_url(landing_url), normalize_url(store_url)
    found = list_landing(landing_url, store_url, marker)
    logger.info("landing %s: %d complete session folder(s), %d new %s, %d already in %s %s",
                landing_url, len(found["new"]) + len(found["published"]), len(found["new"]),
                found["new"], len(found["published"]), store_url, found["published"])
    if found["incomplete"]:
        logger.info("not picked up yet (no %s marker): %s", marker, found["incomplete"])

    if not found["new"]:
        return {**found, "ran": []}
    # Imported only now: most scheduled runs find nothing new, and the session flow's
    # imports (torch, sentence-transformers) cost several seconds of CPU.
    from driftlane.flows.session import session_flow

    results = []
    for name in found["new"]:
        session_url = f"{landing_url.rstrip('/')}/{name}"
        with tags(f"store:{store_url}", f"landing:{landing_url}", f"session:{name}"):
            summary = session_flow(session_url, store_url, config)
        logger.info("%s: %s as session #%d", name, summary["status"], summary["index"])
        results.append(summary)
    return {**found, "ran": results}
