"""Tiny teacher stores for the build-map tests: teacher sequences tokenised with real offsets and random sorted
top-k, written with TeacherStoreWriter (tokenizer JSON included), over pydoc prose cut at random places.

Tokenizers come from `tests.tokenizer_fixtures` (real vocabularies and tiny trained ones); nothing here reads the
network or a model hub.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from cdm.mapping.tokenizers import encode_with_offsets
from cdm.storage import TeacherSequence, TeacherStoreWriter
from tests.tokenizer_fixtures import UNICODE_TEXTS


def prose(n: int, max_chars: int, seed: int = 0) -> list[str]:
    """`n` chunks of pydoc prose starting at random places (mid-word too), at most `max_chars` long."""
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    names = sorted(topics)
    out = []
    for i in range(n):
        t = topics[names[i % len(names)]]
        a = int(rng.integers(0, max(1, len(t) - max_chars)))
        out.append(t[a : a + max_chars])
    return out


def tiny_corpus(n: int = 24, seed: int = 0) -> list[tuple[str, tuple[int, int]]]:
    """(text, response span) pairs: prose and unicode texts split at a random prompt/response cut, plus a
    one-character response."""
    rng = np.random.default_rng(seed)
    out = []
    for t in prose(n, max_chars=260, seed=seed) + UNICODE_TEXTS[:3]:
        out.append((t, (int(rng.integers(0, len(t))), len(t))))
    out.append(("Q: 1+1? A: 2", (11, 12)))
    return out


def teacher_sequence(
    tok: Tokenizer,
    text: str,
    index: int,
    rng: np.random.Generator,
    *,
    k: int = 8,
    response: tuple[int, int] | None = None,
    bos: int | None = None,
    eos: int | None = None,
) -> TeacherSequence:
    """A teacher sequence of `text` as `tok` tokenises it (offsets from `tokenizers`), with random sorted top-k.

    `bos`/`eos`: ids of zero-width specials added at (0, 0) and (len, len), the spans precompute stores for them.
    """
    ids, spans = encode_with_offsets(tok, text)
    if bos is not None:
        ids, spans = np.concatenate([[bos], ids]), np.concatenate([[[0, 0]], spans])
    if eos is not None:
        ids, spans = np.concatenate([ids, [eos]]), np.concatenate([spans, [[len(text), len(text)]]])
    n, v = len(ids), tok.get_vocab_size(with_added_tokens=True)
    top = np.stack([rng.choice(v, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 4), size=n)[:, :k]), axis=1)[:, ::-1]
    lo, hi = response if response is not None else (0, len(text))
    return TeacherSequence(
        seq_id=f"t{index:05d}",
        text=text,
        response_spans=np.array([[lo, hi]], dtype=np.int32),
        source_index=index,
        truncated=False,
        token_ids=ids.astype(np.int32),
        char_spans=spans.astype(np.int32),
        topk_ids=top,
        topk_logprobs=np.ascontiguousarray(lp, dtype=np.float32),
        logsumexp=rng.normal(size=n).astype(np.float32),
        entropy=rng.gamma(2.0, 1.0, size=n).astype(np.float32),
    )


def write_teacher_store(
    url: str,
    tok: Tokenizer,
    seqs: list[TeacherSequence],
    *,
    k: int = 8,
    num_shards: int = 1,
    roles: dict[str, str] | None = None,
    key: str = "tiny-teacher",
) -> None:
    """Write `seqs` as a teacher store (shard = source_index % num_shards) holding the tokenizer's JSON; `roles`
    = the bos/eos/pad/unk strings precompute records in the manifest."""
    manifest = {"teacher": {"name": "tiny", "tokenizer": dict(roles or {})}, "capture": {"engine": "test"},
                "data": {"source": "pydoc"}}
    for shard in range(num_shards):
        w = TeacherStoreWriter(
            url, key=key, manifest=manifest, k=k, vocab_size=tok.get_vocab_size(with_added_tokens=True),
            num_shards=num_shards, shard_index=shard, tokenizer_json=tok.to_str(), commit_tokens=64, chunk_rows=128,
        )
        for s in seqs:
            if s.source_index % num_shards == shard:
                w.add(s)
        w.close()
