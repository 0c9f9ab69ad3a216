"""Top-k / log-sum-exp / entropy extraction: hand vectors, float64 references, ties, chunking, bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.precompute import topk as topk_mod
from cdm.precompute.topk import entropy_lower_bound, rows_per_chunk, topk_stats, topk_stats_async

IMPLS = ["eager", "compiled"]


def _exact_fix(x, rows, k, lse):
    """Tie fix-up for a single chunk `x`: exact ids and log-probs of `rows`."""
    from cdm.precompute import topk as T

    vals, ids = T._exact_topk(x[rows].float(), k)
    return ids, vals - lse[rows, None]


def reference(logits: np.ndarray, k: int):
    """float64 full softmax; top-k ordered by (log-prob desc, id asc)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    lp = x - lse[:, None]
    p = np.exp(lp)
    ent = -np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[1]), x.shape), -lp), axis=-1)[:, :k]
    return order, np.take_along_axis(lp, order, -1), lse, ent, lp


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_vector(impl):
    # logits [0, ln 2, ln 2, -inf]: p = [1/5, 2/5, 2/5, 0]
    x = torch.tensor([[0.0, math.log(2), math.log(2), -math.inf]])
    r = topk_stats(x, 3, impl=impl)
    assert r.ids.tolist() == [[1, 2, 0]]  # the tie 1/2 broken by id
    np.testing.assert_allclose(r.logprobs[0].numpy(), np.log([0.4, 0.4, 0.2]), atol=1e-6)
    assert r.logsumexp.item() == pytest.approx(math.log(5), abs=1e-6)
    h = -(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4))
    assert r.entropy.item() == pytest.approx(h, abs=1e-6)
    assert r.ids.dtype == torch.int32 and r.logprobs.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), v=st.integers(2, 300), k=st.integers(1, 300),
       scale=st.sampled_from([0.1, 3.0, 30.0]), budget=st.sampled_from([1, 4096, 2**20]),
       impl=st.sampled_from(IMPLS), neg_inf=st.booleans())
def test_matches_float64_reference(seed, n, v, k, scale, budget, impl, neg_inf):
    k = min(k, v)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * scale).astype(np.float32)
    if neg_inf and v > k:  # masked-out vocabulary entries (-inf logits) contribute nothing, never NaN
        x[:, rng.choice(v, size=v - k, replace=False)[: max(1, (v - k) // 2)]] = -np.inf
    r = topk_stats(torch.from_numpy(x), k, memory_budget=budget, impl=impl)
    ids, lp, lse, ent, full = reference(x, k)
    np.testing.assert_allclose(r.logprobs.numpy(), lp, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(r.logsumexp.numpy(), lse, atol=2e-5, rtol=1e-6)
    np.testing.assert_allclose(r.entropy.numpy(), ent, atol=5e-5, rtol=1e-4)
    got = r.ids.numpy().astype(np.int64)
    assert np.all(np.diff(r.logprobs.numpy(), axis=-1) <= 0)
    # the chosen ids are a top-k in float64 up to fp32 rounding, each id once
    chosen = np.take_along_axis(full, got, -1)
    mask = np.ones_like(full, dtype=bool)
    np.put_along_axis(mask, got, False, -1)
    rest = np.where(mask, full, -np.inf).max(-1)
    assert np.all(chosen.min(-1) >= rest - 1e-5) and np.all(np.isfinite(r.entropy.numpy()))
    assert all(len(set(row)) == k for row in got.tolist())
    # away from near-ties the ids equal the reference exactly
    srt = np.sort(np.where(np.isfinite(full), full, -1e30), -1)
    exact = np.abs(np.diff(srt, axis=-1)).min(-1) > 1e-4 if v > 1 else np.ones(n, bool)
    np.testing.assert_array_equal(got[exact], ids[exact])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), v=st.integers(2, 300), k=st.integers(1, 60),
       levels=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]), impl=st.sampled_from(IMPLS))
def test_ties_are_ordered_by_id_including_the_kth_place(seed, n, v, k, levels, dtype, impl):
    k = min(k, v)
    x = np.random.default_rng(seed).integers(0, levels, size=(n, v)).astype(np.float32)
    r = topk_stats(torch.from_numpy(x).to(dtype), k, impl=impl)  # bf16: tie groups larger than the fetched margin
    ids, *_ = reference(x, k)
    np.testing.assert_array_equal(r.ids.numpy(), ids)


