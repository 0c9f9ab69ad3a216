"""`cdm precompute` refuses meaningless options before it writes anything, and a run that stores no sequence fails."""

from __future__ import annotations

import json
import re
import os

import pytest
from typer.testing import CliRunner

from cdm.cli import app
from cdm.precompute import run
from cdm.devices import resolve_device
from cdm.storage import TeacherStore
from tests.test_precompute_support import _offline, text_records, tiny_teacher, tokenizer, write_jsonl  # noqa: F401

QUIET = {"progress": False, "echo": lambda s: None}


@pytest.mark.parametrize("options, message", [
    ({"top_k": 5000}, "--top-k 5000 is more than the teacher's vocabulary"),
    ({"top_k": 0}, "--top-k must be >= 1"),
    ({"batch_tokens": 0}, "--batch-tokens must be >= 1"),
    ({"max_length": -5}, "--max-length must be >= 2"),
    ({"max_length": 1}, "--max-length must be >= 2"),
    ({"limit": -3}, "--limit must be >= 1"),
    ({"limit": 0}, "--limit must be >= 1"),
    ({"id_table": -1}, "--id-table must be >= 0"),
    ({"device": "bogus"}, "--device must be auto, cpu, cuda, cuda:N or mps"),
    ({"writer_mode": "proc"}, "--writer must be one of"),
    ({"memory_budget_mb": 0}, "--memory-budget-mb must be positive"),
    ({"writer_mode": "process", "out": "memory://cdm-proc/store"}, "--writer process cannot write memory://cdm-proc/store"),
    ({"backend_options": {"tensor_parallel_size": 4}}, "backend options (tensor_parallel_size; e.g. --tensor-parallel-size) are for --backend vllm"),
])
def test_bad_options_are_refused_before_a_store_exists(tmp_path, tiny_teacher, options, message):
    """A typo must not leave a store behind whose key blocks the corrected command: nothing is written at --out."""
    data = write_jsonl(tmp_path / "d.jsonl", text_records(4, seed=1))
    out = tmp_path / "store"
    with pytest.raises(ValueError, match=re.escape(message)):
        opts = dict(options)  # parametrize's dict is shared by reruns: do not pop from it
        run(str(tiny_teacher), str(data), opts.pop("out", str(out)), **{"top_k": 4, "text_field": "text", **opts},
            **QUIET)
    assert not out.exists()
    run(str(tiny_teacher), str(data), str(out), top_k=4, text_field="text", **QUIET)  # the corrected command works
    assert len(TeacherStore(str(out))) == 4


def test_device_checks():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    for bad in ("gpu0", "meta", "cpu:0", "xla"):  # what train refuses too; meta/xla would fail mid-run
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_a_run_that_stores_nothing_fails_and_names_the_skipped_rows(tmp_path, tiny_teacher):
    """Every row skipped (here: a field that is not text) is an error with the reasons and the rows, also when the
    command is run again on the complete, empty store; the CLI exits 2 with one `error:` line."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": ["a", "list"], "body": f"row {i} text"} for i in range(3)])
    out = str(tmp_path / "store")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"no sequence was stored \(the empty store was removed\): every input "
                           r"row was skipped .*source rows 0, 1, 2"):
            run(str(tiny_teacher), str(data), out, top_k=4, text_field="text", **QUIET)
        assert not (tmp_path / "store").exists()  # its key would block the corrected command at this --out
    r = CliRunner().invoke(app, ["precompute", "--teacher", str(tiny_teacher), "--data", str(data), "--out", out,
                                 "--text-field", "text", "--top-k", "4", "--no-progress"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    assert "--text-field" in r.output
    run(str(tiny_teacher), str(data), out, top_k=4, text_field="body", **QUIET)  # the corrected command
    assert len(TeacherStore(out)) == 3


def test_an_empty_store_beside_user_files_is_kept(tmp_path, tiny_teacher):
    """Only a folder holding nothing but a store's own files is removed."""
    from cdm.precompute.run import _remove_empty_store

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}])
    out = tmp_path / "store"
    with pytest.raises(ValueError, match="empty store was removed"):
        run(str(tiny_teacher), str(data), str(out), top_k=4, text_field="text", **QUIET)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert not _remove_empty_store(str(out)) and (out / "notes.txt").exists()


def test_skipped_rows_are_named_in_the_report(tmp_path, tiny_teacher):
    recs = text_records(5, seed=2)
    recs[1] = {"text": "   "}
    recs[3] = {"text": "  "}
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    lines: list[str] = []
    run(str(tiny_teacher), str(data), str(tmp_path / "s"), top_k=4, text_field="text", progress=False,
        echo=lines.append)
    report = "\n".join(lines)
    assert "source rows 1, 3" in report


