"""Top-k codecs: hand-worked vectors, hypothesis round trips, error bounds, slow references, zarr round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from cdm.storage.topk_codec import (
    CODECS,
    LosslessTopKCodec,
    QuantTopKCodec,
    _IdMap,
    fit_id_table,
    from_description,
    get_codec,
)

SETTINGS = settings(max_examples=60, deadline=None)
MAX_ID = 262143
SPECIAL = [0.0, -0.0, -1e-9, -0.5, -1.0, -1.0, -3.25, -20.0, -65504.0, -70000.0, -1e4, -1e30, -3.4e38, -np.inf]


# ----------------------------------------------------------------------------------------------------------
# strategies


@st.composite
def topk_rows(draw, max_n: int = 12, max_k: int = 40, max_id: int = MAX_ID):
    """Random rank-ordered rows: ids up to ``max_id``, descending log-probs with ties, -inf and huge negatives."""
    n = draw(st.integers(0, max_n))
    k = draw(st.integers(1, max_k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, max_id + 1, size=(n, k), dtype=np.int64)
    if draw(st.booleans()):
        ids[:, : min(k, 3)] = rng.integers(0, 50, size=(n, min(k, 3)))  # small (frequent-looking) ids too
    scale = draw(st.sampled_from([0.01, 1.0, 5.0, 50.0]))
    lp = -np.abs(rng.standard_exponential((n, k)) * scale)
    special = rng.random((n, k)) < 0.2
    lp[special] = rng.choice(np.array(SPECIAL), size=int(special.sum()))
    ties = rng.random((n, k)) < 0.2
    lp = -np.sort(-lp, axis=1)  # descending
    lp = np.where(ties, np.roll(lp, 1, axis=1), lp)
    lp = -np.sort(-lp, axis=1)
    return ids.astype(np.int32), lp.astype(np.float32)


def table_for(ids: np.ndarray, seed: int) -> list[int] | None:
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        return None
    pool = np.unique(np.concatenate([ids.ravel(), rng.integers(0, 5000, 40)]))
    return rng.permutation(pool)[: rng.integers(1, len(pool) + 1)].tolist()


def quant_bound(codec: QuantTopKCodec, lp: np.ndarray) -> np.ndarray:
    """Documented per-entry error bound: min(abs cap, relative) plus float32 rounding of the decoded value."""
    a = -lp.astype(np.float64)
    rel = np.maximum(a, 2.0**codec.E_MIN) * 2.0 ** -(codec.rel_bits + 1)
    return np.minimum(codec.max_abs_error, rel) + a * 2.0**-24


def f16_exact(lp: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return lp.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# hand-worked vectors


def test_lossless_hand_vector():
    ids = np.array([[7, 3, 9, 1]], np.int32)
    lp = np.array([[-0.5, -1.0, -1.0, -np.inf]], np.float32)
    enc = get_codec("lossless").encode(ids, lp)
    # float16 bits: -0.5 = 0xB800 -> key ~ = 0x47FF; -1.0 = 0xBC00 -> 0x43FF; -inf = 0xFC00 -> 0x03FF
    assert enc["topk_values"].tolist() == [[0x47FF, 0x47FF - 0x43FF, 0, 0x43FF - 0x03FF]]
    assert enc["topk_ids"].tolist() == [[7, 3, 9, 1]]
    dec_ids, dec_lp = get_codec("lossless").decode(enc)
    assert dec_ids.tolist() == [[7, 3, 9, 1]] and dec_lp.tolist() == [[-0.5, -1.0, -1.0, -np.inf]]


def test_quant_hand_vector():
    # abs_bits=2, rel_bits=2: a1 = 2**0 = 1, i1 = (2 - 2 + 24 + 1) * 4 = 100.
    # -0.3: a = 1.2 * 2**-2 -> octave e=-2 -> (22 << 2) + rint(1.2 * 4) = 88 + 5 = 93 -> 2**-2 * 1.25 = 0.3125
    # -1.0: a == a1 -> 100;  -1.3: 100 + rint(0.3 * 4) = 101 -> 1.25
    codec = QuantTopKCodec(abs_bits=2, rel_bits=2)
    enc = codec.encode(np.array([[4, 5, 6]]), np.array([[-0.3, -1.0, -1.3]], np.float32))
    assert enc["topk_values"].tolist() == [[93, 7, 1]]
    _, dec = codec.decode(enc)
    assert dec.tolist() == [[-0.3125, -1.0, -1.25]]


def test_id_table_hand_vector():
    m = _IdMap([5, 2])
    ids = np.array([[5, 2, 0, 1, 3, 4, 6, 100]])
    assert m.encode(ids).tolist() == [[0, 1, 2, 3, 4, 5, 6, 100]]
    assert m.decode(m.encode(ids)).tolist() == ids.tolist()


def test_fit_id_table_orders_by_count_then_id():
    ids = np.array([[3, 1, 3], [1, 3, 7], [9, 8, 8]])
    assert fit_id_table(ids) == [3, 1, 8, 7, 9]
    assert fit_id_table(ids, size=2) == [3, 1]
    assert fit_id_table(np.zeros((0, 4), np.int32)) == []


# ----------------------------------------------------------------------------------------------------------
# round-trip properties


@SETTINGS
@given(topk_rows(), st.integers(0, 1000))
def test_lossless_round_trip_is_exact_float16(rows, seed):
    ids, lp = rows
    codec = LosslessTopKCodec(id_table=table_for(ids, seed))
    dec_ids, dec_lp = codec.decode(codec.encode(ids, lp))
    assert dec_ids.dtype == np.int32 and dec_lp.dtype == np.float32
    np.testing.assert_array_equal(dec_ids, ids)
    np.testing.assert_array_equal(dec_lp.view(np.uint32), f16_exact(lp).view(np.uint32))  # bit for bit


@SETTINGS
@given(topk_rows())
def test_plain_round_trip_is_exact_float16(rows):
    ids, lp = rows
    dec_ids, dec_lp = get_codec("plain").decode(get_codec("plain").encode(ids, lp))
    np.testing.assert_array_equal(dec_ids, ids)
    np.testing.assert_array_equal(dec_lp.view(np.uint32), f16_exact(lp).view(np.uint32))


@SETTINGS
@given(topk_rows(), st.sampled_from([(0, 1), (2, 2), (4, 6), (6, 8), (8, 10), (10, 14)]), st.integers(0, 1000))
def test_quant_round_trip_within_documented_bound(rows, bits, seed):
    ids, lp = rows
    codec = QuantTopKCodec(*bits, id_table=table_for(ids, seed))
    dec_ids, dec_lp = codec.decode(codec.encode(ids, lp))
    np.testing.assert_array_equal(dec_ids, ids)
    representable = lp >= codec.describe()["min_logprob"]
    got, want = dec_lp[representable].astype(np.float64), lp[representable].astype(np.float64)
    err = np.abs(got - want)
    assert np.all(err <= quant_bound(codec, lp)[representable])
    assert np.all(err <= codec.max_abs_error + np.abs(want) * 2.0**-24)
    assert np.all(dec_lp[lp < codec.describe()["min_logprob"] - codec.max_abs_error] == -np.inf)
    assert np.all(dec_lp[:, 1:] <= dec_lp[:, :-1])  # still in rank order


@SETTINGS
@given(topk_rows(max_n=20), st.sampled_from(sorted(CODECS)), st.data())
def test_row_slice_decodes_like_full_decode(rows, name, data):
    ids, lp = rows
    codec = get_codec(name, **({} if name == "plain" else {"id_table": fit_id_table(ids[:3], 10)}))
    enc = codec.encode(ids, lp)
    lo = data.draw(st.integers(0, len(ids)))
    hi = data.draw(st.integers(lo, len(ids)))
    full_ids, full_lp = codec.decode(enc)
    part_ids, part_lp = codec.decode({k: v[lo:hi] for k, v in enc.items()})
    np.testing.assert_array_equal(part_ids, full_ids[lo:hi])
    np.testing.assert_array_equal(part_lp.view(np.uint32), full_lp[lo:hi].view(np.uint32))
    # encoding the slice alone gives the same stored rows (row-local transform)
    for k, v in codec.encode(ids[lo:hi], lp[lo:hi]).items():
        np.testing.assert_array_equal(v, enc[k][lo:hi])


def test_k1_and_empty_and_extreme_ids():
    ids = np.array([[MAX_ID], [0], [2**31 - 1]], np.int64)
    lp = np.array([[-0.0], [-np.inf], [-7.0]], np.float32)
    for name in CODECS:
        codec = get_codec(name)
        dec_ids, dec_lp = codec.decode(codec.encode(ids, lp))
        assert dec_ids[:, 0].tolist() == [MAX_ID, 0, 2**31 - 1]
        assert dec_lp[1, 0] == -np.inf and dec_lp[2, 0] == -7.0 and dec_lp[0, 0] == 0.0
        e_ids, e_lp = codec.decode(codec.encode(np.zeros((0, 5), np.int32), np.zeros((0, 5), np.float32)))
        assert e_ids.shape == (0, 5) and e_lp.shape == (0, 5)


# ----------------------------------------------------------------------------------------------------------
# fast path vs slow reference


def slow_id_codes(table: list[int], ids: np.ndarray) -> np.ndarray:
    """Reference remap: table ids in table order, then every other id in ascending order."""
    top = max(table) if table else -1
    order = list(table) + [i for i in range(top + 1) if i not in set(table)]
    code = {t: c for c, t in enumerate(order)}
    return np.vectorize(lambda i: code.get(int(i), int(i)))(ids)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3000), unique=True, max_size=60), st.integers(0, 2**32 - 1))
def test_id_map_matches_slow_reference(table, seed):
    ids = np.random.default_rng(seed).integers(0, 4000, size=(7, 9))
    m = _IdMap(table)
    codes = m.encode(ids)
    np.testing.assert_array_equal(codes, slow_id_codes(table, ids))
    np.testing.assert_array_equal(m.decode(codes), ids)


def slow_grid(codec: QuantTopKCodec, a_max: float) -> np.ndarray:
    """Every grid point up to ``a_max``, in index order, enumerated straight from the step rule."""
    m, b, e_min = codec.rel_bits, codec.abs_bits, codec.E_MIN
    pts = [k * 2.0 ** (e_min - m) for k in range(2**m)]
    for e in range(e_min, m - b):
        pts += [2.0**e + j * 2.0 ** (e - m) for j in range(2**m)]
    a1 = 2.0 ** (m - b)
    pts += [a1 + j * 2.0**-b for j in range(int((a_max - a1) * 2**b) + 2)]
    return np.array(pts)


@pytest.mark.parametrize("bits", [(2, 2), (3, 5), (0, 1), (6, 8)])
def test_quantize_picks_a_nearest_point_of_the_slow_grid(bits):
    codec = QuantTopKCodec(*bits)
    rng = np.random.default_rng(sum(bits))
    a = np.concatenate([rng.uniform(0, 12, 3000), np.exp(rng.uniform(-20, 2, 3000)), [0.0, 1.0, 2.0, 0.5]])
    lp = -np.sort(a)[None, :].astype(np.float32)
    a = -lp[0].astype(np.float64)
    grid = slow_grid(codec, 13.0)
    idx = codec.quantize(lp)[0].astype(np.int64)
    assert idx.max() < len(grid)
    nearest = np.abs(grid[None, :] - a[:, None]).min(axis=1)
    np.testing.assert_array_equal(np.abs(grid[idx] - a), nearest)
    np.testing.assert_array_equal(-codec.dequantize(idx), grid[idx])


def test_lossless_keys_match_slow_reference():
    rng = np.random.default_rng(3)
    lp = -np.sort(-np.concatenate([-rng.exponential(3, (50, 20)), np.full((50, 1), -np.inf)], axis=1), axis=1)
    lp = lp.astype(np.float32)
    enc = get_codec("lossless").encode(np.zeros(lp.shape, np.int32), lp)["topk_values"]
    for r in range(lp.shape[0]):
        keys = []
        for x in lp[r]:
            bits = int(np.float16(x).view(np.uint16))
            keys.append((~bits & 0xFFFF) if bits & 0x8000 else bits | 0x8000)
        expect = [keys[0]] + [(keys[j - 1] - keys[j]) % 65536 for j in range(1, len(keys))]
        assert enc[r].tolist() == expect


def test_fast_float16_conversion_and_keys_are_bit_identical_to_numpy():
    """The torch-backed float32 -> float16 path and the xor key trick equal numpy's conversion and the branchy
    reference on every kind of float32: random bit patterns, the float16 subnormal/overflow/rounding edges, +-0, +-inf."""
    from cdm.storage.topk_codec import _f16_keys, _to_f16

    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      2.0**-14, 6.1e-5, -5.96e-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -2049.0, -2051.0], np.float32)
    x = np.concatenate([bits.view(np.float32), edges, rng.normal(0, 30, 100_000).astype(np.float32)])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    got = _to_f16(x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))
    b = ref.view(np.uint16).astype(np.int64)
    slow = np.where(b & 0x8000, ~b & 0xFFFF, b | 0x8000)
    np.testing.assert_array_equal(_f16_keys(x.reshape(-1, 1)).ravel().astype(np.int64), slow)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_read_only_inputs_encode_without_warnings(name):
    """Arrow zero-copy views and np.frombuffer arrays are read-only; encoding must not warn (tests run -W error)."""
    rng = np.random.default_rng(5)
    lp = np.sort(-rng.exponential(2, (6, 5)), axis=1)[:, ::-1].astype(np.float32)
    ids = rng.integers(0, 100, (6, 5)).astype(np.int32)
    ro_lp, ro_ids = lp.copy(), ids.copy()
    ro_lp.flags.writeable = ro_ids.flags.writeable = False
    codec = get_codec(name)
    got, want = codec.encode(ro_ids, ro_lp), codec.encode(ids, lp)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# ----------------------------------------------------------------------------------------------------------
# refusals and descriptions


@pytest.mark.parametrize("name", sorted(CODECS))
def test_bad_inputs_are_refused_with_the_row(name):
    codec = get_codec(name)
    ids = np.zeros((3, 2), np.int32)
    good = np.array([[-1.0, -2.0]] * 3, np.float32)
    with pytest.raises(ValueError, match="row 1 is not sorted"):
        codec.encode(ids, np.array([[-1.0, -2.0], [-2.0, -1.0], [-1.0, -2.0]], np.float32))
    with pytest.raises(ValueError, match="row 2 column 1"):
        codec.encode(ids, np.array([[-1.0, -2.0], [-1.0, -2.0], [-1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="row 0 has an id outside"):
        codec.encode(np.array([[-1, 0], [0, 0], [0, 0]]), good)
    with pytest.raises(ValueError, match=r"must both be \[N, K\]"):
        codec.encode(ids[:, :1], good)
    with pytest.raises(ValueError, match="not an integer"):
        codec.encode(ids.astype(np.float32), good)
    enc = codec.encode(ids, good)
    with pytest.raises(ValueError, match="missing field"):
        codec.decode({"topk_ids": enc["topk_ids"]})
    with pytest.raises(ValueError, match="topk_values.*dtype"):
        codec.decode({**enc, "topk_values": enc["topk_values"].astype(np.float64)})


def test_quant_refuses_positive_logprobs_and_corrupt_rows():
    codec = get_codec("q6")
    with pytest.raises(ValueError, match="row 0 column 0 is 0.5 > 0"):
        codec.encode(np.zeros((1, 2), np.int32), np.array([[0.5, -1.0]], np.float32))
    ok = codec.decode(codec.encode(np.zeros((1, 1), np.int32), np.array([[1e-3]], np.float32)))[1]
    assert ok[0, 0] == 0.0  # within the error bound: clamped to 0
    with pytest.raises(ValueError, match="row 1 decodes past"):
        codec.decode({"topk_ids": np.zeros((2, 2), np.int32),
                      "topk_values": np.array([[1, 2], [2**32 - 1, 5]], np.uint32)})


def test_get_codec_names_and_description_round_trip():
    assert {k: get_codec("q5").describe()["params"][k] for k in ("abs_bits", "rel_bits")} == {"abs_bits": 5, "rel_bits": 7}
    with pytest.raises(ValueError, match="unknown top-k codec 'zip'"):
        get_codec("zip")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (30, 8)).astype(np.int32)
    lp = -np.sort(rng.exponential(2, (30, 8)), axis=1).astype(np.float32)
    for codec in (get_codec("plain"), get_codec("lossless", id_table=[7, 3]), get_codec("quant", abs_bits=5, rel_bits=7)):
        desc = json.loads(json.dumps(codec.describe()))  # what a manifest stores
        again = from_description(desc)
        for k, v in codec.encode(ids, lp).items():
            np.testing.assert_array_equal(again.encode(ids, lp)[k], v)
        assert desc["lossless"] == (codec.name != "quant")
    assert get_codec("quant").describe()["max_abs_logprob_error"] == 2.0**-7
    with pytest.raises(ValueError, match="version 2 is newer"):
        from_description({"name": "lossless", "version": 2, "params": {}})
    with pytest.raises(ValueError, match="must not repeat"):
        get_codec("lossless", id_table=[1, 1])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_zarr_round_trip_through_field_specs(name, tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 49152, (300, 16)).astype(np.int32)
    lp = -np.sort(rng.exponential(3, (300, 16)), axis=1).astype(np.float32)
    codec = get_codec(name)
    enc, specs = codec.encode(ids, lp), codec.fields(16)
    assert set(enc) == set(specs)
    back = {}
    for field, arr in enc.items():
        specs[field].check(field, arr)
        z = zarr.create_array(store=str(tmp_path / field), shape=arr.shape, dtype=specs[field].dtype,
                              chunks=(128, 16), compressors=list(specs[field].compressors), zarr_format=3)
        z[...] = arr
        back[field] = zarr.open_array(str(tmp_path / field), mode="r")[100:250]
    dec_ids, dec_lp = codec.decode(back)
    full_ids, full_lp = codec.decode(enc)
    np.testing.assert_array_equal(dec_ids, full_ids[100:250])
    np.testing.assert_array_equal(dec_lp, full_lp[100:250])


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 6), k=st.integers(1, 6),
       poison=st.sampled_from(["none", "nan", "inf", "-inf", "swap", "tie"]))
def test_one_pass_validation_equals_the_slow_scans(seed, n, k, poison):
    """The one-comparison-pass check accepts exactly the rows the separate NaN / +inf / order scans accept."""
    from cdm.storage.topk_codec import _sorted_without_nan_or_inf

    rng = np.random.default_rng(seed)
    lp = np.sort(-rng.exponential(size=(n, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    if n and poison != "none":
        r, c = int(rng.integers(n)), int(rng.integers(k))
        if poison == "swap" and k > 1:
            c = min(c, k - 2)
            lp[r, c], lp[r, c + 1] = lp[r, c + 1] - 1.0, lp[r, c]
        elif poison == "tie" and k > 1:
            lp[r, c:] = lp[r, c]
        elif poison in ("nan", "inf", "-inf"):
            lp[r, c] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[poison]
    slow = not (np.isnan(lp) | (lp == np.inf)).any() and not (lp[:, 1:] > lp[:, :-1]).any()
    assert _sorted_without_nan_or_inf(lp) == slow


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                                                              ">i4", ">i8", "<i4", ">u4"]),
       hi=st.sampled_from([0, 5, 1000, 2**31 - 1]))
def test_ids_in_range_equals_min_max(seed, dtype, hi):
    from cdm.storage.topk_codec import ids_in_range

    info = np.iinfo(np.dtype(dtype).newbyteorder("="))
    rng = np.random.default_rng(seed)
    ids = rng.integers(max(info.min, -2000), min(info.max, 2000), size=(3, 4), endpoint=True).astype(dtype)
    if rng.random() < 0.3:
        ids[rng.integers(3), rng.integers(4)] = info.min if rng.random() < 0.5 else info.max
    assert ids_in_range(ids, hi) == bool(ids.min() >= 0 and ids.max() <= hi)


def quantize_reference(codec: QuantTopKCodec, logprobs: np.ndarray) -> np.ndarray:
    """The quant grid index by its definition, every case in int64/float64 (the encoder before its float32 path)."""
    m, b, e_min = codec.rel_bits, codec.abs_bits, codec.E_MIN
    a = np.maximum(-np.asarray(logprobs, dtype=np.float32), np.float32(0.0))
    tiny = np.rint(np.minimum(a, np.float32(2.0**e_min)) * np.float32(2.0 ** (m - e_min))).astype(np.int64)
    bits = a.view(np.uint32).astype(np.int64)
    rel = ((bits + (1 << (22 - m))) >> (23 - m)) - ((127 + e_min - 1) << m)
    a1 = 2.0 ** (m - b)
    i1 = (m - b - e_min + 1) << m
    cap = i1 + np.rint((np.minimum(a.astype(np.float64), 2.0**60) - a1) * 2.0**b)
    cap = np.minimum(cap, float(2**32 - 1)).astype(np.int64)
    return np.where(a < 2.0**e_min, tiny, np.where(a < a1, rel, cap))


@pytest.mark.parametrize("bits", [(5, 7), (2, 2), (0, 1), (8, 10), (16, 20), (3, 4), (1, 20)])
def test_quantize_equals_the_float64_definition_bit_for_bit(bits):
    """Every float32 class: random bit patterns of non-positive floats (all exponents), the boundaries of each
    region and their float32 neighbours, the float32 path's limit, -inf, -0.0 and realistic teacher log-probs."""
    codec = QuantTopKCodec(*bits)
    rng = np.random.default_rng(sum(bits))
    patterns = (rng.integers(0, 0x7F800000, 400_000, dtype=np.uint32) | np.uint32(0x80000000)).view(np.float32)
    m, b, e_min = codec.rel_bits, codec.abs_bits, codec.E_MIN
    edges = np.array([2.0**e_min, 2.0 ** (m - b), 2.0 ** (m - b) * 2.0**24, codec._a_max, float(codec._fast_cap_limit),
                      2.0**60, 2.0**100, 1.0, 0.5], dtype=np.float32)
    around = np.concatenate([edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf))])
    special = np.array([0.0, -0.0, -np.inf, -np.finfo(np.float32).max, -np.finfo(np.float32).tiny, -1e-45], np.float32)
    real = -rng.gamma(2.0, 2.0, 200_000).astype(np.float32)
    lp = np.concatenate([patterns, -around, special, real])
    lp = lp[np.abs(lp) < np.inf].tolist() + [-np.inf]
    lp = np.asarray(lp, np.float32)[None, :]
    got = codec.quantize(lp)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got.astype(np.int64), quantize_reference(codec, lp))


