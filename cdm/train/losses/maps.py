"""The static vocabulary maps the cross-tokenizer losses read, as device tensors (loaded from the map store)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VocabMaps:
    """Teacher→student maps: exact-match ids (−1 = none), the fuzzy pair table, the optional MinED projection.

    `fuzzy_keys` [P] int64 are sorted unique keys t·Vs + s (Vs = `student_vocab_size`) of the pairs whose
    normalised edit distance `fuzzy_dist` [P] is below the map store's θ; `mined_t2s` [Vt] is the static
    MinED teacher→student map (−1 = none). Shapes and dtypes are checked on construction; values by `check()`.
    """

    em_t2s: Tensor
    fuzzy_keys: Tensor
    fuzzy_dist: Tensor
    student_vocab_size: int
    mined_t2s: Tensor | None = None

    def __post_init__(self) -> None:
        if self.student_vocab_size <= 0:
            raise ValueError(f"student_vocab_size must be positive; got {self.student_vocab_size}")
        for name in ("em_t2s", "fuzzy_keys", "mined_t2s"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or t.dtype != torch.int64):
                raise TypeError(f"VocabMaps.{name} must be a 1-D int64 tensor; got {t.dtype} {tuple(t.shape)}")
        if self.fuzzy_dist.dim() != 1 or not self.fuzzy_dist.is_floating_point():
            raise TypeError(f"VocabMaps.fuzzy_dist must be 1-D floating point; got {self.fuzzy_dist.dtype}")
        if self.fuzzy_dist.shape != self.fuzzy_keys.shape:
            raise ValueError(
                f"VocabMaps.fuzzy_dist has {self.fuzzy_dist.shape[0]} entries but fuzzy_keys has {self.fuzzy_keys.shape[0]}"
            )
        if self.mined_t2s is not None and self.mined_t2s.shape != self.em_t2s.shape:
            raise ValueError(
                f"VocabMaps.mined_t2s has {self.mined_t2s.shape[0]} teacher ids but em_t2s has {self.em_t2s.shape[0]}"
            )

    @property
    def teacher_vocab_size(self) -> int:
        """Number of teacher ids the maps cover."""
        return int(self.em_t2s.shape[0])

    def to(self, device: torch.device | str) -> VocabMaps:
        """Copy every tensor to `device` (fuzzy distances as fp32)."""
        mined = None if self.mined_t2s is None else self.mined_t2s.to(device)
        return VocabMaps(
            em_t2s=self.em_t2s.to(device),
            fuzzy_keys=self.fuzzy_keys.to(device),
            fuzzy_dist=self.fuzzy_dist.to(device=device, dtype=torch.float32),
            student_vocab_size=self.student_vocab_size,
            mined_t2s=mined,
        )

    def check(self) -> None:
        """Validate values once after loading (syncs the device): id ranges, sorted unique keys, finite distances."""
        vs, vt = self.student_vocab_size, self.teacher_vocab_size
        for name in ("em_t2s", "mined_t2s"):
            t = getattr(self, name)
            if t is not None and t.numel() and (int(t.min()) < -1 or int(t.max()) >= vs):
                raise ValueError(f"VocabMaps.{name} has ids outside [-1, {vs}) (student_vocab_size = {vs})")
        k = self.fuzzy_keys
        if k.numel():
            if int(k.min()) < 0 or int(k.max()) >= vt * vs:
                raise ValueError(f"VocabMaps.fuzzy_keys has keys outside [0, Vt·Vs) = [0, {vt}·{vs})")
            if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
                raise ValueError("VocabMaps.fuzzy_keys must be strictly increasing (sorted, no duplicate pairs)")
            if not bool(torch.isfinite(self.fuzzy_dist).all()) or float(self.fuzzy_dist.min()) < 0:
                raise ValueError("VocabMaps.fuzzy_dist must be finite and non-negative")
