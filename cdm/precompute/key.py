"""Content-addressed cache key of a teacher store: what the teacher, tokenizer, template, data and capture were.

Two runs that would write the same teacher signal get the same key and therefore share one store.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

KEY_VERSION = 1
FULL_HASH_BELOW = 64 * 2**20  # files smaller than this are hashed in full
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 1 << 16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json",)


def sha256_text(text: str | None) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def file_fingerprint(path: str) -> str:
    """sha256 of a file; for files >= 64 MiB, of its size plus 16 evenly spaced 64 KiB blocks (first and last
    included: the safetensors/GGUF header and its tensor table are always covered)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size < FULL_HASH_BELOW:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f"sampled:{size}".encode())
        for j in range(SAMPLE_BLOCKS):
            f.seek((size - SAMPLE_BYTES) * j // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BYTES))
    return "s:" + h.hexdigest()


def teacher_files(folder: str, gguf_file: str | None = None) -> list[str]:
    """The files that define the teacher's function: its config and weights (one GGUF file for GGUF sources)."""
    if gguf_file:
        return [gguf_file]
    names = sorted(os.listdir(folder))
    picked = [n for n in names if n in CONFIG_FILES or n.endswith(WEIGHT_SUFFIXES)]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in picked):
        raise FileNotFoundError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return picked


def teacher_fingerprint(folder: str, gguf_file: str | None = None) -> dict[str, Any]:
    """{"files": {name: fingerprint}, "sha256": digest over them}."""
    files = {n: file_fingerprint(os.path.join(folder, n)) for n in teacher_files(folder, gguf_file)}
    return {"files": files, "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the full tokenizer definition (model, normaliser, pre-tokeniser, post-processor, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())})
    return hashlib.sha256((body + "\n" + specials).encode("utf-8")).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything that changes the stored signal."""
    blob = json.dumps({"key_version": KEY_VERSION, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
