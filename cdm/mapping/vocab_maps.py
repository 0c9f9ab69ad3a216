"""Maps between two canonical vocabularies: exact match (−1 = unmapped), its inverse, fuzzy neighbours (CSR),
MinED nearest tokens. Each fast function has a slow pure-Python reference (``*_slow``) for differential tests.

Distances are raw Levenshtein distances between body strings (bytes decoded with surrogate escapes, so invalid
UTF-8 pieces stay distinct) counted in characters. nd(a, b) = lev(a, b) / (len(a) + len(b)), 0 when both are
empty, as in the CDM reference; rapidfuzz's own normalised Levenshtein divides by the max length and its Indel
distance counts a substitution twice, so the division is done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from cdm.mapping.vocab import KIND_BYTE, KIND_MISSING, KIND_SPECIAL, TEXT_KINDS, CanonicalVocab

#: a teacher role maps to the student token of the same role, else to the first fallback role the student has
ROLE_FALLBACKS = {"eot": ("eos",), "eos": ("eot",)}
#: order in which roles of one id are tried
ROLE_PRIORITY = ("eos", "eot", "bos", "pad", "unk", "bot", "cls", "sep", "mask")
_CELLS_PER_BLOCK = 1 << 23  # bound on one cdist result matrix (int32: 32 MiB)


@dataclass(frozen=True, eq=False)
class Neighbours:
    """CSR rows: source id r owns ``indices[indptr[r]:indptr[r+1]]`` (ranked by distance, then id) and ``dist``."""

    indptr: np.ndarray  # int64 [V_src + 1]
    indices: np.ndarray  # int32 [P]
    dist: np.ndarray  # float32 [P]

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.indptr[r]), int(self.indptr[r + 1])
        return self.indices[a:b], self.dist[a:b]


@dataclass(frozen=True, eq=False)
class InverseMap:
    """dst -> src view of a src -> dst map: one chosen src id per dst id (−1 = none) and all preimages as CSR."""

    single: np.ndarray  # int32 [V_dst]
    indptr: np.ndarray  # int64 [V_dst + 1]
    indices: np.ndarray  # int32 [P]: preimages of dst id d, ascending

    def preimages(self, d: int) -> np.ndarray:
        return self.indices[self.indptr[d] : self.indptr[d + 1]]


# ------------------------------------------------------------------------------------------ exact map


def vocab_relation(a: CanonicalVocab, b: CanonicalVocab) -> str | None:
    """"identity" when both tables are equal, "prefix" when one is a prefix of the other (same family,
    different widths), else None."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    o = int(min(a.offsets[n], b.offsets[n]))
    same = (
        np.array_equal(a.kind[:n], b.kind[:n])
        and np.array_equal(a.space[:n], b.space[:n])
        and np.array_equal(a.offsets[: n + 1], b.offsets[: n + 1])
        and np.array_equal(a.bodies[:o], b.bodies[:o])
    )
    if not same:
        return None
    return "identity" if len(a) == len(b) else "prefix"


def _text_key(cv: CanonicalVocab, i: int, body: bytes, space_insensitive: bool) -> bytes:
    return body if space_insensitive else (b"\x01" if cv.space[i] else b"\x00") + body


