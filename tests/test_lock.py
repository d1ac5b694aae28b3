"""The store lock: one writer per store, NFS-safe link protocol, lease expiry and recovery."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from driftlane.infra import lock as lockmod
from driftlane.infra.lock import LockLost, StoreLock, StoreLocked

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.Popen:
    """Start `code` in a fresh interpreter that can import the project."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".lock"))


def test_round_trip_creates_root_and_cleans_up(tmp_path):
    root = tmp_path / "new" / "store"  # does not exist yet
    with StoreLock(root, owner_label="run 1") as lk:
        assert lk.held
        owner = lk.owner()
        assert owner["label"] == "run 1" and owner["pid"] == os.getpid()
        assert owner["host"] == socket.gethostname()
        assert owner["expires_at"] == pytest.approx(owner["acquired_at"] + 300)
        # `.lock` and our unique file are one inode with two names.
        assert os.stat(root / ".lock").st_nlink == 2
    assert not lk.held
    assert _leftovers(root) == []
    assert StoreLock(root).owner() is None


def test_second_acquirer_fails_at_once_naming_the_owner(tmp_path):
    first = StoreLock(tmp_path, owner_label="session run abc").acquire()
    start = time.monotonic()
    with pytest.raises(StoreLocked) as info:
        StoreLock(tmp_path).acquire()
    assert time.monotonic() - start < 1.0
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert f"host {socket.gethostname()} pid {os.getpid()} (session run abc)" in msg
    assert "taken " in msg and "lease expires " in msg
    assert info.value.owner["label"] == "session run abc"
    first.release()
    assert _leftovers(tmp_path) == []


def test_waiter_gets_the_lock_after_release(tmp_path):
    first = StoreLock(tmp_path, owner_label="first").acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    start = time.monotonic()
    second = StoreLock(tmp_path, owner_label="second", wait_seconds=5, poll_seconds=0.02)
    with second:
        assert time.monotonic() - start >= 0.25
        assert second.owner()["label"] == "second"
    timer.join()


def test_waiting_gives_up_with_a_clear_message(tmp_path):
    with StoreLock(tmp_path, owner_label="holder"):
        start = time.monotonic()
        with pytest.raises(StoreLocked, match=r"waited 0\.[2-9] s.*\(holder\)"):
            StoreLock(tmp_path, wait_seconds=0.25, poll_seconds=0.05).acquire()
        assert time.monotonic() - start >= 0.25


RACER = """
    import sys, time
    from pathlib import Path
    from driftlane.infra.lock import StoreLock
    root, log, go, name = sys.argv[1:5]
    while not Path(go).exists():
        time.sleep(0.001)
    for i in range(20):
        with StoreLock(root, owner_label=name, wait_seconds=60, poll_seconds=0.002):
            with open(log, "a") as f:
                f.write(f"start {name} {i}\\n")
                f.flush()
            time.sleep(0.003)
            with open(log, "a") as f:
                f.write(f"end {name} {i}\\n")
"""


def test_two_processes_never_interleave(tmp_path):
    root, log, go = tmp_path / "store", tmp_path / "log.txt", tmp_path / "go"
    procs = [_python(RACER, str(root), str(log), str(go), name) for name in ("a", "b")]
    time.sleep(0.05)
    go.touch()  # both start at once
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    lines = log.read_text().splitlines()
    assert len(lines) == 80
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        kind, who, i = start.split()
        assert kind == "start" and end == f"end {who} {i}", lines
    assert _leftovers(root) == []


HOLDER = """
    import sys, time
    from pathlib import Path
    from driftlane.infra.lock import StoreLock
    root, ready = sys.argv[1:3]
    StoreLock(root, owner_label="doomed", lease_seconds=1.5).acquire()
    Path(ready).touch()
    time.sleep(60)
"""


