"""Progress of long work: Prefect progress artifacts inside runs, terminal bars in the CLI.

`Progress` reports one piece of work (embedding a corpus, training steps) two ways:

- inside a Prefect flow or task run, a progress artifact (percentage 0..100) under a key, shown
  in the UI next to the run; outside a run it does nothing on the API. Updates are throttled to
  one API call every `UPDATE_INTERVAL_S`, plus a final one on `close()`. A failing artifact call
  is logged once and never breaks the work;
- when the CLI called `enable_cli_bars()`, a tqdm bar on stderr. Off by default, so tests and
  deployments print nothing extra.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from types import TracebackType
from typing import Any
from uuid import UUID

from driftlane.infra.logs import module_logger

__all__ = ["UPDATE_INTERVAL_S", "Progress", "artifact_key", "enable_cli_bars"]

logger = module_logger(__name__)

# Least seconds between two artifact updates (each is an API call); close() always reports.
UPDATE_INTERVAL_S = 2.0

_cli_bars = False


def enable_cli_bars(enabled: bool = True) -> None:
    """Draw terminal progress bars in this process (the CLI's `--progress`)."""
    global _cli_bars
    _cli_bars = enabled


def artifact_key(key: str, fallback: str = "progress") -> str:
    """`key` as a Prefect artifact key: ASCII lowercase letters, digits and dashes only.

    "embed 00_scifact" -> "embed-00-scifact". A name with other letters ("café", "空") keeps
    its ASCII part and gains a short digest of the whole name, so two such sessions never
    share a key: "report-caf-1a2b3c4d".
    """
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-") or fallback
    if not key.isascii():
        slug = f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return slug


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """Progress of one long piece of work: a Prefect progress artifact while inside a flow/task
    run, and a terminal bar when the CLI enabled bars.

    total: items the work has (0 is allowed: the work counts as done). Use as a context manager
    or call `close()`; `advance(n)` after each n items, or `update(done)` with the count so far.
    """

    def __init__(self, key: str, total: int, description: str, unit: str = "items") -> None:
        self.key = artifact_key(key)
        self.total = max(int(total), 0)
        self.description = description
        self.done = 0
        self._closed = False
        self._artifact_id: UUID | None = None
        self._reported: float | None = None  # last percentage sent to the API
        self._last_report = time.monotonic()
        self._bar: Any = None
        if _cli_bars:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=description, unit=unit, file=sys.stderr,
                             dynamic_ncols=True)
        if _in_prefect_run():
            self._create_artifact()

    def _percent(self) -> float:
        """Share of the work done, 0..100; 100 when there is nothing to do."""
        if self.total == 0:
            return 100.0
        return min(100.0, 100.0 * self.done / self.total)

    def advance(self, n: int = 1) -> None:
        """`n` more items are done."""
        self.update(self.done + n)

    def update(self, done: int) -> None:
        """`done` items are done so far."""
        done = max(int(done), 0)
        if self._bar is not None and done != self.done:
            self._bar.update(done - self.done)
        self.done = done
        if time.monotonic() - self._last_report >= UPDATE_INTERVAL_S:
            self._report(self._percent())

    def close(self) -> None:
        """Report the final state (100 when all items are done) and close the bar; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._report(self._percent())
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _create_artifact(self) -> None:
        from prefect.artifacts import create_progress_artifact

        try:
            self._artifact_id = create_progress_artifact(progress=0.0, key=self.key,
                                                         description=self.description)
            self._reported = 0.0
        except Exception as exc:  # a progress report must never break the work
            logger.warning("progress %s: no Prefect progress artifact (%s: %s)", self.key,
                           type(exc).__name__, exc)

    def _report(self, percent: float) -> None:
        self._last_report = time.monotonic()
        if self._artifact_id is None or percent == self._reported:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self._artifact_id, percent)
            self._reported = percent
        except Exception as exc:  # a progress report must never break the work
            # one warning, then no more calls: a server that is down would slow every update
            logger.warning("progress %s: stopped updating the Prefect progress artifact "
                           "(%s: %s)", self.key, type(exc).__name__, exc)
            self._artifact_id = None
