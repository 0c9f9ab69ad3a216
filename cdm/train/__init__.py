"""Stage 3 of cdm: a student-only trainer that streams the teacher store and the map store (`cdm train`)."""

from cdm.train.trainer import TrainConfig, TrainResult, TrainingDiverged, run

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "run"]
