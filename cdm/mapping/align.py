"""Sequence alignment as array functions: offset-exact (default), CDM's entropy-weighted DTW, MinED's DTW.

Convention: teacher row i predicts the token after teacher token i; student logits at j predict the token after
student token j. Pairing the teacher and student tokens that END at the same common character boundary e gives
two rows that condition on the same text and predict the same continuation (last-token pairing). Every mode
returns the same per-student-position `Alignment`: ``teacher_row[j]`` (−1 = no KD row) and ``kind[j]``, the kind
of the group that the pair closes (UNALIGNED 0, 1-1 1, 1-n 2 = one teacher / n student tokens, n-1 3, n-m 4;
the codes of `cdm.mapping.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

UNALIGNED, ONE_ONE, ONE_N, N_ONE, N_M = 0, 1, 2, 3, 4
KIND_NAMES = {UNALIGNED: "unaligned", ONE_ONE: "1-1", ONE_N: "1-n", N_ONE: "n-1", N_M: "n-m"}
#: the reference's hard-coded zero-cost pairs: one string from each set, either orientation (§2.4)
REFERENCE_SPECIALS = (frozenset({"</s>", "<|endoftext|>"}), frozenset({"<|im_end|>", "<|endoftext|>"}))
_INF = np.int64(1) << np.int64(60)


@dataclass(frozen=True, eq=False)
class Alignment:
    """Per student position: the paired teacher row (−1 none) and the kind of the group the pair closes; per
    kept group: its teacher and student token ranges [start, stop). Unpacks as ``teacher_row, kind``."""

    teacher_row: np.ndarray  # int32 [m]
    kind: np.ndarray  # int8 [m]
    group_t: np.ndarray  # int32 [G, 2]
    group_s: np.ndarray  # int32 [G, 2]

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.teacher_row, self.kind))

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(student positions, teacher rows) of the aligned pairs, in student order."""
        j = np.flatnonzero(self.teacher_row >= 0)
        return j, self.teacher_row[j]

    def counts(self) -> dict[str, int]:
        """Aligned pairs per group kind, plus ``unaligned`` student positions and ``groups``."""
        aligned = self.kind[self.teacher_row >= 0]
        out = {KIND_NAMES[k]: int((aligned == k).sum()) for k in (ONE_ONE, ONE_N, N_ONE, N_M)}
        out["unaligned"] = int((self.teacher_row < 0).sum())
        out["groups"] = int(len(self.group_t))
        return out


def group_kind(n_teacher: np.ndarray, n_student: np.ndarray) -> np.ndarray:
    """Kind codes of groups with the given token counts on each side."""
    nt, ns = np.asarray(n_teacher), np.asarray(n_student)
    return np.where((nt == 1) & (ns == 1), ONE_ONE, np.where(nt == 1, ONE_N, np.where(ns == 1, N_ONE, N_M))).astype(np.int8)


def _spans(spans: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(spans)
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} spans must have shape [n, 2], got {a.shape}")
    a = a.astype(np.int64)
    bad = np.flatnonzero(a[:, 1] < a[:, 0])
    if len(bad):
        raise ValueError(f"{name} token {int(bad[0])} has span {tuple(a[bad[0]])} with end < start")
    return a


def _regions(region: object) -> np.ndarray | None:
    if region is None:
        return None
    r = np.asarray(region, dtype=np.int64).reshape(-1, 2)
    bad = np.flatnonzero(r[:, 1] < r[:, 0])
    if len(bad):
        raise ValueError(f"region {tuple(r[bad[0]])} has hi < lo")
    return r


