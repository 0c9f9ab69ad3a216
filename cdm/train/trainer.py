"""`cdm train`: a student-only trainer that streams the teacher store and the map store (the teacher is never loaded).

This module is the loop, to be read top to bottom like nanoGPT; its parts live beside it: `config` (TrainConfig),
`objective` (how loss parts combine), `student` (loading and checking the student), `checkpoint` (saving, and what a
`--resume` must share), `distributed` (torchrun). Every loss part is normalised over the whole optimiser step (all micro-batches on all
ranks), so one process with accumulation A·W equals W DDP processes with accumulation A, up to float order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from cdm.progress import library_progress_bars
from cdm.train import data as D
from cdm.train.checkpoint import (
    check_out,
    check_resumable,
    checkpoint_dirs,
    finished_model,
    run_identity,
    save_checkpoint,
    set_rng_state,
)
from cdm.train.config import ConfigError, TrainConfig, TrainingDiverged, TrainResult, config_from_dict
from cdm.train.distributed import Dist, setup_dist
from cdm.train.evaluate import evaluate
from cdm.train.metrics import MetricsLog, plot_metrics
from cdm.train.objective import PART_ROWS, Objective, torch_maps
from cdm.train.student import check_dual_store, check_student, load_student, logit_width, student_tokenizer_hash

#: per-micro-batch counts summed over the step and the ranks (Batch.counts keys, then bytes and sequences)
COUNT_KEYS = ("ce", "kd", "kd_labelled", "dual", "uld", "tokens", "bytes", "seqs")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine down to `min_ratio` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms, biases and 1-d parameters are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(dtype: str, device: torch.device) -> Callable[[], Any]:
    if dtype == "fp32":
        return nullcontext
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"--dtype must be fp32 or bf16; got {dtype!r}")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """`--gradient-checkpointing`: the HF model recomputes its layers' activations in backward (non-reentrant, so
    it works under DDP and with inputs that need no gradient); a model without support is refused by name."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _say(d: Dist, msg: str) -> None:
    if d.main:
        print(f"cdm train: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Where:
    """How far a run got (read by `run` when it is interrupted)."""

    step: int = 0


def run(cfg: TrainConfig, on_step: Callable[[int, torch.nn.Module], None] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train the student on the stores as `cfg` says; returns where the final model is. `on_step(step, model)`
    is called before each optimiser step (tests use it to inject faults); `on_log(record)` with every record
    written to metrics.jsonl (train steps, evaluations, a divergence), on the main process only: hand them to
    wandb, mlflow, a notebook plot.

    On Ctrl-C (KeyboardInterrupt) it says at which step it stopped and which complete checkpoint a `--resume`
    continues from, then re-raises (the CLI exits 130)."""
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = setup_dist(cfg.device)
    where = _Where()
    try:
        with library_progress_bars(cfg.progress):  # --no-progress: no transformers/datasets bars either
            return _run(cfg, d, on_step, where, on_log)
    except KeyboardInterrupt:
        ckpts = checkpoint_dirs(os.path.expanduser(cfg.out))
        if ckpts:
            _say(d, f"interrupted at step {where.step}; last complete checkpoint: {ckpts[-1]}; "
                    "rerun with --resume to continue from it")
        else:
            _say(d, f"interrupted at step {where.step}; no complete checkpoint yet; rerun the command to start again")
        raise
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: Dist, on_step: Callable[[int, torch.nn.Module], None] | None,
         where: _Where | None = None, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    where = where if where is not None else _Where()
    cfg.validate()  # fields may have been assigned after construction
    autocast = _autocast(cfg.dtype, d.device)
    weights = Objective.parse_weights(cfg.loss, cfg.kd_weight, cfg.weights)
    lcfg = replace(cfg.data_config(), dual="kl" in weights, uld="uld" in weights)
    if "kl" in weights and not cfg.dual_store:
        raise ConfigError("--loss uses 'kl' (same-tokenizer teacher) but no --dual-store was given")
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError("give --max-steps or --epochs")
    check_out(cfg)

    # --- stores, student, checks
    stores = D.StoreSet(cfg.store, cfg.map, cfg.dual_store if lcfg.dual else None, cfg.storage_options)
    teacher, map_store, dual = stores.open()
    if len(teacher) == 0 or len(map_store) == 0:
        raise D.DataError(f"nothing to train on: the teacher store has {len(teacher)} sequences, the map store {len(map_store)}")
    ckpts = checkpoint_dirs(cfg.out)
    if ckpts and not cfg.resume:
        raise ConfigError(f"{cfg.out} already holds checkpoints ({os.path.basename(ckpts[-1])}); pass --resume or use another --out")
    resume_from = ckpts[-1] if (cfg.resume and ckpts) else None
    if cfg.resume and not ckpts:
        _say(d, f"--resume: no complete checkpoint in {cfg.out}; starting from step 0")
    st = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", weights_only=False) if resume_from else None
    if st is not None and cfg.loader.seed is None and "step_batches" not in st:
        # a checkpoint from before the loader seed followed `seed`: its data order used the then-default seed
        old_seed = st["config"]["loader"].get("seed")
        if old_seed is not None and old_seed != lcfg.seed:
            _say(d, f"--resume: this checkpoint predates the data order following --seed; keeping its loader seed {old_seed}")
            cfg = replace(cfg, loader=replace(cfg.loader, seed=int(old_seed)))
            lcfg = replace(lcfg, seed=int(old_seed))
    if resume_from:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(os.path.join(resume_from, "model"), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(os.path.join(resume_from, "model"))
        with open(os.path.join(resume_from, "complete.json"), encoding="utf-8") as f:
            tok_hash = json.load(f)["student_tokenizer_hash"]
    else:
        model, tok = load_student(cfg)
        tok_hash = student_tokenizer_hash(os.path.expanduser(str(cfg.student or cfg.student_tokenizer)), tok)
    vocab = check_student(model, tok, tok_hash, teacher.manifest, map_store)
    if dual is not None and lcfg.dual:
        check_dual_store(dual.manifest, vocab, cfg.dual_store or "")
    maps = torch_maps(map_store, d.device) if ("cdm" in weights or "mined" in weights) else None
    theta = float(map_store.vocab.theta) if cfg.theta is None else float(cfg.theta)
    if theta > float(map_store.vocab.theta) + 1e-9:
        raise ConfigError(f"--theta {theta} exceeds the map store's θ {map_store.vocab.theta}: its fuzzy table lacks those pairs")
    objective = Objective(weights, cfg.temperature, cfg.student_topk, theta, cfg.tail_bucket, cfg.reverse, cfg.kl_tail)
    os.makedirs(cfg.out, exist_ok=True)  # only now: a refused run leaves no empty --out behind

    # --- data: held-out split, blocks, stream
    table = D.sequence_table(map_store)
    n_eval = min(cfg.eval_sequences, len(teacher) // 10) if cfg.eval_every > 0 else 0
    held = D.heldout_mask(table.teacher_index, len(teacher), n_eval)
    train_idx = np.flatnonzero(~held)
    blocks = D.make_blocks(train_idx, table.shard, lcfg.block_size)
    plan = D.PlanStream(blocks, table.length, lcfg)
    sources = D.Sources(stores, lcfg, table)
    micro_per_step = cfg.grad_accum * d.world
    max_steps = cfg.max_steps
    if max_steps is None:
        assert cfg.epochs is not None
        max_steps = max(1, int(math.ceil(plan.epoch_size(0) * cfg.epochs / micro_per_step)))
    identity = run_identity(teacher, map_store, dual, objective, n_eval, d.world, cfg.grad_accum)
    model_dir = os.path.join(cfg.out, "model")

    # --- optimiser, schedule, resume state
    model.to(d.device)
    model.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))
    step, position = 0, 0
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), on_log)
    if resume_from:
        assert st is not None
        check_resumable(st, cfg, identity)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, position = int(st["step"]), int(st["position"])
        where.step = step
        rng_file = os.path.join(resume_from, f"rng-rank{d.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        if d.main:
            log.truncate_after(step)
        if step >= max_steps:
            target = f"--max-steps {max_steps}" if cfg.max_steps is not None else f"--epochs {cfg.epochs} ({max_steps} steps)"
            _say(d, f"already at step {step} >= {target}; nothing to do")
            done = finished_model(model_dir, step)
            if done is not None:
                d.barrier()
                return TrainResult(cfg.out, model_dir, step, done.get("last") or {}, done.get("eval"))
        else:
            _say(d, f"resumed from {resume_from} at step {step} (stream position {position})")
    else:
        torch.manual_seed(cfg.seed + d.rank)
        if d.main and os.path.exists(log.path):
            os.remove(log.path)

    ddp = None
    if d.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    fwd = ddp if ddp is not None else model

    stream = D.TrainStream(sources, plan, D.block_index(blocks, len(table.length)), position, d.rank, d.world,
                           pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else 0))
    loader = iter(D.make_loader(stream, cfg.num_workers, pin_memory=d.device.type == "cuda"))
    eval_set = D.eval_batches(sources, np.flatnonzero(held), lcfg) if n_eval else []
    width = logit_width(model)

    # steps already evaluated in metrics.jsonl (a resumed run): read once, so each step's eval is logged once
    logged_evals = {r.get("step") for r in log.read() if r.get("kind") == "eval"} if (d.main and resume_from) else set()

    def run_eval() -> dict[str, Any] | None:
        if not eval_set:
            return None
        res = evaluate(model, eval_set, d.device, autocast, d.rank, d.world, d.all_reduce)
        if d.main and step not in logged_evals:
            log.append({"kind": "eval", "step": step, **res})
            logged_evals.add(step)
        return res

    state = lambda: {"step": step, "position": position, "config": cfg.to_json(), "max_steps": max_steps,  # noqa: E731
                     "student_tokenizer_hash": tok_hash, **identity}
    if step < max_steps:
        _say(d, f"training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
                f"for {max_steps} steps, loss {weights}, {len(train_idx)} train / {int(held.sum())} held-out sequences, "
                f"world {d.world}, device {d.device}")
    last_eval = run_eval() if (not resume_from and eval_set) else None
    bar = None
    if d.main and cfg.progress and step < max_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, desc="cdm train", dynamic_ncols=True)
    last: dict[str, Any] = {}
    last_ckpt = resume_from
    t_last = time.perf_counter()
    first_step = step
    while step < max_steps:
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        for b in micro:
            if b.input_ids.numel() and int(b.input_ids.max()) >= width:
                raise D.DataError(f"student ids up to {int(b.input_ids.max())} in sequences {b.seq_ids[:4]} exceed the model's {width} logits")
        counts = [b.counts for b in micro]
        local = torch.tensor([[*(c[k] for k in COUNT_KEYS[:-2]), b.n_bytes, len(b.seq_ids)] for b, c in zip(micro, counts)],
                             dtype=torch.float64).sum(0)
        totals = dict(zip(COUNT_KEYS, d.all_reduce(local.to(d.device)).tolist()))
        if step == first_step and not any(totals[k] for k in ("ce", "kd", "dual", "uld")):
            raise D.DataError(  # same totals on every rank: all of them stop here
                f"the first step's batches ({int(totals['seqs'])} sequences, {int(totals['tokens'])} tokens) hold no "
                f"labelled position and no aligned teacher row: do the responses start past --max-length "
                f"{lcfg.max_length}? Raise --max-length")
        if on_step is not None:
            on_step(step, model)
        sums: dict[str, torch.Tensor] = {}
        mb_losses = []
        for a, b in enumerate(micro):
            b = b.to(d.device, non_blocking=True)
            sync = ddp.no_sync() if (ddp is not None and a < len(micro) - 1) else nullcontext()
            with sync:
                with autocast():
                    logits = fwd(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                loss, logs = objective.micro_loss(logits, b, totals, maps, vocab, counts[a])
                (loss * d.world).backward()
            mb_losses.append(loss.detach())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + loss.detach().float()
        keys = sorted(sums)
        vec = d.all_reduce(torch.stack([torch.as_tensor(sums[k], device=d.device).float().reshape(()) for k in keys]).double())
        reduced = dict(zip(keys, vec.tolist()))
        if not math.isfinite(reduced["loss"]):
            bad = [(b.position, b.seq_ids) for b, x in zip(micro, mb_losses) if not bool(torch.isfinite(x))]
            culprit = (f"micro-batch at stream position {bad[0][0]} (sequences {bad[0][1]})" if bad
                       else "a micro-batch on another rank")
            _stop(d, log, step, f"loss is {reduced['loss']} at step {step + 1}, {culprit}", last_ckpt)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        if not math.isfinite(gnorm):
            ids = [b.seq_ids for b in micro]
            _stop(d, log, step, f"gradient norm is {gnorm} at step {step + 1} (this rank's sequences {ids})", last_ckpt)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        where.step = step
        position += micro_per_step
        now = time.perf_counter()
        rec = _step_record(step, lr, gnorm, reduced, totals, objective, now - t_last)
        t_last = now
        last = rec
        if d.main and (step % max(1, cfg.log_every) == 0 or step == max_steps):
            log.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < max_steps:
            last_eval = run_eval()
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < max_steps:
            last_ckpt = save_checkpoint(cfg.out, step, model, tok, opt, sched, state(), d, cfg.keep_checkpoints)
            if d.main:
                plot_metrics(log.read(), os.path.join(cfg.out, "metrics.png"))
    if bar is not None:
        bar.close()
    if eval_set:
        last_eval = run_eval()
    if not checkpoint_dirs(cfg.out) or int(os.path.basename(checkpoint_dirs(cfg.out)[-1])[5:]) != step:
        save_checkpoint(cfg.out, step, model, tok, opt, sched, state(), d, cfg.keep_checkpoints)
    if d.main:
        tmp = model_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "cdm_train.json"), "w", encoding="utf-8") as f:
            json.dump({"config": cfg.to_json(), "step": step, "last": last, "eval": last_eval}, f, indent=1)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        plot_metrics(log.read(), os.path.join(cfg.out, "metrics.png"))
        _say(d, f"done: {step} steps; final student in {model_dir}"
                + (f"; held-out CE {last_eval['ce']:.4f}, {last_eval['bpb']:.4f} bits/byte" if last_eval else ""))
    d.barrier()
    return TrainResult(cfg.out, model_dir, step, last, last_eval)




def _step_record(step: int, lr: float, gnorm: float, reduced: dict[str, float], totals: dict[str, float],
                 objective: Objective, dt: float) -> dict[str, Any]:
    """One JSONL training record: each part's step mean, the CDM teacher-mass shares, alignment share, speed.

    ``aligned_share`` = labelled positions with an aligned teacher row / labelled positions (``kd_labelled`` /
    ``labelled``); ``kd_rows`` counts every aligned row, labelled or not."""
    rec: dict[str, Any] = {"kind": "train", "step": step, "lr": lr, "loss": reduced["loss"], "grad_norm": gnorm}
    for part in objective.weights:
        n = totals[PART_ROWS[part]]
        rec[part] = reduced.get(part, 0.0) / n if n else math.nan
        for k, v in reduced.items():
            if k.startswith(part + "_"):
                rec[k] = v / n if n else math.nan
    # share of CE-labelled positions that also have an aligned teacher row, in [0, 1] (kd_rows also counts each
    # sequence's last aligned row, which predicts no labelled token, so kd_rows / labelled can exceed 1)
    rec["aligned_share"] = totals["kd_labelled"] / totals["ce"] if totals["ce"] else math.nan
    rec.update(tokens=int(totals["tokens"]), sequences=int(totals["seqs"]), kd_rows=int(totals["kd"]),
               kd_labelled=int(totals["kd_labelled"]), labelled=int(totals["ce"]), step_time=dt, tokens_per_s=totals["tokens"] / dt if dt > 0 else math.nan)
    return rec


def _stop(d: Dist, log: MetricsLog, step: int, what: str, last_ckpt: str | None) -> None:
    """Stop on a non-finite loss/gradient without stepping; the last good checkpoint stays as it is."""
    keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    msg = f"{what}; stopped before the optimiser step, {keep} (resume with --resume, e.g. with a lower --lr)"
    if d.main:
        log.append({"kind": "diverged", "step": step, "message": msg})
    raise TrainingDiverged(msg)



__all__ = ["ConfigError", "Objective", "TrainConfig", "TrainResult", "TrainingDiverged", "checkpoint_dirs",
           "config_from_dict", "lr_factor", "make_optimizer", "run", "student_tokenizer_hash", "torch_maps"]
