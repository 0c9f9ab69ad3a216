"""cdm: cross-tokenizer knowledge distillation with Contextual Dynamic Mapping, in three offline stages.

Stage APIs: `cdm.precompute.run`, `cdm.mapping.build_map`, `cdm.train.run`; stores: `cdm.storage.TeacherStore`,
`cdm.mapping.MapStore`; `cdm.CdmError` is the base of every error cdm raises on purpose."""

from cdm.errors import CdmError

__version__ = "0.1.0"

__all__ = ["CdmError", "__version__"]
