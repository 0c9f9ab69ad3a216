"""Tests of cdm.train.losses: hand vectors, slow Python/float64 references, properties, gradients, memory bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cdm.train.losses import (
    VocabMaps,
    cdm_loss,
    ce_loss,
    dynamic_map,
    kl_topk_loss,
    mined_loss,
    reference_kd_reduction,
    uld_loss,
)
from cdm.train.losses._common import row_columns

FAST = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------------------- fixtures


def random_problem(seed: int, r: int, k: int, ks: int, vt: int = 40, vs: int = 30, pad: bool = True):
    """Random teacher top-K (a real distribution), student logits, EM (collisions, ids ≥ vs) and a fuzzy table."""
    g = torch.Generator().manual_seed(seed)
    t_full = torch.log_softmax(torch.randn(r, vt, generator=g) * 2.5, dim=1)
    lp, t_ids = t_full.topk(k, dim=1)
    if pad and r > 1 and k > 1:  # last row padded with −1 ids / −inf log-probs after its first entry
        t_ids[-1, 1:] = -1
        lp[-1, 1:] = float("-inf")
    em = torch.randint(0, vs + 3, (vt,), generator=g)  # ids ≥ vs appear and must be masked
    em[torch.rand(vt, generator=g) < 0.55] = -1
    dists = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.3, 0.35])  # repeated values → ties; 0.3 and 0.35 never match
    pair_mask = torch.rand(vt, vs, generator=g) < 0.25
    tt, ss = pair_mask.nonzero(as_tuple=True)
    keys = tt * vs + ss
    dist = dists[torch.randint(0, len(dists), (keys.numel(),), generator=g)]
    rows = torch.randn(r, vs + 2, generator=g) * 2.0  # two padded logit columns beyond the tokenizer
    s_top = rows[:, :vs].topk(ks, dim=1).indices
    return t_ids, lp, rows, s_top, em, keys, dist, vs, t_full


def pairs_dict(keys: torch.Tensor, dist: torch.Tensor, vs: int) -> dict[tuple[int, int], float]:
    return {(int(k) // vs, int(k) % vs): float(d) for k, d in zip(keys, dist)}


def lse(xs: list[float]) -> float:
    m = max(xs)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_map(t_ids, lp, s_top, em, pairs, vs, theta, reverse):
    """Slow per-row reference of dynamic_map: dict of column → teacher log-probs, masses, reverse set."""
    out = []
    em_l = em.tolist()
    for g in range(t_ids.shape[0]):
        cols: dict[int, list[float]] = {}
        masses = [0.0, 0.0, 0.0]
        tg, lg, sg = t_ids[g].tolist(), lp[g].tolist(), s_top[g].tolist()
        uniq_s = []
        for s in sg:
            if 0 <= s < vs and s not in uniq_s:
                uniq_s.append(s)
        for t, v in zip(tg, lg):
            if t < 0:
                continue
            p = math.exp(v)
            e = em_l[t]
            if 0 <= e < vs:
                cols.setdefault(e, []).append(v)
                masses[0] += p
                continue
            best = None
            for s in uniq_s:  # scanned in rank order: strict < keeps the best rank on ties
                d = pairs.get((t, s))
                if d is not None and d < theta and (best is None or d < best[0]):
                    best = (d, s)
            if best is None:
                masses[2] += p
            else:
                cols.setdefault(best[1], []).append(v)
                masses[1] += p
        rev, em_out = set(), 0
        if reverse:
            a_cols = set(cols)
            for s in uniq_s:
                if s in a_cols:
                    continue
                best = None
                for t, v in zip(tg, lg):
                    if t < 0:
                        continue
                    d = pairs.get((t, s))
                    if d is not None and d < theta and (best is None or d < best[0]):
                        best = (d, v)
                if best is None:
                    em_out += int(any(e == s for e in em_l))
                else:
                    cols[s] = [best[1]]
                    rev.add(s)
        out.append(({c: lse(v) for c, v in cols.items()}, masses, rev, em_out))
    return out


def ref_kl(t_logv, z_cols, tau, tail_t=None, s_lse=None):
    """float64 torch KL(p‖q) of one row from lists (differentiable in z_cols); tail as documented in bucket_kl."""
    u = [v / tau for v in t_logv]
    if s_lse is not None:
        u.append(math.log(tail_t) / tau if tail_t and tail_t > 0 else float("-inf"))
    if not t_logv:
        return z_cols.sum() * 0.0
    m = lse(u)
    p = [math.exp(x - m) for x in u]
    x = z_cols / tau
    if s_lse is None:
        log_q = x - torch.logsumexp(x, 0)
        terms = [p[i] * (math.log(p[i]) - log_q[i]) for i in range(len(t_logv)) if p[i] > 0]
    else:
        log_q = x - s_lse
        q_tail = 1.0 - log_q.exp().sum()
        terms = [p[i] * (math.log(p[i]) - log_q[i]) for i in range(len(t_logv)) if p[i] > 0]
        if p[-1] > 0:
            terms.append(p[-1] * (math.log(p[-1]) - torch.log(q_tail)))
    return sum(terms) if terms else z_cols.sum() * 0.0


def make_maps(em, keys, dist, vs, mined=None) -> VocabMaps:
    return VocabMaps(em_t2s=em, fuzzy_keys=keys, fuzzy_dist=dist, student_vocab_size=vs, mined_t2s=mined)


class OpShapes(TorchDispatchMode):
    """Records (op, output shape) of every non-view op run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.shapes.append((str(func), tuple(o.shape)))
        return out


