"""Stage 2 of cdm: map a teacher store to a student tokenizer (`cdm build-map`), and the map store it writes."""

from cdm.mapping.build import BuildResult, build_map
from cdm.mapping.store import MapSequence, MapStore, MapStoreWriter, VocabMaps

__all__ = ["BuildResult", "MapSequence", "MapStore", "MapStoreWriter", "VocabMaps", "build_map"]
