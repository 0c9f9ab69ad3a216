"""Teacher forward with transformers: token-budget batches, length bucketing, chunked lm_head + top-k on device.

Only the hidden states of real (non-pad) positions go through the output head, chunk by chunk, so no logits
tensor for padding is built and no fp32 [tokens, V] temporary exceeds the memory budget.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from cdm.precompute.topk import (
    DEFAULT_MEMORY_BUDGET,
    PendingTopK,
    TopK,
    rows_per_chunk,
    topk_stats,
    topk_stats_async,
)

log = logging.getLogger(__name__)


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that (batch size x longest length) <= batch_tokens.

    Sorting by length (bucketing) keeps padding small; a sequence longer than the budget runs alone.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and int(lengths[batches[-1][0]]) * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _head_function(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden -> logits as the model's forward computes them (lm_head plus known scalings), or None."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)

    def fn(h: torch.Tensor) -> torch.Tensor:
        x = head(h)
        if scale is not None:
            x = x * scale
        if divide is not None:
            x = x / divide
        if softcap is not None:
            x = torch.tanh(x / softcap) * softcap
        return x

    return fn


class HFBackend:
    """Runs a loaded transformers causal LM and returns per-sequence top-k statistics (CPU tensors)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, *, k: int, batch_tokens: int = 8192,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, pad_id: int = 0, stats_impl: str = "auto"):
        self.model = model.eval()
        self.stats_impl = stats_impl
        self.k = int(k)
        self.batch_tokens = int(batch_tokens)
        self.memory_budget = int(memory_budget)
        self.pad_id = int(pad_id)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head = model.get_output_embeddings()
        self.vocab_size = int(head.out_features if head is not None and hasattr(head, "out_features")
                              else model.config.get_text_config().vocab_size)
        self._head = _head_function(model)
        self._decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.chunked_head = self._head is not None and self._decoder is not None and self._probe()
        if not self.chunked_head:
            log.info("hf backend: output head not separable for %s; using full logits", type(model).__name__)

    @torch.inference_mode()
    def _probe(self) -> bool:
        """Check that decoder + head reproduce the model's own logits on a short input."""
        ids = torch.arange(1, 9, device=self.device).remainder(self.vocab_size).unsqueeze(0)
        try:
            ref = self.model(input_ids=ids, use_cache=False).logits[0].float()
            mine = self._head(self._decoder(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
        except Exception as e:  # architectures whose decoder needs other inputs
            log.info("hf backend: head probe failed (%s)", e)
            return False
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        return mine.shape == ref.shape and bool(torch.allclose(mine, ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol))

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        return plan_batches(lengths, self.batch_tokens)

    def _pad(self, seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[b, : len(s)] = 1
        if self.device.type == "cuda":  # pinned + non-blocking: the copy does not wait for queued work
            return ids.pin_memory().to(self.device, non_blocking=True), mask.pin_memory().to(self.device, non_blocking=True)
        return ids.to(self.device), mask.to(self.device)

    def _real_positions(self, seqs: Sequence[np.ndarray], width: int) -> torch.Tensor:
        """Flat indices of the non-pad positions of a right-padded [B, width] batch, built on the host (a boolean
        mask on the device would wait for the forward to finish)."""
        idx = np.concatenate([b * width + np.arange(len(s)) for b, s in enumerate(seqs)]).astype(np.int64)
        t = torch.from_numpy(idx)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    @torch.inference_mode()
    def submit(self, seqs: Sequence[np.ndarray]) -> "PendingBatch":
        """Queue one padded batch (right padding) on the device; `.result()` waits and splits it per sequence.

        Nothing here waits for the device, so the caller can queue the next batch (or write the previous one)
        while this one runs; results are copied to pinned host memory as soon as they are ready."""
        if not seqs:
            return PendingBatch(None, [])
        lengths = [len(s) for s in seqs]
        ids, mask = self._pad(seqs)
        if self.chunked_head:
            hidden = self._decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self._real_positions(seqs, ids.shape[1]))
            head = self._head
            pending = topk_stats_async(lambda a, b: head(hidden[a:b]), self.k, n_rows=hidden.shape[0],
                                       vocab_size=self.vocab_size, memory_budget=self.memory_budget,
                                       impl=self.stats_impl)
        else:  # full logits, a few sequences at a time; resolved right away (no head to recompute tie rows with)
            keep = mask.bool()
            rows = max(1, rows_per_chunk(self.vocab_size, self.memory_budget) // ids.shape[1])
            parts = []
            for a in range(0, ids.shape[0], rows):
                logits = self.model(input_ids=ids[a : a + rows], attention_mask=mask[a : a + rows], use_cache=False).logits
                parts.append(topk_stats(logits[keep[a : a + rows]], self.k, memory_budget=self.memory_budget,
                                        impl=self.stats_impl))
            res = TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "logsumexp", "entropy")))
            pending = PendingTopK.exact(res, self.k)
        return PendingBatch(pending.to_host(), lengths)

    def forward(self, seqs: Sequence[np.ndarray]) -> list[TopK]:
        """One padded batch -> top-k statistics of every real position, split per sequence (host tensors)."""
        return self.submit(seqs).result()

    def run(self, seqs: Sequence[np.ndarray]) -> list[TopK]:
        """All sequences, batched by the token budget (one batch queued ahead); results in input order."""
        out: list[TopK | None] = [None] * len(seqs)
        plan = self.batches([len(s) for s in seqs])
        for batch, results in pipelined(self, ((b, [seqs[i] for i in b]) for b in plan)):
            for i, r in zip(batch, results):
                out[i] = r
        return out  # type: ignore[return-value]


class PendingBatch:
    """A submitted batch: `result()` waits for its statistics and splits them per sequence (host tensors)."""

    def __init__(self, pending: PendingTopK | None, lengths: list[int]):
        self._pending, self._lengths = pending, lengths

    def result(self) -> list[TopK]:
        if self._pending is None:
            return []
        res = self._pending.resolve().to("cpu")
        out, start = [], 0
        for n in self._lengths:
            out.append(TopK(res.ids[start : start + n], res.logprobs[start : start + n],
                            res.logsumexp[start : start + n], res.entropy[start : start + n]))
            start += n
        return out


def pipelined(runner: Any, batches: Iterable[tuple[Any, Sequence[np.ndarray]]]) -> Iterator[tuple[Any, list[TopK]]]:
    """For each (tag, sequences) batch yield (tag, results), keeping one batch queued on the device ahead of the
    one being returned.

    Backends without `submit` (e.g. vLLM, which schedules its own batches) are called synchronously."""
    submit = getattr(runner, "submit", None)
    previous: tuple[Any, Any] | None = None
    for tag, seqs in batches:
        if submit is None:
            yield tag, runner.forward(seqs)
            continue
        current = (tag, submit(seqs))
        if previous is not None:
            yield previous[0], previous[1].result()
        previous = current
    if previous is not None:
        yield previous[0], previous[1].result()
