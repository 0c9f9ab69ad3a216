"""Top-k id/log-prob encodings for the teacher store: pure, row-local numpy transforms plus their on-disk specs.

Every codec turns ``ids int32[N,K]`` (rank order) and ``logprobs float32[N,K]`` (descending per row) into a
dict of ``[N,K]`` arrays and back. Transforms never mix rows, so any row slice of the stored arrays decodes
on its own. Chosen by measurement on real teacher top-k (``benchmarks/storage.py``):

- ``"plain"``: rank-order int32 ids + raw float16 log-probs (the naive baseline, ~6 B per entry raw).
- ``"lossless"``: rank-order ids + float16 log-probs stored as deltas of an order-preserving uint16 key;
  decodes bit-exactly to ``float16(input)``.
- ``"quant"``: rank-order ids + log-probs on a capped-float grid (relative step near 0, fixed step beyond),
  stored as non-negative uint32 index deltas; bounded absolute *and* relative error.

Optionally, ids pass through a bijective remap that gives the ``id_table`` ids (most frequent first, see
:func:`fit_id_table`) the smallest codes, which Blosc's byte shuffle then compresses better.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import zarr.codecs

from cdm.storage.fields import FieldSpec

__all__ = [
    "CODECS",
    "LosslessTopKCodec",
    "PlainTopKCodec",
    "QuantTopKCodec",
    "TopKCodec",
    "fit_id_table",
    "from_description",
    "get_codec",
]

_INT32_MAX = np.iinfo(np.int32).max
_SENTINEL = 2**32 - 1  # quant index meaning "-inf" (also every value below the grid's floor)


def _blosc(shuffle: str, blocksize: int, level: int = 1) -> zarr.codecs.BloscCodec:
    """Blosc-zstd with explicit blocks (``fields.blosc_zstd`` has no ``blocksize``); a zarr v3 spec codec.

    Measured on real top-k (``benchmarks/storage.py``): 1 MiB blocks make ids ~6% smaller than Blosc's automatic
    block size; value deltas are smallest and fastest with bitshuffle over 4 MiB blocks (whole chunks at the
    usual chunk sizes). Level 1 compresses the lossless/quant pairs 2.7-3.3x faster than level 3 and 0.6-1% smaller
    (the store writer's main cost; Blosc's level 3 is zstd level 5).
    """
    return zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, blocksize=blocksize)


def _ids_spec(k: int) -> FieldSpec:
    return FieldSpec("int32", (k,), (_blosc("shuffle", 1 << 20),))


def _values_spec(dtype: str, k: int) -> FieldSpec:
    return FieldSpec(dtype, (k,), (_blosc("bitshuffle", 1 << 22),))


class TopKCodec(Protocol):
    """A row-local encoding of rank-ordered top-k ids and descending log-probs into on-disk arrays."""

    name: str

    def fields(self, k: int) -> dict[str, FieldSpec]: ...

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]: ...

    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------------------
# input validation


def ids_in_range(ids: np.ndarray, hi: int) -> bool:
    """All ids in [0, hi], in one pass: signed ids of 4+ bytes viewed as unsigned make negatives huge."""
    if ids.dtype.kind == "i" and ids.dtype.isnative and ids.dtype.itemsize >= 4 and hi < 2 ** (8 * ids.dtype.itemsize - 1):
        return int(ids.view(f"u{ids.dtype.itemsize}").max()) <= hi
    return int(ids.min()) >= 0 and int(ids.max()) <= hi


def _sorted_without_nan_or_inf(lp: np.ndarray) -> bool:
    """Every row descending with no NaN or +inf, in one comparison pass: a NaN fails each comparison it is in, and
    a +inf in a descending row sits in column 0 (-inf is allowed: top-k of a masked vocabulary ends in it)."""
    first = lp[:, 0]
    return bool((lp[:, :-1] >= lp[:, 1:]).all()) and not bool((np.isnan(first) | (first == np.inf)).any())


def _check_inputs(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refuse mis-shaped, non-integer, out-of-range ids and NaN / +inf / unsorted log-prob rows, naming the row."""
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs)
    if ids.ndim != 2 or logprobs.shape != ids.shape:
        raise ValueError(f"topk_ids {ids.shape} and topk_logprobs {logprobs.shape} must both be [N, K] and equal")
    if ids.shape[1] < 1:
        raise ValueError("top-k rows need K >= 1 columns")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids: dtype {ids.dtype} is not an integer type")
    if not np.issubdtype(logprobs.dtype, np.floating):
        raise ValueError(f"topk_logprobs: dtype {logprobs.dtype} is not a floating type")
    if ids.size and not ids_in_range(ids, _INT32_MAX):
        bad = int(np.argmax(((ids < 0) | (ids > _INT32_MAX)).any(axis=1)))
        raise ValueError(f"topk_ids: row {bad} has an id outside [0, 2**31 - 1]: {ids[bad].tolist()}")
    with np.errstate(over="ignore"):  # float64 below float32's range becomes -inf, like any float32 teacher
        lp = logprobs.astype(np.float32, copy=False)
    if not _sorted_without_nan_or_inf(lp):  # the slow scans below only find and name what is wrong
        bad_val = np.isnan(lp) | (lp == np.inf)
        if bad_val.any():
            r, c = np.argwhere(bad_val)[0]
            raise ValueError(f"topk_logprobs: row {r} column {c} is {lp[r, c]} (log-probs must be finite or -inf)")
        r, c = np.argwhere(lp[:, 1:] > lp[:, :-1])[0]
        raise ValueError(
            f"topk_logprobs: row {r} is not sorted in descending order at column {c + 1} "
            f"({lp[r, c]} then {lp[r, c + 1]}); top-k rows must be in rank order"
        )
    if ids.dtype != np.int32:  # int32 ids (the usual case) pass as they are: their range is already checked
        ids = ids.astype(np.int64, copy=False)
    return ids, lp