# ----------------------------------------------------------------------------------------------- ce_loss


def test_ce_hand_vector_and_ignore():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0, -100]])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    loss = ce_loss(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[0, 2] == 0)


def test_ce_matches_loop_reference_and_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    terms = [
        -torch.log_softmax(logits[b, t].double(), 0)[labels[b, t]]
        for b in range(2)
        for t in range(5)
        if labels[b, t] != -100
    ]
    assert ce_loss(logits, labels).item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    lb = logits.bfloat16()
    assert ce_loss(lb, labels).dtype == torch.float32
    assert ce_loss(lb, labels).item() == pytest.approx(ce_loss(lb.float(), labels).item(), rel=1e-6)


def test_ce_all_ignored_is_zero_with_finite_grad():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = ce_loss(logits, torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------------------------- reference reduction


def test_reference_kd_reduction_section3_vector():
    P = torch.tensor([[2.0, 1.0, -1e4, 0.3, 0.1, -1e4]])
    Q = torch.tensor([[0.5, 0.0, -1e4, 1.0, 0.2, -1e4]])
    kd = reference_kd_reduction(P, Q, 0.8)
    assert kd.item() == pytest.approx(0.13463, abs=5e-6)
    assert (kd * 6).item() == pytest.approx(0.80779, abs=5e-5)


def test_reference_kd_reduction_skips_infinite_entries():
    P = torch.tensor([[2.0, 1.0, float("-inf")]])
    Q = torch.tensor([[0.5, 0.0, float("-inf")]])
    kd = reference_kd_reduction(P, Q, 1.0)
    p = torch.softmax(P[0, :2], 0)
    e = p * (torch.log(p) - torch.log_softmax(Q[0, :2], 0))
    assert kd.item() == pytest.approx(e.sum().item() / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------- kl_topk_loss


def test_kl_topk_hand_vectors():
    rows = torch.zeros(1, 4)
    t_ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    with_tail = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.2 / 0.5)
    no_tail = 0.625 * math.log(1.25) + 0.375 * math.log(0.75)
    assert kl_topk_loss(rows, t_ids, lp)[0].item() == pytest.approx(with_tail, rel=1e-5)
    assert kl_topk_loss(rows, t_ids, lp, tail=False)[0].item() == pytest.approx(no_tail, rel=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), k=st.integers(1, 9),
       tau=st.sampled_from([1.0, 0.8, 2.0]), tail=st.booleans())
def test_kl_topk_matches_dense_reference(seed, r, k, tau, tail):
    g = torch.Generator().manual_seed(seed)
    v = 12
    t_full = torch.log_softmax(torch.randn(r, v, generator=g) * 2, 1)
    lp, t_ids = t_full.topk(k, 1)
    rows = torch.randn(r, v, generator=g, dtype=torch.float64).float().requires_grad_()
    loss, stats = kl_topk_loss(rows, t_ids, lp, temperature=tau, tail=tail)
    loss.backward()
    rows64 = rows.detach().double().requires_grad_()
    total = 0.0
    for i in range(r):
        z = rows64[i, t_ids[i]]
        s_lse = torch.logsumexp(rows64[i] / tau, 0) if tail else None
        total = total + ref_kl(lp[i].double().tolist(), z, tau, 1.0 - lp[i].double().exp().sum().item(), s_lse)
    ref = tau**2 * total / r
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=1e-3, atol=1e-6)
    assert stats["mass_topk"].item() == pytest.approx(lp.exp().sum(1).mean().item(), rel=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 11))
