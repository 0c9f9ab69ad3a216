"""Precompute in separate processes: SIGKILL then resume equals an uninterrupted run; concurrent shard workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cdm.precompute import run
from cdm.storage import TeacherStore
from cdm.storage.verify import verify_store
from tests.test_precompute_support import _offline, text_records, tiny_teacher, tokenizer, write_jsonl  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
args = json.loads(sys.argv[1])
delay = args.pop("delay", 0)
if delay:
    from cdm.precompute import hf_backend
    submit = hf_backend.HFBackend.submit
    def slow(self, seqs):
        time.sleep(delay)
        return submit(self, seqs)
    hf_backend.HFBackend.submit = slow
from cdm.precompute import run
run(args.pop("teacher"), args.pop("data"), args.pop("out"), progress=False, echo=lambda s: None, **args)
"""


def child(args: dict, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=e, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_same_store(a: str, b: str) -> None:
    sa = {s.source_index: s for s in TeacherStore(a)}
    sb = {s.source_index: s for s in TeacherStore(b)}
    assert sorted(sa) == sorted(sb)
    for i in sa:
        x, y = sa[i], sb[i]
        assert (x.seq_id, x.text, x.truncated) == (y.seq_id, y.text, y.truncated)
        for f in ("token_ids", "char_spans", "response_spans", "topk_ids"):
            assert np.array_equal(getattr(x, f), getattr(y, f)), (i, f)
        # batch composition may move fp32 results by an ulp, and so an fp16-stored value by one fp16 ulp
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=1e-3, atol=1e-3)
        for f in ("logsumexp", "entropy"):
            np.testing.assert_allclose(getattr(x, f), getattr(y, f), rtol=1e-5, atol=1e-5)


def children_of(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc; Linux)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


@pytest.mark.parametrize("writer_mode", ["thread", "process"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_teacher, writer_mode):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(40, seed=11, max_chars=120))
    common = {"teacher": str(tiny_teacher), "data": str(data), "top_k": 6, "text_field": "text", "max_length": 64}
    ref = str(tmp_path / "ref")
    run(out=ref, progress=False, echo=lambda s: None, **common)
    out = str(tmp_path / "killed")
    p = child({**common, "out": out, "batch_tokens": 64, "window_rows": 4, "commit_tokens": 32, "delay": 0.15,
               "writer_mode": writer_mode})
    state = Path(out) / "shard-00000" / "_writing" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["n_sequences"] >= 4:
            break
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        time.sleep(0.05)
    kids = children_of(p.pid)
    if writer_mode == "process":
        assert kids, "the store writer process should be running"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    deadline = time.time() + 30  # the writer process dies with its parent: no orphan writes behind the resume
    while any(alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(k) for k in kids)
    m = TeacherStore.read_manifest(out)
    assert m is not None and not m["complete"]
    done = json.loads(state.read_text())["n_sequences"]
    assert 4 <= done < 40
    res = run(out=out, progress=False, echo=lambda s: None, batch_tokens=512, **common)
    assert res.computed and res.store_complete and res.stats["sequences"] == 40
    assert verify_store(out).ok
    assert_same_store(ref, out)


def test_concurrent_workers_fill_one_store(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(30, seed=12, max_chars=120) + [{"text": ""}])
    common = {"teacher": str(tiny_teacher), "data": str(data), "top_k": 5, "text_field": "text"}
    out = str(tmp_path / "shared")
    # one worker gets its shard from flags, the other from torchrun's environment
    procs = [child({**common, "out": out, "num_shards": 2, "shard_index": 0, "commit_tokens": 64}),
             child({**common, "out": out, "commit_tokens": 64}, env={"WORLD_SIZE": "2", "RANK": "1"})]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    store = TeacherStore(out)
    assert store.is_complete and len(store.manifest["shards"]) == 2 and len(store) == 30
    assert verify_store(out).ok
    shards = store.manifest["shards"]
    assert sum(s["skipped_by_reason"].get("empty text", 0) for s in shards) == 1
    single = str(tmp_path / "single")
    run(out=single, progress=False, echo=lambda s: None, **common)
    assert_same_store(single, out)
