"""Sequence alignment as array functions: offset-exact (default), CDM's entropy-weighted DTW, MinED's DTW.

Convention everywhere: teacher row i predicts the token after teacher token i, student logits at j predict the
token after student token j. Pairing the teacher and student tokens that END at the same common character
boundary e gives two rows that condition on the same text and predict the same continuation (last-token
pairing). Every mode returns the same per-student-position representation: ``teacher_row[j]`` (−1 = no KD
row) and ``kind[j]`` (the kind of the group the pair closes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

UNALIGNED, ONE_ONE, ONE_N, N_ONE, N_M = 0, 1, 2, 3, 4  # same codes as cdm.mapping.store.KIND_*


@dataclass
class Alignment:
    teacher_row: np.ndarray  # int32 [m]
    kind: np.ndarray  # int8 [m]

    def counts(self) -> dict[str, int]:
        names = {UNALIGNED: "unaligned", ONE_ONE: "1-1", ONE_N: "1-n", N_ONE: "n-1", N_M: "n-m"}
        return {names[k]: int((self.kind[self.teacher_row >= 0] == k).sum()) if k else int((self.teacher_row < 0).sum()) for k in names}


def group_kind(n_teacher: np.ndarray, n_student: np.ndarray) -> np.ndarray:
    """Kind code of groups with the given token counts on each side."""
    nt, ns = np.asarray(n_teacher), np.asarray(n_student)
    return np.where((nt == 1) & (ns == 1), ONE_ONE, np.where(nt == 1, ONE_N, np.where(ns == 1, N_ONE, N_M))).astype(np.int8)


def boundary_ends(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ends, token index) of tokens after which the text can be cut: the next non-empty token starts at or
    after this end. Zero-width tokens (specials) never define a boundary; byte pieces of one character that
    share a span only count once, at their last piece. Ends come out strictly increasing."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    idx = np.flatnonzero(spans[:, 1] > spans[:, 0])
    if len(idx) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    s, e = spans[idx, 0], spans[idx, 1]
    ok = np.ones(len(idx), dtype=bool)
    ok[:-1] = s[1:] >= e[:-1]
    return e[ok], idx[ok]


def align_offsets(t_spans: np.ndarray, s_spans: np.ndarray, region: tuple[int, int] | None = None) -> Alignment:
    """Offset-exact alignment, O(n + m): pair the last tokens of every group closed by a common boundary.

    `region` = (lo, hi): only boundaries lo <= e <= hi produce pairs (e = lo pairs the last prompt tokens, which
    predict the first response token). Group kinds count every non-empty token ending inside the group.
    """
    t_spans = np.asarray(t_spans, dtype=np.int64).reshape(-1, 2)
    s_spans = np.asarray(s_spans, dtype=np.int64).reshape(-1, 2)
    m = len(s_spans)
    teacher_row = np.full(m, -1, dtype=np.int32)
    kind = np.zeros(m, dtype=np.int8)
    te, ti = boundary_ends(t_spans)
    se, si = boundary_ends(s_spans)
    common, at, as_ = np.intersect1d(te, se, assume_unique=True, return_indices=True)
    if len(common) == 0:
        return Alignment(teacher_row, kind)
    t_end_sorted = np.sort(t_spans[t_spans[:, 1] > t_spans[:, 0], 1])
    s_end_sorted = np.sort(s_spans[s_spans[:, 1] > s_spans[:, 0], 1])
    t_cum = np.searchsorted(t_end_sorted, common, side="right")
    s_cum = np.searchsorted(s_end_sorted, common, side="right")
    n_t = np.diff(np.concatenate([[0], t_cum]))
    n_s = np.diff(np.concatenate([[0], s_cum]))
    kinds = group_kind(n_t, n_s)
    keep = np.ones(len(common), dtype=bool) if region is None else (common >= region[0]) & (common <= region[1])
    rows_t, rows_s = ti[at[keep]], si[as_[keep]]
    teacher_row[rows_s] = rows_t
    kind[rows_s] = kinds[keep]
    return Alignment(teacher_row, kind)


def align_offsets_slow(t_spans: np.ndarray, s_spans: np.ndarray, region: tuple[int, int] | None = None) -> Alignment:
    """Reference: the same definition with Python sets and loops (tests only)."""
    t_spans = [tuple(map(int, x)) for x in np.asarray(t_spans).reshape(-1, 2)]
    s_spans = [tuple(map(int, x)) for x in np.asarray(s_spans).reshape(-1, 2)]

    def ends(spans: list[tuple[int, int]]) -> dict[int, int]:
        nz = [(i, a, b) for i, (a, b) in enumerate(spans) if b > a]
        out = {}
        for k, (i, a, b) in enumerate(nz):
            if k == len(nz) - 1 or nz[k + 1][1] >= b:
                out[b] = i
        return out

    te, se = ends(t_spans), ends(s_spans)
    row = np.full(len(s_spans), -1, np.int32)
    kind = np.zeros(len(s_spans), np.int8)
    prev = -1
    for e in sorted(set(te) & set(se)):
        nt = sum(1 for a, b in t_spans if b > a and prev < b <= e)
        ns = sum(1 for a, b in s_spans if b > a and prev < b <= e)
        if region is None or region[0] <= e <= region[1]:
            row[se[e]] = te[e]
            kind[se[e]] = group_kind(np.array([nt]), np.array([ns]))[0]
        prev = e
    return Alignment(row, kind)


# ------------------------------------------------------------------------------------------ DTW (reference-compatible)


def entropy_weights(entropy: np.ndarray) -> np.ndarray:
    """CDM's per-position weights: x = min-max normalised entropy, w = floor(3 + 3·sigmoid(4x − 2)) in {3,4,5}.

    Bug R10 fixed: a constant entropy (or a single position) gives w = 4 everywhere instead of NaN.
    """
    h = np.asarray(entropy, dtype=np.float64)
    if h.size == 0:
        return np.zeros(0, dtype=np.int64)
    span = h.max() - h.min()
    if not np.isfinite(span) or span <= 0:
        return np.full(h.shape, 4, dtype=np.int64)
    x = (h - h.min()) / span
    return np.floor(3 + 3 / (1 + np.exp(-(4 * x - 2)))).astype(np.int64)


def dtw_cost(t_strs: list[str], s_strs: list[str], w_t: np.ndarray, w_s: np.ndarray) -> np.ndarray:
    """cost(i, j) = Levenshtein(space-stripped strings) × w_t[i] × w_s[j] (reference §2.4; no special-pair table)."""
    a = [x.replace(" ", "") for x in t_strs]
    b = [x.replace(" ", "") for x in s_strs]
    lev = process.cdist(a, b, scorer=Levenshtein.distance, dtype=np.int64, workers=1)
    return lev * np.asarray(w_t, dtype=np.int64)[:, None] * np.asarray(w_s, dtype=np.int64)[None, :]


def dtw_table(cost: np.ndarray) -> np.ndarray:
    """Accumulated cost A[i, j] = cost[i, j] + min(A[i−1, j], A[i, j−1], A[i−1, j−1]), by anti-diagonals."""
    n, m = cost.shape
    big = np.iinfo(np.int64).max // 4
    D = np.full((n + 1, m + 1), big, dtype=np.int64)
    D[0, 0] = 0
    for d in range(2, n + m + 1):  # D index diagonal: i + j = d, with 1 <= i <= n, 1 <= j <= m
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        D[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(D[i - 1, j], D[i, j - 1]), D[i - 1, j - 1])
    return D[1:, 1:]


def dtw_backtrack(A: np.ndarray) -> list[tuple[int, int]]:
    """Path from (0,0) to (n−1,m−1); ties: diagonal, then teacher−1, then student−1 (reference order)."""
    n, m = A.shape
    i, j = n - 1, m - 1
    big = np.iinfo(np.int64).max
    path = [(i, j)]
    while (i, j) != (0, 0):
        diag = A[i - 1, j - 1] if i > 0 and j > 0 else big
        up = A[i - 1, j] if i > 0 else big
        left = A[i, j - 1] if j > 0 else big
        best = min(diag, up, left)
        if diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def align_dtw(t_strs: list[str], s_strs: list[str], w_t: np.ndarray, w_s: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """CDM's weighted DTW: T2S[i] = student indices paired with teacher i, S2T[j] likewise (reference §2.4)."""
    A = dtw_table(dtw_cost(t_strs, s_strs, w_t, w_s))
    t2s: list[list[int]] = [[] for _ in t_strs]
    s2t: list[list[int]] = [[] for _ in s_strs]
    for i, j in dtw_backtrack(A):
        t2s[i].append(j)
        s2t[j].append(i)
    return t2s, s2t


