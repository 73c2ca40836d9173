#!/usr/bin/env python3
"""Cold ``open_dataset`` and first batch of a remote dataset against its shard count and the
size of its metadata.

The dataset is served as in ``bench_remote.py`` (moto's S3 server behind the fault proxy of
the tests, ``--latency`` per request, a ``--cap-mbs`` bandwidth cap). For each shape (chunk
tokens x shard tokens) the same tokens are written, uploaded once, and opened cold
``--reps`` times in a warm process after one warm-up open; rows:

  index       our open: manifest.json, then one listing and index.lio together
  no index    the same dataset with the manifest's "index" removed: each shard's header and
              tables fetched from the shard (two requests per shard, 64 in flight): what every
              open did before index.lio
  limit       three round trips plus index.lio's bytes at the cap: no client does better with
              this protocol

with the requests each open made, ``index.lio``'s and ``manifest.json``'s sizes, and the first
batch (B=16, T=1024, the open included). torch is imported before any timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch  # noqa: F401 - loaded before any timing, as in a training process

import llmio_native as lio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from bench_remote import build  # noqa: E402
from common import machine  # noqa: E402


def cold_open(url: str, so: dict, cache: str, px, B: int, T: int) -> tuple[float, float, int]:
    """``(open s, first batch s from the open's start, requests of the open)`` with an empty
    cache (the first batch's own requests race the prefetcher's, so they are not counted)."""
    shutil.rmtree(cache, ignore_errors=True)
    r0 = px.requests
    t0 = time.perf_counter()
    ds = lio.open_dataset(url, cache_dir=cache, cache_bytes=1 << 40, storage_options=so)
    t_open = time.perf_counter() - t0
    n = px.requests - r0
    it = iter(lio.TokenLoader(ds, batch_size=B, seq_len=T, seed=1, prefetch=1))
    next(it)
    t_first = time.perf_counter() - t0
    del it
    ds.remote.close()
    return t_open, t_first, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64 << 20, help="tokens per dataset (default 64 Mi: 128 MiB)")
    ap.add_argument("--shapes", default="65536x2097152,65536x524288,8192x2097152,8192x524288",
                    help="comma list of CHUNK_TOKENSxSHARD_TOKENS")
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--cap-mbs", type=float, default=24.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    from remote_proxy import FaultProxy
    from remote_servers import S3_ENV, Missing, make_bucket, start_moto

    from llmio_native.remote import open_source

    os.environ.update(S3_ENV)
    try:
        srv = start_moto()
    except Missing as exc:
        print(f"bench_remote_open: {exc}")
        return 2
    tmp = tempfile.mkdtemp(prefix="llmio-bench-open-")
    rows = []
    try:
        make_bucket(srv.url, "bench")
        px = FaultProxy(srv.url, latency=a.latency, bandwidth=a.cap_mbs * 1e6)
        so = {"endpoint": px.url, "timeout": 60}
        print(f"machine: {machine()}")
        print(f"{a.tokens} tokens per dataset; proxy {a.latency * 1e3:.0f} ms/request, cap {a.cap_mbs:.0f} MB/s; "
              f"B=16 T=1024; best and worst of {a.reps} cold opens after a warm-up")
        print(f"{'chunk tok':>9}{'shards':>7}{'chunks':>8}{'index MB':>9}{'manif MB':>9} | {'row':<9}{'open s':>14}"
              f"{'1st batch s':>14}{'open req':>9}{'x limit':>8}")
        for k, shape in enumerate(a.shapes.split(",")):
            ct, st = (int(x) for x in shape.lower().split("x"))
            src_dir = os.path.join(tmp, f"src{k}")
            build(src_dir, a.tokens, ct, st, 0, None)
            man = json.load(open(os.path.join(src_dir, "manifest.json")))
            for prefix, drop in ((f"ds{k}", False), (f"ds{k}-noindex", True)):
                up = open_source(f"s3://bench/{prefix}", {"endpoint": srv.url})
                for name in sorted(os.listdir(src_dir)):
                    up.put(name, os.path.join(src_dir, name))
                if drop:
                    p = os.path.join(tmp, "noindex.json")
                    with open(p, "w") as fh:
                        json.dump(dict(man, index=None), fh)
                    up.put("manifest.json", p)
            shutil.rmtree(src_dir)
            idx_b, man_b = man["index"]["bytes"], os.path.getsize(os.path.join(tmp, "noindex.json"))
            limit = 3 * a.latency + idx_b / (a.cap_mbs * 1e6)
            nch = sum(s["num_chunks"] for s in man["shards"])
            for row, prefix in (("index", f"ds{k}"), ("no index", f"ds{k}-noindex")):
                url = f"s3://bench/{prefix}"
                cold_open(url, so, os.path.join(tmp, "c"), px, 16, 1024)  # warm-up
                res = [cold_open(url, so, os.path.join(tmp, "c"), px, 16, 1024) for _ in range(a.reps)]
                o = sorted(r[0] for r in res)
                f = sorted(r[1] for r in res)
                opens_req = res[-1][2]  # the same every time
                print(f"{ct:>9}{len(man['shards']):>7}{nch:>8}{idx_b / 1e6:>9.2f}{man_b / 1e6:>9.2f} | {row:<9}"
                      f"{o[0]:>7.3f}-{o[-1]:<6.3f}{f[0]:>7.3f}-{f[-1]:<6.3f}{opens_req:>9}{o[0] / limit:>8.1f}",
                      flush=True)
                rows.append({"chunk_tokens": ct, "shard_tokens": st, "shards": len(man["shards"]), "chunks": nch,
                             "index_bytes": idx_b, "manifest_bytes": man_b, "row": row, "open_s": o,
                             "first_batch_s": f, "open_requests": opens_req, "limit_s": limit})
            print(f"{'':>42} | {'limit':<9}{limit:>7.3f}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        px.stop()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"machine": machine(), "tokens": a.tokens, "latency_s": a.latency, "cap_mbs": a.cap_mbs,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
