"""Where cdm keeps its caches: one folder for stores, vocabulary maps and extracted assets."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_VARS = ("CDM_CACHE_DIR", "CDM_CACHE")  # either name works; CDM_CACHE is the older name of the assets cache


def cache_env(prefer: str = "CDM_CACHE_DIR") -> str | None:
    """The cache folder named by the environment, or None: `prefer` first, then the other name."""
    for name in (prefer, *(v for v in CACHE_VARS if v != prefer)):
        if os.environ.get(name):
            return os.environ[name]
    return None


def cache_dir(prefer: str = "CDM_CACHE_DIR") -> Path:
    """$CDM_CACHE_DIR or $CDM_CACHE (`prefer` wins if both are set), else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm."""
    env = cache_env(prefer)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdm"
