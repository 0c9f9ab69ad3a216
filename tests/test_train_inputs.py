"""Bad inputs are refused with actionable messages; the CLI fills the same config; students from scratch."""

from __future__ import annotations

import json
import os

import pytest
import typer
from typer.testing import CliRunner

from cdm.storage import StoreError
from cdm.train import data as D
from cdm.train.command import parse_weights, train_command
from cdm.train.trainer import ConfigError, TrainConfig, run
from tests.test_train_support import bpe, build, quick_cfg, save_student, texts, write_teacher


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build(tmp_path_factory.mktemp("stores"), n_docs=12, dual=True)


_cfg = quick_cfg


def test_map_of_another_teacher_store_is_refused(stores, tmp_path):
    other = str(tmp_path / "other")
    write_teacher(other, bpe(420), texts(12), key="another-key")
    with pytest.raises(StoreError, match="built from teacher store tkey, not another-key"):
        run(_cfg(stores, tmp_path / "o", store=other))


def test_student_with_another_tokenizer_is_refused(stores, tmp_path):
    save_student(str(tmp_path / "s"), bpe(310))
    with pytest.raises(StoreError, match="student tokenizer"):
        run(_cfg(stores, tmp_path / "o", student=str(tmp_path / "s")))


def test_student_vocab_smaller_than_the_map_is_refused(stores, tmp_path):
    # same tokenizer (same hash), but the model has fewer logits than the tokenizer has ids
    save_student(str(tmp_path / "s"), bpe(300), vocab=200)
    with pytest.raises(ConfigError, match="300 tokens but the model has only 200 logits"):
        run(_cfg(stores, tmp_path / "o", student=str(tmp_path / "s")))


def test_empty_store_is_refused(tmp_path):
    from cdm.mapping.store import MapStoreWriter
    from cdm.storage import TeacherStoreWriter

    TeacherStoreWriter(str(tmp_path / "t"), key="tkey", manifest={}, k=4, vocab_size=420).close()
    w = MapStoreWriter(str(tmp_path / "m"), key="m", manifest={"teacher_store": {"key": "tkey"}})
    w.close()
    with pytest.raises(D.DataError, match="nothing to train on: the teacher store has 0 sequences"):
        run(TrainConfig(store=str(tmp_path / "t"), map=str(tmp_path / "m"), out=str(tmp_path / "o"),
                        student=str(tmp_path / "none"), max_steps=1, progress=False))


def test_option_conflicts_are_refused(stores, tmp_path):
    with pytest.raises(ConfigError, match="no --dual-store"):
        run(_cfg(stores, tmp_path / "a", loss="ce+kl"))
    with pytest.raises(ConfigError, match="exceeds the map store"):
        run(_cfg(stores, tmp_path / "b", theta=0.5))
    with pytest.raises(ConfigError, match="--max-steps or --epochs"):
        run(_cfg(stores, tmp_path / "c", max_steps=None))
    with pytest.raises(ConfigError, match="no student"):
        run(_cfg(stores, tmp_path / "d", student=None))
    with pytest.raises(ValueError, match="max_tokens"):
        D.LoaderConfig(max_length=512, max_tokens=256)


def test_student_from_scratch_config_and_tokenizer_file(stores, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}))
    res = run(_cfg(stores, tmp_path / "o", student=None, student_config=str(cfg_file),
                   student_tokenizer=os.path.join(stores["student"], "tokenizer.json"), epochs=1.0, max_steps=None))
    assert res.step == 3  # 12 sequences, eval off, batches of 4, one epoch
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert model.config.hidden_size == 64 and os.path.exists(os.path.join(res.model_dir, "tokenizer.json"))


def test_cli_fills_the_config_and_reports_errors(stores, tmp_path):
    assert parse_weights("ce=0.5, cdm=0.25") == {"ce": 0.5, "cdm": 0.25}
    with pytest.raises(ValueError, match="--weights item .ce.: expected part=number"):
        parse_weights("ce")
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--store", stores["store"], "--map", stores["map"], "--student", stores["student"], "--out", str(out),
            "--loss", "ce+kl+cdm", "--dual-store", stores["dual"], "--weights", "ce=0.6,kl=0.2,cdm=0.2",
            "--max-steps", "2", "--save-every", "0", "--eval-every", "0", "--num-workers", "0", "--no-progress",
            "--batch-size", "4", "--max-length", "160", "--reverse", "--temperature", "2.0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.load(open(out / "model" / "cdm_train.json"))["config"]
    assert saved["weights"] == {"ce": 0.6, "kl": 0.2, "cdm": 0.2} and saved["reverse"] and saved["temperature"] == 2.0
    assert saved["loader"]["batch_size"] == 4 and saved["loader"]["max_length"] == 160
    res = runner.invoke(app, ["train", "--store", stores["store"], "--map", stores["map"], "--student", stores["student"],
                              "--out", str(tmp_path / "bad"), "--loss", "ce+nope", "--max-steps", "1"])
    assert res.exit_code == 2 and "--loss 'ce+nope'" in res.output