def _take(arrays: dict[str, np.ndarray], codec: TopKCodec) -> dict[str, np.ndarray]:
    """Fetch the codec's arrays and check them against ``codec.fields(K)``, K read off the data."""
    names = list(codec.fields(1))
    missing = sorted(set(names) - set(arrays))
    if missing:
        raise ValueError(f"top-k decode ({codec.name}): missing field(s) {missing}; got {sorted(arrays)}")
    out = {name: np.asarray(arrays[name]) for name in names}
    shapes = {name: a.shape for name, a in out.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"top-k decode ({codec.name}): fields must all be [N, K] of one shape, got {shapes}")
    spec = codec.fields(next(iter(shapes.values()))[1])
    for name, a in out.items():
        spec[name].check(name, a, where=f"top-k decode ({codec.name}): ")
    return out


# ----------------------------------------------------------------------------------------------------------
# ids: optional frequency remap


def fit_id_table(ids: np.ndarray, size: int = 4096) -> list[int]:
    """The ``size`` ids seen most often in ``ids`` (ties: smaller id first), most frequent first, for ``id_table``."""
    flat = np.asarray(ids).ravel().astype(np.int64)
    if flat.size == 0:
        return []
    uniq, counts = np.unique(flat, return_counts=True)
    order = np.lexsort((uniq, -counts))  # primary: count descending; secondary: id ascending
    return uniq[order[:size]].tolist()


class _IdMap:
    """Bijection id -> code: table ids get codes 0..M-1 in table order, all other ids keep their order after them.

    Ids above the largest table id map to themselves, so lookup tables only span ``[0, max(table)]``.
    """

    MAX_TABLE_ID = 2**24  # keeps the lookup tables small (vocabularies are far below this)

    def __init__(self, table: Sequence[int] | None):
        t = np.asarray([] if table is None else list(table), dtype=np.int64)
        if t.ndim != 1 or (t.size and (t.min() < 0 or t.max() >= self.MAX_TABLE_ID)):
            raise ValueError(f"id_table must be a flat list of ids in [0, {self.MAX_TABLE_ID})")
        if np.unique(t).size != t.size:
            raise ValueError("id_table must not repeat an id")
        self.table = t
        self.top = int(t.max()) if t.size else -1
        ids = np.arange(self.top + 1, dtype=np.int64)
        srt = np.sort(t)
        pos = np.searchsorted(srt, ids)  # table ids below each id
        fwd = t.size + ids - pos  # non-table ids: after the M table codes, in id order
        fwd[t] = np.arange(t.size)
        self.fwd = fwd.astype(np.int32)
        self.inv = np.empty_like(self.fwd)
        self.inv[self.fwd] = ids.astype(np.int32)

    def encode(self, ids: np.ndarray) -> np.ndarray:
        if self.top < 0:
            return ids.astype(np.int32)
        return np.where(ids <= self.top, self.fwd[np.minimum(ids, self.top)], ids).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if codes.size and codes.min() < 0:
            raise ValueError("topk_ids: negative id code in stored data")
        if self.top < 0:
            return codes.astype(np.int32, copy=True)
        return np.where(codes <= self.top, self.inv[np.minimum(codes, self.top)], codes).astype(np.int32)

    def describe(self) -> list[int] | None:
        return self.table.tolist() if self.table.size else None


