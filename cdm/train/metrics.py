"""Training metrics: one JSON object per line (append-only, trimmed on resume) and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

#: keys drawn in the loss panel when present (each loss part, unweighted, and the weighted total)
LOSS_KEYS = ("loss", "ce", "kl", "cdm", "mined", "uld")
MASS_KEYS = ("aligned_share", "cdm_mass_exact", "cdm_mass_dynamic", "cdm_mass_dropped", "cdm_mass_tail")


class MetricsLog:
    """Append-only JSONL of training records (``{"kind": "train"|"eval"|..., "step": N, ...}``).

    The file is strict JSON (jq, pandas, browsers read it): a non-finite value (e.g. a loss part with no rows in a
    step) is written as null, and `read()` gives it back as NaN."""

    def __init__(self, path: str, on_record: Callable[[dict[str, Any]], None] | None = None):
        """`on_record(record)`: also called with each appended record (e.g. to send it to an experiment tracker)."""
        self.path = path
        self.on_record = on_record

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_jsonable(record), allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.on_record is not None:
            self.on_record(dict(record))

    def read(self) -> list[dict[str, Any]]:
        """Every complete record (a torn last line from a killed run is ignored)."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out.append({k: (math.nan if v is None else v) for k, v in rec.items()})
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (what a killed run logged after its last checkpoint), atomically."""
        keep = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(_jsonable(r), allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key in records of one kind, skipping missing and non-finite values."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def plot_metrics(records: list[dict[str, Any]], png_path: str) -> bool:
    """Draw training losses, held-out CE / bits per byte, and teacher-mass shares; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("cdm train: matplotlib is not installed; skipping the metrics plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key in LOSS_KEYS:
        xs, ys = series(records, "train", key)
        if xs:
            ax.plot(xs, ys, label=key, linewidth=1.0 if key != "loss" else 1.8)
    ax.set_title("training loss parts (unweighted) and total")
    ax.set_xlabel("step")
    ax = axes[1]
    for key, label in (("ce", "held-out CE (nats/token)"), ("bpb", "held-out bits per byte")):
        xs, ys = series(records, "eval", key)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_title("evaluation")
    ax.set_xlabel("step")
    ax = axes[2]
    for key in MASS_KEYS:
        xs, ys = series(records, "train", key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_title("alignment and teacher mass (share)")
    ax.set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True