def dtw_slow(t_strs: list[str], s_strs: list[str], w_t: list[int], w_s: list[int]) -> tuple[list[list[int]], list[list[int]], int]:
    """Pure-Python O(n·m) DTW written like the reference, one edit-distance call per cell (tests/benchmarks)."""
    n, m = len(t_strs), len(s_strs)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(n):
        for j in range(m):
            c = Levenshtein.distance(t_strs[i].replace(" ", ""), s_strs[j].replace(" ", "")) * w_t[i] * w_s[j]
            D[i + 1][j + 1] = c + min(D[i][j + 1], D[i + 1][j], D[i][j])
    A = [row[1:] for row in D[1:]]
    i, j = n - 1, m - 1
    t2s: list[list[int]] = [[] for _ in range(n)]
    s2t: list[list[int]] = [[] for _ in range(m)]
    while (i, j) != (0, 0):
        t2s[i].append(j)
        s2t[j].append(i)
        cands = [
            (A[i - 1][j - 1] if i > 0 and j > 0 else inf, 0),
            (A[i - 1][j] if i > 0 else inf, 1),
            (A[i][j - 1] if j > 0 else inf, 2),
        ]
        best = min(c for c, _ in cands)
        step = next(k for c, k in cands if c == best)
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    t2s[0].append(0)
    s2t[0].append(0)
    return [sorted(x) for x in t2s], [sorted(x) for x in s2t], int(D[n][m])


