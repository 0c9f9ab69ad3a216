"""Small, self-consistent stores for the trainer tests: two tokenizers trained on pydoc topics, a random
top-k teacher store, an offset-exact map store with real vocabulary maps, a tiny Llama student (and checks of
these fixtures themselves)."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from pydoc_data.topics import topics
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from cdm.mapping.store import CSR, KIND_1_1, KIND_1_N, KIND_N_1, KIND_N_M, MapSequence, MapStoreWriter, VocabMaps
from cdm.storage import TeacherSequence, TeacherStoreWriter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = "\n".join(topics[k] for k in sorted(topics))[:120_000]


@functools.lru_cache(maxsize=None)
def bpe(vocab: int):
    """A byte-level BPE tokenizer trained on the corpus (cached per vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def texts(n: int, seed: int = 0, lo: int = 60, hi: int = 400) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = int(rng.integers(0, len(CORPUS) - hi))
        out.append(CORPUS[a : a + int(rng.integers(lo, hi))])
    return out


def encode(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    enc = tok.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int32).reshape(-1, 2)


def _ends(spans: np.ndarray) -> dict[int, int]:
    """end -> index of the last token ending there (ends that a later token overlaps are dropped)."""
    out = {}
    for i in range(len(spans)):
        if i == len(spans) - 1 or spans[i + 1, 0] >= spans[i, 1]:
            out[int(spans[i, 1])] = i
    return out


def align(t_spans: np.ndarray, s_spans: np.ndarray, resp_start: int) -> tuple[np.ndarray, np.ndarray]:
    """Offset-exact last-token pairing (cdm-method §8.1): student position -> teacher row, and the group kind."""
    te, se = _ends(t_spans), _ends(s_spans)
    rows = np.full(len(s_spans), -1, np.int32)
    kind = np.zeros(len(s_spans), np.int8)
    prev_t = prev_s = -1
    for e in sorted(set(te) & set(se)):
        ti, si = te[e], se[e]
        nt, ns = ti - prev_t, si - prev_s
        prev_t, prev_s = ti, si
        if e < resp_start:
            continue
        rows[si] = ti
        kind[si] = KIND_1_1 if nt == ns == 1 else KIND_1_N if nt == 1 else KIND_N_1 if ns == 1 else KIND_N_M
    return rows, kind


def vocab_maps(t_tok, s_tok, theta: float = 0.3) -> VocabMaps:
    """Exact, fuzzy (normalised edit distance < θ) and MinED maps between two tokenizers' pieces."""
    tv = sorted(t_tok.get_vocab().items(), key=lambda kv: kv[1])
    sv = sorted(s_tok.get_vocab().items(), key=lambda kv: kv[1])
    t_str, s_str = [p for p, _ in tv], [p for p, _ in sv]
    s_index = {p: i for p, i in sv}
    em_t2s = np.array([s_index.get(p, -1) for p in t_str], np.int32)
    em_s2t = np.full(len(s_str), -1, np.int32)
    for t, s in enumerate(em_t2s):
        if s >= 0:
            em_s2t[s] = t
    lev = cdist(t_str, s_str, scorer=Levenshtein.distance, dtype=np.int32)
    lens = np.array([len(p) for p in t_str])[:, None] + np.array([len(p) for p in s_str])[None, :]
    nd = lev / np.maximum(lens, 1)
    fuzzy = (nd < theta) & (em_t2s[:, None] != np.arange(len(s_str))[None, :])

    def csr(mask: np.ndarray, dist: np.ndarray) -> CSR:
        counts = mask.sum(1)
        r, c = np.nonzero(mask)
        return CSR(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), c.astype(np.int32), dist[r, c].astype(np.float32))

    return VocabMaps(
        teacher_vocab_size=len(t_str), student_vocab_size=len(s_str), em_t2s=em_t2s, em_s2t=em_s2t,
        fuzzy_t2s=csr(fuzzy, nd), fuzzy_s2t=csr(fuzzy.T, nd.T),
        mined_t2s=lev.argmin(1).astype(np.int32), mined_s2t=lev.argmin(0).astype(np.int32), theta=theta,
    )


