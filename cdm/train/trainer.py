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

from cdm import devices
from cdm.mapping.store import KIND_1_1, MapStore
from cdm.progress import library_progress_bars
from cdm.train import data as D
from cdm.train.evaluate import evaluate
from cdm.train.losses import IGNORE_INDEX, VocabMaps, cdm_loss, ce_loss, kl_topk_loss, mined_loss, uld_loss
from cdm.train.metrics import MetricsLog, plot_metrics

PARTS = ("ce", "kl", "cdm", "mined", "uld")
KD_PARTS = ("kl", "cdm", "mined", "uld")
#: the rows each part is averaged over (Batch.counts keys)
PART_ROWS = {"ce": "ce", "kl": "dual", "cdm": "kd", "mined": "ce", "uld": "uld"}
COUNT_KEYS = ("ce", "kd", "kd_labelled", "dual", "uld", "tokens", "bytes", "seqs")
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse nonsense numbers and names up front (CLI and Python API alike); messages name the CLI flag.

        0 keeps its documented meaning where it has one: --grad-clip 0 (no clipping), --save-every 0 (only at the
        end), --keep-checkpoints 0 (keep all), --eval-every 0 (no evaluation), --eval-sequences 0 (no held-out
        split), --student-topk 0 (exact matches only), --warmup-steps 0 (no warm-up)."""
        def need(ok: bool, flag: str, rule: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"{flag} must be {rule} (got {value!r})")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        need(finite(self.kd_weight) and 0.0 <= self.kd_weight <= 1.0, "--kd-weight", "in [0, 1]", self.kd_weight)
        if self.weights:
            for part, w in self.weights.items():
                need(finite(w) and w >= 0, f"--weights {part}", "a finite number >= 0", w)
            need(any(w > 0 for w in self.weights.values()), "--weights", "positive for at least one part", self.weights)
        need(finite(self.temperature) and self.temperature > 0, "--temperature", "> 0", self.temperature)
        need(self.student_topk is None or self.student_topk >= 0, "--student-topk", ">= 0 (0: exact matches only)",
             self.student_topk)
        need(self.theta is None or (finite(self.theta) and 0.0 <= self.theta <= 1.0), "--theta", "in [0, 1]", self.theta)
        need(finite(self.lr) and self.lr > 0, "--lr", "> 0", self.lr)
        need(finite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio", "in [0, 1]",
             self.min_lr_ratio)
        need(self.warmup_steps >= 0, "--warmup-steps", ">= 0", self.warmup_steps)
        need(finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay", ">= 0", self.weight_decay)
        need(finite(self.beta1) and 0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)", self.beta1)
        need(finite(self.beta2) and 0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)", self.beta2)
        need(finite(self.grad_clip) and self.grad_clip >= 0, "--grad-clip", ">= 0 (0: off)", self.grad_clip)
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps", ">= 1", self.max_steps)
        need(self.epochs is None or (finite(self.epochs) and self.epochs > 0), "--epochs", "> 0", self.epochs)
        need(self.grad_accum >= 1, "--grad-accum", ">= 1", self.grad_accum)
        need(self.dtype in ("fp32", "bf16"), "--dtype", "fp32 or bf16", self.dtype)
        parse_device(self.device)
        need(self.seed >= 0, "--seed", ">= 0", self.seed)
        need(self.num_workers >= 0, "--num-workers", ">= 0", self.num_workers)
        need(self.save_every >= 0, "--save-every", ">= 0 (0: only at the end)", self.save_every)
        need(self.keep_checkpoints >= 0, "--keep-checkpoints", ">= 0 (0: keep all)", self.keep_checkpoints)
        need(self.eval_every >= 0, "--eval-every", ">= 0 (0: off)", self.eval_every)
        need(self.eval_sequences >= 0, "--eval-sequences", ">= 0", self.eval_sequences)
        need(self.log_every >= 1, "--log-every", ">= 1", self.log_every)

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


def _looks_local(path: str) -> bool:
    """True when `path` is meant as a local path rather than a Hugging Face hub name: it starts with ./ ../ / ~
    (or a drive/separator), or its first component exists here (e.g. runs/x when ./runs exists)."""
    if path.startswith(("./", "../", "/", "~", ".\\", "..\\")) or path in (".", "..") or os.path.isabs(path):
        return True
    first = path.replace("\\", "/").split("/")[0]
    return "/" in path.replace("\\", "/") and os.path.isdir(first)


def _load_from(flag: str, path: str, load: Callable[[str], Any], what: str = "folder") -> Any:
    """`load(path)` for the option `flag`; a missing local path or a failing load becomes one ConfigError naming the
    flag and path (instead of transformers' 'Repo id must use alphanumeric chars' traceback). Hub names still load."""
    local = os.path.expanduser(path)
    if _looks_local(path) and not os.path.exists(local):
        raise ConfigError(f"{flag} {path}: no such {what}")
    try:
        return load(local if os.path.exists(local) else path)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers reports bad folders/ids as OSError/ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {path}: cannot load it ({first})") from e


def load_student(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """The student model (fp32 weights) and its tokenizer: an HF folder, or a config + tokenizer from scratch."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if cfg.student:
        if cfg.student_config or cfg.student_tokenizer:
            raise ConfigError("give either --student or --student-config with --student-tokenizer, not both")
        model = _load_from("--student", cfg.student, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
        tok = _load_from("--student", cfg.student, AutoTokenizer.from_pretrained)
        return model, tok
    if not (cfg.student_config and cfg.student_tokenizer):
        raise ConfigError("no student: give --student DIR, or --student-config and --student-tokenizer")
    config_path = os.path.expanduser(cfg.student_config)
    if os.path.isfile(config_path):
        def from_file(p: str) -> Any:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict) or "model_type" not in d:
                raise ConfigError(f"--student-config {cfg.student_config}: a student config needs a 'model_type' (e.g. \"llama\")")
            return AutoConfig.for_model(**d)

        config = _load_from("--student-config", cfg.student_config, from_file, "file or folder")
    else:
        config = _load_from("--student-config", cfg.student_config, AutoConfig.from_pretrained, "file or folder")
    if os.path.isfile(os.path.expanduser(cfg.student_tokenizer)):
        tok = _load_from("--student-tokenizer", cfg.student_tokenizer,
                         lambda p: PreTrainedTokenizerFast(tokenizer_file=p), "file or folder")
    else:
        tok = _load_from("--student-tokenizer", cfg.student_tokenizer, AutoTokenizer.from_pretrained, "file or folder")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def logit_width(model: torch.nn.Module) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def check_student(model: torch.nn.Module, tok: Any, tok_hash: str, teacher_manifest: dict[str, Any],
                  map_store: MapStore) -> int:
    """Refuse a student that does not fit the map; return its vocabulary size. The map's provenance (teacher store,
    student tokenizer hash) is checked first: a student with another tokenizer is that, not a size problem."""
    map_store.check_pair(teacher_manifest, tok_hash)
    n_tok = len(tok)
    width = logit_width(model)
    if n_tok > width:
        raise ConfigError(f"the student tokenizer has {n_tok} tokens but the model has only {width} logits")
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


def check_dual_store(manifest: dict[str, Any], student_vocab: int, url: str) -> None:
    """The same-tokenizer teacher store must speak the student's tokenizer: refuse another vocabulary before
    training starts (token ids are compared sequence by sequence as batches are built, which would only say so
    at the first batch)."""
    tok = (manifest.get("teacher") or {}).get("tokenizer") or {}
    sizes = {int(v) for v in (manifest.get("vocab_size"), tok.get("size")) if v is not None}
    if sizes and student_vocab not in sizes:
        raise ConfigError(f"--dual-store {url}: precomputed with a tokenizer of {sorted(sizes)} tokens, but the "
                          f"student's has {student_vocab}; the dual store must be precomputed with the student's "
                          "tokenizer (cdm precompute --tokenizer STUDENT_TOKENIZER)")


def parse_device(device: str) -> torch.device | None:
    """`--device` as a torch.device (None for auto), refused with a ConfigError (`cdm.devices.parse_device`)."""
    return devices.parse_device(device, ConfigError)


def setup_dist(device: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    parse_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    devices.check_device_available(dev, device, ConfigError)
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


#: Objective fields -> the flags that set them (for --resume refusals)
OBJECTIVE_FLAGS = {"weights": "--loss/--kd-weight/--weights (part weights)", "temperature": "--temperature",
                   "student_topk": "--student-topk", "theta": "--theta", "tail_bucket": "--tail-bucket",
                   "reverse": "--reverse", "kl_tail": "--kl-tail"}


def run_identity(teacher: Any, map_store: MapStore, dual: Any, objective: Objective, n_eval: int) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, beyond the loader options: the stores' keys (content
    identities, so a moved or re-spelled path is the same store and another store at the same path is not), the
    resolved objective, and the held-out split size. Saved in every checkpoint's trainer state."""
    return {
        "stores": {"store": str(teacher.key), "map": str(map_store.manifest.get("key")),
                   "dual_store": str(dual.key) if dual is not None else None},
        "objective": {f.name: getattr(objective, f.name) for f in fields(objective)},
        "held_out": int(n_eval),
    }


def _same_location(a: str | None, b: str | None) -> bool:
    """Paths compared after normalising (fallback for checkpoints that predate recorded store keys)."""
    if a is None or b is None:
        return a == b
    norm = (lambda u: u.rstrip("/") if "://" in u else os.path.normpath(os.path.abspath(os.path.expanduser(u))))  # noqa: E731
    return norm(a) == norm(b)


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, now: dict[str, Any] | None = None) -> None:
    """Refuse a resume whose options would change the data stream or the objective, listing every change.

    `saved` is the checkpoint's trainer state (its ``config`` and, when written by this version, the
    `run_identity` fields); `now` is this run's `run_identity`. Checkpoints without identity fields fall back to
    comparing normalised paths and the raw loss options."""
    conf = saved["config"]
    now = now or {}
    diffs = [f"loader.{k}: {conf['loader'].get(k)!r} -> {getattr(cfg.loader, k)!r}"
             for k in STREAM_FIELDS if conf["loader"].get(k) != getattr(cfg.loader, k)]
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
    if diffs:
        raise ConfigError("--resume with options that change the data stream or objective: " + "; ".join(diffs))


