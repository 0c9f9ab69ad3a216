"""Loading tokenizers for build-map (HF folder, tokenizer.json, SentencePiece model, GGUF) and encoding with offsets."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

ROLE_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or cannot give character offsets."""


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` from a folder (tokenizer.json, or tokenizer.model via transformers), a
    `tokenizer.json` file, or a `.gguf` file; special-token roles are attached as ``tok.cdm_roles``."""
    p = Path(path)
    roles: dict[str, str] = {}
    if p.is_dir():
        roles = read_roles(p)
        if (p / "tokenizer.json").exists():
            tok = tokenizers.Tokenizer.from_file(str(p / "tokenizer.json"))
        elif any(p.glob("*.model")) or any(p.glob("*.gguf")):
            tok = _via_transformers(p)
        else:
            raise TokenizerError(f"{p}: no tokenizer.json, tokenizer.model or .gguf file in this folder")
    elif p.is_file() and p.suffix == ".json":
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{p}: not a tokenizers JSON file ({e})") from None
        roles = read_roles(p.parent)
    elif p.is_file() and p.suffix == ".gguf":
        tok = _via_transformers(p.parent, gguf_file=p.name)
    else:
        raise TokenizerError(f"{p}: expected a tokenizer folder, a tokenizer.json or a .gguf file")
    tok.cdm_roles = roles or getattr(tok, "cdm_roles", {})  # type: ignore[attr-defined]
    return tok


def _via_transformers(folder: Path, gguf_file: str | None = None) -> tokenizers.Tokenizer:
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoTokenizer.from_pretrained(str(folder), **kw)
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{folder}: transformers gave a tokenizer without a fast backend (no offsets)")
    tok = tokenizers.Tokenizer.from_str(backend.to_str())
    tok.cdm_roles = {k: str(getattr(hf, k)) for k in ROLE_KEYS if getattr(hf, k, None)}  # type: ignore[attr-defined]
    return tok


def read_roles(folder: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json / special_tokens_map.json, when present."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        for k in ROLE_KEYS:
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and v:
                roles[k] = v
    return roles


def tokenizer_hash(tok: tokenizers.Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON serialisation (identity for caches and provenance checks)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode_with_offsets(tok: tokenizers.Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and character spans of `text`, without added special tokens (BOS etc.)."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    spans = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
    if len(ids) and text and int(spans[:, 1].max()) == 0:
        raise TokenizerError("this tokenizer gives no character offsets (all spans empty); cdm needs offsets")
    return ids, spans
