"""Stage 1 of cdm: run the teacher once over the data and fill a teacher store (`cdm precompute`)."""

from cdm.precompute.run import PrecomputeResult, default_cache_dir, resolve_shard, run, shard_rows

__all__ = ["PrecomputeResult", "default_cache_dir", "resolve_shard", "run", "shard_rows"]
