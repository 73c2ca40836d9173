#!/usr/bin/env python3
"""Remote-data benchmark: a TokenLoader over s3:// through the local cache tier.

One run, one dataset (random uint16 tokens, codec none), served by a local S3 endpoint (moto
in server mode) behind the fault proxy of tests/remote_proxy.py set to act like an object
store: ``--latency`` seconds per request (default 20 ms) and a bandwidth cap (``--cap-mbs``
MB/s for all responses together). B=16, T=1024, full global shuffle.

Rows:

  line rate         one whole-shard GET through the proxy: the physical limit of this setup
  ceiling           raw ranged GETs of the same shards through the same proxy, as many in flight
                    and as large as the cold run's (its mean GET size), in a shuffled order, no
                    cache, no verify, no decode: what the proxy and moto give on this machine to a
                    client that keeps that many requests in flight all the time; the cold run's
                    fetch rate over it is our pipeline's own efficiency
  clients           1 MiB range GETs straight from moto, 8 threads: obstore (ours) vs boto3
  cold, cache>=data first epoch with a cache larger than the dataset: time to first batch
                    (open + first batch), tokens/s, fetched bytes/s vs the cap, read
                    amplification (bytes fetched / bytes of the dataset the epoch consumed)
  half, future      cache = half the dataset, our eviction (farthest next use, prefetch along
                    the loader's order): epoch-2 hit rate, bytes fetched per byte consumed
  half, LRU         the same cache with eviction="lru" (no future, no prefetch): the baseline

  peers (--peers)   litdata and MosaicML Streaming on the same endpoint, proxy and tokens
                    (converted once to their formats, uploaded to the same bucket): each in a
                    child process of its own, a cold run with a cache >= the data and a run with
                    a cache of half the data; bytes counted at the proxy for every row (ours too)

Targets (issue 13): first batch < 1 s; steady state >= 0.9 x the cap; read amplification
<= 1.1; epoch-2 hit rate >= 1.5 x LRU's. The peers are optional (no dependency of ours): a
peer that does not import in ``--peer-python`` is skipped with the reason printed. Installed
into the shared environment they would change ~50 packages (numpy downgraded, transformers,
tokenizers...), so give them a venv of their own and run this script with its python (our
package on PYTHONPATH or installed there) or point ``--peer-python`` at it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch  # noqa: F401 - loaded before any timing, as in a training process (the loader needs it: ~1 s)

import llmio_native as lio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from common import machine  # noqa: E402


def build(directory: str, ntok: int, chunk_tokens: int, shard_tokens: int, seed: int,
          raw: str | None = None) -> None:
    """Our dataset of ``ntok`` random tokens; the same tokens as raw uint16 in ``raw`` (for the peers)."""
    rng = np.random.default_rng(seed)
    fh = open(raw, "wb") if raw else None
    with lio.DatasetWriter(directory, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens, overwrite=True) as w:
        doc = 1 << 16
        for i in range(0, ntok, doc):
            d = rng.integers(0, 50257, min(doc, ntok - i), dtype=np.uint16)
            w.add_document(d)
            if fh:
                fh.write(d.tobytes())
    if fh:
        fh.close()


def clients(endpoint: str, bucket: str, key: str, size: int, threads: int = 8) -> dict:
    """MB/s of 1 MiB range GETs of ``key`` (``size`` bytes) straight from moto, per client."""
    import obstore
    from obstore.store import S3Store

    R = 1 << 20
    ranges = [(i, min(i + R, size)) for i in range(0, size, R)]
    out = {}
    st = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id="testing",
                 secret_access_key="testing", client_options={"allow_http": True})

    def run(fn) -> float:
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as ex:
            n = sum(len(b) for b in ex.map(fn, ranges))
        return n / (time.perf_counter() - t) / 1e6

    out["obstore"] = run(lambda r: bytes(obstore.get_range(st, key, start=r[0], end=r[1])))
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        out["boto3"] = run(lambda r: s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={r[0]}-{r[1] - 1}")
                           ["Body"].read())
    except ImportError:
        out["boto3"] = None
    return out


def ceiling(endpoint: str, bucket: str, keys: list[str], sizes: list[int], get_bytes: int, threads: int,
            start: int = 4096, seed: int = 0) -> dict:
    """MB/s of raw ranged GETs of ``get_bytes`` covering ``[start, size)`` of every key, in a
    shuffled order, ``threads`` in flight at all times (no cache, no checksum, no decode)."""
    import obstore
    from obstore.store import S3Store

    st = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id="testing",
                 secret_access_key="testing", client_options={"allow_http": True, "timeout": "60s"})
    ranges = [(k, o, min(o + get_bytes, n)) for k, n in zip(keys, sizes) for o in range(start, n, get_bytes)]
    np.random.default_rng(seed).shuffle(ranges)  # type: ignore[arg-type]
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        n = sum(len(b) for b in ex.map(lambda r: bytes(obstore.get_range(st, r[0], start=r[1], end=r[2])), ranges))
    dt = time.perf_counter() - t
    return {"mbs": n / dt / 1e6, "bytes": n, "requests": len(ranges), "get_bytes": get_bytes, "threads": threads,
            "s": dt}


def stage(what: str) -> None:
    """A progress line on stderr (the runs take minutes at the sizes the issue asks for)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def epoch_run(url: str, so: dict, cache_dir: str, cache_bytes: int | None, B: int, T: int, epochs: int,
              eviction: str = "future", data_bytes: int | None = None, px=None, steps: int | None = None) -> dict:
    """Open the dataset cold, iterate ``epochs`` epochs; per-epoch stats of the cache (and the
    response bytes and requests the proxy ``px`` saw in each epoch). ``steps``: segments of
    that many batches instead of whole epochs (``frac`` in each row: the part of an epoch)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    pb = (px.body_bytes, px.requests) if px is not None else (0, 0)
    t0 = time.perf_counter()
    ds = lio.open_dataset(url, cache_dir=cache_dir, cache_bytes=cache_bytes or (1 << 40), storage_options=so)
    rc = ds.remote
    if data_bytes is not None:  # the bound as a fraction of the data (metadata on top)
        rc.cache_bytes = rc.base_bytes + data_bytes
        rc.prefetch_bytes = data_bytes // 4
    rc.eviction = eviction
    open_s = time.perf_counter() - t0
    ld = lio.TokenLoader(ds, batch_size=B, seq_len=T, seed=1, prefetch=1)  # the cache prefetches
    n_epoch = len(ld)
    n = steps or n_epoch
    it = iter(ld)
    next(it)
    first_s = time.perf_counter() - t0
    rows = []
    done = 1
    for e in range(epochs):
        if e:  # epoch 1 counts from the open (its prefetches included)
            rc.reset_stats()
        t = time.perf_counter() if e else t0
        while done < (e + 1) * n:
            next(it)
            done += 1
        dt = time.perf_counter() - t
        st = rc.stats()
        batches = n
        if px is not None:
            now = (px.body_bytes, px.requests)
            proxy = {"proxy_bytes": now[0] - pb[0], "proxy_requests": now[1] - pb[1]}
            pb = now
        else:
            proxy = {}
        rows.append({**proxy, "batches": batches, "epoch": e + 1, "frac": batches / n_epoch, "s": dt, "tokens_per_s": batches * B * T / dt,
                     "fetched_bytes": st["bytes_fetched"], "fetch_mbs": st["fetch_mbs_busy"],
                     "network_busy_s": st["network_busy_s"],
                     "hit_rate": st["hit_rate"], "stall_s": st["stall_s"], "requests": st["requests"],
                     "fetch_p50_ms": st["fetch_p50_ms"], "fetch_p99_ms": st["fetch_p99_ms"],
                     "evictions": st["evictions"], "peak_in_flight": st.get("peak_in_flight", rc.threads), "max_used": st["used_bytes"], "bound": rc.cache_bytes})
    del it
    data = int(rc.unit_size.sum())
    rc.close()
    return {"open_s": open_s, "first_batch_s": first_s, "data_bytes": data, "epochs": rows}


def peer_table(a: argparse.Namespace, data: int, B: int, T: int, cold: dict, fut: dict, lru: dict,
               peer_res: dict, peer_skip: dict, child: dict | None = None) -> None:
    """Ours and the peers side by side, every byte counted at the proxy."""
    print()
    print(f"ours vs peers, bytes counted at the proxy ({a.latency * 1e3:.0f} ms/request, cap {a.cap_mbs:.0f} MB/s); "
          f"amp = proxy bytes / token bytes the epoch's batches carried (B x T x 2 per batch);")
    print("cold: cache >= data, epoch 1 (1st batch from the open, empty cache); half: cache = half the data, "
          f"epoch {a.epochs}; ep{a.epochs} fetched = proxy bytes of epoch {a.epochs} / dataset bytes")
    print(f"{'run':<11}{'unit of fetch':<26}{'workers':>8}{'1st batch s':>12}{'tokens/s':>11}{'amp':>7}"
          f"{'half tok/s':>11}{'half amp':>9}{f'ep{a.epochs} fetched':>12}{'hit rate':>9}{'requests':>9}")

    def row(name: str, unit: str, workers: str, first: float, c1: dict, h: dict, nbytes: int, hit: str) -> None:
        amp1 = c1["proxy_bytes"] / (c1["batches"] * B * T * 2)
        amph = h["proxy_bytes"] / (h["batches"] * B * T * 2)
        tps1 = c1["batches"] * B * T / c1["s"]
        tpsh = h["batches"] * B * T / h["s"]
        req = h.get("requests", h.get("proxy_requests", 0))
        print(f"{name:<11}{unit:<26}{workers:>8}{first:>12.3f}{tps1:>11.0f}{amp1:>7.2f}{tpsh:>11.0f}{amph:>9.2f}"
              f"{h['proxy_bytes'] / nbytes:>12.2f}{hit:>9}{req:>9}")

    unit = f"chunk {a.chunk_tokens * 2 >> 10} KiB, <=8 MiB GETs"
    row("ours", unit, "1+16+16", cold["first_batch_s"], cold["epochs"][0], fut["epochs"][-1], data,
        f"{fut['epochs'][-1]['hit_rate']:.3f}")
    row("ours LRU", unit, "1+16+16", cold["first_batch_s"], cold["epochs"][0], lru["epochs"][-1], data,
        f"{lru['epochs'][-1]['hit_rate']:.3f}")
    if child and all("error" not in child.get(k, {"error": 1}) for k in ("cold", "half")):
        row("ours child", unit, "1+16+16", child["cold"]["first_batch_s"], child["cold"]["epochs"][0],
            child["half"]["epochs"][-1], data, "n/a")
    elif child:
        print(f"{'ours child':<11}{unit:<26}  failed: " + "; ".join(f"{k}: {v.get('error')}" for k, v in child.items()))
    for p, r in peer_res.items():
        u = f"{r['unit']} {r['shard_bytes'] >> 10} KiB"
        if "error" in r["cold"] or "error" in r["half"]:
            for kind in ("cold", "half"):
                if "error" in r[kind]:
                    print(f"{p:<11}{u:<26}{r[kind]['workers']:>8}  {kind} run failed: {r[kind]['error'][:120]}")
                if r[kind]["epochs"]:
                    e = r[kind]["epochs"][-1]
                    print(f"{p:<11}{u:<26}{r[kind]['workers']:>8}  {kind} run, epoch {e['epoch']}: "
                          f"{e['batches'] * B * T / e['s']:.0f} tokens/s, amp "
                          f"{e['proxy_bytes'] / (e['batches'] * B * T * 2):.2f}, 1st batch {r[kind].get('first_batch_s', float('nan')):.3f} s")
            continue
        row(f"{p}", u, str(r["cold"]["workers"]), r["cold"]["first_batch_s"], r["cold"]["epochs"][0],
            r["half"]["epochs"][-1], r["convert"]["bytes"], "n/a")
    for p, r in peer_res.items():
        c = r["convert"]
        print(f"  {p} {r['version']}: {c['files']} files, {c['bytes'] / 2**20:.1f} MiB in its format "
              f"(converted in {c['convert_s']:.1f} s); cache bounds {r['cold']['cache_bytes']} / "
              f"{r['half']['cache_bytes']} bytes")
    for p, why in peer_skip.items():
        print(f"  {p}: skipped ({why})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16 << 20, help="dataset size in tokens (default 16 Mi: 32 MiB)")
    ap.add_argument("--chunk-tokens", type=int, default=65536)
    ap.add_argument("--shard-tokens", type=int, default=2 << 20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every request (default 0.02)")
    ap.add_argument("--cap-mbs", type=float, default=24.0, help="bandwidth cap, MB/s (default 24)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the half-cache runs (the last is reported)")
    ap.add_argument("--half-batches", type=int, default=None,
                    help="half-cache runs: segments of this many batches instead of whole epochs (the last "
                         "segment is reported: the cache's steady state after the others warmed it). A "
                         "half-cache epoch refetches each chunk about (1 - hit rate) x chunk_tokens / seq_len "
                         "times (~13x the data for ours, ~32x for LRU), which at >= 1 GiB no proxy on a small "
                         "machine serves in minutes (default: whole epochs)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peers", default="", help="comma list of peers to run too: litdata,streaming (default none)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="python that has the peers installed (default: this one)")
    ap.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of each peer (default 2)")
    ap.add_argument("--peer-timeout", type=float, default=900.0,
                    help="seconds a peer's run may take before it is killed and reported failed (default 900)")
    ap.add_argument("--peer-shard-bytes", type=int, default=None,
                    help="peers' shard/chunk size in bytes (default: ours, shard_tokens x 2, at most 1/64 of "
                         "the data: Streaming refuses a cache under 4 shards, and with a half-data cache of "
                         "fewer shards than a shuffled batch touches it stops making progress)")
    a = ap.parse_args(argv)
    import remote_peers

    peers = [p for p in a.peers.split(",") if p]
    for p in peers:
        if p not in remote_peers.PEERS:
            ap.error(f"--peers: unknown peer {p!r}; one of {', '.join(remote_peers.PEERS)}")
    peer_skip: dict[str, str] = {}
    peer_ver: dict[str, str] = {}
    for p in peers:
        why = remote_peers.available(p, a.peer_python)
        if why:
            peer_skip[p] = f"not importable in {a.peer_python}: {why}"
            print(f"bench_remote: skipping {p}: {peer_skip[p]}")
        else:
            peer_ver[p] = subprocess.run([a.peer_python, remote_peers.__file__, "probe", "--peer", p],
                                         capture_output=True, text=True).stdout.strip()
    peers = [p for p in peers if p not in peer_skip]
    shard_bytes = a.peer_shard_bytes or min(2 * a.shard_tokens, max(1 << 16, 2 * a.tokens // 64))
    try:
        from remote_proxy import FaultProxy
        from remote_servers import S3_ENV, Missing, make_bucket, start_moto
        import obstore  # noqa: F401
    except ImportError as exc:
        print(f"bench_remote: needs obstore, moto[server] and boto3 ({exc})")
        return 2
    os.environ.update(S3_ENV)
    tmp = tempfile.mkdtemp(prefix="llmio-bench-remote-")
    try:
        srv = start_moto()
    except Missing as exc:
        print(f"bench_remote: {exc}")
        return 2
    px = None
    try:
        B, T = a.batch_size, a.seq_len
        src_dir = os.path.join(tmp, "src")
        raw = os.path.join(tmp, "tokens.u16") if peers else None
        stage("build the dataset")
        build(src_dir, a.tokens, a.chunk_tokens, a.shard_tokens, 0, raw)
        make_bucket(srv.url, "bench")
        from llmio_native.remote import open_source

        up = open_source("s3://bench/ds", {"endpoint": srv.url})
        for name in sorted(os.listdir(src_dir)):
            up.put(name, os.path.join(src_dir, name))
        shard0 = os.path.join(src_dir, "shard-00000.lio")
        cl = clients(srv.url, "bench", "ds/shard-00000.lio", os.path.getsize(shard0))
        cap = a.cap_mbs * 1e6
        px = FaultProxy(srv.url, latency=a.latency, bandwidth=cap)
        so = {"endpoint": px.url, "timeout": 30}
        src = open_source("s3://bench/ds", so)
        t = time.perf_counter()
        n = len(src.read("shard-00000.lio"))
        line = n / (time.perf_counter() - t) / 1e6
        url = "s3://bench/ds"
        # the first loader of a process pays one-time costs (imports, engine and server
        # warm-up): reported apart, the measured runs start from an empty cache in a warm process
        stage("first loader (warm-up)")
        first_ever = epoch_run(url, so, os.path.join(tmp, "c0"), None, B, T, 0)["first_batch_s"]
        stage("ours: cold")
        cold = epoch_run(url, so, os.path.join(tmp, "c1"), None, B, T, 1, px=px)
        data = cold["data_bytes"]
        stage("ceiling: raw ranged GETs through the proxy")
        shards = sorted(f for f in os.listdir(src_dir) if f.startswith("shard-"))
        c1e = cold["epochs"][0]
        get_bytes = max(4096, int(round(c1e["fetched_bytes"] / max(1, c1e["requests"]) / 4096)) * 4096)
        ceil = ceiling(px.url, "bench", [f"ds/{f}" for f in shards],
                       [os.path.getsize(os.path.join(src_dir, f)) for f in shards], get_bytes, max(1, c1e["peak_in_flight"]))
        stage("ours: half cache, future")
        fut = epoch_run(url, so, os.path.join(tmp, "c2"), None, B, T, a.epochs, "future", data // 2, px=px,
                        steps=a.half_batches)
        stage("ours: half cache, LRU")
        lru = epoch_run(url, so, os.path.join(tmp, "c3"), None, B, T, a.epochs, "lru", data // 2, px=px,
                        steps=a.half_batches)
        peer_res: dict[str, dict] = {}

        def child_runs(name: str, python: str, purl: str, data_bytes: int, half_bytes: int, workers: int) -> dict:
            """A cold run (cache 4 x the data) and a half-cache run of ``name`` in a child process;
            a run that fails is a result too (its row says so)."""
            runs: dict = {}
            for kind, cb, ne in (("cold", 4 * data_bytes, 1), ("half", half_bytes, a.epochs)):
                stage(f"{name}: {kind}")
                try:
                    runs[kind] = remote_peers.run_peer(name, python, px, purl, os.path.join(tmp, f"{name}-{kind}"),
                                                       cb, B, T, workers, ne, a.peer_timeout,
                                                       a.half_batches if kind == "half" else None)
                except remote_peers.PeerError as exc:
                    runs[kind] = {**exc.partial, "error": exc.summary, "detail": str(exc)[-3000:]}
                    print(f"bench_remote: {name} {kind} run failed: {runs[kind]['error']}", file=sys.stderr)
            return runs

        # ours in the peers' harness too: a child process of its own, the proxy alone in this one
        # (its bound covers the metadata as well: 4 MiB over half the data)
        child = child_runs("ours", sys.executable, url, data, data // 2 + (4 << 20), 0) if peers else {}
        for p in peers:
            stage(f"{p}: convert and upload")
            conv = remote_peers.convert_upload(p, a.peer_python, raw, os.path.join(tmp, f"{p}-src"), T, shard_bytes,
                                               srv.url, "bench", p)  # straight to moto: not counted
            runs = child_runs(p, a.peer_python, f"s3://bench/{p}", conv["bytes"], conv["bytes"] // 2, a.peer_workers)
            peer_res[p] = {"version": peer_ver[p], "unit": remote_peers.UNIT[p], "shard_bytes": shard_bytes,
                           "convert": conv, **runs}
    finally:
        if px is not None:
            px.stop()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    c1 = cold["epochs"][0]
    f2, l2 = fut["epochs"][-1], lru["epochs"][-1]
    seg = (f"b{(a.epochs - 1) * a.half_batches + 1}-{a.epochs * a.half_batches}" if a.half_batches
           else f"ep{a.epochs}")

    amp = c1["fetched_bytes"] / data
    print(f"machine: {machine()}")
    print(f"dataset: {a.tokens} tokens ({data / 2**20:.1f} MiB of chunks), chunk_tokens={a.chunk_tokens}, "
          f"B={B} T={T}, global shuffle; proxy: {a.latency * 1e3:.0f} ms/request, cap {a.cap_mbs:.0f} MB/s")
    print(f"clients (1 MiB range GETs from moto, 8 threads): obstore {cl['obstore']:.1f} MB/s, "
          f"boto3 {cl['boto3'] or float('nan'):.1f} MB/s")
    print(f"line rate through the proxy (one whole-shard GET): {line:.1f} MB/s")
    print(f"ceiling through the proxy ({ceil['threads']} ranged GETs of {ceil['get_bytes'] >> 10} KiB in flight, "
          f"shuffled, no cache): {ceil['mbs']:.1f} MB/s = {ceil['mbs'] / a.cap_mbs:.2f} x cap")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"first batch of the process's first loader (cold process, empty cache): {first_ever:.3f} s")
    print()
    print("fetch MB/s: bytes fetched per second with a request in flight (the rate the link gave); read amp: "
          "bytes fetched / bytes of the dataset the rows' batches span (an epoch's worth per epoch)")
    if a.half_batches:
        print(f"half rows: batches {seg} from the open (the cache warmed by the {(a.epochs - 1) * a.half_batches} "
              "before), not a whole epoch 2 (--half-batches)")
    print(f"{'run':<22}{'1st batch s':>12}{'tokens/s':>12}{'fetch MB/s':>11}{'vs cap':>8}{'vs ceil':>8}"
          f"{'read amp':>9}{'hit rate':>9}{'stall s':>8}{'p50 ms':>8}{'p99 ms':>8}")
    rows = [("cold, cache>=data, ep1", cold, c1), (f"half, future, {seg}", fut, f2),
            (f"half, LRU, {seg}", lru, l2)]
    for name, run, r in rows:
        print(f"{name:<22}{run['first_batch_s']:>12.3f}{r['tokens_per_s']:>12.0f}{r['fetch_mbs']:>11.1f}"
              f"{r['fetch_mbs'] / a.cap_mbs:>8.2f}{r['fetch_mbs'] / ceil['mbs']:>8.2f}{r['fetched_bytes'] / (data * r['frac']):>9.2f}"
              f"{r['hit_rate']:>9.3f}{r['stall_s']:>8.2f}{r['fetch_p50_ms']:>8.1f}{r['fetch_p99_ms']:>8.1f}")
    ratio = f2["hit_rate"] / l2["hit_rate"] if l2["hit_rate"] else float("inf")
    if peers or peer_skip:
        peer_table(a, data, B, T, cold, fut, lru, peer_res, peer_skip, child)
    print()
    print(f"targets: first batch {cold['first_batch_s']:.3f} s (< 1 s); read amplification {amp:.3f} (<= 1.1); "
          f"{seg} hit rate future/LRU {ratio:.2f} (>= 1.5); cold fetch rate (busy) {c1['fetch_mbs']:.1f} MB/s "
          f"= {c1['fetch_mbs'] / a.cap_mbs:.2f} x cap, {c1['fetch_mbs'] / ceil['mbs']:.2f} x ceiling")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"machine": machine(), "tokens": a.tokens, "chunk_tokens": a.chunk_tokens, "batch_size": B,
                       "seq_len": T, "latency_s": a.latency, "cap_mbs": a.cap_mbs, "line_mbs": line,
                       "clients_mbs": cl, "ceiling": ceil, "loadavg": os.getloadavg(), "data_bytes": data, "first_batch_cold_process_s": first_ever, "cold": cold, "half_future": fut, "half_lru": lru,
                       "read_amplification": amp, "hit_rate_ratio": ratio, "peers": peer_res, "ours_child": child,
                       "peers_skipped": peer_skip}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