# ----------------------------------------------------------------------------------------------------------
# values: float16 order-preserving keys (lossless w.r.t. float16)


def _to_f16(lp: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even; beyond +-65504 -> +-inf), through torch's vectorised conversion
    when torch is importable (~10x numpy's on x86; bit-identical, tested), else numpy's."""
    torch = _torch()
    if torch is not None and lp.dtype == np.float32:
        lp = np.ascontiguousarray(lp)
        if not lp.flags.writeable:  # e.g. Arrow zero-copy views; torch.from_numpy warns on those (never writes)
            lp = lp.copy()
        return torch.from_numpy(lp).to(torch.float16).numpy()
    with np.errstate(over="ignore"):  # values below -65504 become -inf, exactly as a float16 store would
        return lp.astype(np.float16)


@functools.cache
def _torch() -> Any:
    try:
        import torch
    except ImportError:  # readers and tools that never encode need not have torch
        return None
    return torch


def _f16_keys(lp: np.ndarray) -> np.ndarray:
    """float16 bit patterns mapped to uint16 keys whose unsigned order equals the float order (-inf lowest):
    negative values flip every bit, others only the sign bit (one xor with the sign smeared by an arithmetic shift)."""
    bits = _to_f16(lp).view(np.int16)
    mask = bits >> 15  # -1 (all ones) where negative, else 0
    mask |= np.int16(-0x8000)
    mask ^= bits
    return mask.view(np.uint16)


def _f16_from_keys(keys: np.ndarray) -> np.ndarray:
    """Inverse of `_f16_keys`: keys with the top bit set (non-negative floats) lose it, the others flip every bit
    (one xor with a mask built from the sign of the int16 view)."""
    k = np.ascontiguousarray(keys, dtype=np.uint16).view(np.int16)
    mask = k >> 15  # -1 where the top bit is set, else 0
    mask &= np.int16(0x7FFF)
    np.invert(mask, out=mask)  # 0x8000 where the top bit is set, else 0xFFFF
    mask ^= k
    return mask.view(np.float16)


def _f16_to_f32(h: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact), through torch's vectorised conversion when importable, else numpy's."""
    torch = _torch()
    if torch is not None:
        return torch.from_numpy(np.ascontiguousarray(h)).to(torch.float32).numpy()
    return h.astype(np.float32)


def _wrapping_cumsum(d: np.ndarray) -> np.ndarray:
    """Row-wise running sums of unsigned deltas (uint16 / uint32) modulo 2**bits, in their dtype. torch's cumsum
    into the signed type of the same width accumulates in int64 and stores modulo 2**bits: ~10x numpy's row-wise
    cumsum; numpy's without torch."""
    torch = _torch()
    d = np.ascontiguousarray(d)
    signed = {np.dtype(np.uint16): (np.int16, "int16"), np.dtype(np.uint32): (np.int32, "int32")}[d.dtype]
    if torch is not None and d.size:
        c = torch.from_numpy(d.view(signed[0])).cumsum(1, dtype=getattr(torch, signed[1]))
        return c.numpy().view(d.dtype)
    return np.cumsum(d, axis=1, dtype=d.dtype)


def _undo_row_deltas_u16(d: np.ndarray) -> np.ndarray:
    """Inverse of `_row_deltas(keys, np.uint16)`: key_j = d_0 - (d_1 + ... + d_j) mod 2**16."""
    return d[:, :1] * np.uint16(2) - _wrapping_cumsum(np.asarray(d, dtype=np.uint16))  # d_0 - (c_j - d_0)


def _row_deltas(keys: np.ndarray, dtype: type) -> np.ndarray:
    """Column 0 as is, then previous-minus-current per row (modular in ``dtype``): small and >= 0 for sorted rows."""
    out = keys.astype(dtype, copy=True)
    out[:, 1:] = keys[:, :-1] - keys[:, 1:]
    return out


# ----------------------------------------------------------------------------------------------------------
# codecs


class PlainTopKCodec:
    """Baseline: rank-order int32 ids + raw float16 log-probs, each Blosc-zstd with byte shuffle."""

    name = "plain"

    def fields(self, k: int) -> dict[str, FieldSpec]:
        return {
            "topk_ids": _ids_spec(k),
            "topk_values": FieldSpec("float16", (k,), (_blosc("shuffle", 1 << 20),)),
        }

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        ids64, lp = _check_inputs(ids, logprobs)
        return {"topk_ids": ids64.astype(np.int32), "topk_values": _to_f16(lp)}

    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        a = _take(arrays, self)
        return a["topk_ids"].astype(np.int32, copy=True), a["topk_values"].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": 1,
            "params": {},
            "lossless": True,
            "value_dtype": "float16",
            "max_abs_logprob_error": None,
            "encoding": "topk_ids: int32 rank order; topk_values: float16 log-probs",
        }


