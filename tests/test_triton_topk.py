"""The Triton top-k selections: hand vectors, random rows against `_exact_topk`, the fused kernel's overflow flag,
their use by `_topk_chunk` and the selection autotuner, and a compile for Hopper (sm_90) that needs no GPU.

Runs where Triton is installed (the vLLM lane's environment; CUDA hosts): without a GPU through Triton's interpreter,
in a process started with TRITON_INTERPRET=1 (the lane does), so the kernel source is checked on every CI run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # the interpreter is a process-wide choice (Triton reads it when it wraps a function): setting it here would leak
    # into every other test module of this run
    pytest.skip("without a GPU these tests need Triton's interpreter for the whole process: "
                "TRITON_INTERPRET=1 pytest tests/test_triton_topk.py (scripts/vllm_lane.sh runs it so)",
                allow_module_level=True)
triton = pytest.importorskip("triton")

from cdm.precompute import topk as T  # noqa: E402
from cdm.precompute import triton_topk as TT  # noqa: E402

from tests.test_precompute_support import text_records, tiny_teacher, tokenizer, write_jsonl  # noqa: E402,F401
from tests.test_precompute_topk import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def radix(x, kk, **kw):
    return TT.select_radix(x, kk, **kw)


def fused(x, kk, **kw):
    return TT.select_blockmax_fused(x, kk, **kw)


KERNELS = {"radix": radix, "fused": fused}


@pytest.fixture(autouse=True)
def _fresh_selection_state(monkeypatch):
    monkeypatch.delenv("CDM_TOPK_SELECT", raising=False)
    monkeypatch.setattr(T, "_selector_choice", {})
    monkeypatch.setattr(T, "_failed_selectors", {})


@pytest.fixture
def call_once_timing(monkeypatch):
    """The autotuner's timing reduced to one call per candidate (what is under test is which calls it makes and
    what it drops; interpreter timings mean nothing)."""
    monkeypatch.setattr(T, "_time_selector", lambda fn, device, reps=3: (fn(), 0.0)[1])


def _sorted_ids(ids: torch.Tensor) -> list[list[int]]:
    return torch.sort(ids.cpu(), -1).values.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_radix_hand_vectors(dtype):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, -0.0, 0.0, -math.inf, 3.0],
                      [-0.0, 0.0, -1.0, -math.inf, -2.0, -0.0, 5.0, -0.0]], dtype=dtype, device=DEVICE)
    vals, ids, fix = TT.select_radix(x, 3, block=4, warps=1)
    # row 0: the three 3.0s; row 1: 5.0, then the two lowest-id zeros of four (-0.0 equals +0.0)
    assert _sorted_ids(ids) == [[1, 2, 7], [0, 1, 6]] and fix is None
    assert torch.equal(x.gather(1, ids), vals)
    _, ids, _ = TT.select_radix(x, 2, block=4, warps=1)
    assert _sorted_ids(ids) == [[1, 2], [0, 6]]  # ties at the k-th place: the lowest ids win
    _, ids, _ = TT.select_radix(x, 8, block=16, warps=1)
    assert _sorted_ids(ids) == [list(range(8))] * 2
    _, ids, _ = TT.select_radix(x[:, :1], 1, block=4, warps=1)
    assert ids.tolist() == [[0], [0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_hand_vector(dtype):
    """70 entries in blocks of 32 (the last one partial); output sorted by (value desc, id asc)."""
    x = torch.full((1, 70), -5.0)
    x[0, [3, 40, 41, 69]] = torch.tensor([2.0, 7.0, 2.0, 2.0])
    x[0, 10] = -0.0
    x[0, 11] = 0.0
    x = x.to(dtype).to(DEVICE)
    vals, ids, overflow = TT.select_blockmax_fused(x, 3)  # 3 blocks: t = the smallest block max, 2.0
    assert ids.tolist() == [[40, 3, 41]] and vals.float().tolist() == [[7.0, 2.0, 2.0]]
    assert overflow.tolist() == [False]
    vals, ids, overflow = TT.select_blockmax_fused(x, 2)  # t = 2.0 (second largest block max)
    assert ids.tolist() == [[40, 3]] and overflow.tolist() == [False]
    vals, ids, overflow = TT.select_blockmax_fused(x, 5)  # fewer blocks than kk: the radix kernel instead
    assert _sorted_ids(ids) == [[3, 10, 40, 41, 69]] and overflow is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), v=st.integers(1, 700), kk=st.integers(1, 700),
       levels=st.sampled_from([0, 2, 7]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       kernel=st.sampled_from(sorted(KERNELS)), tile=st.sampled_from([64, 256, 4096]), specials=st.booleans(),
       block=st.sampled_from([2, 4, 8, 32]))
def test_random_rows_match_the_exact_reference(seed, n, v, kk, levels, dtype, kernel, tile, specials, block):
    """The set of `_exact_topk` (value desc, id asc) on continuous and heavily tied rows, with partial last tiles and
    blocks, kk = V, signed zeros and -inf entries; values are the row's own entries. The fused kernel's rows that
    overflow its candidate buffer (small here, to make that happen) are flagged and left to the exact fix-up."""
    kk = min(kk, v)
    rng = np.random.default_rng(seed)
    x = rng.integers(-levels, levels, size=(n, v)).astype(np.float32) if levels else rng.standard_normal((n, v)) * 6
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if specials:
        x[:, rng.integers(0, v, size=max(1, v // 5))] = -math.inf
        x[:, rng.integers(0, v, size=max(1, v // 5))] = -0.0
        x[0, rng.integers(0, v)] = 0.0
    x = x.to(dtype)
    kw = {"block": tile, "warps": 4} if kernel == "radix" else {"tile": tile, "warps": 4, "cap": 2 * kk, "block": block,
                                                                "stats": True}
    vals, ids, overflow, *stats = KERNELS[kernel](x.to(DEVICE), kk, **kw)
    ref_vals, ref_ids = T._exact_topk(x.float(), kk)
    done = torch.ones(n, dtype=torch.bool) if overflow is None else ~overflow.cpu()
    assert _sorted_ids(ids[done]) == _sorted_ids(ref_ids[done])
    assert torch.equal(x.gather(1, ids.cpu())[done], vals.cpu()[done]) and vals.dtype == dtype
    if kernel == "fused":
        assert torch.equal(ids.cpu()[done], ref_ids[done])  # already in (value desc, id asc) order
    if kernel == "fused" and overflow is not None:
        assert torch.equal(vals.cpu()[:, 0], x.amax(-1))  # the row maximum first, in overflowing rows too
        # a row overflows exactly when more than its buffer's entries reach the threshold
        assert (overflow.cpu() == (_candidates(x.float(), kk, block) > TT._next_pow2(max(2 * kk, 2)))).all()
    if kernel == "fused" and stats[0] is not None:  # the first pass's statistics, in overflowing rows too
        _assert_stats_match_float64(stats[0], x)
    elif kernel == "fused":
        assert overflow is None  # only the radix fallback (fewer blocks than kk) gives no statistics


def _assert_stats_match_float64(stats, x: torch.Tensor) -> None:
    """The kernel's (log-sum-exp, entropy) against `row_stats_reference` in float64: close where that is finite,
    non-finite where it is not (a row of NaN/+inf or only -inf must be refused, never stored)."""
    x = x.double().cpu()
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    z = e.sum(-1)
    want_lse, want_ent = m[:, 0] + z.log(), z.log() - torch.where(e > 0, e * (x - m), 0.0).sum(-1) / z
    for got, want in zip(stats, (want_lse, want_ent)):
        got = got.double().cpu()
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=2e-5)
        assert not bool(torch.isfinite(got[~finite]).any())


def _candidates(x: torch.Tensor, kk: int, block: int) -> torch.Tensor:
    """Per row: how many entries reach the kk-th largest maximum of the fused kernel's blocks."""
    pad = (-x.shape[1]) % block
    blocks = torch.nn.functional.pad(x, (0, pad), value=-math.inf).view(x.shape[0], -1, block).amax(-1)
    t = blocks.topk(kk, -1).values[:, -1:]
    return (x >= t).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_statistics_hand_rows(dtype):
    """Rows that exercise the online rescaling: the first tiles all -inf, a maximum that grows tile after tile and
    one that comes first, -inf entries among finite ones, one finite entry (entropy 0), a constant row (entropy
    log V); and bad rows (NaN, +inf, all -inf) whose statistics must come out non-finite."""
    v, tile = 1000, 64
    rows = torch.full((9, v), -math.inf)
    rows[0, 700:] = torch.linspace(-3, 2, 300)
    rows[1] = torch.linspace(-20, 30, v)  # the maximum grows with every tile
    rows[2] = torch.linspace(30, -20, v)
    rows[3] = torch.randn(v, generator=torch.Generator().manual_seed(2)) * 5
    rows[3, ::3] = -math.inf
    rows[4, 517] = 4.0
    rows[5] = 1.5
    rows[6] = torch.randn(v)
    rows[6, 900] = math.nan
    rows[7] = torch.randn(v)
    rows[7, 3] = math.inf
    x = rows.to(dtype)  # row 8: all -inf
    with warnings.catch_warnings():  # numpy under the interpreter warns on inf - inf (row 7); a GPU just gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        vals, ids, overflow, stats = TT.select_blockmax_fused(x.to(DEVICE), 5, tile=tile, warps=4, stats=True)
    _assert_stats_match_float64(stats, x)
    lse, ent = (t.double().cpu() for t in stats)
    assert ent[4].item() == pytest.approx(0.0, abs=1e-6) and lse[4].item() == pytest.approx(4.0, abs=1e-6)
    assert ent[5].item() == pytest.approx(math.log(v), abs=1e-5)
    # without stats the kernel gives the same selection (STATS only adds work to the first pass)
    vals2, ids2, overflow2 = TT.select_blockmax_fused(x.to(DEVICE), 5, tile=tile, warps=4)
    assert torch.equal(ids[:6], ids2[:6]) and torch.equal(vals[:6], vals2[:6])


