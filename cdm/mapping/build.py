"""`cdm build-map`: one teacher store + one student tokenizer -> a map store (I/O shell over pure functions).

Vocabulary side (canonical strings, exact/fuzzy/MinED maps) is computed once per tokenizer pair and cached;
sequence side (student tokenisation, alignment) runs per teacher shard in worker processes and is resumable.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdm.errors import OptionError
from cdm.mapping import align as A
from cdm.mapping import vocab as V
from cdm.mapping import vocab_maps as VM
from cdm.mapping.store import (
    CSR,
    DIAG_KINDS,
    DIAG_MASSES,
    KIND_NAMES,
    MapSequence,
    MapStore,
    MapStoreWriter,
    VocabMaps,
)
from cdm.mapping.tokenizers import encode_with_offsets, load_tokenizer, tokenizer_hash
from cdm.paths import as_str, is_url
from cdm.progress import quiet_libraries_unless_progress
from cdm.storage.fs import Location
from cdm.storage.ragged import StoreError
from cdm.storage.teacher import TeacherSequence, TeacherStore


def _stderr(message: str) -> None:
    """The default `log` of this module: progress lines go to stderr (stdout stays free for results)."""
    print(message, file=sys.stderr, flush=True)


ALIGN_MODES = ("offsets", "dtw", "mined")
MAP_FORMAT_TAG = "cdm-map-v1"
VOCAB_DONE = "vocab.done"  # marker written after every vocab/ array, so a build killed mid-save redoes them


def default_cache_dir() -> str:
    """$CDM_CACHE_DIR (or $CDM_CACHE; a local folder or an fsspec URL), else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm."""
    from cdm.paths import cache_location

    return cache_location()


@dataclass
class BuildOptions:
    align: str = "offsets"
    theta: float = 0.3
    space_insensitive: bool = False
    student_weight: int = 4  # DTW weight of every student position (the live student entropy is not offline)
    workers: int = 1


# ------------------------------------------------------------------------------------------ vocabulary side


def tokenizer_identity(tok: Any) -> str:
    """sha256 of the tokenizer.json hash and the roles travelling with it (``cdm_roles``): roles come from files
    beside tokenizer.json or from the teacher store's manifest, so one JSON can carry different eos/bos tokens."""
    roles = {str(k): (v if isinstance(v, str) else int(v)) for k, v in (getattr(tok, "cdm_roles", None) or {}).items()}
    return hashlib.sha256(json.dumps([tokenizer_hash(tok), roles], sort_keys=True).encode()).hexdigest()


