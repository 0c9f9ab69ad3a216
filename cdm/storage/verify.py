"""`cdm info` and `cdm verify` for teacher and map stores: summaries, digests and per-sequence invariants.

`store_info` and `verify_store` look at the manifest's ``format`` and hand map stores to `map_store_info` /
`verify_map_store`, so one command checks either kind of store."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from cdm.storage.fs import Location
from cdm.storage.ragged import StoreError, check_manifest, read_manifest, safe_ratio, shard_digest, shard_name
from cdm.storage.teacher import FORMAT, VERSION, TeacherStore

MAP_FORMAT = "cdm-map-store"  # cdm.mapping.store.FORMAT (not imported here: the mapping stage is heavier to load)


def _format_of(url: str) -> str | None:
    """The manifest's format, or None when there is no (readable) manifest: the callers then report that."""
    try:
        m = read_manifest(Location(url))
    except StoreError:
        return None
    return m.get("format") if isinstance(m, dict) else None


def teacher_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the teacher of a store: its source as given to precompute (a folder, hub id or .gguf),
    the kind of source and the fingerprint (sha256 over the teacher's files) when recorded. Older or hand-made
    manifests may only have ``name`` or ``path``."""
    t = manifest.get("teacher") or {}
    source = t.get("source") or t.get("name") or t.get("path")
    if t.get("gguf_file"):
        source = f"{source} ({t['gguf_file']})"
    fp = t.get("fingerprint")
    return {"teacher": source, "teacher_kind": t.get("kind"), "teacher_fingerprint": fp[:16] if isinstance(fp, str) else None}


def store_info(url: str) -> dict[str, Any]:
    """Summary of a store from its manifest only (cheap): counts, k, teacher, shards, bytes and bytes/token.
    A map store gets `map_store_info`."""
    if _format_of(url) == MAP_FORMAT:
        return map_store_info(url)
    loc = Location(url)
    m = check_manifest(loc, read_manifest(loc), FORMAT, VERSION)
    shards = m.get("shards", [])
    done = [s for s in shards if s.get("state") == "complete"]
    nbytes = int(sum(int(s.get("bytes", 0)) for s in done))
    tokens = int(sum(int(s.get("tokens", 0)) for s in done))
    skipped: dict[str, int] = {}
    for s in done:
        for reason, n in (s.get("skipped_by_reason") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
    return {
        "url": url,
        "key": m.get("key"),
        "format": f"{m.get('format')} v{m.get('version')}",
        **teacher_identity(m),
        "vocab_size": m.get("vocab_size"),
        "k": m.get("k"),
        "codec": m.get("codec", {}).get("name"),
        "sequences": int(sum(int(s.get("sequences", 0)) for s in done)),
        "tokens": tokens,
        "shards_complete": len(done),
        "shards_total": len(shards),
        "complete": bool(m.get("complete")),
        "bytes_on_disk": nbytes,
        "bytes_per_token": round(safe_ratio(nbytes, tokens), 2) if tokens else None,
        "skipped": skipped,
    }


def map_store_info(url: str) -> dict[str, Any]:
    """Summary of a map store from its manifest (and report.json when present): which teacher store and student
    tokenizer it pairs, the alignment settings, counts, shards and bytes."""
    loc = Location(url)
    m = check_manifest(loc, read_manifest(loc), MAP_FORMAT, 1)
    shards = m.get("shards", [])
    done = [s for s in shards if s.get("state") == "complete"]
    skipped = int(sum(sum(int(n) for n in (s.get("skipped_by_reason") or {}).values()) for s in done))
    report = loc.read_json("report.json") if loc.exists("report.json") else {}
    ts, st, al = m.get("teacher_store") or {}, m.get("student") or {}, m.get("alignment") or {}
    hash_ = st.get("tokenizer_hash")
    return {
        "url": url,
        "key": m.get("key"),
        "format": f"{m.get('format')} v{m.get('version')}",
        "teacher_store": ts.get("url"),
        "teacher_store_key": ts.get("key"),
        "student_tokenizer": st.get("tokenizer"),
        "student_tokenizer_hash": hash_[:16] if isinstance(hash_, str) else None,
        "student_vocab_size": st.get("vocab_size"),
        "alignment": al.get("mode"),
        "theta": m.get("theta"),
        "space_insensitive": m.get("space_insensitive"),
        "sequences": int(sum(int(s.get("sequences", 0)) for s in done)),
        "student_tokens": int(sum(int(s.get("tokens", 0)) for s in done)),
        "skipped": skipped,
        "shards_complete": len(done),
        "shards_total": len(shards),
        "complete": bool(m.get("complete")),
        "bytes_on_disk": int(sum(int(s.get("bytes", 0)) for s in done)),
        "aligned_share": report.get("aligned_share"),
        "topk_mass_unmapped_share": report.get("topk_mass_unmapped_share"),
    }


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    sequences_checked: int = 0
    shards_checked: int = 0
    notes: list[str] = field(default_factory=list)  # checks that could not run (not problems), e.g. a moved teacher store

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sequence(seq: Any, vocab_size: int, where: str, atol: float = 2e-3) -> list[str]:
    """Invariants of one decoded TeacherSequence; each problem names the sequence and the field."""
    out: list[str] = []
    n = seq.n_tokens
    tl = len(seq.text)
    sp = np.asarray(seq.char_spans)
    if sp.shape != (n, 2):
        out.append(f"{where}: char_spans shape {sp.shape} != ({n}, 2)")
    elif n and (sp.min() < 0 or sp.max() > tl or np.any(sp[:, 0] > sp[:, 1])):
        bad = int(np.flatnonzero((sp[:, 0] < 0) | (sp[:, 1] > tl) | (sp[:, 0] > sp[:, 1]))[0])
        out.append(f"{where}: char_spans row {bad} = {sp[bad].tolist()} outside the text (length {tl})")
    elif n > 1 and np.any(np.diff(sp[:, 0]) < 0):
        bad = int(np.flatnonzero(np.diff(sp[:, 0]) < 0)[0]) + 1
        out.append(f"{where}: char_spans starts not monotone at row {bad}")
    for name, arr in (("token_ids", seq.token_ids), ("topk_ids", seq.topk_ids)):
        a = np.asarray(arr)
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            out.append(f"{where}: {name} outside [0, {vocab_size}) (min {a.min()}, max {a.max()})")
    lp = np.asarray(seq.topk_logprobs, dtype=np.float64)
    if not np.all(np.isfinite(lp)):
        out.append(f"{where}: topk_logprobs has non-finite values (row {int(np.argwhere(~np.isfinite(lp))[0][0])})")
    else:
        if lp.size and lp.max() > atol:
            out.append(f"{where}: topk_logprobs > 0 (max {lp.max():.4g})")
        if lp.shape[1] > 1 and np.any(np.diff(lp, axis=1) > atol):
            row = int(np.argwhere(np.diff(lp, axis=1) > atol)[0][0])
            out.append(f"{where}: topk_logprobs row {row} not sorted by log-probability (descending)")
        mass = np.exp(lp).sum(axis=1)
        if mass.size and mass.max() > 1 + 5 * atol:
            out.append(f"{where}: top-k probabilities sum to {mass.max():.5f} > 1 (row {int(mass.argmax())})")
        ids = np.asarray(seq.topk_ids)
        if ids.shape[1] > 1:
            s = np.sort(ids, axis=1)
            if np.any(s[:, 1:] == s[:, :-1]):
                out.append(f"{where}: topk_ids has a repeated id in row {int(np.argwhere(s[:, 1:] == s[:, :-1])[0][0])}")
    for name, arr in (("logsumexp", seq.logsumexp), ("entropy", seq.entropy)):
        if not np.all(np.isfinite(np.asarray(arr))):
            out.append(f"{where}: {name} has non-finite values")
    ent = np.asarray(seq.entropy, dtype=np.float64)
    if ent.size and (ent.min() < -atol or ent.max() > math.log(vocab_size) + atol):
        out.append(f"{where}: entropy outside [0, log V={math.log(vocab_size):.3f}] (min {ent.min():.4g}, max {ent.max():.4g})")
    rs = np.asarray(seq.response_spans).reshape(-1, 2)
    if rs.size and (rs.min() < 0 or rs.max() > tl or np.any(rs[:, 0] > rs[:, 1])):
        out.append(f"{where}: response_spans {rs.tolist()} outside the text (length {tl})")
    return out


def _check_limit(max_problems: int) -> None:
    """`max_problems` (the CLI's --max-problems): 0 means no limit; a negative value is a mistake."""
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 0:
        raise ValueError(f"--max-problems must be an integer >= 0 (0: no limit), got {max_problems!r}")


def _open_checked(url: str, fmt: str, version: int, report: VerifyReport) -> tuple[Location, dict[str, Any] | None]:
    """The store's location and manifest, whose shard files are then checked (`_check_shard_files`); a manifest
    that cannot be used is recorded as the problem and None returned."""
    loc = Location(url)
    try:
        m = check_manifest(loc, read_manifest(loc), fmt, version)
    except StoreError as e:
        report.problems.append(str(e))
        return loc, None
    _check_shard_files(loc, m, report)
    return loc, m


def _full(report: VerifyReport, max_problems: int) -> bool:
    return 0 < max_problems <= len(report.problems)


def _check_shard_files(loc: Location, m: dict[str, Any], report: VerifyReport) -> None:
    """Every shard is complete, holds exactly the files its entry lists, and hashes to its digest."""
    for s in m["shards"]:
        if s.get("state") != "complete":
            report.problems.append(f"{loc.path(shard_name(int(s['index'])))}: shard not complete")
            continue
        digest, files = shard_digest(loc, s["path"])
        detail = loc.read_json("shards", s["path"] + ".json")
        if files != detail.get("files"):
            diff = sorted(set(files) ^ set(detail.get("files", {})))
            changed = sorted(k for k in set(files) & set(detail.get("files", {})) if files[k] != detail["files"][k])
            report.problems.append(f"{loc.path(s['path'])}: files differ from the manifest (added/missing {diff[:5]}, size changed {changed[:5]})")
        elif digest != s["digest"]:
            report.problems.append(f"{loc.path(s['path'])}: digest mismatch ({digest[:16]}… != {s['digest'][:16]}…)")
        report.shards_checked += 1


def _shard_sequence_count(r: Any, si: int, first_field: str, report: VerifyReport) -> int | None:
    """Sequences of shard `si` when its seq_offsets run monotonically from 0 to the rows of its arrays and agree
    with the shard entry; otherwise a problem is recorded and None returned (the shard's sequences are skipped)."""
    shard = r.shards[si]
    off = r.offsets(si)
    n_rows = int(r._arrays(si)[first_field].shape[0])
    if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != n_rows:
        report.problems.append(f"{shard['path']}: seq_offsets not monotone from 0 to {n_rows}")
        return None
    if len(off) - 1 != int(shard["sequences"]):
        report.problems.append(f"{shard['path']}: seq_offsets hold {len(off) - 1} sequences, the manifest {shard['sequences']}")
        return None
    return len(off) - 1


def verify_store(url: str, max_problems: int = 50) -> VerifyReport:
    """Recompute every shard digest and check every sequence's invariants; collect precise problems.

    `max_problems` (--max-problems): the sequence checks stop once this many problems are collected; 0 = no limit.
    A negative value raises ValueError. Sequences are read in ranges (`TeacherStore.sequences`), so each chunk is
    decompressed once per range instead of once per sequence; every problem still names its shard and sequence.
    A map store (manifest format ``cdm-map-store``) is checked by `verify_map_store`."""
    _check_limit(max_problems)
    if _format_of(url) == MAP_FORMAT:
        return verify_map_store(url, max_problems)
    report = VerifyReport()
    _, m = _open_checked(url, FORMAT, VERSION, report)
    if m is None or report.problems:
        return report
    store = TeacherStore(url, check="none", allow_incomplete=True)
    r = store.reader
    for si, shard in enumerate(r.shards):
        n = _shard_sequence_count(r, si, "token_ids", report)
        if n is None:
            continue
        base = int(r._shard_starts[si])
        for j, seq in enumerate(store.sequences(range(base, base + n))):
            where = f"{shard['path']} sequence {j} (seq_id {seq.seq_id})"
            report.problems.extend(check_sequence(seq, store.vocab_size, where))
            report.sequences_checked += 1
            if _full(report, max_problems):
                return report
    return report


# ------------------------------------------------------------------------------------------ map stores


def check_map_vocab(maps: Any, teacher_vocab: int | None) -> list[str]:
    """Invariants of a map store's vocabulary maps (a `VocabMaps`): array lengths, ids in range (-1 = unmapped),
    CSR tables well formed with distances in [0, theta)."""
    out: list[str] = []
    vt, vs = int(maps.teacher_vocab_size), int(maps.student_vocab_size)
    if teacher_vocab is not None and vt > teacher_vocab:
        out.append(f"vocab/: {vt} teacher tokens but the teacher store's vocab_size is {teacher_vocab}")
    for name, n_src, n_dst in (("em_t2s", vt, vs), ("em_s2t", vs, vt), ("mined_t2s", vt, vs), ("mined_s2t", vs, vt)):
        a = np.asarray(getattr(maps, name))
        if a.shape != (n_src,):
            out.append(f"vocab/{name}: shape {a.shape} != ({n_src},)")
        elif a.size and (a.min() < -1 or a.max() >= n_dst):
            out.append(f"vocab/{name}: ids outside [-1, {n_dst}) (min {a.min()}, max {a.max()})")
    for name, n_src, n_dst in (("fuzzy_t2s", vt, vs), ("fuzzy_s2t", vs, vt)):
        csr = getattr(maps, name)
        ptr, idx, dist = (np.asarray(x) for x in (csr.indptr, csr.indices, csr.dist))
        if ptr.shape != (n_src + 1,) or ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != len(idx) or len(dist) != len(idx):
            out.append(f"vocab/{name}: indptr/indices/dist inconsistent (indptr {ptr.shape}, {len(idx)} indices, {len(dist)} distances)")
        elif idx.size and (idx.min() < 0 or idx.max() >= n_dst):
            out.append(f"vocab/{name}: neighbour ids outside [0, {n_dst})")
        elif dist.size and (not np.all(np.isfinite(dist)) or dist.min() < 0 or dist.max() >= maps.theta + 1e-6):
            out.append(f"vocab/{name}: distances outside [0, theta={maps.theta})")
    return out


def check_map_sequence(arrays: dict[str, np.ndarray], row: dict[str, Any], student_vocab: int, where: str) -> list[str]:
    """Invariants of one map-store sequence (its arrays and its row of sequences.parquet); each problem names the
    sequence and the field."""
    out: list[str] = []
    ids, spans = np.asarray(arrays["student_ids"]), np.asarray(arrays["student_spans"]).reshape(-1, 2)
    tr, kind, mask = np.asarray(arrays["teacher_row"]), np.asarray(arrays["align_kind"]), np.asarray(arrays["loss_mask"])
    n_t = int(row["n_teacher_tokens"])
    if ids.size and (ids.min() < 0 or ids.max() >= student_vocab):
        out.append(f"{where}: student_ids outside [0, {student_vocab}) (min {ids.min()}, max {ids.max()})")
    if spans.size and (spans.min() < 0 or np.any(spans[:, 0] > spans[:, 1])):
        out.append(f"{where}: student_spans negative or reversed (row {int(np.flatnonzero((spans < 0).any(axis=1) | (spans[:, 0] > spans[:, 1]))[0])})")
    elif len(spans) > 1 and np.any(np.diff(spans[:, 0]) < 0):
        out.append(f"{where}: student_spans starts not monotone at row {int(np.flatnonzero(np.diff(spans[:, 0]) < 0)[0]) + 1}")
    if tr.size and (tr.min() < -1 or tr.max() >= n_t):
        out.append(f"{where}: teacher_row outside [-1, {n_t}) (min {tr.min()}, max {tr.max()})")
    if kind.size and (kind.min() < 0 or kind.max() > 4):
        out.append(f"{where}: align_kind outside 0..4 (min {kind.min()}, max {kind.max()})")
    if int((tr >= 0).sum()) != int(row["n_aligned"]):
        out.append(f"{where}: n_aligned is {row['n_aligned']}, teacher_row has {int((tr >= 0).sum())} aligned positions")
    if int(mask.sum()) != int(row["n_response_positions"]):
        out.append(f"{where}: n_response_positions is {row['n_response_positions']}, loss_mask has {int(mask.sum())}")
    return out


def _map_rows(r: Any, start: int, stop: int) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """(arrays, row) of map sequences [start, stop), read in ranges."""
    for a, b in r.runs(range(start, stop)):
        yield from r.read_range(a, b)


def _check_against_teacher(r: Any, si: int, t: Any, skipped: list[Any], report: VerifyReport) -> None:
    """Map shard `si` covers teacher shard `si` exactly (each sequence mapped or skipped once) and each mapped
    sequence agrees with its teacher row: seq_id, text hash and token count (Parquet tables and offsets only)."""
    tr = t.reader
    lo, hi = int(tr._shard_starts[si]), int(tr._shard_starts[si + 1])
    table = r.table(si)
    ti = np.asarray(table.column("teacher_index").to_numpy(), dtype=np.int64)
    keys = np.concatenate([ti, np.asarray([int(s[0]) for s in skipped], dtype=np.int64)])
    path = r.shards[si]["path"]
    missing = np.setdiff1d(np.arange(lo, hi), keys)
    outside = np.setdiff1d(keys, np.arange(lo, hi))
    uniq, counts = np.unique(keys, return_counts=True)
    if missing.size:
        report.problems.append(f"{path}: teacher sequences {missing[:5].tolist()} (of {missing.size}) neither mapped nor skipped")
    if outside.size:
        report.problems.append(f"{path}: teacher indices {outside[:5].tolist()} are not in teacher shard {si} [{lo}, {hi})")
    if np.any(counts > 1):
        report.problems.append(f"{path}: teacher indices {uniq[counts > 1][:5].tolist()} mapped or skipped more than once")
    inside = (ti >= lo) & (ti < hi)
    t_table, t_off = tr.table(si), tr.offsets(si)
    local = ti[inside] - lo
    want = {
        "seq_id": np.asarray(t_table.column("seq_id").to_pylist(), dtype=object)[local],
        "text_sha256": np.asarray(t_table.column("text_sha256").to_pylist(), dtype=object)[local],
        "n_teacher_tokens": np.diff(t_off)[local],
    }
    for name, expected in want.items():
        have = np.asarray(table.column(name).to_pylist(), dtype=object if name != "n_teacher_tokens" else np.int64)[inside]
        bad = np.flatnonzero(have != expected)
        for b in bad[:5]:
            j = int(np.flatnonzero(inside)[b])
            report.problems.append(f"{path} sequence {j} (teacher index {int(ti[j])}): {name} {have[b]!r} != the teacher store's {expected[b]!r}")


def verify_map_store(url: str, max_problems: int = 50, teacher_store: str | None = None) -> VerifyReport:
    """Check a map store: shard digests (as for teacher stores), the vocabulary maps in ``vocab/`` (the digests do
    not cover them), every sequence's invariants (`check_map_sequence`), and, when the teacher store opens (the
    one recorded at build time, or `teacher_store`), that its key matches and every teacher sequence is mapped or
    skipped once with the same seq_id, text hash and token count. A teacher store that cannot be opened is noted
    in ``report.notes``, not counted as a problem. `max_problems`: as in `verify_store` (0 = no limit)."""
    from cdm.mapping.store import VERSION as MAP_VERSION
    from cdm.mapping.store import MapStore, VocabMaps

    _check_limit(max_problems)
    report = VerifyReport()
    loc, m = _open_checked(url, MAP_FORMAT, MAP_VERSION, report)
    if m is None:
        return report
    recorded = m.get("teacher_store") or {}
    t = None
    t_url = teacher_store or recorded.get("url")
    try:
        t = TeacherStore(t_url, check="none")
    except (StoreError, OSError, TypeError, ValueError) as e:
        report.notes.append(f"not checked against the teacher store ({t_url}): {e}")
    if t is not None and t.key != recorded.get("key"):
        report.problems.append(f"{url}: built from teacher store {recorded.get('key')}, the store at {t_url} has key {t.key}")
        t = None
    if not loc.exists("vocab.done"):
        report.problems.append(f"{loc.path('vocab')}: incomplete (no vocab.done marker); rerun the build-map command")
    else:
        try:
            maps = VocabMaps.load(loc, "vocab")
        except Exception as e:  # noqa: BLE001 - any read failure of vocab/ is a problem to report, not a crash
            report.problems.append(f"{loc.path('vocab')}: cannot be read ({type(e).__name__}: {e})")
        else:
            report.problems.extend(f"{loc.url}/{p}" for p in check_map_vocab(maps, recorded.get("vocab_size")))
    if report.problems:
        return report
    ms = MapStore(url, check="none")
    r = ms.reader
    if t is not None and len(t.reader.shards) != len(r.shards):
        report.problems.append(f"{url}: {len(r.shards)} shards, the teacher store {len(t.reader.shards)}")
        t = None
    student_vocab = int(maps.student_vocab_size)
    for si, shard in enumerate(r.shards):
        n = _shard_sequence_count(r, si, "student_ids", report)
        if n is None:
            continue
        if t is not None:
            _check_against_teacher(r, si, t, loc.read_json("shards", shard["path"] + ".json").get("skipped") or [], report)
        base = int(r._shard_starts[si])
        for j, (arrays, row) in enumerate(_map_rows(r, base, base + n)):
            where = f"{shard['path']} sequence {j} (seq_id {row['seq_id']}, teacher index {row['teacher_index']})"
            report.problems.extend(check_map_sequence(arrays, row, student_vocab, where))
            report.sequences_checked += 1
            if _full(report, max_problems):
                return report
    return report