def exact_map(teacher_cv: CanonicalVocab, student_cv: CanonicalVocab, space_insensitive: bool = False) -> np.ndarray:
    """teacher id -> student id with the identical canonical (space, body), int32[Vt], −1 = unmapped.

    Among several student ids with one form, a normal/added token wins over a byte-fallback piece, then the lowest
    id. Special tokens map by role (teacher eos -> student eos; eot falls back to eos and back), then by identical
    content; ids with a role follow their role even when their text would match. ``space_insensitive`` ignores
    the leading-space flag (a same-flag match still wins). Identical or prefix tables give the identity map.
    """
    vt = len(teacher_cv)
    if vocab_relation(teacher_cv, student_cv) is not None:
        return _identity_map(teacher_cv, student_cv)
    s_bodies = student_cv.body_list()
    exact: dict[bytes, int] = {}
    loose: dict[bytes, int] = {}
    specials: dict[bytes, int] = {}
    # descending ids, byte pieces first: later writes (lower ids, normal tokens) win
    order = sorted(range(len(student_cv)), key=lambda j: (student_cv.kind[j] != KIND_BYTE, -j))
    for j in order:
        k = student_cv.kind[j]
        if k == KIND_SPECIAL:
            specials[s_bodies[j]] = j
        elif k in TEXT_KINDS and (s_bodies[j] or student_cv.space[j]):
            exact[_text_key(student_cv, j, s_bodies[j], False)] = j
            if space_insensitive:
                loose[s_bodies[j]] = j
    out = np.full(vt, -1, dtype=np.int32)
    t_bodies = teacher_cv.body_list()
    for i in range(vt):
        k = teacher_cv.kind[i]
        if k == KIND_SPECIAL:
            out[i] = specials.get(t_bodies[i], -1)
        elif k in TEXT_KINDS and (t_bodies[i] or teacher_cv.space[i]):
            j = exact.get(_text_key(teacher_cv, i, t_bodies[i], False), -1)
            if j < 0 and space_insensitive:
                j = loose.get(t_bodies[i], -1)
            out[i] = j
    for i, j in role_map(teacher_cv, student_cv).items():
        out[i] = j
    return out


def _identity_map(teacher_cv: CanonicalVocab, student_cv: CanonicalVocab) -> np.ndarray:
    """Same family: id -> same id over the common prefix (missing ids −1), roles still mapped by role."""
    n = min(len(teacher_cv), len(student_cv))
    out = np.full(len(teacher_cv), -1, dtype=np.int32)
    out[:n] = np.arange(n, dtype=np.int32)
    out[:n][teacher_cv.kind[:n] == KIND_MISSING] = -1
    for i, j in role_map(teacher_cv, student_cv).items():
        out[i] = j
    return out


def role_map(teacher_cv: CanonicalVocab, student_cv: CanonicalVocab) -> dict[int, int]:
    """teacher id -> student id for every teacher id with a role the student can answer (see ROLE_FALLBACKS)."""
    out: dict[int, int] = {}
    for i, roles in teacher_cv.ids_with_role().items():
        ranked = sorted(roles, key=lambda r: ROLE_PRIORITY.index(r) if r in ROLE_PRIORITY else len(ROLE_PRIORITY))
        for role in ranked:
            for cand in (role,) + ROLE_FALLBACKS.get(role, ()):
                if cand in student_cv.roles:
                    out[i] = int(student_cv.roles[cand])
                    break
            if i in out:
                break
    return out


def exact_map_slow(teacher_cv: CanonicalVocab, student_cv: CanonicalVocab, space_insensitive: bool = False) -> np.ndarray:
    """Reference for `exact_map`: the identity shortcut, else scan every student id for every teacher id."""
    if vocab_relation(teacher_cv, student_cv) is not None:
        return _identity_map(teacher_cv, student_cv)
    out = np.full(len(teacher_cv), -1, dtype=np.int32)
    rm = role_map(teacher_cv, student_cv)
    for i in range(len(teacher_cv)):
        if i in rm:
            out[i] = rm[i]
            continue
        ki, bi, si = teacher_cv.kind[i], teacher_cv.body(i), bool(teacher_cv.space[i])
        if ki == KIND_SPECIAL:
            hits = [j for j in range(len(student_cv)) if student_cv.kind[j] == KIND_SPECIAL and student_cv.body(j) == bi]
            out[i] = min(hits) if hits else -1
            continue
        if ki not in TEXT_KINDS or (not bi and not si):
            continue
        best = None
        for j in range(len(student_cv)):
            kj, bj, sj = student_cv.kind[j], student_cv.body(j), bool(student_cv.space[j])
            if kj not in TEXT_KINDS or bj != bi or (not bj and not sj):
                continue
            if sj != si and not space_insensitive:
                continue
            rank = (sj != si, kj == KIND_BYTE, j)
            if best is None or rank < best:
                best = rank
        out[i] = -1 if best is None else best[2]
    return out


