"""The training loader: planning (shuffle, buckets, budgets), partitioning across ranks/workers, resumable
positions, and the sparse targets against a slow per-position reference read straight from the stores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.mapping.store import MapStore
from cdm.storage import TeacherStore
from cdm.train import data as D
from tests.test_train_support import build


# ------------------------------------------------------------------ pure planning


def test_pack_sorted_hand_worked():
    lens = np.array([3, 5, 8, 9, 16, 17])
    # budget 32 padded tokens, pad to 8: [3,5,8] -> 3*8=24; adding 9 (pads to 16) -> 4*16=64 > 32
    got = D.pack_sorted(lens, batch_size=8, max_tokens=32, pad_multiple=8)
    assert [(s.start, s.stop) for s in got] == [(0, 3), (3, 5), (5, 6)]
    got = D.pack_sorted(lens, batch_size=2, max_tokens=None, pad_multiple=1)
    assert [(s.start, s.stop) for s in got] == [(0, 2), (2, 4), (4, 6)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=50), st.integers(1, 6), st.sampled_from([None, 64, 100]),
       st.sampled_from([1, 8]))
def test_pack_sorted_respects_budgets_and_covers_everything(lens, bs, budget, pad):
    lens = np.sort(np.array(lens))
    slices = D.pack_sorted(lens, bs, budget, pad)
    covered = np.concatenate([np.arange(s.start, s.stop) for s in slices])
    np.testing.assert_array_equal(covered, np.arange(len(lens)))
    for s in slices:
        n = s.stop - s.start
        assert 1 <= n <= bs
        if budget is not None and n > 1:
            assert D._round_up(int(lens[s.stop - 1]), pad) * n <= budget


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 80), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3), st.integers(0, 2))
def test_epoch_plan_is_a_deterministic_permutation(n, block, window, seed, epoch):
    rng = np.random.default_rng(n)
    lengths = rng.integers(2, 50, size=n)
    shard = np.repeat(np.arange(3), int(np.ceil(n / 3)))[:n]
    cfg = D.LoaderConfig(batch_size=3, max_tokens=160, max_length=40, block_size=block, window_blocks=window, seed=seed)
    blocks = D.make_blocks(np.arange(n), shard, block)
    assert all(len(np.unique(shard[b])) == 1 and len(b) <= block for b in blocks)
    plan = D.epoch_plan(blocks, lengths, cfg, epoch)
    seen = np.concatenate([b for w in plan for b in w.batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # every sequence once per epoch
    for w in plan:
        members = np.concatenate([blocks[i] for i in w.blocks])
        assert set(np.concatenate(w.batches).tolist()) == set(members.tolist())  # a window only uses its blocks
        for b in w.batches:
            t = D._round_up(int(np.minimum(lengths[b], 40).max()), 8)
            assert len(b) <= 3 and (len(b) == 1 or t * len(b) <= 160)
    again = D.epoch_plan(blocks, lengths, cfg, epoch)
    assert all(np.array_equal(a, b) for wa, wb in zip(plan, again) for a, b in zip(wa.batches, wb.batches))


def test_epochs_shuffle_differently_and_stream_locates_positions():
    n = 40
    lengths = np.arange(n) % 7 + 2
    cfg = D.LoaderConfig(batch_size=2, block_size=4, window_blocks=2, seed=3)
    blocks = D.make_blocks(np.arange(n), np.zeros(n, np.int64), 4)
    e0 = [b.tolist() for w in D.epoch_plan(blocks, lengths, cfg, 0) for b in w.batches]
    e1 = [b.tolist() for w in D.epoch_plan(blocks, lengths, cfg, 1) for b in w.batches]
    assert e0 != e1
    ps = D.PlanStream(blocks, lengths, cfg)
    assert ps.locate(0) == (0, 0)
    assert ps.locate(len(e0)) == (1, 0)
    assert ps.locate(len(e0) + 3) == (1, 3)


def test_heldout_mask_is_evenly_spaced_teacher_indices():
    ti = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9])  # teacher sequence 4 was skipped by the map
    m = D.heldout_mask(ti, 10, 2)  # chosen teacher indices: floor(2.5)=2, floor(7.5)=7
    assert ti[m].tolist() == [2, 7]
    assert not D.heldout_mask(ti, 10, 0).any()


# ------------------------------------------------------------------ targets


def test_predicted_bytes_hand_worked():
    text = "ab数学c"  # bytes 1,1,3,3,1
    cb = D.utf8_prefix_bytes(text)
    assert cb.tolist() == [0, 1, 2, 5, 8, 9]
    # tokens: "a"(0,1) "b"(1,2) byte pieces of 数 (2,3)(2,3) "学c"(3,5)
    spans = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [3, 5]])
    # labelled positions j predict token j+1: all labelled -> bytes of text[1:] = 1+3+3+1 = 8
    assert D.predicted_bytes(spans, np.ones(5, bool), cb) == 8
    # only the prediction of the second byte piece (position 2 -> token 3): nothing new (0 bytes)
    assert D.predicted_bytes(spans, np.array([0, 0, 1, 0, 0], bool), cb) == 0
    assert D.predicted_bytes(spans, np.array([0, 1, 0, 0, 0], bool), cb) == 3


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=30), st.data())
def test_predicted_bytes_matches_slow_reference(text, data):
    n = data.draw(st.integers(1, 12))
    ends = sorted(data.draw(st.lists(st.integers(0, len(text)), min_size=n, max_size=n)))
    starts = [max(0, e - data.draw(st.integers(0, 3))) for e in ends]
    spans = np.array(list(zip(starts, ends)))
    lab = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    want, run_end = 0, ends[0]
    for j in range(n - 1):
        new_end = max(run_end, ends[j + 1])
        if lab[j]:
            want += len(text[run_end:new_end].encode("utf-8", "surrogatepass"))
        run_end = new_end
    assert D.predicted_bytes(spans, lab, D.utf8_prefix_bytes(text)) == want


def test_build_example_hand_worked():
    m = {
        "student_ids": np.array([10, 11, 12, 13, 14]),
        "student_spans": np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]),
        "teacher_row": np.array([-1, 0, -1, 2, 3]),
        "align_kind": np.array([0, 1, 0, 2, 1], np.int8),
        "loss_mask": np.array([0, 0, 1, 1, 1], bool),
    }
    t_ids = np.arange(4 * 3).reshape(4, 3)
    t_lp = -np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    t_tok = np.array([7, 8, 9, 6])
    cfg = D.LoaderConfig(max_length=4, kd_topk=2)
    ex = D.build_example(0, "q", m, t_ids, t_lp, t_tok, "abcde", cfg)
    assert ex.input_ids.tolist() == [10, 11, 12, 13]
    assert ex.labels.tolist() == [-100, 12, 13, 14]  # label at 3 is token 4 (kept although cut off)
    assert ex.kd_pos.tolist() == [1, 3]
    assert ex.kd_ids.tolist() == [[0, 1], [6, 7]]
    assert ex.kd_next.tolist() == [8, 6]  # teacher token after rows 0 and 2
    assert ex.kd_kind.tolist() == [1, 2]
    assert ex.n_bytes == 3  # "c", "d", "e"


def _slow_targets(tstore: TeacherStore, mstore: MapStore, i: int, max_length: int):
    m = mstore[i]
    t = tstore[m.teacher_index]
    L = min(len(m.student_ids), max_length)
    labels, kd = [], []
    for j in range(L):
        ok = j + 1 < len(m.student_ids) and m.loss_mask[j + 1]
        labels.append(int(m.student_ids[j + 1]) if ok else -100)
        if m.teacher_row[j] >= 0:
            kd.append((j, t.topk_ids[m.teacher_row[j]], t.topk_logprobs[m.teacher_row[j]]))
    return m, labels, kd


def test_batches_match_the_slow_reference(tmp_path):
    p = build(tmp_path, n_docs=12, num_shards=2)
    cfg = D.LoaderConfig(batch_size=3, block_size=3, window_blocks=2, max_length=48, seed=5)
    stores = D.StoreSet(p["store"], p["map"])
    src = D.Sources(stores, cfg)
    blocks = D.make_blocks(np.arange(len(src.table.length)), src.table.shard, cfg.block_size)
    plan = D.PlanStream(blocks, src.table.length, cfg)
    stream = D.TrainStream(src, plan, D.block_index(blocks, len(src.table.length)), 0, stop=plan.epoch_size(0))
    ts, ms = TeacherStore(p["store"]), MapStore(p["map"])
    seen = []
    for b in stream:
        assert b.kd_ids.dim() == 2 and b.kd_ids.shape[1] == 8  # sparse [R, K], never [B, T, V]
        T = b.input_ids.shape[1]
        assert T % cfg.pad_multiple == 0
        rows = {int(x): r for r, x in enumerate(b.kd_pos.tolist())}
        for bi, sid in enumerate(b.seq_ids):
            i = b.map_indices[bi]
            assert ms[i].seq_id == sid
            seen.append(i)
            m, labels, kd = _slow_targets(ts, ms, i, cfg.max_length)
            L = len(labels)
            assert b.input_ids[bi, :L].tolist() == m.student_ids[:L].tolist()
            assert b.labels[bi, :L].tolist() == labels and (b.labels[bi, L:] == -100).all()
            assert b.attention_mask[bi].sum() == L
            for j, ids, lps in kd:
                r = rows.pop(bi * T + j)
                assert b.kd_ids[r].tolist() == ids.tolist()
                np.testing.assert_array_equal(b.kd_logprobs[r].numpy(), lps)
        assert not rows
    assert sorted(seen) == list(range(12))


def _stream_ids(src, plan, blocks, start, rank, world, workers, stop):
    stream = D.TrainStream(src, plan, D.block_index(blocks, len(src.table.length)), start, rank, world, stop=stop)
    return [(b.position, tuple(b.seq_ids)) for b in D.make_loader(stream, num_workers=workers)]


def test_ranks_and_workers_partition_the_stream_and_resume_exactly(tmp_path):
    p = build(tmp_path, n_docs=20)
    cfg = D.LoaderConfig(batch_size=2, block_size=3, window_blocks=2, seed=1)
    src = D.Sources(D.StoreSet(p["store"], p["map"]), cfg)
    blocks = D.make_blocks(np.arange(20), src.table.shard, 3)
    plan = D.PlanStream(blocks, src.table.length, cfg)
    stop = plan.epoch_size(0) + 5  # into the second epoch
    full = _stream_ids(src, plan, blocks, 0, 0, 1, 0, stop)
    assert [pos for pos, _ in full] == list(range(stop))
    for world, workers in ((2, 0), (3, 2)):
        parts = [_stream_ids(src, plan, blocks, 0, r, world, workers, stop) for r in range(world)]
        for r, part in enumerate(parts):
            assert [pos % world for pos, _ in part] == [r] * len(part)
        assert sorted(x for part in parts for x in part) == full
    tail = _stream_ids(src, plan, blocks, 7, 0, 1, 2, stop)
    assert tail == full[7:]


def test_fsspec_memory_store_reads_like_local(tmp_path):
    import fsspec

    p = build(tmp_path, n_docs=6)
    mem = fsspec.filesystem("memory")
    for name in ("store", "map"):
        mem.put(p[name], f"/train-test/{name}", recursive=True)
    cfg = D.LoaderConfig(batch_size=6, block_size=6)
    local = D.Sources(D.StoreSet(p["store"], p["map"]), cfg).read(np.arange(6))
    remote = D.Sources(D.StoreSet("memory://train-test/store", "memory://train-test/map"), cfg).read(np.arange(6))
    for i in range(6):
        assert local[i].labels.tolist() == remote[i].labels.tolist()
        np.testing.assert_array_equal(local[i].kd_logprobs, remote[i].kd_logprobs)


def test_map_from_another_text_is_refused(tmp_path):
    a = build(tmp_path / "a", n_docs=4)
    from tests.test_train_support import bpe, texts, write_teacher

    other = str(tmp_path / "other")
    write_teacher(other, bpe(420), [t[::-1] for t in texts(4)])  # same key, other texts
    src = D.Sources(D.StoreSet(other, a["map"]), D.LoaderConfig())
    with pytest.raises(D.DataError, match="text hash differs"):
        src.read(np.arange(4))


def test_dual_targets_and_tokenisation_check(tmp_path):
    p = build(tmp_path, n_docs=4, dual=True)
    cfg = D.LoaderConfig(dual=True)
    ex = D.Sources(D.StoreSet(p["store"], p["map"], p["dual"]), cfg).read(np.arange(4))
    dual = TeacherStore(p["dual"])
    for i, e in ex.items():
        np.testing.assert_array_equal(e.dual_pos, np.flatnonzero(e.labels != -100))
        np.testing.assert_array_equal(e.dual_ids, dual[i].topk_ids[e.dual_pos])
    # a dual store tokenised with another tokenizer is refused, naming the sequence
    from tests.test_train_support import bpe, texts, write_teacher

    bad = str(tmp_path / "bad")
    write_teacher(bad, bpe(420), texts(4), key="dkey")
    with pytest.raises(D.DataError, match="tokenised it differently"):
        D.Sources(D.StoreSet(p["store"], p["map"], bad), cfg).read(np.arange(4))
