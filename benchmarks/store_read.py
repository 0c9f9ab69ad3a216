"""Whole-store passes over a teacher store (what `cdm build-map` does): sequence by sequence (`store[i]`, the
baseline) vs range reads (`TeacherStore.sequences` / iteration), on a local synthetic store.

    python benchmarks/store_read.py [--tokens 400000] [--k 128]

A sequence read fetches and decompresses the chunks it touches; with 16,384-row chunks and sequences of a few
hundred tokens, reading sequence by sequence decompresses each chunk many times. Prints tokens/s of each way, the
ratio, and the split of a range pass into reading and top-k decoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--k", type=int, default=128)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from precompute import open_sink, synthetic_results

    from cdm.storage import TeacherStore

    torch.set_num_threads(1)
    seqs, items, results, tokens = synthetic_results(args.tokens, k=args.k)
    backend = type("B", (), {"vocab_size": 49152})()
    with tempfile.TemporaryDirectory() as d:
        sink = open_sink("thread", os.path.join(d, "s"), backend, args.k)
        for i in range(0, len(seqs), 8):
            sink.put(("add", [(j, items[j]) for j in range(i, min(i + 8, len(seqs)))], results[i : i + 8]))
        sink.close()
        store = TeacherStore(os.path.join(d, "s"))
        store[0]  # open the handles before the clock
        t = time.perf_counter()
        one_by_one = sum(store[i].n_tokens for i in range(len(store)))
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        ranged = sum(s.n_tokens for s in store)
        t_range = time.perf_counter() - t
        assert one_by_one == ranged == tokens
        t = time.perf_counter()
        pairs = store.reader.read_range(0, len(store))
        t_read = time.perf_counter() - t
        fields = list(store.codec.fields(store.k))
        t = time.perf_counter()
        for arrays, _ in pairs:
            store.codec.decode({f: arrays[f] for f in fields})
        t_decode = time.perf_counter() - t
    print(f"{len(seqs)} sequences, {tokens} tokens, K={args.k} ({store.codec.name}): store[i] {tokens / t_one:,.0f} tok/s, "
          f"iteration (range reads) {tokens / t_range:,.0f} tok/s ({t_one / t_range:.1f}x); of a range pass: "
          f"read {t_read:.2f} s, decode {t_decode:.2f} s")


if __name__ == "__main__":
    main()
