"""`--device` for every stage: one rule for which names are accepted and whether this machine has the device."""

from __future__ import annotations

import torch

from cdm.errors import OptionError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: str, error: type[Exception] = OptionError) -> torch.device | None:
    """`--device` as a torch.device (None for 'auto'); refuses names torch does not know or cdm does not run on
    (meta, xla, cpu:0 ...) with `error`, naming the flag."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES or (dev.type != "cuda" and dev.index is not None):
        raise error(f"--device must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
    return dev


def check_device_available(dev: torch.device, flag_value: str, error: type[Exception] = OptionError) -> None:
    """Refuse a device this machine does not have, before anything is written or loaded onto it."""
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise error(f"--device {flag_value}: CUDA is not available on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise error(f"--device {flag_value}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"--device {flag_value}: MPS is not available on this machine; use --device cpu or auto")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where available, else 'cpu'; any other name checked by `parse_device` and
    `check_device_available` (OptionError, a ValueError) and returned as given."""
    dev = parse_device(device)
    if dev is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_available(dev, device)
    return device
