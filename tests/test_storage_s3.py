"""The fsspec path of the teacher store against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from cdm.storage import TeacherStore
from tests.storage_helpers import assert_sequences_equal, random_sequence, write_store
from tests.test_precompute_support import _offline, text_records, tiny_teacher, tokenizer, write_jsonl  # noqa: F401
from tests.tokenizer_fixtures import tiny_sentencepiece  # noqa: F401 (fixture)
from tests.test_storage import _TorchView  # a map-style dataset over a store, as the training loader reads it

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.client(
        "s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="cdm-bucket")
    yield opts
    server.stop()


def test_store_on_s3_round_trip_and_verify(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = "s3://cdm-bucket/teacher"
    seqs = [random_sequence(np.random.default_rng(11), i) for i in range(8)]
    write_store(url, seqs, num_shards=2, chunk_rows=16, storage_options=s3)
    store = TeacherStore(url, check="digest", storage_options=s3)
    assert len(store) == 8
    by_src = {s.source_index: s for s in store}
    for s in seqs:
        assert_sequences_equal(s, by_src[s.source_index])


def test_resume_and_close_on_s3_read_every_commit_part(s3, monkeypatch):
    """A shard of many commits abandoned mid-way on S3, resumed and closed: the row and hash parts of all commits
    are fetched in concurrent batches (`Location.read_many`), none is lost, and the digest holds."""
    from cdm.storage import TeacherStoreWriter
    from cdm.storage.fs import Location
    from tests.storage_helpers import manifest_sections

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    batches: list[int] = []
    real = Location.read_many

    def spy(self, paths, missing_ok=False, batch=64):
        batches.append(len(paths))
        return real(self, paths, missing_ok=missing_ok, batch=5)  # several batches of this shard's parts

    monkeypatch.setattr(Location, "read_many", spy)
    url = "s3://cdm-bucket/resumed"
    rng = np.random.default_rng(12)
    seqs = [random_sequence(rng, i, n=int(rng.integers(5, 30))) for i in range(30)]
    kw = dict(key="test-key", manifest=manifest_sections(), k=8, vocab_size=1000, chunk_rows=16, commit_tokens=30,
              storage_options=s3)
    w = TeacherStoreWriter(url, **kw)
    for s in seqs[:20]:
        w.add(s)
    w.commit()
    del w  # abandoned without close
    w = TeacherStoreWriter(url, **kw)
    assert w.done_source_indices == set(range(20))
    for s in seqs[20:]:
        w.add(s)
    w.close()
    assert max(batches) > 5  # more parts than one batch
    store = TeacherStore(url, check="digest", storage_options=s3)
    by_src = {s.source_index: s for s in store}
    assert sorted(by_src) == list(range(30))
    for s in seqs:
        assert_sequences_equal(s, by_src[s.source_index])


def test_s3_store_reads_in_forked_dataloader_workers(s3, monkeypatch):
    """s3fs is not fork-safe: the reader's filesystem is re-created in each forked worker (the parent's event loop
    and connections would raise 'This class is not fork-safe')."""
    import torch

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = "s3://cdm-bucket/forked"
    seqs = [random_sequence(np.random.default_rng(13), i) for i in range(6)]
    write_store(url, seqs, num_shards=2, chunk_rows=16, storage_options=s3)
    store = TeacherStore(url, storage_options=s3)
    _ = store[0]  # the parent has used its filesystem (and a shard's table) before the fork
    dl = torch.utils.data.DataLoader(_TorchView(store), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = sorted((int(row[0]), int(row[1])) for row in dl)
    assert got == sorted((s.source_index, int(s.token_ids.sum())) for s in seqs)


def test_s3_listing_sees_files_another_process_wrote(s3, monkeypatch):
    """The manifest reconciliation lists shards/ again after its own write: a file another worker added in between
    (written here with boto3, bypassing this process's s3fs directory cache) must be in the second listing."""
    import boto3

    from cdm.storage.fs import Location

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    loc = Location("s3://cdm-bucket/listing", s3)
    loc.write_bytes(b"{}", "shards", "shard-00000.json")
    assert loc.listdir("shards") == ["shard-00000.json"]
    assert set(loc.files("shards")) == {"shard-00000.json"}
    boto3.client("s3", endpoint_url=s3["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").put_object(
        Bucket="cdm-bucket", Key="listing/shards/shard-00001.json", Body=b"{}")
    assert loc.listdir("shards") == ["shard-00000.json", "shard-00001.json"]
    assert set(loc.files("shards")) == {"shard-00000.json", "shard-00001.json"}


def test_precompute_and_build_map_on_s3_with_explicit_storage_options(s3, monkeypatch, tmp_path, tiny_teacher,
                                                                      tiny_sentencepiece):
    """The stage APIs take `storage_options` like the readers: no AWS variables in the environment, the endpoint
    and credentials only in the options (build-map's worker processes included)."""
    from cdm.mapping import MapStore, build_map
    from cdm.precompute import run

    for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(v, raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", text_records(6, seed=21, max_chars=120))
    url, map_url = "s3://cdm-bucket/api-teacher", "s3://cdm-bucket/api-map"
    quiet = {"progress": False}
    res = run(str(tiny_teacher), str(data), url, top_k=4, text_field="text", storage_options=s3, echo=lambda m: None,
              **quiet)
    assert res.store_complete and res.stats["sequences"] == 6
    again = run(str(tiny_teacher), str(data), url, top_k=4, text_field="text", storage_options=s3,
                echo=lambda m: None, **quiet)
    assert not again.computed and again.stats["sequences"] == 6
    built = build_map(url, tiny_sentencepiece.path, map_url, workers=2, batch_sequences=2, log=lambda m: None,
                      cache_dir=str(tmp_path / "cache"), storage_options=s3, **quiet)
    m = MapStore(map_url, storage_options=s3)
    assert built.computed and len(m) == 6 and m.report == built.report
    assert sorted(m.teacher_indices.tolist()) == list(range(6))
    assert len(TeacherStore(url, storage_options=s3)) == 6
