"""Token-level cross-entropy of the student on its own labels (the CE half of every training objective)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean CE over the tokens whose label is not `ignore_index`, computed in fp32; 0 when none is labelled.

    logits [B, T, V], labels [B, T]: label (b, t) is the target of logits (b, t). Shifting (labels = next ids)
    is the caller's job, so this works for any row convention.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"ce_loss needs logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp_min(1)
    return total / count
