"""Exact top-k of logit rows in one Triton kernel per chunk (CUDA; Triton's interpreter for the tests).

`torch.topk` makes ~20 passes over a [rows, V] chunk (a 2-bit radix select, then a gather); on an H200 it was 1.61 of
the 2.10 ms the 135M shape spends per 4,096-row chunk. Two kernels, one program per row, both breaking ties at the
kk-th place exactly as `topk._exact_topk` does (lowest ids win), so `topk._topk_chunk` runs them with kk = k:

- `select_radix`: the kk-th largest key digit by digit (8-bit histograms: 2 passes for bf16, 3 for fp16, 4 for
  fp32), then one pass collecting the entries above it and the lowest-id ones equal to it. Never needs a fix-up.
- `select_blockmax_fused`: `topk.select_blockmax` in one kernel: block maxima, a threshold that at least kk entries
  reach, the entries at or above it compacted (an atomic counter gives the slots), a bitonic top-k of those: two
  light passes over the row. A row with more
  candidates than its buffer holds (heavy ties at the threshold) is flagged for the exact fix-up. Its first pass can
  also accumulate the rows' log-sum-exp and entropy (`stats=True`), saving the chunk the separate statistics pass
  (0.22 ms of the 2.10 ms per chunk on the H200).

Triton is optional: `usable(x)` says whether these can run on `x`; `cdm.precompute.topk` offers them to its
selection autotuner only then, and drops one after a compile or launch failure.
"""

import contextlib
import importlib.util
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

ROUNDS = {torch.bfloat16: 2, torch.float16: 3, torch.float32: 4}  # 8-bit digits covering each dtype's fp32 key

_kernels: dict[tuple[str, bool], Any] = {}
_have_triton: bool | None = None


def have_triton() -> bool:
    """Triton is installed (it ships with CUDA builds of torch); found without importing it."""
    global _have_triton
    if _have_triton is None:
        _have_triton = importlib.util.find_spec("triton") is not None
    return _have_triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel(name: str) -> Any:
    """The jitted kernel `name` of `_topk_kernels`, built on first use (Triton reads TRITON_INTERPRET when it wraps
    a function, and importing Triton is deferred until then)."""
    key = (name, _interpreting())
    if key not in _kernels:
        import triton

        from cdm.precompute import _topk_kernels

        _kernels[key] = triton.jit(getattr(_topk_kernels, name))
    return _kernels[key]


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton selections can run on `x`: Triton present, a supported dtype, a CUDA tensor (or a CPU one
    under Triton's interpreter)."""
    if not have_triton() or x.dtype not in ROUNDS or x.ndim != 2:
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and _interpreting())


def _on_device(x: torch.Tensor) -> Any:
    """Launch on `x`'s GPU and its current stream: Triton launches on the *current* CUDA device, which under
    torchrun is not necessarily the one the logits are on."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check(x: torch.Tensor, kk: int) -> torch.Tensor:
    if x.ndim != 2 or not 1 <= kk <= x.shape[1]:
        raise ValueError(f"need 2-D logits and 1 <= kk <= {x.shape[-1]}, got shape {tuple(x.shape)} and kk={kk}")
    return x if x.stride(-1) == 1 else x.contiguous()


def select_radix(x: torch.Tensor, kk: int, block: int = 4096, warps: int = 8
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The kk largest entries of each row of `x` [rows, V] (values, int64 ids; in id order), ties at the kk-th place
    to the lowest ids: the same set as `topk._exact_topk`. Never needs a fix-up (third element None)."""
    x = _check(x, kk)
    rows, vocab = x.shape
    vals = torch.empty(rows, kk, dtype=x.dtype, device=x.device)
    ids = torch.empty(rows, kk, dtype=torch.int64, device=x.device)
    if rows:
        with _on_device(x):
            kernel("radix_topk_rows")[(rows,)](x, x.stride(0), vals, ids, vocab, kk, ROUNDS=ROUNDS[x.dtype],
                                               BLOCK=block, num_warps=warps)
    return vals, ids, None


def fused_block_size(vocab: int, max_blocks: int = 4096) -> int:
    """Block maxima over 32 entries, or more where that would leave over `max_blocks` maxima to rank in one program."""
    block = 32
    while -(-vocab // block) > max_blocks:
        block *= 2
    return block


def select_blockmax_fused(x: torch.Tensor, kk: int, tile: int = 4096, warps: int = 8, cap: int | None = None,
                          block: int | None = None, stats: bool = False) -> tuple[Any, ...]:
    """The kk largest entries of each row, sorted by (value desc, id asc), and a [rows] bool marking rows whose
    candidates overflowed the `cap` buffer (default 4 * kk rounded up to a power of two, at least 256): their
    outputs must be replaced by an exact selection (the first value is still the row's maximum). Falls back to
    `select_radix`, sorted, where V has fewer than kk blocks (of `block` entries, a power of two; default
    `fused_block_size`). On a real bf16 teacher (SmolLM2-135M, 9,255 rows)
    the candidates were 1.43 k on average and at most 2.6 k: the default buffer never overflowed.
    With `stats`, a fourth element: (log-sum-exp, entropy) [rows] fp32 of every row, accumulated in the kernel's
    first pass (`topk.row_stats_reference`'s values; non-finite for a row holding NaN/+inf or only -inf), or None
    where the radix fallback ran."""
    x = _check(x, kk)
    rows, vocab = x.shape
    block = block or fused_block_size(vocab)
    n_blocks = -(-vocab // block)
    if n_blocks < kk:
        from cdm.precompute.topk import _order_ties_by_id  # here: topk imports this module

        vals, ids, _ = select_radix(x, kk)
        # the fused kernel's order: value desc, equal values by id
        return (*_order_ties_by_id(vals, ids), None) + ((None,) if stats else ())
    kp = max(2, _next_pow2(kk))  # Triton's bitonic top-k needs two or more elements
    cap = _next_pow2(max(cap or 4 * kk, kp, 256 if cap is None else 1))
    nb = _next_pow2(max(n_blocks, kp))
    dev = x.device
    maxima = torch.empty(rows, nb, dtype=torch.float32, device=dev)
    count = torch.zeros(rows, dtype=torch.int32, device=dev)
    cand_vals = torch.empty(rows, cap, dtype=torch.float32, device=dev)
    cand_ids = torch.empty(rows, cap, dtype=torch.int32, device=dev)
    vals = torch.empty(rows, kk, dtype=x.dtype, device=dev)
    ids = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    overflow = torch.empty(rows, dtype=torch.int8, device=dev)
    # without stats the kernel never touches these: any valid device pointer will do (Triton refuses a null one)
    lse = torch.empty(rows, dtype=torch.float32, device=dev) if stats else maxima
    entropy = torch.empty_like(lse) if stats else maxima
    if rows:
        with _on_device(x):
            kernel("blockmax_topk_rows")[(rows,)](x, x.stride(0), maxima, count, cand_vals, cand_ids, vals, ids,
                                                  overflow, lse, entropy, vocab, kk, BLOCK=block,
                                                  TB=max(1, tile // block), NB=nb, KP=kp, CAP=cap, STATS=stats,
                                                  num_warps=warps)
    return (vals, ids, overflow.bool()) + (((lse, entropy),) if stats else ())
