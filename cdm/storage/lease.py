"""One writer per shard: a lease file in the shard's `_writing/` folder, so a second process that opens a shard
another live process is writing (two ranks given the same shard, two experiments starting on one cached store)
stops with a message instead of interleaving commits with it.

A lease names its holder (host, boot id, pid namespace, pid and its start time, a random token) and a heartbeat
that a daemon thread refreshes every `BEAT_S`. It is stale, and may be taken over, when
- its heartbeat is older than `TTL_S` (a holder on another machine or in another container, or a writer object
  that was dropped without `close`/`release` in a process that lives on), or
- the holder ran on this machine, in this pid namespace, and its process is gone, a zombie, another process that
  reused the pid, or this very process (an abandoned writer object): a killed worker's shard resumes at once.
Writing the lease is not atomic against a second process doing the same at the same moment, so a writer reads it
back after writing and checks its token again before every commit and at close: of two writers that both took the
lease, the one that lost stops there, before it writes anything of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

from cdm.storage.errors import StoreError
from cdm.storage.fs import Location

LEASE_FILE = "lease.json"
TTL_S = 300.0  # a lease whose heartbeat is older than this is stale
BEAT_S = 60.0  # how often the holder refreshes its heartbeat
READ_TRIES = 3  # a lease read that fails for another reason than absence is retried (object-store hiccups)


class LeaseHeld(StoreError):
    """Another live process is writing this shard (a StoreError: the CLIs report it as an `error:` line)."""


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None without /proc. A zombie
    counts as gone."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19]


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """What identifies the writing process across machines, containers and pid reuse."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid": pid, "pid_start": _start_time(pid)}


def _pid_alive(pid: int, start: Any) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    now_start = _start_time(pid)
    if now_start == "zombie":
        return False
    return now_start is None or start is None or now_start == start  # another start time: the pid was reused


def holder_alive(lease: dict[str, Any], now: float, ttl_s: float = TTL_S) -> bool:
    """Whether the process named by `lease` may still be writing (see the module docstring for the rules). A lease
    that cannot be understood counts as stale."""
    try:
        fresh = now - float(lease.get("beat", 0.0)) < ttl_s
        me = this_process()
        same_machine = all(lease.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")) and me["pid_ns"] is not None
        if not same_machine:
            return fresh
        pid = int(lease.get("pid", -1))
        if pid == me["pid"] or pid <= 0:
            return False  # this process: an abandoned writer object
        return fresh and _pid_alive(pid, lease.get("pid_start"))
    except (TypeError, ValueError, AttributeError):
        return False


class ShardLease:
    """The lease of one shard folder, held from `acquire` to `release`. `owner`: the writer object; when it is
    garbage-collected without `release`, the heartbeat stops, so the lease goes stale after `ttl_s`."""

    def __init__(self, loc: Location, shard: str, writing: str, owner: Any = None, ttl_s: float = TTL_S,
                 beat_s: float = BEAT_S):
        self.loc, self.parts = loc, (shard, writing, LEASE_FILE)
        self.ttl_s, self.beat_s = ttl_s, beat_s
        self.token = uuid.uuid4().hex
        self._owner = weakref.ref(owner) if owner is not None else None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held by a beat while it reads and writes; `release` waits for it
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._started = 0.0

    @property
    def where(self) -> str:
        """The lease file as the user would name it (with the URL scheme on object stores)."""
        return self.loc.path(*self.parts) if self.loc.is_local else f"{self.loc.url.rstrip('/')}/{'/'.join(self.parts)}"

    def _read(self) -> dict[str, Any] | None:
        """The lease, or None when there is none (or it is unreadable as JSON: a stale leftover). Other errors (an
        object store's hiccup) are retried, then raised: they must not look like a takeover."""
        for attempt in range(READ_TRIES):
            try:
                lease = self.loc.read_json(*self.parts)
                return lease if isinstance(lease, dict) else None
            except FileNotFoundError:
                return None
            except ValueError:
                return None
            except OSError:
                if attempt == READ_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return None

    def _write(self) -> None:
        self.loc.write_json({"token": self.token, **this_process(), "started": self._started, "beat": time.time()},
                            *self.parts)

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder, what to do, and when it goes stale."""
        lease = self._read()
        now = time.time()
        if lease is not None and lease.get("token") != self.token and holder_alive(lease, now, self.ttl_s):
            raise LeaseHeld(self._held_message(lease, now))
        self._started = now
        self._write()
        self.check()  # read back: a second writer that wrote its lease at the same moment wins here, not later
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cdm-shard-lease", daemon=True)
        self._thread.start()

    def _held_message(self, lease: dict[str, Any], now: float) -> str:
        try:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", now))))
            age = now - float(lease.get("beat", now))
        except (TypeError, ValueError):
            since, age = "?", 0.0
        return (f"{self.loc.url}: {self.parts[0]} is being written by pid {lease.get('pid')} on host "
                f"{lease.get('host')} since {since} (last heartbeat {age:.0f} s ago); wait for it to finish (then "
                f"rerun: a finished shard is a no-op); if that process is gone, its lease lapses "
                f"{max(0.0, self.ttl_s - age):.0f} s from now, or delete {self.where}")

    def check(self) -> None:
        """Raise LeaseHeld when another writer has taken this shard over (before a commit, at close)."""
        lease = self._read()
        if lease is None or lease.get("token") != self.token:
            self.release()
            other = f"pid {lease.get('pid')} on host {lease.get('host')}" if lease else "another writer"
            raise LeaseHeld(f"{self.loc.url}: {self.parts[0]} was taken over by {other} while this process was "
                            "writing it; this writer stops without committing (the other one continues)")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            if self._owner is not None and self._owner() is None:
                return  # the writer was dropped without release: let the lease lapse
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    lease = self._read()
                    if lease is not None and lease.get("token") != self.token:
                        return  # taken over: the next commit's `check` says so
                    self._write()
                except Exception:  # noqa: BLE001 - retried at the next beat; commits check the token themselves
                    continue

    def release(self) -> None:
        """Stop the heartbeat; when this returns no beat is in flight, so nothing recreates `_writing/` after it is
        removed. The lease file stays (a resume takes it over) unless `forget` removes it."""
        self._stop.set()
        if os.getpid() != self._pid:  # a forked child has no heartbeat thread (and may hold a copied lock)
            return
        with self._lock:
            pass
        self._thread = None

    def forget(self) -> None:
        """Release and remove the lease file if it is still ours (hand the shard to another process now)."""
        self.release()
        try:
            lease = self._read()
        except OSError:
            return
        if lease is not None and lease.get("token") == self.token:
            self.loc.remove(*self.parts)
