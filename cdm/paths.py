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


def as_str(path: str | os.PathLike[str] | None) -> str | None:
    """A path argument of the Python API as str (str or os.PathLike, like the store readers take); None stays None."""
    return os.fspath(path) if isinstance(path, os.PathLike) else path


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL (``s3://b/x``, ``memory://x``): kept as a string, never turned into a local Path."""
    return "://" in os.fspath(path)


def _local_default() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdm"


def cache_location(prefer: str = "CDM_CACHE_DIR") -> str:
    """Where shared caches (teacher stores, vocabulary maps) live: $CDM_CACHE_DIR or $CDM_CACHE (`prefer` wins if
    both are set), which may be an fsspec URL such as s3://bucket/cdm, else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm."""
    env = cache_env(prefer)
    if env:
        return env if is_url(env) else str(Path(env).expanduser())
    return str(_local_default())


def cache_dir(prefer: str = "CDM_CACHE_DIR") -> Path:
    """The local cache folder, for what must be on local disk (extracted model assets): as `cache_location`, but a
    URL in the environment falls back to $XDG_CACHE_HOME/cdm or ~/.cache/cdm."""
    env = cache_env(prefer)
    if env and not is_url(env):
        return Path(env).expanduser()
    return _local_default()
