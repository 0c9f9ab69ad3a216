"""Shared numerics of the sparse KD losses: input checks, the student normaliser, bucketed KL, per-row columns."""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


def check_rows(student_rows: Tensor, t_ids: Tensor, t_logprobs: Tensor | None = None) -> None:
    """Refuse mismatched KD inputs early with a message naming the offending argument (shape/dtype only, no sync)."""
    if student_rows.dim() != 2:
        raise ValueError(f"student_rows must be [R, V]; got shape {tuple(student_rows.shape)}")
    if t_ids.dim() != 2 or t_ids.shape[0] != student_rows.shape[0]:
        raise ValueError(
            f"t_ids must be [R, K] with R = student_rows.shape[0] = {student_rows.shape[0]}; got {tuple(t_ids.shape)}"
        )
    if t_ids.dtype != torch.int64:
        raise TypeError(f"t_ids must be int64 (teacher vocabulary ids); got {t_ids.dtype}")
    if t_logprobs is not None and t_logprobs.shape != t_ids.shape:
        raise ValueError(f"t_logprobs shape {tuple(t_logprobs.shape)} differs from t_ids shape {tuple(t_ids.shape)}")
    if not student_rows.is_floating_point():
        raise TypeError(f"student_rows must be floating point logits; got {student_rows.dtype}")


def check_temperature(temperature: float) -> None:
    """Temperatures must be positive finite numbers."""
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")


def row_mean(x: Tensor) -> Tensor:
    """Mean over rows that is 0 (not NaN) for an empty batch, without a host sync."""
    return x.sum() / max(x.shape[0], 1)


def zero_loss(student_rows: Tensor) -> Tensor:
    """A 0 loss still connected to the student graph (so backward() works on a batch with no KD rows)."""
    return student_rows.sum().float() * 0.0


def student_lse(rows: Tensor, vocab: int, tau: float) -> Tensor:
    """log Σ_v exp(z_v/τ) over the first `vocab` student ids, in fp32: the one full-width pass a tail bucket needs."""
    x = rows[:, :vocab]
    if x.dtype == torch.float32:
        x = x / tau if tau != 1.0 else x
    else:
        x = x.float()  # a fresh fp32 copy: safe to scale in place (ToCopy's backward keeps no output)
        if tau != 1.0:
            x = x.div_(tau)
    return torch.logsumexp(x, dim=-1)


def bucket_kl(
    t_logv: Tensor,
    s_logit: Tensor,
    valid: Tensor,
    tau: float,
    s_lse: Tensor | None = None,
    t_tail_logmass: Tensor | None = None,
) -> Tensor:
    """Per-row forward KL(p‖q) over the valid columns, τ on both sides; with `s_lse`, plus one tail bucket.

    Teacher p ∝ exp(t_logv/τ) over the columns (and exp(t_tail_logmass/τ) for the tail bucket; None = no tail
    mass). Student: without `s_lse`, softmax(z/τ) renormalised over the columns; with `s_lse` (= lse(z/τ) over
    the student vocabulary) its full-vocab probabilities, the tail bucket holding the mass outside the columns.
    All inputs are fp32 [R, C] ([R] for `s_lse`, `t_tail_logmass`); rows without valid columns give 0 (no tail).
    """
    u = torch.where(valid, t_logv / tau, NEG_INF)
    if s_lse is not None:
        if t_tail_logmass is None:
            tail_u = torch.full_like(u[:, :1], NEG_INF)
        else:
            tail_u = (t_tail_logmass / tau).unsqueeze(1)
        lse_t = torch.logsumexp(torch.cat([u, tail_u], dim=1), dim=1)
    else:
        lse_t = torch.logsumexp(u, dim=1)
    lse_t = torch.where(torch.isfinite(lse_t), lse_t, 0.0)
    log_p = u - lse_t[:, None]
    p = log_p.exp()
    x = s_logit / tau
    if s_lse is None:
        xm = torch.where(valid, x, NEG_INF)
        xm = torch.where(valid.any(dim=1, keepdim=True), xm, 0.0)
        log_q = xm - torch.logsumexp(xm, dim=1, keepdim=True)
    else:
        log_q = x - s_lse[:, None]
    live = valid & (p > 0)
    terms = torch.where(live, p * (torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0)), 0.0)
    kl = terms.sum(dim=1)
    if s_lse is not None:
        log_p_tail = tail_u.squeeze(1) - lse_t
        p_tail = log_p_tail.exp()
        q_cols = torch.where(valid, log_q.exp(), 0.0).sum(dim=1)
        log_q_tail = torch.log(torch.clamp(1.0 - q_cols, min=_TINY))
        live_t = p_tail > 0
        kl = kl + torch.where(live_t, p_tail * (torch.where(live_t, log_p_tail, 0.0) - log_q_tail), 0.0)
    return kl


def _shift_right(x: Tensor, off: int, fill: float | int | bool) -> Tensor:
    """x shifted `off` places to the right along dim 1, `fill` entering on the left."""
    return torch.cat([torch.full_like(x[:, :off], fill), x[:, :-off]], dim=1)


def row_columns(
    ids: Tensor, values: Tensor, flags: Tensor, vocab: int, reduce: str = "logsumexp"
) -> tuple[Tensor, Tensor, Tensor]:
    """Group each row's (id, value) entries by id: unique ids ascending (−1 padding last), reduced values, flags.

    Entries with id < 0 or ≥ `vocab` are ignored. `reduce` is "logsumexp" (aggregate log-masses) or "max".
    Returns cols [R, E] int64, vals [R, E] fp32 (−inf padding), any-flag [R, E] bool. Sort by id, then a
    segmented doubling scan (log2 E passes over [R, E]): fixed reduction order, so deterministic on every device.
    """
    if reduce not in ("logsumexp", "max"):
        raise ValueError(f"reduce must be 'logsumexp' or 'max'; got {reduce!r}")
    r, e = ids.shape
    if e == 0:
        return ids.clone(), values.float().clone(), flags.clone()
    ok = (ids >= 0) & (ids < vocab)
    key, order = torch.where(ok, ids, vocab).sort(dim=1, stable=True)
    valid = key < vocab
    v = torch.where(valid, values.float().gather(1, order), NEG_INF)
    f = valid & flags.gather(1, order)
    op = torch.logaddexp if reduce == "logsumexp" else torch.maximum
    off = 1
    while off < e:  # after the pass with offset `off`, entry i holds the reduction over its segment's last 2·off
        same = _shift_right(key, off, -1) == key
        v = torch.where(same, op(v, _shift_right(v, off, NEG_INF)), v)
        f = f | (same & _shift_right(f, off, False))
        off *= 2
    end = valid & (torch.cat([key[:, 1:], torch.full_like(key[:, :1], -1)], dim=1) != key)
    col = (end.cumsum(dim=1) - 1).clamp_min(0)
    dest = torch.where(end, col, e + torch.arange(e, device=ids.device))  # unique destinations: no write races
    cols = torch.full((r, 2 * e), -1, dtype=ids.dtype, device=ids.device).scatter_(1, dest, key)[:, :e]
    vals = torch.full((r, 2 * e), NEG_INF, device=ids.device).scatter_(1, dest, v)[:, :e]
    any_flag = torch.zeros((r, 2 * e), dtype=torch.bool, device=ids.device).scatter_(1, dest, f)[:, :e]
    return cols, vals, any_flag
