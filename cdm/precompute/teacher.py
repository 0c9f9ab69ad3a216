"""Resolve and load the teacher: a local Hugging Face folder, a GGUF file, or a hub name; check its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from cdm.errors import CdmError


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TeacherError(CdmError, ValueError):
    """The teacher or its tokenizer cannot be used (missing files, vocabulary mismatch, no offsets)."""


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher lives: `folder` (also a downloaded hub snapshot) or a `gguf_file` inside `folder`."""

    spec: str
    folder: str
    gguf_file: str | None = None

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf_file else "folder"

    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_teacher(spec: str) -> TeacherSource:
    """Turn --teacher into a local source; a hub name is downloaded (or found in the hub cache) first."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise TeacherError(f"--teacher {spec}: a file must be a .gguf; otherwise pass the model folder")
        return TeacherSource(spec, os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
            if len(ggufs) == 1:
                return TeacherSource(spec, os.path.abspath(path), ggufs[0])
            raise TeacherError(f"--teacher {spec}: folder has no config.json (and not exactly one .gguf file)")
        return TeacherSource(spec, os.path.abspath(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:
            raise TeacherError(f"--teacher {spec}: not a local path and could not be fetched from the hub ({e})") from e
        return TeacherSource(spec, folder)
    raise TeacherError(f"--teacher {spec}: no such file or folder")


def load_tokenizer(source: TeacherSource, tokenizer_path: str | None = None) -> Any:
    """The teacher's tokenizer (or an override folder); must be tokenizers-backed to give offsets."""
    from transformers import AutoTokenizer

    try:
        if tokenizer_path:
            return AutoTokenizer.from_pretrained(tokenizer_path)
        return AutoTokenizer.from_pretrained(source.folder, **source.hf_kwargs())
    except Exception as e:
        raise TeacherError(f"could not load the tokenizer of {tokenizer_path or source.spec}: {e}") from e


def load_config(source: TeacherSource) -> Any:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.folder, **source.hf_kwargs())
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_vocab_size(source: TeacherSource) -> int:
    """Width of the teacher's logits (config.vocab_size), read without loading weights."""
    cfg = load_config(source)
    v = getattr(cfg, "vocab_size", None)
    if not isinstance(v, int) or v <= 0:
        raise TeacherError(f"{source.spec}: config has no vocab_size")
    return v


def check_vocab(tokenizer: Any, vocab_size: int, spec: str = "teacher") -> None:
    """Refuse a tokenizer that can produce ids the model has no logits row for (wrong tokenizer for the model)."""
    n = len(tokenizer)
    top = max(tokenizer.get_vocab().values(), default=-1) + 1
    if max(n, top) > vocab_size:
        raise TeacherError(
            f"{spec}: tokenizer has {max(n, top)} ids but the model's vocabulary has {vocab_size} rows: "
            "tokenizer and model do not belong together (pass the matching --tokenizer)"
        )


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere (CPUs without bf16 units are ~7x slower in bf16)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise TeacherError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(source: TeacherSource, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Load the causal LM in eval mode on `device` (GGUF weights are dequantised by transformers)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **source.hf_kwargs())
    except Exception as e:
        raise TeacherError(f"could not load the teacher model {source.spec}: {e}") from e
    return model.to(device).eval()