def teacher_topk(rng: np.random.Generator, ids: np.ndarray, vocab: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random teacher rows that favour the actual next token: (top-k ids, log-probs, logsumexp, entropy)."""
    n = len(ids)
    logits = rng.normal(size=(n, vocab)) * 1.5
    logits[np.arange(n - 1), ids[1:]] += 4.0
    lse = np.log(np.exp(logits).sum(1))
    lp = logits - lse[:, None]
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    p = np.exp(lp)
    return order.astype(np.int32), np.take_along_axis(lp, order, 1).astype(np.float32), lse.astype(np.float32), (-(p * lp).sum(1)).astype(np.float32)


def write_teacher(url: str, tok, docs: list[str], k: int = 8, seed: int = 0, key: str = "tkey", num_shards: int = 1) -> None:
    rng = np.random.default_rng(seed)
    vocab = tok.get_vocab_size()
    seqs = []
    for i, text in enumerate(docs):
        ids, spans = encode(tok, text)
        top, lp, lse, ent = teacher_topk(rng, ids, vocab, k)
        rs = int(len(text) * 0.3)
        seqs.append(TeacherSequence(f"s{i:04d}", text, np.array([[rs, len(text)]], np.int32), i, False, ids, spans, top, lp, lse, ent))
    for shard in range(num_shards):
        w = TeacherStoreWriter(url, key=key, manifest={"teacher": {"name": "random"}, "capture": {}, "data": {}},
                               k=k, vocab_size=vocab, num_shards=num_shards, shard_index=shard, chunk_rows=64)
        for s in seqs:
            if s.source_index % num_shards == shard:
                w.add(s)
        w.close()


def write_map(url: str, teacher_url: str, t_tok, s_tok, s_hash: str) -> None:
    """A map store over the teacher store's sequences: map shard i covers teacher shard i, in the same order."""
    import hashlib

    from cdm.storage import TeacherStore

    ts = TeacherStore(teacher_url)
    maps = vocab_maps(t_tok, s_tok)
    n_shards = len(ts.reader.shards)
    for shard in range(n_shards):
        w = MapStoreWriter(url, key="mkey", manifest={"teacher_store": {"key": ts.key}, "student": {"tokenizer_hash": s_hash}},
                           num_shards=n_shards, shard_index=shard, chunk_rows=64)
        for gi in range(len(ts)):
            if ts.reader.locate(gi)[0] != shard:
                continue
            t = ts[gi]
            s_ids, s_spans = encode(s_tok, t.text)
            rs = int(t.response_spans[0, 0])
            rows, kind = align(t.char_spans, s_spans, rs)
            w.add(MapSequence(t.seq_id, gi, hashlib.sha256(t.text.encode()).hexdigest(), s_ids, s_spans, rows, kind,
                              s_spans[:, 0] >= rs, n_teacher_tokens=t.n_tokens))
        if shard == 0:
            maps.save(w.loc, "vocab")
        w.close()


def tiny_llama(vocab: int, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def save_student(path: str, s_tok, vocab: int | None = None, seed: int = 0) -> None:
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(vocab or s_tok.get_vocab_size(), seed)
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=s_tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)


def build(tmp, n_docs: int = 24, t_vocab: int = 420, s_vocab: int = 300, dual: bool = False, num_shards: int = 1, k: int = 8) -> dict[str, str]:
    """Teacher store, student folder, map store (and the dual store) under `tmp`; returns their paths."""
    from cdm.train.trainer import student_tokenizer_hash

    t_tok, s_tok = bpe(t_vocab), bpe(s_vocab)
    docs = texts(n_docs)
    paths = {"store": str(tmp / "teacher"), "student": str(tmp / "student"), "map": str(tmp / "map")}
    write_teacher(paths["store"], t_tok, docs, k=k, num_shards=num_shards)
    save_student(paths["student"], s_tok)
    write_map(paths["map"], paths["store"], t_tok, s_tok, student_tokenizer_hash(paths["student"], None))
    if dual:
        paths["dual"] = str(tmp / "dual")
        write_teacher(paths["dual"], s_tok, docs, k=k, seed=1, key="dkey")
    return paths


# ------------------------------------------------------------------ checks of the fixtures themselves


def test_alignment_pairs_tokens_ending_at_common_boundaries():
    # cdm-method §8.1 vector: "Hello world!" T Hello| world|!  S Hel|lo| wor|ld!
    t = np.array([[0, 5], [5, 11], [11, 12]])
    s = np.array([[0, 3], [3, 5], [5, 9], [9, 12]])
    rows, kind = align(t, s, 0)
    assert rows.tolist() == [-1, 0, -1, 2]
    assert kind[1] == KIND_1_N and kind[3] == KIND_N_M


def test_store_fixture_is_consistent(tmp_path):
    from cdm.mapping.store import MapStore
    from cdm.storage import TeacherStore

    p = build(tmp_path, n_docs=5)
    ts, ms = TeacherStore(p["store"]), MapStore(p["map"])
    assert len(ts) == len(ms) == 5
    for i in range(5):
        t, m = ts[i], ms[i]
        assert m.text_sha256 == t.text_sha256
        ok = m.teacher_row >= 0
        assert ok.any()
        # aligned rows: teacher and student tokens end at the same character
        np.testing.assert_array_equal(t.char_spans[m.teacher_row[ok], 1], m.student_spans[ok, 1])
    v = ms.vocab
    assert (v.em_t2s >= 0).sum() > 100 and v.fuzzy_t2s.indices.size > 0


def quick_cfg(p, out, **kw):
    """A two-step ce+cdm TrainConfig on the stores of `build(...)` (`p`) writing to `out`; `kw` overrides."""
    from cdm.train import data as D
    from cdm.train.trainer import TrainConfig

    base = dict(store=p["store"], map=p["map"], out=str(out), student=p["student"], loss="ce+cdm", max_steps=2,
                save_every=0, eval_every=0, warmup_steps=1, progress=False, num_workers=0,
                loader=D.LoaderConfig(batch_size=4, block_size=4, max_length=160))
    base.update(kw)
    return TrainConfig(**base)
