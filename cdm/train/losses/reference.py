"""The reference implementation's KD reduction (§2.9), reproduced exactly, for differential tests only."""

from __future__ import annotations

import torch
from torch import Tensor


def reference_kd_reduction(P: Tensor, Q: Tensor, tau: float) -> Tensor:
    """KD = ΣE / #entries with E = softmax(P)·(τ²·log_softmax(P) − log_softmax(Q/τ)) over each row's 2K columns.

    P (the "teacher" half [T_A ; S_B]) and Q (the "student" half [S_A ; T_B]) are [G, 2K]; entries where P or Q
    is infinite are zeroed and not counted. Reproduces bugs R2/R12 on purpose: τ only on Q, τ² on one term,
    P not detached, an element mean (≈ KL/2K) instead of a per-row sum. Not a training loss.
    """
    log_q = torch.log_softmax(Q / tau, dim=-1)
    log_p = torch.log_softmax(P, dim=-1)
    e = log_p.exp() * (tau * tau * log_p - log_q)
    finite = torch.isfinite(P) & torch.isfinite(Q)
    e = torch.where(finite, e, 0.0)
    return e.sum() / finite.sum().clamp_min(1)
