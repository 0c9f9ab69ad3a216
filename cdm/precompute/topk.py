"""Top-k log-probs, log-sum-exp and full-vocabulary entropy of logit rows, chunked under a memory budget.

Pure torch, device-agnostic. Ordering is deterministic: logits (hence log-probs) descending, equal logits by
ascending id, including ties at the k-th place (the lowest ids win), so CPU and CUDA runs store the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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


def _topk_chunk(logits: torch.Tensor, k: int) -> TopK:
    """One chunk: two fp32 [rows, V] temporaries; top-k selected on the logits in their own dtype."""
    vocab = logits.shape[-1]
    kk = k + _margin(logits.dtype, k, vocab)
    vals, ids = logits.topk(kk, dim=-1)  # descending; vals[:, 0] is the row max
    top = vals[:, :1].float()
    d = logits.to(torch.float32, copy=True)
    d.sub_(top)  # x - max <= 0
    e = d.exp()
    z = e.sum(-1)
    s = torch.linalg.vecdot(e, d)  # sum e*(x-max); NaN where x = -inf (0 * -inf)
    del e
    logz = z.log()
    lse = top[:, 0] + logz
    entropy = logz - s / z  # H = log Z - E[x - max]
    bad_entropy = torch.isnan(entropy) & torch.isfinite(lse)
    vals, ids = _order_ties_by_id(vals, ids)
    overflow = (vals[:, k - 1] == vals[:, kk - 1]) if kk < vocab else torch.zeros_like(lse, dtype=torch.bool)
    vals, ids = vals[:, :k].float(), ids[:, :k]
    need_entropy, need_exact = torch.stack([bad_entropy.any(), overflow.any()]).tolist()
    if need_entropy:  # rows with -inf logits: recompute with nansum, skipping 0 * -inf
        rows = bad_entropy.nonzero()[:, 0]
        p = torch.exp(d[rows] - logz[rows, None])
        entropy[rows] = -torch.nansum(p * (d[rows] - logz[rows, None]), dim=-1)
    del d
    if need_exact:  # a tie group at the k-th place runs past the fetched candidates
        rows = overflow.nonzero()[:, 0]
        vals[rows], ids[rows] = _exact_topk(logits[rows].float(), k)
    return TopK(ids.to(torch.int32), vals - lse[:, None], lse, entropy)


def topk_stats(
    logits: torch.Tensor | Callable[[int, int], torch.Tensor],
    k: int,
    *,
    n_rows: int | None = None,
    vocab_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> TopK:
    """Top-k log-probs (full-vocab normalised, T=1), log-sum-exp and entropy of every row.

    `logits` is a [n, V] tensor or a function (start, stop) -> logits of rows start:stop (then pass `n_rows`
    and `vocab_size`), so callers can produce logits chunk by chunk (e.g. lm_head on hidden states) and no
    fp32 [rows, V] temporary exceeds `memory_budget` bytes (peak: two such temporaries plus the logits chunk;
    rows whose k-th place ties past the fetched candidates use an int64 [rows, V] key).
    """
    if isinstance(logits, torch.Tensor):
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D [tokens, vocab], got shape {tuple(logits.shape)}")
        source = logits
        n_rows, vocab_size = logits.shape

        def produce(a: int, b: int) -> torch.Tensor:
            return source[a:b]

    else:
        if n_rows is None or vocab_size is None:
            raise ValueError("a logits producer needs n_rows and vocab_size")
        produce = logits
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k must be in [1, vocab size {vocab_size}], got {k}")
    step = rows_per_chunk(vocab_size, memory_budget)
    parts = [_topk_chunk(produce(a, min(a + step, n_rows)), k) for a in range(0, n_rows, step)]
    if parts:
        lse = torch.cat([p.logsumexp for p in parts])
        if not bool(torch.isfinite(lse).all()):
            bad = int((~torch.isfinite(lse)).nonzero()[0, 0])
            raise FloatingPointError(f"row {bad}: logits are NaN/inf or all -inf (log-sum-exp {lse[bad].item()})")
    if not parts:
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        empty = torch.empty(0, device=device)
        return TopK(torch.empty(0, k, dtype=torch.int32, device=device), torch.empty(0, k, device=device), empty, empty)
    return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "logsumexp", "entropy")))


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
