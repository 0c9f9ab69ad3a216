"""Held-out evaluation: token cross-entropy and bits per byte (comparable across tokenizers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from cdm.train.data import IGNORE_INDEX, Batch


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Σ NLL (nats) over predicted tokens / (ln 2 × UTF-8 bytes of the predicted text); NaN with no bytes."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL in nats, number of labelled tokens) of one batch, in fp32."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    nll = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (target != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """CE (nats/token), bits per byte, token and byte counts over the held-out batches (split across ranks)."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    try:
        for i, b in enumerate(batches):
            if i % world != rank:
                continue
            b = b.to(device)
            with autocast():
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            nll, n = batch_nll(logits, b.labels)
            acc += torch.stack([nll.double(), n.double(), torch.tensor(float(b.n_bytes), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if all_reduce is not None:
        acc = all_reduce(acc)
    nll, tokens, nbytes = (float(x) for x in acc.tolist())
    return {
        "ce": nll / tokens if tokens else math.nan,
        "bpb": bits_per_byte(nll, int(nbytes)),
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }
