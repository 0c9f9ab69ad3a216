"""Reading a shard's per-commit parts from object storage: sequential GETs (the baseline) vs `Location.read_many`.

    python benchmarks/store_parts.py [--parts 300] [--latency-ms 30]

A moto S3 server on loopback stands in for the object store; `--latency-ms` is added to every S3 request on the
client side (as between a compute node and a bucket), since loopback has none. Needs the test extras (moto, s3fs).
Prints seconds for each way and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--bytes", type=int, default=20_000, help="size of each part")
    ap.add_argument("--latency-ms", type=float, default=30.0)
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

    async def with_latency(self, method, *a, **k):
        await asyncio.sleep(args.latency_ms / 1e3)
        return await real_call(self, method, *a, **k)

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
    finally:
        s3fs.S3FileSystem._call_s3 = real_call
        server.stop()
    print(f"{args.parts} parts of {args.bytes} B, {args.latency_ms:g} ms per request: sequential {sequential:.2f} s, "
          f"read_many {batched:.2f} s ({sequential / batched:.1f}x)")


if __name__ == "__main__":
    main()
