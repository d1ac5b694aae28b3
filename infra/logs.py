"""Loggers of library modules that reach the Prefect run log when they run inside a run.

A module-level `logging.getLogger(__name__)` writes to the terminal only: a warning such as
"window_tokens exceeds max_seq_length" raised inside a task would never show in the Prefect
UI. `module_logger(__name__)` forwards each call to the active flow or task run's logger
(which Prefect both prints and sends to the server), and to the plain module logger outside
a run (unit tests, benchmarks, the CLI before a flow starts).
"""

from __future__ import annotations

import logging
from typing import Any


class _RunAwareLogger:
    def __init__(self, name: str) -> None:
        self._module = logging.getLogger(name)

    def _target(self) -> logging.Logger | logging.LoggerAdapter:
        # imported here: the CLI imports this module long before (or without) running a flow
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        task_run = TaskRunContext.get()
        if task_run is not None:
            # a task called outside any flow has no run log to write to
            return get_run_logger() if task_run.task_run.flow_run_id else self._module
        return get_run_logger() if FlowRunContext.get() is not None else self._module

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._target(), attribute)


def module_logger(name: str) -> Any:
    """A logger for `name` that follows the current Prefect run (see the module docstring)."""
    return _RunAwareLogger(name)
