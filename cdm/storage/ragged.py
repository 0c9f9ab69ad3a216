"""Sharded, resumable, atomic stores of ragged token-level arrays (Zarr v3) plus a per-sequence table (Parquet).

Both the teacher store and the map store are built on this. Layout of a store directory::

    manifest.json                     single source of truth; replaced atomically
    shards/shard-00003.json           completion entry of shard 3 (the manifest is rebuilt from these)
    shard-00003/
        tokens/                       a Zarr v3 group: one array per field, rows concatenated over sequences
          <field>/...                 [N, *tail] arrays, chunked along rows
          seq_offsets/...             [S+1] int64, sequence s owns rows seq_offsets[s]:seq_offsets[s+1]
        sequences.parquet             one row per sequence
        _writing/                     only while the shard is being written (state.json, tail, row parts,
                                      sha256 of each commit's chunk files)

Commit protocol (crash-safe at any instant): only whole chunks are ever written into the Zarr arrays, each
exactly once; the rows after the last whole chunk live in an atomically written tail file; ``state.json``
(atomic) says how many rows/sequences are durable. Resume truncates the arrays back to the state and drops
files newer than it. A shard is complete once its entry in ``shards/`` exists; then it is immutable. Its digest
(sha256 over every file's sha256) comes from hashes taken as the files were written, so closing a shard does not
read it back; readers that check digests hash what is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from cdm.storage.errors import StoreError
from cdm.storage.fields import FieldSpec, layout
from cdm.storage.fs import Location
from cdm.storage.lease import LEASE_FILE, ShardLease

MANIFEST = "manifest.json"
WRITING = "_writing"
ZARR_GROUP = "tokens"  # shard-N/tokens/ is a pure Zarr v3 group; the Parquet table sits beside it
DETAIL_KEYS = ("files", "skipped")  # kept in shards/shard-N.json only, so the manifest stays small


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------------------------- manifest


def read_manifest(loc: Location) -> dict[str, Any] | None:
    """The store's manifest, or None when the directory holds no store."""
    if not loc.exists(MANIFEST):
        return None
    try:
        return loc.read_json(MANIFEST)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{loc.path(MANIFEST)}: not valid JSON ({e})") from e


def check_manifest(loc: Location, manifest: dict[str, Any] | None, fmt: str, version: int) -> dict[str, Any]:
    """Refuse a directory that is not a store of format `fmt`, or one written by a newer format version."""
    if manifest is None:
        raise StoreError(f"{loc.url}: not a cdm store (no {MANIFEST})")
    if manifest.get("format") != fmt:
        raise StoreError(f"{loc.url}: holds a {manifest.get('format')!r} store, expected {fmt!r}")
    v = manifest.get("version")
    if not isinstance(v, int) or v > version:
        raise StoreError(
            f"{loc.url}: format version {v} is newer than this cdm understands ({version}); upgrade cdm"
        )
    return manifest


def reconcile_manifest(loc: Location, base: dict[str, Any], max_rounds: int = 20) -> dict[str, Any]:
    """Rebuild manifest.json from `base` + every shard entry file; repeat until what is on disk agrees.

    Several writers may finish shards concurrently; each one reconciles after its own write, so the last
    writer's check sees every entry written before it and the manifest converges to all of them.
    """
    for _ in range(max_rounds):
        entries = {}
        for name in loc.listdir("shards"):
            if name.endswith(".json") and name.startswith("shard-"):
                e = loc.read_json("shards", name)
                entries[int(e["index"])] = e
        current = read_manifest(loc) or {}
        if current.get("key") not in (None, base["key"]):
            raise StoreError(f"{loc.url}: manifest key changed under us ({current.get('key')} != {base['key']})")
        manifest = dict(base)
        manifest["created"] = current.get("created", base.get("created", _now()))
        shards = []
        for i in range(int(base["num_shards"])):
            e = entries.get(i, {"index": i, "state": "pending"})
            shards.append({k: v for k, v in e.items() if k not in DETAIL_KEYS})
        manifest["shards"] = shards
        manifest["complete"] = all(s.get("state") == "complete" for s in shards)
        manifest["totals"] = {
            "sequences": sum(int(s.get("sequences", 0)) for s in shards),
            "tokens": sum(int(s.get("tokens", 0)) for s in shards),
        }
        if current == manifest:
            return manifest
        loc.write_json(manifest, MANIFEST)
        time.sleep(0.01)
        if read_manifest(loc) == manifest and _entries_unchanged(loc, entries):
            return manifest
    raise StoreError(f"{loc.url}: manifest did not converge after {max_rounds} rounds (concurrent writers?)")


