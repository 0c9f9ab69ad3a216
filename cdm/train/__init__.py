"""Stage 3 of cdm: a student-only trainer that streams the teacher store and the map store (`cdm train`).

`run(TrainConfig(store=..., map=..., out=..., student=..., loader=LoaderConfig(batch_size=..., max_length=...)))`
does what `cdm train` does; the data flags (`--batch-size`, `--max-length`, `--max-tokens`, `--kd-topk`,
`--block-size`, `--window-blocks`) live in `LoaderConfig`."""

from cdm.train.config import ConfigError, TrainConfig, TrainingDiverged, TrainResult
from cdm.train.data import DataError, LoaderConfig
from cdm.train.trainer import run

__all__ = ["ConfigError", "DataError", "LoaderConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "run"]
