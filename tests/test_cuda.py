"""CUDA parity checks, skipped on machines without a GPU: precompute's hf backend, the losses, a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.precompute.hf_backend import HFBackend
from tests.test_precompute_support import text_records, tiny_teacher, tokenizer  # noqa: F401 (fixtures; no datasets needed)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ("cpu", "cuda")  # tests/test_cuda.py can be dry-run on CPU with DEVICES = ("cpu", "cpu")


def _exact_fix(x, rows, k, lse):
    """Tie fix-up for a single chunk `x`: exact ids and log-probs of `rows`."""
    from cdm.precompute import topk as T

    vals, ids = T._exact_topk(x[rows].float(), k)
    return ids, vals - lse[rows, None]


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
                          progress=False, device=dev, num_workers=0,
                          loader=D.LoaderConfig(batch_size=3, block_size=3, window_blocks=2, max_length=160, seed=2))
        res[dev] = run(cfg).eval
    assert abs(res["cpu"]["ce"] - res["cuda"]["ce"]) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_topk_on_cuda_matches_float64(dtype):
    """The fused torch.compile statistics (Triton on CUDA) against a float64 reference, -inf entries included."""
    from cdm.precompute import topk as T

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(700, 5000, generator=g) * 5)
    x[::9, :1000] = -float("inf")
    x = x.to(dtype)
    r = T.topk_stats(x.to("cuda"), 64, impl="compiled", memory_budget=4 * 5000 * 128)
    assert T.compiled_stats.failed is None, T.compiled_stats.failed
    ref = torch.log_softmax(x.double(), -1)
    ids = torch.sort(ref, dim=-1, descending=True, stable=True).indices[:, :64]
    assert torch.equal(r.ids.long().cpu(), ids)
    torch.testing.assert_close(r.logprobs.cpu().double(), ref.gather(-1, ids), atol=1e-4, rtol=1e-5)
    p = ref.exp()
    ent = -torch.where(p > 0, p * ref, torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(r.entropy.cpu().double(), ent, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r.logsumexp.cpu().double(), torch.logsumexp(x.double(), -1), atol=1e-4, rtol=1e-6)


def test_pipelined_cuda_backend_with_process_writer_matches_cpu(tmp_path, tiny_teacher, tokenizer):
    """What `cdm precompute` runs on a GPU by default: batches queued ahead with pinned async copies, compiled
    statistics, the store written by a child process; the store equals a CPU run's within fp32 noise."""
    from transformers import AutoModelForCausalLM

    from cdm.precompute.encode import Encoded
    from cdm.precompute.hf_backend import pipelined
    from cdm.precompute.sink import ProcessSink, ThreadSink
    from cdm.storage import TeacherStore, TeacherStoreWriter
    from tests.test_precompute_workers import assert_same_store

    seqs = [np.asarray(tokenizer(r["text"])["input_ids"], dtype=np.int32) for r in text_records(24, seed=7)]
    items = [Encoded(text="x" * len(s), response_spans=np.array([[0, len(s)]], np.int32), token_ids=s,
                     char_spans=np.stack([np.arange(len(s)), np.arange(len(s)) + 1], 1).astype(np.int32),
                     truncated=False) for s in seqs]
    urls = []
    for n, dev in enumerate(DEVICES):  # reference on the CPU with the thread writer; then the GPU path
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval().to(dev)
        backend = HFBackend(model, k=16, batch_tokens=500)
        kwargs = dict(url=str(tmp_path / f"{n}-{dev}"), key="k", manifest={}, k=16, vocab_size=backend.vocab_size,
                      commit_tokens=300)
        sink = ThreadSink(TeacherStoreWriter(**kwargs), "fp") if n == 0 else ProcessSink(kwargs, "fp")
        plan = backend.batches([len(s) for s in seqs])
        for b, results in pipelined(backend, ((b, [seqs[i] for i in b]) for b in plan)):
            assert all(r.ids.device.type == "cpu" for r in results)
            sink.put(("add", [(i, items[i]) for i in b], results))
        sink.close()
        urls.append(kwargs["url"])
    assert len(TeacherStore(urls[1])) == 24
    try:
        assert_same_store(urls[0], urls[1])
    except AssertionError:  # fp32 CPU vs GPU near-ties may swap an id: compare with a tolerance instead
        a, b = TeacherStore(urls[0]), TeacherStore(urls[1])
        assert np.mean([np.mean(a[i].topk_ids == b[i].topk_ids) for i in range(len(a))]) > 0.99


