"""Checks a run makes before any Prefect server starts or any task runs.

A missing session folder, a store path that is a file, an unwritable store or scratch folder,
a damaged store and a malformed session are all found here, in seconds, and end the command
with one line (`flows.cli_errors`), instead of after a temporary server has started and a
task has failed. The flow checks the session again (`plan_session`): deployments do not go
through the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from driftlane.flows.cli_errors import EXIT_ENVIRONMENT, EXIT_INPUT, CommandError
from driftlane.infra.config import SessionConfig
from driftlane.infra.store import Store, normalize_url
from driftlane.tasks.session_files import locate_session


def _local_path(url: str) -> Path | None:
    fs, path = url_to_fs(normalize_url(url))
    return Path(path) if isinstance(fs, LocalFileSystem) else None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_writable_folder(path: Path, what: str) -> None:
    """`path` is a folder we can write into, or can be created: else CommandError naming it.

    A path that is a file is bad input (2); permission or a read-only file system is the
    environment (4).
    """
    if path.exists() and not path.is_dir():
        raise CommandError(f"{path}: the {what} path is a file, not a folder", EXIT_INPUT)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"{existing}: is a file, so the {what} folder {path} cannot be "
                           "created", EXIT_INPUT)
    if _read_only(existing):
        raise CommandError(f"{existing}: read-only file system (the {what} must be writable)",
                           EXIT_ENVIRONMENT)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{existing}: permission denied (the {what} must be writable)",
                           EXIT_ENVIRONMENT)


def check_session_folders(session_urls: list[str]) -> None:
    """Every session is an existing folder holding a corpus (any fsspec URL); the messages
    are the data contract's own (`SessionFormatError`)."""
    for url in session_urls:
        locate_session(url)


def check_store(store_url: str) -> None:
    """The store can be written, and what it holds is whole (file sizes and sha256 against
    manifests; each digest is read once per machine, `infra.integrity`)."""
    local = _local_path(store_url)
    if local is not None:
        check_writable_folder(local, "store")
    store = Store(store_url)
    if store.exists():
        store.check_published()


def check_scratch(config: SessionConfig) -> None:
    """The local scratch folder can be written."""
    base = (config.scratch_dir or os.environ.get("DRIFTLANE_SCRATCH")
            or Path.home() / ".cache" / "driftlane" / "scratch")
    check_writable_folder(Path(base).expanduser(), "scratch")


def check_sessions_content(session_urls: list[str], config: SessionConfig) -> None:
    """Each session folder satisfies the data contract (the streaming validation pass)."""
    from driftlane.tasks.ingest import validate_session

    for url in session_urls:
        validate_session(url, config.ingest.max_document_chars)


def check_run(session_urls: list[str], store_url: str, config: SessionConfig) -> None:
    """All of the above, cheapest first."""
    check_session_folders(session_urls)
    check_store(store_url)
    check_scratch(config)
    check_sessions_content(session_urls, config)
