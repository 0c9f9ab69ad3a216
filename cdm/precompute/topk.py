"""Top-k log-probs, log-sum-exp and full-vocabulary entropy of logit rows, chunked under a memory budget.

Pure torch, device-agnostic. Ordering is deterministic: logits (hence log-probs) descending, equal logits by
ascending id, including ties at the k-th place (the lowest ids win), so CPU and CUDA runs store the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import os
import time
import warnings
from typing import Any, Callable

import torch

from cdm.precompute import triton_topk

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of one fp32 [rows, V] temporary


@dataclass
class TopK:
    """Per-row teacher statistics: ids/logprobs [n, k] (descending), logsumexp [n] and entropy [n] (nats)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "TopK":
        return TopK(*(t.to(device, non_blocking=non_blocking) for t in (self.ids, self.logprobs, self.logsumexp, self.entropy)))


def rows_per_chunk(vocab_size: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows such that one fp32 [rows, vocab] temporary fits the budget (at least one row)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return max(1, int(memory_budget) // (4 * vocab_size))


def _sortable_int64(values: torch.Tensor) -> torch.Tensor:
    """Map fp32 values to int64 keys with the same order (-0.0 == +0.0)."""
    bits = (values + 0.0).contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


def _exact_topk(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by (value desc, id asc) via a composite int64 key: exact but slower; used only for tied rows."""
    vocab = logprobs.shape[-1]
    key = _sortable_int64(logprobs) << 32
    key |= (vocab - 1) - torch.arange(vocab, device=logprobs.device, dtype=torch.int64)
    top = key.topk(k, dim=-1).values
    ids = (vocab - 1) - (top & 0xFFFFFFFF)
    return logprobs.gather(-1, ids), ids


def _order_ties_by_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row's k entries to (value desc, id asc); the set is unchanged."""
    ids, perm = ids.sort(dim=-1)
    values = values.gather(-1, perm)
    values, perm = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, perm)


def _margin(dtype: torch.dtype, k: int, vocab: int) -> int:
    """Extra candidates fetched past the k-th so that a tie group at the k-th place usually fits among them:
    ties are rare in fp32 but common in bf16/fp16 logits (8-11 mantissa bits)."""
    extra = 1 if dtype in (torch.float32, torch.float64) else 64
    return max(0, min(extra, vocab - k))


STATS_IMPLS = ("auto", "compiled", "eager")


def row_stats_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, entropy) of each row in one expression: the function `torch.compile` fuses into one pass
    over the logits in their own dtype (no fp32 [rows, V] copy). -inf logits contribute 0 (not 0 * -inf)."""
    x = logits.float()
    m = x.amax(-1, keepdim=True)
    d = x - m
    e = d.exp()
    z = e.sum(-1)
    s = torch.where(e > 0, e * d, 0.0).sum(-1)
    logz = z.log()
    return m[:, 0] + logz, logz - s / z


def _row_stats_eager(logits: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager (log-sum-exp, entropy) given the row maxima `top` [rows, 1]: two fp32 [rows, V] temporaries."""
    d = logits.to(torch.float32, copy=True)
    d.sub_(top)  # x - max <= 0
    d.clamp_(min=torch.finfo(torch.float32).min)  # -inf -> finite, so e * d is 0, not NaN
    e = d.exp()
    z = e.sum(-1)
    s = torch.linalg.vecdot(e, d)  # sum e * (x - max)
    del e, d
    logz = z.log()
    return top[:, 0] + logz, logz - s / z  # H = log Z - E[x - max]


class _CompiledStats:
    """`row_stats_reference` through torch.compile, built on first use per process; any failure to compile
    (no compiler, an unsupported device) is logged once and the eager path is used from then on."""

    def __init__(self) -> None:
        self._fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.failed: str | None = None

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.failed is not None:
            return None
        try:
            if self._fn is None:
                self._fn = torch.compile(row_stats_reference, dynamic=False)
            torch._dynamo.maybe_mark_dynamic(logits, 0)  # the row count varies; the vocabulary does not
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # compiler chatter must not turn into errors under -W error
                return self._fn(logits)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure falls back to eager
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("top-k statistics: torch.compile unavailable (%s); using the eager path", self.failed)
            return None


compiled_stats = _CompiledStats()


def _separate_stats(logits: torch.Tensor, impl: str, row_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, entropy) by the statistics pass `impl` ('compiled', else or if compiling fails 'eager');
    `row_max` [rows, 1] fp32 is the eager path's shift."""
    stats = compiled_stats(logits) if impl == "compiled" else None
    return stats if stats is not None else _row_stats_eager(logits, row_max)


def resolve_stats_impl(impl: str) -> str:
    """'auto' -> 'compiled' (one fused pass, see `row_stats_reference`) unless CDM_TOPK_EAGER=1 is set."""
    if impl not in STATS_IMPLS:
        raise ValueError(f"stats implementation must be one of {STATS_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "eager" if os.environ.get("CDM_TOPK_EAGER") == "1" else "compiled"
    return impl


def select_direct(x: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk largest entries of each row (unordered): one torch.topk over the whole row."""
    return x.topk(kk, dim=-1, sorted=False)


def select_blockmax(x: torch.Tensor, kk: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk largest entries of each row (unordered) via block maxima, reading the row once instead of in several
    radix passes: with t the kk-th largest maximum of `block`-sized blocks, at least kk entries are >= t, so every
    entry of the row's top-kk is >= t and lies in one of the kk blocks whose maximum is >= t; top-k then runs on
    those kk * block candidates. Entries tied with the kk-th value may differ from `select_direct`'s choice;
    `_topk_chunk` only relies on the kk-th value, which is the same."""
    rows, vocab = x.shape
    nb = vocab // block
    if nb < kk or block * kk >= vocab:
        return select_direct(x, kk)
    main = x[:, : nb * block]
    main = main.view(rows, nb, block) if x.is_contiguous() else main.reshape(rows, nb, block)
    _, blocks = main.amax(-1).topk(kk, dim=-1, sorted=False)  # [rows, kk]
    cand = main.gather(1, blocks[:, :, None].expand(rows, kk, block)).reshape(rows, kk * block)
    if nb * block < vocab:  # the last partial block is always a candidate
        cand = torch.cat([cand, x[:, nb * block :]], 1)
    vals, j = cand.topk(kk, dim=-1, sorted=False)
    # candidate position -> vocabulary id, without materialising an id per candidate
    in_blocks = j < kk * block
    jb = torch.where(in_blocks, j, 0)
    ids = blocks.gather(1, jb // block) * block + jb % block
    ids = torch.where(in_blocks, ids, j - kk * block + nb * block)
    return vals, ids


SELECTORS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "direct": select_direct,
    **{f"blockmax{b}": (lambda x, kk, b=b: select_blockmax(x, kk, b)) for b in (16, 32, 64)},
}
# Selections that also break ties at the kk-th place exactly (lowest ids win, as `_exact_topk`): they run with kk = k,
# so no tie margin; they return (values, ids, rows needing the exact fix-up or None, (log-sum-exp, entropy) of every
# row or None). Offered only where `triton_topk.usable(x)` (Triton on CUDA, or its interpreter).
ExactSelection = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "tuple[torch.Tensor, torch.Tensor] | None"]
EXACT_SELECTORS: dict[str, Callable[[torch.Tensor, int], ExactSelection]] = {
    "radix": lambda x, kk: (*triton_topk.select_radix(x, kk, 4096, 8), None),
    "blockmax_fused": lambda x, kk: triton_topk.select_blockmax_fused(x, kk, warps=8, stats=True),
    "blockmax_fused16": lambda x, kk: triton_topk.select_blockmax_fused(x, kk, warps=16, stats=True),
    "blockmax_fused4": lambda x, kk: triton_topk.select_blockmax_fused(x, kk, tile=2048, warps=4, stats=True),
}
SORTED_SELECTORS = ("blockmax_fused", "blockmax_fused16", "blockmax_fused4")  # output in (value desc, id asc) order
STATS_SELECTORS = SORTED_SELECTORS  # also give the rows' log-sum-exp and entropy: the chunk skips its statistics pass
ALL_SELECTORS = {**SELECTORS, **EXACT_SELECTORS}
_selector_choice: dict[tuple[Any, ...], str] = {}


def _time_selector(fn: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


_failed_selectors: dict[tuple[Any, ...], str] = {}  # (device type, dtype, V, selection) -> why it was dropped


def _shape_key(x: torch.Tensor, name: str) -> tuple[Any, ...]:
    return (x.device.type, x.dtype, x.shape[-1], name)


def _drop_selector(x: torch.Tensor, name: str, error: BaseException | str) -> None:
    """Stop offering a Triton selection for chunks like `x` after it failed to compile or run, or gave a wrong
    result, there (logged once)."""
    key = _shape_key(x, name)
    if key not in _failed_selectors:
        _failed_selectors[key] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        log.warning("top-k selection %s dropped for %s %s logits of width %d (%s); not used from now on", name,
                    x.device.type, x.dtype, x.shape[-1], _failed_selectors[key].splitlines()[0])
    for choice_key in [c for c, chosen in _selector_choice.items() if chosen == name]:
        del _selector_choice[choice_key]  # a cached choice of it is chosen again


def selector_candidates(x: torch.Tensor) -> dict[str, Callable[[torch.Tensor, int], Any]]:
    """The selections that can run on `x`: the torch ones always, the Triton ones where usable and not dropped."""
    exact = EXACT_SELECTORS if triton_topk.usable(x) else {}
    return {**SELECTORS, **{n: f for n, f in exact.items() if _shape_key(x, n) not in _failed_selectors}}


STATS_RTOL, STATS_ATOL = 1e-4, 1e-3  # a kernel's fp32 statistics against the fp32 reference (differences seen: ~1e-6)
MAX_FLAGGED_SHARE = 0.125  # a selection that leaves more rows than this to the exact fix-up is not worth using
VERIFY_ROWS = 128  # rows of the first chunk of a shape on which each Triton selection is checked


def verify_exact_selector(x: torch.Tensor, name: str, k: int, rows: int = VERIFY_ROWS,
                          reference: torch.Tensor | None = None) -> str | None:
    """Check an exact-tie selection against `_exact_topk` (ids `reference`, computed if None) on the first `rows`
    rows of `x`, on its device: None if it agrees, else what was wrong. Rows holding a NaN are left out (the chunk is
    refused later anyway, and NaN != NaN). Checked: the ids of every row it did not flag for the fix-up, the first
    value (the row's maximum) of every row, that it flags at most MAX_FLAGGED_SHARE of the rows (flagging every
    row would pass the id check while leaving all the work to the slow fix-up), and, for a selection that also gives
    the statistics, those of every row whose float64 ones are finite. The autotuner runs this once per
    shape, so a kernel that misbehaves on this GPU (e.g. a race the interpreter cannot show) is dropped."""
    sample = x[:rows]
    if reference is None:
        reference = _exact_topk(sample.float(), k)[1]
    vals, ids, fix, stats = EXACT_SELECTORS[name](sample, k)
    if name not in SORTED_SELECTORS:
        vals, ids = _order_ties_by_id(vals, ids)
    usable = ~torch.isnan(sample).any(-1)
    flagged = torch.zeros_like(usable) if fix is None else fix & usable
    if int(flagged.sum()) > MAX_FLAGGED_SHARE * max(1, int(usable.sum())):
        return f"flags {int(flagged.sum())} of {int(usable.sum())} rows for the exact fix-up"
    wrong_ids = (ids != reference).any(-1) | (vals != sample.gather(1, ids.clamp(0, x.shape[-1] - 1))).any(-1)
    bad = usable & ((~flagged & wrong_ids) | (vals[:, 0] != sample.amax(-1)))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        return (f"wrong top-{k} on row {r} of {len(sample)} (ids {ids[r, :5].tolist()}... where _exact_topk gives "
                f"{reference[r, :5].tolist()}...)")
    if stats is not None:
        for what, got, want in zip(("log-sum-exp", "entropy"), stats, row_stats_reference(sample)):
            off = torch.isfinite(want) & ~torch.isclose(got, want, rtol=STATS_RTOL, atol=STATS_ATOL)
            if bool(off.any()):
                r = int(off.nonzero()[0, 0])
                return (f"wrong {what} on row {r} of {len(sample)} ({got[r].item()} where row_stats_reference gives "
                        f"{want[r].item()})")
    return None


def choose_selector(x: torch.Tensor, kk: int, autotune: bool | None = None, k: int | None = None,
                    impl: str = "eager") -> str:
    """Which exact top-k selection to use for chunks like `x`: $CDM_TOPK_SELECT if set; 'direct' on CPU (where it
    measured fastest); on an accelerator (or with `autotune`) the fastest candidate, timed once on the first chunk
    of each (device, dtype, vocabulary, kk, statistics `impl`): the margin-based ones at `kk`, the exact-tie ones at
    `k` (default kk), which is what `_topk_chunk` runs them with; a candidate that does not give the statistics is
    charged the time of the separate statistics pass (`impl`) it leaves to the chunk. A Triton candidate that fails
    to compile or run, or disagrees with `_exact_topk` or float64 statistics on the chunk's first rows, is dropped for
    that shape."""
    forced = os.environ.get("CDM_TOPK_SELECT")
    if forced:
        if forced not in ALL_SELECTORS:
            raise ValueError(f"CDM_TOPK_SELECT must be one of {sorted(ALL_SELECTORS)}, got {forced!r}")
        if forced not in selector_candidates(x):
            raise ValueError(f"CDM_TOPK_SELECT={forced} cannot run on {x.device.type} {x.dtype} logits "
                             "(the Triton selections need Triton and a CUDA device)")
        return forced
    if not (autotune if autotune is not None else x.device.type != "cpu"):
        return "direct"
    key = (str(x.device), x.dtype, x.shape[-1], kk, k, impl)
    candidates = selector_candidates(x)
    if _selector_choice.get(key) not in candidates:
        times: dict[str, float] = {}
        reference: list[torch.Tensor] = []  # `_exact_topk` ids of the sample rows, computed once for all kernels
        for name, f in candidates.items():
            exact = name in EXACT_SELECTORS
            try:
                if exact and not reference:
                    reference.append(_exact_topk(x[:VERIFY_ROWS].float(), k or kk)[1])
                wrong = verify_exact_selector(x, name, k or kk, VERIFY_ROWS, reference[0]) if exact else None
                if wrong:
                    _drop_selector(x, name, wrong)
                    continue
                times[name] = _time_selector(lambda f=f, n=(k or kk) if exact else kk: f(x, n), x.device)
            except torch.OutOfMemoryError:
                raise  # transient: not a reason to drop a kernel for the rest of the run
            except Exception as e:  # noqa: BLE001 - an optional kernel that cannot build here is skipped
                if not exact:
                    raise
                _drop_selector(x, name, e)
        stats_time = 0.0
        if any(n in STATS_SELECTORS for n in times) and any(n not in STATS_SELECTORS for n in times):
            row_max = x.amax(-1, keepdim=True).float()
            stats_time = _time_selector(lambda: _separate_stats(x, impl, row_max), x.device)
            for n in times:
                times[n] += 0.0 if n in STATS_SELECTORS else stats_time
        _selector_choice[key] = min(times, key=times.get)  # type: ignore[arg-type]
        log.info("top-k selection for %s: %s (%s; those without their own statistics include the %s pass, %.2f ms)",
                 key, _selector_choice[key], ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in times.items()), impl,
                 1e3 * stats_time)
    return _selector_choice[key]


def _topk_chunk(logits: torch.Tensor, k: int, impl: str = "eager", select: str | None = None) -> tuple[TopK, torch.Tensor]:
    """One chunk -> (statistics, overflow [rows] bool) without any host synchronisation.

    Top-k is selected on the logits in their own dtype. A margin-based selection fetches extra candidates for ties;
    `overflow` marks rows whose tie group at the k-th place runs past them (their ids are fixed later by
    `_exact_topk`). An exact-tie selection fetches exactly k and flags only the rows it could not finish."""
    vocab = logits.shape[-1]
    kk = k + _margin(logits.dtype, k, vocab)
    name = select or choose_selector(logits, kk, k=k, impl=impl)
    exact = name in EXACT_SELECTORS
    if exact:
        kk = k
    fix = stats = None
    try:
        if exact:
            vals, ids, fix, stats = EXACT_SELECTORS[name](logits, kk)
        else:
            vals, ids = SELECTORS[name](logits, kk)
    except Exception as e:  # noqa: BLE001 - an autotuned Triton pick that fails on a new shape: drop it, retry
        forced = select is not None or os.environ.get("CDM_TOPK_SELECT")
        if not exact or forced or isinstance(e, torch.OutOfMemoryError):
            raise
        _drop_selector(logits, name, e)  # also forgets it as the cached choice
        return _topk_chunk(logits, k, impl)
    if name not in SORTED_SELECTORS:
        vals, ids = _order_ties_by_id(vals, ids)  # descending, equal values by id; vals[:, 0] is the row max
    lse, entropy = stats if stats is not None else _separate_stats(logits, impl, vals[:, :1].float())
    if fix is not None:
        overflow = fix
    elif exact or kk >= vocab:
        overflow = torch.zeros_like(lse, dtype=torch.bool)
    else:
        overflow = vals[:, k - 1] == vals[:, kk - 1]
    vals, ids = vals[:, :k].float(), ids[:, :k]
    return TopK(ids.to(torch.int32), vals - lse[:, None], lse, entropy), overflow


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class PendingTopK:
    """Top-k statistics whose device work is queued but not waited for.

    `to_host()` queues non-blocking copies into pinned host memory; `resolve()` waits, checks the log-sum-exp,
    fixes the rare rows whose k-th place tie ran past the fetched candidates (`fix_rows(rows)` -> exact ids and
    log-probs of those rows, on the device) and returns the final TopK (on the host after `to_host()`, else on the
    device)."""

    def __init__(self, result: TopK, overflow: torch.Tensor, k: int,
                 fix_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self._dev, self._overflow, self.k, self._fix_rows = result, overflow, k, fix_rows
        self._host: tuple[TopK, torch.Tensor] | None = None
        self._event: Any = None

    @classmethod
    def exact(cls, result: TopK, k: int) -> "PendingTopK":
        """A result that is already final (no row needs a tie fix-up)."""
        def no_fix(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise AssertionError("no row of an exact result needs a tie fix-up")

        return cls(result, torch.zeros(result.ids.shape[0], dtype=torch.bool, device=result.ids.device), k, no_fix)

    def to_host(self) -> "PendingTopK":
        dev = self._dev.ids.device
        if dev.type == "cuda":
            self._host = (TopK(*(_pinned_copy(t) for t in (self._dev.ids, self._dev.logprobs, self._dev.logsumexp,
                                                            self._dev.entropy))), _pinned_copy(self._overflow))
            self._event = torch.cuda.Event()
            self._event.record()
        elif dev.type != "cpu":
            self._host = (self._dev.to("cpu"), self._overflow.to("cpu"))
        return self

    def resolve(self) -> TopK:
        if self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            res, overflow = self._host
        else:
            res, overflow = self._dev, self._overflow
        lse = res.logsumexp
        if lse.numel() and not bool(torch.isfinite(lse).all()):
            bad = int((~torch.isfinite(lse)).nonzero()[0, 0])
            raise FloatingPointError(f"row {bad}: logits are NaN/inf or all -inf (log-sum-exp {lse[bad].item()})")
        if overflow.numel() and bool(overflow.any()):  # a tie group at the k-th place ran past the candidates
            rows = overflow.nonzero()[:, 0]
            dev_rows = rows.to(self._dev.ids.device)
            with torch.inference_mode():  # lm_head on inference tensors, in-place updates of inference tensors
                ids, logprobs = self._fix_rows(dev_rows)
                res.ids[rows] = ids.to(res.ids.device, torch.int32)
                res.logprobs[rows] = logprobs.to(res.logprobs.device)
        self._dev = self._overflow = self._fix_rows = None  # type: ignore[assignment]
        return res


def topk_stats_async(
    logits: torch.Tensor | Callable[[int, int], torch.Tensor],
    k: int,
    *,
    n_rows: int | None = None,
    vocab_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    impl: str = "auto",
) -> PendingTopK:
    """Queue the work of `topk_stats` without waiting for the device; see `PendingTopK`. Rows needing a tie fix-up
    get it from their chunk, produced again once per chunk (same shapes as the first pass, hence the same logits)."""
    if isinstance(logits, torch.Tensor):
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D [tokens, vocab], got shape {tuple(logits.shape)}")
        source = logits
        n_rows, vocab_size = logits.shape

        def produce(a: int, b: int) -> torch.Tensor:
            return source[a:b]

        device = logits.device
    else:
        if n_rows is None or vocab_size is None:
            raise ValueError("a logits producer needs n_rows and vocab_size")
        produce = logits
        device = None
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k must be in [1, vocab size {vocab_size}], got {k}")
    step = rows_per_chunk(vocab_size, memory_budget)
    stats_impl = resolve_stats_impl(impl)
    parts = []
    for a in range(0, n_rows, step):
        chunk = produce(a, min(a + step, n_rows))
        parts.append(_topk_chunk(chunk, k, stats_impl))
    if not parts:
        device = device or torch.device("cpu")
        empty = torch.empty(0, device=device)
        res = TopK(torch.empty(0, k, dtype=torch.int32, device=device), torch.empty(0, k, device=device), empty, empty)
        return PendingTopK.exact(res, k)
    res = TopK(*(torch.cat([getattr(p, f) for p, _ in parts]) for f in ("ids", "logprobs", "logsumexp", "entropy")))
    lse = res.logsumexp

    def fix_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of `rows` (ascending), chunk by chunk: memory stays within the chunk budget."""
        ids_out, lp_out = [], []
        chunk_of = rows // step
        for c in torch.unique(chunk_of).tolist():
            sel = rows[chunk_of == c]
            a = int(c) * step
            x = produce(a, min(a + step, n_rows))[sel - a].float()
            vals, ids = _exact_topk(x, k)
            ids_out.append(ids)
            lp_out.append(vals - lse[sel, None])
        return torch.cat(ids_out), torch.cat(lp_out)

    return PendingTopK(res, torch.cat([o for _, o in parts]), k, fix_rows)


def topk_stats(
    logits: torch.Tensor | Callable[[int, int], torch.Tensor],
    k: int,
    *,
    n_rows: int | None = None,
    vocab_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    impl: str = "auto",
) -> TopK:
    """Top-k log-probs (full-vocab normalised, T=1), log-sum-exp and entropy of every row.

    `logits` is a [n, V] tensor or a function (start, stop) -> logits of rows start:stop (then pass `n_rows`
    and `vocab_size`), so callers can produce logits chunk by chunk (e.g. lm_head on hidden states) and no
    fp32 [rows, V] temporary exceeds `memory_budget` bytes (eager peak: two such temporaries plus the logits
    chunk; the compiled path reads the logits in their own dtype and makes none; rows whose k-th place ties past
    the fetched candidates use an int64 [rows, V] key). `impl`: 'compiled' fuses log-sum-exp and entropy into one
    pass with torch.compile (falls back to 'eager' if compiling fails); 'auto' = compiled unless CDM_TOPK_EAGER=1.
    A Triton selection that accumulates the statistics in its own first pass (`STATS_SELECTORS`, GPU only, chosen
    by the autotuner when faster) makes the statistics pass unnecessary whatever `impl` says.
    """
    return topk_stats_async(logits, k, n_rows=n_rows, vocab_size=vocab_size, memory_budget=memory_budget,
                            impl=impl).resolve()


def entropy_lower_bound(logprobs: torch.Tensor) -> torch.Tensor:
    """Full-vocab entropy estimate from normalised top-k log-probs alone (backends that give no entropy).

    H >= -sum_K p log p - r log p_K with r = 1 - sum_K p (the tail mass spread over tokens as likely as the
    k-th): the smallest entropy consistent with the top-k; exact when r = 0. See cdm-method notes §7.
    """
    lp = logprobs.double()
    p = lp.exp()
    head = -torch.nansum(p * lp, dim=-1)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    return (head - tail * lp[..., -1]).to(torch.float32)