def boundary_ends(spans: np.ndarray, name: str = "token") -> tuple[np.ndarray, np.ndarray]:
    """(ends, token index) of the tokens after which the text can be cut: non-empty tokens whose next non-empty
    token starts at or after their end. Zero-width tokens (specials) never define a boundary, byte pieces of one
    character sharing a span count once (at the last piece). Ends come out strictly increasing."""
    a = _spans(spans, name)
    nz = np.flatnonzero(a[:, 1] > a[:, 0])
    if len(nz) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    s, e = a[nz, 0], a[nz, 1]
    ok = np.ones(len(nz), dtype=bool)
    ok[:-1] = s[1:] >= e[:-1]
    ends, idx = e[ok], nz[ok]
    if len(ends) > 1 and (np.diff(ends) <= 0).any():
        k = int(np.flatnonzero(np.diff(ends) <= 0)[0])
        raise ValueError(f"{name} spans are not monotone: token {int(idx[k + 1])} ends at {int(ends[k + 1])}, "
                         f"not after token {int(idx[k])} (end {int(ends[k])})")
    return ends, idx


def align_offsets(t_spans: np.ndarray, s_spans: np.ndarray, region: object = None) -> Alignment:
    """Offset-exact alignment in O(n + m): common boundaries C = ends_T ∩ ends_S; for each e ∈ C inside a region,
    student position (last student token ending at e) gets teacher row (last teacher token ending at e).

    ``region``: None (whole text), (lo, hi), or int [R, 2] spans; boundaries with lo ≤ e ≤ hi count (e = lo pairs the
    last prompt tokens, which predict the first response token). A group runs from the previous common boundary
    (anywhere in the text) to e; its kind counts the non-empty tokens on each side.
    """
    t = _spans(t_spans, "teacher")
    s = _spans(s_spans, "student")
    regions = _regions(region)
    m = len(s)
    teacher_row = np.full(m, -1, dtype=np.int32)
    kind = np.zeros(m, dtype=np.int8)
    te, ti = boundary_ends(t, "teacher")
    se, si = boundary_ends(s, "student")
    common, at, as_ = np.intersect1d(te, se, assume_unique=True, return_indices=True)
    empty = np.zeros((0, 2), dtype=np.int32)
    if len(common) == 0:
        return Alignment(teacher_row, kind, empty, empty)
    t_idx, s_idx = ti[at], si[as_]
    t_rank = np.searchsorted(np.flatnonzero(t[:, 1] > t[:, 0]), t_idx) + 1  # non-empty tokens up to and incl.
    s_rank = np.searchsorted(np.flatnonzero(s[:, 1] > s[:, 0]), s_idx) + 1
    kinds = group_kind(np.diff(t_rank, prepend=0), np.diff(s_rank, prepend=0))
    t_start = np.concatenate([[0], t_idx[:-1] + 1])
    s_start = np.concatenate([[0], s_idx[:-1] + 1])
    if regions is None:
        keep = np.ones(len(common), dtype=bool)
    else:
        keep = ((common[:, None] >= regions[None, :, 0]) & (common[:, None] <= regions[None, :, 1])).any(axis=1)
    teacher_row[s_idx[keep]] = t_idx[keep]
    kind[s_idx[keep]] = kinds[keep]
    group_t = np.stack([t_start[keep], t_idx[keep] + 1], axis=1).astype(np.int32)
    group_s = np.stack([s_start[keep], s_idx[keep] + 1], axis=1).astype(np.int32)
    return Alignment(teacher_row, kind, group_t, group_s)


