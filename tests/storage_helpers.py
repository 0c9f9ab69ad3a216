"""Random teacher sequences and a reference writer run, shared by the storage tests."""

from __future__ import annotations

import numpy as np

from cdm.storage import TeacherSequence, TeacherStoreWriter


def random_sequence(rng: np.random.Generator, source_index: int, k: int = 8, vocab: int = 1000, n: int | None = None) -> TeacherSequence:
    """A valid random sequence: sorted top-k log-probs, distinct ids, spans tiling the text."""
    n = int(rng.integers(1, 40)) if n is None else n
    lens = rng.integers(0, 4, size=n)
    text = "".join(chr(int(c)) for c in rng.integers(0x61, 0x7A, size=int(lens.sum())))
    ends = np.cumsum(lens)
    spans = np.stack([ends - lens, ends], axis=1).astype(np.int32)
    logits = rng.normal(size=(n, vocab)) * 3
    lse = np.log(np.exp(logits).sum(axis=1))
    lp = logits - lse[:, None]
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    topk_lp = np.take_along_axis(lp, order, axis=1)
    p = np.exp(lp)
    ent = -(p * lp).sum(axis=1)
    resp_start = int(rng.integers(0, len(text) + 1))
    return TeacherSequence(
        seq_id=f"s{source_index:06d}",
        text=text,
        response_spans=np.array([[resp_start, len(text)]], dtype=np.int32),
        source_index=source_index,
        truncated=bool(rng.integers(0, 2)),
        token_ids=rng.integers(0, vocab, size=n).astype(np.int32),
        char_spans=spans,
        topk_ids=order.astype(np.int32),
        topk_logprobs=topk_lp.astype(np.float32),
        logsumexp=lse.astype(np.float32),
        entropy=ent.astype(np.float32),
    )


def manifest_sections() -> dict:
    return {"teacher": {"name": "random"}, "capture": {"engine": "test"}, "data": {"source": "random"}}


def write_store(url: str, seqs: list[TeacherSequence], k: int = 8, vocab: int = 1000, num_shards: int = 1, **kw) -> None:
    for shard in range(num_shards):
        w = TeacherStoreWriter(
            url, key="test-key", manifest=manifest_sections(), k=k, vocab_size=vocab,
            num_shards=num_shards, shard_index=shard, **kw,
        )
        for s in seqs:
            if s.source_index % num_shards == shard and s.source_index not in w.done_source_indices:
                w.add(s)
        w.close()


def assert_sequences_equal(a: TeacherSequence, b: TeacherSequence, values_atol: float = 2e-3) -> None:
    assert a.seq_id == b.seq_id and a.text == b.text and a.source_index == b.source_index
    assert a.truncated == b.truncated
    np.testing.assert_array_equal(np.asarray(a.response_spans).reshape(-1, 2), np.asarray(b.response_spans).reshape(-1, 2))
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.char_spans, b.char_spans)
    np.testing.assert_array_equal(a.logsumexp, b.logsumexp)
    np.testing.assert_array_equal(a.entropy, b.entropy)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=values_atol, rtol=1e-3)
    # ids must agree except where neighbouring log-probs are equal after rounding (ties may reorder)
    same = a.topk_ids == b.topk_ids
    if not same.all():
        r, c = np.nonzero(~same)
        assert np.all(np.abs(a.topk_logprobs[r, c] - b.topk_logprobs[r, c]) <= values_atol)