def path_groups(t2s: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """Split a monotone DTW path into groups: maximal runs of cells joined by teacher-only or student-only steps."""
    cells = sorted((i, j) for i, js in enumerate(t2s) for j in js)
    groups: list[tuple[list[int], list[int]]] = []
    prev = None
    for i, j in cells:
        if prev is None or (i != prev[0] and j != prev[1]):
            groups.append(([i], [j]))
        else:
            ti, sj = groups[-1]
            if i not in ti:
                ti.append(i)
            if j not in sj:
                sj.append(j)
        prev = (i, j)
    return groups


def dtw_to_rows(t2s: list[list[int]], s2t: list[list[int]], one_to_one_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per student position: the paired teacher index (last teacher token of its group, at the group's last
    student token; inner positions −1) and the group kind."""
    m = len(s2t)
    rows = np.full(m, -1, dtype=np.int32)
    kinds = np.zeros(m, dtype=np.int8)
    for ti, sj in path_groups(t2s):
        k = int(group_kind(np.array([len(ti)]), np.array([len(sj)]))[0])
        if one_to_one_only and k != ONE_ONE:
            continue
        rows[max(sj)] = max(ti)
        kinds[max(sj)] = k
    return rows, kinds


def align_mined(t_strs: list[str], s_strs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """MinED baseline: unweighted DTW over space-stripped strings, 1↔1 pairs only."""
    ones_t = np.ones(len(t_strs), dtype=np.int64)
    ones_s = np.ones(len(s_strs), dtype=np.int64)
    t2s, s2t = align_dtw(t_strs, s_strs, ones_t, ones_s)
    return dtw_to_rows(t2s, s2t, one_to_one_only=True)