def check_out(cfg: TrainConfig) -> None:
    """Refuse an --out that is an input: a cdm store (its manifest.json names a format), or the folder of --student,
    --student-config, --student-tokenizer, --store, --map or --dual-store. Train writes checkpoints/ and model/ there."""
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
        if not path or "://" in path:
            continue
        local = os.path.expanduser(path)
        if os.path.isdir(local) and os.path.samefile(local, out):
            raise ConfigError(f"--out {cfg.out}: is the {flag} folder; train would write its checkpoints and model "
                              "into it; choose another --out")


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


@dataclass
class _Where:
    """How far a run got (read by `run` when it is interrupted)."""

    step: int = 0


def run(cfg: TrainConfig, on_step: Callable[[int, torch.nn.Module], None] | None = None) -> TrainResult:
    """Train the student on the stores as `cfg` says; returns where the final model is. `on_step(step, model)`
    is called before each optimiser step (tests use it to inject faults).

    On Ctrl-C (KeyboardInterrupt) it says at which step it stopped and which complete checkpoint a `--resume`
    continues from, then re-raises (the CLI exits 130)."""
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = setup_dist(cfg.device)
    where = _Where()
    try:
        with library_progress_bars(cfg.progress):  # --no-progress: no transformers/datasets bars either
            return _run(cfg, d, on_step, where)
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
         where: _Where | None = None) -> TrainResult:
    where = where if where is not None else _Where()
    cfg.validate()  # fields may have been assigned after construction
    autocast = _autocast(cfg.dtype, d.device)
    weights = Objective.parse_weights(cfg.loss, cfg.kd_weight, cfg.weights)
    lcfg = replace(cfg.loader, dual="kl" in weights, uld="uld" in weights)
    if "kl" in weights and not cfg.dual_store:
        raise ConfigError("--loss uses 'kl' (same-tokenizer teacher) but no --dual-store was given")
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
        if cfg.epochs is None:
            raise ConfigError("give --max-steps or --epochs")
        max_steps = max(1, int(math.ceil(plan.epoch_size(0) * cfg.epochs / micro_per_step)))
    identity = run_identity(teacher, map_store, dual, objective, n_eval)
    model_dir = os.path.join(cfg.out, "model")

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
            done = _finished_model(model_dir, step)
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


def _finished_model(model_dir: str, step: int) -> dict[str, Any] | None:
    """The final model's `cdm_train.json` when `model_dir` holds the model of exactly `step` steps, else None."""
    try:
        with open(os.path.join(model_dir, "cdm_train.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("step") == step else None


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


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_json()` output (e.g. a checkpoint's config)."""
    d = dict(d)
    d["loader"] = D.LoaderConfig(**d.get("loader", {}))
    return TrainConfig(**d)


__all__ = ["ConfigError", "Objective", "TrainConfig", "TrainResult", "TrainingDiverged", "config_from_dict", "run"]
