"""`cdm train`: a student-only trainer that streams the teacher store and the map store (the teacher is never loaded).

Read top to bottom like nanoGPT: configuration, objective (how loss parts combine), student loading, checkpoints,
then `run`, the loop. Every loss part is normalised over the whole optimiser step (all micro-batches on all
ranks), so one process with accumulation A·W equals W DDP processes with accumulation A, up to float order.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from cdm.mapping.store import KIND_1_1, MapStore
from cdm.train import data as D
from cdm.train.evaluate import evaluate
from cdm.train.losses import IGNORE_INDEX, VocabMaps, cdm_loss, ce_loss, kl_topk_loss, mined_loss, uld_loss
from cdm.train.metrics import MetricsLog, plot_metrics

PARTS = ("ce", "kl", "cdm", "mined", "uld")
KD_PARTS = ("kl", "cdm", "mined", "uld")
#: the rows each part is averaged over (Batch.counts keys)
PART_ROWS = {"ce": "ce", "kl": "dual", "cdm": "kd", "mined": "ce", "uld": "uld"}
COUNT_KEYS = ("ce", "kd", "dual", "uld", "tokens", "bytes", "seqs")
CDM_STATS = ("mass_exact", "mass_dynamic", "mass_dropped", "mass_tail", "columns", "reverse_columns", "reverse_em_outside")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the optimiser step was not taken."""


class ConfigError(ValueError):
    """The run's options or inputs cannot work together."""


# ============================================================================================ configuration


@dataclass
class TrainConfig:
    """Everything one `cdm train` run needs; the CLI and `cdm.train.run` fill the same object."""

    store: str
    map: str
    out: str
    student: str | None = None  # HF causal LM folder
    student_config: str | None = None  # or: a config (folder or config.json) to initialise from scratch ...
    student_tokenizer: str | None = None  # ... with this tokenizer (folder or tokenizer.json)
    dual_store: str | None = None  # same-tokenizer teacher store (dual setting, the `kl` part)
    loss: str = "ce+cdm"
    kd_weight: float = 0.5
    weights: dict[str, float] | None = None
    temperature: float = 1.0
    student_topk: int | None = None  # live student top-k of the dynamic map (None: the teacher's K)
    theta: float | None = None  # fuzzy threshold (None: the map store's θ)
    tail_bucket: bool = True  # CDM only: unmapped teacher mass as one bucket (benchmarks/RESULTS.md, "Quality")
    reverse: bool = False
    kl_tail: bool = True
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    grad_accum: int = 1
    dtype: str = "fp32"
    device: str = "auto"
    seed: int = 0
    loader: D.LoaderConfig = field(default_factory=D.LoaderConfig)
    num_workers: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 500
    eval_sequences: int = 64
    log_every: int = 1
    resume: bool = False
    progress: bool = True
    storage_options: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "loader"}
        d["loader"] = self.loader.to_json()
        return d


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: str
    model_dir: str
    step: int
    last: dict[str, Any]
    eval: dict[str, Any] | None


# ============================================================================================ objective


