"""`cdm train`'s options: one TrainConfig that the CLI and `cdm.train.run` fill alike, checked up front."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from cdm import devices
from cdm.errors import CdmError, OptionError
from cdm.train import data as D


class TrainingDiverged(CdmError, RuntimeError):
    """The loss or the gradient norm became NaN/inf; the optimiser step was not taken."""


class ConfigError(OptionError):
    """The run's options or inputs cannot work together."""


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
    gradient_checkpointing: bool = False  # recompute activations in backward (HF models that support it)
    device: str = "auto"
    seed: int = 0
    loader: D.LoaderConfig = field(default_factory=D.LoaderConfig)
    num_workers: int = 2  # same default as `cdm train --num-workers`
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

    #: path fields: str, os.PathLike (turned into str) or None
    PATH_FIELDS = ("store", "map", "out", "student", "student_config", "student_tokenizer", "dual_store")
    #: numeric fields and the CLI flag that sets them (type checks; the ranges are checked one by one below)
    INT_FIELDS = ("student_topk", "warmup_steps", "max_steps", "grad_accum", "seed", "num_workers", "save_every",
                  "keep_checkpoints", "eval_every", "eval_sequences", "log_every")
    FLOAT_FIELDS = ("kd_weight", "temperature", "theta", "lr", "min_lr_ratio", "weight_decay", "beta1", "beta2",
                    "grad_clip", "epochs")

    def _normalise(self) -> None:
        """Paths given as pathlib.Path become str (they are written to JSON)."""
        for name in self.PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} {value!r}")
        if not isinstance(self.loader, D.LoaderConfig):
            raise ConfigError(f"loader must be a cdm.train.LoaderConfig, got {type(self.loader).__name__}")

    def data_config(self) -> D.LoaderConfig:
        """The loader options the run uses: `loader`, whose seed (the data order) is `seed` unless the loader names
        its own, as `cdm train --seed` sets both. Resolved when used, so `dataclasses.replace(cfg, seed=s)` moves
        the data order too."""
        return self.loader if self.loader.seed is not None else replace(self.loader, seed=self.seed)

    def validate(self) -> None:
        """Refuse nonsense numbers and names up front (CLI and Python API alike); messages name the CLI flag.

        0 keeps its documented meaning where it has one: --grad-clip 0 (no clipping), --save-every 0 (only at the
        end), --keep-checkpoints 0 (keep all), --eval-every 0 (no evaluation), --eval-sequences 0 (no held-out
        split), --student-topk 0 (exact matches only), --warmup-steps 0 (no warm-up)."""
        def need(ok: bool, flag: str, rule: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"{flag} must be {rule} (got {value!r})")

        def flag(name: str) -> str:
            return {"beta1": "beta1", "beta2": "beta2"}.get(name, "--" + name.replace("_", "-"))

        for name in self.INT_FIELDS:  # a string from a hand-written config gets a message, not a TypeError
            v = getattr(self, name)
            if v is None:
                continue
            whole = isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and float(v).is_integer())
            need(whole and not isinstance(v, bool), flag(name), "an integer", v)
            setattr(self, name, int(v))  # numpy integers and 100.0 become plain ints (the config is written as JSON)
        for name in self.FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            need(isinstance(v, numbers.Real) and not isinstance(v, bool), flag(name), "a number", v)
            setattr(self, name, float(v) if not isinstance(v, int) else v)

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
        self._normalise()  # last: the loader takes the seed checked above

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "loader"}
        d["loader"] = self.data_config().to_json()  # the seed the run uses, also when it came from `seed`
        return d


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: str
    model_dir: str
    step: int
    last: dict[str, Any]
    eval: dict[str, Any] | None



def parse_device(device: str) -> torch.device | None:
    """`--device` as a torch.device (None for auto), refused with a ConfigError (`cdm.devices.parse_device`)."""
    return devices.parse_device(device, ConfigError)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_json()` output (e.g. a checkpoint's config)."""
    d = dict(d)
    d["loader"] = D.LoaderConfig(**d.get("loader", {}))
    return TrainConfig(**d)