def test_chunking_and_producer_give_identical_results():
    x = torch.randn(37, 501) * 4
    whole = topk_stats(x, 16)
    calls = []

    def produce(a, b):
        calls.append((a, b))
        return x[a:b]

    budget = 4 * 501 * 5  # five rows per chunk
    chunked = topk_stats(produce, 16, n_rows=37, vocab_size=501, memory_budget=budget)
    assert rows_per_chunk(501, budget) == 5 and max(b - a for a, b in calls) == 5 and calls[-1][1] == 37
    for f in ("ids", "logprobs", "logsumexp", "entropy"):
        assert torch.equal(getattr(whole, f), getattr(chunked, f)), f


def test_bf16_logits_and_empty_input():
    x = (torch.randn(5, 300) * 5).to(torch.bfloat16)
    r = topk_stats(x, 8)
    ids, lp, lse, ent, _ = reference(x.float().numpy(), 8)
    np.testing.assert_array_equal(r.ids.numpy(), ids)  # bf16 ties resolved exactly like the reference
    np.testing.assert_allclose(r.logprobs.numpy(), lp, atol=2e-5)
    e = topk_stats(torch.empty(0, 300), 8)
    assert e.ids.shape == (0, 8) and e.entropy.shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_are_named(impl):
    with pytest.raises(FloatingPointError, match="row 1"):
        topk_stats(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1, impl=impl)
    with pytest.raises(FloatingPointError, match="row 0"):
        topk_stats(torch.full((1, 3), -math.inf), 1, impl=impl)
    with pytest.raises(FloatingPointError, match="row 2"):
        topk_stats(torch.tensor([[0.0, 1.0], [2.0, 0.0], [math.inf, 0.0]]), 1, impl=impl)
    with pytest.raises(ValueError, match="top-k"):
        topk_stats(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="2-D"):
        topk_stats(torch.zeros(3), 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 400), k=st.integers(1, 400), scale=st.sampled_from([0.5, 5.0, 50.0]))
def test_entropy_lower_bound_brackets_exact(seed, v, k, scale):
    k = min(k, v)
    x = (np.random.default_rng(seed).standard_normal((4, v)) * scale).astype(np.float32)
    _, lp, _, ent, _ = reference(x, k)  # float64 top-k log-probs and exact entropy
    lower = entropy_lower_bound(torch.from_numpy(lp)).double().numpy()
    p = np.exp(lp)
    tail = np.clip(1 - p.sum(-1), 0, None)
    upper = -(p * lp).sum(-1) - np.where(tail > 0, tail * np.log(np.maximum(tail, 1e-300) / max(v - k, 1)), 0)
    tol = 1e-6 * (1 + np.abs(ent))
    assert np.all(lower <= ent + tol) and np.all(ent <= upper + tol)
    if k == v:
        np.testing.assert_allclose(lower, ent, atol=1e-5, rtol=1e-5)
    # on fp32 top-k from the extractor the estimate stays close to the float64 one
    r = topk_stats(torch.from_numpy(x), k)
    np.testing.assert_allclose(entropy_lower_bound(r.logprobs).numpy(), lower, atol=1e-3 * (1 + scale / 5), rtol=1e-3)


