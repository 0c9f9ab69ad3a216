"""One writer per shard: a live process holding a shard's lease stops a second writer with a message; a dead or
silent holder is taken over (resume after a kill just works); a writer that lost its shard commits nothing more."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cdm.storage import StoreError, TeacherStore, TeacherStoreWriter
from cdm.storage.lease import TTL_S, LeaseHeld, ShardLease, _start_time, holder_alive, this_process
from cdm.storage.fs import Location
from tests.storage_helpers import manifest_sections, random_sequence

KW = dict(key="lease-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16, commit_tokens=10**9)


def _lease_file(url: str):
    return Location(url).path("shard-00000", "_writing", "lease.json")


def _write_lease(url: str, **fields) -> None:
    """A lease of another process on this machine (same host, boot and pid namespace) unless `fields` say else."""
    lease = {**this_process(), "token": "someone-else", "pid": -1, "pid_start": None, "started": time.time(),
             "beat": time.time(), **fields}
    Location(url).write_json(lease, "shard-00000", "_writing", "lease.json")


def _started_shard(url: str, n: int = 3) -> None:
    """A shard with `n` committed sequences whose writer went away without closing (as after a kill)."""
    rng = np.random.default_rng(0)
    w = TeacherStoreWriter(url, **KW)
    for i in range(n):
        w.add(random_sequence(rng, i))
    w.commit()
    w.release()


def test_a_live_process_on_this_host_holds_the_shard_until_it_exits(tmp_path):
    url = str(tmp_path / "s")
    _started_shard(url)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lease(url, pid=holder.pid, pid_start=_start_time(holder.pid))
        with pytest.raises(LeaseHeld) as e:
            TeacherStoreWriter(url, **KW)
        msg = str(e.value)
        assert isinstance(e.value, StoreError)  # every CLI reports a StoreError as one `error:` line
        assert f"shard-00000 is being written by pid {holder.pid} on host {socket.gethostname()}" in msg
        assert "wait for it to finish" in msg and _lease_file(url) in msg
    finally:
        holder.kill()
        holder.wait()
    w = TeacherStoreWriter(url, **KW)  # the holder is dead: resume where it committed
    assert w.done_source_indices == {0, 1, 2}
    w.close()
    assert len(TeacherStore(url)) == 3


@pytest.mark.parametrize("age, refused", [(0.0, True), (TTL_S + 1.0, False)])
def test_a_lease_from_another_host_counts_while_its_heartbeat_is_fresh(tmp_path, age, refused):
    url = str(tmp_path / "s")
    _started_shard(url)
    _write_lease(url, host="another-node", pid=1234, beat=time.time() - age)
    if refused:
        with pytest.raises(LeaseHeld, match="pid 1234 on host another-node"):
            TeacherStoreWriter(url, **KW)
    else:
        TeacherStoreWriter(url, **KW).close()
        assert len(TeacherStore(url)) == 3


def test_a_writer_that_lost_its_shard_commits_nothing_more(tmp_path):
    url = str(tmp_path / "s")
    _started_shard(url)
    w = TeacherStoreWriter(url, **KW)
    w.add(random_sequence(np.random.default_rng(1), 7))
    state = Location(url).read_json("shard-00000", "_writing", "state.json")
    _write_lease(url, host="another-node", pid=99)  # another process took the shard over
    with pytest.raises(LeaseHeld, match="taken over by pid 99 on host another-node"):
        w.commit()
    with pytest.raises(LeaseHeld):
        w.close()
    assert Location(url).read_json("shard-00000", "_writing", "state.json") == state  # untouched
    assert not Location(url).exists("shards", "shard-00000.json")


def test_an_abandoned_writer_of_this_process_is_taken_over(tmp_path):
    """Tests and API users retry in one process: a writer object dropped without close does not block the next."""
    url = str(tmp_path / "s")
    rng = np.random.default_rng(2)
    w = TeacherStoreWriter(url, **KW)
    w.add(random_sequence(rng, 0))
    w.commit()
    del w
    w2 = TeacherStoreWriter(url, **KW)
    assert w2.done_source_indices == {0}
    w2.close()


def test_heartbeat_refreshes_until_release_and_close_removes_the_lease(tmp_path):
    loc = Location(str(tmp_path / "s"))
    lease = ShardLease(loc, "shard-00000", "_writing", beat_s=0.05)
    lease.acquire()
    first = loc.read_json("shard-00000", "_writing", "lease.json")
    later = first
    for _ in range(500):  # wait for a heartbeat (every 0.05 s; generous for a loaded machine)
        later = loc.read_json("shard-00000", "_writing", "lease.json")
        if later["beat"] != first["beat"]:
            break
        time.sleep(0.02)
    assert later["token"] == first["token"] and later["beat"] > first["beat"]
    lease.release()
    stopped = loc.read_json("shard-00000", "_writing", "lease.json")
    time.sleep(0.2)  # four heartbeat periods: none may come after release
    assert loc.read_json("shard-00000", "_writing", "lease.json") == stopped
    beat = stopped["beat"]  # staleness is judged against the lease's own heartbeat, not the clock
    assert holder_alive({**stopped, "host": "elsewhere"}, beat + TTL_S - 1)
    assert not holder_alive({**stopped, "host": "elsewhere"}, beat + TTL_S + 1)
    assert not holder_alive(stopped, beat)  # this process: an abandoned writer object
    url = str(tmp_path / "closed")
    w = TeacherStoreWriter(url, **KW)
    w.add(random_sequence(np.random.default_rng(3), 0))
    w.close()
    assert not Location(url).exists("shard-00000", "_writing")
    assert json.dumps(TeacherStore(url).manifest)


def test_a_reused_pid_or_a_silent_holder_on_this_machine_is_stale(tmp_path):
    """A live pid that started at another time is another process (the pid was reused); a live holder whose heartbeat
    stopped (a writer object dropped in a process that lives on) lapses after the TTL; a lease from another pid
    namespace (another container with the same host name) is judged by its heartbeat alone."""
    me = this_process()
    parent = os.getppid()
    now = 1_000_000.0  # heartbeat and "now" are given: no clock involved
    base = {**me, "token": "t", "beat": now}
    assert holder_alive({**base, "pid": parent, "pid_start": _start_time(parent)}, now)
    assert not holder_alive({**base, "pid": parent, "pid_start": "12345"}, now)  # reused pid
    assert not holder_alive({**base, "pid": parent, "pid_start": _start_time(parent)}, now + TTL_S + 1)
    other_ns = {**base, "pid_ns": "another", "pid": me["pid"]}  # pid 1 in two containers is not "this process"
    assert holder_alive(other_ns, now) and not holder_alive(other_ns, now + TTL_S + 1)
    assert not holder_alive({"beat": "soon", "pid": "x"}, now)  # unreadable: stale


def test_transient_read_errors_are_retried_not_taken_for_a_takeover(tmp_path, monkeypatch):
    loc = Location(str(tmp_path / "s"))
    lease = ShardLease(loc, "shard-00000", "_writing", beat_s=3600)
    lease.acquire()
    real = Location.read_bytes
    failures = iter([OSError("503 Slow Down"), OSError("503 Slow Down")])

    def flaky(self, *parts):
        err = next(failures, None)
        if err is not None:
            raise err
        return real(self, *parts)

    monkeypatch.setattr(Location, "read_bytes", flaky)
    lease.check()  # two failures, then the read works: still ours
    monkeypatch.setattr(Location, "read_bytes", lambda self, *parts: (_ for _ in ()).throw(OSError("network down")))
    with pytest.raises(OSError, match="network down"):  # the real error, not "taken over"
        lease.check()
    monkeypatch.undo()
    lease.release()


def test_release_waits_for_a_beat_in_flight(tmp_path, monkeypatch):
    """No heartbeat write may land after release() returns (close removes _writing/ right after it)."""
    loc = Location(str(tmp_path / "s"))
    lease = ShardLease(loc, "shard-00000", "_writing", beat_s=0.01)
    writes: list[int] = []
    in_write = threading.Event()
    real_write = ShardLease._write

    def slow_write(self):
        in_write.set()
        time.sleep(0.3)
        real_write(self)
        writes.append(1)

    lease.acquire()
    monkeypatch.setattr(ShardLease, "_write", slow_write)
    assert in_write.wait(10)  # a beat is now inside its write
    lease.release()
    done_at_release = len(writes)
    assert done_at_release >= 1  # release waited for the beat in flight to finish
    time.sleep(0.3)
    assert len(writes) == done_at_release  # and no beat started after it


def test_a_dropped_writer_lets_its_lease_lapse(tmp_path):
    import gc

    class Owner:
        pass

    owner = Owner()
    loc = Location(str(tmp_path / "s"))
    lease = ShardLease(loc, "shard-00000", "_writing", owner=owner, beat_s=0.02)
    lease.acquire()
    thread = lease._thread
    del owner
    gc.collect()
    thread.join(timeout=10)  # the heartbeat sees its writer is gone and stops
    assert not thread.is_alive()
