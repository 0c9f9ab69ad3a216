"""Contextual dynamic vocabulary mapping (§8.4), vectorised: teacher top-K → student columns, row by row.

For each KD row, a teacher candidate t maps to em_t2s[t] when it has an exact match, otherwise to its closest
fuzzy neighbour *present in the student's live top-K at that row* (normalised edit distance < θ; ties: best
student rank, then lowest id), otherwise it is dropped. Collisions aggregate (logsumexp of the teacher
log-probs). Optional direction B (roles fixed, never swapped): a student top-K id that got no column takes its
closest fuzzy teacher neighbour among the stored teacher top-K of that row, with that teacher log-prob.
Exact inverse matches need no extra step: a student id whose exact-match teacher is in the stored top-K
already has a column; one whose exact-match teacher lies outside the stored top-K has no known teacher value
and is dropped (counted in `reverse_em_outside`). B re-uses a teacher log-prob already spent on its own column,
so the teacher's column masses can sum above the top-K mass; the loss renormalises over the columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._common import row_columns

_INF = float("inf")
_NEVER = -(1 << 62)  # student key of an invalid id: t·vs + _NEVER < 0 for every teacher id


class ColumnMap(NamedTuple):
    """Per-row student columns with the teacher log-mass mapped to each, plus teacher-mass accounting.

    cols [R, C] int64 unique student ids ascending, −1 padding last; t_logmass [R, C] fp32 (−inf padding);
    reverse [R, C] bool (column added by direction B); mass_* [R] fp32 probabilities of the teacher's top-K
    mass mapped exactly / dynamically / dropped (the rest, 1 − Σ top-K, is the stored tail);
    reverse_em_outside [R] int64 student top-K ids left without a column whose exact-match teacher id exists
    but is outside the stored top-K (dropped by the B approximation).
    """

    cols: Tensor
    t_logmass: Tensor
    reverse: Tensor
    mass_exact: Tensor
    mass_dynamic: Tensor
    mass_dropped: Tensor
    reverse_em_outside: Tensor


def pair_distances(t_ids: Tensor, s_ids: Tensor, fuzzy_keys: Tensor, dist_theta: Tensor, vs: int) -> Tensor:
    """Distance [r, K, Ks] of every (teacher top-K, student top-K) pair in the fuzzy table, +inf when absent.

    Invalid ids must already be negative (t < 0, any s < vs) or very negative (s ≤ −2^62, any t) so their keys
    are < 0 and never found; `dist_theta` is the table's distance array with entries ≥ θ set to +inf.
    """
    r, k = t_ids.shape
    ks = s_ids.shape[1]
    if fuzzy_keys.numel() == 0 or k == 0 or ks == 0:
        return torch.full((r, k, ks), _INF, device=t_ids.device)
    keys = t_ids.unsqueeze(2) * vs + s_ids.unsqueeze(1)
    pos = torch.searchsorted(fuzzy_keys, keys, out_int32=True).clamp_(max=fuzzy_keys.numel() - 1)
    return torch.where(fuzzy_keys[pos] == keys, dist_theta[pos], _INF)


def _nearest_chunk(
    t_key: Tensor, s_key: Tensor, em: Tensor, s: Tensor, valid_s: Tensor, fuzzy_keys: Tensor, dist_theta: Tensor,
    vs: int, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Integer part of the map on one chunk of rows: mapped student id per teacher entry, B teacher rank per student.

    Returns mapped [r, K] (exact match, else nearest fuzzy student id present in the row, else −1) and
    rev_rank [r, Ks] (the rank of the nearest fuzzy teacher entry for a student id without a column, else −1).
    Only exact integer/min operations: the result does not depend on the chunking.
    """
    ks = s.shape[1]
    dist = pair_distances(t_key, s_key, fuzzy_keys, dist_theta, vs)
    if ks > 0:
        dmin, best_b = dist.min(dim=2)  # first minimum = best student rank
        fuzzy_s = torch.where(torch.isfinite(dmin), s.gather(1, best_b), -1)
    else:
        fuzzy_s = torch.full_like(t_key, -1)
    mapped = torch.where(em >= 0, em, fuzzy_s)
    rev_rank = torch.full_like(s, -1)
    if reverse and ks > 0 and t_key.shape[1] > 0:
        no_col = valid_s & ~(s.unsqueeze(2) == mapped.unsqueeze(1)).any(dim=2)
        dmin_b, best_a = torch.where(no_col.unsqueeze(1), dist, _INF).min(dim=1)  # first minimum = best teacher rank
        rev_rank = torch.where(torch.isfinite(dmin_b), best_a, -1)
    return mapped, rev_rank


