"""DDP: `torchrun --nproc-per-node 2` on CPU (gloo) trains to the same weights as one process with the same
global batch (grad accumulation 2), because every loss part is normalised over the whole step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cdm.train import data as D
from cdm.train.trainer import TrainConfig, run
from tests.test_train_support import build

RUNNER = """
import json, sys
from cdm.train.trainer import config_from_dict, run
run(config_from_dict(json.load(open(sys.argv[1]))))
"""


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not installed")
def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    p = build(tmp_path, n_docs=16, dual=True)
    common = dict(store=p["store"], map=p["map"], student=p["student"], dual_store=p["dual"], loss="ce+kl+cdm",
                  max_steps=3, save_every=2, eval_every=2, eval_sequences=2, warmup_steps=1, lr=5e-3, progress=False, num_workers=0,
                  loader=D.LoaderConfig(batch_size=2, block_size=2, window_blocks=2, max_length=160, seed=4))
    single = run(TrainConfig(out=str(tmp_path / "one"), grad_accum=2, **common))

    cfg = TrainConfig(out=str(tmp_path / "two"), grad_accum=1, **common)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_json()))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 2" in proc.stderr

    a, b = _weights(single.model_dir), _weights(str(tmp_path / "two" / "model"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    rec = lambda out: [json.loads(x) for x in open(out / "metrics.jsonl")]  # noqa: E731
    one, two = rec(tmp_path / "one"), rec(tmp_path / "two")
    assert [r["kind"] for r in one] == [r["kind"] for r in two]
    for r1, r2 in zip(one, two):
        for key in ("loss", "ce", "kl", "cdm", "cdm_mass_exact", "aligned_share", "bpb"):
            if key in r1:
                assert r1[key] == pytest.approx(r2[key], rel=1e-5), key
        if r1["kind"] == "train":
            assert r1["sequences"] == r2["sequences"] and r1["tokens"] == r2["tokens"]
