"""How a run's loss parts combine (`--loss ce+cdm --kd-weight 0.5`) and the vocabulary maps they use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cdm.mapping.store import KIND_1_1, MapStore
from cdm.train import data as D
from cdm.train.config import ConfigError
from cdm.train.losses import IGNORE_INDEX, VocabMaps, cdm_loss, ce_loss, kl_topk_loss, mined_loss, uld_loss

PARTS = ("ce", "kl", "cdm", "mined", "uld")
KD_PARTS = ("kl", "cdm", "mined", "uld")
#: the rows each part is averaged over (Batch.counts keys)
PART_ROWS = {"ce": "ce", "kl": "dual", "cdm": "kd", "mined": "ce", "uld": "uld"}
COUNT_KEYS = ("ce", "kd", "kd_labelled", "dual", "uld", "tokens", "bytes", "seqs")
CDM_STATS = ("mass_exact", "mass_dynamic", "mass_dropped", "mass_tail", "columns", "reverse_columns", "reverse_em_outside")


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