def align_offsets_slow(t_spans: np.ndarray, s_spans: np.ndarray, region: object = None) -> Alignment:
    """Reference for `align_offsets`: the same definition with Python loops, sets and dicts."""
    tl = [(int(a), int(b)) for a, b in np.asarray(t_spans).reshape(-1, 2)]
    sl = [(int(a), int(b)) for a, b in np.asarray(s_spans).reshape(-1, 2)]
    regions = [] if region is None else [(int(a), int(b)) for a, b in np.asarray(region).reshape(-1, 2)]

    def ends(spans: list[tuple[int, int]]) -> dict[int, int]:
        nz = [(i, a, b) for i, (a, b) in enumerate(spans) if b > a]
        out = {}
        for k, (i, _, b) in enumerate(nz):
            if k == len(nz) - 1 or nz[k + 1][1] >= b:
                out[b] = i
        return out

    te, se = ends(tl), ends(sl)
    row = np.full(len(sl), -1, np.int32)
    kind = np.zeros(len(sl), np.int8)
    gt, gs = [], []
    prev_t, prev_s = -1, -1
    for e in sorted(set(te) & set(se)):
        nt = sum(1 for i in range(prev_t + 1, te[e] + 1) if tl[i][1] > tl[i][0])
        ns = sum(1 for j in range(prev_s + 1, se[e] + 1) if sl[j][1] > sl[j][0])
        if region is None or any(lo <= e <= hi for lo, hi in regions):
            row[se[e]] = te[e]
            kind[se[e]] = ONE_ONE if nt == ns == 1 else ONE_N if nt == 1 else N_ONE if ns == 1 else N_M
            gt.append((prev_t + 1, te[e] + 1))
            gs.append((prev_s + 1, se[e] + 1))
        prev_t, prev_s = te[e], se[e]
    return Alignment(row, kind, np.asarray(gt, np.int32).reshape(-1, 2), np.asarray(gs, np.int32).reshape(-1, 2))


# ------------------------------------------------------------------------------------------ DTW (reference-compatible)


def entropy_weights(entropy: np.ndarray) -> np.ndarray:
    """CDM's per-position DTW weights (§2.3): x = min-max normalised entropy, w = ⌊3 + 3·σ(4x − 2)⌋ ∈ {3, 4, 5}
    (int64, computed in float64). Bug R10 fixed: constant entropy (e.g. one position) gives w = 4 everywhere."""
    h = np.asarray(entropy, dtype=np.float64)
    if h.size == 0:
        return np.zeros(h.shape, dtype=np.int64)
    if not np.isfinite(h).all():
        raise ValueError("entropy weights need finite entropies")
    span = h.max() - h.min()
    if span <= 0:
        return np.full(h.shape, 4, dtype=np.int64)
    x = (h - h.min()) / span
    return np.floor(3 + 3 / (1 + np.exp(-(4 * x - 2)))).astype(np.int64)


def reference_zero_cost(t_strs: Sequence[str], s_strs: Sequence[str]) -> np.ndarray:
    """bool [n, m]: the reference's special pairs that cost 0 (one string in each REFERENCE_SPECIALS set)."""
    a, b = REFERENCE_SPECIALS
    ta = np.fromiter((x in a for x in t_strs), bool, len(t_strs))
    tb = np.fromiter((x in b for x in t_strs), bool, len(t_strs))
    sa = np.fromiter((x in a for x in s_strs), bool, len(s_strs))
    sb = np.fromiter((x in b for x in s_strs), bool, len(s_strs))
    return (ta[:, None] & sb[None, :]) | (tb[:, None] & sa[None, :])


