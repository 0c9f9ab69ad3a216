"""Same-tokenizer forward KL from a stored teacher top-K: K columns plus one tail bucket (§7)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import NEG_INF, bucket_kl, check_rows, check_temperature, row_mean, student_lse, zero_loss


def kl_topk_loss(
    student_rows: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    temperature: float = 1.0,
    tail: bool = True,
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """τ²·mean over rows of KL(teacher ‖ student) on the teacher's top-K ids (+ one tail bucket); fp32.

    student_rows [R, V] live logits (any float dtype); t_ids [R, K] teacher ids (same vocabulary; −1 padding and
    ids ≥ `vocab_size`, default V, are masked: their mass joins the tail); t_logprobs [R, K] full-vocab log-probs
    at τ = 1 (detached here). With `tail` the teacher tail r = 1 − Σ p_k faces the student's mass outside the K
    ids: at τ = 1 this is the exact KL of that (K+1)-bucket coarse-graining, a lower bound of the full KL.
    Temperature: the student side is exact (softmax(z/τ) over its vocabulary); the teacher side is re-tempered
    per bucket, p_k^(1/τ) and r^(1/τ) renormalised, which treats the tail as one token (approximate for τ ≠ 1,
    the tail's true tempered mass Σ_tail p_i^(1/τ) is unknown). Without `tail`, both sides are renormalised
    over the K columns. Stats (detached, 0-d): mean teacher top-K mass, mean masked teacher mass.
    """
    check_rows(student_rows, t_ids, t_logprobs)
    check_temperature(temperature)
    vocab = student_rows.shape[1] if vocab_size is None else vocab_size
    if not 0 < vocab <= student_rows.shape[1]:
        raise ValueError(f"vocab_size {vocab} must be in [1, student_rows.shape[1] = {student_rows.shape[1]}]")
    lp = t_logprobs.detach().float()
    valid = (t_ids >= 0) & (t_ids < vocab)
    p_all = torch.where(t_ids >= 0, lp.exp(), 0.0)
    p_cols = torch.where(valid, p_all, 0.0).sum(dim=1)
    stats = {"mass_topk": row_mean(p_all.sum(dim=1)).detach(), "mass_masked": row_mean(p_all.sum(dim=1) - p_cols).detach()}
    if student_rows.shape[0] == 0:
        return zero_loss(student_rows), stats
    z = student_rows.gather(1, torch.where(valid, t_ids, 0)).float()
    s_lse = t_tail = None
    if tail:
        s_lse = student_lse(student_rows, vocab, temperature)
        t_tail = torch.log(torch.clamp(1.0 - p_cols, min=0.0))
    kl = bucket_kl(torch.where(valid, lp, NEG_INF), z, valid, temperature, s_lse, t_tail)
    return temperature**2 * kl.mean(), stats
