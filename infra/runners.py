"""The task runner that sharded stages map over, chosen by `RunnerConfig`.

The session flow opens `shard_runner(config.runner)` for the length of the run; a stage that
has many texts to embed calls `map_shards(task, shards)`, which submits one task run per shard
to that runner and returns the results in shard order. The runner starts on first use and
stops when the flow ends, so a session without work to shard never starts a Dask cluster.

- `threads` (default): Prefect's `ThreadPoolTaskRunner` in the flow's process.
- `dask`: prefect-dask's `DaskTaskRunner`, on a local cluster of `dask_workers` processes or
  on the existing cluster at `dask_address`. Shard tasks read and write only what their
  parameters name (the encoder path, the embedding cache in the store), so workers on other
  machines need those paths visible: a store on shared storage and a model path they can read.

Outside `shard_runner` (plain function calls, benchmarks) `current_runner()` is None and
stages embed in-process, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from driftlane.infra.config import RunnerConfig, RunnerKind


class _RunnerSlot:
    """A runner config plus the task runner started for it on first use."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.runner: Any = None
        self.stack = contextlib.ExitStack()

    def get(self) -> Any:
        if self.runner is None:
            runner = make_task_runner(self.config)
            local_dask = self.config.kind == RunnerKind.dask and not self.config.dask_address
            with _prefect_api_in_environment() if local_dask else contextlib.nullcontext():
                self.runner = self.stack.enter_context(runner)
        return self.runner


_current: ContextVar[_RunnerSlot | None] = ContextVar("driftlane_shard_runner", default=None)


def make_task_runner(config: RunnerConfig) -> Any:
    """A (not yet started) Prefect task runner for `config`."""
    if config.kind == RunnerKind.dask:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:  # pragma: no cover - the Makefile installs the extra
            raise RuntimeError("runner.kind = 'dask' needs prefect-dask: install driftlane "
                               "with its `dask` extra (pip install 'driftlane[dask]')") from exc
        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": config.dask_workers,
            "threads_per_worker": config.dask_threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        })
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=config.max_workers)


@contextlib.contextmanager
def _prefect_api_in_environment() -> Iterator[None]:
    """While a local cluster starts, put the API this run reports to into the environment its
    worker processes inherit (a temporary server, or one set through Prefect settings rather
    than the environment, is otherwise unknown to them: each would start its own)."""
    from prefect.client.orchestration import get_client

    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@contextlib.contextmanager
def shard_runner(config: RunnerConfig) -> Iterator[None]:
    """Make `config`'s task runner the one `map_shards` uses until the block ends."""
    slot = _RunnerSlot(config)
    token = _current.set(slot)
    try:
        with slot.stack:
            yield
    finally:
        _current.reset(token)


def current_runner() -> RunnerConfig | None:
    """The runner config of the enclosing `shard_runner`, or None."""
    slot = _current.get()
    return None if slot is None else slot.config


def split(n: int, size: int) -> list[range]:
    """Consecutive ranges of at most `size` covering range(n)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def map_shards(task: Any, shards: Sequence[dict[str, Any]],
               on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run `task` once per parameter dict on the current runner; results in shard order.

    `on_done(i, result)` is called in the caller's thread as each shard finishes (progress).
    """
    slot = _current.get()
    if slot is None:
        raise RuntimeError("map_shards() needs an enclosing shard_runner()")
    from prefect.futures import as_completed

    runner = slot.get()
    futures = [runner.submit(task, parameters) for parameters in shards]
    index = {id(future): i for i, future in enumerate(futures)}
    for future in as_completed(futures):
        result = future.result()  # raises the shard's exception
        if on_done is not None:
            on_done(index[id(future)], result)
    return [future.result() for future in futures]