def test_quantize_refuses_a_positive_log_prob_beside_a_nan():
    with pytest.raises(ValueError, match="row 0 column 0 is 5.0 > 0"):
        get_codec("quant").quantize(np.array([[5.0, np.nan]], np.float32))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_big_endian_ids_are_range_checked_by_value(name):
    lp = np.array([[-0.1, -2.0]], np.float32)
    with pytest.raises(ValueError, match="outside"):
        get_codec(name).encode(np.array([[5, -256]], ">i4"), lp)
    got = get_codec(name).decode(get_codec(name).encode(np.array([[5, 1]], ">i4"), lp))[0]
    np.testing.assert_array_equal(got, [[5, 1]])


def test_lossless_decode_steps_invert_the_encoder_on_every_key_with_and_without_torch(monkeypatch):
    """Every uint16 key (all float16 bit patterns, NaNs aside) round-trips through the xor inverse; the torch
    cumsum / float16 -> float32 path equals numpy's, on rows whose running sums wrap modulo 2**16."""
    import cdm.storage.topk_codec as tc

    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every = every[~np.isnan(every)]
    keys = tc._f16_keys(every.reshape(-1, 1))
    np.testing.assert_array_equal(tc._f16_from_keys(keys).view(np.uint16).ravel(), every.view(np.uint16))
    rng = np.random.default_rng(12)
    d = rng.integers(0, 2**16, size=(300, 64), dtype=np.uint32).astype(np.uint16)
    h = every[rng.integers(0, len(every), size=(300, 64))]
    with_torch = (tc._undo_row_deltas_u16(d), tc._f16_to_f32(h))
    monkeypatch.setattr(tc, "_torch", lambda: None)
    without = (tc._undo_row_deltas_u16(d), tc._f16_to_f32(h))
    expected = (d[:, :1].astype(np.int64) - np.cumsum(d[:, 1:].astype(np.int64), axis=1)) % 2**16
    np.testing.assert_array_equal(with_torch[0][:, 1:].astype(np.int64), expected)
    np.testing.assert_array_equal(with_torch[0], without[0])
    np.testing.assert_array_equal(with_torch[1].view(np.uint32), without[1].view(np.uint32))
    np.testing.assert_array_equal(with_torch[0][:, 0], d[:, 0])