def test_kl_topk_tail_is_exact_coarse_graining_and_lower_bound(seed, k):
    g = torch.Generator().manual_seed(seed)
    v = 12
    p = torch.softmax(torch.randn(3, v, generator=g, dtype=torch.float64) * 2, 1)
    z = torch.randn(3, v, generator=g, dtype=torch.float64)
    q = torch.softmax(z, 1)
    lp, ids = p.log().topk(k, 1)
    loss = kl_topk_loss(z.float(), ids, lp.float())[0].item()
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    pb = torch.cat([p.gather(1, ids), (p * ~mask).sum(1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, ids), (q * ~mask).sum(1, keepdim=True)], 1)
    coarse = (pb * (pb.log() - qb.log())).sum(1).mean().item()
    full = (p * (p.log() - q.log())).sum(1).mean().item()
    assert loss == pytest.approx(coarse, rel=1e-4, abs=1e-6)
    assert loss <= full + 1e-5
    assert loss >= -1e-6


def test_kl_topk_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(1)
    t_full = torch.log_softmax(torch.randn(4, 20, generator=g), 1)
    lp, ids = t_full.topk(5, 1)
    assert kl_topk_loss(t_full, ids, lp)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert kl_topk_loss(t_full, ids, lp, temperature=2.0, tail=False)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_kl_topk_masks_ids_beyond_vocab_and_padding():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(2, 10, generator=g, requires_grad=True)
    t_ids = torch.tensor([[1, 8, 3], [9, -1, 0]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.1, 0.3]]))
    loss, stats = kl_topk_loss(rows, t_ids, lp, vocab_size=8)
    loss.backward()
    assert torch.all(rows.grad[:, 8:] == 0)
    # the masked entries' mass moves to the tail: row 0 = columns {1, 3} + tail 0.4, row 1 = column {0} + tail 0.7
    rows64 = rows.detach().double()
    ref = 0.0
    for i, (cols, vals) in enumerate((([1, 3], [0.5, 0.1]), ([0], [0.3]))):
        s_lse = torch.logsumexp(rows64[i, :8], 0)
        ref += ref_kl([math.log(v) for v in vals], rows64[i, cols], 1.0, 1.0 - sum(vals), s_lse).item()
    assert loss.item() == pytest.approx(ref / 2, rel=1e-5)
    assert stats["mass_masked"].item() == pytest.approx((0.2 + 0.4) / 2, rel=1e-5)


def test_kl_topk_bf16_and_gradient_only_to_student():
    vals = (torch.randperm(200, generator=torch.Generator().manual_seed(3)).float() - 100) / 16
    rows = vals.view(2, 100).bfloat16().requires_grad_()
    t_ids = torch.tensor([[0, 5, 9], [3, 4, 99]])
    lp = torch.log(torch.tensor([[0.4, 0.3, 0.1], [0.5, 0.2, 0.2]])).requires_grad_()
    lp_before = lp.detach().clone()
    loss, _ = kl_topk_loss(rows, t_ids, lp, temperature=0.8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert rows.grad.dtype == torch.bfloat16 and lp.grad is None
    assert torch.equal(lp.detach(), lp_before)
    ref, _ = kl_topk_loss(rows.detach().float(), t_ids, lp.detach(), temperature=0.8)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- row_columns


def test_row_columns_hand_vector():
    ids = torch.tensor([[4, 1, 4, 9, 4, -1, 1, 4, 4, 2]])  # id 4 five times, 1 twice, 9 ≥ vocab, −1 ignored
    vals = torch.log(torch.tensor([[0.1, 0.2, 0.05, 0.3, 0.05, 0.9, 0.1, 0.02, 0.03, 0.01]]))
    flags = torch.tensor([[False, False, False, True, False, True, True, False, True, False]])
    cols, out, any_flag = row_columns(ids, vals, flags, vocab=9)
    assert cols[0].tolist() == [1, 2, 4] + [-1] * 7
    torch.testing.assert_close(out[0, :3].exp(), torch.tensor([0.3, 0.01, 0.25]))
    assert torch.isneginf(out[0, 3:]).all()
    assert any_flag[0].tolist() == [True, False, True] + [False] * 7
    _, mx, _ = row_columns(ids, vals, flags, vocab=9, reduce="max")
    torch.testing.assert_close(mx[0, :3].exp(), torch.tensor([0.2, 0.01, 0.1]))


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 4), e=st.integers(1, 40), reduce=st.sampled_from(["logsumexp", "max"]))
def test_row_columns_matches_dict_reference(seed, r, e, reduce):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 7, (r, e), generator=g)  # ids 0..5 valid (vocab 6): long runs of collisions
    vals = torch.randn(r, e, generator=g, dtype=torch.float64).float()
    flags = torch.rand(r, e, generator=g) < 0.2
    cols, out, any_flag = row_columns(ids, vals, flags, vocab=6, reduce=reduce)
    for i in range(r):
        groups: dict[int, list[tuple[float, bool]]] = {}
        for c, v, f in zip(ids[i].tolist(), vals[i].tolist(), flags[i].tolist()):
            if 0 <= c < 6:
                groups.setdefault(c, []).append((v, f))
        keys = sorted(groups)
        assert cols[i].tolist() == keys + [-1] * (e - len(keys))
        for j, c in enumerate(keys):
            xs = [v for v, _ in groups[c]]
            assert out[i, j].item() == pytest.approx(lse(xs) if reduce == "logsumexp" else max(xs), rel=1e-5, abs=1e-6)
            assert bool(any_flag[i, j]) == any(f for _, f in groups[c])


