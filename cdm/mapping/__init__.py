"""Stage 2 of cdm: map a teacher store to a student tokenizer (`cdm build-map`), and the map store it writes."""

from cdm.mapping.build import BuildResult, build_map, format_report
from cdm.mapping.inspect import inspect_sequence
from cdm.mapping.store import MapSequence, MapStore, MapStoreWriter, VocabMaps
from cdm.mapping.tokenizers import TokenizerError

__all__ = ["BuildResult", "MapSequence", "MapStore", "MapStoreWriter", "TokenizerError", "VocabMaps", "build_map",
           "format_report", "inspect_sequence"]
