"""The map store (format v1): everything `cdm train` needs to use one teacher store with one student tokenizer.

Per teacher-store sequence (same order, one map shard per teacher shard) it holds the student tokenisation of
the canonical text and, per student position j, the aligned teacher row (or -1): student logits at j and
teacher row ``teacher_row[j]`` condition on the same text and predict the same continuation. Per store it
holds the vocabulary maps (exact, fuzzy CSR, MinED) in ``vocab/`` so training never calls a tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import zarr

from cdm.mapping.vocab_maps import Neighbours, pair_keys
from cdm.storage.fields import FieldSpec, blosc_zstd
from cdm.storage.fs import Location
from cdm.storage.ragged import RaggedShardWriter, RaggedStoreReader, StoreError, read_manifest

FORMAT = "cdm-map-store"
VERSION = 1

#: alignment kinds stored per student position (the kind of the group whose last tokens are paired)
KIND_UNALIGNED, KIND_1_1, KIND_1_N, KIND_N_1, KIND_N_M = 0, 1, 2, 3, 4
KIND_NAMES = {0: "unaligned", 1: "1-1", 2: "1-n", 3: "n-1", 4: "n-m"}

FIELDS = {
    "student_ids": FieldSpec("int32", (), (blosc_zstd(),)),
    "student_spans": FieldSpec("int32", (2,), (blosc_zstd(),)),
    "teacher_row": FieldSpec("int32", (), (blosc_zstd(),)),
    "align_kind": FieldSpec("int8", (), (blosc_zstd(),)),
    "loss_mask": FieldSpec("bool", (), (blosc_zstd(),)),
}

ROW_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.string()),
        pa.field("teacher_index", pa.int64()),  # global index of the sequence in the teacher store
        pa.field("text_sha256", pa.string()),  # must equal the teacher store's row
        pa.field("n_teacher_tokens", pa.int64()),
        pa.field("n_aligned", pa.int64()),
        pa.field("n_response_positions", pa.int64()),
    ]
)


@dataclass
class MapSequence:
    """Student view of one teacher sequence.

    ``loss_mask[j]`` is True when student token j lies in a trained (response) span, so the CE label at
    position j-1 is ``student_ids[j]`` when ``loss_mask[j]``. ``teacher_row[j] >= 0`` marks a KD row.
    """

    seq_id: str
    teacher_index: int
    text_sha256: str
    student_ids: np.ndarray  # int32 [m]
    student_spans: np.ndarray  # int32 [m, 2]
    teacher_row: np.ndarray  # int32 [m], -1 = unaligned
    align_kind: np.ndarray  # int8 [m]
    loss_mask: np.ndarray  # bool [m]
    n_teacher_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class CSR(Neighbours):
    """Sparse rows as stored in a map store (the fuzzy neighbour tables): row r owns
    ``indices[indptr[r]:indptr[r+1]]`` and the same slice of ``dist``."""

    def pair_keys(self, v_dst: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted int64 keys ``src * v_dst + dst`` with their distances, for searchsorted lookups at train time."""
        return pair_keys(self, v_dst)


@dataclass
class VocabMaps:
    """Vocabulary maps between one teacher and one student tokenizer (ids; -1 = unmapped, never 0)."""

    teacher_vocab_size: int
    student_vocab_size: int
    em_t2s: np.ndarray  # int32 [Vt]
    em_s2t: np.ndarray  # int32 [Vs]
    fuzzy_t2s: CSR
    fuzzy_s2t: CSR
    mined_t2s: np.ndarray  # int32 [Vt]
    mined_s2t: np.ndarray  # int32 [Vs]
    theta: float
    info: dict[str, Any] = field(default_factory=dict)

    ARRAYS = ("em_t2s", "em_s2t", "mined_t2s", "mined_s2t")

    def save(self, loc: Location, *parts: str) -> None:
        group = zarr.open_group(store=loc.zarr_store(*parts), mode="w")
        for name in self.ARRAYS:
            a = np.asarray(getattr(self, name), dtype=np.int32)
            group.create_array(name, data=a, chunks=(max(1, len(a)),), compressors=[blosc_zstd()])
        for name in ("fuzzy_t2s", "fuzzy_s2t"):
            csr: CSR = getattr(self, name)
            for part, dtype in (("indptr", np.int64), ("indices", np.int32), ("dist", np.float32)):
                a = np.asarray(getattr(csr, part), dtype=dtype)
                group.create_array(f"{name}_{part}", data=a, chunks=(max(1, len(a)),), compressors=[blosc_zstd()])
        group.attrs.update(
            {
                "teacher_vocab_size": int(self.teacher_vocab_size),
                "student_vocab_size": int(self.student_vocab_size),
                "theta": float(self.theta),
                "info": self.info,
            }
        )

    @classmethod
    def load(cls, loc: Location, *parts: str) -> "VocabMaps":
        group = zarr.open_group(store=loc.zarr_store(*parts, read_only=True), mode="r")
        a = {name: np.asarray(group[name][:]) for name in cls.ARRAYS}
        csrs = {
            name: CSR(*(np.asarray(group[f"{name}_{p}"][:]) for p in ("indptr", "indices", "dist")))
            for name in ("fuzzy_t2s", "fuzzy_s2t")
        }
        at = dict(group.attrs)
        return cls(
            teacher_vocab_size=int(at["teacher_vocab_size"]),
            student_vocab_size=int(at["student_vocab_size"]),
            theta=float(at["theta"]),
            info=dict(at.get("info", {})),
            **a,
            **csrs,
        )