def test_compiled_path_is_used_and_matches_eager():
    """The fused compiled statistics run on this machine (a C++ compiler is part of the supported setup) and
    agree with the eager two-temporary path on fp32 and bf16 logits, including -inf entries."""
    x = torch.randn(300, 2000) * 6
    x[::7, :300] = -math.inf
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-4)):
        xd = x.to(dtype)
        c = topk_stats(xd, 32, impl="compiled", memory_budget=4 * 2000 * 64)
        assert topk_mod.compiled_stats.failed is None, topk_mod.compiled_stats.failed
        e = topk_stats(xd, 32, impl="eager", memory_budget=4 * 2000 * 64)
        assert torch.equal(c.ids, e.ids)
        for f in ("logprobs", "logsumexp", "entropy"):
            torch.testing.assert_close(getattr(c, f), getattr(e, f), atol=tol, rtol=tol)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    stats = topk_mod._CompiledStats()
    monkeypatch.setattr(topk_mod, "compiled_stats", stats)

    def broken(*a, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(9, 50) * 3
    with caplog.at_level("WARNING", logger="cdm.precompute.topk"):
        r = topk_stats(x, 5, impl="compiled")
    assert stats.failed and "no compiler here" in stats.failed and "eager path" in caplog.text
    ref = topk_stats(x, 5, impl="eager")
    assert torch.equal(r.ids, ref.ids) and torch.equal(r.entropy, ref.entropy)
    monkeypatch.setenv("CDM_TOPK_EAGER", "1")
    assert topk_mod.resolve_stats_impl("auto") == "eager"
    with pytest.raises(ValueError, match="stats implementation"):
        topk_mod.resolve_stats_impl("fast")


def test_async_tie_fixups_recompute_whole_chunks():
    """bf16 rows whose tie group at the k-th place runs past the fetched margin are fixed after the fact from
    the producer, which is asked again for exactly the chunk it produced before (bitwise the same logits)."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.integers(0, 2, size=(23, 400)).astype(np.float32)).to(torch.bfloat16)
    x[5] = torch.arange(400, dtype=torch.float32).to(torch.bfloat16)  # a row without ties
    calls = []

    def produce(a, b):
        calls.append((a, b))
        return x[a:b]

    pending = topk_stats_async(produce, 4, n_rows=23, vocab_size=400, memory_budget=4 * 400 * 6)
    first = list(calls)
    r = pending.resolve()
    assert first == [(0, 6), (6, 12), (12, 18), (18, 23)]
    again = calls[len(first):]
    assert again and set(again) <= set(first) and len(again) == len(set(again))  # whole chunks, each at most once
    ids, lp, *_ = reference(x.float().numpy(), 4)
    np.testing.assert_array_equal(r.ids.numpy(), ids)
    np.testing.assert_allclose(r.logprobs.numpy(), lp, atol=5e-5)  # fp32 sums of logits up to 400


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), v=st.integers(2, 3000), k=st.integers(1, 80),
       levels=st.sampled_from([2, 5, 0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       select=st.sampled_from(sorted(topk_mod.SELECTORS)))
def test_every_selector_gives_the_reference_topk(seed, n, v, k, levels, dtype, select):
    """Each exact top-k selection (one topk, or block maxima then topk on the candidate blocks) gives the float64
    reference ids, with ties (few levels) and without (levels=0: continuous values), partial last blocks included."""
    k = min(k, v)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, size=(n, v)).astype(np.float32) if levels else rng.standard_normal((n, v)).astype(np.float32) * 4
    x = torch.from_numpy(x).to(dtype)
    kk = k + topk_mod._margin(dtype, k, v)
    vals, sel_ids = topk_mod.SELECTORS[select](x, kk)
    assert torch.equal(x.gather(1, sel_ids), vals) and all(len(set(r)) == kk for r in sel_ids.tolist())
    res, overflow = topk_mod._topk_chunk(x, k, "eager", select)
    r = topk_mod.PendingTopK(res, overflow, k, lambda rows: _exact_fix(x, rows, k, res.logsumexp)).resolve()
    ids, lp, *_ = reference(x.float().numpy(), k)
    np.testing.assert_array_equal(r.ids.numpy(), ids)
    np.testing.assert_allclose(r.logprobs.numpy(), lp, atol=1e-4)


def test_selector_autotune_picks_and_remembers_a_valid_method(monkeypatch):
    monkeypatch.delenv("CDM_TOPK_SELECT", raising=False)
    monkeypatch.setattr(topk_mod, "_selector_choice", {})
    x = torch.randn(64, 4000)
    assert topk_mod.choose_selector(x, 20) == "direct"  # CPU: no timing
    chosen = topk_mod.choose_selector(x, 20, autotune=True)
    assert chosen in topk_mod.SELECTORS and list(topk_mod._selector_choice.values()) == [chosen]
    monkeypatch.setenv("CDM_TOPK_SELECT", "nope")
    with pytest.raises(ValueError, match="CDM_TOPK_SELECT"):
        topk_mod.choose_selector(x, 20)