def inverse_map(t2s: np.ndarray, v_dst: int, s2t: np.ndarray | None = None) -> InverseMap:
    """dst -> src from a src -> dst map. All preimages are kept as CSR (ascending src ids). The single-valued
    inverse keeps ``s2t[d]`` when that src id really maps to d (the symmetric match, e.g. the same role), else the
    lowest src id."""
    t2s = np.asarray(t2s)
    src = np.flatnonzero(t2s >= 0)
    dst = t2s[src].astype(np.int64)
    if len(dst) and int(dst.max()) >= v_dst:
        raise ValueError(f"map points at id {int(dst.max())} but the destination vocabulary has {v_dst} ids")
    order = np.lexsort((src, dst))
    src, dst = src[order], dst[order]
    counts = np.bincount(dst, minlength=v_dst)
    indptr = np.zeros(v_dst + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    single = np.full(v_dst, -1, dtype=np.int32)
    has = np.flatnonzero(counts)
    single[has] = src[indptr[has]]
    if s2t is not None:
        s2t = np.asarray(s2t)
        d = np.flatnonzero((s2t >= 0) & (counts > 0))
        agree = t2s[s2t[d]] == d
        single[d[agree]] = s2t[d[agree]]
    return InverseMap(single, indptr, src.astype(np.int32))


# ------------------------------------------------------------------------------------------ fuzzy neighbours


def normalised_distance(a: str, b: str) -> float:
    """nd(a, b) = lev(a, b) / (len(a) + len(b)); 0 when both are empty."""
    if not a and not b:
        return 0.0
    return Levenshtein.distance(a, b) / (len(a) + len(b))


def _eligible(cv: CanonicalVocab) -> np.ndarray:
    return np.isin(cv.kind, TEXT_KINDS)


def _lengths(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


def fuzzy_neighbours(
    src_cv: CanonicalVocab,
    dst_cv: CanonicalVocab,
    theta: float = 0.3,
    exclude: np.ndarray | None = None,
    src_ids: np.ndarray | None = None,
    workers: int = 1,
) -> Neighbours:
    """For every src id: the dst ids with nd(body, body) < theta and the same space flag, except ``exclude[src]``
    (pass the exact map), ranked by distance then dst id. Special and missing ids take no part. ``src_ids``
    restricts the rows computed (others stay empty), e.g. to ids without an exact match or seen in a store.

    Length pruning: |la − lb| ≤ lev < θ(la + lb) keeps a band of dst lengths per src length (1-character bodies
    only match exactly), and rapidfuzz's ``score_cutoff`` stops each distance early.
    """
    if not 0 < theta:
        raise ValueError(f"theta must be positive, got {theta}")
    vs = len(src_cv)
    s_texts, d_texts = src_cv.body_texts(), dst_cv.body_texts()
    s_len, d_len = _lengths(s_texts), _lengths(d_texts)
    s_ok = _eligible(src_cv)
    if src_ids is not None:
        wanted = np.zeros(vs, dtype=bool)
        wanted[np.asarray(src_ids, dtype=np.int64)] = True
        s_ok &= wanted
    d_ok = _eligible(dst_cv)
    out_s: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    out_nd: list[np.ndarray] = []
    for flag in (False, True):
        d_idx = np.flatnonzero(d_ok & (dst_cv.space == flag))
        d_idx = d_idx[np.lexsort((d_idx, d_len[d_idx]))]  # by length, then id: a length band is one slice
        dl_sorted = d_len[d_idx]
        d_sorted_texts = [d_texts[j] for j in d_idx]
        s_sel = np.flatnonzero(s_ok & (src_cv.space == flag))
        all_lbs = np.unique(dl_sorted)
        for la in np.unique(s_len[s_sel]).tolist():
            rows = s_sel[s_len[s_sel] == la]
            # lev >= |la - lb| and lev < theta (la + lb); two empty bodies are at distance 0
            band = (np.abs(all_lbs - la) < theta * (all_lbs + la) + 1e-9) | ((all_lbs == 0) & (la == 0))
            lbs = all_lbs[band]
            if len(lbs) == 0:
                continue
            lo = int(np.searchsorted(dl_sorted, lbs[0], side="left"))
            hi = int(np.searchsorted(dl_sorted, lbs[-1], side="right"))
            choices = d_sorted_texts[lo:hi]
            c_len = dl_sorted[lo:hi]
            cutoff = int(np.floor(theta * (la + int(lbs[-1])) + 1e-9))
            block = max(1, _CELLS_PER_BLOCK // max(1, len(choices)))
            for a in range(0, len(rows), block):
                q = rows[a : a + block]
                m = process.cdist(
                    [s_texts[i] for i in q], choices, scorer=Levenshtein.distance, score_cutoff=cutoff, dtype=np.int32, workers=workers
                )
                qi, cj = np.nonzero(m <= cutoff)
                if len(qi) == 0:
                    continue
                den = (la + c_len[cj]).astype(np.float64)
                nd = np.divide(m[qi, cj], den, out=np.zeros(len(qi)), where=den > 0)
                keep = nd < theta
                out_s.append(q[qi[keep]])
                out_d.append(d_idx[lo + cj[keep]])
                out_nd.append(nd[keep])
    return _to_csr(vs, out_s, out_d, out_nd, exclude)


def _to_csr(vs: int, out_s: list, out_d: list, out_nd: list, exclude: np.ndarray | None) -> Neighbours:
    s = np.concatenate(out_s).astype(np.int64) if out_s else np.zeros(0, np.int64)
    d = np.concatenate(out_d).astype(np.int64) if out_d else np.zeros(0, np.int64)
    nd = np.concatenate(out_nd).astype(np.float64) if out_nd else np.zeros(0, np.float64)
    if exclude is not None and len(s):
        keep = np.asarray(exclude)[s] != d
        s, d, nd = s[keep], d[keep], nd[keep]
    order = np.lexsort((d, nd, s))
    s, d, nd = s[order], d[order], nd[order]
    indptr = np.zeros(vs + 1, dtype=np.int64)
    np.cumsum(np.bincount(s, minlength=vs), out=indptr[1:])
    return Neighbours(indptr, d.astype(np.int32), nd.astype(np.float32))


def levenshtein_py(a: str, b: str) -> int:
    """Plain dynamic-programming edit distance (unit insert/delete/substitute), for references."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def fuzzy_neighbours_slow(
    src_cv: CanonicalVocab, dst_cv: CanonicalVocab, theta: float = 0.3, exclude: np.ndarray | None = None, src_ids: np.ndarray | None = None
) -> Neighbours:
    """Reference for `fuzzy_neighbours`: every pair, pure-Python edit distance, no pruning."""
    s_texts, d_texts = src_cv.body_texts(), dst_cv.body_texts()
    wanted = set(range(len(src_cv))) if src_ids is None else {int(i) for i in src_ids}
    indptr, indices, dists = [0], [], []
    for i in range(len(src_cv)):
        row = []
        if i in wanted and src_cv.kind[i] in TEXT_KINDS:
            for j in range(len(dst_cv)):
                if dst_cv.kind[j] not in TEXT_KINDS or dst_cv.space[j] != src_cv.space[i]:
                    continue
                if exclude is not None and exclude[i] == j:
                    continue
                a, b = s_texts[i], d_texts[j]
                nd = 0.0 if not a and not b else levenshtein_py(a, b) / (len(a) + len(b))
                if nd < theta:
                    row.append((nd, j))
        row.sort()
        indices += [j for _, j in row]
        dists += [d for d, _ in row]
        indptr.append(len(indices))
    return Neighbours(np.asarray(indptr, np.int64), np.asarray(indices, np.int32), np.asarray(dists, np.float32))


def pair_keys(csr: Neighbours, v_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Training-time lookup table of a neighbour CSR: sorted int64 keys ``src * v_dst + dst`` and their distances
    (float32), for `searchsorted` on device (method notes §8.4)."""
    counts = np.diff(csr.indptr)
    src = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    keys = src * np.int64(v_dst) + csr.indices.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    return keys[order], csr.dist[order].astype(np.float32)


# ------------------------------------------------------------------------------------------ MinED


def _mined_texts(cv: CanonicalVocab) -> list[str]:
    """MinED strings: body text with every space removed (DSKD strips the tokenizer's space marker everywhere)."""
    return [t.replace(" ", "") for t in cv.body_texts()]


def mined_map(src_cv: CanonicalVocab, dst_cv: CanonicalVocab, em: np.ndarray | None = None, workers: int = 1) -> np.ndarray:
    """MinED static map src -> dst (int32[Vsrc]): the exact map where it exists (specials by role), else the dst
    token at the smallest raw edit distance of space-stripped bodies, ties to the lowest dst id. Specials and
    missing ids without an exact counterpart stay −1. DSKD's direction is student -> teacher: swap the arguments.

    Search: per src length, growing cutoffs c = 1, 2, 4, ... over the dst length band |lb − la| ≤ c; a row whose
    minimum is ≤ c is final (no dst outside the band can be closer), the rest go to the next round.
    """
    out = (exact_map(src_cv, dst_cv) if em is None else np.asarray(em)).astype(np.int32).copy()
    s_texts, d_texts = _mined_texts(src_cv), _mined_texts(dst_cv)
    d_idx = np.flatnonzero(_eligible(dst_cv))
    if len(d_idx) == 0:
        return out
    d_len = _lengths(d_texts)
    d_idx = d_idx[np.lexsort((d_idx, d_len[d_idx]))]
    dl_sorted = d_len[d_idx]
    d_sorted_texts = [d_texts[j] for j in d_idx]
    todo = np.flatnonzero((out < 0) & _eligible(src_cv))
    s_len = _lengths(s_texts)
    max_len = int(max(dl_sorted[-1], s_len[todo].max() if len(todo) else 0))
    for la in np.unique(s_len[todo]).tolist():
        rows = todo[s_len[todo] == la]
        c = 1
        while len(rows):
            final = c >= max_len
            lo = 0 if final else int(np.searchsorted(dl_sorted, la - c, side="left"))
            hi = len(d_idx) if final else int(np.searchsorted(dl_sorted, la + c, side="right"))
            choices, ids = d_sorted_texts[lo:hi], d_idx[lo:hi]
            left: list[np.ndarray] = []
            block = max(1, _CELLS_PER_BLOCK // max(1, len(choices)))
            for a in range(0, len(rows), block):
                q = rows[a : a + block]
                if not choices:
                    left.append(q)
                    continue
                m = process.cdist(
                    [s_texts[i] for i in q], choices, scorer=Levenshtein.distance,
                    score_cutoff=None if final else c, dtype=np.int32, workers=workers,
                )
                best = m.min(axis=1)
                done = best <= c if not final else np.ones(len(q), dtype=bool)
                cand = np.where(m == best[:, None], ids[None, :], np.iinfo(np.int64).max)
                out[q[done]] = cand[done].min(axis=1)
                left.append(q[~done])
            rows = np.concatenate(left) if left else rows[:0]
            c *= 2
    return out


def mined_map_slow(src_cv: CanonicalVocab, dst_cv: CanonicalVocab) -> np.ndarray:
    """Reference for `mined_map`: scan every dst id with a pure-Python edit distance."""
    out = exact_map_slow(src_cv, dst_cv)
    s_texts, d_texts = _mined_texts(src_cv), _mined_texts(dst_cv)
    for i in range(len(src_cv)):
        if out[i] >= 0 or src_cv.kind[i] not in TEXT_KINDS:
            continue
        best = None
        for j in range(len(dst_cv)):
            if dst_cv.kind[j] not in TEXT_KINDS:
                continue
            d = levenshtein_py(s_texts[i], d_texts[j])
            if best is None or d < best[0]:
                best = (d, j)
        out[i] = -1 if best is None else best[1]
    return out
