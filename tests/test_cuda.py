"""CUDA parity checks, skipped on machines without a GPU: precompute's hf backend, the losses, a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.precompute.hf_backend import HFBackend
from tests.test_precompute_support import text_records, tiny_teacher, tokenizer  # noqa: F401 (fixtures; no datasets needed)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_hf_backend_on_cuda_matches_cpu(tiny_teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    seqs = [np.asarray(tokenizer(r["text"])["input_ids"], dtype=np.int32) for r in text_records(8, seed=5)]
    cpu = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    gpu = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval().to("cuda")
    a = HFBackend(cpu, k=16, batch_tokens=600).run(seqs)
    b = HFBackend(gpu, k=16, batch_tokens=600).run(seqs)
    for x, y in zip(a, b):
        y = y.to("cpu")
        assert (x.ids == y.ids).float().mean() > 0.99  # fp32 CPU vs GPU: near-ties may swap
        np.testing.assert_allclose(x.logprobs.numpy(), y.logprobs.numpy(), atol=1e-4)
        np.testing.assert_allclose(x.logsumexp.numpy(), y.logsumexp.numpy(), atol=1e-4)
        np.testing.assert_allclose(x.entropy.numpy(), y.entropy.numpy(), atol=1e-4)


def test_bf16_cuda_top_ids_close_to_fp32(tiny_teacher, tokenizer):
    from transformers import AutoModelForCausalLM

    seqs = [np.asarray(tokenizer(r["text"])["input_ids"], dtype=np.int32) for r in text_records(6, seed=6)]
    f32 = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval().to("cuda")
    b16 = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.bfloat16).eval().to("cuda")
    a = HFBackend(f32, k=8, batch_tokens=600).run(seqs)
    b = HFBackend(b16, k=8, batch_tokens=600).run(seqs)
    top1 = np.concatenate([(x.ids[:, 0] == y.ids[:, 0]).cpu().numpy() for x, y in zip(a, b)])
    assert top1.mean() > 0.9


def test_cdm_loss_on_cuda_matches_cpu():
    from cdm.train.losses import VocabMaps, cdm_loss

    g = torch.Generator().manual_seed(0)
    r, k, vs, vt = 64, 16, 300, 400
    rows = torch.randn(r, vs, generator=g)
    t_ids = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(r)])
    t_lp = torch.log_softmax(torch.randn(r, vt, generator=g), -1).gather(1, t_ids).sort(-1, descending=True)
    t_ids = t_ids.gather(1, t_lp.indices)
    em = torch.where(torch.rand(vt, generator=g) < 0.6, torch.randint(0, vs, (vt,), generator=g), torch.full((vt,), -1))
    keys = torch.unique(torch.randint(0, vt * vs, (2000,), generator=g))
    dist = torch.rand(len(keys), generator=g) * 0.3
    out = []
    for dev in ("cpu", "cuda"):
        maps = VocabMaps(em.to(dev), keys.to(dev), dist.to(dev), vs)
        x = rows.clone().to(dev).requires_grad_(True)
        loss, _ = cdm_loss(x, t_ids.to(dev), t_lp.values.to(dev), maps, temperature=1.0)
        loss.backward()
        out.append((loss.item(), x.grad.cpu()))
    assert abs(out[0][0] - out[1][0]) < 1e-4
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-4)


def test_training_on_cuda_matches_cpu(tmp_path):
    from cdm.train import TrainConfig, run
    from cdm.train import data as D
    from tests.test_train_support import build

    p = build(tmp_path / "stores", n_docs=12)
    res = {}
    for dev in ("cpu", "cuda"):
        cfg = TrainConfig(store=p["store"], map=p["map"], out=str(tmp_path / dev), student=p["student"], loss="ce+cdm",
                          max_steps=3, save_every=0, eval_every=3, eval_sequences=2, warmup_steps=1, lr=3e-3,
                          progress=False, device=dev,
                          loader=D.LoaderConfig(batch_size=3, block_size=3, window_blocks=2, max_length=160, seed=2))
        res[dev] = run(cfg).eval
    assert abs(res["cpu"]["ce"] - res["cuda"]["ce"]) < 1e-3
