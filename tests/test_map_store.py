"""Map store: round trip of sequences and vocabulary maps, pair checks, CSR pair keys."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.mapping.store import CSR, MapSequence, MapStore, MapStoreWriter, VocabMaps
from cdm.storage import StoreError
from cdm.storage.fs import Location


def _maps(rng, vt=50, vs=40) -> VocabMaps:
    def csr(vsrc, vdst):
        counts = rng.integers(0, 3, size=vsrc)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return CSR(indptr, rng.integers(0, vdst, size=indptr[-1]).astype(np.int32), rng.random(indptr[-1]).astype(np.float32) * 0.3)

    return VocabMaps(
        teacher_vocab_size=vt, student_vocab_size=vs,
        em_t2s=rng.integers(-1, vs, size=vt).astype(np.int32), em_s2t=rng.integers(-1, vt, size=vs).astype(np.int32),
        fuzzy_t2s=csr(vt, vs), fuzzy_s2t=csr(vs, vt),
        mined_t2s=rng.integers(0, vs, size=vt).astype(np.int32), mined_s2t=rng.integers(0, vt, size=vs).astype(np.int32),
        theta=0.3, info={"rule": "test"},
    )


def test_map_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    url = str(tmp_path / "map")
    seqs = []
    for i in range(7):
        m = int(rng.integers(1, 30))
        seqs.append(MapSequence(
            seq_id=f"q{i}", teacher_index=i, text_sha256="x" * 64, n_teacher_tokens=40,
            student_ids=rng.integers(0, 40, m).astype(np.int32), student_spans=np.zeros((m, 2), np.int32),
            teacher_row=rng.integers(-1, 40, m).astype(np.int32), align_kind=rng.integers(0, 5, m).astype(np.int8),
            loss_mask=rng.random(m) < 0.5,
        ))
    manifest = {"teacher_store": {"key": "tkey"}, "student": {"tokenizer_hash": "abc"}}
    w = MapStoreWriter(url, key="mkey", manifest=manifest, chunk_rows=16, commit_tokens=20)
    for s in seqs:
        w.add(s)
    maps = _maps(rng)
    maps.save(w.loc, "vocab")
    w.close()
    store = MapStore(url, check="digest")
    assert len(store) == 7
    for i, (a, b) in enumerate(zip(seqs, store)):  # iteration reads ranges; store[i] one sequence
        for got in (b, store[i]):
            assert a.seq_id == got.seq_id and a.teacher_index == got.teacher_index
            for f in ("student_ids", "student_spans", "teacher_row", "align_kind", "loss_mask"):
                np.testing.assert_array_equal(getattr(a, f), getattr(got, f))
    v = store.vocab
    np.testing.assert_array_equal(v.em_t2s, maps.em_t2s)
    np.testing.assert_array_equal(v.fuzzy_s2t.indices, maps.fuzzy_s2t.indices)
    assert v.theta == 0.3 and v.info == {"rule": "test"}
    store.check_pair({"key": "tkey"}, "abc")
    with pytest.raises(StoreError, match="teacher store"):
        store.check_pair({"key": "other"}, "abc")
    with pytest.raises(StoreError, match="tokenizer"):
        store.check_pair({"key": "tkey"}, "zzz")


def test_teacher_row_bounds_refused(tmp_path):
    w = MapStoreWriter(str(tmp_path / "m"), key="k", manifest={})
    with pytest.raises(StoreError, match="teacher_row"):
        w.add(MapSequence("q", 0, "", np.zeros(2, np.int32), np.zeros((2, 2), np.int32), np.array([0, 5], np.int32),
                          np.zeros(2, np.int8), np.ones(2, bool), n_teacher_tokens=3))


def test_csr_pair_keys_lookup():
    rng = np.random.default_rng(1)
    csr = _maps(rng).fuzzy_t2s
    keys, dist = csr.pair_keys(40)
    assert np.all(np.diff(keys) >= 0)
    for r in range(len(csr.indptr) - 1):
        idx, d = csr.row(r)
        for j, dd in zip(idx, d):
            pos = np.searchsorted(keys, r * 40 + j)
            assert keys[pos] == r * 40 + j
