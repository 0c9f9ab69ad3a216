"""Benchmark `cdm train`: step time and peak memory of ce+cdm against ce alone on the same student and batches,
and loader throughput against the step's consumption.

    python benchmarks/train.py                       # CPU-sized defaults (tiny Llama, vocab 32k)
    python benchmarks/train.py --preset smollm2      # SmolLM2-135M-shaped student, bf16 autocast (for a GPU)

Targets (issue 5): ce+cdm ≤ 1.25× the step time and ≤ 1.1× the peak memory of ce; loader ≥ 10× faster than
a step consumes. Synthetic stores (random top-k, 70% of positions aligned, random exact/fuzzy maps) are
written to a temp dir; the student is random. Prints a markdown table and the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from cdm.mapping.store import CSR, MapSequence, MapStoreWriter, VocabMaps
from cdm.storage import TeacherSequence, TeacherStoreWriter
from cdm.train import data as D
from cdm.train.trainer import Objective, make_optimizer, torch_maps

PRESETS = {
    "cpu": dict(vocab=32000, hidden=256, layers=4, heads=4, kv=4, inter=688, seq=256, batch=4, k=64, steps=4, dtype="fp32"),
    "smollm2": dict(vocab=49152, hidden=576, layers=30, heads=9, kv=3, inter=1536, seq=512, batch=8, k=100, steps=10, dtype="bf16"),
}


def write_stores(root: str, n_seq: int, seq: int, vs: int, k: int, seed: int = 0) -> tuple[str, str]:
    """Synthetic teacher + map stores: 1-1 spans, ~70% of positions aligned, maps with exact and fuzzy pairs."""
    rng = np.random.default_rng(seed)
    vt = vs + 1000
    t_url, m_url = os.path.join(root, "teacher"), os.path.join(root, "map")
    tw = TeacherStoreWriter(t_url, key="bench", manifest={}, k=k, vocab_size=vt)
    mw = MapStoreWriter(m_url, key="bench-map", manifest={"teacher_store": {"key": "bench"}})
    import hashlib

    for i in range(n_seq):
        n = int(rng.integers(seq // 2, seq + 1))
        text = "a" * n
        spans = np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32)
        ids = ((rng.integers(0, vt, (n, 1)) + np.arange(k) * 37) % vt).astype(np.int32)  # distinct per row
        lp = np.sort(np.log(rng.dirichlet(np.ones(k * 2), size=n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
        tw.add(TeacherSequence(f"s{i}", text, np.array([[n // 10, n]], np.int32), i, False,
                               rng.integers(0, vt, n).astype(np.int32), spans, ids, np.ascontiguousarray(lp),
                               np.zeros(n, np.float32), np.zeros(n, np.float32)))
        rows = np.where(rng.random(n) < 0.7, np.arange(n), -1).astype(np.int32)
        mw.add(MapSequence(f"s{i}", i, hashlib.sha256(text.encode()).hexdigest(), rng.integers(0, vs, n).astype(np.int32),
                           spans, rows, np.ones(n, np.int8), np.arange(n) >= n // 10, n_teacher_tokens=n))
    tw.close()
    em = np.where(rng.random(vt) < 0.6, rng.integers(0, vs, vt), -1).astype(np.int32)
    per = 4  # fuzzy neighbours per teacher id (distinct, sorted)
    idx = np.sort(rng.integers(0, vs, (vt, per)), axis=1)
    keep = np.ones_like(idx, dtype=bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    flat_idx, flat_d = idx[keep], (rng.random(idx.shape) * 0.3).astype(np.float32)[keep]
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    fuzzy = CSR(indptr, flat_idx.astype(np.int32), flat_d)
    VocabMaps(vt, vs, em, np.full(vs, -1, np.int32), fuzzy, CSR(np.zeros(vs + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)),
              np.zeros(vt, np.int32), np.zeros(vs, np.int32), 0.3).save(mw.loc, "vocab")
    mw.close()
    return t_url, m_url


def make_student(p: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                      max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device)


def loader_parts(t_url: str, m_url: str, p: dict) -> tuple[D.Sources, D.PlanStream, list[np.ndarray]]:
    cfg = D.LoaderConfig(batch_size=p["batch"], max_length=p["seq"], block_size=32, window_blocks=4)
    src = D.Sources(D.StoreSet(t_url, m_url), cfg)
    n = len(src.table.length)
    blocks = D.make_blocks(np.arange(n), src.table.shard, cfg.block_size)
    return src, D.PlanStream(blocks, src.table.length, cfg), blocks


def time_steps(loss: str, batches: list[D.Batch], maps, p: dict, device: torch.device) -> dict[str, float]:
    """Median step time (forward, loss, backward, clip, AdamW) and peak memory for one objective; a loss ending in
    ' (tail)' is the same objective with the CDM tail bucket (`cdm train`'s default)."""
    tail = loss.endswith(" (tail)")
    loss = loss.removesuffix(" (tail)")
    from cdm.train.trainer import TrainConfig

    model = make_student(p, device)
    opt = make_optimizer(model, TrainConfig(store="", map="", out=""))
    # "ce+cdm" is the columns-only CDM timed in session 1; "ce+cdm (tail)" adds the tail bucket (the default)
    obj = Objective(Objective.parse_weights(loss, 0.5), theta=0.3, tail_bucket=tail)
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if p["dtype"] == "bf16" else None
    times = []
    counts_of = [b.counts for b in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        counts = counts_of[i]
        totals = {k: float(v) for k, v in counts.items()}
        if ac is not None:
            with ac():
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        else:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        value, _ = obj.micro_loss(logits, b, totals, maps, p["vocab"], counts)
        value.backward()
        del logits, value
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times), "peak_bytes": float(peak)}


