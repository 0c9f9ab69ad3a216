"""ULD baseline (sorted-probability L1) from a stored teacher top-K (§6, §7)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import row_mean, student_lse, zero_loss


def uld_loss(
    student_rows: Tensor,
    t_logprobs: Tensor,
    vocab_size: int | None = None,
    tail: str = "bound",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over rows of Σ_i |q_(i) − p_(i)| over sorted probabilities (no temperature, as in ULD/DSKD).

    t_logprobs [R, K] teacher full-vocab log-probs at τ = 1 (any order; detached). The first K sorted
    probabilities are exact on both sides (student: its top-K of softmax(z) over `vocab_size`, default W).
    The tail beyond rank K is unknown for the teacher: `tail="bound"` adds |r_T − r_S| (the tail masses),
    a lower bound of the tail's L1 by the triangle inequality, so the loss lower-bounds full ULD;
    `tail="none"` drops the tail. Different vocabulary sizes need no padding: only K ranks are compared.
    """
    if tail not in ("bound", "none"):
        raise ValueError(f"tail must be 'bound' or 'none'; got {tail!r}")
    if student_rows.dim() != 2 or t_logprobs.dim() != 2 or t_logprobs.shape[0] != student_rows.shape[0]:
        raise ValueError(
            f"uld_loss needs student_rows [R, V] and t_logprobs [R, K]; got {tuple(student_rows.shape)}, {tuple(t_logprobs.shape)}"
        )
    vocab = student_rows.shape[1] if vocab_size is None else vocab_size
    if not 0 < vocab <= student_rows.shape[1]:
        raise ValueError(f"vocab_size {vocab} must be in [1, student_rows.shape[1] = {student_rows.shape[1]}]")
    k = t_logprobs.shape[1]
    with torch.no_grad():
        pt = t_logprobs.detach().float().exp().sort(dim=1, descending=True).values
        r_t = torch.clamp(1.0 - pt.sum(dim=1), min=0.0)
        stats = {"mass_tail_teacher": row_mean(r_t)}
    if student_rows.shape[0] == 0:
        return zero_loss(student_rows), stats
    s_lse = student_lse(student_rows, vocab, 1.0)
    top = student_rows[:, :vocab].topk(min(k, vocab), dim=1).values.float()
    qs = (top - s_lse[:, None]).exp()
    if qs.shape[1] < k:
        qs = torch.cat([qs, qs.new_zeros(qs.shape[0], k - qs.shape[1])], dim=1)
    l1 = (qs - pt).abs().sum(dim=1)
    if tail == "bound":
        l1 = l1 + (r_t - (1.0 - qs.sum(dim=1))).abs()
    return l1.mean(), stats
