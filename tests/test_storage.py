"""Teacher store: round trips, resume after SIGKILL, corruption, refusals, concurrency, DataLoader, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdm.storage import StoreError, TeacherStore, TeacherStoreWriter
from cdm.storage.verify import store_info, verify_store
from tests.storage_helpers import assert_sequences_equal, manifest_sections, random_sequence, write_store

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25), shards=st.integers(1, 3), chunk=st.sampled_from([8, 64, 4096]))
def test_round_trip_random_ragged(tmp_path_factory, seed, n, shards, chunk):
    url = str(tmp_path_factory.mktemp("store") / "s")
    rng = np.random.default_rng(seed)
    seqs = [random_sequence(rng, i) for i in range(n)]
    write_store(url, seqs, num_shards=shards, chunk_rows=chunk, commit_tokens=int(rng.integers(1, 200)))
    store = TeacherStore(url, check="digest")
    assert len(store) == n and store.is_complete
    got = {s.source_index: s for s in store}
    assert sorted(got) == list(range(n))
    for s in seqs:
        assert_sequences_equal(s, got[s.source_index])
    assert store.n_tokens == sum(s.n_tokens for s in seqs)
    assert verify_store(url).ok


def test_layout_is_plain_zarr_and_parquet(tmp_path):
    """A user can read the store with zarr and pyarrow directly (README documents this layout)."""
    rng = np.random.default_rng(0)
    seqs = [random_sequence(rng, i) for i in range(5)]
    url = str(tmp_path / "s")
    write_store(url, seqs)
    g = zarr.open_group(str(tmp_path / "s" / "shard-00000" / "tokens"), mode="r")
    off = g["seq_offsets"][:]
    assert off[-1] == sum(s.n_tokens for s in seqs)
    np.testing.assert_array_equal(g["token_ids"][off[2]:off[3]], seqs[2].token_ids)
    t = pq.read_table(tmp_path / "s" / "shard-00000" / "sequences.parquet")
    assert t.column("text").to_pylist() == [s.text for s in seqs]
    assert t.column("n_tokens").to_pylist() == [s.n_tokens for s in seqs]
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format"] == "cdm-teacher-store" and m["version"] == 1 and m["complete"]
    assert m["k"] == 8 and m["teacher"] == {"name": "random"}


def _arrays_of(url: str) -> dict:
    g = zarr.open_group(os.path.join(url, "shard-00000", "tokens"), mode="r")
    out = {name: g[name][:] for name in g.array_keys()}
    out["parquet"] = pq.read_table(os.path.join(url, "shard-00000", "sequences.parquet")).to_pydict()
    return out


@pytest.mark.parametrize("kill_after", [0.0, 1, 3, 7, 12])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, kill_after):
    n = 30
    ref = str(tmp_path / "ref")
    proc = subprocess.run([sys.executable, "-m", "tests.kill_writer", ref, str(n)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    url = str(tmp_path / "killed")
    p = subprocess.Popen([sys.executable, "-m", "tests.kill_writer", url, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    added = 0
    while added < kill_after:
        line = p.stdout.readline()
        if not line:
            break
        added += line.startswith("added")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    proc = subprocess.run([sys.executable, "-m", "tests.kill_writer", url, str(n)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = _arrays_of(ref), _arrays_of(url)
    assert set(a) == set(b)
    for k in a:
        if k == "parquet":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert verify_store(url).ok


def test_resume_in_process_no_duplicates(tmp_path):
    rng = np.random.default_rng(1)
    seqs = [random_sequence(rng, i) for i in range(10)]
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16)
    for s in seqs[:6]:
        w.add(s)
    w.commit()
    w.add(seqs[6])  # added but never committed: lost on "crash", redone on resume
    del w
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16)
    assert w.done_source_indices == set(range(6))
    for s in seqs:
        if s.source_index not in w.done_source_indices:
            w.add(s)
    w.skip(99, "empty text")
    w.close()
    store = TeacherStore(url)
    assert [s.source_index for s in store] == list(range(10))
    assert store_info(url)["skipped"] == {"empty text": 1}
    # a finished store reopened is complete and knows its skips
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16)
    assert w.complete and w.done_source_indices == set(range(10)) | {99}


def test_refuses_mismatched_shapes_before_writing(tmp_path):
    rng = np.random.default_rng(2)
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=4, vocab_size=1000)
    s = random_sequence(rng, 0, k=8)
    with pytest.raises(StoreError, match=r"s000000.*\(k=4\)"):
        w.add(s)
    s = random_sequence(rng, 1, k=4)
    s.topk_ids = s.topk_ids.copy()
    s.topk_ids[0, 0] = 5000
    with pytest.raises(StoreError, match="outside"):
        w.add(s)
    s = random_sequence(rng, 2, k=4)
    s.char_spans = s.char_spans + 1000
    with pytest.raises(StoreError, match="char_spans"):
        w.add(s)
    w.close()
    assert len(TeacherStore(url)) == 0
    # reopening with another k or key is refused, and nothing is touched
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(StoreError, match="key"):
        TeacherStoreWriter(url, key="other", manifest=manifest_sections(), k=4, vocab_size=1000)
    with pytest.raises(StoreError, match="fields|k"):
        TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000)
    assert (tmp_path / "s" / "manifest.json").read_text() == before


def test_not_a_store_and_newer_version(tmp_path):
    with pytest.raises(StoreError, match="not a cdm store"):
        TeacherStore(str(tmp_path))
    url = str(tmp_path / "s")
    write_store(url, [random_sequence(np.random.default_rng(3), 0)])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="newer"):
        TeacherStore(url)
    m["version"], m["format"] = 1, "something-else"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="something-else"):
        TeacherStore(url)


def test_corruption_is_detected(tmp_path):
    url = str(tmp_path / "s")
    write_store(url, [random_sequence(np.random.default_rng(4), i, n=30) for i in range(4)], chunk_rows=16)
    chunk = next(p for p in sorted((tmp_path / "s" / "shard-00000" / "tokens" / "topk_values").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))  # same size: only the digest can tell
    report = verify_store(url)
    assert not report.ok and "digest" in report.problems[0] and "shard-00000" in report.problems[0]
    with pytest.raises(StoreError, match="digest"):
        TeacherStore(url, check="digest")
    chunk.write_bytes(bytes(data[:-3]))  # truncated: even the cheap open-time check sees it
    with pytest.raises(StoreError, match="size changed"):
        TeacherStore(url)
    r = subprocess.run([sys.executable, "-m", "cdm.cli", "verify", url], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "shard-00000" in r.stderr


def test_verify_names_sequence_and_field(tmp_path):
    """A store whose values break an invariant (written around the writer's checks) is caught by verify."""
    url = str(tmp_path / "s")
    seqs = [random_sequence(np.random.default_rng(5), i) for i in range(3)]
    seqs[1].entropy = seqs[1].entropy + 100.0
    write_store(url, seqs)
    report = verify_store(url)
    assert not report.ok
    assert any("sequence 1" in p and "entropy" in p for p in report.problems)


def _write_shard(url: str, shard: int, n: int) -> None:
    rng = np.random.default_rng(7)
    seqs = [random_sequence(rng, i) for i in range(n)]
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, num_shards=2, shard_index=shard, chunk_rows=32)
    for s in seqs:
        if s.source_index % 2 == shard:
            w.add(s)
    w.close()


