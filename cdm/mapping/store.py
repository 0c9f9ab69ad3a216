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
from cdm.storage.ragged import RaggedShardWriter, RaggedStoreReader, StoreError, StoreView

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

_ROW_FIELDS = [
    pa.field("seq_id", pa.string()),
    pa.field("teacher_index", pa.int64()),  # global index of the sequence in the teacher store
    pa.field("text_sha256", pa.string()),  # must equal the teacher store's row
    pa.field("n_teacher_tokens", pa.int64()),
    pa.field("n_aligned", pa.int64()),
    pa.field("n_response_positions", pa.int64()),
]

#: Each sequence's share of report.json, kept in its row of sequences.parquet (null where a build did not compute
#: it): the report is then a sum over the Parquet tables (see `report_totals`), for a resumed build too, instead
#: of a second pass over both stores. The kind counts are per `KIND_NAMES`; the masses are teacher top-k
#: probability mass on the aligned rows, split by how the top-k ids map to the student (exact / fuzzy / none).
DIAG_KINDS = {name: f"diag_kind_{name.replace('-', '_')}" for name in KIND_NAMES.values()}
DIAG_MASSES = {name: f"diag_{name}" for name in ("mass_total", "mass_exact", "mass_fuzzy", "mass_none", "tail_mass")}
ROW_SCHEMA = pa.schema(
    [*_ROW_FIELDS, *(pa.field(c, pa.int64()) for c in DIAG_KINDS.values()), *(pa.field(c, pa.float64()) for c in DIAG_MASSES.values())]
)


def _sequential_sum(values: list[float]) -> float:
    """Left-to-right float sum: the order a running total over the sequences would add them in."""
    acc = 0.0
    for v in values:
        acc += v
    return acc


def report_totals(table: pa.Table) -> dict[str, Any] | None:
    """Unrounded, summable report totals of the sequences in a map shard's row table (`cdm.mapping.build.Diagnostics`
    fields), or None when some row lacks its diagnostics (a shard written by an older cdm)."""
    cols = [*DIAG_KINDS.values(), *DIAG_MASSES.values()]
    if table.num_rows and any(c not in table.column_names or table.column(c).null_count for c in cols):
        return None

    def ints(c: str) -> int:
        return int(np.asarray(table.column(c).to_numpy(), dtype=np.int64).sum()) if table.num_rows else 0

    return {
        "sequences": int(table.num_rows),
        "student_tokens": ints("n_student_tokens"),
        "response_positions": ints("n_response_positions"),
        "aligned": ints("n_aligned"),
        "kinds": {name: ints(c) for name, c in DIAG_KINDS.items()},
        **{name: _sequential_sum(table.column(c).to_pylist()) if table.num_rows else 0.0 for name, c in DIAG_MASSES.items()},
    }


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
            storage_options=storage_options, key_difference=lambda old, new: "a map " + map_difference(old, new),
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
        diag = seq.extra.get("diagnostics") or {}
        row.update({c: diag.get(c) for c in (*DIAG_KINDS.values(), *DIAG_MASSES.values())})
        self._w.add(arrays, row, done_key=int(seq.teacher_index))

    def skip(self, teacher_index: int, reason: str) -> None:
        self._w.skip(teacher_index, reason)

    def commit(self) -> None:
        self._w.commit()

    def release(self) -> None:
        """Give the shard up without closing it (what was committed stays), so another process may open it now."""
        self._w.release()

    def close(self, extra_entry: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the shard; its entry gets ``report_totals`` (`report_totals` of all its sequences, including
        those committed by an interrupted earlier run), so the final report needs no pass over the stores."""
        return self._w.close(extra_entry, entry_from_rows=lambda table: {"report_totals": report_totals(table)})


def _short(h: Any) -> str:
    return f"{h[:12]}…" if isinstance(h, str) and len(h) > 12 else str(h)


def map_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What makes the map store of manifest `old` another map than the one `new` describes, in the user's terms:
    the teacher store, the student tokenizer (hash or roles) and/or the build settings, e.g.
    ``for student tokenizer /a/tok (hash 697aa8769879…), not /b/tok (hash 1d2c…)``."""
    parts = []
    ot, nt = old.get("teacher_store") or {}, new.get("teacher_store") or {}
    if ot.get("key") != nt.get("key"):
        parts.append(f"of teacher store {_short(ot.get('key'))} ({ot.get('url')}), not {_short(nt.get('key'))} ({nt.get('url')})")
    os_, ns = old.get("student") or {}, new.get("student") or {}
    if os_.get("tokenizer_hash") != ns.get("tokenizer_hash") or os_.get("roles") != ns.get("roles"):
        what = "hash" if os_.get("tokenizer_hash") != ns.get("tokenizer_hash") else "special-token roles"
        o_id = _short(os_.get("tokenizer_hash")) if what == "hash" else os_.get("roles")
        n_id = _short(ns.get("tokenizer_hash")) if what == "hash" else ns.get("roles")
        parts.append(f"for student tokenizer {os_.get('tokenizer')} ({what} {o_id}), not {ns.get('tokenizer')} ({what} {n_id})")
    settings = (("--align", (old.get("alignment") or {}).get("mode"), (new.get("alignment") or {}).get("mode")),
                ("--theta", old.get("theta"), new.get("theta")),
                ("--space-insensitive", old.get("space_insensitive"), new.get("space_insensitive")))
    changed = [f"{flag} {o} (this build: {n})" for flag, o, n in settings if o != n]
    if changed:
        parts.append("built with " + ", ".join(changed))
    if not parts:
        return "built by another cdm version or with other settings"
    return "; ".join(parts)


class MapStore(StoreView[MapSequence]):
    """Reads a map store: ``len``, ``store[i]`` (or a slice) -> MapSequence, ``vocab`` -> VocabMaps, lookups by
    teacher sequence (`position_of`), provenance checks."""

    def __init__(self, url: str | os.PathLike[str], *, check: str = "sizes", allow_incomplete: bool = False,
                 storage_options: dict[str, Any] | None = None):
        self._r = RaggedStoreReader(url, fmt=FORMAT, version=VERSION, check=check, allow_incomplete=allow_incomplete,
                                    storage_options=storage_options)
        self.manifest = self._r.manifest
        self._vocab: VocabMaps | None = None
        self._teacher_index: np.ndarray | None = None

    @property
    def report(self) -> dict[str, Any] | None:
        """`report.json` of the build (coverage, group counts, mapped top-k mass); None while it is unfinished."""
        try:
            return self._r.loc.read_json("report.json")
        except (OSError, ValueError):
            return None

    @property
    def teacher_indices(self) -> np.ndarray:
        """int64 [len(self)]: the teacher store index of each map sequence (they differ once build-map skipped a
        sequence); read from the sequence tables only."""
        if self._teacher_index is None:
            parts = [np.asarray(self._r.table(s).column("teacher_index").to_numpy(), dtype=np.int64)
                     for s in range(len(self._r.shards))]
            self._teacher_index = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._teacher_index

    def position_of(self, teacher_index: int) -> int:
        """The map sequence index of teacher sequence `teacher_index`; KeyError when build-map skipped it."""
        hits = np.flatnonzero(self.teacher_indices == int(teacher_index))
        if not hits.size:
            raise KeyError(f"{self.url}: teacher sequence {teacher_index} has no map sequence (skipped by build-map; "
                           "see report.json)")
        return int(hits[0])

    @property
    def vocab(self) -> VocabMaps:
        if self._vocab is None:
            self._vocab = VocabMaps.load(self._r.loc, "vocab")
        return self._vocab

    def _get(self, i: int) -> MapSequence:
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

