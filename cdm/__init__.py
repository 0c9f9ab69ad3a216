"""cdm: cross-tokenizer knowledge distillation with Contextual Dynamic Mapping, in three offline stages."""

__version__ = "0.1.0"