class LosslessTopKCodec:
    """Rank-order ids (optionally remapped) + float16 log-probs as deltas of order-preserving uint16 keys.

    Decoding gives exactly ``float16(logprobs)`` (bit for bit, -0.0 and -inf included) and the input rank
    order (ties keep their input order). On real teacher top-k the values take ~1/3 less space than raw float16.
    """

    name = "lossless"

    def __init__(self, id_table: Sequence[int] | None = None):
        self._ids = _IdMap(id_table)

    def fields(self, k: int) -> dict[str, FieldSpec]:
        return {
            "topk_ids": _ids_spec(k),
            "topk_values": _values_spec("uint16", k),
        }

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        ids64, lp = _check_inputs(ids, logprobs)
        return {"topk_ids": self._ids.encode(ids64), "topk_values": _row_deltas(_f16_keys(lp), np.uint16)}

    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        a = _take(arrays, self)
        d = a["topk_values"]
        return self._ids.decode(a["topk_ids"]), _f16_to_f32(_f16_from_keys(_undo_row_deltas_u16(d)))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": 1,
            "params": {"id_table": self._ids.describe()},
            "lossless": True,
            "value_dtype": "float16",
            "max_abs_logprob_error": None,
            "encoding": (
                "topk_ids: int32 codes (= ids unless id_table: table ids -> 0..M-1, others -> M + id - #table ids below);"
                " topk_values: uint16 keys of float16 log-probs (negative: ~bits, else bits|0x8000), column 0 the key,"
                " column j>0 key[j-1]-key[j] mod 2**16; decodes bit-exactly to float16(log-prob)"
            ),
        }


