"""cdm: cross-tokenizer knowledge distillation with Contextual Dynamic Mapping, in three offline stages.

Stage APIs: `cdm.precompute.run`, `cdm.mapping.build_map`, `cdm.train.run`; stores: `cdm.storage.TeacherStore`,
`cdm.mapping.MapStore`; `cdm.CdmError` is the base of the errors cdm raises on purpose (`cdm.OptionError` for option values)."""

from cdm.errors import CdmError, OptionError

__version__ = "0.1.0"

__all__ = ["CdmError", "OptionError", "__version__"]
