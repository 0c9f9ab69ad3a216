"""The teacher store (format v1): what the teacher said about every token, written once, read by any student.

Row convention: row r of the token arrays of a sequence is the teacher's distribution **for the token after
token r** (HF logits convention). The last row of a sequence therefore predicts what follows its text.
Top-k rows are in rank order (descending log-probability); values are full-vocabulary log-probabilities at
temperature 1, so the tail mass ``1 - sum(exp(topk_logprobs))`` is exact, and raw logits are
``topk_logprobs + logsumexp``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from cdm.storage.fields import FieldSpec, blosc_zstd
from cdm.storage.fs import Location
from cdm.storage.ragged import (
    RaggedShardWriter,
    RaggedStoreReader,
    StoreError,
    StoreView,
    bytes_on_disk,
    read_manifest,
)
from cdm.storage.topk_codec import TopKCodec, from_description, get_codec, ids_in_range

FORMAT = "cdm-teacher-store"
TOKENIZER_FILE = "tokenizer.json"  # the teacher's tokenizer, so build-map needs no teacher model
VERSION = 1

ROW_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("response_char_start", pa.int64()),
        pa.field("response_spans", pa.list_(pa.int32())),  # flattened [start0, end0, start1, end1, ...]
        pa.field("truncated", pa.bool_()),
        pa.field("source_index", pa.int64()),
        pa.field("text_sha256", pa.string()),
    ]
)


def base_fields() -> dict[str, FieldSpec]:
    """Token-level arrays other than the top-k pair (whose layout the codec decides)."""
    return {
        "token_ids": FieldSpec("int32", (), (blosc_zstd(),)),
        "char_spans": FieldSpec("int32", (2,), (blosc_zstd(),)),
        "logsumexp": FieldSpec("float32", (), (blosc_zstd(),)),
        "entropy": FieldSpec("float32", (), (blosc_zstd(),)),
    }


@dataclass
class TeacherSequence:
    """One sequence as the teacher saw it: canonical text, tokens, offsets and the sparse next-token targets."""

    seq_id: str
    text: str
    response_spans: np.ndarray  # int32 [R, 2] character spans that are trained on
    source_index: int
    truncated: bool
    token_ids: np.ndarray  # int32 [n]
    char_spans: np.ndarray  # int32 [n, 2]
    topk_ids: np.ndarray  # int32 [n, K]
    topk_logprobs: np.ndarray  # float32 [n, K], descending
    logsumexp: np.ndarray  # float32 [n]
    entropy: np.ndarray  # float32 [n]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def response_char_start(self) -> int:
        """Where the trained part begins; -1 when the whole text is trained on."""
        spans = np.asarray(self.response_spans).reshape(-1, 2)
        if len(spans) == 0:
            return len(self.text)
        if len(spans) == 1 and spans[0, 0] == 0 and spans[0, 1] == len(self.text):
            return -1
        return int(spans[0, 0])

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _as(a: Any, dtype: str, name: str, seq: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.dtype(dtype):
        if dtype.startswith("int") and not np.issubdtype(arr.dtype, np.integer):
            raise StoreError(f"sequence {seq}: field {name!r} must be integer, got {arr.dtype}")
        arr = arr.astype(dtype)
    return arr


def skip_summary(skipped: Iterable[Any], examples: int = 5) -> tuple[dict[str, int], dict[str, list[int]]]:
    """A shard's skipped (source index, reason) pairs as counts per reason and the first few source rows of each
    (for reports)."""
    counts: dict[str, int] = {}
    rows: dict[str, list[int]] = {}
    for index, reason in skipped:
        reason = str(reason)
        counts[reason] = counts.get(reason, 0) + 1
        if len(rows.setdefault(reason, [])) < examples:
            rows[reason].append(int(index))
    return counts, {r: sorted(v) for r, v in rows.items()}


class TeacherStoreWriter:
    """Writes one shard of a teacher store; reopening an unfinished shard resumes after its last commit."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        key: str,
        manifest: dict[str, Any],
        k: int,
        vocab_size: int,
        num_shards: int = 1,
        shard_index: int = 0,
        codec: str | TopKCodec = "lossless",
        codec_params: dict[str, Any] | None = None,
        commit_tokens: int = 65536,
        chunk_rows: int = 16384,
        storage_options: dict[str, Any] | None = None,
        tokenizer_json: str | None = None,
    ):
        """`tokenizer_json`: the teacher tokenizer's JSON, kept at the store root as ``tokenizer.json`` so that
        `build-map` can canonicalise the teacher vocabulary without the teacher model."""
        self.k = int(k)
        self.vocab_size = int(vocab_size)
        self.codec = get_codec(codec, **(codec_params or {})) if isinstance(codec, str) else codec
        fields = {**base_fields(), **self.codec.fields(self.k)}
        base = {
            "format": FORMAT,
            "version": VERSION,
            "key": key,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "codec": self.codec.describe(),
            "row_convention": "row r = teacher distribution of the token after token r",
            "values": "top-k full-vocabulary log-probabilities at temperature 1, rank order (descending)",
            "num_shards": int(num_shards),
            **{s: manifest.get(s, {}) for s in ("teacher", "capture", "data")},
            **{k2: v for k2, v in manifest.items() if k2 not in ("teacher", "capture", "data")},
        }
        self._w = RaggedShardWriter(
            url,
            base=base,
            fields=fields,
            row_schema=ROW_SCHEMA,
            shard_index=shard_index,
            chunk_rows=chunk_rows,
            commit_rows=commit_tokens,
            count_column="n_tokens",
            storage_options=storage_options,
        )
        self._truncated = 0
        self._skips: dict[str, int] = {}
        if tokenizer_json is not None and not self._w.loc.exists(TOKENIZER_FILE):
            self._w.loc.write_bytes(tokenizer_json.encode("utf-8"), TOKENIZER_FILE)

    @property
    def url(self) -> str:
        return self._w.loc.url

    @property
    def complete(self) -> bool:
        return self._w.complete

    @property
    def done_source_indices(self) -> set[int]:
        return self._w.done_keys

    def add(self, seq: TeacherSequence) -> None:
        """Validate one sequence against the store (K, vocab, shapes, values) and buffer it."""
        sid = seq.seq_id
        n = int(np.asarray(seq.token_ids).shape[0])
        ids = _as(seq.token_ids, "int32", "token_ids", sid)
        spans = _as(seq.char_spans, "int32", "char_spans", sid).reshape(n, 2) if n else np.zeros((0, 2), np.int32)
        topk_ids = _as(seq.topk_ids, "int32", "topk_ids", sid)
        lps = _as(seq.topk_logprobs, "float32", "topk_logprobs", sid)
        if topk_ids.shape != (n, self.k) or lps.shape != (n, self.k):
            raise StoreError(
                f"sequence {sid}: top-k arrays have shapes {topk_ids.shape} / {lps.shape}, the store expects "
                f"({n}, {self.k}) (k={self.k})"
            )
        lse = _as(seq.logsumexp, "float32", "logsumexp", sid)
        ent = _as(seq.entropy, "float32", "entropy", sid)
        if lse.shape != (n,) or ent.shape != (n,):
            raise StoreError(f"sequence {sid}: logsumexp/entropy must have shape ({n},)")
        if n == 0:
            raise StoreError(f"sequence {sid}: no tokens")
        if not (ids_in_range(ids, self.vocab_size - 1) and ids_in_range(topk_ids, self.vocab_size - 1)):
            raise StoreError(f"sequence {sid}: token ids outside [0, {self.vocab_size})")
        tl = len(seq.text)
        if spans.min() < 0 or spans.max() > tl or np.any(spans[:, 0] > spans[:, 1]):
            raise StoreError(f"sequence {sid}: char_spans outside the text (length {tl}) or reversed")
        try:  # the codec refuses NaN, +inf and unsorted rows (naming the row) in one pass over the top-k
            topk_arrays = self.codec.encode(topk_ids, lps)
        except ValueError as e:
            raise StoreError(f"sequence {sid}: {e}") from None
        if lps[:, 0].max() > 1e-3 or lps[:, -1].min() == -np.inf:  # rows are descending: the ends bound them
            raise StoreError(f"sequence {sid}: top-k log-probabilities must be finite and <= 0")
        resp = np.asarray(seq.response_spans, dtype=np.int32).reshape(-1, 2)
        arrays = {"token_ids": ids, "char_spans": spans, "logsumexp": lse, "entropy": ent, **topk_arrays}
        row = {
            "seq_id": sid,
            "text": seq.text,
            "response_char_start": seq.response_char_start,
            "response_spans": resp.reshape(-1).tolist(),
            "truncated": bool(seq.truncated),
            "source_index": int(seq.source_index),
            "text_sha256": seq.text_sha256,
        }
        self._w.add(arrays, row, done_key=int(seq.source_index))
        self._truncated += bool(seq.truncated)

    def skip(self, source_index: int, reason: str) -> None:
        """Record a skipped input row (counted in the report and remembered across resume)."""
        self._w.skip(source_index, reason)
        self._skips[reason] = self._skips.get(reason, 0) + 1

    def commit(self) -> None:
        self._w.commit()

    def close(self) -> dict[str, Any]:
        return self._w.close()

    def release(self) -> None:
        """Give the shard up without closing it (what was committed stays), so another process may open it now."""
        self._w.release()

    @property
    def stats(self) -> dict[str, Any]:
        st = self._w.state
        skipped, examples = skip_summary(st.skipped or [])
        return {"sequences": st.n_sequences, "tokens": st.n_tokens, "truncated_this_run": self._truncated,
                "skipped": skipped, "skipped_rows": examples}

    def __enter__(self) -> "TeacherStoreWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.commit()