def test_two_concurrent_writers_make_one_valid_store(tmp_path):
    url = str(tmp_path / "s")
    code = "import sys; from tests.test_storage import _write_shard; _write_shard(sys.argv[1], int(sys.argv[2]), 40)"
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(i)], cwd=ROOT) for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    store = TeacherStore(url, check="digest")
    assert store.is_complete and len(store) == 40
    assert sorted(s.source_index for s in store) == list(range(40))
    info = store_info(url)
    assert info["shards_complete"] == 2 and info["bytes_per_token"] > 0


def test_incomplete_store_refused_unless_allowed(tmp_path):
    url = str(tmp_path / "s")
    rng = np.random.default_rng(8)
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, num_shards=2, shard_index=0)
    w.add(random_sequence(rng, 0))
    w.close()
    with pytest.raises(StoreError, match="1/2 shards"):
        TeacherStore(url)
    assert len(TeacherStore(url, allow_incomplete=True)) == 1


class _TorchView:
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        s = self.store[i]
        return int(s.source_index), int(s.token_ids.sum()), float(s.topk_logprobs.sum())


def test_reader_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    url = str(tmp_path / "s")
    seqs = [random_sequence(np.random.default_rng(9), i) for i in range(12)]
    write_store(url, seqs)
    store = TeacherStore(url)
    _ = store[0]  # handles opened in the parent must not leak into the workers
    dl = torch.utils.data.DataLoader(_TorchView(store), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = sorted(dl, key=lambda x: x[0])
    want = [(s.source_index, int(s.token_ids.sum()), float(TeacherStore(url)[s.source_index].topk_logprobs.sum())) for s in seqs]
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
    np.testing.assert_allclose([c for *_, c in got], [c for *_, c in want])


def test_memory_fsspec_store():
    url = "memory://cdm-test/store1"
    seqs = [random_sequence(np.random.default_rng(10), i) for i in range(6)]
    write_store(url, seqs, num_shards=2, chunk_rows=16)
    store = TeacherStore(url, check="digest")
    for s in seqs:
        assert_sequences_equal(s, store[[x.source_index for x in store].index(s.source_index)])
    assert verify_store(url).ok


def test_resume_keeps_the_compressors_the_store_was_started_with(tmp_path):
    """A shard begun by an older cdm (other Blosc level) resumes after an upgrade: same array layout, so the
    writer adopts the store's recorded compressors instead of refusing or mixing settings; a layout change is refused."""
    import dataclasses

    from cdm.storage import ragged
    from cdm.storage.topk_codec import LosslessTopKCodec

    class OldLevel(LosslessTopKCodec):
        def fields(self, k):
            return {n: dataclasses.replace(s, compressors=(zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),))
                    for n, s in super().fields(k).items()}

    rng = np.random.default_rng(3)
    seqs = [random_sequence(rng, i) for i in range(12)]
    url = str(tmp_path / "s")
    kw = dict(key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16, num_shards=2)
    w = TeacherStoreWriter(url, codec=OldLevel(), **kw)  # shard 0, begun before the upgrade
    for s in seqs[:7]:
        if s.source_index % 2 == 0:
            w.add(s)
    w.commit()
    del w
    old_fields = json.loads((tmp_path / "s" / "manifest.json").read_text())["fields"]
    assert old_fields["topk_ids"]["compressors"][0]["configuration"]["clevel"] == 5

    for shard in (0, 1):  # today's defaults (level 1): shard 0 resumes, shard 1 starts after the upgrade
        w = TeacherStoreWriter(url, shard_index=shard, **kw)
        assert w.done_source_indices == ({0, 2, 4, 6} if shard == 0 else set())
        for s in seqs:
            if s.source_index % 2 == shard and s.source_index not in w.done_source_indices:
                w.add(s)
        w.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["fields"] == old_fields and manifest["complete"]
    for shard in (0, 1):
        arr = zarr.open_array(str(tmp_path / "s" / f"shard-0000{shard}" / "tokens" / "topk_ids"), mode="r")
        blosc = arr.metadata.to_dict()["codecs"][-1]["configuration"]
        assert blosc["clevel"] == 5 and blosc["typesize"] == 4  # the store's level; shuffle bound to int32
    store = TeacherStore(url)
    assert sorted(s.source_index for s in store) == list(range(12))
    for a in store:
        assert_sequences_equal(a, seqs[a.source_index])

    class OtherLayout(LosslessTopKCodec):
        def fields(self, k):
            return {**super().fields(k), "topk_values": ragged.FieldSpec("float16", (k,))}

    with pytest.raises(StoreError, match="fields"):
        TeacherStoreWriter(str(tmp_path / "s"), codec=OtherLayout(), shard_index=0, **kw)

    # a manifest naming a compressor this zarr does not know: a StoreError naming the manifest, not a KeyError
    mpath = tmp_path / "s" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["fields"]["topk_ids"]["compressors"] = [{"name": "nope", "configuration": {}}]
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json: field compressors: .*nope"):
        TeacherStoreWriter(url, shard_index=0, **kw)


