"""`cdm.precompute.run` end to end on a tiny random teacher: store contents, bad inputs, keys, cache, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm.precompute import resolve_shard, run, shard_rows
from cdm.precompute.cache import format_stores, list_stores
from cdm.precompute.data import DataError
from cdm.precompute.encode import OffsetsUnavailable
from cdm.precompute.teacher import TeacherError
from cdm.storage import StoreError, TeacherStore
from tests.test_precompute_support import (  # noqa: F401  (fixtures)
    _offline,
    assert_offsets_match,
    make_teacher,
    text_records,
    tiny_teacher,
    tokenizer,
    write_jsonl,
)

QUIET = {"progress": False, "echo": lambda s: None}


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def by_source(url):
    return {s.source_index: s for s in TeacherStore(url)}


def check_against_model(seq, model, k):
    """Stored rows equal a float64 full softmax of the model on the stored tokens (values at fp16 precision)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(seq.token_ids[None].astype(np.int64))).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    ref_top = lp.topk(k, -1).values.numpy()
    got = np.take_along_axis(lp.numpy(), seq.topk_ids.astype(np.int64), -1)
    np.testing.assert_allclose(got, ref_top, atol=2e-5)  # the stored ids are a float64 top-k
    np.testing.assert_allclose(seq.topk_logprobs, ref_top, rtol=1e-3, atol=1e-3)  # fp16 storage
    np.testing.assert_allclose(seq.logsumexp, torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(seq.entropy, -(lp.exp() * lp).sum(-1).numpy(), rtol=1e-4, atol=1e-4)


def test_text_store_matches_direct_computation(tmp_path, tiny_teacher, tokenizer, model):
    recs = text_records(14, seed=1, max_chars=150)
    recs[2] = {"text": "   "}
    recs[5] = {"other": "no text"}
    recs[8] = {"text": "x" * 3000}  # longer than max_length: truncated and flagged
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = str(tmp_path / "store")
    res = run(str(tiny_teacher), str(data), out, top_k=12, text_field="text", max_length=96, batch_tokens=256,
              window_rows=5, **QUIET)
    assert res.computed and res.store_complete and res.url == out
    assert res.stats["skipped"] == {"empty text": 1, "missing field 'text'": 1}
    store = TeacherStore(out)
    assert store.is_complete and store.k == 12 and store.vocab_size == len(tokenizer) and len(store) == 12
    m = store.manifest
    assert m["capture"]["backend"] == "hf" and m["capture"]["entropy"].startswith("exact")
    assert m["teacher"]["fingerprint"] and m["data"]["rows"] == 14 and m["capture"]["max_length"] == 96
    seqs = by_source(out)
    assert sorted(seqs) == [i for i in range(14) if i not in (2, 5)]
    for i, s in seqs.items():
        assert s.truncated == (i == 8)
        assert recs[i]["text"].startswith(s.text) and (s.truncated or s.text == recs[i]["text"])
        assert s.response_spans.tolist() == [[0, len(s.text)]] and s.response_char_start == -1
        if not s.truncated:
            assert s.token_ids.tolist() == tokenizer(s.text)["input_ids"]
        assert s.char_spans[0].tolist() == [0, 0] and s.char_spans[-1, 1] == len(s.text)
        assert_offsets_match(tokenizer, s.token_ids, s.char_spans, s.text)
        check_against_model(s, model, 12)
    assert seqs[8].n_tokens <= 96
    # re-running the finished store is a no-op that reports it
    msgs = []
    again = run(str(tiny_teacher), str(data), out, top_k=12, text_field="text", max_length=96, progress=False,
                echo=msgs.append)
    assert not again.computed and again.key == res.key and "nothing to do" in msgs[0] and out in msgs[0]


def test_chat_records_keep_every_assistant_span(tmp_path, tiny_teacher, tokenizer, model):
    convs = [
        {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
                      {"role": "user", "content": "And a tuple?"}, {"role": "assistant", "content": "Immutable."}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": "garbage"},
        {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello naïve 数学."}]},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", convs)
    out = str(tmp_path / "chat")
    res = run(str(tiny_teacher), [str(data)], out, top_k=4, messages_field="messages", **QUIET)
    assert res.stats["skipped"] == {"no assistant turn": 1, "malformed messages: not a list": 1}
    seqs = by_source(out)
    s0 = seqs[0]
    assert s0.text == tokenizer.apply_chat_template(convs[0]["messages"], tokenize=False)
    assert [s0.text[a:b] for a, b in s0.response_spans] == ["A sequence.<|im_end|>", "Immutable.<|im_end|>"]
    assert s0.response_char_start == s0.response_spans[0, 0]
    assert s0.token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS added to rendered chat
    assert TeacherStore(out).manifest["teacher"]["chat_template"] == tokenizer.chat_template
    check_against_model(seqs[3], model, 4)


def test_prompt_response_and_template_file(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "pr.jsonl", [{"q": "Say hi.", "a": "hi"}, {"q": "Empty?", "a": ""}])
    out = str(tmp_path / "pr")
    res = run(str(tiny_teacher), str(data), out, top_k=3, prompt_field="q", response_field="a", separator="\n", **QUIET)
    (s,) = TeacherStore(out)
    assert s.text == "Say hi.\nhi" and s.response_spans.tolist() == [[8, 10]]
    assert res.stats["skipped"] == {"empty response": 1}
    # a template file overrides the tokenizer's template (and changes the key)
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"m": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    r2 = run(str(tiny_teacher), str(chat), str(tmp_path / "tf"), top_k=3, messages_field="m", chat_template=str(tpl), **QUIET)
    (s2,) = TeacherStore(r2.url)
    assert s2.text == "user: q\nassistant: a\n" and s2.text[slice(*s2.response_spans[0])] == "assistant: a"


def test_cache_dir_is_content_addressed_and_listed(tmp_path, tiny_teacher):
    from typer.testing import CliRunner

    data = write_jsonl(tmp_path / "d.jsonl", text_records(4, seed=2))
    cache = str(tmp_path / "cache")
    a = run(str(tiny_teacher), str(data), top_k=4, text_field="text", cache_dir=cache, **QUIET)
    b = run(str(tiny_teacher), str(data), top_k=4, text_field="text", cache_dir=cache, **QUIET)
    c = run(str(tiny_teacher), str(data), top_k=5, text_field="text", cache_dir=cache, **QUIET)
    assert a.url == b.url and a.url.startswith(cache) and a.key.startswith(a.url.rsplit("/", 1)[-1])
    assert not b.computed and c.url != a.url
    stores = list_stores(cache)
    assert sorted(s.path for s in stores) == sorted([a.url, c.url])
    assert all(s.complete and s.sequences == 4 and s.bytes > 0 for s in stores)
    assert str(tiny_teacher) in format_stores(stores)
    import typer

    from cdm.precompute.command import ls_command, precompute_command

    app = typer.Typer()
    app.command("precompute")(precompute_command)
    app.command("ls")(ls_command)
    r = CliRunner().invoke(app, ["ls", "--cache-dir", cache, "--json"])
    assert r.exit_code == 0 and {s["path"] for s in json.loads(r.output)} == {a.url, c.url}
    r = CliRunner().invoke(app, ["precompute", "--teacher", str(tiny_teacher), "--data", str(data), "--top-k", "4",
                                 "--text-field", "text", "--cache-dir", cache, "--no-progress"])
    assert r.exit_code == 0 and a.url in r.output
    r = CliRunner().invoke(app, ["precompute", "--teacher", str(tiny_teacher), "--data", str(data),
                                 "--text-field", "body", "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2 and "['body'] not in the data" in r.output


def test_out_path_with_another_key_is_refused(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(3, seed=3))
    out = str(tmp_path / "s")
    run(str(tiny_teacher), str(data), out, top_k=4, text_field="text", **QUIET)
    with pytest.raises(StoreError, match="holds a store with key"):
        run(str(tiny_teacher), str(data), out, top_k=6, text_field="text", **QUIET)
    write_jsonl(tmp_path / "d.jsonl", text_records(3, seed=4))  # same path, new content: new data fingerprint
    with pytest.raises(StoreError, match="holds a store with key"):
        run(str(tiny_teacher), str(data), out, top_k=4, text_field="text", **QUIET)


def test_teacher_and_tokenizer_mismatches_are_clear_errors(tmp_path, tokenizer):
    from transformers import CanineTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    small = make_teacher(tmp_path / "small", tokenizer, vocab_size=900, layers=1)
    with pytest.raises(TeacherError, match="tokenizer has 1000 ids but the model's vocabulary has 900 rows"):
        run(str(small), str(data), str(tmp_path / "o"), text_field="text", **QUIET)
    canine = tmp_path / "canine"
    CanineTokenizer().save_pretrained(canine)
    with pytest.raises(OffsetsUnavailable, match="cannot return character offsets"):
        run(str(small), str(data), str(tmp_path / "o"), text_field="text", tokenizer=str(canine), **QUIET)
    with pytest.raises(TeacherError, match="no such file or folder"):
        run(str(tmp_path / "missing"), str(data), str(tmp_path / "o"), text_field="text", **QUIET)
    with pytest.raises(DataError, match="exactly one record shape"):
        run(str(small), str(data), str(tmp_path / "o"), **QUIET)
    bare = tmp_path / "bare"
    make_teacher(bare, tokenizer, layers=1)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    chat = write_jsonl(tmp_path / "c.jsonl", [{"m": [{"role": "user", "content": "q"}]}])
    with pytest.raises(TeacherError, match="no chat template; pass --chat-template"):
        run(str(bare), str(chat), str(tmp_path / "o2"), messages_field="m", **QUIET)


def test_parquet_rows_with_invalid_utf8_are_skipped(tmp_path, tiny_teacher):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"good text here", b"bad \xff\xfe bytes", b"more good text"], type=pa.binary())
    col = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # unvalidated: invalid UTF-8 inside
    pq.write_table(pa.table({"text": col}), tmp_path / "d.parquet")
    out = str(tmp_path / "s")
    res = run(str(tiny_teacher), str(tmp_path / "d.parquet"), out, top_k=3, text_field="text", **QUIET)
    assert res.stats["skipped"] == {"non-UTF-8 bytes in a field": 1}
    assert sorted(by_source(out)) == [0, 2]


def test_limit_and_shard_assignment(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(9, seed=6))
    out = str(tmp_path / "s")
    r0 = run(str(tiny_teacher), str(data), out, top_k=3, text_field="text", limit=7, num_shards=3, shard_index=1, **QUIET)
    assert not r0.store_complete and r0.stats["sequences"] == 2
    assert TeacherStore(out, allow_incomplete=True).manifest["shards"][1]["state"] == "complete"
    for i in (0, 2):
        run(str(tiny_teacher), str(data), out, top_k=3, text_field="text", limit=7, num_shards=3, shard_index=i, **QUIET)
    assert sorted(by_source(out)) == list(range(7))
    assert list(shard_rows(7, 3, 1)) == [1, 4]


def test_resolve_shard_from_flags_torchrun_and_slurm():
    assert resolve_shard(None, None, {}) == (1, 0)
    assert resolve_shard(None, None, {"WORLD_SIZE": "8", "RANK": "3"}) == (8, 3)
    assert resolve_shard(4, 2, {"WORLD_SIZE": "8", "RANK": "3"}) == (4, 2)
    assert resolve_shard(None, None, {"SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_ID": "7",
                                      "SLURM_ARRAY_TASK_MIN": "4"}) == (5, 3)
    with pytest.raises(ValueError, match=r"shard index 4 must be in \[0, 4\) \(shards from --num-shards / --shard-index"):
        resolve_shard(4, 4, {})
    with pytest.raises(ValueError, match=r"shard index 5 .* \$WORLD_SIZE / \$RANK"):
        resolve_shard(None, None, {"WORLD_SIZE": "2", "RANK": "5"})
    # one flag, the other from the launcher; a flag the launcher cannot complete is an error, never a silent shard 0
    torchrun = {"WORLD_SIZE": "2", "RANK": "1"}
    assert resolve_shard(2, None, torchrun) == (2, 1)
    assert resolve_shard(None, 1, torchrun) == (2, 1)
    assert resolve_shard(1, None, {}) == (1, 0)
    assert resolve_shard(1, None, {"WORLD_SIZE": "1", "RANK": "0"}) == (1, 0)
    with pytest.raises(ValueError, match=r"--num-shards 1 but \$WORLD_SIZE / \$RANK says 2 workers"):
        resolve_shard(1, None, torchrun)  # every rank would write shard 0; --shard-index 0 says it is meant
    assert resolve_shard(1, 0, torchrun) == (1, 0)
    with pytest.raises(ValueError, match=r"--num-shards 2 needs --shard-index \(0 to 1\) outside torchrun"):
        resolve_shard(2, None, {})
    with pytest.raises(ValueError, match=r"--num-shards 4 but \$WORLD_SIZE / \$RANK says 2 workers"):
        resolve_shard(4, None, torchrun)
    with pytest.raises(ValueError, match=r"--shard-index 1 needs --num-shards"):
        resolve_shard(None, 1, {})
    # a SLURM array with a step: --array=0-6:2 is 4 tasks with ids 0, 2, 4, 6
    for task, index in ((0, 0), (2, 1), (4, 2), (6, 3)):
        slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0",
                 "SLURM_ARRAY_TASK_STEP": "2"}
        assert resolve_shard(None, None, slurm) == (4, index)


def test_id_table_codec_round_trips_and_is_shared_by_shards(tmp_path, tiny_teacher):
    """--id-table fits one table from the first rows (same in every worker); values and ids read back unchanged."""
    recs = text_records(12, seed=3, max_chars=120)
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    plain = str(tmp_path / "plain")
    run(str(tiny_teacher), str(data), plain, top_k=6, text_field="text", codec="q5", **QUIET)
    tabled = str(tmp_path / "tabled")
    for shard in (1, 0):  # the second worker reuses the table the first one wrote into the manifest
        run(str(tiny_teacher), str(data), tabled, top_k=6, text_field="text", codec="q5", id_table=64,
            num_shards=2, shard_index=shard, **QUIET)
    a, b = TeacherStore(plain), TeacherStore(tabled)
    table = b.manifest["codec"]["params"]["id_table"]
    assert 0 < len(table) <= 64 and a.manifest["codec"]["params"]["id_table"] is None
    assert a.key != b.key
    sa, sb = by_source(plain), by_source(tabled)
    assert sorted(sa) == sorted(sb)
    for i in sa:
        np.testing.assert_array_equal(sa[i].topk_ids, sb[i].topk_ids)
        np.testing.assert_array_equal(sa[i].topk_logprobs, sb[i].topk_logprobs)


def test_windows_cover_every_row_once_with_a_short_first_window():
    from cdm.precompute.run import windows

    assert windows(0, 2048) == []
    assert windows(100, 2048) == [(0, 100)]
    assert windows(5000, 2048) == [(0, 256), (256, 768), (768, 1792), (1792, 3840), (3840, 5000)]
    assert windows(7, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert windows(7, 4, first=1) == [(0, 1), (1, 3), (3, 7)]
    for n in range(0, 40):
        for size in (1, 3, 5, 300):
            w = windows(n, size, first=4)
            assert [i for a, b in w for i in range(a, b)] == list(range(n)) and all(b - a <= size for a, b in w)


def test_prefetched_keeps_order_raises_at_the_failing_item_and_stops_early():
    import threading

    from cdm.precompute.run import prefetched

    seen_threads = set()

    def fn(x):
        seen_threads.add(threading.current_thread().name)
        if x == 5:
            raise ValueError("bad window 5")
        return x * x

    for ahead in (0, 1, 3):
        got = []
        with pytest.raises(ValueError, match="bad window 5"):
            for y in prefetched(fn, range(10), ahead):
                got.append(y)
        assert got == [0, 1, 4, 9, 16]  # everything before the failing item, in order
    assert any(n.startswith("cdm-prepare") for n in seen_threads) and threading.main_thread().name in seen_threads
    assert list(prefetched(fn, range(5), 2)) == [0, 1, 4, 9, 16]
    gen = prefetched(fn, range(100), 2)
    assert next(gen) == 0
    gen.close()  # the consumer stops early: nothing hangs, queued work is cancelled


def test_store_is_the_same_with_and_without_prefetched_windows(tmp_path, tiny_teacher, monkeypatch):
    import importlib

    run_mod = importlib.import_module("cdm.precompute.run")  # the module (the package exports the function `run`)
    recs = text_records(11, seed=4, max_chars=120)
    recs[3] = {"text": ""}
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    stores = {}
    for ahead in (0, 1):
        monkeypatch.setattr(run_mod, "PREFETCH_WINDOWS", ahead)
        out = str(tmp_path / f"store{ahead}")
        res = run(str(tiny_teacher), str(data), out, top_k=6, text_field="text", batch_tokens=128, window_rows=2, **QUIET)
        assert res.stats["skipped"] == {"empty text": 1}
        stores[ahead] = by_source(out)
    assert sorted(stores[0]) == sorted(stores[1]) == [i for i in range(11) if i != 3]
    for i, a in stores[0].items():
        b = stores[1][i]
        assert a.text == b.text
        for f in ("token_ids", "char_spans", "topk_ids", "topk_logprobs", "logsumexp", "entropy"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_waits_for_the_host_side_are_measured_and_explained():
    import time as _time

    from cdm.precompute.run import host_wait_lines, prefetched
    from cdm.precompute.sink import ThreadQueue

    waited: list[float] = []
    assert list(prefetched(lambda x: _time.sleep(0.05) or x, range(3), 0, waited.append)) == [0, 1, 2]
    assert len(waited) == 3 and all(w >= 0.045 for w in waited)  # in line: the caller waits the whole time
    waited.clear()
    assert list(prefetched(lambda x: _time.sleep(0.05) or x, range(3), 1, waited.append)) == [0, 1, 2]
    assert len(waited) == 3 and sum(waited) >= 0.045  # at least the first window is waited for

    q = ThreadQueue(lambda item: _time.sleep(0.05), depth=1)
    for i in range(4):
        q.put(i)
    q.close()
    assert q.blocked_s >= 0.05  # a slow consumer makes put() wait

    assert host_wait_lines({"preparation": 1.0, "writer": 0.5}, 100.0) == [
        "host waits the teacher loop waited 1.0 s for tokenisation and 0.5 s for the store writer (of 100.0 s)"]
    lines = host_wait_lines({"preparation": 20.0, "writer": 11.0}, 100.0)
    assert len(lines) == 3 and "tokenisation limited" in lines[1] and "--writer process" in lines[2]


def test_run_reports_host_waits(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(6, seed=2, max_chars=100))
    res = run(str(tiny_teacher), str(data), str(tmp_path / "s"), top_k=4, text_field="text", batch_tokens=128, **QUIET)
    assert res.stats["waited_for_preparation_s"] >= 0 and res.stats["waited_for_writer_s"] >= 0
    assert "host waits the teacher loop waited" in res.report


def test_ctrl_c_commits_what_was_handed_over_and_says_how_to_resume(tmp_path, tiny_teacher, monkeypatch):
    from typer.testing import CliRunner

    from cdm.cli import app
    from cdm.precompute.hf_backend import HFBackend

    data = write_jsonl(tmp_path / "d.jsonl", text_records(12, seed=5, max_chars=120))
    out = str(tmp_path / "s")
    args = ["precompute", "--teacher", str(tiny_teacher), "--data", str(data), "--text-field", "text", "--top-k", "4",
            "--batch-tokens", "64", "--out", out, "--no-progress"]
    real_submit, calls = HFBackend.submit, []

    def interrupted(self, seqs):
        calls.append(len(seqs))
        if len(calls) == 3:  # the first batch has been handed to the writer by now
            raise KeyboardInterrupt
        return real_submit(self, seqs)

    monkeypatch.setattr(HFBackend, "submit", interrupted)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output
    state = json.loads((tmp_path / "s" / "shard-00000" / "_writing" / "state.json").read_text())
    assert state["n_sequences"] >= calls[0]
    monkeypatch.setattr(HFBackend, "submit", real_submit)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sorted(by_source(out)) == list(range(12))


def test_a_url_cache_dir_holds_the_stores_and_cdm_ls_lists_them(tmp_path, tiny_teacher):
    """--cache-dir (or $CDM_CACHE_DIR) may be an fsspec URL: the store lands under <url>/stores/<key>, a second
    experiment finds it there, and `cdm ls` lists it with the shards' bytes."""
    from cdm.precompute.cache import list_stores

    data = write_jsonl(tmp_path / "d.jsonl", text_records(5, seed=9))
    import uuid

    cache = f"memory://cdm-url-cache-{uuid.uuid4().hex}"
    first = run(str(tiny_teacher), str(data), top_k=3, text_field="text", cache_dir=cache, **QUIET)
    assert first.url.startswith(cache + "/stores/") and first.computed
    again = run(str(tiny_teacher), str(data), top_k=3, text_field="text", cache_dir=cache, **QUIET)
    assert again.url == first.url and not again.computed
    listed = list_stores(cache)
    assert [s.path for s in listed] == [first.url] and listed[0].sequences == 5 and listed[0].bytes > 0
    assert list_stores(f"memory://cdm-url-cache-empty-{uuid.uuid4().hex}") == []
