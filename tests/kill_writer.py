"""Subprocess body for the SIGKILL test: write a fixed random store, committing often, printing progress."""

import sys

import numpy as np

from cdm.storage import TeacherStoreWriter
from tests.storage_helpers import manifest_sections, random_sequence

if __name__ == "__main__":
    url, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(123)
    seqs = [random_sequence(rng, i) for i in range(n)]
    w = TeacherStoreWriter(url, key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000,
                           commit_tokens=50, chunk_rows=64)
    for s in seqs:
        if s.source_index in w.done_source_indices:
            continue
        w.add(s)
        print("added", s.source_index, flush=True)
    w.close()
    print("closed", flush=True)
