"""Stage 1 of cdm: run the teacher once over the data and fill a teacher store (`cdm precompute`)."""

from cdm.precompute.data import DataError
from cdm.precompute.encode import OffsetsUnavailable
from cdm.precompute.run import PrecomputeResult, default_cache_dir, resolve_shard, run, shard_rows
from cdm.precompute.teacher import TeacherError

__all__ = ["DataError", "OffsetsUnavailable", "PrecomputeResult", "TeacherError", "default_cache_dir",
           "resolve_shard", "run", "shard_rows"]
