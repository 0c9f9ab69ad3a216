"""`cdm info` and `cdm verify` for teacher stores: summaries, digests and per-sequence invariants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdm.storage.fs import Location
from cdm.storage.ragged import StoreError, check_manifest, read_manifest, safe_ratio, shard_digest, shard_name
from cdm.storage.teacher import FORMAT, VERSION, TeacherStore


def store_info(url: str) -> dict[str, Any]:
    """Summary of a store from its manifest only (cheap): counts, k, teacher, shards, bytes and bytes/token."""
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
        "teacher": m.get("teacher", {}).get("name") or m.get("teacher", {}).get("path"),
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


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    sequences_checked: int = 0
    shards_checked: int = 0

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


def verify_store(url: str, max_problems: int = 50) -> VerifyReport:
    """Recompute every shard digest and check every sequence's invariants; collect precise problems."""
    loc = Location(url)
    report = VerifyReport()
    try:
        m = check_manifest(loc, read_manifest(loc), FORMAT, VERSION)
    except StoreError as e:
        report.problems.append(str(e))
        return report
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
    if report.problems:
        return report
    store = TeacherStore(url, check="none", allow_incomplete=True)
    r = store.reader
    for si, shard in enumerate(r.shards):
        off = r.offsets(si)
        n_rows = int(r._arrays(si)["token_ids"].shape[0])
        if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != n_rows:
            report.problems.append(f"{shard['path']}: seq_offsets not monotone from 0 to {n_rows}")
            continue
        base = int(r._shard_starts[si])
        for j in range(len(off) - 1):
            seq = store[base + j]
            where = f"{shard['path']} sequence {j} (seq_id {seq.seq_id})"
            report.problems.extend(check_sequence(seq, store.vocab_size, where))
            report.sequences_checked += 1
            if len(report.problems) >= max_problems:
                return report
    return report