def test_stale_lock_of_killed_run_recovered_after_expiry_not_before(tmp_path):
    root, ready = tmp_path / "store", tmp_path / "ready"
    proc = _python(HOLDER, str(root), str(ready))
    try:
        _wait_for(ready)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    dead = StoreLock(root).owner()
    assert dead["label"] == "doomed" and dead["pid"] == proc.pid

    contender = StoreLock(root, owner_label="rescuer", lease_seconds=1.0, grace_seconds=0.1)
    assert time.time() < dead["expires_at"]  # still within its lease: must not be broken
    with pytest.raises(StoreLocked, match="doomed"):
        contender.acquire()
    time.sleep(max(0.0, dead["expires_at"] + 0.15 - time.time()))
    with contender:
        assert contender.owner()["label"] == "rescuer"
        names = _leftovers(root)
        # Only `.lock` and our unique file: the dead run's unique file and the tomb are gone.
        assert len(names) == 2 and ".lock" in names
        assert not any("tomb" in n or "break" in n for n in names)
    assert _leftovers(root) == []


def test_renew_extends_the_lease(tmp_path):
    with StoreLock(tmp_path, lease_seconds=2) as lk:
        before = lk.expires_at
        time.sleep(0.05)
        lk.renew()
        assert lk.expires_at > before + 0.04
        assert lk.owner()["expires_at"] == lk.expires_at
        assert lk.owner()["acquired_at"] < before


def test_keep_alive_holds_a_short_lease(tmp_path):
    with StoreLock(tmp_path, lease_seconds=0.6, keep_alive=True) as lk:
        first = lk.expires_at
        time.sleep(1.0)  # two lease lengths: only heartbeats keep it alive
        lk.check()
        assert lk.expires_at > first
        with pytest.raises(StoreLocked):
            StoreLock(tmp_path, grace_seconds=0.0).acquire()
    assert _leftovers(tmp_path) == []


def _far_future_lock(root: Path, lease: float = 60.0, ahead: float = 86400.0) -> None:
    """A `.lock` as a hand edit or a skewed clock leaves it: expiring a day from now."""
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"host": "elsewhere", "pid": 4242, "label": "skewed run", "token": "t",
              "acquired_at": now, "expires_at": now + ahead, "lease_seconds": lease,
              "released": False, "unique": ".lock.elsewhere.4242.x"}
    (root / ".lock").write_bytes(lockmod._encode(record))


def test_expiry_far_beyond_the_lease_is_stale_with_a_warning(tmp_path, caplog):
    root = tmp_path / "store"
    _far_future_lock(root)
    before = (root / ".lock").read_bytes()
    with caplog.at_level("WARNING", logger="driftlane.infra.lock"), \
            StoreLock(root, owner_label="next run", lease_seconds=60) as lk:
        assert lk.owner()["label"] == "next run"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("more than its own lease of 60 s" in w and "skewed run" in w for w in warnings)
    assert before != b""  # the far-future record was there, and it did not block us
    assert _leftovers(root) == []


def test_expiry_within_the_lease_is_respected(tmp_path):
    root = tmp_path / "store"
    _far_future_lock(root, lease=60.0, ahead=50.0)  # an honest holder's live lease
    with pytest.raises(StoreLocked, match="skewed run"):
        StoreLock(root, lease_seconds=60).acquire()


def test_late_renewal_is_logged(tmp_path, caplog, monkeypatch):
    """A heartbeat that wakes later than a third of the lease says so."""
    lk = StoreLock(tmp_path, lease_seconds=3.0, keep_alive=True)
    real_renew = StoreLock.renew
    calls = []

    def slow_renew(self):
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.2)  # the first renewal is held up, as on a loaded machine
        real_renew(self)

    monkeypatch.setattr(StoreLock, "renew", slow_renew)
    with caplog.at_level("WARNING", logger="driftlane.infra.lock"), lk:
        deadline = time.monotonic() + 30
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lk.check()
    assert len(calls) >= 2
    assert any("renewed" in r.getMessage() and "after the previous renewal" in r.getMessage()
               for r in caplog.records)


