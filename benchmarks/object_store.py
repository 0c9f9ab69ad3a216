"""The teacher store on object storage: round trips, not bandwidth, are what cost there.

    python benchmarks/object_store.py [--parts 300] [--latency-ms 30] [--writer-tokens 300000]

A moto S3 server on loopback stands in for the object store; `--latency-ms` is added to every S3 request on the
client side (as between a compute node and a bucket), since loopback has none. Needs the test extras (moto, s3fs).
1. Reading a shard's per-commit parts (what resuming and closing a shard do): one GET after another (the baseline)
   vs `Location.read_many`; seconds each and the ratio.
2. The store writer (thread sink, synthetic K=128 top-k, 65,536-token commits) on the bucket with no added latency
   (the baseline: moto's own speed) and with it; tokens/s each and the ratio.
3. Reading that store back in ranges of `--read-rows` rows, the training loader's access pattern: the fields one
   after another (the baseline) vs `RaggedStoreReader.fields_rows` (all fields in one gather); seconds each.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--bytes", type=int, default=20_000, help="size of each part")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--writer-tokens", type=int, default=300_000)
    ap.add_argument("--read-rows", type=int, default=8192)
    args = ap.parse_args()

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from cdm.storage.fs import Location

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="cdm-bench")
    loc = Location("s3://cdm-bench/shard", {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
    names = [("_writing", f"rows-{i:06d}.parquet") for i in range(args.parts)]
    for n in names:
        loc.write_bytes(os.urandom(args.bytes), *n)

    real_call = s3fs.S3FileSystem._call_s3

    latency = [args.latency_ms / 1e3]

    async def with_latency(self, method, *a, **k):
        await asyncio.sleep(latency[0])
        return await real_call(self, method, *a, **k)

    def write_store(name: str) -> float:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from precompute import synthetic_results

        from cdm.precompute.sink import ThreadSink
        from cdm.storage import TeacherStoreWriter

        seqs, items, results, tokens = synthetic_results(args.writer_tokens, k=128)
        sink = ThreadSink(TeacherStoreWriter(url=f"s3://cdm-bench/{name}", key="bench", manifest={}, k=128,
                                             vocab_size=49152, storage_options=loc.storage_options), "bench")
        t = time.perf_counter()
        for i in range(0, len(seqs), 8):
            sink.put(("add", [(j, items[j]) for j in range(i, min(i + 8, len(seqs)))], results[i : i + 8]))
        sink.close()
        return tokens / (time.perf_counter() - t)

    s3fs.S3FileSystem._call_s3 = with_latency
    try:
        t = time.perf_counter()
        for n in names:
            loc.read_bytes(*n)
        sequential = time.perf_counter() - t
        t = time.perf_counter()
        got = list(loc.read_many(names))
        batched = time.perf_counter() - t
        assert len(got) == args.parts
        latency[0] = 0.0
        writer_fast = write_store("no-latency")
        latency[0] = args.latency_ms / 1e3
        writer_slow = write_store("latency")
        from cdm.storage import TeacherStore

        reader = TeacherStore("s3://cdm-bench/latency", storage_options=loc.storage_options).reader
        names, n = reader.field_names, int(reader.offsets(0)[-1])
        ranges = [(a, min(a + args.read_rows, n)) for a in range(0, n, args.read_rows)]
        reader.fields_rows(0, names, 0, 1)  # open the handles before the clock
        t = time.perf_counter()
        one_by_one = [{f: reader._arrays(0)[f][a:b] for f in names} for a, b in ranges]
        fields_sequential = time.perf_counter() - t
        t = time.perf_counter()
        together = [reader.fields_rows(0, names, a, b) for a, b in ranges]
        fields_gathered = time.perf_counter() - t
        assert all((x[f] == y[f]).all() for x, y in zip(one_by_one, together) for f in names)
    finally:
        s3fs.S3FileSystem._call_s3 = real_call
        server.stop()
    print(f"{args.parts} parts of {args.bytes} B, {args.latency_ms:g} ms per request: sequential {sequential:.2f} s, "
          f"read_many {batched:.2f} s ({sequential / batched:.1f}x)")
    print(f"store writer, {args.writer_tokens} tokens: no added latency {writer_fast:,.0f} tok/s, "
          f"{args.latency_ms:g} ms per request {writer_slow:,.0f} tok/s ({writer_slow / writer_fast:.2f} of it)")
    print(f"reading it back, {len(ranges)} ranges of {args.read_rows} rows x {len(names)} fields: one field after another "
          f"{fields_sequential:.2f} s, fields_rows {fields_gathered:.2f} s ({fields_sequential / fields_gathered:.1f}x)")


if __name__ == "__main__":
    main()
