"""One writer per store: a store-level lease lock that is safe on NFS.

(One module on purpose, over the usual ~450 lines: the safety argument below covers the lock
object, the link() protocol and the fsspec fallback together, and splitting them would put
the argument in one file and the code it argues about in others.)

Usage::

    with StoreLock(store_url, owner_label=f"run {run_id}", wait_seconds=60, keep_alive=True):
        ...  # everything that writes the store

Local and NFS filesystems (the protocol behind `StoreLock` for a path or `file://` URL)
------------------------------------------------------------------------------------------
`open(O_CREAT | O_EXCL)` is not reliable on NFS (v2/v3 and some clients), so the lock is taken
with the classic link protocol:

1. write our owner record (host, pid, label, token, acquired_at, expires_at: UTC epoch seconds)
   into a file with a unique name, `<root>/.lock.<host>.<pid>.<uuid>`;
2. `link()` it to `<root>/.lock`. `link()` is atomic on NFS; if it reports an error anyway
   (a retransmitted request whose first try succeeded answers EEXIST) we trust
   `stat(unique).st_nlink == 2` instead, which is true exactly when the link exists.

While we hold it, `.lock` and our unique file are the *same inode*. That gives the rest of the
design its safety:

* **Renewal writes the new lease through our unique name, in place** (one fixed-size `pwrite`
  at offset 0, then fsync). Because it goes through our own name and never through `.lock`, a
  renewal can only ever touch our own inode: if our lock was broken and someone else now holds
  `.lock`, their file is a different inode and is left untouched. After writing we check that
  `.lock` is still our inode; if not, the lock is lost (`LockLost`). The lock's identity never
  changes while it is held, so "is it still ours?" is always one inode comparison. (A separate
  `.lock.lease` file or an `os.replace` onto `.lock` would need a check-then-write on a shared
  name, which races with a breaker.)
* **A holder never renews a lease that has already expired** by its own clock, and a contender
  only breaks a lease when `expires_at + grace_seconds` has passed by *its* clock. As long as the
  hosts' clocks differ by less than `grace_seconds`, a renewal and a break can never both happen
  for the same lease. A holder that was paused past its lease (or whose heartbeat failed) gets
  `LockLost` on its next renewal / `check()` and must stop writing.
* **Breaking a stale lock is serialised** by a short-lived second lock, `<root>/.lock-break`
  (taken with the same link protocol). Under it the contender re-reads `.lock`, confirms it is
  still the inode it judged stale and that it is still stale, renames it (atomic) to a unique
  tomb name, checks the tomb is that inode, and deletes it. Without the mutex two contenders
  judging the same stale lock could race so that the second renames away the *new* lock the
  first just took. A contender that dies inside this few-millisecond section leaves
  `.lock-break` behind; it is recovered after `BREAK_STALE_SECONDS`.
* **Release** first writes a `released` mark into our inode (so even if anything below fails,
  contenders may take it over at once), then removes `.lock` only if it is still our inode and
  our lease is live (so no one can have broken and retaken it in between), and always removes
  the unique file.

A live lock is never broken: a dead owner's lock is recovered only after its lease (plus grace)
expires, even when it is visibly dead, because pids are reused and hosts share names in
containers. On NFS, attribute caching can delay what `stat()` sees by a few seconds; the lease
and grace are long compared with that, and the owner record is read with open() (close-to-open
consistency revalidates the data).

Other fsspec stores (`memory://`, `s3://`, ...)
----------------------------------------------
Best effort only: `fs.open(path, "xb")` (exclusive create) where the filesystem supports it,
with the same owner record and lease. Renewal and release check the token and then rewrite or
delete, and a stale lock is deleted then recreated; each of those is a check-then-act on an
object store and can race. It keeps honest concurrent runs apart; it is not a mutex you can bet
a store on under adversarial timing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from driftlane.infra.logs import module_logger
from driftlane.infra.store import normalize_url

logger = module_logger(__name__)

LOCK_NAME = ".lock"
BREAK_NAME = ".lock-break"
TOMB_PREFIX = ".lock-tomb."
# Fixed record size: renewals overwrite the record in place with one pwrite of this many
# bytes, so a reader never sees a shorter record followed by stale tail bytes.
RECORD_BYTES = 2048
# A contender holds `.lock-break` for milliseconds; one this old belongs to a dead contender.
BREAK_STALE_SECONDS = 30.0


class StoreLocked(RuntimeError):
    """The store is locked by another run (and waiting, if asked, did not help)."""

    def __init__(self, store: str, owner: dict[str, Any] | None, waited: float = 0.0,
                 holder: str | None = None):
        self.store = store
        self.owner = owner
        self.waited = waited
        self.holder = holder
        super().__init__(_locked_message(store, holder or describe_owner(owner), waited))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: Prefect persists failed states
        return (type(self), (self.store, self.owner, self.waited, self.holder))


class LockLost(RuntimeError):
    """We held the store lock, but its lease lapsed and it is no longer ours: stop writing."""


def _iso(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def describe_owner(owner: dict[str, Any] | None) -> str:
    """One line naming a lock owner: host, pid, label, when taken, when its lease expires."""
    if not owner:
        return "an unknown owner (unreadable lock record)"
    label = f" ({owner['label']})" if owner.get("label") else ""
    expires = owner.get("expires_at")
    left = ""
    if isinstance(expires, int | float):
        delta = expires - time.time()
        left = f", {delta:.0f} s from now" if delta >= 0 else f", {-delta:.0f} s ago"
    return (f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}{label}, "
            f"taken {_iso(owner.get('acquired_at'))}, lease expires {_iso(expires)}{left}")


def expiry_is_stale(owner: dict[str, Any], now: float, lease_seconds: float,
                    grace_seconds: float, store: str) -> bool:
    """Whether an owner record's `expires_at` says its lease is over.

    A lease is over once `expires_at + grace` has passed. An expiry further ahead than the
    record's own lease plus the grace cannot come from an honest holder whose clock is within
    the tolerated skew (a renewal sets it to its now + lease): a hand edit or a badly skewed
    clock. Such a lock would block the store until then, so it is stale too, with a warning.
    """
    expires = owner["expires_at"]
    if now > expires + grace_seconds:
        return True
    lease = owner.get("lease_seconds")
    lease = float(lease) if isinstance(lease, int | float) and lease > 0 else lease_seconds
    if expires > now + lease + grace_seconds:
        logger.warning("store %s: the lock's lease expires %.0f s from now, more than its own "
                       "lease of %.0f s (clock skew or a hand edit); treating it as stale: %s",
                       store, expires - now, lease, describe_owner(owner))
        return True
    return False


def _locked_message(store: str, holder: str, waited: float) -> str:
    waited_txt = f" (waited {waited:.1f} s)" if waited > 0 else ""
    return (f"store {store} is locked by another run{waited_txt}: {holder}. "
            "Only one run may write a store at a time; wait for it to finish, or, if it was "
            "killed, its lock is taken over automatically once the lease expires.")


class StoreLock:
    """Exclusive, lease-based lock on a store root (see the module docstring for the protocol).

    `lease_seconds`: how long the lock stays valid without renewal. `wait_seconds`: how long
    `acquire()` polls (every `poll_seconds`) before raising `StoreLocked`; 0 fails at once.
    `keep_alive`: renew every lease/6 from a daemon thread until `release()`.
    `grace_seconds`: the clock skew between hosts tolerated before a lapsed lease is broken.
    """

    def __init__(self, store_root: str | Path, owner_label: str = "",
                 lease_seconds: float = 300, wait_seconds: float = 0,
                 poll_seconds: float = 0.5, *, keep_alive: bool = False,
                 grace_seconds: float | None = None):
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.store = str(store_root)
        self.owner_label = owner_label[:200]
        self.lease_seconds = float(lease_seconds)
        self.wait_seconds = float(wait_seconds)
        self.poll_seconds = max(float(poll_seconds), 0.001)
        self.keep_alive = keep_alive
        self.grace_seconds = (min(5.0, self.lease_seconds / 10) if grace_seconds is None
                              else float(grace_seconds))
        self._backend = _make_backend(store_root, self)
        self._record: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # renew (heartbeat) vs release in this process
        self.lost: LockLost | None = None

    def __repr__(self) -> str:
        return f"StoreLock({self.store!r}, held={self.held})"

    # -- public API ------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """Whether this object believes it holds the lock (see `check()` for a real check)."""
        return self._record is not None

    @property
    def expires_at(self) -> float | None:
        return None if self._record is None else self._record["expires_at"]

    def owner(self) -> dict[str, Any] | None:
        """The current owner record read from the store, or None when nobody holds the lock."""
        return self._backend.read_owner()

    def acquire(self) -> StoreLock:
        """Take the lock, polling up to `wait_seconds`; raise `StoreLocked` if we cannot."""
        if self._record is not None:
            raise RuntimeError(f"{self!r}: already held by this object")
        start = time.monotonic()
        deadline = start + self.wait_seconds
        while True:
            record = self._new_record()
            ok, current = self._backend.try_acquire(record)
            if ok:
                self._record = record
                self.lost = None
                if self.keep_alive:
                    self._start_heartbeat()
                return self
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreLocked(self.store, current, time.monotonic() - start)
            time.sleep(min(self.poll_seconds, remaining))

    def renew(self) -> None:
        """Extend our lease to now + lease_seconds; raise `LockLost` if it is no longer ours."""
        with self._mutex:
            if self._record is None:
                raise RuntimeError(f"{self!r}: cannot renew a lock that is not held")
            now = time.time()
            if now >= self._record["expires_at"]:
                # Never revive a lapsed lease: a contender may be breaking it right now.
                self._lose(f"its lease expired at {_iso(self._record['expires_at'])} before "
                           "it was renewed")
            record = {**self._record, "expires_at": now + self.lease_seconds}
            if not self._backend.renew(record):
                self._lose("it was broken and is now held by "
                           f"{describe_owner(self._backend.read_owner())}")
            self._record = record

    def check(self) -> None:
        """Raise `LockLost` if the heartbeat found the lock lost or the lease has lapsed."""
        if self.lost is not None:
            raise self.lost
        if self._record is None:
            raise RuntimeError(f"{self!r}: not held")
        if time.time() >= self._record["expires_at"]:
            raise LockLost(f"store {self.store}: our lock's lease expired at "
                           f"{_iso(self._record['expires_at'])}")

    def release(self) -> bool:
        """Give the lock back. Returns False if it was no longer ours (then nothing of the
        new owner's is touched). Safe to call when not held."""
        self._stop_heartbeat()
        with self._mutex:
            if self._record is None:
                return False
            record, self._record = self._record, None
            return self._backend.release(record)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------
    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        host = socket.gethostname()[:255] or "unknown-host"
        return {"host": host, "pid": os.getpid(), "label": self.owner_label,
                "token": uuid.uuid4().hex, "acquired_at": now,
                "expires_at": now + self.lease_seconds, "lease_seconds": self.lease_seconds,
                "released": False}

    def _lose(self, why: str) -> None:
        record, self._record = self._record, None
        if record is not None:
            # Drop our half: marks our inode released and removes our unique file, and never
            # touches a `.lock` that is someone else's or whose lease has lapsed.
            with contextlib.suppress(OSError):
                self._backend.release(record)
        self.lost = LockLost(f"store {self.store}: we no longer hold the store lock: {why}")
        raise self.lost

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        # Renew six times per lease: a loaded machine that schedules the thread late, or a
        # slow store, still renews long before the lease runs out. A renewal that comes
        # later than a third of the lease after the previous one is a warning sign.
        interval, late = self.lease_seconds / 6, self.lease_seconds / 3

        def beat() -> None:
            last = time.monotonic()
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LockLost:
                    return  # recorded in self.lost; check() reports it to the writer
                except RuntimeError:
                    return  # released meanwhile
                except OSError:
                    continue  # transient filesystem error: retry before the lease runs out
                now = time.monotonic()
                if now - last > late:
                    logger.warning("store %s: the lock was renewed %.1f s after the previous "
                                   "renewal (lease %.0f s): the machine or the store is slow; "
                                   "a renewal later than the lease loses the lock",
                                   self.store, now - last, self.lease_seconds)
                last = now

        self._thread = threading.Thread(target=beat, name=f"storelock-{self.store}",
                                        daemon=True)
        self._thread.start()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def _make_backend(store_root: str | Path, lock: StoreLock) -> _PosixBackend | _FsspecBackend:
    fs, path = url_to_fs(normalize_url(str(store_root)))
    if isinstance(fs, LocalFileSystem):
        return _PosixBackend(path, lock)
    return _FsspecBackend(fs, path.rstrip("/") or "/", lock)


def _encode(record: dict[str, Any]) -> bytes:
    data = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
    if len(data) >= RECORD_BYTES:  # cannot happen with host/label truncation; be loud if so
        raise ValueError("lock record too large")
    return data + b" " * (RECORD_BYTES - 1 - len(data)) + b"\n"


def _decode(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class _PosixBackend:
    """The link()-based protocol for local and NFS paths."""

    def __init__(self, root: str, lock: StoreLock):
        self.root = root
        self.lock = lock
        self.lock_path = os.path.join(root, LOCK_NAME)
        self.break_path = os.path.join(root, BREAK_NAME)
        self.unique: str | None = None  # our unique file while we hold the lock
        self.ino: tuple[int, int] | None = None

    # -- helpers ---------------------------------------------------------------------
    def _unique_path(self, base: str, record: dict[str, Any]) -> str:
        host = record["host"].replace(os.sep, "_")
        return f"{base}.{host}.{record['pid']}.{uuid.uuid4().hex}"

    @staticmethod
    def _write_new(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _link(unique: str, target: str) -> bool:
        """link(unique, target); on error trust st_nlink, because NFS can report failure for a
        link() that succeeded (the retransmitted request finds the name taken)."""
        try:
            os.link(unique, target)
            return True
        except OSError as exc:
            try:
                if os.stat(unique).st_nlink == 2:
                    return True
            except OSError:
                return False
            if exc.errno != errno.EEXIST:
                raise OSError(exc.errno, f"cannot take the store lock: link({unique!r}, "
                              f"{target!r}) failed: {exc.strerror} (the lock needs a "
                              "filesystem with hard links)") from exc
            return False

    @staticmethod
    def _read(path: str) -> tuple[dict[str, Any] | None, os.stat_result] | None:
        """(record or None if unreadable, stat) of `path`, or None when it does not exist."""
        for attempt in range(3):
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                return None
            record = _decode(data)
            if record is not None:
                return record, st
            # Possibly a write in progress (a renewal or a just-created unique file): retry.
            time.sleep(0.02 * (attempt + 1))
        return None if not os.path.exists(path) else (None, st)

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def _is_stale(self, record: dict[str, Any] | None, st: os.stat_result, now: float) -> bool:
        grace = self.lock.grace_seconds
        if record is None:
            # Unreadable record (a writer died mid-write): judge by age, as if it had our lease.
            return now > st.st_mtime + self.lock.lease_seconds + grace
        if record.get("released"):
            return True
        if not isinstance(record.get("expires_at"), int | float):
            return now > st.st_mtime + self.lock.lease_seconds + grace
        return expiry_is_stale(record, now, self.lock.lease_seconds, grace, self.lock.store)

    @staticmethod
    def _unlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # -- protocol --------------------------------------------------------------------
    def try_acquire(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        os.makedirs(self.root, exist_ok=True)
        unique = self._unique_path(self.lock_path, record)
        record["unique"] = os.path.basename(unique)  # lets a breaker remove it too
        self._write_new(unique, _encode(record))
        try:
            # A few rounds: the holder may release, or a stale lock be broken, in between.
            for _ in range(5):
                if self._link(unique, self.lock_path):
                    self.unique, self.ino = unique, self._key(os.stat(unique))
                    unique = ""  # keep it: it is our half of the lock
                    return True, record
                current = self._read(self.lock_path)
                if current is None:
                    continue  # released between our link() and read: try again
                owner, st = current
                if not self._is_stale(owner, st, time.time()):
                    return False, owner
                self._break_stale(self._key(st))
            current = self._read(self.lock_path)
            return False, None if current is None else current[0]
        finally:
            if unique:
                self._unlink(unique)

    def _break_stale(self, judged: tuple[int, int]) -> None:
        """Remove the lock we judged stale, serialised by `.lock-break` (see module doc)."""
        breaker = self._take_breaker()
        if breaker is None:
            return  # someone else is breaking it; our caller re-reads and retries
        try:
            current = self._read(self.lock_path)
            if current is None:
                return
            owner, st = current
            if self._key(st) != judged or not self._is_stale(owner, st, time.time()):
                return  # renewed or replaced since we looked: never break a live lock
            tomb = os.path.join(self.root, f"{TOMB_PREFIX}{uuid.uuid4().hex}")
            try:
                os.rename(self.lock_path, tomb)
            except FileNotFoundError:
                return
            tomb_st = os.stat(tomb)
            if self._key(tomb_st) != judged:
                # Only possible if the breaker mutex itself was broken under us: put it back
                # (if a new `.lock` appeared meanwhile, the link fails and that one stands).
                self._link(tomb, self.lock_path)
                self._unlink(tomb)
                return
            # Also remove the dead owner's unique name, if it is the same inode.
            if owner and isinstance(owner.get("unique"), str):
                dead = os.path.join(self.root, os.path.basename(owner["unique"]))
                with contextlib.suppress(OSError):
                    if self._key(os.stat(dead)) == judged:
                        os.unlink(dead)
            self._unlink(tomb)
        finally:
            self._release_breaker(breaker)

    def _take_breaker(self) -> tuple[str, tuple[int, int]] | None:
        now = time.time()
        rec = {"host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now}
        unique = self._unique_path(self.break_path, {**rec, "host": rec["host"] or "h"})
        self._write_new(unique, json.dumps(rec).encode())
        if self._link(unique, self.break_path):
            return unique, self._key(os.stat(unique))
        self._unlink(unique)
        # A breaker left by a contender that died inside the break section.
        current = self._read(self.break_path)
        if current is not None:
            rec_old, st = current
            taken = rec_old.get("acquired_at") if rec_old else None
            if not isinstance(taken, int | float):
                taken = st.st_mtime
            if now > taken + BREAK_STALE_SECONDS:
                tomb = os.path.join(self.root, f"{TOMB_PREFIX}{uuid.uuid4().hex}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.break_path, tomb)
                    if self._key(os.stat(tomb)) != self._key(st):
                        self._link(tomb, self.break_path)  # not the stale one: put it back
                    self._unlink(tomb)
        return None

    def _release_breaker(self, breaker: tuple[str, tuple[int, int]]) -> None:
        unique, key = breaker
        with contextlib.suppress(FileNotFoundError):
            if self._key(os.stat(self.break_path)) == key:
                os.unlink(self.break_path)
        self._unlink(unique)

    def _ours(self) -> bool:
        try:
            return self._key(os.stat(self.lock_path)) == self.ino
        except FileNotFoundError:
            return False

    def _overwrite(self, record: dict[str, Any]) -> None:
        """Rewrite the record through our unique name: this only ever changes our inode."""
        assert self.unique is not None
        fd = os.open(self.unique, os.O_WRONLY)
        try:
            os.pwrite(fd, _encode(record), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def renew(self, record: dict[str, Any]) -> bool:
        if self.unique is None or not self._ours():
            return False
        self._overwrite(record)
        # Checked again after writing: if it was broken meanwhile, our write went to the tomb.
        return self._ours()

    def release(self, record: dict[str, Any]) -> bool:
        unique = self.unique
        if unique is None:
            return False
        try:
            with contextlib.suppress(OSError):
                # Mark released first, in our own inode: contenders may take over at once even
                # if we die before the unlink below (or skip it because the lease lapsed).
                self._overwrite({**record, "released": True})
            ours = self._ours()
            # Unlink `.lock` only while our lease is live: nobody may break (and retake) a
            # live lease, so the name cannot change hands between the check and the unlink.
            if ours and time.time() < record["expires_at"]:
                self._unlink(self.lock_path)
            return ours
        finally:
            self.unique, self.ino = None, None
            self._unlink(unique)

    def read_owner(self) -> dict[str, Any] | None:
        current = self._read(self.lock_path)
        if current is None:
            return None
        return current[0] or {}


class _FsspecBackend:
    """Best-effort lease for object stores: exclusive create ("xb") plus a token check."""

    def __init__(self, fs: Any, root: str, lock: StoreLock):
        self.fs = fs
        self.root = root
        self.lock = lock
        self.lock_path = f"{root}/{LOCK_NAME}"

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.lock_path, "rb") as f:
                return _decode(f.read()) or {}
        except FileNotFoundError:
            return None

    def _create(self, record: dict[str, Any]) -> bool:
        data = json.dumps(record).encode()
        try:
            with self.fs.open(self.lock_path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            # No exclusive create here: check then write, and let the token check decide.
            if self.fs.exists(self.lock_path):
                return False
            with self.fs.open(self.lock_path, "wb") as f:
                f.write(data)
        # Object stores may not honour "xb": confirm our token is the one stored.
        current = self._read()
        return bool(current) and current.get("token") == record["token"]

    def try_acquire(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(3):
            if self._create(record):
                return True, record
            current = self._read()
            if current is None:
                continue
            stale = current.get("released") or (
                isinstance(current.get("expires_at"), int | float)
                and expiry_is_stale(current, time.time(), self.lock.lease_seconds,
                                    self.lock.grace_seconds, self.lock.store))
            if not stale:
                return False, current
            with contextlib.suppress(FileNotFoundError):  # weaker: check-then-delete
                self.fs.rm(self.lock_path)
        return False, self._read()

    def renew(self, record: dict[str, Any]) -> bool:
        current = self._read()
        if not current or current.get("token") != record["token"]:
            return False
        with self.fs.open(self.lock_path, "wb") as f:
            f.write(json.dumps(record).encode())
        return True

    def release(self, record: dict[str, Any]) -> bool:
        current = self._read()
        if not current or current.get("token") != record["token"]:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.lock_path)
        return True

    def read_owner(self) -> dict[str, Any] | None:
        return self._read()
