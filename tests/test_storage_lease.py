"""One writer per shard: a live process holding a shard's lease stops a second writer with a message; a dead or
silent holder is taken over (resume after a kill just works); a writer that lost its shard commits nothing more."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cdm.storage import StoreError, TeacherStore, TeacherStoreWriter
from cdm.storage.lease import TTL_S, LeaseHeld, ShardLease, holder_alive
from cdm.storage.fs import Location
from tests.storage_helpers import manifest_sections, random_sequence

KW = dict(key="lease-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16, commit_tokens=10**9)


def _lease_file(url: str):
    return Location(url).path("shard-00000", "_writing", "lease.json")


def _write_lease(url: str, **fields) -> None:
    lease = {"token": "someone-else", "host": socket.gethostname(), "pid": -1, "started": time.time(),
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
        _write_lease(url, pid=holder.pid)
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
    time.sleep(0.3)
    later = loc.read_json("shard-00000", "_writing", "lease.json")
    assert later["token"] == first["token"] and later["beat"] > first["beat"]
    lease.release()
    stopped = loc.read_json("shard-00000", "_writing", "lease.json")
    time.sleep(0.2)
    assert loc.read_json("shard-00000", "_writing", "lease.json") == stopped
    assert holder_alive({**stopped, "host": "elsewhere"}, time.time())
    assert not holder_alive({**stopped, "host": "elsewhere"}, time.time() + TTL_S + 1)
    assert not holder_alive(stopped, time.time())  # this process: an abandoned writer object
    url = str(tmp_path / "closed")
    w = TeacherStoreWriter(url, **KW)
    w.add(random_sequence(np.random.default_rng(3), 0))
    w.close()
    assert not Location(url).exists("shard-00000", "_writing")
    assert json.dumps(TeacherStore(url).manifest)
