"""The training loader: streams student sequences and their sparse teacher targets from the stores.

Order. Sequences are grouped into contiguous *blocks* (read with one slice per field, so a Zarr chunk is
decompressed once per block, not once per sequence); each epoch shuffles the blocks with ``(seed, epoch)``,
takes *windows* of a few blocks, shuffles the sequences of a window, buckets them by length into
micro-batches (at most ``batch_size`` sequences and ``max_tokens`` padded tokens) and shuffles those. The
result is one deterministic, infinite stream of micro-batches that does not depend on the number of ranks,
workers or accumulation steps. Micro-batch ``p`` of the stream goes to DDP rank ``(p - start) % world`` and,
within a rank, round-robin to DataLoader workers (which is the order the DataLoader yields them in). The
loader position is simply the number of micro-batches consumed, so resuming is exact.

Targets. Per student position j the map store gives the aligned teacher row (or -1); the loader gathers that
row's stored top-k ids and log-probs, so a batch holds ``[R, K]`` teacher targets for its R KD rows and never a
``[batch, time, vocab]`` tensor. The mapping of teacher ids to student columns (exact, then dynamic) runs
on the device inside the loss (cdm.train.losses.dynamic_map), against the student's live top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cdm.errors import OptionError
from cdm.mapping.store import MapStore
from cdm.storage.ragged import StoreError
from cdm.storage.teacher import TeacherStore

IGNORE_INDEX = -100
_MAP_FIELDS = ["student_ids", "student_spans", "teacher_row", "align_kind", "loss_mask"]


class DataError(StoreError):
    """The stores cannot be used together (wrong pairing, empty, inconsistent sequence)."""


# --------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LoaderConfig:
    """How sequences become micro-batches; every field changes the data stream, so all go into checkpoints."""

    batch_size: int = 8  # most sequences per micro-batch
    max_tokens: int | None = None  # most padded tokens per micro-batch (None: batch_size alone decides)
    max_length: int = 2048  # student tokens kept per sequence (the rest is cut off)
    block_size: int = 32  # contiguous sequences read together
    window_blocks: int = 8  # blocks whose sequences are shuffled and bucketed together
    pad_multiple: int = 8  # pad the time axis to a multiple of this
    kd_topk: int | None = None  # keep the first k stored teacher candidates (None: all)
    seed: int | None = None  # data order (None: TrainConfig.seed; 0 when used on its own)
    dual: bool = False  # gather same-tokenizer teacher rows (dual setting)
    uld: bool = False  # gather index-paired teacher response rows (ULD baseline)

    def __post_init__(self) -> None:
        """Refuse values that cannot make batches; each message names the `cdm train` flag (pad_multiple has none)."""
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 2),
                                 ("--block-size", self.block_size, 1), ("--window-blocks", self.window_blocks, 1),
                                 ("pad_multiple", self.pad_multiple, 1)):
            if value < low:
                raise OptionError(f"{flag} must be >= {low} (got {value})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise OptionError(f"--max-tokens must be >= 1 (got {self.max_tokens})")
        if self.seed is not None and self.seed < 0:
            raise OptionError(f"--seed must be >= 0 (got {self.seed})")
        if self.max_tokens is not None and self.max_tokens < _round_up(self.max_length, self.pad_multiple):
            raise OptionError(
                f"max_tokens ({self.max_tokens}) must hold one sequence of max_length ({self.max_length}, padded to a "
                f"multiple of {self.pad_multiple}); raise --max-tokens or lower --max-length"
            )
        if self.kd_topk is not None and self.kd_topk < 1:
            raise OptionError(f"--kd-topk must be >= 1 (got {self.kd_topk})")

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


# --------------------------------------------------------------------------------------------- planning


@dataclass
class SequenceTable:
    """Per map-store sequence: its teacher-store index, student length and shard (read from the Parquet tables)."""

    teacher_index: np.ndarray  # int64 [N]
    length: np.ndarray  # int64 [N]
    shard: np.ndarray  # int64 [N]


def sequence_table(map_store: MapStore) -> SequenceTable:
    """Read the per-sequence metadata of a map store without touching its token arrays."""
    r = map_store.reader
    ti, ln, sh = [], [], []
    for s in range(len(r.shards)):
        t = r.table(s)
        ti.append(np.asarray(t.column("teacher_index").to_numpy(), dtype=np.int64))
        ln.append(np.diff(r.offsets(s)).astype(np.int64))
        sh.append(np.full(t.num_rows, s, dtype=np.int64))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return SequenceTable(cat(ti), cat(ln), cat(sh))


def heldout_mask(teacher_index: np.ndarray, n_teacher: int, n_eval: int) -> np.ndarray:
    """Held-out sequences: ``n_eval`` evenly spaced *teacher* indices, so every student sees the same texts."""
    if n_eval <= 0 or n_teacher <= 0:
        return np.zeros(len(teacher_index), dtype=bool)
    n_eval = min(n_eval, n_teacher)
    chosen = np.floor((np.arange(n_eval) + 0.5) * n_teacher / n_eval).astype(np.int64)
    return np.isin(teacher_index, chosen)


def make_blocks(indices: np.ndarray, shard: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Cut ascending sequence indices into runs of at most ``block_size`` that never cross a shard."""
    blocks: list[np.ndarray] = []
    if len(indices) == 0:
        return blocks
    cuts = np.flatnonzero(np.diff(shard[indices]) != 0) + 1
    for run in np.split(indices, cuts):
        blocks.extend(run[i : i + block_size] for i in range(0, len(run), block_size))
    return blocks