def _unique(strs: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-occurrence order and the index of each input in that list."""
    table: dict[str, int] = {}
    inv = np.fromiter((table.setdefault(x, len(table)) for x in strs), np.int64, len(strs))
    return list(table), inv


def dtw_cost(
    t_strs: Sequence[str], s_strs: Sequence[str], t_weights: np.ndarray, s_weights: np.ndarray, zero_cost: np.ndarray | None = None
) -> np.ndarray:
    """int64 [n, m]: Levenshtein(space-stripped strings) × w_t[i] × w_s[j], 0 where ``zero_cost``. Distances are
    computed once per pair of distinct strings."""
    n, m = len(t_strs), len(s_strs)
    wt = np.asarray(t_weights, dtype=np.int64).reshape(-1)
    ws = np.asarray(s_weights, dtype=np.int64).reshape(-1)
    if len(wt) != n or len(ws) != m:
        raise ValueError(f"DTW weights must match the sequences: {len(wt)} teacher weights for {n} strings, {len(ws)} student weights for {m}")
    ut, t_inv = _unique([x.replace(" ", "") for x in t_strs])
    us, s_inv = _unique([x.replace(" ", "") for x in s_strs])
    lev = process.cdist(ut, us, scorer=Levenshtein.distance, dtype=np.int64, workers=1)
    cost = lev[np.ix_(t_inv, s_inv)]
    cost *= wt[:, None]
    cost *= ws[None, :]
    if zero_cost is not None:
        cost[np.asarray(zero_cost, dtype=bool)] = 0
    return cost


def dtw_table(cost: np.ndarray) -> np.ndarray:
    """Accumulated cost A[i, j] = cost[i, j] + min(A[i−1, j], A[i, j−1], A[i−1, j−1]) (A[0, 0] = cost[0, 0]).

    Row by row with a prefix minimum instead of a Python loop over j: within row i,
    A[i, j] = C_j + min_{k ≤ j}(a_k − C_{k−1}), with a_k = min(A[i−1, k−1], A[i−1, k]) and C the row's cumsum.
    """
    c = np.asarray(cost, dtype=np.int64)
    n, m = c.shape
    csum = np.cumsum(c, axis=1)
    excl = csum - c  # C_{k-1}
    D = np.empty((n + 1, m + 1), dtype=np.int64)  # the reference's table; A = D[1:, 1:]
    D[0, 0] = 0
    D[0, 1:] = _INF
    D[1:, 0] = _INF
    tmp = np.empty(m, dtype=np.int64)
    for i in range(n):
        np.minimum(D[i, :-1], D[i, 1:], out=tmp)
        tmp -= excl[i]
        np.minimum.accumulate(tmp, out=tmp)
        np.add(tmp, csum[i], out=D[i + 1, 1:])
    return D[1:, 1:]


def dtw_backtrack(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path cells (i, j) from (0, 0) to (n−1, m−1) as two int64 arrays; at each step the predecessor with the
    smallest A, ties: diagonal, then teacher−1, then student−1 (the reference's order)."""
    n, m = A.shape
    flat = np.ascontiguousarray(A).reshape(-1)
    at = flat.item
    i, j = n - 1, m - 1
    pi, pj = [i], [j]
    inf = int(_INF)
    while i > 0 or j > 0:
        k = i * m + j
        diag = at(k - m - 1) if i > 0 and j > 0 else inf
        up = at(k - m) if i > 0 else inf
        left = at(k - 1) if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        pi.append(i)
        pj.append(j)
    return np.asarray(pi[::-1], dtype=np.int64), np.asarray(pj[::-1], dtype=np.int64)


def path_to_lists(pi: np.ndarray, pj: np.ndarray, n: int, m: int) -> tuple[list[list[int]], list[list[int]]]:
    """T2S and S2T lists (ascending) of a monotone path."""
    t2s: list[list[int]] = [[] for _ in range(n)]
    s2t: list[list[int]] = [[] for _ in range(m)]
    for i, j in zip(pi.tolist(), pj.tolist()):
        t2s[i].append(j)
        s2t[j].append(i)
    return t2s, s2t


def align_dtw(
    t_strs: Sequence[str],
    s_strs: Sequence[str],
    t_weights: np.ndarray,
    s_weights: np.ndarray,
    zero_cost: np.ndarray | None = None,
    reference_specials: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """CDM's weighted DTW (§2.4), vectorised: returns (T2S, S2T), the student indices of each teacher index and
    vice versa, exactly as the reference. Cost 0 for the reference's special pairs (``reference_specials``) and
    wherever ``zero_cost`` [n, m] is True (e.g. specials matched by role)."""
    n, m = len(t_strs), len(s_strs)
    if n == 0 or m == 0:
        raise ValueError(f"DTW needs tokens on both sides, got {n} teacher and {m} student tokens")
    z = reference_zero_cost(t_strs, s_strs) if reference_specials else np.zeros((n, m), dtype=bool)
    if zero_cost is not None:
        z = z | np.asarray(zero_cost, dtype=bool)
    A = dtw_table(dtw_cost(t_strs, s_strs, t_weights, s_weights, z))
    return path_to_lists(*dtw_backtrack(A), n, m)


def dtw_slow(
    t_strs: Sequence[str], s_strs: Sequence[str], t_weights: Sequence[int], s_weights: Sequence[int], reference_specials: bool = True
) -> tuple[list[list[int]], list[list[int]], float]:
    """Pure-Python O(n·m) DTW written like the reference (numpy table, one edit-distance call per cell):
    returns (T2S, S2T, D_end). For differential tests and the benchmark baseline."""
    a, b = REFERENCE_SPECIALS
    n, m = len(t_strs), len(s_strs)
    D = np.zeros((n + 1, m + 1))
    D[0, :] = np.inf
    D[:, 0] = np.inf
    D[0, 0] = 0
    for i in range(n):
        for j in range(m):
            x, y = t_strs[i], s_strs[j]
            if reference_specials and ((x in a and y in b) or (x in b and y in a)):
                cost = 0
            else:
                cost = Levenshtein.distance(x.replace(" ", ""), y.replace(" ", "")) * t_weights[i] * s_weights[j]
            D[i + 1, j + 1] = cost + min(D[i, j + 1], D[i + 1, j], D[i, j])
    A = D[1:, 1:]
    i, j = n - 1, m - 1
    t2s: list[list[int]] = [[] for _ in range(n)]
    s2t: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        t2s[i].append(j)
        s2t[j].append(i)
        diag = A[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = A[i - 1, j] if i > 0 else np.inf
        left = A[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    t2s[0].append(0)
    s2t[0].append(0)
    return [x[::-1] for x in t2s], [x[::-1] for x in s2t], float(D[n, m])


def reference_groups(t2s: Sequence[Sequence[int]]) -> list[list[int]]:
    """The reference's merge groups (§2.5): T2S lists deduplicated in first-occurrence order (may overlap)."""
    out: list[list[int]] = []
    for g in t2s:
        if list(g) not in out:
            out.append(list(g))
    return out


def _path_from_lists(t2s: Sequence[Sequence[int]], s2t: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(x) for x in t2s), np.int64, len(t2s))
    pi = np.repeat(np.arange(len(t2s), dtype=np.int64), lens)
    pj = np.fromiter((j for x in t2s for j in x), np.int64, int(lens.sum()))
    order = np.lexsort((pj, pi))
    pi, pj = pi[order], pj[order]
    n, m = len(t2s), len(s2t)
    steps_ok = len(pi) > 0 and pi[0] == 0 and pj[0] == 0 and pi[-1] == n - 1 and pj[-1] == m - 1
    if steps_ok and len(pi) > 1:
        di, dj = np.diff(pi), np.diff(pj)
        steps_ok = bool(((di >= 0) & (di <= 1) & (dj >= 0) & (dj <= 1) & ((di + dj) > 0)).all())
    if not steps_ok or sum(len(x) for x in s2t) != len(pi):
        raise ValueError("T2S/S2T do not describe a monotone DTW path from (0, 0) to (n-1, m-1)")
    return pi, pj


def dtw_to_rows(
    t2s: Sequence[Sequence[int]],
    s2t: Sequence[Sequence[int]],
    t_positions: np.ndarray | None = None,
    s_positions: np.ndarray | None = None,
    m: int | None = None,
    one_to_one_only: bool = False,
) -> Alignment:
    """Turn a DTW path into the per-student-position representation. Groups = maximal runs of path cells joined
    by teacher-only or student-only steps (a diagonal step starts a new group; staircases merge, so groups never
    overlap). The last student token of each group gets the group's last teacher token; inner positions −1.

    ``t_positions``/``s_positions`` map local indices to sequence positions (e.g. the response tokens given to the
    DTW), and ``m`` is the full student length; by default the result is local.
    """
    pi, pj = _path_from_lists(t2s, s2t)
    new = np.ones(len(pi), dtype=bool)
    new[1:] = (pi[1:] != pi[:-1]) & (pj[1:] != pj[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:] - 1, len(pi) - 1)
    kinds = group_kind(pi[ends] - pi[starts] + 1, pj[ends] - pj[starts] + 1)
    keep = kinds == ONE_ONE if one_to_one_only else np.ones(len(starts), dtype=bool)
    return _rows_from_groups(pi[starts], pi[ends], pj[starts], pj[ends], kinds, keep, len(s2t), t_positions, s_positions, m)


def _rows_from_groups(
    t0: np.ndarray, t1: np.ndarray, s0: np.ndarray, s1: np.ndarray, kinds: np.ndarray, keep: np.ndarray,
    m_local: int, t_positions: np.ndarray | None, s_positions: np.ndarray | None, m: int | None,
) -> Alignment:
    tp = np.arange(int(t1.max()) + 1 if len(t1) else 0) if t_positions is None else np.asarray(t_positions, dtype=np.int64)
    sp = np.arange(m_local) if s_positions is None else np.asarray(s_positions, dtype=np.int64)
    size = m_local if m is None else int(m)
    teacher_row = np.full(size, -1, dtype=np.int32)
    kind = np.zeros(size, dtype=np.int8)
    teacher_row[sp[s1[keep]]] = tp[t1[keep]]
    kind[sp[s1[keep]]] = kinds[keep]
    group_t = np.stack([tp[t0[keep]], tp[t1[keep]] + 1], axis=1).astype(np.int32).reshape(-1, 2)
    group_s = np.stack([sp[s0[keep]], sp[s1[keep]] + 1], axis=1).astype(np.int32).reshape(-1, 2)
    return Alignment(teacher_row, kind, group_t, group_s)


def align_mined(
    t_strs: Sequence[str],
    s_strs: Sequence[str],
    t_ids: np.ndarray | None = None,
    s_ids: np.ndarray | None = None,
    t2s_map: np.ndarray | None = None,
    dskd_rule: bool = False,
) -> Alignment:
    """MinED baseline: unweighted DTW over space-stripped strings (no special-pair table), 1-1 pairs only.

    ``dskd_rule``: DSKD's looser test instead (student j kept when S2T[j] has one teacher token, even if that
    teacher token also covers other student tokens). With ``t_ids``/``s_ids``/``t2s_map`` (the static MinED map)
    a pair is kept only when the student token equals the mapped teacher token, as DSKD does.
    """
    n, m = len(t_strs), len(s_strs)
    if n == 0 or m == 0:
        raise ValueError(f"DTW needs tokens on both sides, got {n} teacher and {m} student tokens")
    A = dtw_table(dtw_cost(t_strs, s_strs, np.ones(n, np.int64), np.ones(m, np.int64)))
    t2s, s2t = path_to_lists(*dtw_backtrack(A), n, m)
    if not dskd_rule:
        al = dtw_to_rows(t2s, s2t, one_to_one_only=True)
    else:
        js = np.asarray([j for j in range(m) if len(s2t[j]) == 1], dtype=np.int64)
        ti = np.asarray([s2t[j][0] for j in js], dtype=np.int64)
        nt = np.asarray([len(t2s[i]) for i in ti], dtype=np.int64)
        kinds = group_kind(np.ones(len(js), np.int64), nt)  # one teacher token, nt student tokens share it
        teacher_row = np.full(m, -1, np.int32)
        kind = np.zeros(m, np.int8)
        teacher_row[js] = ti
        kind[js] = kinds
        al = Alignment(teacher_row, kind, np.stack([ti, ti + 1], 1).astype(np.int32).reshape(-1, 2),
                       np.stack([js, js + 1], 1).astype(np.int32).reshape(-1, 2))
    if t2s_map is not None:
        if t_ids is None or s_ids is None:
            raise ValueError("align_mined: t2s_map needs t_ids and s_ids")
        t_ids, s_ids, t2s_map = np.asarray(t_ids), np.asarray(s_ids), np.asarray(t2s_map)
        j, i = al.pairs()
        bad = j[t2s_map[t_ids[i]] != s_ids[j]]
        if len(bad):
            teacher_row, kind = al.teacher_row.copy(), al.kind.copy()
            teacher_row[bad], kind[bad] = -1, UNALIGNED
            keep = ~np.isin(al.group_s[:, 1] - 1, bad)
            al = Alignment(teacher_row, kind, al.group_t[keep], al.group_s[keep])
    return al