# ----------------------------------------------------------------------------------------------- dynamic_map


def hand_map_problem():
    vs = 10
    em = torch.tensor([-1, 3, 3, -1, 5, -1, 12, 9])  # t1,t2 → s3 (collision); t6 → 12 ≥ vs (masked)
    pairs = {(0, 4): 0.1, (0, 6): 0.1, (3, 6): 0.25, (5, 2): 0.2, (5, 7): 0.3}
    keys = torch.tensor(sorted(t * vs + s for t, s in pairs))
    dist = torch.tensor([pairs[(int(k) // vs, int(k) % vs)] for k in keys])
    t_ids = torch.tensor([[1, 2, 0, 3, 5, 6]])
    probs = torch.tensor([[0.3, 0.2, 0.15, 0.1, 0.05, 0.05]])
    s_top = torch.tensor([[3, 6, 2, 4, 5]])
    return t_ids, probs, s_top, em, keys, dist, vs


def test_dynamic_map_hand_vector():
    t_ids, probs, s_top, em, keys, dist, vs = hand_map_problem()
    cm = dynamic_map(t_ids, probs.log(), s_top, em, keys, dist, vs, 0.3)
    # t1,t2 → s3 exactly (0.5); t0 → tie s6/s4 at 0.1, s6 ranks first (0.15); t3 → s6 (0.1);
    # t5 → s2 (0.2 < θ; s7 at 0.3 is not < θ and not in the top-K) (0.05); t6 → EM 12 ≥ vs masked, no pair: dropped.
    assert cm.cols[0].tolist() == [2, 3, 6, -1, -1, -1]
    torch.testing.assert_close(cm.t_logmass[0, :3].exp(), torch.tensor([0.05, 0.5, 0.25]))
    assert cm.mass_exact.item() == pytest.approx(0.5)
    assert cm.mass_dynamic.item() == pytest.approx(0.3)
    assert cm.mass_dropped.item() == pytest.approx(0.05)
    assert not cm.reverse.any()


def test_dynamic_map_hand_vector_reverse():
    t_ids, probs, s_top, em, keys, dist, vs = hand_map_problem()
    cm = dynamic_map(t_ids, probs.log(), s_top, em, keys, dist, vs, 0.3, reverse=True)
    # B: s4 has no column; its fuzzy teacher neighbour t0 (0.1) is in the top-K → column 4 with p(t0) = 0.15.
    # s5 has no column and no fuzzy teacher; its EM teacher t4 is outside the stored top-K → counted, dropped.
    assert cm.cols[0, :4].tolist() == [2, 3, 4, 6]
    torch.testing.assert_close(cm.t_logmass[0, :4].exp(), torch.tensor([0.05, 0.5, 0.15, 0.25]))
    assert cm.reverse[0, :4].tolist() == [False, False, True, False]
    assert cm.reverse_em_outside.tolist() == [1]


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 6), k=st.integers(1, 8), ks=st.integers(0, 8),
       theta=st.sampled_from([0.3, 0.22, 0.0]), reverse=st.booleans())
def test_dynamic_map_matches_python_reference(seed, r, k, ks, theta, reverse):
    t_ids, lp, _, _, em, keys, dist, vs, _ = random_problem(seed, r, k, ks)
    g = torch.Generator().manual_seed(seed + 1)
    s_top = torch.stack([torch.randperm(vs + 3, generator=g)[:ks] for _ in range(r)])  # some ids ≥ vs
    if ks > 2:
        s_top[0, -1] = s_top[0, 0]  # a repeated id must not count twice
    cm = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, theta, reverse=reverse)
    ref = ref_map(t_ids, lp, s_top, em, pairs_dict(keys, dist, vs), vs, theta, reverse)
    for g_, (cols, masses, rev, em_out) in enumerate(ref):
        got = cm.cols[g_][cm.cols[g_] >= 0].tolist()
        assert got == sorted(cols)
        assert cm.cols[g_][len(got):].eq(-1).all()
        for j, c in enumerate(got):
            assert cm.t_logmass[g_, j].item() == pytest.approx(cols[c], rel=1e-5, abs=1e-6)
            assert bool(cm.reverse[g_, j]) == (c in rev)
        assert [cm.mass_exact[g_].item(), cm.mass_dynamic[g_].item(), cm.mass_dropped[g_].item()] == pytest.approx(
            masses, abs=1e-6
        )
        assert cm.reverse_em_outside[g_].item() == em_out


@pytest.mark.parametrize("reverse", [False, True])
def test_dynamic_map_chunking_is_exact_and_bounded(reverse):
    t_ids, lp, _, s_top, em, keys, dist, vs, _ = random_problem(5, 23, 7, 6)
    full = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, reverse=reverse)
    per_row = 7 * 6  # K·Ks pair elements per row
    with OpShapes() as log:
        tiny = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, reverse=reverse, max_pair_elems=3 * per_row)
    distinct = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, reverse=reverse, distinct_student_ids=True)
    for a, b, c in zip(full, tiny, distinct):
        assert torch.equal(a, b) and torch.equal(a, c)
    pair_ops = [s for f, s in log.shapes if "searchsorted" in f]
    assert pair_ops and all(s[0] <= 3 and s[1:] == (7, 6) for s in pair_ops)
    assert len(pair_ops) == 8  # ⌈23 / 3⌉ chunks
    assert all(math.prod(s) <= 23 * 13 * 13 // 4 for _, s in log.shapes)  # nothing near R·K·K or bigger


def test_dynamic_map_deterministic_and_inputs_untouched():
    t_ids, lp, _, s_top, em, keys, dist, vs, _ = random_problem(6, 9, 6, 6)
    before = [x.clone() for x in (t_ids, lp, s_top, em, keys, dist)]
    a = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, reverse=True)
    b = dynamic_map(t_ids, lp, s_top, em, keys, dist, vs, reverse=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(before, (t_ids, lp, s_top, em, keys, dist)):
        assert torch.equal(x, y)


def test_dynamic_map_nothing_mapped_and_empty_table():
    t_ids = torch.tensor([[0, 1], [2, 3]])
    lp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.4]]))
    em = torch.tensor([-1, -1, 1, -1])
    empty_k, empty_d = torch.empty(0, dtype=torch.int64), torch.empty(0)
    cm = dynamic_map(t_ids, lp, torch.tensor([[0, 1], [1, 0]]), em, empty_k, empty_d, 5, reverse=True)
    assert cm.cols.tolist() == [[-1] * 4, [1, -1, -1, -1]]
    assert cm.mass_dropped.tolist() == pytest.approx([0.9, 0.4])
    assert torch.isneginf(cm.t_logmass[0]).all()


