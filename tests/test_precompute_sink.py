"""The store writer in a child process: same store as the thread writer, errors surface with their message and
leave a resumable shard, and the mode is chosen by device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.precompute import run
from cdm.precompute.encode import Encoded
from cdm.precompute.sink import ProcessSink, ThreadSink, resolve_writer_mode
from cdm.precompute.topk import TopK
from cdm.storage import StoreError, TeacherStore, TeacherStoreWriter
from cdm.storage.verify import verify_store
from tests.test_precompute_support import _offline, text_records, tiny_teacher, tokenizer, write_jsonl  # noqa: F401
from tests.test_precompute_workers import assert_same_store


def test_process_writer_gives_the_same_store_as_the_thread_writer(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(25, seed=5, max_chars=150) + [{"text": "  "}])
    common = {"teacher": str(tiny_teacher), "data": str(data), "top_k": 7, "text_field": "text",
              "batch_tokens": 128, "commit_tokens": 48, "progress": False, "echo": lambda s: None}
    a = run(out=str(tmp_path / "thread"), writer_mode="thread", **common)
    b = run(out=str(tmp_path / "process"), writer_mode="process", **common)
    assert a.stats["sequences"] == b.stats["sequences"] == 25
    assert a.stats["skipped"] == b.stats["skipped"] == {"empty text": 1}
    assert b.store_complete and verify_store(b.url).ok
    assert_same_store(a.url, b.url)
    again = run(out=str(tmp_path / "process"), writer_mode="process", **common)
    assert not again.computed  # a finished store is a no-op in either mode


def _item(n: int, k: int, vocab: int, index: int, rng) -> tuple:
    text = "x" * n
    enc = Encoded(text=text, token_ids=rng.integers(0, vocab, n).astype(np.int32),
                  char_spans=np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32),
                  response_spans=np.array([[0, n]], np.int32), truncated=False)
    lp = np.sort(-rng.random((n, k)).astype(np.float32) * 5, axis=1)[:, ::-1].copy()
    res = TopK(torch.from_numpy(rng.integers(0, vocab, (n, k)).astype(np.int32)), torch.from_numpy(lp),
               torch.zeros(n), torch.ones(n))
    return (index, enc), res


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_writer_errors_surface_and_keep_what_was_committed(tmp_path, mode):
    rng = np.random.default_rng(0)
    url = str(tmp_path / "s")
    kwargs = dict(url=url, key="k", manifest={}, k=4, vocab_size=50, commit_tokens=8)
    good = [_item(5, 4, 50, i, rng) for i in range(3)]
    bad = _item(5, 4, 50, 3, rng)
    bad[1].ids[2, 1] = 77  # outside the vocabulary: the writer refuses this sequence
    sink = ThreadSink(TeacherStoreWriter(**kwargs), "fp") if mode == "thread" else ProcessSink(kwargs, "fp")
    sink.put(("add", [g[0] for g in good], [g[1] for g in good]))
    sink.put(("skip", 9, "empty text"))
    sink.put(("add", [bad[0]], [bad[1]]))
    with pytest.raises(StoreError, match="outside"):
        sink.close()
    w = TeacherStoreWriter(**kwargs)  # the shard resumes after the sequences handed over before the bad one
    assert w.done_source_indices == {0, 1, 2, 9}
    w.close()
    assert len(TeacherStore(url)) == 3


def test_process_writer_reports_an_unopenable_store(tmp_path):
    url = str(tmp_path / "s")
    TeacherStoreWriter(url, key="one", manifest={}, k=4, vocab_size=50).close()
    with pytest.raises(StoreError, match="another teacher"):  # at once, before any batch is computed
        ProcessSink(dict(url=url, key="two", manifest={}, k=4, vocab_size=50), "fp")


def test_writer_mode_by_device():
    assert resolve_writer_mode("auto", "cpu") == "thread"
    assert resolve_writer_mode("auto", "cuda:1") == "thread"  # measured faster; process is opt-in
    assert resolve_writer_mode("process", "cpu") == "process"
    assert resolve_writer_mode("thread", "cuda") == "thread"
    with pytest.raises(ValueError, match="--writer"):
        resolve_writer_mode("fast", "cpu")


def test_memory_budget_default_depends_on_the_device():
    from cdm.precompute.run import default_memory_budget_mb

    assert default_memory_budget_mb(None, "cpu") == 256
    assert default_memory_budget_mb(None, "cuda:0") == 1024
    assert default_memory_budget_mb(64, "cuda") == 64
    with pytest.raises(ValueError, match="--memory-budget-mb"):
        default_memory_budget_mb(0, "cpu")


def test_a_killed_writer_process_is_reported_with_what_to_do(tmp_path):
    import os
    import signal

    rng = np.random.default_rng(1)
    kwargs = dict(url=str(tmp_path / "s"), key="k", manifest={}, k=4, vocab_size=50, commit_tokens=8)
    sink = ProcessSink(kwargs, "fp")
    sink.put(("add", *map(list, zip(*[_item(5, 4, 50, i, rng) for i in range(3)]))))
    os.kill(sink._proc.pid, signal.SIGKILL)
    sink._proc.join(10)
    with pytest.raises(RuntimeError, match="writer process .* died .* rerun the same command to resume"):
        for i in range(3, 200):  # the pipe breaks on one of these puts, or at close at the latest
            sink.put(("add", *map(list, zip(*[_item(5, 4, 50, i, rng)]))))
        sink.close()


def test_an_unguarded_script_gets_told_about_the_main_guard(tmp_path):
    """The writer process is spawned, which re-imports the caller's main script: a script without the
    `if __name__ == '__main__':` guard must get an error that says so, not a bare exit code."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from cdm.precompute.sink import ProcessSink\n"
        f"sink = ProcessSink(dict(url={str(tmp_path / 's')!r}, key='k', manifest={{}}, k=4, vocab_size=50), 'fp')\n"
        "sink.close()\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": repo})
    assert r.returncode != 0
    assert "if __name__ == '__main__':" in r.stderr and "--writer thread" in r.stderr


