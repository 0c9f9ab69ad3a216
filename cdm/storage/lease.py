"""One writer per shard: a lease file in the shard's `_writing/` folder, so a second process that opens a shard
another live process is writing (two ranks given the same shard, two experiments starting on one cached store)
stops with a message instead of interleaving commits with it.

A lease names its holder (host, pid, a random token) and a heartbeat that a daemon thread refreshes. It is stale,
and may be taken over, when its holder is this process (an abandoned writer object), a dead pid on this host (a
killed worker: resuming must just work), or, from another host, when its heartbeat is older than `ttl_s`. Writing
the lease is not atomic against a second process doing the same at the same moment, so the holder also checks its
token before every commit and at close: of two writers that both took the lease, the one that lost stops there,
before it writes anything of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from cdm.storage.errors import StoreError
from cdm.storage.fs import Location

LEASE_FILE = "lease.json"
TTL_S = 300.0  # a lease from another host without a heartbeat for this long is stale
BEAT_S = 60.0  # how often the holder refreshes its heartbeat


class LeaseHeld(StoreError):
    """Another live process is writing this shard (a StoreError: the CLIs report it as an `error:` line)."""


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs here; a zombie (killed, not yet reaped: common for orphans in containers whose init does not
    reap) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):  # no /proc (macOS): trust kill(0)
        return True


def holder_alive(lease: dict[str, Any], now: float, ttl_s: float = TTL_S) -> bool:
    """Whether the process named by `lease` may still be writing (see the module docstring for the rules)."""
    if lease.get("host") == socket.gethostname():
        pid = int(lease.get("pid", -1))
        return pid != os.getpid() and pid > 0 and _pid_alive(pid)
    return now - float(lease.get("beat", 0.0)) < ttl_s


class ShardLease:
    """The lease of one shard folder, held by this writer from `acquire` to `release`."""

    def __init__(self, loc: Location, shard: str, writing: str, ttl_s: float = TTL_S, beat_s: float = BEAT_S):
        self.loc, self.parts = loc, (shard, writing, LEASE_FILE)
        self.ttl_s, self.beat_s = ttl_s, beat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = self.loc.read_json(*self.parts)
        except (OSError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def _write(self, started: float) -> None:
        self.loc.write_json({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                             "started": started, "beat": time.time()}, *self.parts)

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder and what to do."""
        lease = self._read()
        now = time.time()
        if lease is not None and lease.get("token") != self.token and holder_alive(lease, now, self.ttl_s):
            raise LeaseHeld(self._held_message(lease, now))
        self._started = now
        self._write(now)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cdm-shard-lease", daemon=True)
        self._thread.start()

    def _held_message(self, lease: dict[str, Any], now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", now))))
        age = now - float(lease.get("beat", now))
        return (f"{self.loc.url}: {self.parts[0]} is being written by pid {lease.get('pid')} on host "
                f"{lease.get('host')} since {since} (last heartbeat {age:.0f} s ago); wait for it to finish (then "
                "rerun: a finished shard is a no-op), or, if that process is gone, delete "
                f"{self.loc.path(*self.parts)}")

    def check(self) -> None:
        """Raise LeaseHeld when another writer has taken this shard over since `acquire` (before a commit)."""
        lease = self._read()
        if lease is None or lease.get("token") != self.token:
            self.release()
            other = f"pid {lease.get('pid')} on host {lease.get('host')}" if lease else "another writer"
            raise LeaseHeld(f"{self.loc.url}: {self.parts[0]} was taken over by {other} while this process was "
                            "writing it; this writer stops without committing (the other one continues)")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                lease = self._read()
                if lease is None or lease.get("token") != self.token:
                    return  # taken over or finished: `check` reports it
                self._write(self._started)
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the next commit checks the token
                continue

    def release(self) -> None:
        """Stop the heartbeat (the lease file goes with `_writing/` at close, or stays for a resume to take over)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread() and os.getpid() == self._pid:
            self._thread.join(timeout=5)
        self._thread = None

    def forget(self) -> None:
        """Release and remove the lease file if it is still ours (hand the shard to another process now)."""
        self.release()
        lease = self._read()
        if lease is not None and lease.get("token") == self.token:
            self.loc.remove(*self.parts)