# ----------------------------------------------------------------------------------------------- cdm_loss


def ref_cdm(rows, t_ids, lp, s_top, em, keys, dist, vs, tau, theta, tail, reverse):
    """Slow reference of cdm_loss from ref_map + per-row float64 KL; returns a differentiable float64 loss."""
    rows64 = rows.detach().double().requires_grad_()
    ref = ref_map(t_ids, lp, s_top, em, pairs_dict(keys, dist, vs), vs, theta, reverse)
    total = rows64.sum() * 0.0
    for g, (cols, masses, _, _) in enumerate(ref):
        order = sorted(cols)
        z = rows64[g, order] if order else rows64[g, :0]
        s_lse = torch.logsumexp(rows64[g, :vs] / tau, 0) if tail else None
        total = total + ref_kl([cols[c] for c in order], z, tau, 1.0 - masses[0] - masses[1], s_lse)
    return rows64, tau**2 * total / len(ref)


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), k=st.integers(1, 8),
       tau=st.sampled_from([1.0, 0.8, 2.0]), tail=st.booleans(), reverse=st.booleans())
def test_cdm_loss_matches_slow_reference(seed, r, k, tau, tail, reverse):
    t_ids, lp, rows, _, em, keys, dist, vs, _ = random_problem(seed, r, k, k)
    rows = rows.requires_grad_()
    s_top = torch.from_numpy(np.argsort(-rows.detach()[:, :vs].numpy(), axis=1, kind="stable")[:, :k].copy())
    loss, stats = cdm_loss(rows, t_ids, lp, make_maps(em, keys, dist, vs), temperature=tau, tail_bucket=tail,
                           reverse=reverse)
    loss.backward()
    rows64, ref = ref_cdm(rows, t_ids, lp, s_top, em, keys, dist, vs, tau, 0.3, tail, reverse)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=1e-3, atol=1e-6)
    assert torch.all(rows.grad[:, vs:] == 0)  # padded logit columns never gathered
    assert loss.item() >= -1e-6
    total = sum(stats[key] for key in ("mass_exact", "mass_dynamic", "mass_dropped", "mass_tail"))
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_cdm_loss_hand_vector():
    t_ids, probs, _, em, keys, dist, vs = hand_map_problem()
    z = torch.full((1, vs), -10.0)
    for s, q in ((3, 0.5), (6, 0.3), (2, 0.2), (4, 0.1), (5, 0.05)):
        z[0, s] = math.log(q)  # live top-5 = [3, 6, 2, 4, 5]: same columns as the dynamic_map hand vector
    loss, stats = cdm_loss(z, t_ids, probs.log(), make_maps(em, keys, dist, vs), student_topk=5)
    # columns [2, 3, 6]: teacher [0.05, 0.5, 0.25]/0.8, student [0.2, 0.5, 0.3] (renormalised, sums to 1)
    p = [0.0625, 0.625, 0.3125]
    q = [0.2, 0.5, 0.3]
    assert loss.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert stats["columns"].item() == 3
    assert stats["mass_tail"].item() == pytest.approx(0.15, abs=1e-6)


