"""MinED baseline (DSKD) adapted to a stored teacher top-K: static projection onto student ids, forward KL."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import bucket_kl, check_rows, check_temperature, row_columns, row_mean, student_lse, zero_loss


def mined_loss(
    student_rows: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    mined_t2s: Tensor,
    student_vocab_size: int,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    onehot_rows: Tensor | None = None,
    reduce: str = "max",
    scale_tau_sq: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward KL from the teacher top-K projected through the static MinED map; returns (loss, stats).

    Each teacher top-K id t lands on student column mined_t2s[t] (−1/≥ Vs: dropped); a column's value is the
    max (DSKD's rule; or "logsumexp") of its teacher log-probs. Teacher p = softmax(value/τ) over the columns,
    student log q = full-vocab log_softmax(z/τ): as in DSKD, where unmapped student ids get teacher logit −1e5.
    Approximate vs DSKD: only the stored top-K is projected (DSKD projects every teacher id, so student ids
    whose teacher preimage lies outside the top-K get no teacher mass here), and DSKD's max runs over only the
    first and last teacher id per student id. Rows flagged in `onehot_rows` (DSKD: alignment not 1↔1 or the
    ids disagree) or with no mapped column use a one-hot teacher on `labels` [R] (−log q_label); without a
    valid label such a row gives 0. Mean over rows, ×τ² unless `scale_tau_sq=False` (DSKD does not scale).
    """
    check_rows(student_rows, t_ids, t_logprobs)
    check_temperature(temperature)
    vs = student_vocab_size
    if not 0 < vs <= student_rows.shape[1]:
        raise ValueError(f"student_vocab_size {vs} must be in [1, student_rows.shape[1] = {student_rows.shape[1]}]")
    if mined_t2s.dtype != torch.int64 or mined_t2s.dim() != 1:
        raise TypeError(f"mined_t2s must be a 1-D int64 tensor; got {mined_t2s.dtype} {tuple(mined_t2s.shape)}")
    r = student_rows.shape[0]
    for name, x in (("labels", labels), ("onehot_rows", onehot_rows)):
        if x is not None and x.shape != (r,):
            raise ValueError(f"{name} must have shape [R] = [{r}]; got {tuple(x.shape)}")
    with torch.no_grad():
        lp = t_logprobs.detach().float()
        valid_t = t_ids >= 0
        proj = torch.where(valid_t, mined_t2s[t_ids.clamp(0, mined_t2s.numel() - 1)], -1)
        ok = valid_t & (proj >= 0) & (proj < vs)
        cols, t_val, _ = row_columns(proj, lp, torch.zeros_like(ok), vs, reduce=reduce)
        valid = cols >= 0
        fallback = ~valid.any(dim=1)
        if onehot_rows is not None:
            fallback = fallback | onehot_rows.bool()
        p = torch.where(valid_t, lp.exp(), 0.0)
        stats = {
            "mass_mapped": row_mean((p * ok).sum(dim=1)),
            "columns": row_mean(valid.sum(dim=1).float()),
            "onehot_rows": row_mean(fallback.float()),
        }
    if r == 0:
        return zero_loss(student_rows), stats
    z = student_rows.gather(1, cols.clamp_min(0)).float()
    s_lse = student_lse(student_rows, vs, temperature)
    kl = bucket_kl(t_val, z, valid, temperature, s_lse, None)
    if labels is not None:
        has_label = (labels >= 0) & (labels < vs)
        gold = student_rows.gather(1, torch.where(has_label, labels, 0).unsqueeze(1)).squeeze(1).float()
        nll = torch.where(has_label, s_lse - gold / temperature, 0.0)
        kl = torch.where(fallback, nll, kl)
    else:
        kl = torch.where(fallback, 0.0, kl)
    scale = temperature**2 if scale_tau_sq else 1.0
    return scale * kl.mean(), stats
