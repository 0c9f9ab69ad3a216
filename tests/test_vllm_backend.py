"""The vLLM backend for real (vllm or vllm-cpu; run by scripts/vllm_lane.sh): parity with the hf backend.

Same tiny teacher, same tokens: same top-k ids, log-probs within 1e-4, an entropy that lower-bounds the exact
one, and a store in the identical format.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm")

from cdm.precompute import run  # noqa: E402
from cdm.precompute.hf_backend import HFBackend  # noqa: E402
from cdm.storage import TeacherStore  # noqa: E402
from tests.test_precompute_support import (  # noqa: E402,F401  (fixtures)
    _offline,
    text_records,
    tiny_teacher,
    tokenizer,
    write_jsonl,
)

pytestmark = pytest.mark.vllm
K = 16


@pytest.fixture(scope="module")
def vllm_backend(tiny_teacher, tokenizer):
    from cdm.precompute.vllm_backend import VLLMBackend

    return VLLMBackend(str(tiny_teacher), k=K, vocab_size=len(tokenizer), dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def hf_backend(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return HFBackend(AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32), k=K)


def test_prompt_logprobs_match_hf(vllm_backend, hf_backend, tokenizer):
    seqs = [np.asarray(tokenizer(r["text"])["input_ids"], dtype=np.int32)
            for r in text_records(6, seed=21, max_chars=200)]
    seqs.append(np.asarray(tokenizer("x")["input_ids"], dtype=np.int32))  # BOS + one token
    for s, v, h in zip(seqs, vllm_backend.run(seqs), hf_backend.run(seqs)):
        assert v.ids.shape == h.ids.shape == (len(s), K) and v.ids.dtype == h.ids.dtype == torch.int32
        near_tie = (h.logprobs[:, :-1] - h.logprobs[:, 1:]).abs().min(-1).values < 1e-4
        assert torch.equal(v.ids[~near_tie], h.ids[~near_tie])
        torch.testing.assert_close(v.logprobs, h.logprobs, atol=1e-4, rtol=0)
        assert torch.all(v.logsumexp == 0)
        assert torch.all(v.entropy <= h.entropy + 1e-4)  # a lower bound of the exact entropy


def test_vllm_store_has_the_hf_format(tmp_path, tiny_teacher):
    data = write_jsonl(tmp_path / "d.jsonl", text_records(8, seed=22, max_chars=200) + [{"text": " "}])
    common = dict(top_k=K, text_field="text", max_length=128, progress=False, echo=lambda s: None)
    hf = run(str(tiny_teacher), str(data), str(tmp_path / "hf"), backend="hf", **common)
    vl = run(str(tiny_teacher), str(data), str(tmp_path / "vllm"), backend="vllm", **common)
    assert hf.key != vl.key and vl.stats["skipped"] == {"empty text": 1}
    a, b = TeacherStore(hf.url), TeacherStore(vl.url)
    ma, mb = a.manifest, b.manifest
    for field in ("format", "version", "k", "vocab_size", "codec", "fields", "row_convention", "values"):
        assert ma[field] == mb[field], field
    assert mb["capture"]["backend"] == "vllm" and mb["capture"]["entropy_estimated"] is True
    assert mb["capture"]["logprobs_mode"] == "raw_logprobs" and mb["capture"]["engine"]["vllm"]
    assert len(a) == len(b) == 8
    for x, y in zip(sorted(a, key=lambda s: s.source_index), sorted(b, key=lambda s: s.source_index)):
        assert (x.seq_id, x.text, x.source_index) == (y.seq_id, y.text, y.source_index)
        assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.char_spans, y.char_spans)
        assert np.mean(x.topk_ids == y.topk_ids) > 0.99
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=1e-3, atol=1e-3)  # fp16 storage: 1 ulp
        assert np.all(y.logsumexp == 0) and np.all(y.entropy <= x.entropy + 1e-4)
