"""`cdm build-map` end to end on a tiny teacher store (trained byte-level BPE teacher, SentencePiece student with
byte fallback): map store content vs `map_sequence`, report.json vs a manual count, the three alignment modes,
resume after SIGKILL, re-running a finished build, clear errors, `cdm inspect` and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from cdm.mapping import align as A
from cdm.mapping import build as B
from cdm.mapping import vocab_maps as VM
from cdm.mapping.store import MapStore
from cdm.mapping.tokenizers import TokenizerError, encode_with_offsets, load_tokenizer, tokenizer_hash
from cdm.mapping.vocab import canonical_vocab
from cdm.storage import TeacherSequence, TeacherStore
from cdm.storage.ragged import StoreError
from tests.mapping_fixtures import teacher_sequence, tiny_corpus, write_teacher_store
from tests.tokenizer_fixtures import tiny_bytelevel, tiny_sentencepiece, tiny_wordpiece  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # what precompute records for the teacher
FIELDS = ("student_ids", "student_spans", "teacher_row", "align_kind", "loss_mask")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def regex_tokenizer(pieces: list[str]) -> Tokenizer:
    """A hand-made tokenizer that cuts text into exactly `pieces` (longest first), one token each."""
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces + ["[UNK]"])}, unk_token="[UNK]"))
    alt = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(alt), behavior="isolated")
    return tok


def hand_sequence(
    text: str, pieces: list[str], response: list[tuple[int, int]], entropy: list[float] | None = None
) -> TeacherSequence:
    ends = np.cumsum([len(p) for p in pieces])
    spans = np.stack([ends - [len(p) for p in pieces], ends], axis=1).astype(np.int32)
    assert "".join(pieces) == text
    n = len(pieces)
    return TeacherSequence(
        seq_id="h", text=text, response_spans=np.array(response, dtype=np.int32).reshape(-1, 2), source_index=0, truncated=False,
        token_ids=np.arange(n, dtype=np.int32), char_spans=spans, topk_ids=np.zeros((n, 1), np.int32),
        topk_logprobs=np.zeros((n, 1), np.float32), logsumexp=np.zeros(n, np.float32),
        entropy=np.asarray(entropy if entropy is not None else np.ones(n), dtype=np.float32),
    )


# ------------------------------------------------------------------------------------------ pure pieces


def test_response_mask_hand_vector():
    spans = np.array([[0, 2], [2, 2], [2, 5], [5, 9], [9, 9], [9, 12], [12, 14]])
    assert B.response_mask(spans, np.array([[2, 9]])).tolist() == [False, True, True, True, False, False, False]
    assert B.response_mask(spans, np.array([[0, 2], [9, 14]])).tolist() == [True, False, False, False, True, True, True]
    assert B.response_mask(spans, np.zeros((0, 2))).tolist() == [False] * 7
    assert B.response_mask(spans, np.array([[5, 5]])).tolist() == [False] * 7


HELLO_T = ["Hello", " world", "!"]
HELLO_S = ["Hel", "lo", " wor", "ld!"]


def test_map_sequence_offsets_hand_vector():
    student = regex_tokenizer(HELLO_S)
    opts = B.BuildOptions(align="offsets")
    t = hand_sequence("Hello world!", HELLO_T, [(5, 12)])
    m = B.map_sequence(t, 7, student, opts)
    assert m.teacher_index == 7 and m.n_teacher_tokens == 3 and m.text_sha256 == t.text_sha256
    assert m.student_ids.tolist() == [0, 1, 2, 3]
    assert m.student_spans.tolist() == [[0, 3], [3, 5], [5, 9], [9, 12]]
    assert m.loss_mask.tolist() == [False, False, True, True]
    # C = {5, 12}: (T0, S1) predicts the first response token, (T2, S3) the end of the response
    assert m.teacher_row.tolist() == [-1, 0, -1, 2]
    assert m.align_kind.tolist() == [A.UNALIGNED, A.ONE_N, A.UNALIGNED, A.N_M]
    # the prompt's own boundaries make no KD rows; a region inside a group gives none either
    assert B.map_sequence(hand_sequence("Hello world!", HELLO_T, [(6, 12)]), 0, student, opts).teacher_row.tolist() == [-1, -1, -1, 2]
    assert B.map_sequence(hand_sequence("Hello world!", HELLO_T, [(6, 8)]), 0, student, opts).teacher_row.tolist() == [-1, -1, -1, -1]


def test_map_sequence_several_response_regions():
    """Chat data has one trained span per assistant turn: pairs and loss mask are the union over the regions."""
    student = regex_tokenizer(HELLO_S)
    t = hand_sequence("Hello world!", HELLO_T, [(0, 5), (11, 12)])
    m = B.map_sequence(t, 0, student, B.BuildOptions(align="offsets"))
    assert m.loss_mask.tolist() == [True, True, False, False]  # tokens starting at 0 and 3; none starts at 11
    assert m.teacher_row.tolist() == [-1, 0, -1, 2]  # e = 5 closes region 1, e = 12 region 2; 11 is not common
    tcv, scv = canonical_vocab(regex_tokenizer(HELLO_T)), canonical_vocab(student)
    d = B.map_sequence(t, 0, student, B.BuildOptions(align="mined"), tcv, scv)
    # region 1: Hello vs Hel|lo (no 1-1 pair); region 2: ! vs ld! (one token each, a 1-1 pair)
    assert d.teacher_row.tolist() == [-1, -1, -1, 2]


def test_map_sequence_empty_response_and_one_token():
    student = regex_tokenizer(HELLO_S)
    opts = B.BuildOptions(align="offsets")
    none = B.map_sequence(hand_sequence("Hello world!", HELLO_T, []), 0, student, opts)
    assert none.loss_mask.tolist() == [False] * 4 and none.teacher_row.tolist() == [-1] * 4
    # an empty span at the text end trains nothing; only its boundary pair (predicting what follows) remains
    empty = B.map_sequence(hand_sequence("Hello world!", HELLO_T, [(12, 12)]), 0, student, opts)
    assert empty.loss_mask.tolist() == [False] * 4 and empty.teacher_row.tolist() == [-1, -1, -1, 2]
    one = B.map_sequence(hand_sequence("lo", ["lo"], [(0, 2)]), 0, student, opts)
    assert one.student_ids.tolist() == [1] and one.teacher_row.tolist() == [0] and one.align_kind.tolist() == [A.ONE_ONE]
    for mode in ("dtw", "mined"):
        o = B.map_sequence(hand_sequence("lo", ["lo"], [(0, 2)]), 0, student, B.BuildOptions(align=mode),
                           canonical_vocab(regex_tokenizer(["lo"])), canonical_vocab(student))
        assert o.teacher_row.tolist() == [0] and o.align_kind.tolist() == [A.ONE_ONE]


def _expected_dtw_rows(t_strs, s_strs, wt, ws, one_to_one_only=False):
    """Expected rows from the pure-Python reference DTW: the last student token of each group gets its last
    teacher token (a diagonal step starts a group)."""
    t2s, _, _ = A.dtw_slow(t_strs, s_strs, list(wt), list(ws))
    cells = sorted((i, j) for i, js in enumerate(t2s) for j in js)
    groups, prev = [], None
    for i, j in cells:
        if prev is None or (i != prev[0] and j != prev[1]):
            groups.append(({i}, {j}))
        else:
            groups[-1][0].add(i)
            groups[-1][1].add(j)
        prev = (i, j)
    rows = np.full(len(s_strs), -1)
    for ti, sj in groups:
        if not one_to_one_only or (len(ti) == 1 and len(sj) == 1):
            rows[max(sj)] = max(ti)
    return rows.tolist()


def test_map_sequence_dtw_and_mined_use_the_response_tokens():
    student = regex_tokenizer(HELLO_S)
    t_tok = regex_tokenizer(HELLO_T)
    tcv, scv = canonical_vocab(t_tok), canonical_vocab(student)
    ent = [0.1, 2.0, 0.5]
    t = hand_sequence("Hello world!", HELLO_T, [(0, 12)], ent)
    m = B.map_sequence(t, 0, student, B.BuildOptions(align="dtw", student_weight=4), tcv, scv)
    wt = A.entropy_weights(np.array(ent))
    assert m.teacher_row.tolist() == _expected_dtw_rows(HELLO_T, HELLO_S, wt, [4] * 4) == [-1, 0, 1, 2]
    mm = B.map_sequence(t, 0, student, B.BuildOptions(align="mined"), tcv, scv)
    assert mm.teacher_row.tolist() == _expected_dtw_rows(HELLO_T, HELLO_S, [1] * 3, [1] * 4, True) == [-1, -1, 1, 2]
    assert set(mm.align_kind[mm.teacher_row >= 0].tolist()) == {A.ONE_ONE}
    # entropy weights move the path: teacher a|bc (entropy 2.0, 0.1 -> w 5, 3) vs student a|b|c puts b with bc;
    # unit weights (MinED) put b with a
    abc = hand_sequence("abc", ["a", "bc"], [(0, 3)], [2.0, 0.1])
    a_b_c, a_bc = regex_tokenizer(["a", "b", "c"]), regex_tokenizer(["a", "bc"])
    w = B.map_sequence(abc, 0, a_b_c, B.BuildOptions(align="dtw"), canonical_vocab(a_bc), canonical_vocab(a_b_c))
    assert w.teacher_row.tolist() == [0, -1, 1] and w.align_kind.tolist() == [A.ONE_ONE, A.UNALIGNED, A.ONE_N]
    u = B.map_sequence(abc, 0, a_b_c, B.BuildOptions(align="mined"), canonical_vocab(a_bc), canonical_vocab(a_b_c))
    assert u.teacher_row.tolist() == [-1, -1, 1]
    # a response region: only tokens overlapping it take part, rows are global positions
    r = B.map_sequence(hand_sequence("Hello world!", HELLO_T, [(5, 12)], ent), 0, student, B.BuildOptions(align="dtw"), tcv, scv)
    local = _expected_dtw_rows(HELLO_T[1:], HELLO_S[2:], A.entropy_weights(np.array(ent[1:])), [4, 4])
    assert r.teacher_row.tolist() == [-1, -1] + [x + 1 if x >= 0 else -1 for x in local]


# ------------------------------------------------------------------------------------------ tiny teacher store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bytelevel, tiny_sentencepiece, tiny_wordpiece):
    """A two-shard teacher store (tiny byte-level BPE teacher, random top-k; BOS/EOS zero-width specials on every
    third sequence, a one-token sequence) and the student: a SentencePiece model with byte fallback (a bare
    ``.model`` file). A WordPiece tokenizer serves as the wrong student."""
    root = tmp_path_factory.mktemp("buildmap")
    t_tok = tiny_bytelevel.tok
    rng = np.random.default_rng(0)
    seqs = []
    bos, eos = t_tok.token_to_id("<|im_start|>"), t_tok.token_to_id("<|endoftext|>")
    for i, (text, resp) in enumerate(tiny_corpus()):
        special = i % 3 == 0
        ends = {"bos": bos, "eos": eos} if special else {}
        seqs.append(teacher_sequence(t_tok, text, i, rng, k=8, response=resp, **ends))
    seqs.append(teacher_sequence(t_tok, "x", len(seqs), rng, k=8, response=(0, 1)))
    store = str(root / "teacher")
    write_teacher_store(store, t_tok, seqs, k=8, num_shards=2, roles=ROLES)
    return {"root": root, "store": store, "student": str(tiny_sentencepiece.path), "other": str(tiny_wordpiece.path),
            "n": len(seqs), "teacher_eos": eos}


def _build(tiny, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("cache_dir", str(tiny["root"] / "cache"))
    return B.build_map(tiny["store"], tiny["student"], str(out), progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def clean_map(tiny, tmp_path_factory):
    """One finished offsets build of the tiny store, shared by the tests that only read it or compare with it."""
    out = tmp_path_factory.mktemp("clean") / "map"
    return out, _build(tiny, out)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_map(a: str, b: str) -> None:
    ma, mb = MapStore(a), MapStore(b)
    assert len(ma) == len(mb)
    for i in range(len(ma)):
        x, y = ma[i], mb[i]
        assert (x.seq_id, x.teacher_index, x.text_sha256) == (y.seq_id, y.teacher_index, y.text_sha256)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f"{f} of sequence {i}")
    va, vb = ma.vocab, mb.vocab
    for f in ("em_t2s", "em_s2t", "mined_t2s", "mined_s2t"):
        np.testing.assert_array_equal(getattr(va, f), getattr(vb, f))
    for f in ("fuzzy_t2s", "fuzzy_s2t"):
        for part in ("indptr", "indices", "dist"):
            np.testing.assert_array_equal(getattr(getattr(va, f), part), getattr(getattr(vb, f), part))


def _manual_report(map_url: str, store_url: str) -> dict:
    """Counts of report.json recomputed from the two stores with plain numpy."""
    ms, ts = MapStore(map_url), TeacherStore(store_url)
    maps = ms.vocab
    has_fuzzy = np.diff(maps.fuzzy_t2s.indptr) > 0
    tot = {"sequences": 0, "student_tokens": 0, "response_positions": 0, "aligned_positions": 0}
    kinds = {k: 0 for k in ("unaligned", "1-1", "1-n", "n-1", "n-m")}
    names = {1: "1-1", 2: "1-n", 3: "n-1", 4: "n-m"}
    mass = {"all": 0.0, "exact": 0.0, "fuzzy": 0.0, "none": 0.0, "tail": 0.0}
    for m in ms:
        t = ts[m.teacher_index]
        rows = m.teacher_row[m.teacher_row >= 0]
        tot["sequences"] += 1
        tot["student_tokens"] += len(m.student_ids)
        tot["response_positions"] += int(m.loss_mask.sum())
        tot["aligned_positions"] += len(rows)
        for k in m.align_kind[m.teacher_row >= 0].tolist():
            kinds[names[k]] += 1
        kinds["unaligned"] += max(int(m.loss_mask.sum()) - len(rows), 0)
        p = np.exp(t.topk_logprobs[rows].astype(np.float64))
        ids = t.topk_ids[rows]
        exact = maps.em_t2s[ids] >= 0
        fz = ~exact & has_fuzzy[ids]
        mass["all"] += p.sum()
        mass["exact"] += p[exact].sum()
        mass["fuzzy"] += p[fz].sum()
        mass["none"] += p[~exact & ~fz].sum()
        mass["tail"] += len(rows) - p.sum()
    return {**tot, "groups": kinds, "aligned_share": tot["aligned_positions"] / tot["response_positions"],
            "topk_mass_per_row": mass["all"] / tot["aligned_positions"], "topk_mass_exact_share": mass["exact"] / mass["all"],
            "topk_mass_fuzzy_share": mass["fuzzy"] / mass["all"], "topk_mass_unmapped_share": mass["none"] / mass["all"],
            "tail_mass_per_row": mass["tail"] / tot["aligned_positions"]}


@pytest.mark.parametrize("mode", ["offsets", "dtw", "mined"])
def test_build_map_content_and_report(tiny, tmp_path, mode):
    out = tmp_path / f"map-{mode}"
    res = _build(tiny, out, align=mode)
    assert res.computed
    ms, ts = MapStore(str(out), check="digest"), TeacherStore(tiny["store"])
    assert len(ms) == tiny["n"] == len(ts)
    assert ms.manifest["teacher_store"]["key"] == ts.key
    assert ms.manifest["student"]["tokenizer_hash"] == tokenizer_hash(load_tokenizer(tiny["student"]))
    assert ms.manifest["alignment"]["mode"] == mode
    ms.check_pair(ts.manifest, tokenizer_hash(load_tokenizer(tiny["student"])))
    # the map store holds exactly what map_sequence computes for each teacher sequence
    student = load_tokenizer(tiny["student"])
    t_tok = Tokenizer.from_str(ts.tokenizer_json())
    tcv, scv = canonical_vocab(t_tok), canonical_vocab(student)
    opts = B.BuildOptions(align=mode)
    seen = set()
    for m in ms:
        want = B.map_sequence(ts[m.teacher_index], m.teacher_index, student, opts, tcv, scv)
        assert m.seq_id == want.seq_id == ts[m.teacher_index].seq_id
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(m, f), getattr(want, f), err_msg=f"{mode}: {f} of {m.seq_id}")
        ids, spans = encode_with_offsets(student, ts[m.teacher_index].text)
        np.testing.assert_array_equal(m.student_ids, ids)
        np.testing.assert_array_equal(m.student_spans, spans)
        rows = m.teacher_row[m.teacher_row >= 0]
        assert rows.max(initial=-1) < ts[m.teacher_index].n_tokens
        if mode == "offsets":  # paired rows end at the same character on both sides
            j = np.flatnonzero(m.teacher_row >= 0)
            np.testing.assert_array_equal(m.student_spans[j, 1], ts[m.teacher_index].char_spans[rows, 1])
        if mode == "mined":
            assert set(m.align_kind[m.teacher_row >= 0].tolist()) <= {A.ONE_ONE}
        seen.add(m.teacher_index)
    assert seen == set(range(tiny["n"]))
    # the vocabulary maps stored with it: the exact maps of the two canonical vocabularies, specials by role
    v = ms.vocab
    t_roles = canonical_vocab(t_tok, roles=ROLES)
    np.testing.assert_array_equal(v.em_t2s, VM.exact_map(t_roles, scv))
    np.testing.assert_array_equal(v.em_s2t, VM.exact_map(scv, t_roles))
    assert v.em_t2s[tiny["teacher_eos"]] == scv.roles["eos"] == student.token_to_id("</s>")
    assert (v.teacher_vocab_size, v.student_vocab_size) == (len(tcv), len(scv))
    # report.json = a manual count over the two stores
    report = json.loads((out / "report.json").read_text())
    assert report == res.report
    manual = _manual_report(str(out), tiny["store"])
    for k in ("sequences", "student_tokens", "response_positions", "aligned_positions", "groups"):
        assert report[k] == manual[k], k
    for k in ("aligned_share", "topk_mass_per_row", "topk_mass_exact_share", "topk_mass_fuzzy_share",
              "topk_mass_unmapped_share", "tail_mass_per_row"):
        assert report[k] == pytest.approx(manual[k], abs=1e-4), k
    assert report["aligned_positions"] > 0.3 * report["response_positions"]
    assert report["alignment"] == mode and report["theta"] == 0.3
    assert "aligned" in B.format_report(report)


def test_build_map_rerun_is_a_no_op(tiny, clean_map):
    out, first = clean_map
    before = _snapshot(out)
    again = _build(tiny, out)
    assert first.computed and not again.computed
    assert again.report == first.report and again.key == first.key
    assert _snapshot(out) == before


def test_resume_after_sigkill_gives_the_same_map_store(tiny, clean_map, tmp_path):
    clean = clean_map[0]
    out = tmp_path / "killed"
    child = (
        "import os, signal, sys\n"
        "from cdm.mapping import build, store\n"
        "k, n = int(sys.argv[4]), [0]\n"
        "orig = store.MapStoreWriter.add\n"
        "def add(self, seq):\n"
        "    orig(self, seq)\n"
        "    n[0] += 1\n"
        "    if n[0] == k:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "store.MapStoreWriter.add = add\n"
        "build.build_map(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, batch_sequences=3, cache_dir=sys.argv[5],\n"
        "                progress=False, log=lambda m: None)\n"
    )
    n0 = (tiny["n"] + 1) // 2  # shard 0 holds the even source indices
    # batches of 3 are committed together. First kill: the 8th add, in shard 0 after two committed batches (6).
    # Second kill: the rerun finishes shard 0 (n0 - 6 adds), then dies on the 5th add of shard 1 (3 committed).
    for k in (8, (n0 - 6) + 5):
        argv = [tiny["store"], tiny["student"], str(out), str(k), str(tiny["root"] / "cache")]
        p = subprocess.run([sys.executable, "-c", child, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert not (out / "report.json").exists()
        with pytest.raises(StoreError):
            MapStore(str(out))  # incomplete: refused
    res = _build(tiny, out, workers=2, batch_sequences=4)  # the rest, through the worker pool
    assert res.computed
    _assert_same_map(str(clean), str(out))
    a = json.loads((clean / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b


def test_kill_while_writing_the_vocabulary_maps_then_resume(tiny, clean_map, tmp_path):
    """SIGKILL half-way through the map store's vocab/ arrays: the resumed build rewrites them completely."""
    clean = clean_map[0]
    out = tmp_path / "killed"
    child = (
        "import os, signal, sys\n"
        "import zarr\n"
        "from cdm.mapping import build, store\n"
        "orig_save, orig_create, n = store.VocabMaps.save, zarr.Group.create_array, [0]\n"
        "def create(self, *a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig_create(self, *a, **k)\n"
        "def save(self, loc, *parts):\n"
        "    if parts == ('vocab',):\n"
        "        zarr.Group.create_array = create\n"
        "    return orig_save(self, loc, *parts)\n"
        "store.VocabMaps.save = save\n"
        "build.build_map(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, cache_dir=sys.argv[4], progress=False,\n"
        "                log=lambda m: None)\n"
    )
    p = subprocess.run([sys.executable, "-c", child, tiny["store"], tiny["student"], str(out), str(tiny["root"] / "cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    _build(tiny, out)
    _assert_same_map(str(clean), str(out))


def test_vocab_cache_is_keyed_by_roles_too(tiny, tmp_path, tiny_bytelevel):
    """Two teachers with the same tokenizer.json but different eos tokens (a base and an instruct model) must not
    share cached vocabulary maps: each eos maps to the student's eos."""
    t_tok = tiny_bytelevel.tok
    rng = np.random.default_rng(3)
    seqs = [teacher_sequence(t_tok, text, i, rng, response=resp) for i, (text, resp) in enumerate(tiny_corpus(4))]
    cache = str(tmp_path / "cache")
    student_eos = load_tokenizer(tiny["student"]).token_to_id("</s>")
    for eos in ("<|endoftext|>", "<|im_end|>"):
        store = str(tmp_path / f"teacher-{eos[2:-2]}")
        write_teacher_store(store, t_tok, seqs, roles={"eos_token": eos}, key=f"teacher-{eos}")
        out = tmp_path / f"map-{eos[2:-2]}"
        B.build_map(store, tiny["student"], str(out), workers=1, cache_dir=cache, progress=False, log=lambda m: None)
        assert MapStore(str(out)).vocab.em_t2s[t_tok.token_to_id(eos)] == student_eos, eos


def test_mismatched_store_or_tokenizer_is_refused(tiny, clean_map, tmp_path, tiny_bytelevel):
    out = clean_map[0]
    ms = MapStore(str(out))
    other_store = str(tmp_path / "other-teacher")
    t_tok = tiny_bytelevel.tok
    rng = np.random.default_rng(5)
    write_teacher_store(other_store, t_tok, [teacher_sequence(t_tok, "another text", 0, rng)], key="another-teacher")
    with pytest.raises(StoreError, match="teacher store"):
        ms.check_pair(TeacherStore(other_store).manifest)
    with pytest.raises(StoreError, match="tokenizer"):
        ms.check_pair(TeacherStore(tiny["store"]).manifest, tokenizer_hash(load_tokenizer(tiny["other"])))
    # the same --out for another student tokenizer: refused, nothing touched
    before = _snapshot(out)
    with pytest.raises(StoreError, match="key"):
        B.build_map(tiny["store"], tiny["other"], str(out), workers=1, cache_dir=str(tiny["root"] / "cache"), progress=False,
                    log=lambda m: None)
    assert _snapshot(out) == before


def test_tokenizers_without_offsets_or_files_give_clear_errors(tiny, tmp_path, tiny_bytelevel):
    class SlowTokenizer:  # e.g. a pure-Python tokenizer: no `tokenizers` backend, so no offsets
        def encode(self, text):
            return [1, 2]

    with pytest.raises(TokenizerError, match="character offsets"):
        encode_with_offsets(SlowTokenizer(), "hello")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        B.build_map(tiny["store"], str(tmp_path / "empty"), str(tmp_path / "m1"), workers=1, progress=False, log=lambda m: None)
    with pytest.raises(TokenizerError, match="does not exist"):
        B.build_map(tiny["store"], str(tmp_path / "nope.json"), str(tmp_path / "m2"), workers=1, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="--align"):
        B.build_map(tiny["store"], tiny["student"], str(tmp_path / "m3"), align="fast", progress=False, log=lambda m: None)
    # a teacher store written without its tokenizer cannot be canonicalised
    bare = str(tmp_path / "bare")
    from cdm.storage import TeacherStoreWriter

    t_tok = tiny_bytelevel.tok
    w = TeacherStoreWriter(bare, key="bare", manifest={}, k=8, vocab_size=t_tok.get_vocab_size(with_added_tokens=True))
    w.add(teacher_sequence(t_tok, "some text", 0, np.random.default_rng(0)))
    w.close()
    with pytest.raises(StoreError, match="tokenizer.json"):
        B.build_map(bare, tiny["student"], str(tmp_path / "m4"), workers=1, progress=False, log=lambda m: None)


def test_inspect_names_the_tokens(tiny, tmp_path, monkeypatch):
    from cdm.mapping.inspect import inspect_sequence

    out = tmp_path / "map"
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")  # build with relative paths, inspect from elsewhere
    B.build_map(os.path.relpath(tiny["store"]), os.path.relpath(tiny["student"]), "../map", workers=1,
                cache_dir=str(tiny["root"] / "cache"), progress=False, log=lambda m: None)
    monkeypatch.chdir(tmp_path)
    ms, ts = MapStore(str(out)), TeacherStore(tiny["store"])
    i = next(i for i in range(len(ms)) if (ms[i].teacher_row >= 0).sum() >= 5)
    text = inspect_sequence(str(out), i, max_rows=1000)
    m = ms[i]
    s_tok, t_tok = load_tokenizer(tiny["student"]), Tokenizer.from_str(ts.tokenizer_json())
    assert f"sequence {i}" in text and m.seq_id in text
    lines = text.splitlines()
    for j in np.flatnonzero(m.teacher_row >= 0)[:10]:
        row = next(ln for ln in lines if ln.split() and ln.split()[0] == str(j))
        s_piece = s_tok.id_to_token(int(m.student_ids[j]))[:15]
        t_piece = t_tok.id_to_token(int(ts[m.teacher_index].token_ids[m.teacher_row[j]]))[:15]
        assert s_piece in row and t_piece in row, row
        assert str(int(m.teacher_row[j])) in row.split()
        assert {"1-1", "1-n", "n-1", "n-m"} & set(row.split())


def test_cli_exit_codes(tiny, tmp_path):
    from typer.testing import CliRunner

    from cdm.cli import app

    out = tmp_path / "map"
    cache = str(tmp_path / "cache")
    args = ["build-map", "--store", tiny["store"], "--student-tokenizer", tiny["student"], "--out", str(out),
            "--workers", "1", "--cache-dir", cache, "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "cdm.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "aligned" in p.stdout and str(out) in p.stdout
    assert (out / "report.json").exists()
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already complete" in r.output
    r = runner.invoke(app, [*args[:-3], "--align", "fast", "--no-progress"])
    assert r.exit_code == 2 and "error" in r.output
    r = runner.invoke(app, ["build-map", "--store", tiny["store"], "--student-tokenizer", tiny["other"], "--out", str(out),
                            "--workers", "1", "--cache-dir", cache, "--no-progress"])
    assert r.exit_code == 2 and "error" in r.output
    r = runner.invoke(app, ["build-map", "--store", str(tmp_path / "missing"), "--student-tokenizer", tiny["student"],
                            "--out", str(tmp_path / "m2"), "--no-progress"])
    assert r.exit_code == 2 and "error" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--seq", "1"])
    assert r.exit_code == 0 and "sequence 1" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--seq", str(tiny["n"] + 5)])
    assert r.exit_code == 2 and "error" in r.output


def test_inspect_refuses_bad_arguments_and_says_how_to_find_a_moved_store(tiny, tmp_path):
    """--seq -1 is not Python's last sequence, --max-rows 0 and --top -2 are refused; a teacher store that moved
    gives an error pointing at --store; the kind column holds 'unaligned' without shifting the row."""
    import shutil

    from cdm.mapping.inspect import inspect_sequence

    out = str(tmp_path / "map")
    B.build_map(tiny["store"], tiny["student"], out, workers=1, cache_dir=str(tiny["root"] / "cache"), progress=False,
                log=lambda m: None)
    n = len(MapStore(out))
    with pytest.raises(IndexError, match=rf"--seq -1: the map store has {n} sequences"):
        inspect_sequence(out, -1)
    with pytest.raises(ValueError, match="--max-rows must be >= 1"):
        inspect_sequence(out, 0, max_rows=0)
    with pytest.raises(ValueError, match="--top must be >= 0"):
        inspect_sequence(out, 0, top=-2)
    text = inspect_sequence(out, 0, max_rows=1000, only_response=False)
    header = next(ln for ln in text.splitlines() if ln.split()[:1] == ["j"])
    col = header.index("t-row")
    rows = [ln for ln in text.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert any(" unaligned " in ln for ln in rows)  # prompt positions shown with --all
    for ln in rows:  # every row's t-row cell ends where the header's does
        assert ln[col:col + 5].strip() and ln[col + 5] == " ", (header, ln)
    moved = str(tmp_path / "moved-store")
    shutil.copytree(tiny["store"], moved)
    shutil.move(out, str(tmp_path / "map2"))
    away = str(tmp_path / "away")
    shutil.move(tiny["store"], away)
    try:
        with pytest.raises(StoreError, match="pass its new location with --store"):
            inspect_sequence(str(tmp_path / "map2"), 0)
        assert "sequence 0" in inspect_sequence(str(tmp_path / "map2"), 0, store_url=moved)
    finally:
        shutil.move(away, tiny["store"])


# ------------------------------------------------------------------------------------------ the Python API


def test_build_map_from_python_logs_to_stderr_and_takes_paths(tiny, clean_map, capsys):
    """Without `log`, progress lines go to stderr as the CLI's do (stdout stays free); pathlib paths are accepted."""
    out, first = clean_map
    again = B.build_map(Path(tiny["store"]), Path(tiny["student"]), out, workers=1,
                        cache_dir=str(tiny["root"] / "cache"), progress=False)
    captured = capsys.readouterr()
    assert not again.computed and again.key == first.key and isinstance(again.url, str)
    assert captured.out == "" and captured.err.strip()


def test_map_store_reader_conveniences(tiny, clean_map):
    """key/report/is_complete, slices, and the teacher index <-> map position lookup, against one-by-one reads."""
    out, first = clean_map
    m = MapStore(str(out))
    assert m.key == first.key and m.is_complete and m.report == first.report
    one_by_one = [m[i].teacher_index for i in range(len(m))]
    assert m.teacher_indices.tolist() == one_by_one
    for pos, t in enumerate(one_by_one):
        assert m.position_of(t) == pos
    with pytest.raises(KeyError, match=f"teacher sequence {tiny['n'] + 5} has no map sequence"):
        m.position_of(tiny["n"] + 5)
    part = m[1:4]
    assert [s.seq_id for s in part] == [m[i].seq_id for i in range(1, 4)]
    assert [s.seq_id for s in m[::-2]] == [m[i].seq_id for i in range(len(m) - 1, -1, -2)]
    t = TeacherStore(tiny["store"])
    assert [s.seq_id for s in t[-3:]] == [t[i].seq_id for i in range(len(t) - 3, len(t))]
    assert t[5:2] == []


def test_vocabulary_maps_cache_in_a_url_folder(tiny, clean_map, tmp_path):
    """A URL --cache-dir (shared through a bucket) caches the vocabulary maps there: the second build reads them."""
    import uuid

    lines: list[str] = []
    cache = f"memory://cdm-vocab-cache-{uuid.uuid4().hex}"
    for i in range(2):
        res = B.build_map(tiny["store"], tiny["student"], str(tmp_path / f"m{i}"), workers=1, cache_dir=cache,
                          progress=False, log=lines.append)
        drop = lambda r: {k: v for k, v in r.items() if k != "wall_seconds"}  # noqa: E731
        assert drop(res.report) == drop(clean_map[1].report)
    cached = [x for x in lines if x.startswith("vocabulary maps: ")]
    assert cached[0].startswith("vocabulary maps: computing") and cached[1].startswith(f"vocabulary maps: cached at {cache}/vocab-maps/")


def test_two_builders_of_one_pair_at_a_url_cache_do_not_clobber_each_other(tiny):
    """On a URL cache a second builder that missed the first one's `done` writes its own folder: the folder the first
    one published (and its pool workers read) stays intact, and `done` names a complete copy."""
    import uuid

    import tokenizers

    from cdm.mapping.store import VocabMaps
    from cdm.storage.fs import Location

    cache = f"memory://cdm-vocab-race-{uuid.uuid4().hex}"
    store = TeacherStore(tiny["store"])
    t_tok = tokenizers.Tokenizer.from_str(store.tokenizer_json())
    t_tok.cdm_roles = B.teacher_roles(store.manifest)
    s_tok = load_tokenizer(tiny["student"])
    opts = B.BuildOptions(workers=1)
    quiet = lambda m: None  # noqa: E731
    maps_a, path_a = B.cached_vocab_maps(t_tok, s_tok, opts, cache, log=quiet)
    Location(path_a.rsplit("/", 1)[0]).remove("done")  # the second builder started before the first published
    _, path_b = B.cached_vocab_maps(t_tok, s_tok, opts, cache, log=quiet)
    assert path_a != path_b
    for path in (path_a, path_b):
        got = VocabMaps.load(Location(path))
        np.testing.assert_array_equal(got.em_t2s, maps_a.em_t2s)
        np.testing.assert_array_equal(got.mined_t2s, maps_a.mined_t2s)
    _, path_c = B.cached_vocab_maps(t_tok, s_tok, opts, cache, log=quiet)
    assert path_c == path_b  # `done` names the last complete copy