@pytest.mark.parametrize("select", ["direct", "blockmax16", "blockmax32", "blockmax64", "radix", "blockmax_fused",
                                    "blockmax_fused16", "blockmax_fused4"])
def test_topk_selectors_on_cuda_match_float64(select):
    """Every exact selection the autotuner may pick, on CUDA bf16 logits with heavy ties and continuous values
    (the Triton ones compiled for this GPU; tests/test_triton_topk.py checks them in Triton's interpreter)."""
    from cdm.precompute import topk as T

    g = torch.Generator().manual_seed(2)
    cont = torch.randn(300, 49152, generator=g) * 4
    tied = torch.randint(0, 6, (300, 49152), generator=g).float()
    for x in (cont, tied):
        xb = x.to(torch.bfloat16)
        xc = xb.to("cuda")
        res, overflow = T._topk_chunk(xc, 128, "compiled", select)
        r = T.PendingTopK(res, overflow, 128, lambda rows: _exact_fix(xc, rows, 128, res.logsumexp)).resolve()
        ref = torch.log_softmax(xb.double(), -1)
        ids = torch.sort(ref, dim=-1, descending=True, stable=True).indices[:, :128]
        assert torch.equal(r.ids.long().cpu(), ids)
        # the statistics: from the compiled pass, or from the fused kernels' own first pass
        torch.testing.assert_close(r.logsumexp.cpu().double(), torch.logsumexp(xb.double(), -1), atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(r.entropy.cpu().double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=1e-5)
    chosen = T.choose_selector(cont.to(torch.bfloat16).to("cuda"), 192, k=128)
    assert chosen in T.ALL_SELECTORS


@pytest.mark.parametrize("select", ["radix", "blockmax_fused", "blockmax_fused16", "blockmax_fused4"])
@pytest.mark.parametrize("dtype,vocab,k", [(torch.float16, 50257, 64), (torch.float32, 151936, 256),
                                           (torch.bfloat16, 128256, 128)])
def test_triton_selections_on_cuda_other_shapes(select, dtype, vocab, k):
    """The Triton selections beyond the bf16/49,152 case above: fp16 and fp32, a vocabulary that is not a multiple of
    32 and one past 131,072 (blocks of 64), strided rows, eager statistics (which use each row's first value as its
    maximum, overflowing rows included), continuous values and moderately tied ones; ids equal a float64 sort."""
    from cdm.precompute import topk as T

    g = torch.Generator().manual_seed(9)
    cont = torch.randn(130, vocab + 7, generator=g) * 4
    tied = torch.randint(-400, 400, (130, vocab + 7), generator=g).float() / 16
    for base in (cont, tied):
        base[0] = 0.5  # a constant row: every entry ties, the fused kernel's buffer overflows, the fix-up runs
        x = base.to(dtype).to("cuda")[:, :vocab]  # a strided view: row stride vocab + 7
        assert T.verify_exact_selector(x, select, k) is None
        res, overflow = T._topk_chunk(x, k, "eager", select)
        r = T.PendingTopK(res, overflow, k, lambda rows: _exact_fix(x, rows, k, res.logsumexp)).resolve()
        ref = torch.log_softmax(x.double(), -1)
        ids = torch.sort(ref, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(r.ids.long(), ids)
        torch.testing.assert_close(r.logsumexp.double(), torch.logsumexp(x.double(), -1), atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(r.entropy.double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_selections_launch_on_the_logits_gpu():
    """Under torchrun a rank's logits are on cuda:RANK while the current device may still be cuda:0."""
    from cdm.precompute import triton_topk as TT
    from cdm.precompute import topk as T

    x = (torch.randn(64, 49152, generator=torch.Generator().manual_seed(10)) * 4).to(torch.bfloat16)
    _, ref = T._exact_topk(x.float(), 128)
    with torch.cuda.device(0):
        x1 = x.to("cuda:1")
        _, ids, overflow = TT.select_blockmax_fused(x1, 128)
        _, rids, _ = TT.select_radix(x1, 128)
        torch.cuda.synchronize(1)
    assert ids.device == x1.device and not bool(overflow.any())
    assert torch.equal(ids.cpu(), ref) and torch.equal(rids.sort(-1).values.cpu(), ref.sort(-1).values)