def test_json_output_is_pure_json(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(3, seed=3))
    out = str(tmp_path / "store")
    r = CliRunner().invoke(app, ["precompute", "--teacher", str(tiny_teacher), "--data", str(data), "--out", out,
                                 "--text-field", "text", "--top-k", "4", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    stdout = r.stdout if hasattr(r, "stdout") else r.output
    doc = json.loads(stdout)
    assert doc["url"] == out and doc["store_complete"] and os.path.exists(out)


def test_max_length_beyond_the_context_warns(tmp_path, tiny_teacher):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(tiny_teacher).max_position_embeddings
    data = write_jsonl(tmp_path / "d.jsonl", text_records(2, seed=4))
    lines: list[str] = []
    run(str(tiny_teacher), str(data), str(tmp_path / "s"), top_k=4, text_field="text", max_length=context + 10,
        progress=False, echo=lines.append)
    assert any(f"beyond the teacher's context of {context}" in line for line in lines)


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ('{"text": "a"}\n\n{"text": "b"}\n{"text": bad}\n', "line 4 is not valid JSON"),
    ('{"text": "a"}\n["not", "an", "object"]\n{"text": "c"}\n', "line 2 is a JSON list, not an object"),
])
def test_unreadable_json_names_the_file_and_the_line(tmp_path, tiny_teacher, content, message):
    """pyarrow's own message names no file and counts rows from 0; the error says which file and which line."""
    from cdm.precompute.data import DataError

    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}: {message}"):
        run(str(tiny_teacher), str(path), str(tmp_path / "s"), top_k=4, text_field="text", **QUIET)
    assert not (tmp_path / "s").exists()


def test_no_progress_silences_the_libraries_and_restores_them():
    import datasets
    from transformers.utils import logging as hf_logging

    from cdm.progress import library_progress_bars, quiet_libraries_unless_progress

    seen = []

    @quiet_libraries_unless_progress
    def entry(*, progress: bool = True):
        seen.append((datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()))

    entry(progress=False)
    entry(progress=True)
    assert seen == [(False, False), (True, True)]
    with pytest.raises(RuntimeError):
        with library_progress_bars(False):
            raise RuntimeError("boom")
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()


def test_a_worker_with_another_shard_count_is_told_which_one_the_store_has(tmp_path, tiny_teacher):
    from cdm.storage import StoreError

    data = write_jsonl(tmp_path / "d.jsonl", text_records(6, seed=5))
    out = str(tmp_path / "store")
    run(str(tiny_teacher), str(data), out, top_k=4, text_field="text", num_shards=3, shard_index=0, **QUIET)
    with pytest.raises(StoreError, match="run with --num-shards 3"):
        run(str(tiny_teacher), str(data), out, top_k=4, text_field="text", num_shards=2, shard_index=1, **QUIET)


def test_paths_may_be_pathlib_and_a_rerun_reports_the_same_stats_keys(tmp_path, tiny_teacher):
    """The Python API takes pathlib.Path like the readers do; `stats` of the no-op rerun has every key of the run
    that computed the store, with this shard's counts and nothing done this run."""
    data = write_jsonl(tmp_path / "d.jsonl", text_records(5, seed=2) + [{"text": "   "}])
    out = tmp_path / "store"
    first = run(tiny_teacher, data, out, top_k=4, text_field="text", **QUIET)
    again = run(tiny_teacher, [data], out, top_k=4, text_field="text", **QUIET)
    assert isinstance(first.url, str) and first.url == again.url and first.key == again.key
    assert first.computed and not again.computed and again.store_complete
    assert set(again.stats) == set(first.stats)
    for k in ("sequences", "tokens", "skipped", "skipped_rows"):
        assert again.stats[k] == first.stats[k], k
    assert again.stats["sequences"] == 5 and sum(again.stats["skipped"].values()) == 1
    assert again.stats["tokens_this_run"] == 0 and first.stats["tokens_this_run"] == first.stats["tokens"]


def test_cli_commit_tokens_reaches_the_writer_and_is_checked(tmp_path, tiny_teacher, monkeypatch):
    """--commit-tokens sets how much a killed worker keeps; 0 is refused before anything is written."""
    import sys

    seen: dict = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(sys.modules["cdm.precompute.run"], "run", fake_run)
    data = write_jsonl(tmp_path / "d.jsonl", text_records(2, seed=6))
    args = ["precompute", "--teacher", str(tiny_teacher), "--data", str(data), "--out", str(tmp_path / "s"),
            "--text-field", "text", "--no-progress"]
    r = CliRunner().invoke(app, args + ["--commit-tokens", "512"])
    assert r.exit_code == 2 and "error: stop here" in r.output and seen["commit_tokens"] == 512
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--commit-tokens must be >= 1"):
        run(str(tiny_teacher), str(data), str(tmp_path / "s"), top_k=4, text_field="text", commit_tokens=0, **QUIET)
    assert not (tmp_path / "s").exists()
