"""Loading the student (an HF folder, or a config + tokenizer from scratch) and checking it fits the map store."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from cdm.mapping.store import MapStore
from cdm.train.config import ConfigError, TrainConfig


def student_tokenizer_hash(path: str, tokenizer: Any = None) -> str:
    """The key the map store records for its student tokenizer: sha256 of the tokenizer's JSON, exactly as
    `cdm build-map` computes it (`cdm.mapping.tokenizers.tokenizer_hash`)."""
    from cdm.mapping.tokenizers import load_tokenizer, tokenizer_hash

    return str(tokenizer_hash(load_tokenizer(path)))


def _looks_local(path: str) -> bool:
    """True when `path` is meant as a local path rather than a Hugging Face hub name: it starts with ./ ../ / ~
    (or a drive/separator), or its first component exists here (e.g. runs/x when ./runs exists)."""
    if path.startswith(("./", "../", "/", "~", ".\\", "..\\")) or path in (".", "..") or os.path.isabs(path):
        return True
    first = path.replace("\\", "/").split("/")[0]
    return "/" in path.replace("\\", "/") and os.path.isdir(first)


def _load_from(flag: str, path: str, load: Callable[[str], Any], what: str = "folder") -> Any:
    """`load(path)` for the option `flag`; a missing local path or a failing load becomes one ConfigError naming the
    flag and path (instead of transformers' 'Repo id must use alphanumeric chars' traceback). Hub names still load."""
    local = os.path.expanduser(path)
    if _looks_local(path) and not os.path.exists(local):
        raise ConfigError(f"{flag} {path}: no such {what}")
    try:
        return load(local if os.path.exists(local) else path)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers reports bad folders/ids as OSError/ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {path}: cannot load it ({first})") from e


def load_student(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """The student model (fp32 weights) and its tokenizer: an HF folder, or a config + tokenizer from scratch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if cfg.student:
        if cfg.student_config or cfg.student_tokenizer:
            raise ConfigError("give either --student or --student-config with --student-tokenizer, not both")
        model = _load_from("--student", cfg.student, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
        tok = _load_from("--student", cfg.student, AutoTokenizer.from_pretrained)
        return model, tok
    if not (cfg.student_config and cfg.student_tokenizer):
        raise ConfigError("no student: give --student DIR, or --student-config and --student-tokenizer")
    config_path = os.path.expanduser(cfg.student_config)
    if os.path.isfile(config_path):
        def from_file(p: str) -> Any:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict) or "model_type" not in d:
                raise ConfigError(f"--student-config {cfg.student_config}: a student config needs a 'model_type' (e.g. \"llama\")")
            return AutoConfig.for_model(**d)

        config = _load_from("--student-config", cfg.student_config, from_file, "file or folder")
    else:
        config = _load_from("--student-config", cfg.student_config, AutoConfig.from_pretrained, "file or folder")
    if os.path.isfile(os.path.expanduser(cfg.student_tokenizer)):
        tok = _load_from("--student-tokenizer", cfg.student_tokenizer,
                         lambda p: PreTrainedTokenizerFast(tokenizer_file=p), "file or folder")
    else:
        tok = _load_from("--student-tokenizer", cfg.student_tokenizer, AutoTokenizer.from_pretrained, "file or folder")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def logit_width(model: torch.nn.Module) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def check_student(model: torch.nn.Module, tok: Any, tok_hash: str, teacher_manifest: dict[str, Any],
                  map_store: MapStore) -> int:
    """Refuse a student that does not fit the map; return its vocabulary size. The map's provenance (teacher store,
    student tokenizer hash) is checked first: a student with another tokenizer is that, not a size problem."""
    map_store.check_pair(teacher_manifest, tok_hash)
    n_tok = len(tok)
    width = logit_width(model)
    if n_tok > width:
        raise ConfigError(f"the student tokenizer has {n_tok} tokens but the model has only {width} logits")
    vs = int(map_store.vocab.student_vocab_size)
    if vs != n_tok:
        raise ConfigError(
            f"the map store was built for a student vocabulary of {vs} ids, the student tokenizer has {n_tok}; "
            "rebuild the map for this student (`cdm build-map`)"
        )
    return n_tok



def check_dual_store(manifest: dict[str, Any], student_vocab: int, url: str) -> None:
    """The same-tokenizer teacher store must speak the student's tokenizer: refuse another vocabulary before
    training starts (token ids are compared sequence by sequence as batches are built, which would only say so
    at the first batch)."""
    tok = (manifest.get("teacher") or {}).get("tokenizer") or {}
    sizes = {int(v) for v in (manifest.get("vocab_size"), tok.get("size")) if v is not None}
    if sizes and student_vocab not in sizes:
        raise ConfigError(f"--dual-store {url}: precomputed with a tokenizer of {sorted(sizes)} tokens, but the "
                          f"student's has {student_vocab}; the dual store must be precomputed with the student's "
                          "tokenizer (cdm precompute --tokenizer STUDENT_TOKENIZER)")