def test_holder_that_lost_its_lock_never_touches_the_new_owner(tmp_path):
    old = StoreLock(tmp_path, owner_label="old", lease_seconds=0.2).acquire()
    time.sleep(0.3)
    new = StoreLock(tmp_path, owner_label="new", grace_seconds=0.05).acquire()
    new_owner = new.owner()
    assert new_owner["label"] == "new"

    # A lapsed lease is never revived by renew(), and the writer is told to stop.
    with pytest.raises(LockLost, match="expired"):
        old.renew()
    with pytest.raises(LockLost):
        old.check()
    assert old.release() is False
    assert new.owner() == new_owner

    # A holder that thinks its lease is live (paused process, skewed clock) but was broken:
    # renew() and release() go through its own inode only.
    old2 = StoreLock(tmp_path / "b", owner_label="old2", lease_seconds=0.2).acquire()
    time.sleep(0.3)
    new2 = StoreLock(tmp_path / "b", owner_label="new2", grace_seconds=0.05).acquire()
    new2_owner = new2.owner()
    old2._record["expires_at"] = time.time() + 100
    with pytest.raises(LockLost, match="new2"):
        old2.renew()
    assert new2.owner() == new2_owner
    old2._record = {**new2_owner, "expires_at": time.time() + 100}  # even if it were confused
    assert old2.release() is False
    assert new2.owner() == new2_owner
    new.release()
    new2.release()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "b") == []


def test_link_reports_failure_but_did_link(tmp_path, monkeypatch):
    real_link = os.link

    def flaky_link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)  # the first NFS request succeeded...
        raise OSError(errno.EEXIST, "File exists")  # ...the retransmission says EEXIST

    monkeypatch.setattr(os, "link", flaky_link)
    with StoreLock(tmp_path, owner_label="nfs") as lk:
        assert lk.owner()["label"] == "nfs"
        with pytest.raises(StoreLocked, match="nfs"):  # and a real EEXIST still fails
            StoreLock(tmp_path).acquire()
    assert _leftovers(tmp_path) == []


def test_link_unsupported_is_an_error_not_a_hang(tmp_path, monkeypatch):
    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(OSError, match="hard links"):
        StoreLock(tmp_path).acquire()
    assert _leftovers(tmp_path) == []


def test_released_mark_and_unreadable_records(tmp_path):
    # A holder whose lease lapsed leaves `.lock` but marks it released: taken over at once.
    lk = StoreLock(tmp_path, lease_seconds=0.1).acquire()
    time.sleep(0.15)
    assert lk.release() is True
    assert json.loads((tmp_path / ".lock").read_text())["released"] is True
    with StoreLock(tmp_path, grace_seconds=10):
        pass
    # An unreadable record is judged by its age.
    garbage = tmp_path / ".lock"
    garbage.write_bytes(b"\0" * 10)
    with pytest.raises(StoreLocked, match="unknown owner"):
        StoreLock(tmp_path, lease_seconds=60).acquire()
    os.utime(garbage, (time.time() - 120, time.time() - 120))
    with StoreLock(tmp_path, lease_seconds=60):
        pass
    assert _leftovers(tmp_path) == []


def test_break_mutex_left_by_a_dead_contender_is_recovered(tmp_path):
    stale = StoreLock(tmp_path, lease_seconds=0.1).acquire()
    stale._backend.unique = None  # simulate its death: it never releases
    time.sleep(0.15)
    (tmp_path / ".lock-break").write_text(json.dumps(
        {"host": "h", "pid": 1, "acquired_at": time.time() - lockmod.BREAK_STALE_SECONDS - 1}))
    with StoreLock(tmp_path, grace_seconds=0.01) as lk:
        assert lk.owner()["token"] == lk._record["token"]
    assert _leftovers(tmp_path) == []  # the dead holder's unique file went with its lock


def test_memory_store_best_effort_lease():
    url = f"memory://locktest-{os.getpid()}-{time.monotonic_ns()}/store"
    first = StoreLock(url, owner_label="mem", lease_seconds=0.2).acquire()
    with pytest.raises(StoreLocked, match="mem"):
        StoreLock(url).acquire()
    first.renew()
    time.sleep(0.3)
    with StoreLock(url, owner_label="next", grace_seconds=0.05) as lk:
        assert lk.owner()["label"] == "next"
        assert first.release() is False
        assert lk.owner()["label"] == "next"
    assert StoreLock(url).owner() is None
