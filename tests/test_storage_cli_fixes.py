"""`cdm verify` / `cdm info` fixes: --max-problems 0 = no limit, the teacher's source in info, range reads in
verify with the same per-sequence messages, and CLI-facing wording of the incomplete-store error."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.storage import StoreError, TeacherStore, TeacherStoreWriter
from cdm.storage.verify import check_sequence, store_info, verify_store
from tests.storage_helpers import manifest_sections, random_sequence, write_store


def _bad_store(url: str, n: int = 12, bad: tuple[int, ...] = (3, 8), num_shards: int = 2) -> list:
    """A store whose sequences `bad` break an invariant (entropy above log V), written around the writer's checks."""
    rng = np.random.default_rng(11)
    seqs = [random_sequence(rng, i) for i in range(n)]
    for i in bad:
        seqs[i].entropy = seqs[i].entropy + 100.0
    write_store(url, seqs, num_shards=num_shards, chunk_rows=16)
    return seqs


def test_max_problems_zero_means_no_limit_and_negative_is_refused(tmp_path):
    url = str(tmp_path / "s")
    _bad_store(url)
    every = verify_store(url, max_problems=0)
    assert every.sequences_checked == 12 and len(every.problems) == 2
    first = verify_store(url, max_problems=1)
    assert len(first.problems) == 1 and first.sequences_checked < 12
    for bad in (-1, -5):
        with pytest.raises(ValueError, match="--max-problems"):
            verify_store(url, max_problems=bad)


def test_cli_verify_max_problems_zero_checks_every_sequence(tmp_path):
    from typer.testing import CliRunner

    from cdm.cli import app

    url = str(tmp_path / "s")
    write_store(url, [random_sequence(np.random.default_rng(1), i) for i in range(7)])
    r = CliRunner().invoke(app, ["verify", url, "--max-problems", "0"])
    assert r.exit_code == 0 and "7 sequence(s) verified" in r.output


def test_verify_reads_ranges_and_names_each_bad_sequence_as_before(tmp_path, monkeypatch):
    """The problems equal what a sequence-by-sequence pass with `check_sequence` finds, word for word, though verify
    no longer reads sequence by sequence."""
    url = str(tmp_path / "s")
    _bad_store(url, n=30, bad=(2, 5, 17), num_shards=3)
    store = TeacherStore(url)
    r = store.reader
    want = []
    for si, shard in enumerate(r.shards):
        base = int(r._shard_starts[si])
        for j in range(int(shard["sequences"])):
            seq = store[base + j]
            want += check_sequence(seq, store.vocab_size, f"{shard['path']} sequence {j} (seq_id {seq.seq_id})")
    assert len(want) == 3

    def one_by_one(self, i):
        raise AssertionError("verify read a single sequence")

    monkeypatch.setattr(TeacherStore, "__getitem__", one_by_one)
    report = verify_store(url, max_problems=0)
    assert report.problems == want and report.sequences_checked == 30


def test_info_shows_the_teacher_source_and_fingerprint(tmp_path):
    url = str(tmp_path / "s")
    sections = {**manifest_sections(), "teacher": {"source": "./teacher", "kind": "folder", "gguf_file": None,
                                                   "fingerprint": "ab" * 32}}
    w = TeacherStoreWriter(url, key="k", manifest=sections, k=8, vocab_size=1000)
    w.add(random_sequence(np.random.default_rng(2), 0))
    w.close()
    info = store_info(url)
    assert info["teacher"] == "./teacher"
    assert info["teacher_kind"] == "folder" and info["teacher_fingerprint"] == "ab" * 8
    # hand-made manifests that only name the teacher still show something
    other = str(tmp_path / "t")
    write_store(other, [random_sequence(np.random.default_rng(2), 0)])
    assert store_info(other)["teacher"] == "random"


def test_incomplete_store_error_names_no_python_only_parameter_bare(tmp_path):
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, key="k", manifest=manifest_sections(), k=8, vocab_size=1000, num_shards=2)
    w.add(random_sequence(np.random.default_rng(3), 0))
    w.close()
    with pytest.raises(StoreError) as e:
        TeacherStore(url)
    msg = str(e.value)
    assert "1/2 shards" in msg and "rerun" in msg
    assert "pass allow_incomplete" not in msg and "TeacherStore(url, allow_incomplete=True)" in msg
    assert len(TeacherStore(url, allow_incomplete=True)) == 1  # the way out the message names works