def pack_sorted(lengths: np.ndarray, batch_size: int, max_tokens: int | None, pad_multiple: int) -> list[slice]:
    """Greedy micro-batches over ascending lengths: at most ``batch_size`` items and ``max_tokens`` padded tokens."""
    out, start = [], 0
    for i in range(len(lengths)):
        n = i - start + 1
        padded = _round_up(int(lengths[i]), pad_multiple) * n
        if n > batch_size or (max_tokens is not None and padded > max_tokens):
            out.append(slice(start, i))
            start = i
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


@dataclass
class Window:
    """A few blocks read together and the micro-batches (arrays of map-store indices) made from them."""

    blocks: np.ndarray
    batches: list[np.ndarray]


def epoch_plan(blocks: Sequence[np.ndarray], lengths: np.ndarray, cfg: LoaderConfig, epoch: int) -> list[Window]:
    """The deterministic micro-batch order of one epoch (a pure function of the blocks, lengths, config, epoch)."""
    rng = np.random.default_rng([cfg.seed or 0, epoch])
    order = rng.permutation(len(blocks))
    windows = []
    for w in range(0, len(order), cfg.window_blocks):
        ids = order[w : w + cfg.window_blocks]
        seqs = rng.permutation(np.concatenate([blocks[b] for b in ids]))
        lens = np.minimum(lengths[seqs], cfg.max_length)
        by_len = np.argsort(lens, kind="stable")
        seqs, lens = seqs[by_len], lens[by_len]
        batches = [seqs[s] for s in pack_sorted(lens, cfg.batch_size, cfg.max_tokens, cfg.pad_multiple)]
        windows.append(Window(np.sort(ids), [batches[i] for i in rng.permutation(len(batches))]))
    return windows


