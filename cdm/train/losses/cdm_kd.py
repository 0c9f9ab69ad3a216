"""The CDM distillation loss on stored teacher top-K: dynamic column map + KL over the mapped columns (§8.5)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import bucket_kl, check_rows, check_temperature, row_mean, student_lse, zero_loss
from .dynamic_map import dynamic_map
from .maps import VocabMaps


def cdm_loss(
    student_rows: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    maps: VocabMaps,
    temperature: float = 1.0,
    student_topk: int | None = None,
    theta: float = 0.3,
    tail_bucket: bool = False,
    reverse: bool = False,
    max_pair_elems: int = 1 << 24,
) -> tuple[Tensor, dict[str, Tensor]]:
    """τ²·mean over rows of KL(teacher ‖ student) over each row's mapped student columns; returns (loss, stats).

    student_rows [R, W] live student logits at the KD rows (W ≥ maps.student_vocab_size; ids beyond it are
    never gathered); t_ids/t_logprobs [R, K] the stored teacher top-K (log-probs at τ = 1, detached here).
    Columns come from `dynamic_map` against the student's live top-`student_topk` (default K; 0 = exact matches
    only) with θ = `theta` (≤ the map store's θ). Teacher p ∝ (column mass)^(1/τ), student softmax(z/τ), both
    over the columns; `tail_bucket` adds the teacher mass not mapped (dropped + stored tail, one re-tempered
    bucket) against the student's full-vocab mass outside the columns; `reverse` adds direction B (see
    `dynamic_map`). Reference bugs R1–R15 are not reproduced. Stats: detached 0-d tensors, means over rows.
    """
    check_rows(student_rows, t_ids, t_logprobs)
    check_temperature(temperature)
    vs = maps.student_vocab_size
    if student_rows.shape[1] < vs:
        raise ValueError(
            f"student_rows has {student_rows.shape[1]} logit columns but maps.student_vocab_size is {vs}"
        )
    k_s = t_ids.shape[1] if student_topk is None else student_topk
    if k_s < 0:
        raise ValueError(f"student_topk must be ≥ 0; got {k_s}")
    with torch.no_grad():
        if k_s > 0:
            s_top = student_rows[:, :vs].topk(min(k_s, vs), dim=1).indices
        else:
            s_top = t_ids.new_empty((t_ids.shape[0], 0))
        cm = dynamic_map(t_ids, t_logprobs, s_top, maps.em_t2s, maps.fuzzy_keys, maps.fuzzy_dist, vs, theta,
                         reverse=reverse, max_pair_elems=max_pair_elems, distinct_student_ids=True)
        mapped = cm.mass_exact + cm.mass_dynamic
        valid = cm.cols >= 0
        p_topk = torch.where(t_ids >= 0, t_logprobs.detach().float().exp(), 0.0).sum(dim=1)
        stats = {
            "mass_exact": row_mean(cm.mass_exact),
            "mass_dynamic": row_mean(cm.mass_dynamic),
            "mass_dropped": row_mean(cm.mass_dropped),
            "mass_tail": row_mean(torch.clamp(1.0 - p_topk, min=0.0)),
            "columns": row_mean(valid.sum(dim=1).float()),
            "reverse_columns": row_mean(cm.reverse.sum(dim=1).float()),
            "reverse_em_outside": row_mean(cm.reverse_em_outside.float()),
        }
    if student_rows.shape[0] == 0:
        return zero_loss(student_rows), stats
    z = student_rows.gather(1, cm.cols.clamp_min(0)).float()
    s_lse = t_tail = None
    if tail_bucket:
        s_lse = student_lse(student_rows, vs, temperature)
        t_tail = torch.log(torch.clamp(1.0 - mapped, min=0.0))
    kl = bucket_kl(cm.t_logmass, z, valid, temperature, s_lse, t_tail)
    return temperature**2 * kl.mean(), stats
