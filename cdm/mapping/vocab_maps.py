"""Maps between two canonical vocabularies: exact match (−1 = unmapped), fuzzy neighbours (CSR), MinED nearest.

Distances are on the canonical bodies read as bytes (latin-1 view: one character per byte), so partial UTF-8
pieces stay distinct; nd(a, b) = lev(a, b) / (len(a) + len(b)) as in the CDM reference (rapidfuzz's normalised
Levenshtein divides by the max length instead, so the division is done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from cdm.mapping.vocab import KIND_BYTE, KIND_SPECIAL, CanonicalVocab


@dataclass
class Neighbours:
    """CSR rows: source id r owns ``indices[indptr[r]:indptr[r+1]]`` (ranked by distance, then id) and ``dist``."""

    indptr: np.ndarray  # int64 [V_src + 1]
    indices: np.ndarray  # int32
    dist: np.ndarray  # float32


def _latin(b: bytes) -> str:
    return b.decode("latin-1")


def exact_map(src: CanonicalVocab, dst: CanonicalVocab, space_insensitive: bool = False) -> np.ndarray:
    """src id -> dst id with the identical canonical form (int32, −1 = none); specials map by role, then content.

    Among several dst tokens with one form, a normal token wins over a byte-fallback piece, then the lowest id.
    `space_insensitive` is the paper's rule: all spaces removed, the leading-space flag ignored.
    """

    def key(cv: CanonicalVocab, i: int) -> bytes:
        return cv.bodies[i].replace(b" ", b"") if space_insensitive else cv.key(i)

    table: dict[bytes, int] = {}
    for j in range(len(dst) - 1, -1, -1):  # descending, so lower ids overwrite; byte pieces first, normals last
        if dst.kind[j] == KIND_BYTE:
            table[key(dst, j)] = j
    for j in range(len(dst) - 1, -1, -1):
        if dst.kind[j] != KIND_SPECIAL and dst.kind[j] != KIND_BYTE and (dst.bodies[j] or dst.space[j]):
            table[key(dst, j)] = j
    specials = {dst.bodies[j]: j for j in range(len(dst) - 1, -1, -1) if dst.kind[j] == KIND_SPECIAL and dst.bodies[j]}
    out = np.full(len(src), -1, dtype=np.int32)
    for i in range(len(src)):
        if src.kind[i] == KIND_SPECIAL:
            out[i] = specials.get(src.bodies[i], -1)
        elif src.bodies[i] or src.space[i]:
            out[i] = table.get(key(src, i), -1)
    for role, i in src.roles.items():  # role beats content: teacher eos -> student eos
        if role in dst.roles:
            out[i] = dst.roles[role]
    return out


def inverse_map(em: np.ndarray, v_dst: int) -> tuple[np.ndarray, Neighbours]:
    """dst -> src from a src -> dst map: the single-valued inverse keeps the lowest src id; all preimages as CSR."""
    src = np.flatnonzero(em >= 0)
    dst = em[src].astype(np.int64)
    order = np.lexsort((src, dst))
    src, dst = src[order], dst[order]
    counts = np.bincount(dst, minlength=v_dst)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    inv = np.full(v_dst, -1, dtype=np.int32)
    first = indptr[:-1][counts > 0]
    inv[np.flatnonzero(counts)] = src[first]
    return inv, Neighbours(indptr, src.astype(np.int32), np.zeros(len(src), dtype=np.float32))


def nd(a: bytes, b: bytes) -> float:
    """Normalised edit distance of the reference: lev / (len(a) + len(b)); 0 when both are empty."""
    if not a and not b:
        return 0.0
    return Levenshtein.distance(_latin(a), _latin(b)) / (len(a) + len(b))


def fuzzy_neighbours(
    src: CanonicalVocab,
    dst: CanonicalVocab,
    theta: float = 0.3,
    exclude: np.ndarray | None = None,
    src_ids: np.ndarray | None = None,
    block: int = 2048,
    workers: int = -1,
) -> Neighbours:
    """For each src id without an exact match: the dst ids with nd < theta (same space flag), ranked.

    Length pruning: |la − lb| ≤ lev < θ(la + lb), so for each source length only a band of target lengths is
    compared, with a rapidfuzz score cutoff; single-byte tokens can only match exactly (and are skipped).
    """
    n_src = len(src)
    wanted = np.ones(n_src, dtype=bool) if src_ids is None else np.isin(np.arange(n_src), src_ids)
    wanted &= src.kind != KIND_SPECIAL
    if exclude is not None:
        wanted &= exclude < 0
    s_len = np.array([len(b) for b in src.bodies])
    d_len = np.array([len(b) for b in dst.bodies])
    d_ok = (dst.kind != KIND_SPECIAL) & (d_len > 0)
    rows: list[list[tuple[float, int]]] = [[] for _ in range(n_src)]
    for flag in (False, True):
        d_sel_flag = d_ok & (dst.space == flag)
        s_sel_flag = wanted & (src.space == flag) & (s_len >= (1 if theta > 1 / 3 else 2))
        for la in np.unique(s_len[s_sel_flag]):
            la = int(la)
            lo = int(np.floor(la * (1 - theta) / (1 + theta))) + 1 if theta < 1 else 1
            hi = int(np.ceil(la * (1 + theta) / (1 - theta))) - 1 if theta < 1 else int(d_len.max())
            d_idx = np.flatnonzero(d_sel_flag & (d_len >= max(lo, 1)) & (d_len <= hi))
            s_idx = np.flatnonzero(s_sel_flag & (s_len == la))
            if len(d_idx) == 0 or len(s_idx) == 0:
                continue
            cutoff = int(np.ceil(theta * (la + hi))) - 1
            choices = [_latin(dst.bodies[j]) for j in d_idx]
            dl = d_len[d_idx]
            for a in range(0, len(s_idx), block):
                q_idx = s_idx[a : a + block]
                queries = [_latin(src.bodies[i]) for i in q_idx]
                m = process.cdist(queries, choices, scorer=Levenshtein.distance, score_cutoff=cutoff, dtype=np.int32, workers=workers)
                qi, cj = np.nonzero(m <= cutoff)
                if len(qi) == 0:
                    continue
                dist = m[qi, cj] / (la + dl[cj])
                keep = dist < theta
                for q, c, d in zip(qi[keep], cj[keep], dist[keep]):
                    rows[int(q_idx[q])].append((float(d), int(d_idx[c])))
    indptr = np.zeros(n_src + 1, dtype=np.int64)
    indices: list[int] = []
    dists: list[float] = []
    for i, r in enumerate(rows):
        r.sort()
        indices.extend(j for _, j in r)
        dists.extend(d for d, _ in r)
        indptr[i + 1] = len(indices)
    return Neighbours(indptr, np.asarray(indices, dtype=np.int32), np.asarray(dists, dtype=np.float32))


def fuzzy_neighbours_slow(src: CanonicalVocab, dst: CanonicalVocab, theta: float = 0.3, exclude: np.ndarray | None = None) -> Neighbours:
    """Reference: every pair, pure Python (tests only)."""
    indptr, indices, dists = [0], [], []
    for i in range(len(src)):
        row = []
        if src.kind[i] != KIND_SPECIAL and (exclude is None or exclude[i] < 0) and len(src.bodies[i]) >= 1:
            for j in range(len(dst)):
                if dst.kind[j] == KIND_SPECIAL or not dst.bodies[j] or dst.space[j] != src.space[i]:
                    continue
                d = nd(src.bodies[i], dst.bodies[j])
                if d < theta:
                    row.append((d, j))
        row.sort()
        indices += [j for _, j in row]
        dists += [d for d, _ in row]
        indptr.append(len(indices))
    return Neighbours(np.asarray(indptr, np.int64), np.asarray(indices, np.int32), np.asarray(dists, np.float32))


def mined_map(src: CanonicalVocab, dst: CanonicalVocab, em: np.ndarray | None = None, workers: int = -1) -> np.ndarray:
    """MinED: nearest dst token by raw edit distance of the bodies (spaces ignored) for every src id.

    Exact matches first (from `em` when given); ties go to the lowest dst id; specials keep their exact map (or −1).
    """
    em = exact_map(src, dst) if em is None else em
    out = em.astype(np.int32).copy()
    d_ok = np.flatnonzero((dst.kind != KIND_SPECIAL) & np.array([len(b) > 0 for b in dst.bodies]))
    choices = [_latin(dst.bodies[j].replace(b" ", b"")) for j in d_ok]
    todo = np.flatnonzero((out < 0) & (src.kind != KIND_SPECIAL))
    if len(todo) == 0 or len(choices) == 0:
        return out
    queries = [_latin(src.bodies[i].replace(b" ", b"")) for i in todo]
    for a in range(0, len(todo), 1024):
        m = process.cdist(queries[a : a + 1024], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
        out[todo[a : a + 1024]] = d_ok[np.argmin(m, axis=1)]  # argmin = first minimum = lowest dst id
    return out


def mined_map_slow(src: CanonicalVocab, dst: CanonicalVocab) -> np.ndarray:
    em = exact_map(src, dst)
    out = em.copy()
    for i in range(len(src)):
        if out[i] >= 0 or src.kind[i] == KIND_SPECIAL:
            continue
        best, best_j = None, -1
        for j in range(len(dst)):
            if dst.kind[j] == KIND_SPECIAL or not dst.bodies[j]:
                continue
            d = Levenshtein.distance(_latin(src.bodies[i].replace(b" ", b"")), _latin(dst.bodies[j].replace(b" ", b"")))
            if best is None or d < best:
                best, best_j = d, j
        out[i] = best_j
    return out
