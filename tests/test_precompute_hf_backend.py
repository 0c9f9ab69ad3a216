"""The transformers backend: batching, padding, the chunked output head, and the row convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.precompute.hf_backend import HFBackend, plan_batches
from tests.test_precompute_support import _offline, tiny_teacher, tokenizer, text_records  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=0, max_size=40), budget=st.integers(1, 2000))
def test_plan_batches_covers_everything_within_budget(lengths, budget):
    batches = plan_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def reference_rows(model, ids: np.ndarray, k: int):
    """float64 softmax of the model's own logits on the unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids[None].astype(np.int64))).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return lp, torch.logsumexp(logits, -1), -(lp.exp() * lp).sum(-1)


def encode(tokenizer, texts):
    return [np.asarray(tokenizer(t)["input_ids"], dtype=np.int32) for t in texts]


def test_forward_matches_float64_reference_across_padding(model, tokenizer):
    seqs = encode(tokenizer, [r["text"] for r in text_records(9, seed=3)])
    backend = HFBackend(model, k=20, batch_tokens=700, memory_budget=4 * 1000 * 7)
    assert backend.chunked_head and backend.vocab_size == len(tokenizer)
    assert len(backend.batches([len(s) for s in seqs])) > 1
    for s, r in zip(seqs, backend.run(seqs)):
        lp, lse, ent = reference_rows(model, s, 20)
        assert r.ids.shape == (len(s), 20) and r.ids.dtype == torch.int32
        got = r.ids.long()
        np.testing.assert_allclose(r.logprobs.numpy(), lp.gather(-1, got).numpy(), atol=2e-5)
        ref_top = lp.topk(20, -1).values
        np.testing.assert_allclose(r.logprobs.numpy(), ref_top.numpy(), atol=2e-5)
        np.testing.assert_allclose(r.logsumexp.numpy(), lse.numpy(), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(r.entropy.numpy(), ent.numpy(), atol=1e-4, rtol=1e-4)


def test_full_logits_fallback_equals_chunked_head(model, tokenizer):
    seqs = encode(tokenizer, [r["text"] for r in text_records(5, seed=4)])
    a = HFBackend(model, k=8, batch_tokens=2000)
    b = HFBackend(model, k=8, batch_tokens=2000, memory_budget=4 * 1000 * 3)
    b.chunked_head = False
    for x, y in zip(a.run(seqs), b.run(seqs)):
        assert torch.equal(x.ids, y.ids)
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


def test_last_row_predicts_what_follows_the_text(model, tokenizer):
    ids = encode(tokenizer, ["The quick brown fox jumps over"])[0]
    (r,) = HFBackend(model, k=5).run([ids])
    nxt = int(r.ids[-1, 0])
    longer = np.concatenate([ids, [nxt]]).astype(np.int64)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.as_tensor(longer[None])).logits[0].double(), -1)
    # row n-1 of the store = the distribution of the token at position n of the longer sequence
    assert lp[len(ids) - 1, nxt].item() == pytest.approx(r.logprobs[-1, 0].item(), abs=2e-5)
    assert int(lp[len(ids) - 1].argmax()) == nxt
    # and row 0 predicts token 1
    assert lp[0, int(ids[1])].item() <= r.logprobs[0, 0].item() + 2e-5


def test_bf16_keeps_top_ids_close_to_fp32(tiny_teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    seqs = encode(tokenizer, [r["text"] for r in text_records(2, seed=5, max_chars=120)])
    m16 = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.bfloat16).eval()
    m32 = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    for a, b in zip(HFBackend(m16, k=10).run(seqs), HFBackend(m32, k=10).run(seqs)):
        top1 = (a.ids[:, 0] == b.ids[:, 0]).float().mean().item()
        assert top1 > 0.8
        assert a.logprobs.dtype == torch.float32 and torch.all(a.entropy >= 0)


def test_tie_fixups_after_the_batch_was_queued(model, tokenizer):
    """Output-head rows duplicated in groups make exact ties at the k-th place in fp32 (more than the one extra
    candidate fetched), so every row needs the deferred fix-up, which re-runs lm_head outside the submit() call;
    ids follow the (log-prob desc, id asc) order of a float64 stable sort."""
    import copy

    tied = copy.deepcopy(model)
    with torch.no_grad():
        w = tied.get_output_embeddings().weight
        w[:] = w[(torch.arange(w.shape[0]) // 4) * 4]  # ids 4j..4j+3 share one output row
    seqs = encode(tokenizer, [r["text"] for r in text_records(4, seed=8)])
    backend = HFBackend(tied, k=6, batch_tokens=400, memory_budget=4 * 1000 * 5)
    pending = [backend.submit([s]) for s in seqs]  # all queued before any result is read
    for s, p in zip(seqs, pending):
        (r,) = p.result()
        lp, _, _ = reference_rows(tied, s, 6)
        ids = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :6]
        assert torch.equal(r.ids.long(), ids)
        np.testing.assert_allclose(r.logprobs.numpy(), lp.gather(-1, ids).numpy(), atol=2e-5)