def _begin_then_crash(tmp_path, seed: int, n: int, committed: int):
    """A shard with `committed` of `n` random sequences committed, then abandoned without close (a "crash");
    returns (url, writer kwargs, all sequences)."""
    rng = np.random.default_rng(seed)
    seqs = [random_sequence(rng, i, n=int(rng.integers(5, 30))) for i in range(n)]
    kw = dict(key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16, commit_tokens=40)
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, **kw)
    for s in seqs[:committed]:
        w.add(s)
    w.commit()
    del w
    return url, kw, seqs


def test_close_hashes_what_it_wrote_instead_of_reading_the_shard_back(tmp_path, monkeypatch):
    """The shard digest at close uses the sha256 of each chunk taken as it was written (persisted per commit, so a
    resumed writer also knows the chunks of earlier processes): no chunk file is read back, and the digest equals a
    full read-back's."""
    from cdm.storage import ragged
    from cdm.storage.fs import Location

    reads: list[str] = []
    real_sha = Location.sha256
    monkeypatch.setattr(Location, "sha256", lambda self, *parts: reads.append("/".join(parts)) or real_sha(self, *parts))
    url, kw, seqs = _begin_then_crash(tmp_path, seed=8, n=40, committed=25)
    w = TeacherStoreWriter(url, **kw)
    for s in seqs:
        if s.source_index not in w.done_source_indices:
            w.add(s)
    w.close()
    chunk_reads = [r for r in reads if "/c/" in r]
    assert chunk_reads == [], chunk_reads[:5]
    entry = json.loads((tmp_path / "s" / "shards" / "shard-00000.json").read_text())
    reads.clear()
    assert ragged.shard_digest(Location(url), "shard-00000")[0] == entry["digest"]  # readers hash what is on disk
    assert any("/c/" in r for r in reads)
    assert verify_store(url).ok
    assert sorted(s.source_index for s in TeacherStore(url, check="digest")) == list(range(40))


