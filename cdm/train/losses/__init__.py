"""Distillation losses of `cdm train`: pure torch functions on KD rows and stored teacher top-K."""

from .cdm_kd import cdm_loss
from .ce import IGNORE_INDEX, ce_loss
from .dynamic_map import ColumnMap, dynamic_map
from .kl_topk import kl_topk_loss
from .maps import VocabMaps
from .mined import mined_loss
from .reference import reference_kd_reduction
from .uld import uld_loss

__all__ = [
    "IGNORE_INDEX",
    "ColumnMap",
    "VocabMaps",
    "cdm_loss",
    "ce_loss",
    "dynamic_map",
    "kl_topk_loss",
    "mined_loss",
    "reference_kd_reduction",
    "uld_loss",
]
