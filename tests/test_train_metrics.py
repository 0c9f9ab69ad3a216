"""metrics.jsonl is strict JSON: non-finite values are written as null and read back as NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from cdm.train.metrics import MetricsLog, series


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_null_on_disk_and_nan_when_read(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.append({"kind": "train", "step": 1, "loss": torch.tensor(2.5), "cdm": math.nan, "kl": np.float32(np.inf)})
    log.append({"kind": "train", "step": 2, "loss": 2.0, "cdm": 0.5, "kl": -math.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = _strict(lines[0])
    assert first["cdm"] is None and first["kl"] is None and first["loss"] == 2.5
    recs = log.read()
    assert math.isnan(recs[0]["cdm"]) and math.isnan(recs[1]["kl"]) and recs[1]["cdm"] == 0.5
    assert series(recs, "train", "cdm") == ([2], [0.5])  # missing values are skipped in the curves
    log.truncate_after(1)
    assert [_strict(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
