"""Checkpoints (atomic `checkpoints/step-N` folders) and what a `--resume` must share with the one it continues."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from cdm.mapping.store import MapStore
from cdm.paths import is_url
from cdm.train.config import ConfigError, TrainConfig
from cdm.train.distributed import Dist
from cdm.train.objective import Objective

CKPT_DIR = "checkpoints"
STREAM_FIELDS = ("batch_size", "max_tokens", "max_length", "block_size", "window_blocks", "pad_multiple", "kd_topk", "seed")


def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints under `out`, oldest first (a directory counts once `complete.json` is in it)."""
    root = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.exists(os.path.join(root, n, "complete.json")))
    return [os.path.join(root, n) for n in names]


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: str, step: int, model: torch.nn.Module, tok: Any, opt: torch.optim.Optimizer,
                    sched: Any, state: dict[str, Any], d: Dist, keep: int) -> str:
    """Write `checkpoints/step-N` atomically (temp dir, then rename); keep the newest `keep` complete ones."""
    root = os.path.join(out, CKPT_DIR)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.save_pretrained(os.path.join(tmp, "model"))
        tok.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}, os.path.join(tmp, "trainer_state.pt"))
    d.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    d.barrier()
    if d.main:
        with open(os.path.join(tmp, "complete.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "position": state["position"], "world": d.world,
                       "student_tokenizer_hash": state["student_tokenizer_hash"]}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


#: Objective fields -> the flags that set them (for --resume refusals)
OBJECTIVE_FLAGS = {"weights": "--loss/--kd-weight/--weights (part weights)", "temperature": "--temperature",
                   "student_topk": "--student-topk", "theta": "--theta", "tail_bucket": "--tail-bucket",
                   "reverse": "--reverse", "kl_tail": "--kl-tail"}


def run_identity(teacher: Any, map_store: MapStore, dual: Any, objective: Objective, n_eval: int,
                 world: int = 1, grad_accum: int = 1) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, beyond the loader options: the stores' keys (content
    identities, so a moved or re-spelled path is the same store and another store at the same path is not), the
    resolved objective, the held-out split size, and the micro-batches per optimiser step (world size ×
    --grad-accum: the global batch; the world size itself may change). Saved in every checkpoint's trainer state."""
    return {
        "stores": {"store": str(teacher.key), "map": str(map_store.manifest.get("key")),
                   "dual_store": str(dual.key) if dual is not None else None},
        "objective": {f.name: getattr(objective, f.name) for f in fields(objective)},
        "held_out": int(n_eval),
        "step_batches": {"world": int(world), "grad_accum": int(grad_accum)},
    }