def vocab_key(t_hash: str, s_hash: str, opts: BuildOptions) -> str:
    """Cache key of a pair's vocabulary maps (pass `tokenizer_identity` values, so roles count)."""
    blob = json.dumps([MAP_FORMAT_TAG, t_hash, s_hash, opts.theta, opts.space_insensitive], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compute_vocab_maps(teacher_tok: Any, student_tok: Any, opts: BuildOptions, log: Callable[[str], None] = _stderr) -> VocabMaps:
    """Canonical vocabularies of both tokenizers and every map between them (pure; minutes for 150k x 32k)."""
    t0 = time.time()
    tcv = V.canonical_vocab(teacher_tok)
    scv = V.canonical_vocab(student_tok)
    em_t2s = VM.exact_map(tcv, scv, space_insensitive=opts.space_insensitive)
    em_s2t = VM.exact_map(scv, tcv, space_insensitive=opts.space_insensitive)
    log(f"  exact maps: {(em_t2s >= 0).mean():.1%} of teacher ids, {(em_s2t >= 0).mean():.1%} of student ids ({time.time() - t0:.1f}s)")
    # neighbours only for ids without an exact match: the dynamic map uses exact matches first (both directions)
    w = max(1, opts.workers)
    f_t2s = VM.fuzzy_neighbours(tcv, scv, theta=opts.theta, exclude=em_t2s, src_ids=np.flatnonzero(em_t2s < 0), workers=w)
    f_s2t = VM.fuzzy_neighbours(scv, tcv, theta=opts.theta, exclude=em_s2t, src_ids=np.flatnonzero(em_s2t < 0), workers=w)
    log(f"  fuzzy tables (theta={opts.theta}): {len(f_t2s.indices)} + {len(f_s2t.indices)} pairs ({time.time() - t0:.1f}s)")
    mined_t2s = VM.mined_map(tcv, scv, em=em_t2s, workers=w)
    mined_s2t = VM.mined_map(scv, tcv, em=em_s2t, workers=w)
    log(f"  MinED maps ({time.time() - t0:.1f}s)")
    return VocabMaps(
        teacher_vocab_size=len(tcv),
        student_vocab_size=len(scv),
        em_t2s=em_t2s,
        em_s2t=em_s2t,
        fuzzy_t2s=CSR(f_t2s.indptr, f_t2s.indices, f_t2s.dist),
        fuzzy_s2t=CSR(f_s2t.indptr, f_s2t.indices, f_s2t.dist),
        mined_t2s=mined_t2s,
        mined_s2t=mined_s2t,
        theta=opts.theta,
        info={
            "normalisation": "canonical (leading-space flag, UTF-8 body bytes); specials by role"
            + ("; space-insensitive" if opts.space_insensitive else ""),
            "distance": "nd(a,b) = levenshtein(a,b) / (len(a)+len(b)) on bodies, same space flag, strict < theta",
            "teacher_specials": V.special_roles(tcv),
            "student_specials": V.special_roles(scv),
        },
    )


def vocab_cache_path(cache_dir: str | os.PathLike[str], key: str) -> str:
    """Where the vocabulary maps of key `key` are cached under `cache_dir` (a local folder or an fsspec URL)."""
    if is_url(cache_dir):
        return f"{os.fspath(cache_dir).rstrip('/')}/vocab-maps/{key}"
    return str(Path(cache_dir).expanduser() / "vocab-maps" / key)


def cached_vocab_maps(teacher_tok: Any, student_tok: Any, opts: BuildOptions, cache_dir: str | os.PathLike[str],
                      log: Callable[[str], None] = _stderr) -> tuple[VocabMaps, str]:
    """Vocabulary maps of a tokenizer pair, from the cache or computed once and cached; returns them and where they
    are. A local folder: built aside, then renamed into place. An fsspec URL (no rename there): each builder writes
    its own `<key>/<uuid>/` and then `<key>/done` naming it, last; readers load the folder `done` names, so two
    builders of one pair at once never overwrite what the other reads."""
    key = vocab_key(tokenizer_identity(teacher_tok), tokenizer_identity(student_tok), opts)
    if is_url(cache_dir):
        url = vocab_cache_path(cache_dir, key)
        root = Location(url)
        if root.exists("done"):
            name = root.read_bytes("done").decode("utf-8").strip()
            log(f"vocabulary maps: cached at {url}/{name}")
            return VocabMaps.load(Location(f"{url}/{name}")), f"{url}/{name}"
        log("vocabulary maps: computing (cached afterwards for this tokenizer pair)")
        maps = compute_vocab_maps(teacher_tok, student_tok, opts, log)
        name = uuid.uuid4().hex
        maps.save(Location(f"{url}/{name}"))
        root.write_bytes(name.encode("utf-8"), "done")
        return maps, f"{url}/{name}"
    path = Path(vocab_cache_path(cache_dir, key))
    loc = Location(str(path))
    if loc.exists("done"):
        log(f"vocabulary maps: cached at {path}")
        return VocabMaps.load(loc), str(path)
    log("vocabulary maps: computing (cached afterwards for this tokenizer pair)")
    maps = compute_vocab_maps(teacher_tok, student_tok, opts, log)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    maps.save(Location(str(tmp)))
    Path(tmp / "done").write_text("ok\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process published it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return maps, str(path)


def recorded_location(path: str) -> str:
    """How a path is recorded in a manifest: absolute when local (so `cdm inspect` works from any directory),
    URLs as given."""
    return path if is_url(path) else os.path.abspath(path)


def teacher_roles(manifest: dict[str, Any]) -> dict[str, str]:
    """bos/eos/pad/unk strings of the teacher tokenizer, as recorded by precompute."""
    tok = manifest.get("teacher", {}).get("tokenizer", {}) or {}
    return {k: tok[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(tok.get(k), str)}


# ------------------------------------------------------------------------------------------ sequence side


def response_mask(spans: np.ndarray, response_spans: np.ndarray) -> np.ndarray:
    """True for tokens that start inside a trained span (zero-width tokens at a span start count in)."""
    rs = np.asarray(response_spans, dtype=np.int64).reshape(-1, 2)
    starts = np.asarray(spans, dtype=np.int64).reshape(-1, 2)[:, 0]
    mask = np.zeros(len(starts), dtype=bool)
    for lo, hi in rs:
        mask |= (starts >= lo) & (starts < hi)
    return mask


def token_strings(cv: Any, ids: np.ndarray) -> list[str]:
    """Per-token display strings (leading space + body) used by the string-DTW modes."""
    return [V.token_text(cv, int(i)) for i in ids]


def map_sequence(
    t: TeacherSequence,
    teacher_index: int,
    student_tok: Any,
    opts: BuildOptions,
    tcv: Any = None,
    scv: Any = None,
) -> MapSequence:
    """Student tokenisation + alignment of one teacher sequence (pure apart from the tokenizer call)."""
    s_ids, s_spans = encode_with_offsets(student_tok, t.text)
    loss_mask = response_mask(s_spans, t.response_spans)
    m = len(s_ids)
    teacher_row = np.full(m, -1, dtype=np.int32)
    kind = np.zeros(m, dtype=np.int8)
    regions = np.asarray(t.response_spans, dtype=np.int64).reshape(-1, 2)
    for lo, hi in regions:
        if opts.align == "offsets":
            al = A.align_offsets(t.char_spans, s_spans, region=(int(lo), int(hi)))
            rows, kinds = al.teacher_row, al.kind
        else:
            t_sel = np.flatnonzero((t.char_spans[:, 1] > lo) & (t.char_spans[:, 0] < hi) | ((t.char_spans[:, 0] == t.char_spans[:, 1]) & (t.char_spans[:, 0] >= lo) & (t.char_spans[:, 0] < hi)))
            s_sel = np.flatnonzero((s_spans[:, 1] > lo) & (s_spans[:, 0] < hi) | ((s_spans[:, 0] == s_spans[:, 1]) & (s_spans[:, 0] >= lo) & (s_spans[:, 0] < hi)))
            if len(t_sel) == 0 or len(s_sel) == 0:
                continue
            t_str = token_strings(tcv, t.token_ids[t_sel])
            s_str = token_strings(scv, s_ids[s_sel])
            if opts.align == "dtw":
                w_t = A.entropy_weights(np.asarray(t.entropy)[t_sel])
                w_s = np.full(len(s_sel), opts.student_weight, dtype=np.int64)
                t2s, s2t = A.align_dtw(t_str, s_str, w_t, w_s)
                r_local, k_local = A.dtw_to_rows(t2s, s2t)
            else:
                r_local, k_local = A.align_mined(t_str, s_str)
            rows = np.full(m, -1, dtype=np.int32)
            kinds = np.zeros(m, dtype=np.int8)
            ok = r_local >= 0
            rows[s_sel[ok]] = t_sel[r_local[ok]]
            kinds[s_sel] = k_local
        hit = rows >= 0
        teacher_row[hit] = rows[hit]
        kind[hit] = kinds[hit]
    return MapSequence(
        seq_id=t.seq_id,
        teacher_index=teacher_index,
        text_sha256=t.text_sha256,
        student_ids=s_ids.astype(np.int32),
        student_spans=s_spans.astype(np.int32),
        teacher_row=teacher_row,
        align_kind=kind,
        loss_mask=loss_mask,
        n_teacher_tokens=t.n_tokens,
    )


def sequence_diagnostics(seq: MapSequence, t: TeacherSequence, maps: VocabMaps) -> dict[str, int | float]:
    """One sequence's share of report.json beyond the counts its map row already holds, keyed by the Parquet column
    it is kept in (`DIAG_KINDS`, `DIAG_MASSES`): positions per alignment kind (response positions without a teacher
    row count as unaligned) and the teacher top-k mass of its aligned rows, split by how the ids map (pure)."""
    hit = seq.teacher_row >= 0
    rows = seq.teacher_row[hit]
    kinds = {name: 0 for name in KIND_NAMES.values()}
    for code, n in zip(*np.unique(seq.align_kind[hit], return_counts=True)):
        kinds[KIND_NAMES[int(code)]] += int(n)
    kinds["unaligned"] += max(int(seq.loss_mask.sum()) - len(rows), 0)
    mass = {"mass_total": 0.0, "mass_exact": 0.0, "mass_fuzzy": 0.0, "mass_none": 0.0, "tail_mass": 0.0}
    if len(rows):
        ids = t.topk_ids[rows]
        p = np.exp(t.topk_logprobs[rows].astype(np.float64))
        exact = maps.em_t2s[ids] >= 0
        has_fuzzy = np.diff(maps.fuzzy_t2s.indptr)[ids] > 0
        mass = {
            "mass_total": float(p.sum()),
            "mass_exact": float(p[exact].sum()),
            "mass_fuzzy": float(p[~exact & has_fuzzy].sum()),
            "mass_none": float(p[~exact & ~has_fuzzy].sum()),
            "tail_mass": float(len(rows) - p.sum()),
        }
    return {**{DIAG_KINDS[k]: v for k, v in kinds.items()}, **{DIAG_MASSES[k]: v for k, v in mass.items()}}


@dataclass
class Diagnostics:
    """Running totals for report.json."""

    sequences: int = 0
    student_tokens: int = 0
    response_positions: int = 0
    aligned: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: {v: 0 for v in KIND_NAMES.values()})
    mass_total: float = 0.0
    mass_exact: float = 0.0
    mass_fuzzy: float = 0.0
    mass_none: float = 0.0
    tail_mass: float = 0.0

    def add(self, seq: MapSequence, t: TeacherSequence, maps: VocabMaps) -> None:
        """Count one sequence, reading its teacher sequence (the slow path, for map stores without per-sequence
        diagnostics)."""
        d = sequence_diagnostics(seq, t, maps)
        self.sequences += 1
        self.student_tokens += len(seq.student_ids)
        self.response_positions += int(seq.loss_mask.sum())
        self.aligned += int((seq.teacher_row >= 0).sum())
        for name, col in DIAG_KINDS.items():
            self.kinds[name] += int(d[col])
        for name, col in DIAG_MASSES.items():
            setattr(self, name, getattr(self, name) + float(d[col]))

    @classmethod
    def from_shards(cls, entries: list[dict[str, Any]]) -> "Diagnostics | None":
        """Totals of a map store from its shard entries' ``report_totals`` (see `MapStoreWriter.close`), merged in
        shard order; None when a shard has none (written by an older cdm), so the caller recounts."""
        total = cls()
        for e in entries:
            t = e.get("report_totals")
            if not isinstance(t, dict):
                return None
            total.merge(cls(**{**t, "kinds": dict(t["kinds"])}))
        return total

    def merge(self, other: "Diagnostics") -> None:
        for name in ("sequences", "student_tokens", "response_positions", "aligned", "mass_total", "mass_exact", "mass_fuzzy", "mass_none", "tail_mass"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.kinds.items():
            self.kinds[k] = self.kinds.get(k, 0) + v

    def to_json(self) -> dict[str, Any]:
        rows = max(self.aligned, 1)
        tot = self.mass_total or 1.0
        return {
            "sequences": self.sequences,
            "student_tokens": self.student_tokens,
            "response_positions": self.response_positions,
            "aligned_positions": self.aligned,
            "aligned_share": round(self.aligned / max(self.response_positions, 1), 4),
            "groups": self.kinds,
            "topk_mass_per_row": round(self.mass_total / rows, 4),
            "topk_mass_exact_share": round(self.mass_exact / tot, 4),
            "topk_mass_fuzzy_share": round(self.mass_fuzzy / tot, 4),
            "topk_mass_unmapped_share": round(self.mass_none / tot, 4),
            "tail_mass_per_row": round(self.tail_mass / rows, 4),
        }


# ------------------------------------------------------------------------------------------ workers


_W: dict[str, Any] = {}


def _init_worker(store_url: str, student_path: str, opts: BuildOptions, teacher_json: str, maps_path: str | None,
                 storage_options: dict[str, Any] | None = None) -> None:
    import tokenizers

    _W["store"] = TeacherStore(store_url, check="none", storage_options=storage_options)
    _W["student"] = load_tokenizer(student_path)
    _W["opts"] = opts
    teacher_tok = tokenizers.Tokenizer.from_str(teacher_json)
    _W["tcv"] = V.canonical_vocab(teacher_tok) if opts.align != "offsets" else None
    _W["scv"] = V.canonical_vocab(_W["student"]) if opts.align != "offsets" else None
    _W["maps"] = VocabMaps.load(Location(maps_path)) if maps_path else None


def _map_range(indices: list[int]) -> tuple[list[MapSequence], list[tuple[int, str]]]:
    """Map the given teacher sequences; each mapped sequence carries its report share in
    ``extra["diagnostics"]`` (`sequence_diagnostics`), which the map store keeps in its row."""
    store, opts = _W["store"], _W["opts"]
    out, skipped = [], []
    for i, t in zip(indices, store.sequences(indices)):  # consecutive indices are read as ranges
        try:
            seq = map_sequence(t, i, _W["student"], opts, _W["tcv"], _W["scv"])
        except ValueError as e:
            skipped.append((i, f"sequence {t.seq_id}: {e}"))
            continue
        if _W["maps"] is not None:
            seq.extra["diagnostics"] = sequence_diagnostics(seq, t, _W["maps"])
        out.append(seq)
    return out, skipped


def check_build_args(align: str, theta: float, workers: int | None, batch_sequences: int) -> None:
    """Refuse settings build-map cannot use, naming the CLI flag (ValueError), before anything is opened."""
    if align not in ALIGN_MODES:
        raise OptionError(f"--align must be one of {ALIGN_MODES}, got {align!r}")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 < theta <= 1:
        raise OptionError(f"--theta must be in (0, 1] (a normalised edit distance, levenshtein / (len a + len b)), got {theta!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1):
        raise OptionError(f"--workers must be an integer >= 1 (leave it out to use all cores), got {workers!r}")
    if isinstance(batch_sequences, bool) or not isinstance(batch_sequences, int) or batch_sequences < 1:
        raise OptionError(f"batch_sequences must be an integer >= 1, got {batch_sequences!r}")


@dataclass
class BuildResult:
    """What `build_map` did: the map store's location and key (24 hex digits of its identity hash), the report
    (`report.json`'s content: coverage, group counts, mapped top-k mass), and whether anything was computed (False:
    the map existed and was complete)."""

    url: str
    key: str
    report: dict[str, Any]
    computed: bool


@quiet_libraries_unless_progress
def build_map(
    store: str | os.PathLike[str],
    student_tokenizer: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    align: str = "offsets",
    theta: float = 0.3,
    space_insensitive: bool = False,
    workers: int | None = None,
    cache_dir: str | None = None,
    batch_sequences: int = 256,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> BuildResult:
    """Build (or resume, or reuse) the map store of `store` for `student_tokenizer` at `out`.

    `theta` (--theta): fuzzy neighbours are token pairs with normalised edit distance
    nd(a, b) = levenshtein(a, b) / (len(a) + len(b)) < theta; nd lies in [0, 1], so theta must be in (0, 1].
    `workers` (--workers): worker processes, >= 1; None = all cores. Bad values raise OptionError (a ValueError) naming the flag,
    before anything is read or written. `cache_dir` (--cache-dir): where the vocabulary maps of a tokenizer pair
    are cached (default: `default_cache_dir()`). `log`: where progress lines go (default: stderr, as the CLI).
    Paths may be str or os.PathLike; `store` and `out` may be fsspec URLs, opened with `storage_options` (the CLI
    takes them from the environment). Returns a BuildResult."""
    check_build_args(align, theta, workers, batch_sequences)
    log = log or _stderr
    store, student_tokenizer, out = map(as_str, (store, student_tokenizer, out))
    opts = BuildOptions(align=align, theta=theta, space_insensitive=space_insensitive, workers=workers if workers is not None else max(1, os.cpu_count() or 1))
    so = dict(storage_options) if storage_options else None
    tstore = TeacherStore(store, storage_options=so)
    teacher_json = tstore.tokenizer_json()
    if teacher_json is None:
        raise StoreError(f"{store}: the teacher store holds no tokenizer.json; re-run `cdm precompute` with this cdm version")
    import tokenizers

    teacher_tok = tokenizers.Tokenizer.from_str(teacher_json)
    teacher_tok.cdm_roles = teacher_roles(tstore.manifest)
    student_tok = load_tokenizer(student_tokenizer)
    s_hash = tokenizer_hash(student_tok)
    t_vocab = teacher_tok.get_vocab_size(with_added_tokens=True)
    if t_vocab > tstore.vocab_size:
        raise StoreError(f"{store}: tokenizer.json has {t_vocab} tokens but the store's vocab_size is {tstore.vocab_size}")
    s_roles = dict(getattr(student_tok, "cdm_roles", None) or {})
    key_parts = [MAP_FORMAT_TAG, tstore.key, s_hash, s_roles, align, theta, space_insensitive, opts.student_weight]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    manifest = {
        "teacher_store": {"key": tstore.key, "url": recorded_location(store), "k": tstore.k, "vocab_size": tstore.vocab_size},
        "student": {"tokenizer": recorded_location(student_tokenizer), "tokenizer_hash": s_hash, "roles": s_roles,
                    "vocab_size": student_tok.get_vocab_size(with_added_tokens=True)},
        "alignment": {
            "mode": align,
            "convention": "teacher_row[j] predicts the same continuation as student position j (last-token pairing)",
            "student_weight": opts.student_weight if align == "dtw" else None,
        },
        "theta": theta,
        "space_insensitive": space_insensitive,
    }
    cache = os.fspath(cache_dir) if cache_dir else default_cache_dir()
    maps, maps_path = cached_vocab_maps(teacher_tok, student_tok, opts, cache, log)
    shards = tstore.reader.shards
    starts = tstore.reader._shard_starts
    computed = False
    t0 = time.time()
    pool = None
    for si, shard in enumerate(shards):
        writer = MapStoreWriter(out, key=key, manifest=manifest, num_shards=len(shards), shard_index=si,
                                storage_options=so)
        if si == 0 and not writer.loc.exists(VOCAB_DONE):
            maps.save(writer.loc, "vocab")  # rewrites a half-written vocab/ left by a killed run
            writer.loc.write_bytes(b"ok\n", VOCAB_DONE)
        if writer.complete:
            continue
        computed = True
        try:
            done = writer.done_teacher_indices
            todo = [i for i in range(int(starts[si]), int(starts[si + 1])) if i not in done]
            chunks = [todo[a : a + batch_sequences] for a in range(0, len(todo), batch_sequences)]
            if pool is None and opts.workers > 1 and len(todo) > batch_sequences:
                pool = ProcessPoolExecutor(opts.workers, initializer=_init_worker, initargs=(store, student_tokenizer, opts, teacher_json, maps_path, so))
            if pool is None:
                _init_worker(store, student_tokenizer, opts, teacher_json, maps_path, so)
                results = map(_map_range, chunks)
            else:
                results = pool.map(_map_range, chunks)
            bar = _progress(len(todo), f"build-map shard {si}", progress)
            for seqs, skipped in results:
                for s in seqs:
                    writer.add(s)
                for i, reason in skipped:
                    writer.skip(i, reason)
                writer.commit()
                bar.update(len(seqs) + len(skipped))
            bar.close()
            writer.close()  # the shard entry gets the summed per-sequence diagnostics (report_totals)
        except BaseException:
            writer.release()  # interrupted or failed: another process may resume the shard at once
            raise
    if pool is not None:
        pool.shutdown()
    report = _final_report(out, store, tstore, maps, opts, time.time() - t0, computed, so)
    return BuildResult(url=out, key=key, report=report, computed=computed)


def recount_diagnostics(mstore: MapStore, tstore: TeacherStore, maps: VocabMaps) -> Diagnostics:
    """Diagnostics recounted from both stores (range reads): for map stores whose shards carry no
    ``report_totals``, and the reference the stored totals are tested against."""
    diag = Diagnostics()
    r = mstore.reader
    index = [int(i) for s in range(len(r.shards)) for i in r.table(s).column("teacher_index").to_pylist()]
    for seq, t in zip(mstore, tstore.sequences(index)):
        diag.add(seq, t, maps)
    return diag


def _final_report(out: str, store: str, tstore: TeacherStore, maps: VocabMaps, opts: BuildOptions, wall: float, computed: bool,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Diagnostics over the whole map store: the sum of its shards' ``report_totals``, which cover every sequence
    of a shard however many runs wrote it, so a resumed build reports everything without reading the stores again
    (older map stores without them are recounted)."""
    loc = Location(out, storage_options)
    if loc.exists("report.json") and not computed:
        return loc.read_json("report.json")
    mstore = MapStore(out, storage_options=storage_options)
    diag = Diagnostics.from_shards(mstore.reader.shards) or recount_diagnostics(mstore, tstore, maps)
    report = {
        **diag.to_json(),
        "alignment": opts.align,
        "theta": opts.theta,
        "exact_map_teacher_share": round(float((maps.em_t2s >= 0).mean()), 4),
        "exact_map_student_share": round(float((maps.em_s2t >= 0).mean()), 4),
        "fuzzy_pairs_t2s": int(len(maps.fuzzy_t2s.indices)),
        "teacher_store": store,
        "wall_seconds": round(wall, 2),
    }
    loc.write_json(report, "report.json")
    return report


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of report.json."""
    g = report.get("groups", {})
    return "\n".join(
        [
            f"sequences             {report['sequences']}",
            f"student positions     {report['student_tokens']} ({report['response_positions']} in responses)",
            f"aligned (KD rows)     {report['aligned_positions']} = {report['aligned_share']:.1%} of response positions",
            "groups                " + ", ".join(f"{k} {v}" for k, v in g.items() if k != "unaligned"),
            f"teacher top-k mass    exact {report['topk_mass_exact_share']:.1%} | fuzzy {report['topk_mass_fuzzy_share']:.1%} | "
            f"unmapped {report['topk_mass_unmapped_share']:.1%} (top-k holds {report['topk_mass_per_row']:.1%} per row)",
        ]
    )
