"""User-facing errors of `cdm train`: bad student paths and devices, nonsense numbers, --out pointing at an input,
--resume identity checks (store keys, loss weights), no-op resumes, Ctrl-C, and the aligned_share metric."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import cdm.train.trainer as trainer
from cdm.storage import StoreError
from cdm.train import data as D
from cdm.train.command import train_command
from cdm.train.trainer import ConfigError, TrainConfig, checkpoint_dirs, run, student_tokenizer_hash
from tests.test_train_support import bpe, build, quick_cfg, save_student, texts, write_map, write_teacher


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("stores"), n_docs=12)


_cfg = quick_cfg


def _cli(args: list[str]):
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)
    return CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})


def _base_args(p, out) -> list[str]:
    return ["--store", p["store"], "--map", p["map"], "--out", str(out), "--max-steps", "1", "--save-every", "0",
            "--eval-every", "0", "--num-workers", "0", "--no-progress", "--batch-size", "4", "--max-length", "160"]


def _records(out) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


# ------------------------------------------------------------------------------------ student paths, device


def test_missing_student_paths_name_the_flag(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok_file = os.path.join(stores["student"], "tokenizer.json")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}))
    cases = [(["--student", "./nope"], "--student ./nope: no such folder"),
             (["--student-config", "./nope", "--student-tokenizer", tok_file], "--student-config ./nope: no such file or folder"),
             (["--student-config", str(cfg_file), "--student-tokenizer", "./nope"], "--student-tokenizer ./nope: no such file or folder")]
    for i, (extra, msg) in enumerate(cases):
        res = _cli(_base_args(stores, tmp_path / f"o{i}") + extra)
        assert res.exit_code == 2, res.output
        assert f"error: {msg}" in res.output and "Traceback" not in res.output
        assert not (tmp_path / f"o{i}").exists()  # a refused run leaves no empty --out behind
    # a hub-style name that cannot be loaded (offline here) is one error naming the flag, not a traceback
    with pytest.raises(ConfigError, match="--student cdm-test/not-a-model: cannot load it"):
        run(_cfg(stores, tmp_path / "hub", student="cdm-test/not-a-model"))


def test_no_step_count_is_refused_before_out_is_created(stores, tmp_path):
    with pytest.raises(ConfigError, match="give --max-steps or --epochs"):
        run(_cfg(stores, tmp_path / "o", max_steps=None))
    assert not (tmp_path / "o").exists()


def test_a_url_out_is_refused_not_written_locally(stores, tmp_path, monkeypatch):
    """`--out s3://b/run` used to train into a local folder named 's3:' and report the URL."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--out s3://bucket/run: must be a local or mounted folder"):
        run(_cfg(stores, "s3://bucket/run"))
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("spec", ["ce=abc", "ce", "ce=0.5,cdm"])
def test_cli_malformed_weights_is_an_error_line(stores, tmp_path, spec):
    res = _cli(_base_args(stores, tmp_path / "o") + ["--student", stores["student"], "--weights", spec])
    assert res.exit_code == 2, res.output
    assert "error: --weights item" in res.output and "expected part=number" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "cpu:1", "meta"])
def test_unknown_device_is_refused(device):
    with pytest.raises(ConfigError, match=r"--device must be auto, cpu, cuda, cuda:N or mps \(got"):
        TrainConfig(store="s", map="m", out="o", device=device)


def test_device_names_torch_accepts_pass():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        TrainConfig(store="s", map="m", out="o", device=device)


def test_cli_bogus_device_is_an_error_line(stores, tmp_path):
    res = _cli(_base_args(stores, tmp_path / "o") + ["--student", stores["student"], "--device", "bogus"])
    assert res.exit_code == 2 and "error: --device must be auto, cpu, cuda, cuda:N or mps (got 'bogus')" in res.output