def test_cdm_loss_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(7)
    v = 30
    t_full = torch.log_softmax(torch.randn(4, v, generator=g) * 2, 1)
    lp, ids = t_full.topk(6, 1)
    maps = make_maps(torch.arange(v), torch.empty(0, dtype=torch.int64), torch.empty(0), v)
    assert cdm_loss(t_full, ids, lp, maps, tail_bucket=True)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert cdm_loss(t_full, ids, lp, maps, temperature=2.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert cdm_loss(t_full + 0.3, ids, lp, maps, temperature=2.0, reverse=True)[0].item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_cdm_loss_gradients_only_to_student_and_inputs_untouched():
    t_ids, lp, rows, _, em, keys, dist, vs, _ = random_problem(8, 6, 5, 5)
    rows.requires_grad_()
    lp = lp.clone().requires_grad_()
    maps = make_maps(em, keys, dist, vs)
    before = [x.detach().clone() for x in (t_ids, lp, em, keys, dist)]
    loss, stats = cdm_loss(rows, t_ids, lp, maps, temperature=0.8, tail_bucket=True, reverse=True)
    loss.backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert lp.grad is None and all(not v.requires_grad for v in stats.values())
    for x, y in zip(before, (t_ids, lp, em, keys, dist)):
        assert torch.equal(x, y.detach())


def test_cdm_loss_edge_rows_k1_and_nothing_mapped():
    vs = 6
    em = torch.tensor([2, -1, -1])
    maps = make_maps(em, torch.empty(0, dtype=torch.int64), torch.empty(0), vs)
    rows = torch.randn(2, vs, generator=torch.Generator().manual_seed(9), requires_grad=True)
    t_ids = torch.tensor([[0], [1]])  # K = 1: row 0 maps (one column → KL 0), row 1 maps nothing
    lp = torch.log(torch.tensor([[0.7], [0.9]]))
    loss, stats = cdm_loss(rows, t_ids, lp, maps)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(rows.grad).all()
    assert stats["mass_dropped"].item() == pytest.approx(0.45)
    # with the tail bucket, the nothing-mapped row compares teacher 100 % tail with student mass outside ∅ = 1
    tail_loss, _ = cdm_loss(rows, t_ids, lp, maps, tail_bucket=True)
    q0 = torch.softmax(rows.detach()[0], 0)[2].item()
    expected = (0.7 * math.log(0.7 / q0) + 0.3 * math.log(0.3 / (1 - q0))) / 2
    assert tail_loss.item() == pytest.approx(expected, rel=1e-5)


def test_cdm_loss_empty_batch_and_errors():
    maps = make_maps(torch.tensor([0, 1]), torch.empty(0, dtype=torch.int64), torch.empty(0), 4)
    rows = torch.zeros(0, 4, requires_grad=True)
    loss, stats = cdm_loss(rows, torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3), maps)
    loss.backward()
    assert loss.item() == 0.0 and stats["mass_exact"].item() == 0.0
    with pytest.raises(ValueError, match="student_vocab_size"):
        cdm_loss(torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2), maps)
    with pytest.raises(TypeError, match="int64"):
        cdm_loss(torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2), maps)
    with pytest.raises(ValueError, match="fuzzy_dist"):
        VocabMaps(torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([0.1]), 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        VocabMaps(torch.tensor([0]), torch.tensor([2, 1]), torch.tensor([0.1, 0.1]), 4).check()


def test_cdm_loss_bf16_matches_fp32_on_same_values():
    t_ids, lp, _, _, em, keys, dist, vs, _ = random_problem(10, 4, 6, 6, vt=40, vs=60)
    vals = (torch.randperm(4 * 62, generator=torch.Generator().manual_seed(10)).float() - 124) / 16
    rows = vals.view(4, 62).bfloat16().requires_grad_()  # exactly representable, no ties in the top-K
    maps = make_maps(em, keys, dist, vs)
    loss, _ = cdm_loss(rows, t_ids, lp, maps, temperature=0.8, tail_bucket=True, reverse=True)
    ref, _ = cdm_loss(rows.detach().float(), t_ids, lp, maps, temperature=0.8, tail_bucket=True, reverse=True)
    loss.backward()
    assert loss.dtype == torch.float32 and rows.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_cdm_loss_never_materialises_vocab_sized_tensors(reverse):
    vt, vs, r, k = 3001, 2003, 64, 8
    g = torch.Generator().manual_seed(11)
    lp, t_ids = torch.log_softmax(torch.randn(r, vt, generator=g), 1).topk(k, 1)
    em = torch.randint(-1, vs, (vt,), generator=g)
    keys = torch.unique(torch.randint(0, vt * vs, (5000,), generator=g))
    dist = torch.rand(keys.numel(), generator=g) * 0.4
    rows = torch.randn(r, vs, generator=g, requires_grad=True)
    with OpShapes() as log:
        cdm_loss(rows, t_ids, lp, make_maps(em, keys, dist, vs), reverse=reverse, max_pair_elems=16 * k * k)
    assert log.shapes
    biggest = max(math.prod(s) for _, s in log.shapes)
    assert biggest < r * vs // 4, max(log.shapes, key=lambda x: math.prod(x[1]))
    assert not any(vt in s[1:] for _, s in log.shapes)


def test_cdm_loss_chunk_size_does_not_change_the_loss():
    t_ids, lp, rows, _, em, keys, dist, vs, _ = random_problem(12, 17, 7, 7)
    maps = make_maps(em, keys, dist, vs)
    a, _ = cdm_loss(rows, t_ids, lp, maps, reverse=True, tail_bucket=True)
    b, _ = cdm_loss(rows, t_ids, lp, maps, reverse=True, tail_bucket=True, max_pair_elems=1)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- mined_loss


def ref_mined(rows, t_ids, lp, t2s, vs, tau, labels, onehot, reduce):
    rows64 = rows.detach().double().requires_grad_()
    total = rows64.sum() * 0.0
    for g in range(rows.shape[0]):
        cols: dict[int, list[float]] = {}
        for t, v in zip(t_ids[g].tolist(), lp[g].tolist()):
            s = int(t2s[t]) if t >= 0 else -1
            if 0 <= s < vs:
                cols.setdefault(s, []).append(v)
        log_q = torch.log_softmax(rows64[g, :vs] / tau, 0)
        if not cols or (onehot is not None and bool(onehot[g])):
            if labels is not None and 0 <= int(labels[g]) < vs:
                total = total - log_q[int(labels[g])]
            continue
        order = sorted(cols)
        val = [max(cols[c]) if reduce == "max" else lse(cols[c]) for c in order]
        m = lse([x / tau for x in val])
        for c, x in zip(order, val):
            p = math.exp(x / tau - m)
            if p > 0:
                total = total + p * (math.log(p) - log_q[c])
    return rows64, tau**2 * total / rows.shape[0]


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), k=st.integers(1, 8),
       tau=st.sampled_from([1.0, 2.0]), reduce=st.sampled_from(["max", "logsumexp"]), use_labels=st.booleans())
