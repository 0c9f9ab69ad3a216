"""The content-addressed store cache: list what `cdm precompute` left under <cache_dir>/stores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cdm.precompute.run import STORES_SUBDIR, default_cache_dir, human_bytes


@dataclass
class CachedStore:
    """One cached teacher store: where it is, its key and state, size, and provenance from its manifest."""

    path: str
    key: str
    complete: bool
    sequences: int
    tokens: int
    bytes: int
    teacher: str
    data: list[str]
    k: int
    backend: str
    created: str


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def list_stores(cache_dir: str | None = None) -> list[CachedStore]:
    """Every folder under <cache_dir>/stores holding a teacher store, oldest first; `cache_dir` may be an fsspec URL
    (there the size is the manifest's shard bytes: walking a bucket prefix would cost a listing per folder)."""
    from cdm.paths import is_url
    from cdm.storage import Location, StoreError, TeacherStore
    from cdm.storage.ragged import bytes_on_disk

    base = os.fspath(cache_dir) if cache_dir else default_cache_dir()
    remote = is_url(base)
    root = f"{base.rstrip('/')}/{STORES_SUBDIR}" if remote else os.path.join(os.path.expanduser(base), STORES_SUBDIR)
    if remote:
        names = Location(root).listdir()
    else:
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    out = []
    for name in names:
        path = f"{root}/{name}" if remote else os.path.join(root, name)
        try:
            m: dict[str, Any] | None = TeacherStore.read_manifest(path)
        except StoreError:
            m = None
        if not m:
            continue
        tot = m.get("totals", {})
        out.append(CachedStore(
            path=path, key=str(m.get("key")), complete=bool(m.get("complete")), sequences=int(tot.get("sequences", 0)),
            tokens=int(tot.get("tokens", 0)), bytes=bytes_on_disk(m) if remote else _dir_bytes(path),
            teacher=str(m.get("teacher", {}).get("source")),
            data=list(m.get("data", {}).get("paths", [])), k=int(m.get("k", 0)),
            backend=str(m.get("capture", {}).get("backend")), created=str(m.get("created", "")),
        ))
    return sorted(out, key=lambda s: (s.created, s.path))


def format_stores(stores: list[CachedStore]) -> str:
    """A human-readable table of cached stores."""
    if not stores:
        return "no cached teacher stores"
    lines = []
    for s in stores:
        state = "complete" if s.complete else "partial"
        lines.append(f"{s.path}\n  {state}  {s.sequences} seqs  {s.tokens} tokens  {human_bytes(s.bytes)} on disk  "
                     f"k={s.k}  {s.backend}  created {s.created}\n  teacher {s.teacher}\n  data    {', '.join(s.data)}")
    return "\n".join(lines)