class QuantTopKCodec:
    """Rank-order ids (optionally remapped) + log-probs on a capped-float grid, stored as uint32 index deltas.

    For a log-prob v (a = -v >= 0) the grid step is ``min(2**-abs_bits, 2**(floor(log2 a) - rel_bits))``
    (constant ``2**(E_MIN - rel_bits)`` below ``2**E_MIN``), so the error is at most ``2**-(abs_bits+1)`` in
    absolute terms *and* ``a * 2**-(rel_bits+1)`` for ``a >= 2**E_MIN``: near-0 log-probs (likely tokens, hence
    the top-k mass and tail mass) stay fp16-like precise while the tail gets a fixed step.
    Values below ``min_logprob`` (see ``describe``; about -6.7e7 at abs_bits=6), -inf included, decode as -inf.
    """

    name = "quant"
    E_MIN = -24

    def __init__(self, abs_bits: int = 6, rel_bits: int = 8, id_table: Sequence[int] | None = None):
        if not (0 <= abs_bits <= 16 and 1 <= rel_bits <= 20):
            raise ValueError(f"quant codec: need 0 <= abs_bits <= 16 and 1 <= rel_bits <= 20, got {abs_bits}, {rel_bits}")
        if rel_bits - abs_bits <= self.E_MIN:
            raise ValueError("quant codec: rel_bits - abs_bits must exceed E_MIN")
        self.abs_bits, self.rel_bits = int(abs_bits), int(rel_bits)
        self._ids = _IdMap(id_table)
        m, b = self.rel_bits, self.abs_bits
        self._a1 = 2.0 ** (m - b)  # where the relative step reaches the absolute cap
        self._i1 = (m - b - self.E_MIN + 1) << m  # grid index of a == a1
        self._a_max = self._a1 + (_SENTINEL - 1 - self._i1) * 2.0**-b  # largest representable a
        limit = min(self._a1 * 2.0**24, self._a_max)  # below it `quantize` may take the float32 path
        limit32 = np.float32(limit)
        self._fast_cap_limit = limit32 if float(limit32) <= limit else np.nextafter(limit32, np.float32(0))

    @property
    def max_abs_error(self) -> float:
        return 2.0 ** -(self.abs_bits + 1)

    def fields(self, k: int) -> dict[str, FieldSpec]:
        return {
            "topk_ids": _ids_spec(k),
            "topk_values": _values_spec("uint32", k),
        }

    def quantize(self, logprobs: np.ndarray) -> np.ndarray:
        """Grid index of each float32 log-prob (uint32, non-decreasing as the log-prob falls; 2**32-1 is -inf).

        In place on one uint32 buffer, float32 where that is exact: a - a1 is exact in float32 for a < a1 * 2**24
        (a1, a power of two, is then a multiple of a's ulp); the rare larger a (and -inf) take the float64 formula.
        tests/test_topk_codec.py keeps the all-float64 definition this must equal bit for bit."""
        m, b, e_min = self.rel_bits, self.abs_bits, self.E_MIN
        v = np.asarray(logprobs, dtype=np.float32)
        if v.size and not v.max() <= self.max_abs_error:  # a NaN maximum hides the others: look at each
            too_big = np.argwhere(v > self.max_abs_error)
            if len(too_big):
                r, c = too_big[0]
                raise ValueError(f"topk_logprobs: row {r} column {c} is {v[r, c]} > 0; log-probabilities must be <= 0")
        a = np.negative(v)
        np.maximum(a, np.float32(0.0), out=a)
        # relative octaves: round the float32 mantissa to m bits; a carry moves into the exponent, as wanted
        # (bits <= 0x7F800000 for a <= inf, so uint32 cannot overflow; tiny and capped entries are overwritten)
        out = a.view(np.uint32) + np.uint32(1 << (22 - m))
        out >>= np.uint32(23 - m)
        out -= np.uint32(((127 + e_min - 1) << m) % 2**32)
        capped = a >= np.float32(self._a1)
        if capped.any():  # fixed step 2**-b above a1
            big = a >= self._fast_cap_limit
            x = a - np.float32(self._a1)
            with np.errstate(over="ignore"):  # only `big` entries overflow, and they are replaced below
                x *= np.float32(2.0**b)
            np.rint(x, out=x)
            np.clip(x, 0.0, np.float32(2.0**32 - 2.0**8), out=x)  # only entries below `big` are kept: in range
            cap = x.astype(np.uint32)
            cap += np.uint32(self._i1)
            if big.any():
                ab = a[big].astype(np.float64)
                cb = self._i1 + np.rint((np.minimum(ab, 2.0**60) - self._a1) * 2.0**b)
                cap[big] = np.minimum(cb, float(_SENTINEL)).astype(np.uint32)
            np.copyto(out, cap, where=capped)
        tiny = a < np.float32(2.0**e_min)
        if tiny.any():  # a < 2**E_MIN: uniform step 2**(E_MIN - m)
            t = np.minimum(a, np.float32(2.0**e_min))
            t *= np.float32(2.0 ** (m - e_min))
            np.copyto(out, np.rint(t, out=t).astype(np.uint32), where=tiny)
        return out

    def dequantize(self, idx: np.ndarray) -> np.ndarray:
        """Log-prob (float32) of each grid index; the sentinel 2**32-1 gives -inf.

        On uint32 indices in place, float32 where exact: the capped value a1 + (i - i1) * 2**-b is one correctly
        rounded float32 addition of exact operands while i - i1 < 2**24; beyond, float64 then one rounding, as the
        definition (kept in tests/test_topk_codec.py) does everywhere."""
        m, b, e_min = self.rel_bits, self.abs_bits, self.E_MIN
        i = np.asarray(idx)
        if i.dtype != np.uint32:
            if i.size and (i.min() < 0 or i.max() > int(_SENTINEL)):
                raise ValueError(f"quant grid indices must be in [0, 2**32 - 1], got [{i.min()}, {i.max()}]")
            i = i.astype(np.uint32)
        # relative octaves: the float32 bit pattern of a, from the clipped index (tiny and capped overwritten below)
        t = np.clip(i, np.uint32(1 << m), np.uint32(self._i1))
        t += np.uint32((127 + e_min - 1) << m)
        t <<= np.uint32(23 - m)
        out = t.view(np.float32)
        tiny = i < np.uint32(1 << m)
        if tiny.any():
            np.copyto(out, np.minimum(i, np.uint32(1 << m)).astype(np.float32) * np.float32(2.0 ** (e_min - m)), where=tiny)
        capped = i >= np.uint32(self._i1)
        if capped.any():
            steps = i - np.uint32(self._i1)  # wraps where not capped: those entries are not used
            a_cap = steps.astype(np.float32)
            a_cap *= np.float32(2.0**-b)
            a_cap += np.float32(self._a1)
            big = capped & (steps >= np.uint32(2**24))
            if big.any():
                a_cap[big] = (self._a1 + (i[big].astype(np.int64) - self._i1) * 2.0**-b).astype(np.float32)
            np.copyto(out, a_cap, where=capped)
        np.negative(out, out=out)
        np.copyto(out, np.float32(-np.inf), where=i == np.uint32(_SENTINEL))
        return out

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        ids64, lp = _check_inputs(ids, logprobs)
        return {"topk_ids": self._ids.encode(ids64), "topk_values": _rise_deltas(self.quantize(lp))}

    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        a = _take(arrays, self)
        q = _wrapping_cumsum(np.asarray(a["topk_values"], dtype=np.uint32))
        wrapped = q[:, 1:] < q[:, :-1]  # deltas are < 2**32: a running sum past the grid shows as a decrease
        if wrapped.any():
            r = int(np.argmax(wrapped.any(axis=1)))
            raise ValueError(f"topk_values: row {r} decodes past the quant grid (corrupt data)")
        return self._ids.decode(a["topk_ids"]), self.dequantize(q)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": 1,
            "params": {"abs_bits": self.abs_bits, "rel_bits": self.rel_bits, "id_table": self._ids.describe()},
            "lossless": False,
            "value_dtype": "float32",
            "max_abs_logprob_error": self.max_abs_error,
            "max_rel_logprob_error": 2.0 ** -(self.rel_bits + 1),
            "min_logprob": -self._a_max,
            "encoding": (
                f"topk_values: uint32 per-row deltas of grid indices (column 0 absolute); for a = -logprob the grid"
                f" step is min(2**-{self.abs_bits}, 2**(floor(log2 a) - {self.rel_bits})), 2**({self.E_MIN}-"
                f"{self.rel_bits}) below 2**{self.E_MIN}; index 2**32-1 (and any value below min_logprob) means -inf;"
                f" |error| <= min(2**-{self.abs_bits + 1}, max(a, 2**{self.E_MIN}) * 2**-{self.rel_bits + 1})"
                " (+ float32 rounding for |v| >= 2**24 steps)"
            ),
        }


