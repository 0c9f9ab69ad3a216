"""Records -> canonical text and trained spans; dataset loading; tokenisation, offsets and the length policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.precompute.data import (
    DataError,
    RecordFormat,
    SkipRecord,
    canonical_text,
    check_columns,
    data_fingerprint,
    load_records,
    render_chat,
    seq_id,
)
from cdm.precompute.encode import OffsetsUnavailable, apply_length_policy, check_offsets, encode_offsets, normalise_spans
from tests.test_precompute_support import _offline, assert_offsets_match, tokenizer, write_jsonl  # noqa: F401


def chatml(tok):
    return lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_text_and_prompt_response_shapes():
    c = canonical_text({"t": "Hello world"}, RecordFormat(text_field="t"))
    assert c.text == "Hello world" and c.response_spans.tolist() == [[0, 11]]
    fmt = RecordFormat(prompt_field="q", response_field="a", separator="\n")
    c = canonical_text({"q": "What is 2+2?", "a": "4."}, fmt)
    assert c.text == "What is 2+2?\n4." and c.text[slice(*c.response_spans[0])] == "4."
    assert c.response_spans.dtype == np.int32


def test_chat_spans_cover_every_assistant_turn(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    c = canonical_text({"m": msgs}, RecordFormat(messages_field="m"), chatml(tokenizer))
    assert c.text == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert [c.text[a:b] for a, b in c.response_spans] == ["Hello!<|im_end|>", "4<|im_end|>"]
    # ShareGPT records ({from, value}) and JSON-encoded message strings give the same result
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in msgs]
    c2 = canonical_text({"m": json.dumps(share)}, RecordFormat(messages_field="m"), chatml(tokenizer))
    assert c2.text == c.text and np.array_equal(c2.response_spans, c.response_spans)


def test_chat_template_that_rewrites_history_falls_back_to_sentinel_diff():
    # a template that drops earlier assistant turns' text after "###" (like reasoning-stripping templates)
    def render(msgs, gen):
        out = []
        for i, m in enumerate(msgs):
            body = m["content"].split("###")[-1] if (m["role"] == "assistant" and i < len(msgs) - 1) else m["content"]
            out.append(f"[{m['role']}]{body}\n")
        return "".join(out) + ("[assistant]" if gen else "")

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "think###one"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    c = render_chat(msgs, render)
    assert [c.text[a:b] for a, b in c.response_spans] == ["one", "two"]
    assert c.text == render(msgs, False)


@pytest.mark.parametrize("record, reason", [
    ({"t": "   \n\t"}, "empty text"),
    ({"t": ""}, "empty text"),
    ({"t": None}, "missing field 't'"),
    ({}, "missing field 't'"),
    ({"t": 5}, "field 't' is int, not a string"),
    ({"t": b"ok \xff\xfe"}, "non-UTF-8 bytes in field 't'"),
    ({"t": "x\ud800y"}, "non-UTF-8 text (lone surrogate) in field 't'"),
])
def test_bad_text_records_are_skipped_with_reasons(record, reason):
    with pytest.raises(SkipRecord) as e:
        canonical_text(record, RecordFormat(text_field="t"))
    assert e.value.reason == reason
    assert canonical_text({"t": b"caf\xc3\xa9"}, RecordFormat(text_field="t")).text == "café"


@pytest.mark.parametrize("messages, reason", [
    ("not json", "malformed messages: not a list"),
    ([], "malformed messages: not a non-empty list"),
    ([["user", "hi"]], "malformed messages: an entry is not an object"),
    ([{"content": "hi"}], "malformed messages: an entry has no role"),
    ([{"role": "user", "content": 3}], "malformed messages: content is not a string"),
    ([{"role": "user", "content": None}], "malformed messages: content is not a string"),
    ([{"role": "user", "content": "only a question"}], "no assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "no assistant turn"),
    (None, "missing field 'm'"),
])
def test_malformed_messages_are_skipped(tokenizer, messages, reason):
    with pytest.raises(SkipRecord) as e:
        canonical_text({"m": messages}, RecordFormat(messages_field="m"), chatml(tokenizer))
    assert e.value.reason == reason


def test_template_errors_and_empty_response_are_skips():
    def strict(msgs, gen):
        raise ValueError("roles must alternate")

    with pytest.raises(SkipRecord, match="chat template failed"):
        render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], strict)
    with pytest.raises(SkipRecord, match="empty response"):
        canonical_text({"q": "x", "a": " "}, RecordFormat(prompt_field="q", response_field="a"))


def test_record_format_validation():
    with pytest.raises(DataError, match="exactly one"):
        RecordFormat()
    with pytest.raises(DataError, match="exactly one"):
        RecordFormat(text_field="t", messages_field="m")
    with pytest.raises(DataError, match="go together"):
        RecordFormat(prompt_field="q")
    assert RecordFormat(messages_field="m").to_json() == {"kind": "chat", "messages_field": "m", "separator": ""}


# ------------------------------------------------------------------------------------------- loading


def test_load_every_supported_file_kind(tmp_path):
    import datasets

    rows = [{"text": "alpha"}, {"text": "beta"}, {"text": None}]
    ds = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for p in ("a.jsonl", "a.json", "a.parquet", "a.csv", "saved", str(arrow)):
        got = load_records([str(tmp_path / p)], cache_dir=str(tmp_path / "cache"))
        assert [r["text"] for r in got][:2] == ["alpha", "beta"], p
    two = load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "cache"))
    assert len(two) == 6


def test_loading_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff here"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 holds bytes that are not UTF-8"):
        load_records([str(bad)], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="not found"):
        load_records([str(tmp_path / "nope.jsonl"), str(bad)])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="extensions"):
        load_records([str(tmp_path / "x.txt")])
    good = write_jsonl(tmp_path / "g.jsonl", [{"body": "x"}])
    ds = load_records([str(good)], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"\['text'\] not in the data; its columns are \['body'\]"):
        check_columns(ds, RecordFormat(text_field="text"))


def test_fingerprint_and_seq_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    f1 = data_fingerprint([str(a)])
    assert f1 == data_fingerprint([str(a)]) and f1 != data_fingerprint([str(a)], split="test")
    write_jsonl(a, [{"text": "y"}])
    f2 = data_fingerprint([str(a)])
    assert f2 != f1
    assert seq_id(f2, 3) == seq_id(f2, 3) and seq_id(f2, 3) != seq_id(f2, 4) and len(seq_id(f2, 0)) == 16


# ------------------------------------------------------------------------------------------- encoding


def test_offsets_map_tokens_to_text(tokenizer):
    text = "def f(x):\n    return x**2  # naïve café 数学"
    (ids, spans), = encode_offsets(tokenizer, [text], add_special_tokens=True)
    assert ids[0] == tokenizer.bos_token_id and spans[0].tolist() == [0, 0]
    assert_offsets_match(tokenizer, ids, spans, text)


def test_normalise_spans_moves_added_specials():
    s = normalise_spans(np.array([[0, 0], [0, 3], [3, 5], [0, 0]], dtype=np.int32))
    assert s.tolist() == [[0, 0], [0, 3], [3, 5], [5, 5]]


def normalise_spans_reference(spans: np.ndarray) -> np.ndarray:
    """The loop that defines `normalise_spans`: an empty token takes the end of the last non-empty one (0 if none)."""
    spans = np.array(spans, dtype=np.int32).reshape(-1, 2)
    prev = 0
    for i in range(len(spans)):
        if spans[i, 0] == spans[i, 1]:
            spans[i] = (prev, prev)
        else:
            prev = int(spans[i, 1])
    return spans


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.booleans()), max_size=40))
def test_normalise_spans_vectorised_equals_loop(parts):
    """Random span lists with empty tokens anywhere (first, runs, last), non-monotone ends included."""
    spans = np.array([[a, a] if empty else [a, a + w + 1] for a, w, empty in parts], dtype=np.int32).reshape(-1, 2)
    got = normalise_spans(spans)
    np.testing.assert_array_equal(got, normalise_spans_reference(spans))
    assert got.dtype == np.int32 and got.shape == spans.shape


def test_tokenizer_without_offsets_is_refused():
    from transformers import CanineTokenizer

    with pytest.raises(OffsetsUnavailable, match="cannot return character offsets"):
        check_offsets(CanineTokenizer())


@settings(max_examples=30, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab cdé数\n") + ["学", "🙂"]), min_size=1, max_size=60),
       max_length=st.integers(1, 40), frac=st.floats(0, 1))
def test_truncation_cuts_text_at_a_clean_token_boundary(tokenizer, text, max_length, frac):
    from cdm.precompute.data import Canonical

    start = min(int(len(text) * frac), len(text) - 1)
    canon = Canonical(text, np.array([[start, len(text)]], dtype=np.int32))
    (ids, spans), = encode_offsets(tokenizer, [text], add_special_tokens=True)
    try:
        e = apply_length_policy(canon, ids, spans, max_length, "truncate")
    except SkipRecord as s:
        assert s.reason in ("longer than max_length", "no response within max_length")
        return
    assert len(e.token_ids) <= max_length and e.truncated == (len(ids) > max_length)
    assert text.startswith(e.text) and (not e.truncated or len(e.text) == int(e.char_spans[:, 1].max()))
    assert np.array_equal(e.token_ids, ids[: len(e.token_ids)])
    if e.truncated:  # the next (dropped) token starts at or after the cut: no shared character
        assert spans[len(e.token_ids), 0] >= len(e.text)
    assert np.all((e.response_spans >= 0) & (e.response_spans <= len(e.text)))
    assert np.all(e.response_spans[:, 1] > e.response_spans[:, 0])


def test_length_policy_skip_and_errors(tokenizer):
    from cdm.precompute.data import Canonical

    text = "one two three four five six"
    (ids, spans), = encode_offsets(tokenizer, [text], add_special_tokens=False)
    canon = Canonical(text, np.array([[0, len(text)]], dtype=np.int32))
    with pytest.raises(SkipRecord, match="longer than max_length"):
        apply_length_policy(canon, ids, spans, 2, "skip")
    assert not apply_length_policy(canon, ids, spans, len(ids), "skip").truncated
    late = Canonical(text, np.array([[20, len(text)]], dtype=np.int32))
    with pytest.raises(SkipRecord, match="no response within max_length"):
        apply_length_policy(late, ids, spans, 2, "truncate")
    with pytest.raises(ValueError, match="truncation policy"):
        apply_length_policy(canon, ids, spans, 2, "drop")
