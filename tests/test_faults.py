"""Faults end in one clear line: `error: <what>: <why>`, a documented exit code, and a store
left exactly as it was (nothing half-written, nothing lost).

Runs the installed `driftlane` command as a user would, against the test harness's server.
Disk-full and read-only cases mount a small tmpfs (the tests run as root, as CI does); where
mounting is not allowed they are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from malformed_sessions import MALFORMED, write_valid_session
from test_store import snapshot

from driftlane.flows.cli_errors import EXIT_ENVIRONMENT, EXIT_INPUT

pytestmark = pytest.mark.usefixtures("prefect_harness")
DRIFTLANE = str(Path(sys.executable).parent / "driftlane")
QUICK = "[finetune]\nenabled = false\n[lock]\nglobal_limit = false\n"


def cli(*args: str, scratch: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "DRIFTLANE_SCRATCH": str(scratch)}
    env.pop("DRIFTLANE_FAIL_AT", None)
    env.pop("DRIFTLANE_KILL_AT", None)
    return subprocess.run([DRIFTLANE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """Exit code `code`, stderr's last line is `error: ...` naming `parts`, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for part in parts:
        assert part in last, (part, last)
    return last


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A store holding one session, the next session's folder and a quick config."""
    root = tmp_path_factory.mktemp("faults")
    config = root / "quick.toml"
    config.write_text(QUICK)
    alpha = write_valid_session(root / "in" / "alpha", n_docs=6, name_prefix="a")
    beta = write_valid_session(root / "in" / "beta", n_docs=5, name_prefix="b")
    first = cli("run-session", str(alpha), "--store", str(root / "store"), "--config",
                str(config), scratch=root / "scratch")
    assert first.returncode == 0, first.stderr[-3000:]
    return {"store": root / "store", "beta": beta, "config": config, "root": root}


def copy_store(published, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published["store"], tmp_path / "store"))


def test_non_ascii_session_name_runs_through_the_whole_flow(tmp_path, published):
    store = copy_store(published, tmp_path)
    session = write_valid_session(tmp_path / "in" / "sess ünï 空", n_docs=5, name_prefix="u")
    result = cli("run-session", str(session), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sess ünï 空: published as session #1" in result.stdout
    shown = cli("show", "--store", str(store), scratch=tmp_path / "scratch")
    assert shown.returncode == 0 and "#1 sess ünï 空" in shown.stdout


def test_truncated_manifest_is_named_and_show_does_not_crash(tmp_path, published):
    store = copy_store(published, tmp_path)
    manifest = next(store.glob("sessions/*/manifest.json"))
    manifest.write_bytes(manifest.read_bytes()[:40])
    before = snapshot(store)
    result = cli("show", "--store", str(store), scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_ENVIRONMENT, str(manifest), "damaged manifest")
    assert snapshot(store) == before


def test_truncated_parquet_stops_the_next_run_before_any_work(tmp_path, published):
    store = copy_store(published, tmp_path)
    docs = next(store.glob("sessions/*/docs.parquet"))
    docs.write_bytes(docs.read_bytes()[:100])
    before = snapshot(store)
    started = time.monotonic()
    result = cli("run-session", str(published["beta"]), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_ENVIRONMENT, str(docs), "truncated or changed")
    assert time.monotonic() - started < 60  # refused before a server or a model started
    assert snapshot(store) == before


def test_store_path_that_is_a_file(tmp_path, published):
    store = tmp_path / "store"
    store.write_text("not a store")
    started = time.monotonic()
    result = cli("run-session", str(published["beta"]), "--store", str(store),
                 scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_INPUT, str(store), "is a file")
    assert time.monotonic() - started < 30
    assert store.read_text() == "not a store"


def test_missing_session_folder_is_rejected_at_once(tmp_path, published):
    result = cli("run-session", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s"),
                 scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_INPUT, str(tmp_path / "nowhere"),
                          "session folder does not exist")
    assert not (tmp_path / "s").exists()


def test_far_future_lock_is_stale_and_the_run_goes_on(tmp_path, published):
    """A `.lock` expiring a day from now (a hand edit, a clock far ahead) would block the store
    until then: the run treats it as stale, says so naming the holder, and publishes."""
    import json

    store = copy_store(published, tmp_path)
    now = time.time()
    record = {"host": "elsewhere", "pid": 4242, "label": "skewed run", "token": "t",
              "acquired_at": now, "expires_at": now + 86400, "lease_seconds": 60.0,
              "released": False, "unique": ".lock.elsewhere.4242.x"}
    (store / ".lock").write_text(json.dumps(record).ljust(2047) + "\n")
    result = cli("run-session", str(published["beta"]), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "treating it as stale" in result.stderr and "skewed run" in result.stderr
    assert "beta: published as session #1" in result.stdout
    assert not (store / ".lock").exists()


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_session_ends_in_one_line(tmp_path, published, case):
    import re

    store = copy_store(published, tmp_path)
    before = snapshot(store)
    (tmp_path / "bad").mkdir()
    bad = case.build(tmp_path / "bad")
    result = cli("run-session", str(bad), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    last = assert_one_line_error(result, EXIT_INPUT)
    assert re.search(case.match, last), (case.match, last)
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert snapshot(store) == before


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs at tmp_path/mnt, unmounted afterwards; skipped where mounting fails."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_read_only_store(tmp_path, published, tmpfs):
    store = Path(shutil.copytree(published["store"], tmpfs / "store",
                                 ignore=shutil.ignore_patterns("results", "cache")))
    before = snapshot(store)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    result = cli("run-session", str(published["beta"]), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_ENVIRONMENT, str(store), "read-only file system")
    assert snapshot(store) == before


def test_full_disk_while_running(tmp_path, published, tmpfs):
    store = Path(shutil.copytree(published["store"], tmpfs / "store",
                                 ignore=shutil.ignore_patterns("results", "cache")))
    sessions_before = snapshot(store / "sessions")
    # leave about 64 KiB free: enough to start, not enough for the embedding cache and results
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))
    result = cli("run-session", str(published["beta"]), "--store", str(store), "--config",
                 str(published["config"]), scratch=tmp_path / "scratch")
    assert_one_line_error(result, EXIT_ENVIRONMENT, "no space left on device", str(tmpfs))
    assert snapshot(store / "sessions") == sessions_before  # nothing published is lost
    leftovers = [p for p in store.rglob("*") if ".tmp" in p.name or p.name == ".staging"
                 and any(p.iterdir())]
    assert not leftovers, leftovers