def child(args: argparse.Namespace) -> None:
    """One objective in a fresh process (so CPU peak RSS is per objective); prints `RESULT step_s peak_bytes`."""
    p = PRESETS[args.preset]
    device = torch.device(args.device)
    src, plan, blocks = loader_parts(args.teacher, args.map, p)
    stream = D.TrainStream(src, plan, D.block_index(blocks, len(src.table.length)), 0, stop=p["steps"] + 2)
    batches = [b.to(device) for b in stream]
    maps = torch_maps(src.map, device)
    r = time_steps(args.loss, batches, maps, p, device)
    print(f"RESULT {r['step_s']} {r['peak_bytes']}")


def loader_rate(t_url: str, m_url: str, p: dict, workers: int, n: int) -> float:
    """Steady-state seconds per micro-batch of the loader (the first 2 batches per worker, i.e. start-up, excluded)."""
    src, plan, blocks = loader_parts(t_url, m_url, p)
    warm = 2 * max(1, workers)
    stream = D.TrainStream(src, plan, D.block_index(blocks, len(src.table.length)), 0, stop=n + warm)
    it = iter(D.make_loader(stream, num_workers=workers))
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    k = sum(1 for _ in it)
    return (time.perf_counter() - t0) / max(k, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="ce", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--map", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    p = PRESETS[args.preset]
    root = tempfile.mkdtemp(prefix="cdm-bench-train-")
    t0 = time.perf_counter()
    t_url, m_url = write_stores(root, args.sequences, p["seq"], p["vocab"], p["k"])
    print(f"stores written in {time.perf_counter() - t0:.1f} s: {root}", file=sys.stderr)
    res = {}
    for loss in ("ce", "ce+cdm", "ce+cdm (tail)"):
        out = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--device", args.device,
                              "--loss", loss, "--teacher", t_url, "--map", m_url], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
        if out.returncode != 0 or not line:
            sys.exit(f"benchmark child ({loss}) failed:\n{out.stderr[-3000:]}")
        s, m = line[-1].split()[1:]
        res[loss] = (float(s), float(m))
    n_load = 64
    load = {w: loader_rate(t_url, m_url, p, w, n_load) for w in sorted({0, args.workers})}
    step = res["ce+cdm (tail)"][0]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    mem_kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak RSS (process)"
    print(f"\n### `cdm train` step: ce+cdm vs ce ({args.preset} preset, {dev})\n")
    print(f"student: Llama vocab {p['vocab']}, hidden {p['hidden']}, {p['layers']} layers, {p['dtype']}; micro-batch "
          f"{p['batch']} × ≤{p['seq']} tokens; teacher K={p['k']}; 70% of positions aligned\n")
    print(f"| objective | step time (s) | × ce | {mem_kind} (MiB) | × ce |")
    print("|---|---|---|---|---|")
    for loss, (s, m) in res.items():
        print(f"| {loss} | {s:.4f} | {s / res['ce'][0]:.3f} | {m / 2**20:.0f} | {m / res['ce'][1]:.3f} |")
    print("\n| loader workers | s / micro-batch | step time / loader time (target ≥ 10) |")
    print("|---|---|---|")
    for w, t in load.items():
        print(f"| {w} | {t:.4f} | {step / t:.1f} |")
    print(f"\ncommand: python benchmarks/train.py --preset {args.preset} --device {args.device} --sequences {args.sequences} --workers {args.workers}")


if __name__ == "__main__":
    main()