def test_thread_sink_lowers_the_gil_switch_interval_only_while_open(tmp_path):
    import sys

    before = sys.getswitchinterval()
    kwargs = dict(url=str(tmp_path / "s"), key="k", manifest={}, k=4, vocab_size=50)
    sink = ThreadSink(TeacherStoreWriter(**kwargs), "fp")
    assert sys.getswitchinterval() <= 0.001 + 1e-9
    sink.close()
    assert sys.getswitchinterval() == before
    sink = ThreadSink(TeacherStoreWriter(**{**kwargs, "url": str(tmp_path / "t")}), "fp")
    sink.put(("add", [(0, None)], [None]))  # a malformed item: the writer thread fails
    with pytest.raises(Exception):
        sink.close()
    assert sys.getswitchinterval() == before  # restored on the error path too
    a = ThreadSink(TeacherStoreWriter(**{**kwargs, "url": str(tmp_path / "a")}), "fp")
    b = ThreadSink(TeacherStoreWriter(**{**kwargs, "url": str(tmp_path / "b")}), "fp")
    a.close()
    assert sys.getswitchinterval() <= 0.001 + 1e-9  # b is still open
    b.abort()
    b.abort()  # a second drain does not release twice
    assert sys.getswitchinterval() == before
    with pytest.raises(ValueError, match="positive"):
        ThreadSink(TeacherStoreWriter(**{**kwargs, "url": str(tmp_path / "c")}), "fp", switch_interval=0.0)
    ThreadSink(TeacherStoreWriter(**{**kwargs, "url": str(tmp_path / "d")}), "fp").close()
    assert sys.getswitchinterval() == before  # the refused sink left no holder behind