class MapStoreWriter:
    """Writes one shard of a map store (shard i maps teacher shard i); resumable like the teacher store."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        key: str,
        manifest: dict[str, Any],
        num_shards: int = 1,
        shard_index: int = 0,
        commit_tokens: int = 65536,
        chunk_rows: int = 65536,
        storage_options: dict[str, Any] | None = None,
    ):
        base = {"format": FORMAT, "version": VERSION, "key": key, "num_shards": int(num_shards), **manifest}
        self._w = RaggedShardWriter(
            url, base=base, fields=FIELDS, row_schema=ROW_SCHEMA, shard_index=shard_index,
            chunk_rows=chunk_rows, commit_rows=commit_tokens, count_column="n_student_tokens",
            storage_options=storage_options,
        )

    @property
    def loc(self) -> Location:
        return self._w.loc

    @property
    def complete(self) -> bool:
        return self._w.complete

    @property
    def done_teacher_indices(self) -> set[int]:
        return self._w.done_keys

    def add(self, seq: MapSequence) -> None:
        m = int(np.asarray(seq.student_ids).shape[0])
        arrays = {
            "student_ids": np.asarray(seq.student_ids, dtype=np.int32),
            "student_spans": np.asarray(seq.student_spans, dtype=np.int32).reshape(m, 2),
            "teacher_row": np.asarray(seq.teacher_row, dtype=np.int32),
            "align_kind": np.asarray(seq.align_kind, dtype=np.int8),
            "loss_mask": np.asarray(seq.loss_mask, dtype=bool),
        }
        tr = arrays["teacher_row"]
        if tr.size and (tr.max() >= seq.n_teacher_tokens or tr.min() < -1):
            raise StoreError(f"sequence {seq.seq_id}: teacher_row outside [-1, {seq.n_teacher_tokens})")
        row = {
            "seq_id": seq.seq_id,
            "teacher_index": int(seq.teacher_index),
            "text_sha256": seq.text_sha256,
            "n_teacher_tokens": int(seq.n_teacher_tokens),
            "n_aligned": int((tr >= 0).sum()),
            "n_response_positions": int(np.asarray(seq.loss_mask).sum()),
        }
        self._w.add(arrays, row, done_key=int(seq.teacher_index))

    def skip(self, teacher_index: int, reason: str) -> None:
        self._w.skip(teacher_index, reason)

    def commit(self) -> None:
        self._w.commit()

    def close(self, extra_entry: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._w.close(extra_entry)


class MapStore:
    """Reads a map store: ``len``, ``store[i]`` -> MapSequence, ``vocab`` -> VocabMaps, provenance checks."""

    def __init__(self, url: str | os.PathLike[str], *, check: str = "sizes", storage_options: dict[str, Any] | None = None):
        self._r = RaggedStoreReader(url, fmt=FORMAT, version=VERSION, check=check, storage_options=storage_options)
        self.manifest = self._r.manifest
        self._vocab: VocabMaps | None = None

    @staticmethod
    def exists(url: str | os.PathLike[str]) -> bool:
        return read_manifest(Location(url)) is not None

    @property
    def url(self) -> str:
        return self._r.loc.url

    @property
    def vocab(self) -> VocabMaps:
        if self._vocab is None:
            self._vocab = VocabMaps.load(self._r.loc, "vocab")
        return self._vocab

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: int) -> MapSequence:
        return self._sequence(self._r.row(i), self._r.arrays(i))

    @staticmethod
    def _sequence(row: dict[str, Any], arrays: dict[str, Any]) -> MapSequence:
        return MapSequence(
            seq_id=row["seq_id"],
            teacher_index=int(row["teacher_index"]),
            text_sha256=row["text_sha256"],
            n_teacher_tokens=int(row["n_teacher_tokens"]),
            **arrays,
        )

    def __iter__(self) -> Iterator[MapSequence]:
        for a, b in self._r.runs(range(len(self))):  # ranges: a chunk is decompressed once, not once per sequence
            for arrays, row in self._r.read_range(a, b):
                yield self._sequence(row, {k: v.copy() for k, v in arrays.items()})  # not views pinning the range

    def check_pair(self, teacher_manifest: dict[str, Any], student_tokenizer_hash: str | None = None) -> None:
        """Refuse a map that was built from another teacher store or for another student tokenizer."""
        want = self.manifest.get("teacher_store", {}).get("key")
        if want != teacher_manifest.get("key"):
            raise StoreError(
                f"{self.url}: this map was built from teacher store {want}, not {teacher_manifest.get('key')}; "
                "rebuild it with `cdm build-map --store <that store>`"
            )
        have = self.manifest.get("student", {}).get("tokenizer_hash")
        if student_tokenizer_hash is not None and have != student_tokenizer_hash:
            raise StoreError(
                f"{self.url}: this map was built for student tokenizer {have[:12] if have else None}…, "
                f"the student's tokenizer hashes to {student_tokenizer_hash[:12]}…; rebuild the map"
            )

    @property
    def reader(self) -> RaggedStoreReader:
        return self._r