def test_mined_loss_matches_slow_reference(seed, r, k, tau, reduce, use_labels):
    t_ids, lp, rows, _, em, _, _, vs, _ = random_problem(seed, r, k, k)
    g = torch.Generator().manual_seed(seed + 2)
    t2s = torch.randint(-1, vs + 2, (em.numel(),), generator=g)  # many-to-one, unmapped and ≥ vs ids
    labels = torch.randint(-1, vs, (r,), generator=g) if use_labels else None
    onehot = torch.rand(r, generator=g) < 0.3
    rows = rows.requires_grad_()
    loss, _ = mined_loss(rows, t_ids, lp, t2s, vs, temperature=tau, labels=labels, onehot_rows=onehot, reduce=reduce)
    loss.backward()
    rows64, ref = ref_mined(rows, t_ids, lp, t2s, vs, tau, labels, onehot, reduce)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=1e-3, atol=1e-6)


def test_mined_loss_hand_vector_and_unscaled_option():
    rows = torch.zeros(1, 4)  # student uniform over 4 ids
    t_ids = torch.tensor([[0, 1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]]))
    t2s = torch.tensor([1, 1, 3])  # t0, t1 → s1 (max = log 0.5); t2 → s3
    loss, stats = mined_loss(rows, t_ids, lp, t2s, 4)
    p = [0.5 / 0.6, 0.1 / 0.6]
    assert loss.item() == pytest.approx(sum(x * math.log(x / 0.25) for x in p), rel=1e-5)
    assert stats["mass_mapped"].item() == pytest.approx(0.9)
    a, _ = mined_loss(rows, t_ids, lp, t2s, 4, temperature=2.0)
    b, _ = mined_loss(rows, t_ids, lp, t2s, 4, temperature=2.0, scale_tau_sq=False)
    assert a.item() == pytest.approx(4 * b.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- uld_loss


def test_uld_hand_vector():
    lp = torch.log(torch.tensor([[0.3, 0.5]]))  # any order: sorted inside
    loss, stats = uld_loss(torch.zeros(1, 4), lp)
    assert loss.item() == pytest.approx(0.25 + 0.05 + abs(0.2 - 0.5), rel=1e-5)
    assert uld_loss(torch.zeros(1, 4), lp, tail="none")[0].item() == pytest.approx(0.3, rel=1e-5)
    assert stats["mass_tail_teacher"].item() == pytest.approx(0.2, rel=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), k=st.integers(1, 10), vt=st.integers(10, 16))