def test_nan_and_all_inf_rows_keep_ids_in_range_and_fail_at_resolve(monkeypatch):
    """Bad logits must not become out-of-range ids (a device-side assert later) nor a silently stored row: the ids
    stay in [0, V) and the log-sum-exp check refuses the chunk."""
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(6))
    x[0, 7] = math.nan
    x[1] = math.nan
    x[2] = -math.inf
    for kernel in (radix, fused):
        _, ids, *_ = kernel(x.to(DEVICE), 20)
        assert 0 <= int(ids.min()) and int(ids.max()) < 300
    for name in ("radix", "blockmax_fused"):
        monkeypatch.setenv("CDM_TOPK_SELECT", name)
        with pytest.raises(FloatingPointError, match="row 0"):
            T.topk_stats(x.to(DEVICE), 20, impl="eager")


@pytest.mark.parametrize("select", ["radix", "blockmax_fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_statistics_with_a_triton_selection(dtype, select):
    """`_topk_chunk` runs the exact-tie selections at kk = k, and with the fix-up of flagged rows gives the float64
    reference's ids, on continuous and on heavily tied rows (which overflow the fused kernel's buffer)."""
    from tests.test_precompute_topk import _exact_fix

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(9, 3000, generator=g) * 4, torch.randint(0, 4, (9, 3000), generator=g).float()):
        x = x.to(dtype).to(DEVICE)
        res, overflow = T._topk_chunk(x, 40, "eager", select)
        r = T.PendingTopK(res, overflow, 40, lambda rows: _exact_fix(x, rows, 40, res.logsumexp)).resolve()
        ids, lp, lse, ent, _ = reference(x.float().cpu().numpy(), 40)
        np.testing.assert_array_equal(r.ids.cpu().numpy(), ids)
        np.testing.assert_allclose(r.logprobs.cpu().numpy(), lp, atol=1e-4)
        if select == "radix":
            assert not bool(overflow.any())


def test_forced_triton_selection_through_topk_stats(monkeypatch):
    x = torch.randn(50, 1000, generator=torch.Generator().manual_seed(4)) * 3
    ids, lp, lse, ent, _ = reference(x.numpy(), 16)
    for name in ("radix", "blockmax_fused"):
        monkeypatch.setenv("CDM_TOPK_SELECT", name)
        r = T.topk_stats(x.to(DEVICE), 16, impl="eager", memory_budget=4 * 1000 * 20)  # 20 rows per chunk
        np.testing.assert_array_equal(r.ids.cpu().numpy(), ids)
        np.testing.assert_allclose(r.entropy.cpu().numpy(), ent, atol=1e-4)
    with pytest.raises(ValueError, match="cannot run on .*float64"):
        T.choose_selector(x.double().to(DEVICE), 20)


def test_autotuner_times_triton_selections_at_k_and_drops_a_failing_one(monkeypatch, call_once_timing):
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    seen = []
    real = TT.select_radix
    monkeypatch.setattr(TT, "select_radix", lambda x, kk, *a: (seen.append(kk), real(x, kk, *a))[1])
    chosen = T.choose_selector(x, 21, autotune=True, k=20)
    assert chosen in T.selector_candidates(x) and seen and set(seen) == {20}
    T._selector_choice.clear()

    def broken(*a, **kw):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(TT, "select_radix", broken)
    assert T.choose_selector(x, 21, autotune=True, k=20) != "radix"
    assert "no kernel for you" in T._failed_selectors[T._shape_key(x, "radix")]
    assert set(T.selector_candidates(x)) == set(T.SELECTORS) | (set(T.EXACT_SELECTORS) - {"radix"})
    # an autotuned pick that fails later on a new shape is dropped and the chunk is redone with another
    T._selector_choice.clear()
    T._failed_selectors.clear()
    monkeypatch.setattr(T, "choose_selector",
                        lambda *a, **kw: "radix" if "radix" in T.selector_candidates(x) else "direct")
    res, overflow = T._topk_chunk(x, 5, "eager")
    assert T._shape_key(x, "radix") in T._failed_selectors
    assert torch.equal(res.ids.long().cpu(), T._exact_topk(x.float().cpu(), 5)[1])


_COMPILE_FOR_HOPPER = """
import sys, warnings
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice; no FMA here to fuse
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cdm.precompute import triton_topk as TT
ptr = {"x_ptr": "*{d}", "vals_ptr": "*{d}", "ids_ptr": "*i64", "maxima_ptr": "*fp32", "count_ptr": "*i32",
       "cand_vals_ptr": "*fp32", "cand_ids_ptr": "*i32", "overflow_ptr": "*i8", "lse_ptr": "*fp32",
       "entropy_ptr": "*fp32"}
cases = [("radix_topk_rows", d, {"ROUNDS": r, "BLOCK": 4096}) for d, r in (("bf16", 2), ("fp16", 3), ("fp32", 4))]
cases += [("blockmax_topk_rows", d, {"BLOCK": 32, "TB": 128, "NB": 2048, "KP": 128, "CAP": 512, "STATS": stats})
          for d in ("bf16", "fp16", "fp32") for stats in (True, False)]
for name, dtype, consts in cases:
    fn = TT.kernel(name)
    sig = {a: (ptr[a].format(d=dtype) if a in ptr else "constexpr" if a in consts else "i32") for a in fn.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except RuntimeError as e:
        if "ptxas" in str(e):
            print("NO-PTXAS", e)
            sys.exit(0)
        raise
    assert len(compiled.asm["cubin"]) > 0, (name, dtype)
    print("compiled", name, dtype)
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """Triton's interpreter is lenient about types; compiling to sm_90 machine code catches what it lets through.
    In a fresh process: a process that imported Triton for its interpreter cannot compile (Triton >= 3.9)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if "NO-PTXAS" in r.stdout:
        pytest.skip(f"this Triton build cannot assemble for sm_90: {r.stdout[-300:]}")
    assert len([line for line in r.stdout.splitlines() if line.startswith("compiled")]) == 9


def test_autotuner_drops_a_selection_that_gives_wrong_ids_and_keeps_out_of_memory_fatal(monkeypatch,
                                                                                      call_once_timing):
    """The autotuner checks each Triton selection against `_exact_topk` on the first rows before timing it (a GPU-only
    bug such as a race would show there); an out-of-memory error is raised, not taken as a broken kernel."""
    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def off_by_one(x, kk):
        vals, ids, fix, stats = TT.select_blockmax_fused(x, kk, stats=True)
        ids = ids.clone()
        ids[3, -1] = (ids[3, -1] + 1) % x.shape[1]
        return vals, ids, fix, stats

    monkeypatch.setitem(T.EXACT_SELECTORS, "blockmax_fused", off_by_one)
    assert T.verify_exact_selector(x, "blockmax_fused", 20).startswith("wrong top-20 on row 3")
    assert T.verify_exact_selector(x, "blockmax_fused16", 20) is None
    assert T.choose_selector(x, 21, autotune=True, k=20) != "blockmax_fused"
    assert "wrong top-20" in T._failed_selectors[T._shape_key(x, "blockmax_fused")]
    assert "blockmax_fused" not in T.selector_candidates(x) and "blockmax_fused16" in T.selector_candidates(x)
    assert "blockmax_fused" in T.selector_candidates(x[:, :999])  # dropped for that shape only

    def oom(x, kk):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    T._selector_choice.clear()
    monkeypatch.setitem(T.EXACT_SELECTORS, "radix", oom)
    with pytest.raises(torch.OutOfMemoryError):
        T.choose_selector(x, 21, autotune=True, k=20)
    assert T._shape_key(x, "radix") not in T._failed_selectors


def test_precompute_writes_the_same_store_whatever_the_selection(tmp_path, monkeypatch, tiny_teacher):
    """End to end through `cdm.precompute.run` on a tiny teacher: the store written with each Triton selection is
    identical, array for array, to the one written with torch.topk (the selection must never show in the data), but
    for fp32 rounding in the statistics of a selection that accumulates them itself (as between the compiled and
    the eager statistics pass)."""
    from cdm.precompute import run
    from tests.test_precompute_run import QUIET, by_source

    monkeypatch.setenv("CDM_TOPK_EAGER", "1")  # no torch.compile here: the statistics are not what is compared
    data = write_jsonl(tmp_path / "d.jsonl", text_records(5, seed=8, max_chars=90))
    stores = {}
    for name in ("direct", "radix", "blockmax_fused"):
        monkeypatch.setenv("CDM_TOPK_SELECT", name)
        out = str(tmp_path / name)
        run(str(tiny_teacher), str(data), out, top_k=6, text_field="text", batch_tokens=256, device=DEVICE, **QUIET)
        stores[name] = by_source(out)
    for name in ("radix", "blockmax_fused"):
        assert sorted(stores[name]) == sorted(stores["direct"]) == list(range(5))
        for i, a in stores["direct"].items():
            b = stores[name][i]
            for f in ("token_ids", "char_spans", "topk_ids", "topk_logprobs", "logsumexp", "entropy"):
                if name in T.STATS_SELECTORS and f in ("topk_logprobs", "logsumexp", "entropy"):
                    # log-probs are stored in float16: a rounding difference in the log-sum-exp may move one by an ulp
                    tol = {"rtol": 2**-10, "atol": 1e-4} if f == "topk_logprobs" else {"rtol": 1e-6, "atol": 1e-5}
                    np.testing.assert_allclose(getattr(a, f), getattr(b, f), **tol, err_msg=f"{name}: sequence {i} {f}")
                else:
                    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{name}: sequence {i} {f}")


def test_verification_ignores_nan_rows_and_catches_flag_everything_and_a_wrong_maximum(monkeypatch):
    x = torch.randn(16, 2000, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    x[1, 5] = math.nan  # bad logits in the first chunk must not get a correct kernel dropped
    for name in ("radix", "blockmax_fused"):
        assert T.verify_exact_selector(x, name, 20) is None

    def flag_all(x, kk):
        vals, ids, _, stats = TT.select_blockmax_fused(x, kk, stats=True)
        return vals, ids, torch.ones(len(x), dtype=torch.bool, device=x.device), stats

    monkeypatch.setitem(T.EXACT_SELECTORS, "blockmax_fused", flag_all)
    assert T.verify_exact_selector(x, "blockmax_fused", 20) == "flags 15 of 15 rows for the exact fix-up"

    def bad_first_value_in_a_flagged_row(x, kk):
        vals, ids, _, stats = TT.select_blockmax_fused(x, kk, stats=True)
        fix = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        fix[4] = True
        vals = vals.clone()
        vals[4, 0] = vals[4, 1]
        return vals, ids, fix, stats

    monkeypatch.setitem(T.EXACT_SELECTORS, "blockmax_fused", bad_first_value_in_a_flagged_row)
    assert T.verify_exact_selector(x, "blockmax_fused", 20).startswith("wrong top-20 on row 4")

    def entropy_off_in_one_row(x, kk):
        vals, ids, fix, (lse, entropy) = TT.select_blockmax_fused(x, kk, stats=True)
        entropy = entropy.clone()
        entropy[9] += 0.01
        return vals, ids, fix, (lse, entropy)

    monkeypatch.setitem(T.EXACT_SELECTORS, "blockmax_fused", entropy_off_in_one_row)
    assert T.verify_exact_selector(x, "blockmax_fused", 20).startswith("wrong entropy on row 9")


def test_a_dropped_selection_is_not_used_from_the_cache(monkeypatch):
    """Chosen and cached for one k, then dropped on the same shape for another: the next chunk chooses again."""
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    monkeypatch.setattr(T, "_time_selector", lambda fn, device, reps=3: 0.0 if not fn.__defaults__ or
                        fn.__defaults__[0] is T.EXACT_SELECTORS["radix"] else 1.0)  # radix "fastest"
    assert T.choose_selector(x, 21, autotune=True, k=20) == "radix"
    T._drop_selector(x, "radix", "simulated failure at k = 5")
    assert T.choose_selector(x, 21, autotune=True, k=20) != "radix"


@pytest.mark.parametrize("stats_ms, expected", [(0.5, "blockmax_fused"), (0.05, "direct")])
def test_autotuner_charges_the_statistics_pass_to_selections_without_their_own(monkeypatch, stats_ms, expected):
    """A selection that gives the statistics saves the chunk its statistics pass: the autotuner compares it with the
    others plus that pass (timed once), so it wins exactly when it is faster than both together."""
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    names = {id(f): n for n, f in T.ALL_SELECTORS.items()}
    cost = {"blockmax_fused": 0.9, "blockmax_fused16": 1.2, "blockmax_fused4": 1.2, "direct": 0.8}

    def fake_time(fn, device, reps=3):
        if not fn.__defaults__:  # the statistics pass
            return stats_ms
        return cost.get(names[id(fn.__defaults__[0])], 5.0)

    monkeypatch.setattr(T, "_time_selector", fake_time)
    assert T.choose_selector(x, 21, autotune=True, k=20, impl="eager") == expected
    # what the chunk then stores is the same up to fp32 rounding either way
    res, _ = T._topk_chunk(x, 20, "eager")
    ids, lp, lse, ent, _ = reference(x.cpu().numpy(), 20)
    np.testing.assert_array_equal(res.ids.cpu().numpy(), ids)
    np.testing.assert_allclose(res.logsumexp.cpu().numpy(), lse, atol=1e-5)
    np.testing.assert_allclose(res.entropy.cpu().numpy(), ent, atol=1e-5)


def test_out_of_memory_in_a_chunk_is_raised_not_taken_as_a_broken_kernel(monkeypatch):
    x = torch.randn(8, 2000, generator=torch.Generator().manual_seed(13)).to(DEVICE)

    def oom(x, kk):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(T.EXACT_SELECTORS, "blockmax_fused", oom)
    monkeypatch.setattr(T, "choose_selector", lambda *a, **kw: "blockmax_fused")
    with pytest.raises(torch.OutOfMemoryError):
        T._topk_chunk(x, 5, "eager")
    assert not T._failed_selectors


def test_kernels_launch_inside_the_logits_device_context(monkeypatch):
    """Triton launches on the current CUDA device; both wrappers enter `_on_device(x)` around their launch, and that
    is `torch.cuda.device(x.device)` for a CUDA tensor (a stand-in here: no CUDA is needed to build the context)."""
    import contextlib
    import types

    entered = []

    @contextlib.contextmanager
    def record(x):
        entered.append(x.data_ptr())
        yield

    monkeypatch.setattr(TT, "_on_device", record)
    x = torch.randn(4, 2000).to(DEVICE)
    TT.select_radix(x, 5)
    TT.select_blockmax_fused(x, 5)
    assert entered == [x.data_ptr(), x.data_ptr()]
    monkeypatch.undo()
    ctx = TT._on_device(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 3)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 3