def test_resume_survives_lost_hash_files_and_unknown_state_keys(tmp_path):
    """Chunk hashes are a speed-up: a missing or corrupt hashes file means reading those chunks back at close, not
    a failed resume; a state.json key from a newer cdm is ignored."""
    from cdm.storage.ragged import _is_chunk

    url, kw, seqs = _begin_then_crash(tmp_path, seed=9, n=30, committed=20)
    writing = tmp_path / "s" / "shard-00000" / "_writing"
    state = json.loads((writing / "state.json").read_text())
    assert len(state["hash_parts"]) >= 2
    parts = [set(json.loads((writing / p).read_text())) for p in state["hash_parts"]]
    assert sum(map(len, parts)) == len(set().union(*parts))  # each commit persists only its own new chunks
    (writing / state["hash_parts"][0]).unlink()
    (writing / state["hash_parts"][1]).write_text("{not json")
    state["from_the_future"] = 1
    (writing / "state.json").write_text(json.dumps(state))
    w = TeacherStoreWriter(url, **kw)
    for s in seqs:
        if s.source_index not in w.done_source_indices:
            w.add(s)
    w.close()
    assert verify_store(url).ok
    assert sorted(s.source_index for s in TeacherStore(url, check="digest")) == list(range(30))
    assert _is_chunk("tokens/topk_ids/c/3/0") and not _is_chunk("tokens/c/zarr.json") and not _is_chunk("sequences.parquet")
    assert not _is_chunk("tokens/topk_ids/zarr.json")


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 300), length=st.integers(0, 300), chunk=st.integers(1, 64))
def test_chunk_pieces_tile_the_range_one_chunk_each(start, length, chunk):
    from cdm.storage.ragged import _chunk_pieces

    pieces = _chunk_pieces(start, start + length, chunk)
    covered = [i for a, b in pieces for i in range(a, b)]
    assert covered == list(range(start, start + length))
    for a, b in pieces:
        assert a // chunk == (b - 1) // chunk  # inside one chunk
        assert a % chunk == 0 or a == start  # a piece starts a chunk unless it is the first


