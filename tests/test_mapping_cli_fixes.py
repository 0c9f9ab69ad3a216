"""build-map fixes: the final report from per-shard totals (no second pass over the stores, resumed builds
included), argument checks naming the flag, a precise message for an --out that holds another map, and
`cdm verify` / `cdm info` for map stores."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from cdm.mapping import build as B
from cdm.mapping.store import MapStore, MapStoreWriter
from cdm.storage import StoreError, TeacherStore
from cdm.storage.verify import store_info, verify_map_store, verify_store
from tests.mapping_fixtures import teacher_sequence, write_teacher_store
from tests.test_build_map import _build, _manual_report, _offline, _snapshot, clean_map, tiny  # noqa: F401 (fixtures)
from tests.tokenizer_fixtures import tiny_bytelevel, tiny_sentencepiece, tiny_wordpiece  # noqa: F401 (fixtures)


def _without_wall(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "wall_seconds"}


def test_report_from_shard_totals_equals_the_recount_over_both_stores(tiny, clean_map):
    out, res = clean_map
    ms, ts = MapStore(str(out)), TeacherStore(tiny["store"])
    stored = B.Diagnostics.from_shards(ms.reader.shards)
    assert stored is not None and len(ms.reader.shards) == 2
    recount = B.recount_diagnostics(ms, ts, ms.vocab)  # the old _final_report's pass, with range reads
    assert stored.to_json() == recount.to_json()
    assert stored.sequences == recount.sequences == tiny["n"]
    for name in ("mass_total", "mass_exact", "mass_fuzzy", "mass_none", "tail_mass"):
        assert getattr(stored, name) == pytest.approx(getattr(recount, name), rel=1e-12), name
    manual = _manual_report(str(out), tiny["store"])  # plain numpy, sequence by sequence
    for k in ("sequences", "student_tokens", "response_positions", "aligned_positions", "groups"):
        assert res.report[k] == manual[k], k


def test_map_store_of_an_older_cdm_is_recounted_to_the_same_report(tiny, clean_map, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(clean_map[0], old)
    m = json.loads((old / "manifest.json").read_text())
    for s in m["shards"]:
        s.pop("report_totals")
    (old / "manifest.json").write_text(json.dumps(m))
    ms, ts = MapStore(str(old)), TeacherStore(tiny["store"])
    assert B.Diagnostics.from_shards(ms.reader.shards) is None
    opts = B.BuildOptions()
    report = B._final_report(str(old), tiny["store"], ts, ms.vocab, opts, 0.0, computed=True)
    assert _without_wall(report) == _without_wall(clean_map[1].report)


def test_resumed_build_reports_like_an_uninterrupted_one_without_rereading(tiny, clean_map, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    orig_add, n = MapStoreWriter.add, [0]

    def add_then_die(self, seq):
        n[0] += 1
        if n[0] == 8:  # in shard 0, after two committed batches of 3
            raise KeyboardInterrupt
        orig_add(self, seq)

    monkeypatch.setattr(MapStoreWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, out, batch_sequences=3)
    monkeypatch.setattr(MapStoreWriter, "add", orig_add)

    def no_second_pass(*a, **k):
        raise AssertionError("the final report re-read the stores")

    monkeypatch.setattr(B, "recount_diagnostics", no_second_pass)
    res = _build(tiny, out, batch_sequences=3)
    assert res.computed
    assert _without_wall(res.report) == _without_wall(clean_map[1].report)
    assert json.loads((out / "report.json").read_text()) == res.report


@pytest.mark.parametrize("theta", [5, 1.5, 0, -0.3, math.nan, "0.3"])
def test_theta_outside_0_1_is_refused_before_anything_is_written(tiny, tmp_path, theta):
    with pytest.raises(ValueError, match="--theta"):
        _build(tiny, tmp_path / "m", theta=theta)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("workers", [0, -2, 1.5])
def test_workers_below_one_are_refused(tiny, tmp_path, workers):
    with pytest.raises(ValueError, match="--workers"):
        _build(tiny, tmp_path / "m", workers=workers)
    assert not (tmp_path / "m").exists()


def test_theta_one_is_accepted(tiny, tmp_path):
    B.check_build_args("offsets", 1.0, None, 256)
    B.check_build_args("offsets", 1, 3, 1)


def test_out_holding_another_map_says_what_differs(tiny, clean_map, tmp_path):
    out = clean_map[0]
    before = _snapshot(out)
    with pytest.raises(StoreError) as e:
        _build({**tiny, "student": tiny["other"]}, out)
    msg = str(e.value)
    assert "student tokenizer" in msg and tiny["other"] in msg and "another teacher, data or settings" not in msg
    assert "teacher store" not in msg and "--theta" not in msg
    with pytest.raises(StoreError, match=r"--theta 0.3 \(this build: 0.5\)") as e:
        _build(tiny, out, theta=0.5)
    assert "student tokenizer" not in str(e.value)
    assert _snapshot(out) == before


def test_verify_and_info_accept_map_stores(tiny, clean_map, tmp_path):
    out = str(clean_map[0])
    report = verify_store(out)  # dispatches on the manifest's format
    assert report.ok, report.problems
    assert report.sequences_checked == tiny["n"] and report.shards_checked == 2 and not report.notes
    info = store_info(out)
    assert info["format"] == "cdm-map-store v1" and info["sequences"] == tiny["n"]
    assert info["teacher_store_key"] == TeacherStore(tiny["store"]).key and info["complete"]
    assert info["aligned_share"] == clean_map[1].report["aligned_share"]


def test_verify_map_store_finds_corruption_and_mismatches(tiny, clean_map, tmp_path, tiny_bytelevel):
    bad = tmp_path / "bad"
    shutil.copytree(clean_map[0], bad)
    chunk = next(p for p in sorted((bad / "shard-00001" / "tokens" / "teacher_row").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_store(str(bad))
    assert not report.ok and "shard-00001" in report.problems[0] and "digest" in report.problems[0]
    # vocab/ is not covered by the shard digests: its marker and arrays are checked
    novocab = tmp_path / "novocab"
    shutil.copytree(clean_map[0], novocab)
    (novocab / "vocab.done").unlink()
    assert any("vocab" in p for p in verify_map_store(str(novocab)).problems)
    # checked against another teacher store: refused by key; a missing one is a note, not a problem
    other = str(tmp_path / "other-teacher")
    t_tok = tiny_bytelevel.tok
    write_teacher_store(other, t_tok, [teacher_sequence(t_tok, "another text", 0, np.random.default_rng(5))], key="another")
    assert any("built from teacher store" in p for p in verify_map_store(str(clean_map[0]), teacher_store=other).problems)
    moved = verify_map_store(str(clean_map[0]), teacher_store=str(tmp_path / "nowhere"))
    assert moved.ok and moved.notes and moved.sequences_checked == tiny["n"]


def test_verify_map_store_names_a_sequence_whose_row_disagrees_with_its_arrays(tiny, clean_map, tmp_path):
    import pyarrow.parquet as pq

    from cdm.storage.ragged import shard_digest

    bad = tmp_path / "rows"
    shutil.copytree(clean_map[0], bad)
    path = bad / "shard-00000" / "sequences.parquet"
    table = pq.read_table(path)
    col = table.column("n_aligned").to_pylist()
    col[2] += 1
    table = table.set_column(table.column_names.index("n_aligned"), "n_aligned", __import__("pyarrow").array(col))
    pq.write_table(table, path, compression="zstd")
    # re-seal the shard so only the sequence check can tell
    from cdm.storage.fs import Location

    loc = Location(str(bad))
    digest, files = shard_digest(loc, "shard-00000")
    entry = json.loads((bad / "shards" / "shard-00000.json").read_text())
    entry.update(digest=digest, files=files)
    (bad / "shards" / "shard-00000.json").write_text(json.dumps(entry))
    m = json.loads((bad / "manifest.json").read_text())
    m["shards"][0]["digest"] = digest
    (bad / "manifest.json").write_text(json.dumps(m))
    report = verify_map_store(str(bad))
    seq_id = table.column("seq_id")[2].as_py()
    assert any("shard-00000 sequence 2" in p and seq_id in p and "n_aligned" in p for p in report.problems), report.problems