class PlanStream:
    """The infinite micro-batch stream over epochs; position p is the p-th micro-batch since the first epoch."""

    def __init__(self, blocks: Sequence[np.ndarray], lengths: np.ndarray, cfg: LoaderConfig):
        if not blocks:
            raise DataError("no training sequences: the store is empty or every sequence is held out")
        self.blocks, self.lengths, self.cfg = list(blocks), lengths, cfg
        self._sizes: dict[int, int] = {}

    def epoch_size(self, epoch: int) -> int:
        """Micro-batches in one epoch (bucketing makes it depend on the shuffle, so it is computed)."""
        if epoch not in self._sizes:
            self._sizes[epoch] = sum(len(w.batches) for w in epoch_plan(self.blocks, self.lengths, self.cfg, epoch))
        return self._sizes[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """Stream position -> (epoch, micro-batch index inside that epoch)."""
        epoch = 0
        while position >= self.epoch_size(epoch):
            position -= self.epoch_size(epoch)
            epoch += 1
        return epoch, position

    def windows(self, start: int) -> Iterator[tuple[int, int, Window]]:
        """Yield (epoch, stream position of the window's first micro-batch, window) from the window holding `start`."""
        epoch, skip = self.locate(start)
        pos = start - skip
        while True:
            for window in epoch_plan(self.blocks, self.lengths, self.cfg, epoch):
                n = len(window.batches)
                if pos + n > start:
                    yield epoch, pos, window
                pos += n
            epoch += 1


# --------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One student sequence with its targets (numpy). Positions index the (truncated) student sequence."""

    map_index: int
    seq_id: str
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L], IGNORE_INDEX where no CE
    n_bytes: int  # UTF-8 bytes of the text predicted at the labelled positions
    kd_pos: np.ndarray  # int64 [R] positions with an aligned teacher row
    kd_ids: np.ndarray  # int32 [R, K] teacher top-k ids (rank order)
    kd_logprobs: np.ndarray  # float32 [R, K] full-vocab teacher log-probs
    kd_kind: np.ndarray  # int8 [R] alignment kind (cdm.mapping.store.KIND_*)
    kd_next: np.ndarray  # int64 [R] the teacher's actual next token at that row (-1 at the end)
    dual_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dual_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    dual_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    uld_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    uld_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def utf8_prefix_bytes(text: str) -> np.ndarray:
    """``cb[c]`` = UTF-8 bytes of ``text[:c]`` (length len(text) + 1), vectorised over code points."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width, dtype=np.int64)])


def predicted_bytes(spans: np.ndarray, labelled: np.ndarray, prefix_bytes: np.ndarray) -> int:
    """Bytes of text predicted by the labelled next tokens: token i adds the text between the running end of
    tokens < i and its own end, so overlapping byte pieces and trimmed offsets are counted exactly once."""
    if len(spans) < 2:
        return 0
    ends = np.maximum.accumulate(spans[:, 1].astype(np.int64))
    ends = np.clip(ends, 0, len(prefix_bytes) - 1)
    per = prefix_bytes[ends[1:]] - prefix_bytes[ends[:-1]]  # bytes predicted at position j (token j+1)
    return int(per[labelled[: len(per)]].sum())


def response_rows(char_spans: np.ndarray, response_spans: np.ndarray) -> np.ndarray:
    """Teacher rows that predict a response token: row t-1 for each token t starting inside a response span
    (zero-width end-of-text specials at a span's end count as inside)."""
    if len(char_spans) < 2:
        return np.zeros(0, np.int64)
    starts, ends = char_spans[1:, 0], char_spans[1:, 1]
    inside = np.zeros(len(starts), dtype=bool)
    for a, b in np.asarray(response_spans).reshape(-1, 2):
        inside |= ((starts >= a) & (starts < b)) | ((starts == b) & (ends == b))
    return np.flatnonzero(inside).astype(np.int64)


def build_example(
    map_index: int,
    seq_id: str,
    m: dict[str, np.ndarray],
    t_ids: np.ndarray,
    t_logprobs: np.ndarray,
    t_tokens: np.ndarray,
    text: str,
    cfg: LoaderConfig,
    dual: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    teacher_spans: tuple[np.ndarray, np.ndarray] | None = None,
) -> Example:
    """Turn one map sequence + its teacher rows into training targets (pure numpy, no I/O).

    CE label at position j is ``student_ids[j+1]`` when ``loss_mask[j+1]``; KD rows are the positions j < L with
    ``teacher_row[j] >= 0``; ``dual`` = (token ids, top-k ids, log-probs) of a same-tokenizer teacher, whose
    row j is used at every labelled position j; ``teacher_spans`` = (char spans, response spans) for ULD.
    """
    ids = np.asarray(m["student_ids"], dtype=np.int64)
    n_s = len(ids)
    if n_s == 0:
        raise DataError(f"sequence {seq_id}: the map store holds no student tokens for it")
    length = min(n_s, cfg.max_length)
    mask = np.asarray(m["loss_mask"], dtype=bool)
    labelled = np.zeros(length, dtype=bool)
    nxt = min(length, n_s - 1)
    labelled[:nxt] = mask[1 : nxt + 1]
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    labels[:nxt] = np.where(labelled[:nxt], ids[1 : nxt + 1], IGNORE_INDEX)
    spans = np.asarray(m["student_spans"]).reshape(-1, 2)
    n_bytes = predicted_bytes(spans[: length + 1], labelled, utf8_prefix_bytes(text))

    rows = np.asarray(m["teacher_row"], dtype=np.int64)[:length]
    n_t = len(t_tokens)
    if rows.size and rows.max() >= n_t:
        raise DataError(f"sequence {seq_id}: map row points at teacher row {rows.max()} but the teacher has {n_t}")
    kd_pos = np.flatnonzero(rows >= 0).astype(np.int64)
    tr = rows[kd_pos]
    k = t_ids.shape[1] if cfg.kd_topk is None else min(cfg.kd_topk, t_ids.shape[1])
    kd_next = np.where(tr + 1 < n_t, np.asarray(t_tokens, np.int64)[np.minimum(tr + 1, n_t - 1)], -1)
    ex = Example(
        map_index=map_index,
        seq_id=seq_id,
        input_ids=ids[:length],
        labels=labels,
        n_bytes=n_bytes,
        kd_pos=kd_pos,
        kd_ids=np.ascontiguousarray(t_ids[tr, :k], dtype=np.int32),
        kd_logprobs=np.ascontiguousarray(t_logprobs[tr, :k], dtype=np.float32),
        kd_kind=np.asarray(m["align_kind"], dtype=np.int8)[:length][kd_pos],
        kd_next=kd_next.astype(np.int64),
    )
    if dual is not None:
        d_tokens, d_ids, d_lp = dual
        if len(d_tokens) != n_s or not np.array_equal(np.asarray(d_tokens, np.int64), ids):
            where = int(np.flatnonzero(np.asarray(d_tokens[:n_s], np.int64) != ids[: len(d_tokens)])[:1].sum())
            raise DataError(
                f"sequence {seq_id}: the same-tokenizer teacher store tokenised it differently from the map store "
                f"({len(d_tokens)} vs {n_s} tokens, first difference near position {where}); the dual store must "
                "be precomputed with the student's tokenizer and the same special-token settings"
            )
        kd2 = min(k, d_ids.shape[1]) if cfg.kd_topk is not None else d_ids.shape[1]
        ex.dual_pos = np.flatnonzero(labelled).astype(np.int64)
        ex.dual_ids = np.ascontiguousarray(d_ids[ex.dual_pos, :kd2], dtype=np.int32)
        ex.dual_logprobs = np.ascontiguousarray(d_lp[ex.dual_pos, :kd2], dtype=np.float32)
    if teacher_spans is not None:
        t_rows = response_rows(*teacher_spans)
        s_pos = np.flatnonzero(labelled).astype(np.int64)
        n = min(len(t_rows), len(s_pos))
        ex.uld_pos = s_pos[:n]
        ex.uld_logprobs = np.ascontiguousarray(t_logprobs[t_rows[:n], :k], dtype=np.float32)
    return ex


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A padded micro-batch. ``*_pos`` are flat positions ``b * T + t`` into ``[B, T]``; teacher targets are sparse."""

    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T]
    kd_pos: torch.Tensor  # int64 [R]
    kd_ids: torch.Tensor  # int64 [R, K]
    kd_logprobs: torch.Tensor  # float32 [R, K]
    kd_kind: torch.Tensor  # int8 [R]
    kd_next: torch.Tensor  # int64 [R]
    dual_pos: torch.Tensor
    dual_ids: torch.Tensor
    dual_logprobs: torch.Tensor
    uld_pos: torch.Tensor
    uld_logprobs: torch.Tensor
    n_bytes: int
    seq_ids: list[str]
    map_indices: list[int]
    position: int = -1  # index of this micro-batch in the stream (-1 for evaluation batches)

    _TENSORS = ("input_ids", "attention_mask", "labels", "kd_pos", "kd_ids", "kd_logprobs", "kd_kind", "kd_next",
                "dual_pos", "dual_ids", "dual_logprobs", "uld_pos", "uld_logprobs")

    def _map(self, fn: Any) -> "Batch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update({n: fn(getattr(self, n)) for n in self._TENSORS})
        return Batch(**kw)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    @property
    def counts(self) -> dict[str, int]:
        """Rows of each loss part in this micro-batch (for normalising over the whole step)."""
        return {
            "ce": int((self.labels != IGNORE_INDEX).sum()),
            "kd": int(self.kd_pos.numel()),
            # aligned rows that also carry a CE label (a sequence's last row predicts nothing): aligned_share's numerator
            "kd_labelled": int((self.labels.reshape(-1)[self.kd_pos] != IGNORE_INDEX).sum()),
            "dual": int(self.dual_pos.numel()),
            "uld": int(self.uld_pos.numel()),
            "tokens": int(self.attention_mask.sum()),
        }


def _cat(parts: list[np.ndarray], shape_tail: tuple[int, ...], dtype: Any) -> torch.Tensor:
    parts = [p.reshape((p.shape[0], *shape_tail)) for p in parts]  # empty rows may come as (0, 0)
    return torch.from_numpy(np.concatenate(parts)).to(dtype)


def collate(examples: Sequence[Example], pad_id: int = 0, pad_multiple: int = 8, position: int = -1) -> Batch:
    """Right-pad examples into one micro-batch; flatten the sparse targets with flat positions b * T + t."""
    if not examples:
        raise ValueError("collate needs at least one example")
    t = _round_up(max(len(e.input_ids) for e in examples), pad_multiple)
    b = len(examples)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    att = np.zeros((b, t), dtype=np.int64)
    lab = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], att[i, :n], lab[i, :n] = e.input_ids, 1, e.labels
    k = max(e.kd_ids.shape[1] for e in examples)
    k2 = max(e.dual_ids.shape[1] for e in examples)
    k3 = max(e.uld_logprobs.shape[1] for e in examples)
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(att),
        labels=torch.from_numpy(lab),
        kd_pos=_cat([e.kd_pos + i * t for i, e in enumerate(examples)], (), torch.int64),
        kd_ids=_cat([e.kd_ids for e in examples], (k,), torch.int64),
        kd_logprobs=_cat([e.kd_logprobs for e in examples], (k,), torch.float32),
        kd_kind=_cat([e.kd_kind for e in examples], (), torch.int8),
        kd_next=_cat([e.kd_next for e in examples], (), torch.int64),
        dual_pos=_cat([e.dual_pos + i * t for i, e in enumerate(examples)], (), torch.int64),
        dual_ids=_cat([e.dual_ids for e in examples], (k2,), torch.int64),
        dual_logprobs=_cat([e.dual_logprobs for e in examples], (k2,), torch.float32),
        uld_pos=_cat([e.uld_pos + i * t for i, e in enumerate(examples)], (), torch.int64),
        uld_logprobs=_cat([e.uld_logprobs for e in examples], (k3,), torch.float32),
        n_bytes=int(sum(e.n_bytes for e in examples)),
        seq_ids=[e.seq_id for e in examples],
        map_indices=[e.map_index for e in examples],
        position=position,
    )


# --------------------------------------------------------------------------------------------- reading


class _TeacherReader:
    """Contiguous-range reads of a teacher store, with its codec decoded once per range."""

    def __init__(self, store: TeacherStore, spans: bool):
        self.store = store
        self.codec_fields = list(store.codec.fields(store.k))
        self.names = ["token_ids", *self.codec_fields, *(["char_spans"] if spans else [])]
        self.columns = ["seq_id", "text", "text_sha256", "source_index", *(["response_spans"] if spans else [])]

    def read(self, indices: np.ndarray) -> dict[int, dict[str, Any]]:
        """Teacher sequences by global index: token ids, top-k ids/log-probs, text (+ spans), as a dict."""
        out: dict[int, dict[str, Any]] = {}
        want = np.unique(indices)
        # one contiguous read when the indices are dense, else one read per index
        ranges = [(int(want[0]), int(want[-1]) + 1)] if len(want) and want[-1] - want[0] < 2 * len(want) + 8 else [
            (int(i), int(i) + 1) for i in want]
        wanted = set(int(i) for i in want)
        for a, b in ranges:
            for off, (arrays, row) in enumerate(self.store.reader.read_range(a, b, self.names, self.columns)):
                gi = a + off
                if gi not in wanted:
                    continue
                ids, lps = self.store.codec.decode({n: arrays[n] for n in self.codec_fields})
                rec = {"token_ids": arrays["token_ids"], "topk_ids": ids, "topk_logprobs": lps, **row}
                if "char_spans" in arrays:
                    rec["char_spans"] = arrays["char_spans"]
                out[gi] = rec
        return out


@dataclass
class StoreSet:
    """The stores one run reads: teacher, map (for this student), optional same-tokenizer teacher (dual)."""

    teacher_url: str
    map_url: str
    dual_url: str | None = None
    storage_options: dict[str, Any] | None = None

    def open(self) -> tuple[TeacherStore, MapStore, TeacherStore | None]:
        so = self.storage_options

        def opened(flag: str, kind: Any, url: str) -> Any:
            try:
                return kind(url, storage_options=so)
            except StoreError as e:  # say which option named the store that cannot be opened
                raise StoreError(f"{flag}: {e}") from e
            except (OSError, ValueError) as e:  # a damaged file (e.g. a zarr.json that is not JSON)
                raise StoreError(f"{flag} {url}: cannot be read ({type(e).__name__}: {e}); run cdm verify {url}") \
                    from e

        teacher = opened("--store", TeacherStore, self.teacher_url)
        mp = opened("--map", MapStore, self.map_url)
        dual = opened("--dual-store", TeacherStore, self.dual_url) if self.dual_url else None
        return teacher, mp, dual


def _source_lookup(store: TeacherStore) -> dict[int, int]:
    """source_index -> global sequence index of a teacher store (for joining the dual store)."""
    out: dict[int, int] = {}
    base = 0
    r = store.reader
    for s in range(len(r.shards)):
        col = r.table(s).column("source_index").to_pylist()
        for j, src in enumerate(col):
            if int(src) in out:
                raise DataError(f"{store.url}: source_index {src} appears twice; cannot join the dual store")
            out[int(src)] = base + j
        base += len(col)
    return out


class Sources:
    """Opened stores plus the reads that turn map-store indices into Examples (usable inside DataLoader workers)."""

    def __init__(self, stores: StoreSet, cfg: LoaderConfig, table: SequenceTable | None = None):
        self.stores, self.cfg = stores, cfg
        self.teacher, self.map, self.dual = stores.open()
        self.table = table if table is not None else sequence_table(self.map)
        self._t = _TeacherReader(self.teacher, spans=cfg.uld)
        self._d = _TeacherReader(self.dual, spans=False) if self.dual is not None else None
        self._dual_of_source: dict[int, int] | None = None
        if cfg.dual and self.dual is None:
            raise DataError("the loss needs a same-tokenizer teacher store (dual setting) but none was given")

    def read(self, indices: np.ndarray) -> dict[int, Example]:
        """Examples for map-store indices (ascending, ideally one contiguous block)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return {}
        lo, hi = int(indices.min()), int(indices.max()) + 1
        wanted = set(indices.tolist())
        maps = [(lo + o, rec) for o, rec in enumerate(self.map.reader.read_range(lo, hi, _MAP_FIELDS,
                                                                     ["seq_id", "teacher_index", "text_sha256"]))
                if lo + o in wanted]
        t_idx = np.array([int(row["teacher_index"]) for _, (_, row) in maps], dtype=np.int64)
        teach = self._t.read(t_idx)
        dual: dict[int, dict[str, Any]] = {}
        if self.cfg.dual and self._d is not None:
            if self._dual_of_source is None:
                self._dual_of_source = _source_lookup(self.dual)
            d_idx = []
            for ti in t_idx:
                src = int(teach[int(ti)]["source_index"])
                if src not in self._dual_of_source:
                    raise DataError(
                        f"sequence {teach[int(ti)]['seq_id']}: source row {src} is missing from the same-tokenizer "
                        f"teacher store {self.dual.url}; precompute it on the same data"
                    )
                d_idx.append(self._dual_of_source[src])
            dual = self._d.read(np.array(d_idx, dtype=np.int64))
        out: dict[int, Example] = {}
        for n, (gi, (arrays, row)) in enumerate(maps):
            t = teach[int(row["teacher_index"])]
            if t["text_sha256"] != row["text_sha256"]:
                raise DataError(
                    f"sequence {row['seq_id']}: the map store's text hash differs from the teacher store's "
                    f"(teacher sequence {row['teacher_index']}); the map was built from another store"
                )
            dtuple = None
            if self.cfg.dual:
                d = dual[d_idx[n]]
                if d["text_sha256"] != t["text_sha256"]:
                    raise DataError(f"sequence {row['seq_id']}: the same-tokenizer teacher store holds another text for it")
                dtuple = (d["token_ids"], d["topk_ids"], d["topk_logprobs"])
            tspans = None
            if self.cfg.uld:
                tspans = (t["char_spans"], np.asarray(t["response_spans"] or [], np.int64).reshape(-1, 2))
            out[gi] = build_example(gi, row["seq_id"], arrays, t["topk_ids"], t["topk_logprobs"], t["token_ids"],
                                    t["text"], self.cfg, dual=dtuple, teacher_spans=tspans)
        return out


# --------------------------------------------------------------------------------------------- streaming


class TrainStream(IterableDataset):
    """This rank's (and worker's) share of the micro-batch stream from position `start`, as Batches.

    Each worker reads every block of a window once, keeping only the sequences of its own micro-batches, so
    reads stay contiguous and memory stays at one window share per worker.
    """

    def __init__(self, sources: Sources, plan: PlanStream, blocks_of: np.ndarray, start: int, rank: int = 0,
                 world: int = 1, pad_id: int = 0, stop: int | None = None):
        super().__init__()
        self.sources, self.plan, self.block_of = sources, plan, blocks_of
        self.start, self.rank, self.world, self.pad_id, self.stop = int(start), rank, world, pad_id, stop

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k = 0  # index among this rank's micro-batches
        for _, first, window in self.plan.windows(self.start):
            if self.stop is not None and first >= self.stop:
                return
            mine: list[tuple[int, np.ndarray]] = []
            for i, batch in enumerate(window.batches):
                pos = first + i
                if pos < self.start or (self.stop is not None and pos >= self.stop):
                    continue
                if (pos - self.start) % self.world == self.rank:
                    if k % nw == wid:
                        mine.append((pos, batch))
                    k += 1
            pending: dict[int, Example] = {}
            need = {int(x) for _, b in mine for x in b}
            for pos, batch in mine:
                for idx in batch:
                    if int(idx) not in pending:
                        blk = self.plan.blocks[int(self.block_of[int(idx)])]
                        todo = np.array([x for x in blk if int(x) in need and int(x) not in pending], dtype=np.int64)
                        pending.update(self.sources.read(todo))
                yield collate([pending.pop(int(i)) for i in batch], self.pad_id, self.plan.cfg.pad_multiple, pos)


def block_index(blocks: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``out[i]`` = the block holding map-store sequence i (-1 if none)."""
    out = np.full(n, -1, dtype=np.int64)
    for b, blk in enumerate(blocks):
        out[blk] = b
    return out


def make_loader(stream: TrainStream, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader over whole micro-batches (batch_size=None) that keeps the stream order."""
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False, multiprocessing_context="fork")
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)


def eval_batches(sources: Sources, indices: np.ndarray, cfg: LoaderConfig, pad_id: int = 0) -> list[Batch]:
    """Held-out micro-batches in a fixed order (sorted by length, same packing rule as training)."""
    if len(indices) == 0:
        return []
    ex = {}
    for i in np.sort(indices):
        ex.update(sources.read(np.array([i])))
    lens = np.array([len(ex[int(i)].input_ids) for i in indices])
    order = np.asarray(indices)[np.argsort(lens, kind="stable")]
    lens = np.sort(lens, kind="stable")
    return [collate([ex[int(i)] for i in order[s]], pad_id, cfg.pad_multiple)
            for s in pack_sorted(lens, cfg.batch_size, cfg.max_tokens, cfg.pad_multiple)]
