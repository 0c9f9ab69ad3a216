"""The fsspec path of the teacher store against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from cdm.storage import TeacherStore
from tests.storage_helpers import assert_sequences_equal, random_sequence, write_store

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
