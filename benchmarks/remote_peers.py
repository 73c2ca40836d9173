#!/usr/bin/env python3
"""The peer rows of ``bench_remote.py``: litdata and MosaicML Streaming on the same S3 endpoint.

Each peer runs in a child process of its own (``python remote_peers.py convert|stream ...``), so
that its imports, DataLoader workers, shared memory (Streaming) and obstore runtime (litdata
fetches chunks with obstore, which must not be started before a fork) never meet ours. The parent
(:func:`run_peer`) owns the proxy and counts the bytes that go through it; the child reports
``first_batch`` and ``epoch_end`` events on stdout and, after each ``epoch_end``, waits for the
parent's acknowledgement on stdin before starting the next epoch, so each epoch's proxy bytes are
read at its boundary (background prefetches of the next epoch may still land in the one before, as
for ours).

Formats (converted once from the same token stream as our dataset):

* litdata: ``litdata.optimize`` with ``TokensLoader`` (uint16 tokens in chunks of
  ``shard_bytes``); read with ``TokensLoader(block_size=T + 1)``: non-overlapping blocks of
  ``T + 1`` tokens (ours are windows ``[i*T, i*T + T + 1)``, overlapping by one token).
* streaming: ``MDSWriter`` with one column ``tokens: ndarray:uint16:T+1``, one sample per window of
  ours (so its shards hold each boundary token twice: 1/T more bytes), shards of ``shard_bytes``.

Both fetch whole shards/chunks (their unit of fetch) into a local cache bounded by ``cache_bytes``;
neither exposes a hit rate, so epoch 2 is judged by the bytes it fetched.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Any, Callable

import numpy as np

PEERS = ("litdata", "streaming")
#: What a child can run: the peers, and ours (the same harness: its own process, beside the proxy's)
KINDS = PEERS + ("ours",)
#: How each peer fetches (printed beside its rows).
UNIT = {"litdata": "whole chunk", "streaming": "whole shard", "ours": "chunk"}
HERE = os.path.dirname(os.path.abspath(__file__))


def _import_streaming() -> Any:
    """Import MosaicML Streaming; without a working torchvision, skip its vision subpackage.

    ``streaming/__init__.py`` imports ``streaming.vision``, which imports torchvision. A
    torchvision built for another torch (PyPI's CUDA wheel beside a CPU torch) fails with
    ``RuntimeError: operator torchvision::nms does not exist``; the text datasets need none of it.

    Raises:
        ImportError: streaming itself is not installed.
    """
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def available(peer: str, python: str = sys.executable) -> str | None:
    """None when ``peer`` imports in ``python``, else the reason it does not.

    Raises:
        ValueError: ``peer`` is not one of :data:`PEERS`.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; one of {', '.join(PEERS)}")
    try:
        r = subprocess.run([python, os.path.abspath(__file__), "probe", "--peer", peer], capture_output=True,
                           text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"importing {peer} in {python} took over 300 s"
    except OSError as exc:
        return f"cannot run {python}: {exc}"
    if r.returncode == 0:
        return None
    lines = (r.stdout + r.stderr).strip().splitlines()
    return lines[-1] if lines else f"probe exited with status {r.returncode}"


def version(peer: str) -> str:
    """The installed version of ``peer`` (imported here)."""
    mod = _import_streaming() if peer == "streaming" else __import__("llmio_native" if peer == "ours" else peer)
    return str(mod.__version__)


# -- child side -------------------------------------------------------------------------------------
def _s3_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": endpoint}


def _upload(local: str, endpoint: str, bucket: str, prefix: str) -> int:
    """Put every file under ``local`` to ``s3://bucket/prefix/`` (straight to the server); total bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    total = 0
    for d, _, files in os.walk(local):
        for f in sorted(files):
            p = os.path.join(d, f)
            s3.upload_file(p, bucket, f"{prefix}/{os.path.relpath(p, local)}")
            total += os.path.getsize(p)
    return total


def _lit_fn(arg: tuple) -> Any:
    """litdata's optimize callback: one span ``(path, start, count)`` of the token file as a tensor."""
    import torch

    path, start, count = arg
    tok = np.fromfile(path, dtype=np.uint16, count=count, offset=2 * start)
    yield torch.from_numpy(tok)


def convert(peer: str, tokens_file: str, out: str, T: int, shard_bytes: int, endpoint: str, bucket: str,
            prefix: str) -> dict:
    """Write the tokens of ``tokens_file`` (raw uint16) in ``peer``'s format and upload them."""
    n = os.path.getsize(tokens_file) // 2
    t = time.perf_counter()
    if peer == "litdata":
        from litdata import TokensLoader, optimize

        span = 1 << 20
        inputs = [(tokens_file, s, min(span, n - s)) for s in range(0, n, span)]
        optimize(fn=_lit_fn, inputs=inputs, output_dir=out, chunk_size=shard_bytes // 2, item_loader=TokensLoader(),
                 num_workers=1, verbose=False, mode="overwrite")
    else:
        MDSWriter = _import_streaming().MDSWriter
        tok = np.memmap(tokens_file, dtype=np.uint16, mode="r")
        with MDSWriter(out=out, columns={"tokens": f"ndarray:uint16:{T + 1}"}, compression=None,
                       size_limit=shard_bytes, progress_bar=False) as w:
            for i in range((n - 1) // T):
                w.write({"tokens": np.asarray(tok[i * T:i * T + T + 1])})
    convert_s = time.perf_counter() - t
    files = sum(len(f) for _, _, f in os.walk(out))
    nbytes = _upload(out, endpoint, bucket, prefix)
    return {"convert_s": convert_s, "bytes": nbytes, "files": files}


def _collate(samples: list) -> tuple:
    """A batch of ``T + 1``-token windows as ours: int64 ``x`` and ``y = x`` shifted by one."""
    import torch

    a = np.stack([np.asarray(s["tokens"] if isinstance(s, dict) else s) for s in samples]).astype(np.int64)
    t = torch.from_numpy(a)
    return t[:, :-1], t[:, 1:]


def _make_loader(peer: str, url: str, endpoint: str, cache: str, cache_bytes: int, B: int, T: int,
                 workers: int) -> tuple[Any, Callable[[], dict]]:
    """The peer's dataset and DataLoader over ``url`` through ``endpoint``, global shuffle
    (``ours``: open_dataset and a TokenLoader, the cache bounded by ``cache_bytes``)."""
    if peer == "ours":
        import llmio_native as lio

        ds = lio.open_dataset(url, cache_dir=cache, cache_bytes=cache_bytes,
                              storage_options={"endpoint": endpoint, "timeout": 30})
        epoch = len(lio.TokenLoader(ds, batch_size=B, seq_len=T, seed=1))
        # a TokenLoader's stream is endless; steps=one epoch ends each iter() there, as a DataLoader does
        return lio.TokenLoader(ds, batch_size=B, seq_len=T, seed=1, prefetch=1, steps=epoch), lambda: {}
    if peer == "litdata":
        import litdata.streaming.downloader as dl
        from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

        # litdata fetches chunks with an obstore S3Store built from its boto3 client's endpoint, with
        # client options that lack allow_http: an http:// endpoint fails ("builder error: BadScheme").
        # Allowing plain HTTP changes nothing else (the workers fork after this and inherit it).
        opts = getattr(dl, "_OBSTORE_CLIENT_OPTIONS", None)
        if isinstance(opts, dict):
            dl._OBSTORE_CLIENT_OPTIONS = {**opts, "allow_http": True}

        so = {"endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
              "region_name": "us-east-1"}
        ds = StreamingDataset(url, cache_dir=cache, item_loader=TokensLoader(block_size=T + 1), shuffle=True,
                              seed=1, drop_last=True, max_cache_size=cache_bytes, storage_options=so)
        ld = StreamingDataLoader(ds, batch_size=B, num_workers=workers, collate_fn=_collate, drop_last=True)
        return ld, lambda: {}
    streaming = _import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = streaming.StreamingDataset(remote=url, local=cache, shuffle=True, shuffle_seed=1, batch_size=B,
                                    cache_limit=cache_bytes, num_canonical_nodes=1)
    ld = streaming.StreamingDataLoader(ds, batch_size=B, num_workers=workers, collate_fn=_collate, drop_last=True)
    return ld, lambda: {}


def _die_with_parent() -> None:
    """SIGKILL this process when its parent (the benchmark) dies: a killed benchmark leaves no child."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stream(peer: str, url: str, endpoint: str, cache: str, cache_bytes: int, B: int, T: int, workers: int,
           epochs: int, emit: Callable[[dict], None], wait: Callable[[], None], steps: int | None = None) -> None:
    """Iterate ``epochs`` epochs cold (``steps``: segments of that many batches instead, the
    loader's epochs run back to back); report ``first_batch`` and ``epoch_end`` through ``emit``."""
    os.environ.update(_s3_env(endpoint))
    _die_with_parent()
    t0 = time.perf_counter()
    ld, _ = _make_loader(peer, url, endpoint, cache, cache_bytes, B, T, workers)

    def endless() -> Any:
        while True:
            yield from ld

    it = endless() if steps else None
    for e in range(epochs):
        t = time.perf_counter() if e else t0
        n = 0
        for x, y in (ld if it is None else it):
            if n == 0 and e == 0:
                emit({"event": "first_batch", "s": time.perf_counter() - t0})
            if tuple(x.shape) != (B, T) or tuple(y.shape) != (B, T):
                raise RuntimeError(f"{peer}: batch {n} of epoch {e + 1} has shape {tuple(x.shape)}, not {(B, T)}")
            n += 1
            if steps and n == steps:
                break
        emit({"event": "epoch_end", "epoch": e + 1, "s": time.perf_counter() - t, "batches": n})
        wait()
    emit({"event": "done"})


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("probe", "convert", "stream"))
    ap.add_argument("--peer", choices=KINDS, required=True)
    ap.add_argument("--tokens-file")
    ap.add_argument("--out")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-bytes", type=int, default=4 << 20)
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket", default="bench")
    ap.add_argument("--prefix")
    ap.add_argument("--url")
    ap.add_argument("--cache")
    ap.add_argument("--cache-bytes", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="segments of this many batches instead of epochs")
    a = ap.parse_args(argv)
    if a.cmd == "probe":
        import torch  # noqa: F401

        print(version(a.peer))
        return 0
    if a.cmd == "convert":
        print(json.dumps(convert(a.peer, a.tokens_file, a.out, a.seq_len, a.shard_bytes, a.endpoint, a.bucket,
                                 a.prefix)))
        return 0

    def emit(ev: dict) -> None:
        print("PEER " + json.dumps(ev), flush=True)

    stream(a.peer, a.url, a.endpoint, a.cache, a.cache_bytes, a.batch_size, a.seq_len, a.workers, a.epochs, emit,
           lambda: sys.stdin.readline(), a.steps)
    return 0


# -- parent side ------------------------------------------------------------------------------------
class PeerError(RuntimeError):
    """A peer's run failed or was killed; ``partial`` holds what it reported before (epochs done)."""

    def __init__(self, msg: str, partial: dict, summary: str) -> None:
        super().__init__(msg)
        self.partial = partial
        self.summary = summary


def _killpg(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_peer(peer: str, python: str, proxy: Any, url: str, cache: str, cache_bytes: int, B: int, T: int,
             workers: int, epochs: int, timeout: float = 1800.0, steps: int | None = None) -> dict:
    """Run one cold streaming run of ``peer`` in a child; per-epoch proxy bytes and requests
    (``steps``: per segment of that many batches, as ``bench_remote --half-batches``).

    Args:
        proxy: the ``remote_proxy.FaultProxy`` the child reads through (its counters are read at
            each event).

    Raises:
        PeerError: the child failed (its output ends the message) or ran past ``timeout``.
    """
    cmd = [python, os.path.abspath(__file__), "stream", "--peer", peer, "--url", url, "--endpoint", proxy.url,
           "--cache", cache, "--cache-bytes", str(cache_bytes), "--batch-size", str(B), "--seq-len", str(T),
           "--workers", str(workers), "--epochs", str(epochs)] + (["--steps", str(steps)] if steps else [])
    log = open(cache.rstrip("/") + ".log", "w+")
    # its own process group: its DataLoader workers hold the pipe too and go with it
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                         start_new_session=True)
    b0, r0 = proxy.body_bytes, proxy.requests
    out: dict = {"peer": peer, "workers": workers, "cache_bytes": cache_bytes, "epochs": []}
    tail: list[str] = []
    killed: list[bool] = []

    def kill() -> None:  # a hung child: killing it ends its stdout, and so the loop below
        killed.append(True)
        _killpg(p)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            if not line.startswith("PEER "):
                tail = (tail + [line.rstrip()])[-20:]
                continue
            ev = json.loads(line[5:])
            b, r = proxy.body_bytes, proxy.requests
            if ev["event"] == "first_batch":
                out["first_batch_s"] = ev["s"]
                out["first_batch_bytes"] = b - b0
            elif ev["event"] == "epoch_end":
                ev.update(proxy_bytes=b - b0, requests=r - r0)
                out["epochs"].append(ev)
                b0, r0 = b, r
                p.stdin.write("\n")
                p.stdin.flush()
        rc = p.wait()
    except BaseException:
        _killpg(p)
        p.wait()
        raise
    finally:
        watchdog.cancel()
    if killed:
        tail.append(f"killed: ran past {timeout:.0f} s")
    if rc != 0 or len(out["epochs"]) != epochs:
        log.seek(0)
        err = log.read()[-3000:]
        errs = [ln for ln in (tail + err.splitlines()) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
        summary = tail[-1] if killed else errs[-1] if errs else f"exited with status {rc}"
        raise PeerError(f"{peer} stream run ({' '.join(cmd)}) exited with status {rc}:\n" + "\n".join(tail) + "\n"
                        + err, out, summary)
    log.close()
    return out


def convert_upload(peer: str, python: str, tokens_file: str, out: str, T: int, shard_bytes: int, endpoint: str,
                   bucket: str, prefix: str) -> dict:
    """Convert ``tokens_file`` to ``peer``'s format in a child and upload it to ``s3://bucket/prefix``.

    Raises:
        RuntimeError: the child failed (its output ends the message).
    """
    cmd = [python, os.path.abspath(__file__), "convert", "--peer", peer, "--tokens-file", tokens_file, "--out", out,
           "--seq-len", str(T), "--shard-bytes", str(shard_bytes), "--endpoint", endpoint, "--bucket", bucket,
           "--prefix", prefix]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{peer} conversion ({' '.join(cmd)}) exited with status {r.returncode}:\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(_main())