@dataclass(frozen=True)
class Objective:
    """The weighted loss parts of one run (`--loss ce+cdm --kd-weight 0.5`) and their options."""

    weights: dict[str, float]
    temperature: float = 1.0
    student_topk: int | None = None
    theta: float = 0.3
    tail_bucket: bool = True  # same default as TrainConfig
    reverse: bool = False
    kl_tail: bool = True

    @staticmethod
    def parse_weights(spec: str, kd_weight: float, weights: dict[str, float] | None = None) -> dict[str, float]:
        """`ce+cdm` -> {ce: 1-λ, cdm: λ}; several KD parts share λ equally; no `ce` -> the KD parts share 1."""
        parts = [p.strip().lower() for p in spec.split("+") if p.strip()]
        bad = [p for p in parts if p not in PARTS]
        if not parts or bad or len(set(parts)) != len(parts):
            raise ConfigError(f"--loss {spec!r}: use distinct parts from {'/'.join(PARTS)} joined by '+', e.g. ce+cdm")
        if not 0.0 <= kd_weight <= 1.0:
            raise ConfigError(f"--kd-weight must be in [0, 1]; got {kd_weight}")
        kd = [p for p in parts if p in KD_PARTS]
        if weights:
            unknown = sorted(set(weights) - set(parts))
            if unknown:
                raise ConfigError(f"--weights names {unknown}, which are not in --loss {spec!r}")
            return {p: float(weights.get(p, 0.0)) for p in parts}
        out = {}
        if "ce" in parts:
            out["ce"] = 1.0 - kd_weight if kd else 1.0
        for p in kd:
            out[p] = (kd_weight if "ce" in parts else 1.0) / len(kd)
        return out

    def uses(self, part: str) -> bool:
        return part in self.weights

    def micro_loss(
        self,
        logits: torch.Tensor,
        b: D.Batch,
        totals: dict[str, float],
        maps: VocabMaps | None,
        vocab: int,
        counts: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss of one micro-batch, each part scaled by (its rows here / its rows in the whole step).

        Returns the loss and detached sums for logging: ``part`` = part mean × rows here (so the step's sum over
        micro-batches and ranks divided by the step's rows is the step's mean), likewise for the CDM stats.
        `counts` = ``b.counts`` computed before the batch moved to the device (saves a device sync).
        """
        flat = logits.reshape(-1, logits.shape[-1])
        mine = b.counts if counts is None else counts
        loss = (logits.sum() * 0.0).float()  # in the graph even when no part has rows here (DDP needs a backward)
        logs: dict[str, torch.Tensor] = {}
        for part, w in self.weights.items():
            n_here, n_all = mine[PART_ROWS[part]], totals[PART_ROWS[part]]
            if n_all <= 0:
                continue
            stats: dict[str, torch.Tensor] = {}
            if part == "ce":
                value = ce_loss(logits, b.labels)
            elif part == "cdm":
                assert maps is not None
                value, stats = cdm_loss(flat[b.kd_pos], b.kd_ids, b.kd_logprobs, maps, self.temperature,
                                        self.student_topk, self.theta, self.tail_bucket, self.reverse)
            elif part == "kl":
                value, stats = kl_topk_loss(flat[b.dual_pos], b.dual_ids, b.dual_logprobs, self.temperature,
                                            self.kl_tail, vocab_size=vocab)
            elif part == "mined":
                assert maps is not None and maps.mined_t2s is not None
                value, stats = self._mined(flat, b, maps, vocab)
            else:  # uld
                value, stats = uld_loss(flat[b.uld_pos], b.uld_logprobs, vocab_size=vocab)
            scale = n_here / n_all
            loss = loss + (w * scale) * value
            logs[part] = value.detach().float() * n_here
            for k, v in stats.items():
                logs[f"{part}_{k}"] = v.detach().float() * n_here
        return loss, logs

    def _mined(self, flat: torch.Tensor, b: D.Batch, maps: VocabMaps, vocab: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MinED over every labelled position: the aligned teacher row when the pair is 1↔1 and the teacher's
        next token maps (MinED map) to the student's label, else a one-hot on the label (DSKD's rule)."""
        labels = b.labels.reshape(-1)
        lab_pos = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
        row_of = torch.full((flat.shape[0],), -1, dtype=torch.int64, device=flat.device)
        row_of[b.kd_pos] = torch.arange(b.kd_pos.numel(), device=flat.device)
        r = row_of[lab_pos]
        has = r >= 0
        rc = r.clamp_min(0)
        k = b.kd_ids.shape[1]
        if b.kd_ids.numel():
            t_ids = torch.where(has[:, None], b.kd_ids[rc], -1)
            t_lp = torch.where(has[:, None], b.kd_logprobs[rc], 0.0)
            nxt = b.kd_next[rc]
            mined_t2s = maps.mined_t2s
            assert mined_t2s is not None
            proj = torch.where(nxt >= 0, mined_t2s[nxt.clamp(0, mined_t2s.numel() - 1)], -1)
            agree = has & (b.kd_kind[rc] == KIND_1_1) & (proj == labels[lab_pos])
        else:
            t_ids = torch.full((lab_pos.numel(), max(k, 1)), -1, dtype=torch.int64, device=flat.device)
            t_lp = torch.zeros(t_ids.shape, device=flat.device)
            agree = torch.zeros_like(has)
        assert maps.mined_t2s is not None
        return mined_loss(flat[lab_pos], t_ids, t_lp, maps.mined_t2s, vocab, self.temperature,
                          labels=labels[lab_pos], onehot_rows=~agree)


def torch_maps(map_store: MapStore, device: torch.device) -> VocabMaps:
    """The map store's vocabulary maps as the loss's device tensors (pair keys for searchsorted lookups)."""
    v = map_store.vocab
    keys, dist_ = v.fuzzy_t2s.pair_keys(v.student_vocab_size)
    maps = VocabMaps(
        em_t2s=torch.from_numpy(np.asarray(v.em_t2s, dtype=np.int64)),
        fuzzy_keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        fuzzy_dist=torch.from_numpy(np.asarray(dist_, dtype=np.float32)),
        student_vocab_size=int(v.student_vocab_size),
        mined_t2s=torch.from_numpy(np.asarray(v.mined_t2s, dtype=np.int64)),
    )
    maps.check()
    return maps.to(device)


# ============================================================================================ student


def student_tokenizer_hash(path: str, tokenizer: Any = None) -> str:
    """The key the map store records for its student tokenizer: sha256 of the tokenizer's JSON, exactly as
    `cdm build-map` computes it (`cdm.mapping.tokenizers.tokenizer_hash`)."""
    from cdm.mapping.tokenizers import load_tokenizer, tokenizer_hash

    return str(tokenizer_hash(load_tokenizer(path)))


def load_student(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """The student model (fp32 weights) and its tokenizer: an HF folder, or a config + tokenizer from scratch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if cfg.student:
        if cfg.student_config or cfg.student_tokenizer:
            raise ConfigError("give either --student or --student-config with --student-tokenizer, not both")
        model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cfg.student)
        return model, tok
    if not (cfg.student_config and cfg.student_tokenizer):
        raise ConfigError("no student: give --student DIR, or --student-config and --student-tokenizer")
    if os.path.isfile(cfg.student_config):
        with open(cfg.student_config, encoding="utf-8") as f:
            d = json.load(f)
        if "model_type" not in d:
            raise ConfigError(f"{cfg.student_config}: a student config needs a 'model_type' (e.g. \"llama\")")
        config = AutoConfig.for_model(**d)
    else:
        config = AutoConfig.from_pretrained(cfg.student_config)
    if os.path.isfile(cfg.student_tokenizer):
        tok = PreTrainedTokenizerFast(tokenizer_file=cfg.student_tokenizer)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.student_tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def logit_width(model: torch.nn.Module) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def check_student(model: torch.nn.Module, tok: Any, tok_hash: str, teacher_manifest: dict[str, Any],
                  map_store: MapStore) -> int:
    """Refuse a student that does not fit the map (tokenizer hash, vocabulary sizes); return its vocabulary size."""
    n_tok = len(tok)
    width = logit_width(model)
    if n_tok > width:
        raise ConfigError(f"the student tokenizer has {n_tok} tokens but the model has only {width} logits")
    map_store.check_pair(teacher_manifest, tok_hash)
    vs = int(map_store.vocab.student_vocab_size)
    if vs != n_tok:
        raise ConfigError(
            f"the map store was built for a student vocabulary of {vs} ids, the student tokenizer has {n_tok}; "
            "rebuild the map for this student (`cdm build-map`)"
        )
    return n_tok


# ============================================================================================ distributed


@dataclass
class Dist:
    """Rank, world size and device of this process (a single process when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_dist(device: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


# ============================================================================================ checkpoints

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


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse a resume whose options would change the data stream or the objective."""
    diffs = [f"loader.{k}: {saved['loader'].get(k)!r} -> {getattr(cfg.loader, k)!r}"
             for k in STREAM_FIELDS if saved["loader"].get(k) != getattr(cfg.loader, k)]
    for k in ("loss", "store", "map", "dual_store", "eval_sequences"):
        if saved.get(k) != getattr(cfg, k):
            diffs.append(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}")
    if diffs:
        raise ConfigError("--resume with options that change the data stream or objective: " + "; ".join(diffs))


# ============================================================================================ the loop


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


def _say(d: Dist, msg: str) -> None:
    if d.main:
        print(f"cdm train: {msg}", file=sys.stderr, flush=True)


def run(cfg: TrainConfig, on_step: Callable[[int, torch.nn.Module], None] | None = None) -> TrainResult:
    """Train the student on the stores as `cfg` says; returns where the final model is. `on_step(step, model)`
    is called before each optimiser step (tests use it to inject faults)."""
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = setup_dist(cfg.device)
    try:
        return _run(cfg, d, on_step)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: Dist, on_step: Callable[[int, torch.nn.Module], None] | None) -> TrainResult:
    autocast = _autocast(cfg.dtype, d.device)
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1; got {cfg.grad_accum}")
    weights = Objective.parse_weights(cfg.loss, cfg.kd_weight, cfg.weights)
    lcfg = replace(cfg.loader, dual="kl" in weights, uld="uld" in weights)
    if "kl" in weights and not cfg.dual_store:
        raise ConfigError("--loss uses 'kl' (same-tokenizer teacher) but no --dual-store was given")
    os.makedirs(cfg.out, exist_ok=True)

    # --- stores, student, checks
    stores = D.StoreSet(cfg.store, cfg.map, cfg.dual_store if lcfg.dual else None, cfg.storage_options)
    teacher, map_store, _ = stores.open()
    if len(teacher) == 0 or len(map_store) == 0:
        raise D.DataError(f"nothing to train on: the teacher store has {len(teacher)} sequences, the map store {len(map_store)}")
    ckpts = checkpoint_dirs(cfg.out)
    if ckpts and not cfg.resume:
        raise ConfigError(f"{cfg.out} already holds checkpoints ({os.path.basename(ckpts[-1])}); pass --resume or use another --out")
    resume_from = ckpts[-1] if (cfg.resume and ckpts) else None
    if cfg.resume and not ckpts:
        _say(d, f"--resume: no complete checkpoint in {cfg.out}; starting from step 0")
    if resume_from:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(os.path.join(resume_from, "model"), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(os.path.join(resume_from, "model"))
        with open(os.path.join(resume_from, "complete.json"), encoding="utf-8") as f:
            tok_hash = json.load(f)["student_tokenizer_hash"]
    else:
        model, tok = load_student(cfg)
        tok_hash = student_tokenizer_hash(str(cfg.student or cfg.student_tokenizer), tok)
    vocab = check_student(model, tok, tok_hash, teacher.manifest, map_store)
    maps = torch_maps(map_store, d.device) if ("cdm" in weights or "mined" in weights) else None
    theta = float(map_store.vocab.theta) if cfg.theta is None else float(cfg.theta)
    if theta > float(map_store.vocab.theta) + 1e-9:
        raise ConfigError(f"--theta {theta} exceeds the map store's θ {map_store.vocab.theta}: its fuzzy table lacks those pairs")
    objective = Objective(weights, cfg.temperature, cfg.student_topk, theta, cfg.tail_bucket, cfg.reverse, cfg.kl_tail)

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
        if cfg.epochs is None:
            raise ConfigError("give --max-steps or --epochs")
        max_steps = max(1, int(math.ceil(plan.epoch_size(0) * cfg.epochs / micro_per_step)))

    # --- optimiser, schedule, resume state
    model.to(d.device)
    model.train()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))
    step, position = 0, 0
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"))
    if resume_from:
        st = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", weights_only=False)
        check_resumable(st["config"], cfg)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, position = int(st["step"]), int(st["position"])
        rng_file = os.path.join(resume_from, f"rng-rank{d.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        if d.main:
            log.truncate_after(step)
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

    def run_eval() -> dict[str, Any] | None:
        if not eval_set:
            return None
        res = evaluate(model, eval_set, d.device, autocast, d.rank, d.world, d.all_reduce)
        if d.main:
            log.append({"kind": "eval", "step": step, **res})
        return res

    state = lambda: {"step": step, "position": position, "config": cfg.to_json(), "max_steps": max_steps,  # noqa: E731
                     "student_tokenizer_hash": tok_hash}
    _say(d, f"training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
            f"for {max_steps} steps, loss {weights}, {len(train_idx)} train / {int(held.sum())} held-out sequences, "
            f"world {d.world}, device {d.device}")
    last_eval = run_eval() if (not resume_from and eval_set) else None
    bar = None
    if d.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, desc="cdm train", dynamic_ncols=True)
    last: dict[str, Any] = {}
    last_ckpt = resume_from
    t_last = time.perf_counter()
    while step < max_steps:
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        for b in micro:
            if b.input_ids.numel() and int(b.input_ids.max()) >= width:
                raise D.DataError(f"student ids up to {int(b.input_ids.max())} in sequences {b.seq_ids[:4]} exceed the model's {width} logits")
        counts = [b.counts for b in micro]
        local = torch.tensor([[*c.values(), b.n_bytes, len(b.seq_ids)] for b, c in zip(micro, counts)], dtype=torch.float64).sum(0)
        totals = dict(zip(COUNT_KEYS, d.all_reduce(local.to(d.device)).tolist()))
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
            where = (f"micro-batch at stream position {bad[0][0]} (sequences {bad[0][1]})" if bad else "a micro-batch on another rank")
            _stop(d, log, step, f"loss is {reduced['loss']} at step {step + 1}, {where}", last_ckpt)
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
    model_dir = os.path.join(cfg.out, "model")
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
    """One JSONL training record: each part's step mean, the CDM teacher-mass shares, alignment share, speed."""
    rec: dict[str, Any] = {"kind": "train", "step": step, "lr": lr, "loss": reduced["loss"], "grad_norm": gnorm}
    for part in objective.weights:
        n = totals[PART_ROWS[part]]
        rec[part] = reduced.get(part, 0.0) / n if n else math.nan
        for k, v in reduced.items():
            if k.startswith(part + "_"):
                rec[k] = v / n if n else math.nan
    rec["aligned_share"] = totals["kd"] / totals["ce"] if totals["ce"] else math.nan
    rec.update(tokens=int(totals["tokens"]), sequences=int(totals["seqs"]), kd_rows=int(totals["kd"]),
               labelled=int(totals["ce"]), step_time=dt, tokens_per_s=totals["tokens"] / dt if dt > 0 else math.nan)
    return rec


def _stop(d: Dist, log: MetricsLog, step: int, what: str, last_ckpt: str | None) -> None:
    """Stop on a non-finite loss/gradient without stepping; the last good checkpoint stays as it is."""
    keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    msg = f"{what}; stopped before the optimiser step, {keep} (resume with --resume, e.g. with a lower --lr)"
    if d.main:
        log.append({"kind": "diverged", "step": step, "message": msg})
    raise TrainingDiverged(msg)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_json()` output (e.g. a checkpoint's config)."""
    d = dict(d)
    d["loader"] = D.LoaderConfig(**d.get("loader", {}))
    return TrainConfig(**d)


__all__ = ["ConfigError", "Objective", "TrainConfig", "TrainResult", "TrainingDiverged", "config_from_dict", "run"]
