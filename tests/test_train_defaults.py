"""Defaults of `cdm train` that results depend on: the CDM tail bucket is on by default (benchmarks/RESULTS.md,
"Quality": with it CE+CDM beats CE and MinED on 3 paired seeds, without it it loses to CE), from the CLI through
TrainConfig and the Objective into the CDM loss, and it changes no other loss part."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cdm.train import data as D
from cdm.train.losses import cdm_loss
from cdm.train.trainer import Objective, TrainConfig, run, torch_maps
from tests.test_train_support import build


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("stores"), n_docs=12, dual=True)


def test_tail_bucket_is_on_by_default_and_kl_tail_unchanged():
    cfg = TrainConfig(store="s", map="m", out="o")
    assert cfg.tail_bucket is True and cfg.kl_tail is True
    obj = Objective({"cdm": 1.0})
    assert obj.tail_bucket is True and obj.kl_tail is True


def _cli_config(monkeypatch, tmp_path, *extra: str) -> TrainConfig:
    import typer
    from typer.testing import CliRunner

    import cdm.train.trainer as trainer
    from cdm.train.command import train_command

    seen: list[TrainConfig] = []
    monkeypatch.setattr(trainer, "run", lambda cfg: seen.append(cfg))
    app = typer.Typer()
    app.command()(train_command)
    res = CliRunner().invoke(app, ["--store", str(tmp_path / "t"), "--map", str(tmp_path / "m"),
                                   "--out", str(tmp_path / "o"), *extra])
    assert res.exit_code == 0, res.output
    assert len(seen) == 1
    return seen[0]


def test_the_python_api_has_the_cli_defaults(monkeypatch, tmp_path):
    """`cdm.train.run(TrainConfig(...))` with only the required fields is the same run as `cdm train` with only the
    required flags: every TrainConfig field and every loader field (the data-order seed included) agrees."""
    cli = _cli_config(monkeypatch, tmp_path)
    api = TrainConfig(store=str(tmp_path / "t"), map=str(tmp_path / "m"), out=str(tmp_path / "o"))
    assert api.to_json() == cli.to_json()
    seeded = _cli_config(monkeypatch, tmp_path, "--seed", "7")
    api7 = TrainConfig(store=str(tmp_path / "t"), map=str(tmp_path / "m"), out=str(tmp_path / "o"), seed=7)
    assert api7.data_config().seed == seeded.data_config().seed == 7 and api7.to_json() == seeded.to_json()
    assert replace(api7, seed=5).data_config().seed == 5  # a seed sweep built with replace moves the data order
    # an explicit loader seed is kept; paths may be pathlib.Path (stored as str: the config is written to JSON)
    own = TrainConfig(store=tmp_path / "t", map=tmp_path / "m", out=tmp_path / "o", seed=7,
                      loader=D.LoaderConfig(seed=3))
    assert own.data_config().seed == 3 and own.out == str(tmp_path / "o") and json.dumps(own.to_json())
    # whole numbers of another type are taken as ints (the config is written as JSON)
    typed = TrainConfig(store="s", map="m", out="o", max_steps=1000.0, warmup_steps=np.int64(10), seed=np.int32(1),
                        lr=np.float32(0.5))
    assert (typed.max_steps, typed.warmup_steps, typed.seed) == (1000, 10, 1) and type(typed.max_steps) is int
    assert type(typed.lr) is float and json.dumps(typed.to_json())


@pytest.mark.parametrize("field,value,msg", [
    ("max_steps", "3", "--max-steps must be an integer (got '3')"),
    ("lr", "1e-3", "--lr must be a number (got '1e-3')"),
    ("num_workers", 1.5, "--num-workers must be an integer"),
    ("max_steps", True, "--max-steps must be an integer"),
    ("out", 3, "out must be a path (str or os.PathLike), got int 3"),
    ("loader", {"batch_size": 2}, "loader must be a cdm.train.LoaderConfig, got dict"),
])
def test_wrong_types_are_config_errors(field, value, msg):
    from cdm.train.config import ConfigError

    kw = {"store": "s", "map": "m", "out": "o", field: value}
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert msg in str(e.value)


def test_cli_default_passes_the_tail_bucket(monkeypatch, tmp_path):
    default = _cli_config(monkeypatch, tmp_path)
    assert default.tail_bucket is True and default.kl_tail is True and default.loss == "ce+cdm"
    off = _cli_config(monkeypatch, tmp_path, "--no-tail-bucket")
    assert off.tail_bucket is False and off.kl_tail is True


def test_cli_help_says_it_is_the_default():
    import typer
    from typer.testing import CliRunner

    from cdm.train.command import train_command

    app = typer.Typer()
    app.command()(train_command)
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "--tail-bucket" in text and "default on" in text


def test_default_objective_changes_only_the_cdm_part(stores):
    """Every part of one batch with the default Objective vs tail_bucket=False: only `cdm` differs, and it equals
    the CDM loss computed with tail_bucket=True explicitly."""
    from transformers import AutoModelForCausalLM

    src = D.Sources(D.StoreSet(stores["store"], stores["map"], stores["dual"]),
                    D.LoaderConfig(dual=True, uld=True, max_length=64))
    ex = src.read(np.arange(4))
    b = D.collate([ex[i] for i in range(4)])
    maps = torch_maps(src.map, torch.device("cpu"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stores["student"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    totals = {k: float(v) for k, v in b.counts.items()}
    assert totals["kd"] > 0 and totals["dual"] > 0 and totals["uld"] > 0
    weights = Objective.parse_weights("ce+kl+cdm+mined+uld", 0.5)
    _, default = Objective(weights, theta=0.3).micro_loss(logits, b, totals, maps, 300)
    _, off = Objective(weights, theta=0.3, tail_bucket=False).micro_loss(logits, b, totals, maps, 300)
    for part in ("ce", "kl", "mined", "uld"):
        assert float(default[part]) == float(off[part]), part
    flat = logits.reshape(-1, logits.shape[-1])
    args = (flat[b.kd_pos], b.kd_ids, b.kd_logprobs, maps)
    with_tail = cdm_loss(*args, theta=0.3, tail_bucket=True)[0]
    without = cdm_loss(*args, theta=0.3, tail_bucket=False)[0]
    assert float(with_tail) != pytest.approx(float(without), rel=1e-3)
    n = b.counts["kd"]
    assert float(default["cdm"]) / n == pytest.approx(float(with_tail), rel=1e-6)
    assert float(off["cdm"]) / n == pytest.approx(float(without), rel=1e-6)


def _first_step(p, out, **kw) -> dict:
    cfg = TrainConfig(store=p["store"], map=p["map"], out=str(out), student=p["student"], max_steps=1,
                      save_every=0, eval_every=0, warmup_steps=1, progress=False, num_workers=0,
                      loader=D.LoaderConfig(batch_size=3, block_size=3, window_blocks=2, max_length=96, seed=1), **kw)
    run(cfg)
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return next(r for r in recs if r["kind"] == "train" and r["step"] == 1)


def test_default_training_run_uses_the_tail_bucket(stores, tmp_path):
    """The real `run` path: the first step's CDM loss of a default config equals tail_bucket=True, not False."""
    default = _first_step(stores, tmp_path / "default")
    on = _first_step(stores, tmp_path / "on", tail_bucket=True)
    off = _first_step(stores, tmp_path / "off", tail_bucket=False)
    assert default["cdm"] == on["cdm"] and default["ce"] == on["ce"]
    assert default["cdm"] != pytest.approx(off["cdm"], rel=1e-3)
    assert default["ce"] == off["ce"]  # same initialisation and batch: only the CDM term differs