def test_writer_hands_zarr_whole_chunks_and_stores_every_chunk(tmp_path, monkeypatch):
    """Each zarr write is one chunk (zarr then stores the value as it is instead of copying it into a fill-value
    buffer), and a chunk equal to the fill value is still stored (no all-equal scan per chunk)."""
    from zarr.core.array import AsyncArray

    from tests.storage_helpers import random_sequence

    chunk = 16
    shapes: list[tuple[int, int]] = []
    real_setitem = AsyncArray.setitem

    async def spy(self, selection, value, prototype=None):
        if isinstance(selection, slice):
            shapes.append((selection.start, selection.stop))
        return await real_setitem(self, selection, value, prototype)

    monkeypatch.setattr(AsyncArray, "setitem", spy)
    rng = np.random.default_rng(3)
    seqs = [random_sequence(rng, i, n=20 if i == 0 else int(rng.integers(5, 30))) for i in range(12)]
    zero = seqs[0]  # an all-zero chunk: token ids, spans and sequence ids of zeros
    zero.token_ids[:] = 0
    zero.char_spans[:] = 0
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=chunk,
                           commit_tokens=70)
    for s in seqs:
        w.add(s)
    w.close()
    assert shapes and all(a // chunk == (b - 1) // chunk for a, b in shapes), shapes
    n_tokens = sum(s.n_tokens for s in seqs)
    g = zarr.open_group(str(tmp_path / "s" / "shard-00000" / "tokens"), mode="r")
    for name in ("token_ids", "char_spans"):
        stored = sorted(p.name for p in (tmp_path / "s" / "shard-00000" / "tokens" / name / "c").iterdir())
        assert stored == [str(i) for i in sorted(range(-(-n_tokens // chunk)), key=str)], (name, stored)
        assert g[name].shape[0] == n_tokens
    got = {s.source_index: s for s in TeacherStore(url, check="digest")}
    for s in seqs:
        assert_sequences_equal(s, got[s.source_index])


def test_writer_names_the_sequence_of_bad_top_k_rows(tmp_path):
    """Unsorted, NaN and -inf top-k log-probs are refused before anything is buffered, naming the sequence."""
    rng = np.random.default_rng(5)
    url = str(tmp_path / "s")
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=4, vocab_size=1000)
    cases = {"not sorted": lambda lp: lp[1, ::-1], "is nan": lambda lp: np.nan, "finite and <= 0": lambda lp: -np.inf}
    for i, (message, poison) in enumerate(cases.items()):
        s = random_sequence(rng, i, k=4, n=5)
        s.topk_logprobs = s.topk_logprobs.copy()
        if message == "not sorted":
            s.topk_logprobs[1] = poison(s.topk_logprobs)
        else:
            s.topk_logprobs[2, 3] = poison(s.topk_logprobs)
        with pytest.raises(StoreError, match=rf"sequence s{i:06d}: .*{message}"):
            w.add(s)
    s = random_sequence(rng, 7, k=4, n=5)
    s.topk_ids = s.topk_ids.copy()
    s.topk_ids[0, 0] = -1
    with pytest.raises(StoreError, match="outside"):
        w.add(s)
    w.close()
    assert len(TeacherStore(url)) == 0


@pytest.mark.parametrize("where", ["local", "memory"])
def test_read_many_keeps_order_across_batches_and_reports_missing_files(tmp_path, where):
    from cdm.storage.fs import Location

    loc = Location(str(tmp_path / "d[1]") if where == "local" else f"memory://read-many-{os.getpid()}[1]")  # no globbing
    names = [f"f{i:03d}" for i in range(11)]
    for i, n in enumerate(names):
        loc.write_bytes(bytes([i]) * (i + 1), "sub", n)
    got = list(loc.read_many([("sub", n) for n in names], batch=4))
    assert got == [bytes([i]) * (i + 1) for i in range(11)]
    with_missing = list(loc.read_many([("sub", "f001"), ("sub", "nope"), ("sub", "f002")], missing_ok=True, batch=2))
    assert with_missing == [b"\x01\x01", None, b"\x02\x02\x02"]
    with pytest.raises(FileNotFoundError):
        list(loc.read_many([("sub", "f001"), ("sub", "nope")], batch=2))
    assert list(loc.read_many([])) == []


def test_fields_rows_reads_what_each_field_holds(tmp_path):
    """The concurrent multi-field read returns, for any row range across chunk boundaries, each field's rows."""
    from cdm.storage.ragged import RaggedStoreReader

    rng = np.random.default_rng(9)
    url = str(tmp_path / "s")
    write_store(url, [random_sequence(rng, i, n=int(rng.integers(5, 30))) for i in range(20)], chunk_rows=16)
    store = TeacherStore(url)
    reader: RaggedStoreReader = store.reader
    g = zarr.open_group(str(tmp_path / "s" / "shard-00000" / "tokens"), mode="r")
    n = g["token_ids"].shape[0]
    for a, b in [(0, n), (3, 40), (16, 32), (15, 17), (n - 1, n), (5, 5)]:
        got = reader.fields_rows(0, reader.field_names, a, b)
        assert list(got) == reader.field_names
        for name in reader.field_names:
            np.testing.assert_array_equal(got[name], g[name][a:b])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), max_run=st.integers(1, 9))
def test_range_reads_equal_sequence_by_sequence_reads(tmp_path_factory, seed, max_run):
    """`sequences(indices)` (runs read as ranges, across shard boundaries, with gaps and repeats) and iteration give
    exactly what `store[i]` gives."""
    rng = np.random.default_rng(seed)
    url = str(tmp_path_factory.mktemp("store") / "s")
    write_store(url, [random_sequence(rng, i, n=int(rng.integers(1, 30))) for i in range(17)], num_shards=3, chunk_rows=16)
    store = TeacherStore(url)
    indices = [int(i) for i in rng.integers(0, len(store), size=25)] + list(range(4, 12))
    got = list(store.sequences(indices, max_run=max_run))
    assert len(got) == len(indices)
    for i, s in zip(indices, got):
        assert_sequences_equal(store[i], s, values_atol=0.0)
    for i, s in enumerate(store):
        assert_sequences_equal(store[i], s, values_atol=0.0)


def test_iterated_sequences_own_their_arrays_and_runs_are_bounded_by_rows(tmp_path, monkeypatch):
    """A sequence kept from iteration holds no view into the range it was read with, and a run stops at about
    `max_rows` tokens (what one range read holds in memory)."""
    from cdm.storage.ragged import RaggedStoreReader

    rng = np.random.default_rng(10)
    url = str(tmp_path / "s")
    write_store(url, [random_sequence(rng, i, n=20) for i in range(12)], chunk_rows=16)
    store = TeacherStore(url)
    for s in store:
        for name in ("token_ids", "char_spans", "logsumexp", "entropy", "topk_ids", "topk_logprobs"):
            a = getattr(s, name)
            assert a.base is None or a.base.nbytes <= a.nbytes, name
    ranges: list[tuple[int, int]] = []
    real = RaggedStoreReader.read_range
    monkeypatch.setattr(RaggedStoreReader, "read_range",
                        lambda self, a, b, *r, **k: ranges.append((a, b)) or real(self, a, b, *r, **k))
    assert len(list(store.sequences(range(12), max_rows=50))) == 12
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 12)]  # 20-token sequences: a run closes once it holds >= 50 rows


