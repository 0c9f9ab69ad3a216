"""Local paths and fsspec URLs behind one small interface: atomic writes, reads, listings, zarr stores."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Iterator

import fsspec
import zarr.storage


class Location:
    """A directory given as a local path or an fsspec URL (``s3://bucket/x``, ``memory://x``, ``file:///x``)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self._fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._pid = os.getpid()
        self.is_local = "file" in _protocols(self._fs)
        if self.is_local:
            self.root = os.path.abspath(self.root)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, re-created in a forked child (DataLoader workers): an s3/gcs filesystem's event loop and
        connections belong to the process that made them ("This class is not fork-safe")."""
        if self._pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
            self._pid = os.getpid()
        return self._fs

    def _fresh(self, path: str) -> None:
        """Forget cached listings under `path` (s3fs/gcsfs answer `ls`/`exists` from a directory cache, which would
        hide files that other writers added since: the manifest reconciliation must see them)."""
        if not self.is_local:
            self.fs.invalidate_cache(path)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def exists(self, *parts: str) -> bool:
        p = self.path(*parts)
        self._fresh(p)
        return bool(self.fs.exists(p))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_many(self, paths: list[tuple[str, ...]], missing_ok: bool = False, batch: int = 64) -> Iterator[bytes | None]:
        """The bytes of many files, in order, fetched `batch` at a time and concurrently within a batch where the
        filesystem is asynchronous (s3, gcs, http: one round trip per file would otherwise dominate resuming or
        closing a shard of thousands of commits); memory holds one batch. With `missing_ok`, a file that cannot
        be read gives None instead of raising. (`cat_ranges`, not `cat`: `cat` expands glob characters such as
        `[` in a path.)"""
        for i in range(0, len(paths), max(1, batch)):
            full = [self.path(*parts) for parts in paths[i : i + batch]]
            got = self.fs.cat_ranges(full, [None] * len(full), [None] * len(full), on_error="return")
            for p, v in zip(full, got):
                if isinstance(v, BaseException) or v is None:
                    if not missing_ok:
                        raise v if isinstance(v, BaseException) else FileNotFoundError(p)
                    v = None
                yield v

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts).decode("utf-8"))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically: readers see the old content or the new one, never a torn file."""
        target = self.path(*parts)
        if self.is_local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:  # object stores: a single PUT is atomic
            self.fs.pipe_file(target, data)

    def write_many(self, files: dict[tuple[str, ...], bytes]) -> None:
        """Write several files, each atomically; on object stores concurrently (fsspec pipe: one round trip for
        all), locally one after another. No order among them is promised: write what must come last separately."""
        if not files:
            return
        if self.is_local:
            for parts, data in files.items():
                self.write_bytes(data, *parts)
        else:
            self.fs.pipe({self.path(*parts): data for parts, data in files.items()})

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes((json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"), *parts)

    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            os.makedirs(self.path(*parts), exist_ok=True)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        p = self.path(*parts)
        self._fresh(p)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def listdir(self, *parts: str) -> list[str]:
        p = self.path(*parts)
        self._fresh(p)
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def files(self, *parts: str) -> dict[str, int]:
        """Every file under a folder, as relative path -> size in bytes."""
        base = self.path(*parts).rstrip("/")
        self._fresh(base)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        out: dict[str, int] = {}
        for full, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rel = full[len(base.lstrip("/")) + 1 :] if not full.startswith(base) else full[len(base) + 1 :]
            out[rel] = int(info.get("size") or 0)
        return dict(sorted(out.items()))

    def sha256(self, *parts: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(*parts), "rb") as f:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                h.update(block)
        return h.hexdigest()

    def zarr_store(self, *parts: str, read_only: bool = False) -> zarr.abc.store.Store:
        p = self.path(*parts)
        if self.is_local:
            return zarr.storage.LocalStore(p, read_only=read_only)
        protocol = _protocols(self.fs)[0]
        return zarr.storage.FsspecStore.from_url(
            f"{protocol}://{p.lstrip('/') if protocol != 'memory' else p}",
            storage_options=self.storage_options or None,
            read_only=read_only,
        )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
