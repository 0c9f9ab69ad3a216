"""The training loop: objective weights and step normalisation, exact resume (also after a kill), NaN stop,
evaluation (CE, bits per byte), metrics, bf16 autocast, and the final student loading with plain transformers."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from cdm.train import data as D
from cdm.train.evaluate import bits_per_byte, evaluate
from cdm.train.trainer import (
    Objective,
    TrainConfig,
    TrainingDiverged,
    checkpoint_dirs,
    lr_factor,
    run,
    torch_maps,
)
from tests.test_train_support import build, quick_cfg


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("stores"), n_docs=16, dual=True)


def _cfg(p, out, **kw) -> TrainConfig:
    base = dict(store=p["store"], map=p["map"], out=str(out), student=p["student"], loss="ce+cdm", max_steps=6,
                save_every=3, eval_every=3, eval_sequences=2, warmup_steps=2, lr=3e-3, progress=False, num_workers=0,
                loader=D.LoaderConfig(batch_size=3, block_size=3, window_blocks=2, max_length=160, seed=2))
    base.update(kw)
    return TrainConfig(**base)


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_objective_weights():
    assert Objective.parse_weights("ce+cdm", 0.5) == {"ce": 0.5, "cdm": 0.5}
    assert Objective.parse_weights("ce+kl+cdm", 0.4) == pytest.approx({"ce": 0.6, "kl": 0.2, "cdm": 0.2})
    assert Objective.parse_weights("cdm", 0.3) == {"cdm": 1.0}
    assert Objective.parse_weights("ce", 0.3) == {"ce": 1.0}
    assert Objective.parse_weights("ce+cdm", 0.5, {"cdm": 2.0}) == {"ce": 0.0, "cdm": 2.0}
    for bad in ("ce+foo", "ce+ce", ""):
        with pytest.raises(ValueError, match="--loss"):
            Objective.parse_weights(bad, 0.5)
    with pytest.raises(ValueError, match="--weights"):
        Objective.parse_weights("ce", 0.5, {"cdm": 1.0})


def test_lr_schedule_hand_values():
    assert lr_factor(0, 4, 12, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 12, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 12, 0.1) == pytest.approx(1.0)
    assert lr_factor(8, 4, 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(12, 4, 12, 0.1) == pytest.approx(0.1)


def test_splitting_a_step_into_micro_batches_keeps_the_gradient(stores):
    """Each part is normalised over the whole step: 1 micro-batch of 4 == 2 of 2 (different padding too)."""
    from transformers import AutoModelForCausalLM

    cfg = D.LoaderConfig(dual=True, uld=True, max_length=64)
    src = D.Sources(D.StoreSet(stores["store"], stores["map"], stores["dual"]), cfg)
    ex = src.read(np.arange(4))
    whole = [D.collate([ex[i] for i in range(4)])]
    split = [D.collate([ex[0], ex[3]]), D.collate([ex[1], ex[2]])]
    maps = torch_maps(src.map, torch.device("cpu"))
    obj = Objective(Objective.parse_weights("ce+kl+cdm+mined+uld", 0.5), temperature=1.5, theta=0.3, tail_bucket=True,
                    reverse=True)
    grads, losses = [], []
    for batches in (whole, split):
        model = AutoModelForCausalLM.from_pretrained(stores["student"], dtype=torch.float32)
        totals = {k: sum(b.counts[k] for b in batches) for k in ("ce", "kd", "dual", "uld", "tokens")}
        assert totals["kd"] > 0 and totals["dual"] > 0 and totals["uld"] > 0
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            loss, logs = obj.micro_loss(logits, b, totals, maps, 300)
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_resume_after_a_kill_is_exact(stores, tmp_path):
    straight = run(_cfg(stores, tmp_path / "a"))
    assert straight.step == 6

    def kill(step, model):
        if step == 4:  # after the checkpoint at step 3, before step 5
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_cfg(stores, tmp_path / "b"), on_step=kill)
    out_b = tmp_path / "b"
    assert [os.path.basename(c) for c in checkpoint_dirs(str(out_b))] == ["step-00000003"]
    # debris of an interrupted checkpoint write is ignored
    os.makedirs(out_b / "checkpoints" / ".tmp-step-00000005" / "model")
    os.makedirs(out_b / "checkpoints" / "step-00000004" / "model")
    resumed = run(_cfg(stores, out_b, resume=True))
    assert resumed.step == 6
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recs = [json.loads(x) for x in open(out_b / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    ref = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["loss"] for r in recs if r["kind"] == "train"] == [r["loss"] for r in ref if r["kind"] == "train"]
    assert os.path.exists(out_b / "metrics.png")
    # a resumed run refuses options that would change the data stream
    with pytest.raises(ValueError, match="loader.batch_size"):
        run(_cfg(stores, out_b, resume=True, max_steps=8, loader=D.LoaderConfig(batch_size=2, max_length=160, seed=2)))
    with pytest.raises(ValueError, match="--resume"):
        run(_cfg(stores, out_b))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(stores, tmp_path):
    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"at step 4, micro-batch at stream position 3 \(sequences \['s"):
        run(_cfg(stores, tmp_path, save_every=2, grad_accum=1), on_step=poison)
    assert [os.path.basename(c) for c in checkpoint_dirs(str(tmp_path))] == ["step-00000002"]
    w = _weights(os.path.join(checkpoint_dirs(str(tmp_path))[0], "model"))
    assert all(torch.isfinite(v).all() for v in w.values())
    last = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][-1]
    assert last["kind"] == "diverged" and "step-00000002" in last["message"]


def test_eval_bits_per_byte_matches_a_manual_count(stores):
    from transformers import AutoModelForCausalLM

    assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    assert math.isnan(bits_per_byte(1.0, 0))
    cfg = D.LoaderConfig(max_length=64)
    src = D.Sources(D.StoreSet(stores["store"], stores["map"]), cfg)
    batches = D.eval_batches(src, np.array([0, 5, 7]), cfg)
    model = AutoModelForCausalLM.from_pretrained(stores["student"], dtype=torch.float32)
    res = evaluate(model, batches, torch.device("cpu"))
    nll, toks, nbytes = 0.0, 0, 0
    texts = {src.map[i].seq_id: src.teacher[src.map[i].teacher_index].text for i in (0, 5, 7)}
    for b in batches:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=b.input_ids).logits.double(), -1)
        for bi, sid in enumerate(b.seq_ids):
            m = src.map[[i for i in (0, 5, 7) if src.map[i].seq_id == sid][0]]
            run_end = int(m.student_spans[0, 1])
            for j in range(min(len(m.student_ids), 64)):
                if j + 1 >= len(m.student_ids):
                    break
                new_end = max(run_end, int(m.student_spans[j + 1, 1]))
                if m.loss_mask[j + 1]:
                    nll -= float(logp[bi, j, int(m.student_ids[j + 1])])
                    toks += 1
                    nbytes += len(texts[sid][run_end:new_end].encode())
                run_end = new_end
    assert res["tokens"] == toks and res["bytes"] == nbytes
    assert res["ce"] == pytest.approx(nll / toks, rel=1e-5)
    assert res["bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)


def test_dual_bf16_run_reports_every_part_and_loads_with_transformers(stores, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run(_cfg(stores, tmp_path, loss="ce+kl+cdm", dual_store=stores["dual"], dtype="bf16", max_steps=2,
                   save_every=0, eval_every=0, reverse=True, tail_bucket=True))
    for key in ("ce", "kl", "cdm", "cdm_mass_exact", "cdm_mass_dynamic", "cdm_mass_dropped", "aligned_share"):
        assert math.isfinite(res.last[key]), key
    assert 0 < res.last["aligned_share"] <= 1
    shares = res.last["cdm_mass_exact"] + res.last["cdm_mass_dynamic"] + res.last["cdm_mass_dropped"] + res.last["cdm_mass_tail"]
    assert shares == pytest.approx(1.0, abs=1e-4)
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert json.load(open(os.path.join(res.model_dir, "cdm_train.json")))["step"] == 2


def test_training_lowers_heldout_ce(stores, tmp_path):
    res = run(_cfg(stores, tmp_path, max_steps=10, lr=2e-2, save_every=0, eval_every=10, eval_sequences=3, warmup_steps=2))
    evals = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"eval"' in x]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
    assert evals[-1]["ce"] < evals[0]["ce"] - 0.3
    assert evals[-1]["bpb"] < evals[0]["bpb"]
    assert res.eval == {k: evals[-1][k] for k in ("ce", "bpb", "tokens", "bytes")}


def test_a_dual_store_with_another_tokenizer_is_refused_before_training(stores, tmp_path):
    """The cross-tokenizer teacher store given as --dual-store: refused up front (not at the first batch), and
    nothing is trained or written."""
    from cdm.train.trainer import ConfigError

    with pytest.raises(ConfigError, match="--dual-store .* must be precomputed with the student's tokenizer"):
        run(_cfg(stores, tmp_path, loss="ce+kl", dual_store=stores["store"], max_steps=2, save_every=0, eval_every=0))
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_gradient_checkpointing_trains_to_the_same_weights(stores, tmp_path):
    """--gradient-checkpointing recomputes activations in backward: same steps, same weights (up to float order)."""
    from transformers import AutoModelForCausalLM

    def weights(**kw):
        seen = []
        res = run(quick_cfg(stores, tmp_path / ("gc" if kw else "plain"), **kw),
                  on_step=lambda step, model: seen.append(any(getattr(m, "gradient_checkpointing", False)
                                                               for m in model.modules())))
        model = AutoModelForCausalLM.from_pretrained(res.model_dir)
        return {k: v.clone() for k, v in model.state_dict().items()}, res, seen

    plain, _, seen_plain = weights()
    ckpt, res, seen_gc = weights(gradient_checkpointing=True)
    assert seen_plain == [False, False] and seen_gc == [True, True]  # the switch took in the run's model
    assert res.step == 2 and plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_checkpointing_on_a_model_without_support_is_refused():
    from cdm.train.trainer import ConfigError, enable_gradient_checkpointing

    with pytest.raises(ConfigError, match="--gradient-checkpointing: Linear does not support"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_on_log_receives_every_metrics_record(stores, tmp_path):
    """`run(cfg, on_log=...)` sees exactly what metrics.jsonl holds (train steps and evaluations), as dicts."""
    seen: list[dict] = []
    res = run(quick_cfg(stores, tmp_path / "o", max_steps=3, eval_every=2, eval_sequences=2), on_log=seen.append)
    written = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in seen] == [(r["kind"], r["step"]) for r in written]
    assert {r["kind"] for r in seen} == {"train", "eval"} and res.step == 3
    last_train = [r for r in seen if r["kind"] == "train"][-1]
    assert last_train["loss"] == pytest.approx(written[[i for i, r in enumerate(written) if r["kind"] == "train"][-1]]["loss"])