def dequantize_reference(codec: QuantTopKCodec, idx: np.ndarray) -> np.ndarray:
    """The grid's log-prob by its definition in int64/float64 (the decoder before its float32 path)."""
    m, b, e_min = codec.rel_bits, codec.abs_bits, codec.E_MIN
    i = np.asarray(idx).astype(np.int64)
    a_tiny = np.minimum(i, 1 << m).astype(np.float32) * np.float32(2.0 ** (e_min - m))
    rel_bits = (np.clip(i, 1 << m, codec._i1) + ((127 + e_min - 1) << m)) << (23 - m)
    a_rel = rel_bits.astype(np.uint32).view(np.float32)
    a_cap = (codec._a1 + (i - codec._i1) * 2.0**-b).astype(np.float32)
    a = np.where(i < (1 << m), a_tiny, np.where(i < codec._i1, a_rel, a_cap))
    return np.where(i == 2**32 - 1, np.float32(-np.inf), -a)


@pytest.mark.parametrize("bits", [(5, 7), (2, 2), (0, 1), (8, 10), (16, 20), (3, 4), (1, 20)])
def test_dequantize_equals_the_float64_definition_bit_for_bit(bits):
    """Random indices over the whole uint32 range and every region edge (tiny, relative, capped, the float32
    path's 2**24-step limit) with their neighbours, and the sentinel; then decode of a quantised row round trip."""
    codec = QuantTopKCodec(*bits)
    rng = np.random.default_rng(sum(bits) + 1)
    m, i1 = codec.rel_bits, codec._i1
    edges = np.array([0, 1, (1 << m) - 1, 1 << m, i1 - 1, i1, i1 + 1, i1 + 2**24 - 1, i1 + 2**24, i1 + 2**24 + 1,
                      2**31, 2**32 - 2, 2**32 - 1], dtype=np.int64)
    edges = edges[(edges >= 0) & (edges < 2**32)]
    idx = np.concatenate([rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.int64),
                          rng.integers(0, i1 + 2**25, 300_000), edges])
    got = codec.dequantize(idx)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), dequantize_reference(codec, idx).view(np.uint32))
    lp = np.sort(-rng.gamma(2.0, 2.0, size=(50, 40)).astype(np.float32), axis=1)[:, ::-1].copy()
    lp[::5, -2:] = -np.inf
    _, dec = codec.decode(codec.encode(np.zeros(lp.shape, np.int32), lp))
    ref = dequantize_reference(codec, codec.quantize(lp).astype(np.int64))
    np.testing.assert_array_equal(dec.view(np.uint32), ref.view(np.uint32))


def test_quant_running_sums_with_and_without_torch_and_wrap_detection(monkeypatch):
    import cdm.storage.topk_codec as tc

    rng = np.random.default_rng(13)
    d = rng.integers(0, 2**26, size=(200, 32), dtype=np.uint64).astype(np.uint32)
    d[7, 5] = 2**32 - 1  # this row's running sum passes the grid
    with_torch = tc._wrapping_cumsum(d)
    monkeypatch.setattr(tc, "_torch", lambda: None)
    np.testing.assert_array_equal(with_torch, tc._wrapping_cumsum(d))
    np.testing.assert_array_equal(with_torch.astype(np.int64), np.cumsum(d.astype(np.int64), axis=1) % 2**32)
    with pytest.raises(ValueError, match="row 7 decodes past"):
        get_codec("q5").decode({"topk_ids": np.zeros(d.shape, np.int32), "topk_values": d})