def test_cuda_without_cuda_is_refused(stores, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        run(_cfg(stores, tmp_path / "o", device="cuda"))
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("field,value,msg", [
    ("max_steps", -1, "--max-steps must be >= 1 (got -1)"),
    ("max_steps", 0, "--max-steps must be >= 1 (got 0)"),
    ("epochs", 0.0, "--epochs must be > 0 (got 0.0)"),
    ("lr", -1.0, "--lr must be > 0 (got -1.0)"),
    ("lr", float("nan"), "--lr must be > 0"),
    ("temperature", 0.0, "--temperature must be > 0"),
    ("kd_weight", 1.5, "--kd-weight must be in [0, 1]"),
    ("weights", {"ce": -1.0, "cdm": 1.0}, "--weights ce must be a finite number >= 0"),
    ("weights", {"ce": 0.0, "cdm": 0.0}, "--weights must be positive for at least one part"),
    ("min_lr_ratio", 2.0, "--min-lr-ratio must be in [0, 1]"),
    ("warmup_steps", -1, "--warmup-steps must be >= 0"),
    ("weight_decay", -0.1, "--weight-decay must be >= 0"),
    ("grad_clip", -1.0, "--grad-clip must be >= 0"),
    ("grad_accum", 0, "--grad-accum must be >= 1"),
    ("student_topk", -1, "--student-topk must be >= 0"),
    ("theta", -0.1, "--theta must be in [0, 1]"),
    ("seed", -1, "--seed must be >= 0"),
    ("num_workers", -1, "--num-workers must be >= 0"),
    ("save_every", -1, "--save-every must be >= 0"),
    ("keep_checkpoints", -1, "--keep-checkpoints must be >= 0"),
    ("eval_every", -1, "--eval-every must be >= 0"),
    ("eval_sequences", -1, "--eval-sequences must be >= 0"),
    ("log_every", 0, "--log-every must be >= 1"),
    ("dtype", "fp16", "--dtype must be fp32 or bf16"),
])
def test_nonsense_numbers_name_the_flag(field, value, msg):
    with pytest.raises(ConfigError) as e:
        TrainConfig(store="s", map="m", out="o", **{field: value})
    assert msg in str(e.value)


@pytest.mark.parametrize("field,value,msg", [
    ("max_length", 0, "--max-length must be >= 2 (got 0)"),
    ("batch_size", 0, "--batch-size must be >= 1 (got 0)"),
    ("block_size", 0, "--block-size must be >= 1 (got 0)"),
    ("window_blocks", 0, "--window-blocks must be >= 1 (got 0)"),
    ("kd_topk", 0, "--kd-topk must be >= 1 (got 0)"),
    ("max_tokens", -8, "--max-tokens must be >= 1 (got -8)"),
])
def test_loader_numbers_name_the_flag(field, value, msg):
    with pytest.raises(ValueError) as e:
        D.LoaderConfig(**{field: value})
    assert msg in str(e.value)


def test_documented_zeros_still_mean_what_the_help_says():
    TrainConfig(store="s", map="m", out="o", grad_clip=0.0, save_every=0, keep_checkpoints=0, eval_every=0,
                eval_sequences=0, student_topk=0, warmup_steps=0, theta=0.0, kd_weight=0.0)


def test_cli_nonsense_numbers_are_error_lines_and_write_nothing(stores, tmp_path):
    for i, (flag, value, msg) in enumerate([("--max-steps", "-1", "--max-steps must be >= 1 (got -1)"),
                                            ("--epochs", "0", "--epochs must be > 0 (got 0.0)"),
                                            ("--lr", "-1", "--lr must be > 0 (got -1.0)"),
                                            ("--max-length", "0", "--max-length must be >= 2 (got 0)")]):
        out = tmp_path / f"o{i}"
        res = _cli(_base_args(stores, out) + ["--student", stores["student"], flag, value])  # the last value wins
        assert res.exit_code == 2 and f"error: {msg}" in res.output, res.output
        assert not os.path.exists(out)


# ------------------------------------------------------------------------------------ --out


def test_out_that_is_an_input_is_refused(stores, tmp_path):
    p = {k: str(tmp_path / k) for k in ("store", "map", "student")}
    for k in p:
        shutil.copytree(stores[k], p[k])
    for k, what in (("store", "'cdm-teacher-store' store"), ("map", "'cdm-map-store' store"), ("student", "--student folder")):
        before = sorted(os.listdir(p[k]))
        with pytest.raises(ConfigError, match=f"--out {p[k]}: .*{what}"):
            run(_cfg(p, p[k]))
        assert sorted(os.listdir(p[k])) == before


# ------------------------------------------------------------------------------------ student/map mismatch


def test_another_student_tokenizer_is_reported_before_sizes(stores, tmp_path):
    # another tokenizer AND too few logits: the map/tokenizer mismatch is the real cause, so it comes first
    save_student(str(tmp_path / "s"), bpe(310), vocab=200)
    with pytest.raises(StoreError, match="built for student tokenizer"):
        run(_cfg(stores, tmp_path / "o", student=str(tmp_path / "s")))


# ------------------------------------------------------------------------------------ --resume


def test_resume_compares_store_identities_not_path_text(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    p = build(tmp_path / "x", n_docs=12)
    out = tmp_path / "run"
    assert run(_cfg(p, out, max_steps=2)).step == 2
    # the same stores spelled differently: relative, trailing slash
    monkeypatch.chdir(tmp_path)
    same = dict(p, store=os.path.relpath(p["store"]) + "/", map=p["map"] + "/")
    assert run(_cfg(same, out, max_steps=3, resume=True)).step == 3
    # other stores at the same paths (another teacher store key, a map built from it)
    shutil.rmtree(p["store"])
    shutil.rmtree(p["map"])
    write_teacher(p["store"], bpe(420), texts(12, seed=7), key="tkey-other")
    write_map(p["map"], p["store"], bpe(420), bpe(300), student_tokenizer_hash(p["student"]))
    with pytest.raises(ConfigError, match=r"--resume with options .*store: --store .*\(key tkey\) -> .*\(key tkey-other\)"):
        run(_cfg(p, out, max_steps=4, resume=True))


@pytest.mark.parametrize("change,flag", [
    ({"kd_weight": 0.3}, "--kd-weight"),
    ({"temperature": 2.0}, "--temperature"),
    ({"tail_bucket": False}, "--tail-bucket"),
    ({"weights": {"ce": 0.7, "cdm": 0.3}}, "--weights"),
    ({"loss": "ce+mined"}, "loss: 'ce+cdm' -> 'ce+mined'"),
])
def test_resume_refuses_loss_weight_changes(stores, tmp_path, change, flag):
    out = tmp_path / "run"
    run(_cfg(stores, out, max_steps=1))
    with pytest.raises(ConfigError, match="change the data stream or objective") as e:
        run(_cfg(stores, out, max_steps=2, resume=True, **change))
    assert flag in str(e.value)


def test_resume_keeps_the_micro_batches_per_step(stores, tmp_path):
    """--resume may change the world size but not the global batch: world x --grad-accum must stay the same."""
    from cdm.train.checkpoint import check_resumable

    out = tmp_path / "run"
    run(_cfg(stores, out, max_steps=1, grad_accum=2))
    with pytest.raises(ConfigError, match=r"world size x --grad-accum\): 1 x 2 -> 1 x 1; keep the product 2 "
                                          r"\(e.g. --grad-accum 2\)"):
        run(_cfg(stores, out, max_steps=2, grad_accum=1, resume=True))
    assert run(_cfg(stores, out, max_steps=2, grad_accum=2, resume=True)).step == 2
    # 2 ranks x 1 resumed as 1 process x 2 is the same step; as 1 x 1, or 3 ranks, it is not
    cfg = _cfg(stores, out, grad_accum=2)
    saved = {"config": cfg.to_json(), "step_batches": {"world": 2, "grad_accum": 1}}
    check_resumable(saved, cfg, {"step_batches": {"world": 1, "grad_accum": 2}})
    with pytest.raises(ConfigError, match=r"keep the product 2 \(a world size that divides 2\)"):
        check_resumable(saved, cfg, {"step_batches": {"world": 3, "grad_accum": 1}})


def test_a_checkpoint_from_before_the_seed_rule_keeps_its_data_order(stores, tmp_path, capsys):
    """Before, an API run's loader seed stayed 0 whatever `seed` said; resuming such a checkpoint keeps its order."""
    out = tmp_path / "run"
    run(_cfg(stores, out, max_steps=1, seed=3))
    (ckpt,) = checkpoint_dirs(str(out))
    path = os.path.join(ckpt, "trainer_state.pt")
    st = torch.load(path, weights_only=False)
    st.pop("step_batches")  # what a checkpoint of the earlier version lacks
    st["config"]["loader"]["seed"] = 0
    torch.save(st, path)
    res = run(_cfg(stores, out, max_steps=2, seed=3, resume=True))
    assert res.step == 2 and "keeping its loader seed 0" in capsys.readouterr().err
    assert json.load(open(out / "model" / "cdm_train.json"))["config"]["loader"]["seed"] == 0


def test_resume_accepts_the_same_weights_spelled_otherwise(stores, tmp_path):
    out = tmp_path / "run"
    run(_cfg(stores, out, max_steps=1))
    assert run(_cfg(stores, out, max_steps=2, resume=True, weights={"ce": 0.5, "cdm": 0.5})).step == 2


def test_resuming_a_finished_run_is_a_no_op(stores, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = dict(max_steps=3, eval_every=3, eval_sequences=1)
    run(_cfg(stores, out, **cfg))
    before = open(out / "metrics.jsonl").read()
    assert sum(r["kind"] == "eval" and r["step"] == 3 for r in _records(out)) == 1
    capsys.readouterr()
    again = run(_cfg(stores, out, resume=True, **cfg))
    err = capsys.readouterr().err
    assert again.step == 3 and "already at step 3 >= --max-steps 3; nothing to do" in err and "training " not in err
    assert open(out / "metrics.jsonl").read() == before
    lower = run(_cfg(stores, out, resume=True, **{**cfg, "max_steps": 2}))
    err = capsys.readouterr().err
    assert lower.step == 3 and "already at step 3 >= --max-steps 2; nothing to do" in err
    assert "training " not in err and "done:" not in err
    assert open(out / "metrics.jsonl").read() == before
    assert lower.eval is not None and lower.eval["ce"] == pytest.approx(again.eval["ce"])


# ------------------------------------------------------------------------------------ Ctrl-C


def test_keyboard_interrupt_says_where_to_resume(stores, tmp_path, capsys):
    out = tmp_path / "run"

    def ctrl_c(step, model):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_cfg(stores, out, max_steps=5, save_every=2), on_step=ctrl_c)
    err = capsys.readouterr().err
    ckpt = os.path.join(str(out), "checkpoints", "step-00000002")
    assert f"interrupted at step 3; last complete checkpoint: {ckpt}; rerun with --resume" in err
    assert checkpoint_dirs(str(out)) == [ckpt]
    assert run(_cfg(stores, out, max_steps=5, save_every=2, resume=True)).step == 5


def test_cli_ctrl_c_exits_130_with_a_message(stores, tmp_path, monkeypatch):
    real = trainer.run

    def interrupted(cfg):
        def ctrl_c(step, model):
            raise KeyboardInterrupt

        return real(cfg, on_step=ctrl_c)

    monkeypatch.setattr(trainer, "run", interrupted)
    res = _cli(_base_args(stores, tmp_path / "o") + ["--student", stores["student"]])
    assert res.exit_code == 130
    assert "interrupted at step 0; no complete checkpoint yet" in res.output


# ------------------------------------------------------------------------------------ metrics, help


def test_aligned_share_is_a_share_of_labelled_positions(stores, tmp_path):
    res = run(_cfg(stores, tmp_path / "o", max_steps=3))
    recs = [r for r in _records(tmp_path / "o") if r["kind"] == "train"]
    assert recs and res.last["aligned_share"] == recs[-1]["aligned_share"]
    for r in recs:
        assert r["kd_labelled"] <= min(r["kd_rows"], r["labelled"])
        assert r["aligned_share"] == pytest.approx(r["kd_labelled"] / r["labelled"])
        assert 0.0 <= r["aligned_share"] <= 1.0


def test_batch_counts_aligned_rows_without_a_label_apart():
    # 4 tokens, labels at positions 0..2; aligned rows at 1 and 3 (3 = the last row, which predicts nothing)
    ex = D.Example(map_index=0, seq_id="s", input_ids=np.arange(4), labels=np.array([1, 2, 3, -100]), n_bytes=3,
                   kd_pos=np.array([1, 3]), kd_ids=np.zeros((2, 2), np.int32), kd_logprobs=np.zeros((2, 2), np.float32),
                   kd_kind=np.zeros(2, np.int8), kd_next=np.array([3, -1]))
    c = D.collate([ex, ex]).counts
    assert c["kd"] == 4 and c["kd_labelled"] == 2 and c["ce"] == 6


def test_keep_checkpoints_help_says_zero_keeps_all():
    app = typer.Typer()
    app.command()(train_command)
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    text = " ".join(res.output.split())
    assert "0: keep every checkpoint" in text and "cuda:N" in text


def test_a_max_length_that_cuts_every_response_is_an_error(stores, tmp_path):
    """--max-length 2 keeps only prompt positions here: nothing to learn from, said at the first step instead of
    training on zero positions with a NaN evaluation."""
    with pytest.raises(D.DataError, match="hold no labelled position .* --max-length 2"):
        run(_cfg(stores, tmp_path / "o", loader=D.LoaderConfig(batch_size=2, max_length=2)))


def test_a_store_that_cannot_be_opened_is_named_by_its_flag(stores, tmp_path):
    with pytest.raises(StoreError, match=r"^--map: .*none"):
        run(_cfg(stores, tmp_path / "o", map=str(tmp_path / "none")))
    damaged = tmp_path / "map-copy"
    shutil.copytree(stores["map"], damaged)
    zjson = next(p for p in sorted(damaged.rglob("zarr.json")))
    size = zjson.stat().st_size
    zjson.write_bytes(b"\x9c\x00not json")  # another size: the open-time size check names the shard
    with pytest.raises(StoreError, match=r"^--map: .*size changed .*zarr.json.*corrupt"):
        run(_cfg(stores, tmp_path / "o2", map=str(damaged)))
    zjson.write_bytes((b"\x9c" * size)[:size])  # same size, not JSON: a read error naming the flag and cdm verify
    with pytest.raises(StoreError, match=r"cannot open the arrays of shard-00000 .*run cdm verify"):
        run(_cfg(stores, tmp_path / "o2", map=str(damaged)))
    assert not (tmp_path / "o").exists()