def _entries_unchanged(loc: Location, entries: dict[int, Any]) -> bool:
    names = [n for n in loc.listdir("shards") if n.startswith("shard-") and n.endswith(".json")]
    return len(names) == len(entries)


def shard_digest(loc: Location, shard: str, known: dict[str, tuple[str, int]] | None = None) -> tuple[str, dict[str, int]]:
    """sha256 over (relative path, file sha256) of every file of a finished shard, and the file sizes.

    `known`: relative path -> (sha256, size) of files whose content the caller hashed as it wrote them; a listed
    file of that size is not read back (the writer's close needs no second pass over the shard). Readers pass
    nothing and hash what is on disk."""
    known = known or {}
    files = {k: v for k, v in loc.files(shard).items() if not k.startswith(WRITING)}
    h = hashlib.sha256()
    for rel, size in files.items():
        entry = known.get(rel)
        sha = entry[0] if entry is not None and entry[1] == size else loc.sha256(shard, rel)
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha.encode())
        h.update(b"\n")
    return h.hexdigest(), files


def _sha256(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


class _HashingStore(zarr.storage.WrapperStore):  # type: ignore[type-arg]
    """A zarr store that records (sha256, size) of every value it writes under `prefix + key` in `record` (and the
    key in `recent`, so a commit persists only what is new), and forgets deleted keys: what the shard digest needs,
    without reading the shard back. Hashing large values runs in a thread (hashlib releases the GIL), beside the
    compression of the other chunks."""

    def __init__(self, store: Any, record: dict[str, tuple[str, int]], recent: set[str], prefix: str):
        super().__init__(store)
        self._record, self._recent, self._prefix = record, recent, prefix

    def _with_store(self, store: Any) -> "_HashingStore":
        return type(self)(store, self._record, self._recent, self._prefix)

    async def set(self, key: str, value: Any) -> None:
        data = value.as_numpy_array()
        sha = await asyncio.to_thread(_sha256, data) if data.nbytes > 1 << 16 else _sha256(data)
        await self._store.set(key, value)
        self._record[self._prefix + key] = (sha, int(data.nbytes))
        self._recent.add(self._prefix + key)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def _set_many(self, values: Any) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        self._record.pop(self._prefix + key, None)
        self._recent.discard(self._prefix + key)

    async def delete_dir(self, prefix: str) -> None:
        await self._store.delete_dir(prefix)
        self._forget(self._prefix + (prefix.strip("/") + "/" if prefix.strip("/") else ""))

    async def clear(self) -> None:
        await self._store.clear()
        self._forget(self._prefix)

    def _forget(self, full_prefix: str) -> None:
        for k in [k for k in self._record if k.startswith(full_prefix)]:
            del self._record[k]
            self._recent.discard(k)


def _is_chunk(rel: str) -> bool:
    """'tokens/<field>/c/...': a chunk file of a field array (written once, at a fixed size per content)."""
    parts = rel.split("/")
    return len(parts) > 3 and parts[0] == ZARR_GROUP and parts[2] == "c"


# ----------------------------------------------------------------------------------------------- writer


@dataclass
class _State:
    gen: int = 0
    rows_in_zarr: int = 0
    tail_rows: int = 0
    n_sequences: int = 0
    n_tokens: int = 0
    parts: list[str] | None = None
    skipped: list[list[Any]] | None = None
    hash_parts: list[str] | None = None  # _writing/hashes-*.json: sha256 + size of the chunk files of each commit

    def to_json(self) -> dict[str, Any]:
        return {
            "gen": self.gen,
            "rows_in_zarr": self.rows_in_zarr,
            "tail_rows": self.tail_rows,
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens,
            "parts": self.parts or [],
            "skipped": self.skipped or [],
            "hash_parts": self.hash_parts or [],
        }


CONCURRENT_FIELD_WRITES = True  # False: field after field (the baseline of benchmarks/precompute.py --part writer)


def _chunk_pieces(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) cut at multiples of `chunk_rows`: one piece per chunk touched."""
    cuts = [start, *range((start // chunk_rows + 1) * chunk_rows, stop, chunk_rows), stop]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _write_concurrently(writes: dict[str, tuple[zarr.Array, int, np.ndarray]]) -> None:
    """arr[start:start+len(data)] = data for every field at once, growing each array first where needed: one
    event-loop gather, so the fields' metadata and chunks are written concurrently (Blosc releases the GIL; on
    object storage the round trips overlap) instead of field after field. Each chunk is its own write: zarr takes
    a value of exactly one chunk's shape as the chunk itself, where a slab spanning several chunks is copied chunk
    by chunk into fresh fill-value buffers first."""
    from zarr.core.sync import sync

    if not CONCURRENT_FIELD_WRITES:
        for arr, start, data in writes.values():
            if start + len(data) > arr.shape[0]:
                arr.resize((start + len(data), *arr.shape[1:]))
            arr[start : start + len(data)] = data
        return

    async def one_field(arr: zarr.Array, start: int, data: np.ndarray) -> None:
        a = arr._async_array
        if start + len(data) > a.shape[0]:
            await a.resize((start + len(data), *a.shape[1:]))  # metadata first: writes are checked against it
        await asyncio.gather(*(a.setitem(slice(lo, hi), data[lo - start : hi - start])
                               for lo, hi in _chunk_pieces(start, start + len(data), a.chunks[0])))

    async def all_fields() -> None:
        await asyncio.gather(*(one_field(arr, start, data) for arr, start, data in writes.values()))

    sync(all_fields())


class RaggedShardWriter:
    """Writes one shard of a ragged store; resumes after the last commit when reopened.

    `base` is the manifest minus the shard list (format, version, key, num_shards, fields, free sections).
    Each added sequence is a dict of token-level arrays (all with the same number of rows) plus a row dict
    for the Parquet table (its columns are given by `row_schema`; ``n_rows`` is added automatically).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | Location,
        *,
        base: dict[str, Any],
        fields: dict[str, FieldSpec],
        row_schema: pa.Schema,
        shard_index: int = 0,
        chunk_rows: int = 16384,
        commit_rows: int = 65536,
        count_column: str = "n_rows",
        storage_options: dict[str, Any] | None = None,
        key_difference: Callable[[dict[str, Any], dict[str, Any]], str] | None = None,
    ):
        """`key_difference(existing manifest, base)`: what makes a store already at `url` another one, in the
        user's terms, for the refusal message (default: "another teacher, data or settings")."""
        self.count_column = count_column
        self._key_difference = key_difference
        self.loc = url if isinstance(url, Location) else Location(url, storage_options)
        num_shards = int(base["num_shards"])
        if not 0 <= shard_index < num_shards:
            raise StoreError(f"shard index {shard_index} outside 0..{num_shards - 1}")
        self.base = dict(base)
        self.base["fields"] = {k: v.to_json() for k, v in fields.items()}
        self.base["chunk_rows"] = int(chunk_rows)
        self.base = json.loads(json.dumps(self.base))  # compare with what is read back from manifest.json
        self.fields = fields
        for extra in (count_column, "done_key"):
            if extra not in row_schema.names:
                row_schema = row_schema.append(pa.field(extra, pa.int64()))
        self.row_schema = row_schema
        self.shard_index = shard_index
        self.shard = shard_name(shard_index)
        self.chunk_rows = int(chunk_rows)
        self.commit_rows = int(commit_rows)
        self._buf_arrays: dict[str, list[np.ndarray]] = {k: [] for k in fields}
        self._buf_rows: list[dict[str, Any]] = []
        self._buf_skips: list[list[Any]] = []
        self._buf_n = 0
        self._tail: dict[str, np.ndarray] = {}
        self._hashes: dict[str, tuple[str, int]] = {}  # shard-relative path -> (sha256, size) of what was written
        self._unsaved: set[str] = set()  # paths written since the last commit (chunk hashes get persisted then)
        self.complete = False
        self._open()

    # -- set-up and resume

    def _open(self) -> None:
        existing = read_manifest(self.loc)
        if existing is not None:
            check_manifest(self.loc, existing, self.base["format"], self.base["version"])
            if existing.get("key") != self.base["key"]:
                why = (self._key_difference(existing, self.base) if self._key_difference is not None
                       else "another teacher, data or settings")
                raise StoreError(
                    f"{self.loc.url}: holds a store with key {existing.get('key')}, not {self.base['key']} "
                    f"({why}); choose another --out or delete it"
                )
            old_fields = existing.get("fields") or {}
            if layout(old_fields) == layout(self.base["fields"]) and old_fields != self.base["fields"]:
                # same arrays, other compressor settings (an older cdm's defaults): keep the store's own, so
                # every shard of it is written alike and the manifest stays true
                try:
                    self.fields = {n: FieldSpec.from_json(f) for n, f in old_fields.items()}
                except ValueError as e:
                    raise StoreError(f"{self.loc.path(MANIFEST)}: field compressors: {e}") from None
                self.base["fields"] = old_fields
            for name in ("num_shards", "fields", "chunk_rows", "codec", "k", "vocab_size"):
                if name in self.base and existing.get(name) != self.base[name]:
                    hint = (f"; every worker of one store needs the same shard count: run with --num-shards "
                            f"{existing.get(name)} (or another --out)" if name == "num_shards" else "")
                    raise StoreError(
                        f"{self.loc.url}: manifest field {name!r} is {existing.get(name)!r}, this writer needs "
                        f"{self.base[name]!r}{hint}"
                    )
            self.base["created"] = existing.get("created", _now())
        else:
            self.base["created"] = _now()
            self.loc.makedirs()
            reconcile_manifest(self.loc, self.base)
        self.loc.makedirs("shards")
        if self.loc.exists("shards", self.shard + ".json"):
            self.complete = True
            entry = self.loc.read_json("shards", self.shard + ".json")
            self.state = _State(n_sequences=entry["sequences"], n_tokens=entry["tokens"], skipped=entry.get("skipped", []))
            table = pq.read_table(io.BytesIO(self.loc.read_bytes(self.shard, "sequences.parquet")), columns=["done_key"])
            self._done = {int(x) for x in table.column("done_key").to_pylist()}
            self._done.update(int(s[0]) for s in entry.get("skipped", []))
            reconcile_manifest(self.loc, self.base)
            return
        self._lease = ShardLease(self.loc, self.shard, WRITING, owner=self)
        self._lease.acquire()  # before reading the state: another live writer of this shard stops us here
        try:
            if self.loc.exists(self.shard, WRITING, "state.json"):
                st = self.loc.read_json(self.shard, WRITING, "state.json")
                known = set(_State.__dataclass_fields__)
                self.state = _State(**{k: v for k, v in st.items() if k in known})  # newer keys: ignored
            else:
                self.state = _State(parts=[], skipped=[])
            hash_parts = self.state.hash_parts or []
            for raw in self.loc.read_many([(self.shard, WRITING, p) for p in hash_parts], missing_ok=True):
                try:  # chunks committed before a restart: written once, never again
                    self._hashes.update({k: (str(v[0]), int(v[1])) for k, v in json.loads(raw or b"").items()})
                except (ValueError, TypeError, IndexError, AttributeError):
                    pass  # a speed-up only: chunks without a known hash are read back at close
            self._arrays = self._open_arrays()  # truncating to the state below forgets the hashes of dropped chunks
            for name, arr in self._arrays.items():
                if arr.shape[0] != self.state.rows_in_zarr:
                    arr.resize((self.state.rows_in_zarr, *arr.shape[1:]))
            self._tail = self._read_tail()
            self._drop_orphans()
            self._done = set()
            for raw in self.loc.read_many([(self.shard, WRITING, p) for p in self.state.parts or []]):
                t = pq.read_table(io.BytesIO(raw), columns=["done_key"])  # type: ignore[arg-type]
                self._done.update(int(x) for x in t.column("done_key").to_pylist())
            self._done.update(int(s[0]) for s in self.state.skipped or [])
        except BaseException:
            self._lease.forget()  # a failed open gives the shard back at once
            raise

    def _zarr_store(self) -> _HashingStore:
        """The shard's Zarr group store, recording what it writes (see `_HashingStore`)."""
        return _HashingStore(self.loc.zarr_store(self.shard, ZARR_GROUP), self._hashes, self._unsaved, ZARR_GROUP + "/")

    def _open_arrays(self) -> dict[str, zarr.Array]:
        group = zarr.open_group(store=self._zarr_store(), mode="a")
        arrays = {}
        for name, spec in self.fields.items():
            if name in group:
                arr = group[name]
            else:
                arr = group.create_array(
                    name,
                    shape=(0, *spec.tail),
                    chunks=(self.chunk_rows, *spec.tail),
                    dtype=spec.dtype,
                    compressors=list(spec.compressors),
                    fill_value=0,
                )
            # every chunk is stored, even one equal to the fill value: zarr's default compares each chunk with
            # it before writing (a full scan, slower than compressing a uint16 chunk) to skip such chunks
            arrays[name] = arr.with_config({"write_empty_chunks": True})
        return arrays

    def _read_tail(self) -> dict[str, np.ndarray]:
        if self.state.tail_rows == 0:
            return {k: np.zeros((0, *s.tail), dtype=s.dtype) for k, s in self.fields.items()}
        data = np.load(io.BytesIO(self.loc.read_bytes(self.shard, WRITING, f"tail-{self.state.gen}.npz")))
        return {k: data[k] for k in self.fields}

    def _drop_orphans(self) -> None:
        keep = {"state.json", LEASE_FILE, f"tail-{self.state.gen}.npz", *(self.state.parts or []), *(self.state.hash_parts or [])}
        for name in self.loc.listdir(self.shard, WRITING):
            if name not in keep:
                self.loc.remove(self.shard, WRITING, name)

    # -- writing

    @property
    def done_keys(self) -> set[int]:
        """Integer keys (e.g. source row indices) already committed or skipped in this shard."""
        return set(self._done) | {int(r["done_key"]) for r in self._buf_rows} | {int(s[0]) for s in self._buf_skips}

    def add(self, arrays: dict[str, np.ndarray], row: dict[str, Any], done_key: int) -> None:
        if self.complete:
            raise StoreError(f"{self.loc.url}/{self.shard} is complete; it cannot take more sequences")
        where = f"sequence {row.get('seq_id', done_key)}: "
        if set(arrays) != set(self.fields):
            raise StoreError(f"{where}fields {sorted(arrays)} do not match the store's {sorted(self.fields)}")
        n = None
        for name, spec in self.fields.items():
            a = np.asarray(arrays[name])
            try:
                spec.check(name, a, where)
            except ValueError as e:
                raise StoreError(str(e)) from None
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise StoreError(f"{where}field {name!r} has {a.shape[0]} rows, other fields have {n}")
        missing = [f.name for f in self.row_schema if f.name not in (self.count_column, "done_key") and f.name not in row]
        if missing:
            raise StoreError(f"{where}row lacks columns {missing}")
        for name in self.fields:
            self._buf_arrays[name].append(np.ascontiguousarray(arrays[name]))
        self._buf_rows.append({**row, self.count_column: int(n or 0), "done_key": int(done_key)})
        self._buf_n += int(n or 0)
        if self._buf_n >= self.commit_rows:
            self.commit()

    def skip(self, done_key: int, reason: str) -> None:
        self._buf_skips.append([int(done_key), str(reason)])

    def commit(self) -> None:
        """Make everything added so far durable (see the module docstring for the protocol)."""
        if self.complete or (not self._buf_rows and not self._buf_skips):
            return
        self._lease.check()  # a writer that lost the shard to another process writes nothing more
        st = self.state
        rows = {
            k: np.concatenate([self._tail[k], *self._buf_arrays[k]]) if self._buf_arrays[k] else self._tail[k]
            for k in self.fields
        }
        total = next(iter(rows.values())).shape[0] if rows else 0
        n_full = (total // self.chunk_rows) * self.chunk_rows
        if n_full:
            start = st.rows_in_zarr
            _write_concurrently({name: (arr, start, rows[name][:n_full]) for name, arr in self._arrays.items()})
        gen = st.gen + 1
        tail = {k: v[n_full:] for k, v in rows.items()}
        files: dict[str, bytes] = {}  # this commit's side files, written together before the state that names them
        if total - n_full:
            buf = io.BytesIO()
            np.savez(buf, **tail)
            files[f"tail-{gen}.npz"] = buf.getvalue()
        parts = list(st.parts or [])
        if self._buf_rows:
            table = pa.Table.from_pylist(self._buf_rows, schema=self.row_schema)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            part = f"rows-{gen:06d}.parquet"
            files[part] = buf.getvalue()
            parts.append(part)
        hash_parts = list(st.hash_parts or [])
        fresh = {k: self._hashes[k] for k in self._unsaved if _is_chunk(k) and k in self._hashes}
        if fresh:
            name = f"hashes-{gen:06d}.json"
            files[name] = (json.dumps(fresh, indent=1) + "\n").encode("utf-8")
            hash_parts.append(name)
        self.loc.write_many({(self.shard, WRITING, name): data for name, data in files.items()})
        new = _State(
            gen=gen,
            rows_in_zarr=st.rows_in_zarr + n_full,
            tail_rows=total - n_full,
            n_sequences=st.n_sequences + len(self._buf_rows),
            n_tokens=st.n_tokens + sum(r[self.count_column] for r in self._buf_rows),
            parts=parts,
            skipped=list(st.skipped or []) + self._buf_skips,
            hash_parts=hash_parts,
        )
        self.loc.write_json(new.to_json(), self.shard, WRITING, "state.json")
        self._unsaved.clear()
        self._done |= {int(r["done_key"]) for r in self._buf_rows} | {int(s[0]) for s in self._buf_skips}
        old_tail = f"tail-{st.gen}.npz"
        self.state, self._tail = new, tail
        self._buf_arrays = {k: [] for k in self.fields}
        self._buf_rows, self._buf_skips, self._buf_n = [], [], 0
        self.loc.remove(self.shard, WRITING, old_tail)  # absent when the last commit left no tail

    def close(
        self,
        extra_entry: dict[str, Any] | None = None,
        entry_from_rows: Callable[[pa.Table], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Finish the shard: flush the tail, write seq_offsets and sequences.parquet, digest, publish.

        `entry_from_rows`: computes more entry fields from the shard's whole row table (every sequence of the
        shard, including those committed by an earlier, interrupted writer), e.g. summed per-sequence statistics."""
        if self.complete:
            return reconcile_manifest(self.loc, self.base)
        self.commit()
        self._lease.check()
        st = self.state
        if st.tail_rows:
            _write_concurrently({name: (arr, st.rows_in_zarr, self._tail[name]) for name, arr in self._arrays.items()})
        tables = [pq.read_table(io.BytesIO(raw))  # type: ignore[arg-type]
                  for raw in self.loc.read_many([(self.shard, WRITING, p) for p in st.parts or []])]
        # parts written by an older cdm may lack newer (nullable) columns: promote, then order as the schema says
        table = pa.concat_tables(tables, promote_options="default") if tables else self.row_schema.empty_table()
        if table.schema != self.row_schema and set(self.row_schema.names) <= set(table.column_names):
            table = table.select(self.row_schema.names).cast(self.row_schema)
        offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
        np.cumsum(np.asarray(table.column(self.count_column).to_numpy(zero_copy_only=False), dtype=np.int64), out=offsets[1:])
        if offsets[-1] != st.rows_in_zarr + st.tail_rows:
            raise StoreError(
                f"{self.loc.url}/{self.shard}: row table counts {offsets[-1]} rows but the arrays hold "
                f"{st.rows_in_zarr + st.tail_rows}; the shard is inconsistent, delete it and rerun"
            )
        group = zarr.open_group(store=self._zarr_store(), mode="a")
        if "seq_offsets" in group:
            del group["seq_offsets"]
        group.create_array(
            "seq_offsets", data=offsets, chunks=(max(1, min(len(offsets), 1 << 20)),), compressors=[zarr.codecs.ZstdCodec(level=3)]
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self.loc.write_bytes(data, self.shard, "sequences.parquet")
        self._hashes["sequences.parquet"] = (hashlib.sha256(data).hexdigest(), len(data))
        digest, files = shard_digest(self.loc, self.shard, known=self._hashes)
        skipped: dict[str, int] = {}
        for _, reason in st.skipped or []:
            skipped[reason] = skipped.get(reason, 0) + 1
        entry = {
            "index": self.shard_index,
            "path": self.shard,
            "state": "complete",
            "sequences": int(table.num_rows),
            "tokens": int(offsets[-1]),
            "bytes": int(sum(files.values())),
            "digest": digest,
            "files": files,
            "skipped": st.skipped or [],
            "skipped_by_reason": skipped,
            "finished": _now(),
            **(entry_from_rows(table) if entry_from_rows is not None else {}),
            **(extra_entry or {}),
        }
        self.loc.write_json(entry, "shards", self.shard + ".json")
        manifest = reconcile_manifest(self.loc, self.base)
        self._lease.release()  # the heartbeat must not recreate _writing/ after it is removed
        self.loc.remove(self.shard, WRITING, recursive=True)
        self.complete = True
        return manifest

    def release(self) -> None:
        """Give the shard up without closing it (what was committed stays): another process may open it at once,
        e.g. the writer child of `--writer process`. A complete shard has nothing to give up."""
        if not self.complete:
            self._lease.forget()

    def stats(self) -> dict[str, Any]:
        return {"sequences": self.state.n_sequences, "tokens": self.state.n_tokens, "skipped": len(self.state.skipped or [])}


# ----------------------------------------------------------------------------------------------- reader


class RaggedStoreReader:
    """Random access to the complete shards of a ragged store; reopens its handles in forked workers."""

    def __init__(
        self,
        url: str | os.PathLike[str] | Location,
        *,
        fmt: str,
        version: int,
        check: str = "sizes",
        allow_incomplete: bool = False,
        storage_options: dict[str, Any] | None = None,
    ):
        self.loc = url if isinstance(url, Location) else Location(url, storage_options)
        self.manifest = check_manifest(self.loc, read_manifest(self.loc), fmt, version)
        if not self.manifest.get("complete") and not allow_incomplete:
            done = sum(s.get("state") == "complete" for s in self.manifest["shards"])
            raise StoreError(
                f"{self.loc.url}: store is incomplete ({done}/{len(self.manifest['shards'])} shards complete); "
                "finish writing it first: rerun the command that writes it (from Python, TeacherStore(url, "
                "allow_incomplete=True) or MapStore(url, allow_incomplete=True) read its complete shards only)"
            )
        self.shards = [s for s in self.manifest["shards"] if s.get("state") == "complete"]
        self.field_names = list(self.manifest["fields"])
        if check in ("sizes", "digest"):
            for s in self.shards:
                self._check_shard(s, deep=(check == "digest"))
        counts = np.array([int(s["sequences"]) for s in self.shards], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self._pid = -1
        self._handles: dict[int, dict[str, zarr.Array]] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._tables: dict[int, pa.Table] = {}

    def _check_shard(self, entry: dict[str, Any], deep: bool) -> None:
        name = entry["path"]
        if deep:
            digest, files = shard_digest(self.loc, name)
        else:
            files = {k: v for k, v in self.loc.files(name).items() if not k.startswith(WRITING)}
            digest = entry["digest"]
        detail = self.loc.read_json("shards", name + ".json")
        expected = detail.get("files", {})
        if files != expected:
            missing = sorted(set(expected) - set(files))
            extra = sorted(set(files) - set(expected))
            changed = sorted(k for k in set(files) & set(expected) if files[k] != expected[k])
            raise StoreError(
                f"{self.loc.path(name)}: shard files differ from the manifest "
                f"(missing {missing[:5]}, unexpected {extra[:5]}, size changed {changed[:5]}); the shard is corrupt"
            )
        if digest != entry["digest"]:
            raise StoreError(f"{self.loc.path(name)}: shard digest {digest[:16]}… != manifest {entry['digest'][:16]}…; the shard is corrupt")

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global sequence index -> (shard position in self.shards, local index)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range (store has {len(self)})")
        s = int(np.searchsorted(self._shard_starts, i, side="right") - 1)
        return s, i - int(self._shard_starts[s])

    def _arrays(self, s: int) -> dict[str, zarr.Array]:
        if self._pid != os.getpid():  # fresh handles after fork (DataLoader workers)
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            path = self.shards[s]["path"]
            try:
                group = zarr.open_group(store=self.loc.zarr_store(path, ZARR_GROUP, read_only=True), mode="r")
                self._handles[s] = {name: group[name] for name in [*self.field_names, "seq_offsets"]}
            except (ValueError, KeyError, OSError) as e:  # e.g. a damaged zarr.json of the same size
                raise StoreError(f"{self.loc.url}: cannot open the arrays of {path} ({type(e).__name__}: "
                                 f"{str(e)[:200]}); the shard is damaged: run cdm verify {self.loc.url}") from e
        return self._handles[s]

    def offsets(self, s: int) -> np.ndarray:
        if s not in self._offsets:
            self._offsets[s] = np.asarray(self._arrays(s)["seq_offsets"][:])
        return self._offsets[s]

    def table(self, s: int) -> pa.Table:
        if s not in self._tables:
            data = self.loc.read_bytes(self.shards[s]["path"], "sequences.parquet")
            self._tables[s] = pq.read_table(io.BytesIO(data))
        return self._tables[s]

    def row(self, i: int) -> dict[str, Any]:
        s, j = self.locate(i)
        return {k: v[0] for k, v in self.table(s).slice(j, 1).to_pydict().items()}

    def arrays(self, i: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        s, j = self.locate(i)
        off = self.offsets(s)
        return self.fields_rows(s, list(names or self.field_names), int(off[j]), int(off[j + 1]))

    def fields_rows(self, s: int, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of several fields of shard `s`, read in one concurrent gather (the fields' chunks are
        fetched and decompressed together: one round trip on object storage instead of one per field)."""
        from zarr.core.sync import sync

        handles = self._arrays(s)

        async def all_fields() -> list[Any]:
            return await asyncio.gather(*(handles[n]._async_array.getitem(slice(start, stop)) for n in names))

        return {n: np.asarray(v) for n, v in zip(names, sync(all_fields()))}

    def n_rows(self, i: int) -> int:
        """Token rows of sequence i."""
        s, j = self.locate(i)
        off = self.offsets(s)
        return int(off[j + 1] - off[j])

    def runs(self, indices: Iterable[int], max_run: int = 256, max_rows: int = 32768) -> Iterator[tuple[int, int]]:
        """[start, stop) ranges covering `indices` in order: consecutive indices join a run of up to `max_run`
        sequences and about `max_rows` token rows (what one `read_range` holds in memory)."""
        start, stop, rows = None, None, 0
        for i in indices:
            i = int(i)
            if start is not None and (i != stop or stop - start >= max_run or rows >= max_rows):
                yield start, stop
                start = None
            if start is None:
                start, rows = i, 0
            stop = i + 1
            rows += self.n_rows(i)
        if start is not None:
            yield start, stop

    def read_range(self, start: int, stop: int, names: list[str] | None = None,
                   columns: list[str] | None = None) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """Sequences [start, stop) as (arrays, row) pairs, reading each field once per shard crossed: a chunk is
        fetched and decompressed once for all the sequences in it, not once per sequence. The arrays of one range
        are views into shared buffers."""
        names = list(names or self.field_names)
        out: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []
        i = start
        while i < stop:
            s, j = self.locate(i)
            table = self.table(s)
            j_end = min(table.num_rows, j + (stop - i))
            off = self.offsets(s)
            a, b = int(off[j]), int(off[j_end])
            arrays = self.fields_rows(s, names, a, b)
            part = table.slice(j, j_end - j)
            rows = (part.select(columns) if columns is not None else part).to_pylist()
            for q in range(j, j_end):
                lo, hi = int(off[q]) - a, int(off[q + 1]) - a
                out.append(({n: arrays[n][lo:hi] for n in names}, rows[q - j]))
            i += j_end - j
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, -1
        return d


def bytes_on_disk(manifest: dict[str, Any]) -> int:
    return int(sum(int(s.get("bytes", 0)) for s in manifest.get("shards", [])))


def safe_ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


SequenceT = TypeVar("SequenceT")


class StoreView(Generic[SequenceT]):
    """What every store reader shares over its RaggedStoreReader `_r`: location, identity, completeness, length and
    indexing (an int, negative ones too, or a slice -> a list); subclasses say how one sequence is built (`_get`)."""

    _r: RaggedStoreReader
    manifest: dict[str, Any]

    @staticmethod
    def exists(url: str | os.PathLike[str]) -> bool:
        return read_manifest(Location(url)) is not None

    @property
    def url(self) -> str:
        return self._r.loc.url

    @property
    def key(self) -> str:
        """The store's identity: the hash of everything that decided its content (see the manifest)."""
        return str(self.manifest["key"])

    @property
    def is_complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def reader(self) -> RaggedStoreReader:
        return self._r

    def __len__(self) -> int:
        return len(self._r)

    @overload
    def __getitem__(self, i: int) -> SequenceT: ...

    @overload
    def __getitem__(self, i: slice) -> list[SequenceT]: ...

    def __getitem__(self, i: int | slice) -> SequenceT | list[SequenceT]:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        return self._get(i)

    def _get(self, i: int) -> SequenceT:
        raise NotImplementedError
