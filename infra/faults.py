"""Named points where a test can make a run fail on purpose (Faiss' `crash_at` idea).

`DRIFTLANE_FAIL_AT=<point>` raises `InjectedFailure` there; `DRIFTLANE_KILL_AT=<point>` kills
the process with SIGKILL, as a power cut or an OOM kill would. Both are read at the moment
the point is reached, so a test can set them between runs.

`DRIFTLANE_FAULT_SWITCH=<file>` arms both only while that file exists. A process whose
environment is fixed (a served deployment and the flow runs it spawns) can then be made to
fail once and succeed on retry: create the file, let the run fail, delete the file, retry.
"""

from __future__ import annotations

import os
import signal


class InjectedFailure(RuntimeError):
    """Raised at a crash point named by DRIFTLANE_FAIL_AT."""


def _armed() -> bool:
    """False only when a fault switch file is named and does not exist."""
    switch = os.environ.get("DRIFTLANE_FAULT_SWITCH")
    return not switch or os.path.exists(switch)


def crash_point(name: str) -> None:
    """Fail or die here when the environment asks for it; otherwise do nothing."""
    if name not in (os.environ.get("DRIFTLANE_KILL_AT"), os.environ.get("DRIFTLANE_FAIL_AT")):
        return
    if not _armed():
        return
    if os.environ.get("DRIFTLANE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("DRIFTLANE_FAIL_AT") == name:
        raise InjectedFailure(f"injected failure at {name!r} (DRIFTLANE_FAIL_AT)")