def _same_location(a: str | None, b: str | None) -> bool:
    """Paths compared after normalising (fallback for checkpoints that predate recorded store keys)."""
    if a is None or b is None:
        return a == b
    norm = (lambda u: u.rstrip("/") if is_url(u) else os.path.normpath(os.path.abspath(os.path.expanduser(u))))  # noqa: E731
    return norm(a) == norm(b)


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, now: dict[str, Any] | None = None) -> None:
    """Refuse a resume whose options would change the data stream or the objective, listing every change.

    `saved` is the checkpoint's trainer state (its ``config`` and, when written by this version, the
    `run_identity` fields); `now` is this run's `run_identity`. Checkpoints without identity fields fall back to
    comparing normalised paths and the raw loss options."""
    conf = saved["config"]
    now = now or {}
    loader = cfg.data_config()
    diffs = [f"loader.{k}: {conf['loader'].get(k)!r} -> {getattr(loader, k)!r}"
             for k in STREAM_FIELDS if conf["loader"].get(k) != getattr(loader, k)]
    if conf.get("loss") != cfg.loss:
        diffs.append(f"loss: {conf.get('loss')!r} -> {cfg.loss!r}")
    flag = {"store": "--store", "map": "--map", "dual_store": "--dual-store"}
    if "stores" in saved and "stores" in now:
        for k, name in flag.items():
            was, is_ = saved["stores"].get(k), now["stores"].get(k)
            if was != is_:
                diffs.append(f"{k}: {name} {conf.get(k)!r} (key {was}) -> {getattr(cfg, k)!r} (key {is_})")
    else:
        for k in flag:
            if not _same_location(conf.get(k), getattr(cfg, k)):
                diffs.append(f"{k}: {conf.get(k)!r} -> {getattr(cfg, k)!r} (this checkpoint predates recorded "
                             "store keys: give the paths it was started with, from the folder it was started in)")
    if "objective" in saved and "objective" in now:
        for k, name in OBJECTIVE_FLAGS.items():
            if k == "weights" and conf.get("loss") != cfg.loss:
                continue  # already listed as the --loss change
            was, is_ = saved["objective"].get(k), now["objective"].get(k)
            if was != is_:
                diffs.append(f"{k} ({name}): {was!r} -> {is_!r}")
    else:
        for k in ("kd_weight", "weights", "temperature", "student_topk", "theta", "tail_bucket", "reverse", "kl_tail"):
            if k in conf and conf[k] != getattr(cfg, k):
                diffs.append(f"{k}: {conf[k]!r} -> {getattr(cfg, k)!r}")
    if "held_out" in saved and "held_out" in now:
        if saved["held_out"] != now["held_out"]:
            diffs.append(f"held-out sequences (--eval-sequences, --eval-every): {saved['held_out']} -> {now['held_out']}")
    elif conf.get("eval_sequences") != cfg.eval_sequences:
        diffs.append(f"eval_sequences: {conf.get('eval_sequences')!r} -> {cfg.eval_sequences!r}")
    was, is_ = saved.get("step_batches"), now.get("step_batches")
    if was and is_ and was["world"] * was["grad_accum"] != is_["world"] * is_["grad_accum"]:
        keep = was["world"] * was["grad_accum"]
        hint = (f"e.g. --grad-accum {keep // is_['world']}" if keep % is_["world"] == 0
                else f"a world size that divides {keep}")
        diffs.append(f"micro-batches per step (world size x --grad-accum): {was['world']} x {was['grad_accum']} -> "
                     f"{is_['world']} x {is_['grad_accum']}; keep the product {keep} ({hint})")
    if diffs:
        raise ConfigError("--resume with options that change the data stream or objective: " + "; ".join(diffs))


def check_out(cfg: TrainConfig) -> None:
    """Refuse an --out that is a URL, or an input: a cdm store (its manifest.json names a format), or the folder of
    --student, --student-config, --student-tokenizer, --store, --map or --dual-store. Train writes checkpoints/ and
    model/ there."""
    if is_url(cfg.out):
        raise ConfigError(f"--out {cfg.out}: must be a local or mounted folder (checkpoints and the final model are "
                          "written with torch and transformers); the stores may be URLs, the run folder may not")
    out = os.path.expanduser(cfg.out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError(f"--out {cfg.out}: is a file, not a folder")
    manifest = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                fmt = json.load(f).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if isinstance(fmt, str) and fmt:
            raise ConfigError(f"--out {cfg.out}: holds a {fmt!r} store (manifest.json); train would write its "
                              "checkpoints and model into it; choose another --out")
    for flag, path in (("--student", cfg.student), ("--student-config", cfg.student_config),
                       ("--student-tokenizer", cfg.student_tokenizer), ("--store", cfg.store), ("--map", cfg.map),
                       ("--dual-store", cfg.dual_store)):
        if not path or is_url(path):
            continue
        local = os.path.expanduser(path)
        if os.path.isdir(local) and os.path.samefile(local, out):
            raise ConfigError(f"--out {cfg.out}: is the {flag} folder; train would write its checkpoints and model "
                              "into it; choose another --out")



def finished_model(model_dir: str, step: int) -> dict[str, Any] | None:
    """The final model's `cdm_train.json` when `model_dir` holds the model of exactly `step` steps, else None."""
    try:
        with open(os.path.join(model_dir, "cdm_train.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("step") == step else None