@torch.no_grad()
def dynamic_map(
    t_ids: Tensor,
    t_logprobs: Tensor,
    student_topk_ids: Tensor,
    em_t2s: Tensor,
    fuzzy_keys: Tensor,
    fuzzy_dist: Tensor,
    vs: int,
    theta: float = 0.3,
    *,
    reverse: bool = False,
    max_pair_elems: int = 1 << 24,
    distinct_student_ids: bool = False,
) -> ColumnMap:
    """Map each row's teacher top-K onto student columns (§8.4); no Python loop over rows, no [R, Vt] tensor.

    t_ids [R, K] int64 teacher ids (−1 = padding), t_logprobs [R, K] full-vocab log-probs at τ = 1,
    student_topk_ids [R, Ks] the student's live top-K ids in rank order; em_t2s [Vt] (−1 = none); fuzzy table
    keyed t·vs + s. Student ids < 0 or ≥ `vs` are never produced. Rows are processed in chunks so that the
    [r, K, Ks] pair tensors hold at most `max_pair_elems` elements. Output width C = K (+ Ks with `reverse`).
    `distinct_student_ids=True` skips the duplicate check (ids from `topk` are distinct). Deterministic (the
    minimum's first index is the documented tie rule of `Tensor.min`); runs without autograd.
    """
    if t_ids.shape != t_logprobs.shape or t_ids.dim() != 2:
        raise ValueError(f"t_ids {tuple(t_ids.shape)} and t_logprobs {tuple(t_logprobs.shape)} must both be [R, K]")
    if student_topk_ids.dim() != 2 or student_topk_ids.shape[0] != t_ids.shape[0]:
        raise ValueError(
            f"student_topk_ids must be [R, Ks] with R = {t_ids.shape[0]}; got {tuple(student_topk_ids.shape)}"
        )
    for name, x in (("t_ids", t_ids), ("student_topk_ids", student_topk_ids), ("em_t2s", em_t2s),
                    ("fuzzy_keys", fuzzy_keys)):
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must be int64; got {x.dtype}")
    if em_t2s.numel() == 0:
        raise ValueError("em_t2s is empty: the teacher vocabulary map has no entries")
    r, k = t_ids.shape
    ks = student_topk_ids.shape[1]
    lp = t_logprobs.detach().float()
    s = student_topk_ids
    valid_t = t_ids >= 0
    em = torch.where(valid_t, em_t2s[t_ids.clamp(0, em_t2s.numel() - 1)], -1)
    em = torch.where((em >= 0) & (em < vs), em, -1)
    valid_s = (s >= 0) & (s < vs)
    if ks > 1 and not distinct_student_ids:  # a repeated student id keeps only its best rank
        earlier = torch.ones(ks, ks, dtype=torch.bool, device=s.device).tril(-1)
        valid_s = valid_s & ~((s.unsqueeze(2) == s.unsqueeze(1)) & earlier).any(dim=2)
    s_key = torch.where(valid_s, s, _NEVER)
    dist_theta = torch.where(fuzzy_dist < theta, fuzzy_dist.float(), _INF)
    step = max(1, max_pair_elems // max(k * ks, 1))
    parts = [
        _nearest_chunk(t_ids[i : i + step], s_key[i : i + step], em[i : i + step], s[i : i + step],
                       valid_s[i : i + step], fuzzy_keys, dist_theta, vs, reverse)
        for i in range(0, max(r, 1), step)
    ]
    mapped = torch.cat([m for m, _ in parts], dim=0)[:r]
    rev_rank = torch.cat([q for _, q in parts], dim=0)[:r]
    p = torch.where(valid_t, lp.exp(), 0.0)
    has_em = em >= 0
    fuzzy = ~has_em & (mapped >= 0)
    dropped = valid_t & (mapped < 0)
    ids, vals, flags = [mapped], [lp], [torch.zeros_like(has_em)]
    em_outside = torch.zeros(r, dtype=torch.int64, device=t_ids.device)
    if reverse:
        ok_b = rev_rank >= 0
        ids.append(torch.where(ok_b, s, -1))
        vals.append(lp.gather(1, rev_rank.clamp_min(0)) if k > 0 else torch.full_like(s, 0, dtype=lp.dtype))
        flags.append(ok_b)
        hit = torch.where((em_t2s >= 0) & (em_t2s < vs), em_t2s, vs)  # no boolean indexing: no host sync
        s_has_em = torch.zeros(vs + 1, dtype=torch.bool, device=t_ids.device).index_fill_(0, hit, True)[:vs]
        no_col = valid_s & ~(s.unsqueeze(2) == mapped.unsqueeze(1)).any(dim=2)
        em_outside = (no_col & ~ok_b & s_has_em[s.clamp(0, vs - 1)]).sum(dim=1)
    cols, t_logmass, rev = row_columns(torch.cat(ids, 1), torch.cat(vals, 1), torch.cat(flags, 1), vs)
    return ColumnMap(
        cols=cols,
        t_logmass=t_logmass,
        reverse=rev,
        mass_exact=(p * has_em).sum(dim=1),
        mass_dynamic=(p * fuzzy).sum(dim=1),
        mass_dropped=(p * dropped).sum(dim=1),
        reverse_em_outside=em_outside,
    )
