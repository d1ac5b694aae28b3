"""SIGKILL the CLI at several points of a session; the store must stay whole and a re-run
must publish exactly what an uninterrupted run publishes.

The CLI runs as a real subprocess against the test harness' Prefect server, and is killed
by `DRIFTLANE_KILL_AT=<point>` (os.kill(SIGKILL) inside the run, as an OOM kill would).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from malformed_sessions import write_valid_session
from test_session_flow import published_files

from driftlane.infra.store import Store

pytestmark = pytest.mark.usefixtures("prefect_harness")
DRIFTLANE = str(Path(sys.executable).parent / "driftlane")
# embedding, clustering, training, the aligned update, index writing, publishing (mid-upload,
# before the manifest)
KILL_POINTS = ["embed.start", "memory.write", "train.start", "align.write", "index.write",
               "publish.stage.file", "publish.manifest"]


def cli(*args: str, scratch: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    # A run killed while holding the store lock frees it when its lease lapses; the re-run
    # waits for that (up to [lock] wait_seconds, 90 s). 15 s keeps the wait short while a
    # loaded machine still renews in time (every 2.5 s; a renewal may come 12 s late).
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "DRIFTLANE_SCRATCH": str(scratch), "DRIFTLANE_LOCK_LEASE_S": "15"}
    env.pop("DRIFTLANE_KILL_AT", None)
    if kill_at:
        env["DRIFTLANE_KILL_AT"] = kill_at
    return subprocess.run([DRIFTLANE, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def no_global_limit(folder: Path) -> list[str]:
    """`--config` for runs without the Prefect global concurrency limit: a killed holder's slot
    comes back only after Prefect's minimum lease of 60 s, and only on a server that runs its
    repossessor service, which the test harness's server does not. `test_server.py` checks
    that recovery once against a real server; the kill points here are about the store."""
    path = folder / "no-global-limit.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[lock]\nglobal_limit = false\n")
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """Two small sessions, a store holding the first, and the uninterrupted result of both."""
    root = tmp_path_factory.mktemp("crash")
    alpha = write_valid_session(root / "in" / "alpha", n_docs=6, name_prefix="a")
    beta = write_valid_session(root / "in" / "beta", n_docs=5, name_prefix="b")
    config = no_global_limit(root)
    first = cli("run-session", str(alpha), "--store", str(root / "one"), *config,
                scratch=root / "s1")
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(root / "one", root / "uninterrupted")
    both = cli("run-session", str(beta), "--store", str(root / "uninterrupted"), *config,
               scratch=root / "s2")
    assert both.returncode == 0, both.stderr[-2000:]
    return {"beta": beta, "one": root / "one", "config": config,
            "expected": published_files(root / "uninterrupted")}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_leaves_no_partial_session_and_rerun_matches(tmp_path, stream, point):
    store = shutil.copytree(stream["one"], tmp_path / "store")
    killed = cli("run-session", str(stream["beta"]), "--store", str(store), *stream["config"],
                 scratch=tmp_path / "scratch", kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [m.name for m in Store(str(store)).sessions()] == ["alpha"]

    shown = cli("show", "--store", str(store), "--json", scratch=tmp_path / "scratch")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert [s["name"] for s in json.loads(shown.stdout)["sessions"]] == ["alpha"]

    rerun = cli("run-session", str(stream["beta"]), "--store", str(store), *stream["config"],
                scratch=tmp_path / "scratch")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert published_files(store) == stream["expected"]