def _rise_deltas(q: np.ndarray) -> np.ndarray:
    """Column 0 as is, then current-minus-previous (>= 0: indices grow along a sorted row, <= 2**32-1), as uint32."""
    out = np.empty(q.shape, np.uint32)
    out[:, :1] = q[:, :1]
    out[:, 1:] = q[:, 1:] - q[:, :-1]
    return out


CODECS: dict[str, Callable[..., TopKCodec]] = {
    "plain": PlainTopKCodec,
    "lossless": LosslessTopKCodec,
    "quant": QuantTopKCodec,
}


def get_codec(name: str, **params: Any) -> TopKCodec:
    """Codec by name: ``plain``, ``lossless``, ``quant``; ``qN`` is ``quant`` with ``abs_bits=N, rel_bits=N+2``."""
    short = re.fullmatch(r"q(\d+)", name)
    if short:
        n = int(short.group(1))
        return QuantTopKCodec(**{"abs_bits": n, "rel_bits": n + 2, **params})
    if name not in CODECS:
        raise ValueError(f"unknown top-k codec {name!r}; known: {sorted(CODECS)} or qN")
    return CODECS[name](**params)


def from_description(desc: dict[str, Any]) -> TopKCodec:
    """Rebuild the codec a manifest recorded with ``describe()``; refuses a newer codec version."""
    if desc.get("version", 1) > 1:
        raise ValueError(f"top-k codec {desc.get('name')!r} version {desc['version']} is newer than this cdm (1)")
    return get_codec(desc["name"], **desc.get("params", {}))
