"""Sequence alignment: hand-worked vectors (cdm-method §3, §8.1), edge cases, fast == slow on random inputs
(hypothesis), and offset alignment of real tokenizer pairs checked group by group against the text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdm.mapping import align as A
from cdm.mapping.tokenizers import encode_with_offsets
from tests.tokenizer_fixtures import *  # noqa: F403
from tests.tokenizer_fixtures import UNICODE_TEXTS, pydoc_texts

HSET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U, OO, ON, NO, NM = A.UNALIGNED, A.ONE_ONE, A.ONE_N, A.N_ONE, A.N_M


def spans_of(pieces: list[str]) -> np.ndarray:
    """Back-to-back spans of pieces that tile a text."""
    ends = np.cumsum([len(p) for p in pieces])
    return np.stack([ends - [len(p) for p in pieces], ends], axis=1)


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.int64)


# ============================================================================================ DTW (§2.4, §3)

VECTORS = [
    (["Hello", " world", "!"], ["Hel", "lo", " wor", "ld!"], [[0, 1], [2], [3]], [[0], [0], [1], [2]], [[0, 1], [2], [3]], 9),
    ([" New", " York", " City"], [" NewYork", " City"], [[0], [0], [1]], [[0, 1], [2]], [[0], [1]], 7),
    (["a", "b", "c"], ["a", "b", "c"], [[0], [1], [2]], [[0], [1], [2]], [[0], [1], [2]], 0),
    ([" 1", "2", "3", " apples"], [" 123", " app", "les"], [[0], [0], [1], [2]], [[0, 1], [2], [3]], [[0], [1], [2]], 10),
]


@pytest.mark.parametrize("t, s, t2s, s2t, groups, d_end", VECTORS)
def test_dtw_method_vectors(t, s, t2s, s2t, groups, d_end):
    assert A.align_dtw(t, s, ones(len(t)), ones(len(s))) == (t2s, s2t)
    assert A.reference_groups(t2s) == groups
    assert A.dtw_table(A.dtw_cost(t, s, ones(len(t)), ones(len(s))))[-1, -1] == d_end
    assert A.dtw_slow(t, s, [1] * len(t), [1] * len(s)) == (t2s, s2t, d_end)


def test_dtw_to_rows_method_vectors_and_staircase():
    rows = [A.dtw_to_rows(t2s, s2t) for _, _, t2s, s2t, _, _ in VECTORS]
    assert [r.teacher_row.tolist() for r in rows] == [[-1, 0, 1, 2], [1, 2], [0, 1, 2], [1, 2, 3]]
    assert [r.kind.tolist() for r in rows] == [[U, ON, OO, OO], [NO, OO], [OO, OO, OO], [NO, OO, OO]]
    assert rows[0].group_t.tolist() == [[0, 1], [1, 2], [2, 3]] and rows[0].group_s.tolist() == [[0, 2], [2, 3], [3, 4]]
    # a staircase (0,0)->(1,0)->(1,1)->(2,1): the reference makes overlapping groups, here it is one n-m group
    t2s, s2t = [[0], [0, 1], [1]], [[0, 1], [1, 2]]
    assert A.reference_groups(t2s) == [[0], [0, 1], [1]]
    al = A.dtw_to_rows(t2s, s2t)
    assert al.teacher_row.tolist() == [-1, 2] and al.kind.tolist() == [U, NM] and al.counts()["groups"] == 1
    rows, kinds = al  # unpacks like the (rows, kinds) tuple the build shell uses
    assert rows is al.teacher_row and kinds is al.kind
    # local DTW indices mapped back into the sequence (e.g. the DTW saw only the response tokens)
    g = A.dtw_to_rows(VECTORS[0][2], VECTORS[0][3], t_positions=np.array([4, 5, 6]), s_positions=np.array([7, 8, 9, 10]), m=12)
    assert g.teacher_row.tolist() == [-1] * 8 + [4, 5, 6, -1] and g.kind[8] == ON
    with pytest.raises(ValueError, match="monotone"):
        A.dtw_to_rows([[1], [0]], [[1], [0]])


def test_dtw_special_pairs_weights_and_identical_strings():
    t, s = ["x", "</s>"], ["x", "<|im_end|>"]
    assert A.dtw_cost(t, s, ones(2), ones(2), A.reference_zero_cost(t, s))[1, 1] == 0
    assert A.reference_zero_cost(s, t)[1, 1]  # both orientations
    assert not A.reference_zero_cost(["</s>"], ["</s>"])[0, 0]  # the table pairs the two sets, not equal strings
    assert A.dtw_slow(t, s, [5, 5], [5, 5])[2] == 0 and A.dtw_slow(t, s, [1, 1], [1, 1], reference_specials=False)[2] > 0
    # identical (space-stripped) strings cost nothing whatever the weights; weights scale the other costs
    c = A.dtw_cost([" ab", "c"], ["ab", "cd"], np.array([5, 3]), np.array([4, 5]))
    assert c.tolist() == [[0, 2 * 25], [2 * 12, 1 * 15]]


def test_entropy_weights_hand_vector_thresholds_and_r10():
    assert A.entropy_weights(np.array([0.1, 0.5, 2.0, 1.0])).tolist() == [3, 3, 5, 4]
    lo, hi = (2 - np.log(2)) / 4, (2 + np.log(2)) / 4  # w = 3 below lo, 4 below hi, else 5
    x = np.array([0.0, lo - 1e-9, lo + 1e-9, hi - 1e-9, hi + 1e-9, 1.0])
    assert A.entropy_weights(x).tolist() == [3, 3, 4, 4, 5, 5]
    assert A.entropy_weights(np.array([2.5])).tolist() == [4]  # one response token (R10: NaN in the reference)
    assert A.entropy_weights(np.full(5, 0.7)).tolist() == [4] * 5
    assert A.entropy_weights(np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        A.entropy_weights(np.array([1.0, np.nan]))


def test_align_mined_one_to_one_only_dskd_rule_and_id_filter():
    t, s = VECTORS[0][0], VECTORS[0][1]  # T2S [[0,1],[2],[3]]: T0 covers S0 and S1
    al = A.align_mined(t, s)
    assert al.teacher_row.tolist() == [-1, -1, 1, 2] and al.kind.tolist() == [U, U, OO, OO]
    dskd = A.align_mined(t, s, dskd_rule=True)  # DSKD keeps every student token with a single teacher token
    assert dskd.teacher_row.tolist() == [0, 0, 1, 2] and dskd.kind.tolist() == [ON, ON, OO, OO]
    t_ids, s_ids = np.array([10, 11, 12]), np.array([20, 21, 22, 23])
    t2s_map = np.full(13, -1)
    t2s_map[[10, 11, 12]] = [20, 22, 99]  # the pair (T2, S3) fails DSKD's "student id == mapped teacher id" test
    f = A.align_mined(t, s, t_ids=t_ids, s_ids=s_ids, t2s_map=t2s_map)
    assert f.teacher_row.tolist() == [-1, -1, 1, -1] and f.counts()["groups"] == 1
    # MinED has no special-pair table: </s> vs <|im_end|> is an ordinary mismatch
    assert A.align_mined(["a", "</s>"], ["a", "<|im_end|>"]).teacher_row.tolist() == [0, 1]
    with pytest.raises(ValueError, match="both sides"):
        A.align_mined([], ["a"])


# -------------------------------------------------------------------------------------------- DTW properties

STRS = st.sampled_from(["a", "ab", " ab", "b", "abc", " the", "the", "x", "\ufffd", "</s>", "<|im_end|>", "<|endoftext|>", "", " "])


@HSET
@given(st.lists(STRS, min_size=1, max_size=9), st.lists(STRS, min_size=1, max_size=9), st.data())
def test_align_dtw_equals_reference_like_slow_dtw(t, s, data):
    wt = data.draw(st.lists(st.integers(3, 5), min_size=len(t), max_size=len(t)))
    ws = data.draw(st.lists(st.integers(3, 5), min_size=len(s), max_size=len(s)))
    t2s, s2t, d_end = A.dtw_slow(t, s, wt, ws)
    assert A.align_dtw(t, s, np.array(wt), np.array(ws)) == (t2s, s2t)
    z = A.reference_zero_cost(t, s)
    assert A.dtw_table(A.dtw_cost(t, s, np.array(wt), np.array(ws), z))[-1, -1] == d_end
    al = A.dtw_to_rows(t2s, s2t)
    j, i = al.pairs()
    assert (np.diff(i) > 0).all() and j[-1] == len(s) - 1 and i[-1] == len(t) - 1  # monotone, last tokens paired
    assert al.group_s[:, 1].tolist() == (j + 1).tolist() and al.group_t[:, 1].tolist() == (i + 1).tolist()
    assert al.group_t[1:, 0].tolist() == al.group_t[:-1, 1].tolist()  # groups partition both sides


@HSET
@given(st.lists(STRS, min_size=1, max_size=8), st.lists(STRS, min_size=1, max_size=8), st.integers(2, 9))
def test_uniform_weights_scale_the_cost_not_the_path(t, s, c):
    assert A.align_dtw(t, s, ones(len(t)) * c, ones(len(s))) == A.align_dtw(t, s, ones(len(t)), ones(len(s)))


def test_dtw_is_fast_on_long_sequences():
    """512 x 512 runs through the vectorised path and agrees with the pure-Python reference."""
    rng = np.random.default_rng(0)
    words = ["the", " the", "ab", "c", " x", "yz", "\n", "q"]
    t = [words[k] for k in rng.integers(0, len(words), 512)]
    s = [words[k] for k in rng.integers(0, len(words), 512)]
    wt, ws = rng.integers(3, 6, 512), np.full(512, 4)
    t2s, s2t = A.align_dtw(t, s, wt, ws)
    assert (t2s, s2t) == A.dtw_slow(t, s, wt.tolist(), ws.tolist())[:2]


# ============================================================================================ offsets (§8.1)


def test_offsets_hello_world():
    t, s = spans_of(["Hello", " world", "!"]), spans_of(["Hel", "lo", " wor", "ld!"])  # C = {5, 12}
    al = A.align_offsets(t, s)
    assert al.teacher_row.tolist() == [-1, 0, -1, 2] and al.kind.tolist() == [U, ON, U, NM]
    assert al.group_t.tolist() == [[0, 1], [1, 3]] and al.group_s.tolist() == [[0, 2], [2, 4]]
    assert al.counts() == {"1-1": 0, "1-n": 1, "n-1": 0, "n-m": 1, "unaligned": 2, "groups": 2}


def test_offsets_123_apples_and_regions():
    t, s = spans_of([" 1", "2", "3", " apples"]), spans_of([" 123", " app", "les"])  # C = {4, 11}
    al = A.align_offsets(t, s)
    assert al.teacher_row.tolist() == [2, -1, 3] and al.kind.tolist() == [NO, U, ON]
    assert A.align_offsets(t, s, region=(4, 11)).teacher_row.tolist() == [2, -1, 3]  # e = lo counts
    assert A.align_offsets(t, s, region=(5, 11)).teacher_row.tolist() == [-1, -1, 3]
    assert A.align_offsets(t, s, region=(0, 3)).teacher_row.tolist() == [-1, -1, -1]
    # several trained spans; an empty span on a boundary keeps the one pair that predicts what follows it
    assert A.align_offsets(t, s, region=np.array([[0, 4], [11, 11]])).teacher_row.tolist() == [2, -1, 3]
    assert A.align_offsets(t, s, region=(4, 4)).teacher_row.tolist() == [2, -1, -1]
    assert A.align_offsets(t, s, region=(6, 6)).counts()["groups"] == 0
    # the kind of the group closed at e = 11 does not depend on where the region starts
    assert A.align_offsets(t, s, region=(5, 11)).kind.tolist() == [U, U, ON]


def test_offsets_identical_single_and_empty_sequences():
    sp = spans_of(["a", "bc", " d"])
    al = A.align_offsets(sp, sp)
    assert al.teacher_row.tolist() == [0, 1, 2] and al.kind.tolist() == [OO, OO, OO]
    one = A.align_offsets(np.array([[0, 3]]), np.array([[0, 3]]))
    assert one.teacher_row.tolist() == [0] and one.kind.tolist() == [OO]
    assert A.align_offsets(np.array([[0, 3]]), spans_of(["a", "bc"])).kind.tolist() == [U, ON]
    empty = A.align_offsets(np.zeros((0, 2), np.int32), sp)
    assert empty.teacher_row.tolist() == [-1, -1, -1] and empty.group_t.shape == (0, 2)
    assert A.align_offsets(sp, np.zeros((0, 2))).teacher_row.shape == (0,)


def test_offsets_zero_width_specials_never_pair_and_do_not_count():
    t = np.array([[0, 0], [0, 5], [5, 11], [11, 11]])  # BOS, Hello, " world", EOS
    s = spans_of(["Hello", " world"])
    al = A.align_offsets(t, s)
    assert al.teacher_row.tolist() == [1, 2] and al.kind.tolist() == [OO, OO]
    assert al.group_t.tolist() == [[0, 2], [2, 3]]  # the BOS sits in the first group's range, uncounted
    # a student made only of zero-width tokens has no boundary
    assert A.align_offsets(t, np.array([[0, 0], [11, 11]])).teacher_row.tolist() == [-1, -1]


def test_offsets_characters_split_into_byte_pieces():
    """` naïve 数学 x` (§8.1): byte pieces of one character share a span (SmolLM2 åŃ|¦, byte fallback) or overlap
    (Tekken Ġæķ (6,8) | ° (7,8)); only the last piece ends the character."""
    tekken = np.array([[0, 6], [6, 8], [7, 8], [8, 9], [9, 11]])
    smol = np.array([[0, 3], [3, 6], [6, 7], [7, 8], [8, 9], [8, 9], [9, 11]])
    assert A.boundary_ends(tekken)[0].tolist() == [6, 8, 9, 11] and A.boundary_ends(smol)[0].tolist() == [3, 6, 7, 8, 9, 11]
    al = A.align_offsets(tekken, smol)  # C = {6, 8, 9, 11}
    assert al.teacher_row.tolist() == [-1, 0, -1, 2, -1, 3, 4] and al.kind.tolist() == [U, ON, U, NM, U, ON, OO]
    fallback = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [2, 3], [2, 3], [3, 4]])  # a, b, 4 byte pieces, c
    al = A.align_offsets(spans_of(["a", "b", "😀", "c"]), fallback)
    assert al.teacher_row.tolist() == [0, 1, -1, -1, -1, 2, 3] and al.kind.tolist() == [OO, OO, U, U, U, ON, OO]


def test_offsets_whitespace_gaps_only_move_starts():
    t = spans_of(["Hello", " world", "!"])
    s = np.array([[0, 5], [6, 11], [11, 12]])  # BERT-style: the space belongs to no token
    assert A.align_offsets(t, s).teacher_row.tolist() == [0, 1, 2]


def test_offsets_input_errors():
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        A.align_offsets(np.zeros((3, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="end < start"):
        A.align_offsets(np.array([[3, 1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="not monotone"):
        A.align_offsets(np.array([[0, 5], [5, 7], [1, 2]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="hi < lo"):
        A.align_offsets(np.array([[0, 1]]), np.array([[0, 1]]), region=(3, 2))


# -------------------------------------------------------------------------------------------- offsets properties


@st.composite
def tokenisations(draw, length: int) -> np.ndarray:
    """Random spans tiling [0, length): cuts, characters split into 2-4 byte pieces that share a span or overlap
    Tekken-style, and zero-width tokens at cuts."""
    cuts = sorted(set(draw(st.lists(st.integers(1, length - 1), max_size=length))) | {0, length}) if length > 1 else [0, length]
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if draw(st.integers(0, 4)) == 0:
            spans.append((a, a))  # zero-width special
        style = draw(st.integers(0, 5))
        if style == 0:  # last character as byte pieces sharing its span
            if b - 1 > a:
                spans.append((a, b - 1))
            spans += [(b - 1, b)] * draw(st.integers(2, 4))
        elif style == 1 and b - a >= 2:  # Tekken: the token ends inside a character, the next piece overlaps
            spans += [(a, b), (b - 1, b)]
        else:
            spans.append((a, b))
    if draw(st.booleans()):
        spans.append((length, length))
    return np.array(spans, dtype=np.int64)


@HSET
@given(st.data())
def test_align_offsets_equals_slow_and_groups_cover_the_same_text(data):
    length = data.draw(st.integers(1, 30))
    t, s = data.draw(tokenisations(length)), data.draw(tokenisations(length))
    region = data.draw(st.none() | st.lists(st.tuples(st.integers(0, length), st.integers(0, length)).map(sorted), min_size=1, max_size=3))
    fast, slow = A.align_offsets(t, s, region), A.align_offsets_slow(t, s, region)
    assert fast.teacher_row.tolist() == slow.teacher_row.tolist() and fast.kind.tolist() == slow.kind.tolist()
    assert fast.group_t.tolist() == slow.group_t.tolist() and fast.group_s.tolist() == slow.group_s.tolist()
    j, i = fast.pairs()
    assert (t[i, 1] == s[j, 1]).all()  # every pair ends at the same character
    for (t0, t1), (s0, s1) in zip(fast.group_t, fast.group_s):
        tt, ss = t[t0:t1], s[s0:s1]
        tt, ss = tt[tt[:, 1] > tt[:, 0]], ss[ss[:, 1] > ss[:, 0]]
        assert tt[:, 0].min() == ss[:, 0].min() and tt[:, 1].max() == ss[:, 1].max()  # same text on both sides
    if region is None:
        assert fast.counts()["groups"] == len(np.intersect1d(A.boundary_ends(t)[0], A.boundary_ends(s)[0]))


# -------------------------------------------------------------------------------------------- real tokenizers

NAIVE = " naïve 数学 x"


@pytest.mark.parametrize(
    "name, pieces, ends",
    [("mistral_sp", ["▁na", "ï", "ve", "▁", "数", "学", "▁x"], [3, 4, 6, 7, 8, 9, 11]),
     ("qwen", ["ĠnaÃ¯", "ve", "Ġæķ°", "åŃ¦", "Ġx"], [4, 6, 8, 9, 11]),
     ("smollm2", ["Ġna", "Ã¯ve", "Ġ", "æķ°", "åŃ", "¦", "Ġx"], [3, 6, 7, 8, 9, 11])],
)
def test_real_tokenizers_naive_pieces_and_ends(request, name, pieces, ends):
    rt = request.getfixturevalue(name)
    ids, spans = encode_with_offsets(rt.tok, NAIVE)
    assert [rt.tok.id_to_token(int(i)) for i in ids] == pieces
    assert A.boundary_ends(spans)[0].tolist() == ends


@pytest.mark.parametrize("teacher, student, common", [("qwen", "smollm2", [6, 8, 9, 11]), ("qwen", "mistral_sp", [4, 6, 8, 9, 11]), ("smollm2", "mistral_sp", [3, 6, 7, 8, 9, 11])])
def test_real_tokenizers_naive_common_boundaries(request, teacher, student, common):
    t, s = request.getfixturevalue(teacher), request.getfixturevalue(student)
    _, ts = encode_with_offsets(t.tok, NAIVE)
    _, ss = encode_with_offsets(s.tok, NAIVE)
    al = A.align_offsets(ts, ss)
    j, i = al.pairs()
    assert ss[j, 1].tolist() == common and ts[i, 1].tolist() == common


@pytest.mark.parametrize("teacher", ["smollm2", "qwen"])
def test_real_offsets_groups_cover_the_same_text(request, teacher, mistral_sp):
    """On real prose, every aligned group spells the same bytes on both sides: the teacher's canonical strings,
    the student's (SentencePiece may prepend one space at the very start) and the text itself."""
    t, s = request.getfixturevalue(teacher), mistral_sp
    n_pairs = n_positions = 0
    for text in pydoc_texts(40) + UNICODE_TEXTS:
        t_ids, t_spans = encode_with_offsets(t.tok, text)
        s_ids, s_spans = encode_with_offsets(s.tok, text)
        lo = len(text) // 3
        al = A.align_offsets(t_spans, s_spans, region=(lo, len(text)))
        j, i = al.pairs()
        assert (t_spans[i, 1] == s_spans[j, 1]).all() and (t_spans[i, 1] >= lo).all()
        for (t0, t1), (s0, s1) in zip(al.group_t, al.group_s):
            tb = b"".join(t.cv.key(int(x)) for x in t_ids[t0:t1])
            sb = b"".join(s.cv.key(int(x)) for x in s_ids[s0:s1])
            start = int(t_spans[t0:t1][t_spans[t0:t1, 1] > t_spans[t0:t1, 0], 0].min())
            expected = text[start : int(t_spans[t1 - 1, 1])].encode()
            assert tb == expected and (sb == expected or (s0 == 0 and sb == b" " + expected)), (text[:40], t0, s0)
        n_pairs += len(j)
        n_positions += int((s_spans[:, 1] > lo).sum())
    assert n_pairs > 0.5 * n_positions  # most student positions of the region get a KD row