def test_uld_matches_loop_reference_and_lower_bounds_full_uld(seed, r, k, vt):
    g = torch.Generator().manual_seed(seed)
    vs = 12
    p = torch.softmax(torch.randn(r, vt, generator=g, dtype=torch.float64) * 2, 1)
    rows = torch.randn(r, vs + 1, generator=g).requires_grad_()
    lp = p.log().topk(k, 1).values.float()
    loss, _ = uld_loss(rows, lp, vocab_size=vs)
    loss.backward()
    rows64 = rows.detach().double().requires_grad_()
    total, full = rows64.sum() * 0.0, 0.0
    for i in range(r):
        q = torch.softmax(rows64[i, :vs], 0)
        qs = torch.sort(q, descending=True).values
        ps = sorted(p[i].tolist(), reverse=True)
        top = sum(abs(qs[j] - ps[j]) for j in range(min(k, vs))) + sum(ps[j] for j in range(vs, k))
        total = total + top + abs((1 - sum(ps[:k])) - (1 - qs[:k].sum()))
        n = max(vs, vt)
        pa = ps + [0.0] * (n - vt)
        qa = qs.tolist() + [0.0] * (n - vs)
        full += sum(abs(a - b) for a, b in zip(qa, pa))
    ref = total / r
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(rows.grad.double(), rows64.grad, rtol=1e-3, atol=1e-6)
    assert torch.all(rows.grad[:, vs:] == 0)
    assert loss.item() <= full / r + 1e-5