def test_every_deliberate_error_shares_one_base():
    """`except cdm.CdmError` catches each stage's own errors, which keep their builtin bases for old callers."""
    import cdm
    from cdm.assets import AssetMissing
    from cdm.mapping import TokenizerError
    from cdm.precompute import DataError as PrecomputeDataError
    from cdm.precompute import OffsetsUnavailable, TeacherError
    from cdm.storage import StoreError as SE
    from cdm.train import ConfigError, DataError, TrainingDiverged

    for cls, builtin in ((SE, Exception), (DataError, SE), (ConfigError, ValueError), (TrainingDiverged, RuntimeError),
                         (PrecomputeDataError, ValueError), (TeacherError, ValueError), (TokenizerError, ValueError),
                         (OffsetsUnavailable, TypeError), (AssetMissing, RuntimeError)):
        assert issubclass(cls, cdm.CdmError) and issubclass(cls, builtin), cls
    # option values: one class over the three stages, still a ValueError for callers that caught that
    from cdm.mapping.build import check_build_args
    from cdm.precompute import resolve_shard
    from cdm.train import LoaderConfig

    assert issubclass(ConfigError, cdm.OptionError) and issubclass(cdm.OptionError, ValueError)
    for bad in (lambda: resolve_shard(2, None, {}), lambda: check_build_args("offsets", 2.0, None, 1),
                lambda: LoaderConfig(batch_size=0)):
        with pytest.raises(cdm.OptionError):
            bad()