class TeacherStore(StoreView[TeacherSequence]):
    """Reads a teacher store: ``len``, ``store[i]`` (a TeacherSequence of numpy arrays), iteration, manifest.

    Only the rows of the requested sequence are read (Zarr chunk reads); handles reopen after fork, so a
    store can be used inside torch DataLoader worker processes.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        check: str = "sizes",
        allow_incomplete: bool = False,
        storage_options: dict[str, Any] | None = None,
    ):
        self._r = RaggedStoreReader(
            url, fmt=FORMAT, version=VERSION, check=check, allow_incomplete=allow_incomplete,
            storage_options=storage_options,
        )
        self.manifest = self._r.manifest
        try:
            self.codec = from_description(self.manifest["codec"])
        except ValueError as e:
            raise StoreError(f"{self.url}: {e}") from None
        self._codec_fields = list(self.codec.fields(self.k))

    @staticmethod
    def read_manifest(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return read_manifest(Location(url, storage_options))

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["totals"]["tokens"])

    @property
    def bytes_on_disk(self) -> int:
        return bytes_on_disk(self.manifest)

    def _get(self, i: int) -> TeacherSequence:
        return self._sequence(self._r.row(i), self._r.arrays(i))

    def _sequence(self, row: dict[str, Any], arr: dict[str, np.ndarray]) -> TeacherSequence:
        ids, lps = self.codec.decode({k: arr[k] for k in self._codec_fields})
        spans = np.asarray(row["response_spans"] or [], dtype=np.int32).reshape(-1, 2)
        return TeacherSequence(
            seq_id=row["seq_id"],
            text=row["text"],
            response_spans=spans,
            source_index=int(row["source_index"]),
            truncated=bool(row["truncated"]),
            token_ids=arr["token_ids"],
            char_spans=arr["char_spans"],
            topk_ids=ids,
            topk_logprobs=lps,
            logsumexp=arr["logsumexp"],
            entropy=arr["entropy"],
        )

    def read_range(self, start: int, stop: int) -> Iterator[TeacherSequence]:
        """Sequences [start, stop), each field read once per shard crossed (see `RaggedStoreReader.read_range`):
        for whole-store passes, where reading sequence by sequence decompresses every chunk once per sequence.
        Sequences are decoded one at a time as they are taken; each owns its arrays (decoding copies the top-k,
        the other fields are copied here), so a kept sequence does not pin the range's buffers."""
        for arr, row in self._r.read_range(start, stop):
            yield self._sequence(row, {k: v if k in self._codec_fields else v.copy() for k, v in arr.items()})

    def sequences(self, indices: Iterable[int], max_run: int = 256, max_rows: int = 32768) -> Iterator[TeacherSequence]:
        """The given sequences in the given order; consecutive indices are read as ranges (`RaggedStoreReader.runs`)."""
        for a, b in self._r.runs(indices, max_run, max_rows):
            yield from self.read_range(a, b)

    def __iter__(self) -> Iterator[TeacherSequence]:
        return self.sequences(range(len(self)))

    def rows(self, i: int) -> dict[str, Any]:
        """The Parquet row of sequence i (text, ids, flags) without reading token arrays."""
        return self._r.row(i)

    def raw_arrays(self, i: int) -> dict[str, np.ndarray]:
        """The on-disk (encoded) token-level arrays of sequence i."""
        return self._r.arrays(i)


    def tokenizer_json(self) -> str | None:
        """The teacher tokenizer's JSON saved with the store, or None for stores written without it."""
        loc = self._r.loc
        return loc.read_bytes(TOKENIZER_FILE).decode("utf-8") if loc.exists(TOKENIZER_FILE) else None
