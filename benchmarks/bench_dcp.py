#!/usr/bin/env python3
"""DCP backend benchmark: save and cold load of a GPT-like state dict through
torch.distributed.checkpoint, llmio_native.checkpoint.StorageWriter/StorageReader against torch's
FileSystemWriter(thread_count=4)/FileSystemReader, with the disk's limits measured in the same run.

The state dict: bf16 weights of transformer layers (qkv, proj, fc, fc2; d_model 256 or 1024) plus
an fp32 optimizer moment per weight, sized to --size-mib. One process, no process group. Rows:

  save   limit: O_DIRECT pwrite x4 threads   4 MiB aligned writes into one file + fdatasync
         llmio StorageWriter                   dcp.save, every file fdatasynced, atomic commit
         llmio StorageWriter thread_count=4    the same with 4 files written in parallel
         torch FileSystemWriter thread_count=4 dcp.save, sync_files=True (its default)
  load   limit: liburing qd32 1 MiB O_DIRECT   benchmarks/liburing_limit.c (bench_read's limit),
                                               or an O_DIRECT pread loop where liburing is absent
         llmio StorageReader                   dcp.load into preallocated tensors, cold
         torch FileSystemReader                dcp.load, cold

Cold: every file of the checkpoint is evicted from the page cache (POSIX_FADV_DONTNEED) before
each load. Each row runs once (--reps to repeat; the best counts). Every load is checked bit-exact.
Usage: python benchmarks/bench_dcp.py [--size-mib 1024] [--dir DIR] [--reps 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed.checkpoint as dcp

from llmio_native.checkpoint import StorageReader, StorageWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import evict  # noqa: E402
from common import machine as common_machine  # noqa: E402

MiB = 1 << 20
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="Detected an existing checkpoint")


@dataclass
class Row:
    section: str
    name: str
    nbytes: int
    seconds: float
    gbps: float
    vs_limit: float | None = None
    vs_torch: float | None = None


def make_state(size_bytes: int, seed: int = 0) -> dict:
    """GPT-like: per layer bf16 weights (12 d^2 elements) and an fp32 moment for each."""
    d = 1024 if size_bytes >= 512 * MiB else 256
    per_layer = 12 * d * d * (2 + 4)
    layers = max(1, -(-size_bytes // per_layer))
    g = torch.Generator().manual_seed(seed)
    model, optim = {}, {}
    for i in range(layers):
        for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc", (4 * d, d)), ("mlp.fc2", (d, 4 * d))):
            w = torch.randn(shape, generator=g)
            model[f"h.{i}.{name}.weight"] = w.to(torch.bfloat16)
            optim[f"h.{i}.{name}.exp_avg"] = w.mul_(0.01)
        model[f"h.{i}.ln.weight"] = torch.ones(d)
    return {"model": model, "optim": optim, "step": 1000}


def nbytes_of(sd: dict) -> int:
    n = 0
    for v in sd.values():
        if isinstance(v, dict):
            n += nbytes_of(v)
        elif isinstance(v, torch.Tensor):
            n += v.numel() * v.element_size()
    return n


def zeros_like(sd: dict) -> dict:
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
            for k, v in sd.items()}


def equal(a: dict, b: dict) -> bool:
    for k, v in a.items():
        w = b[k]
        if isinstance(v, dict):
            if not equal(v, w):
                return False
        elif isinstance(v, torch.Tensor):
            if not torch.equal(v, w):
                return False
        elif v != w:
            return False
    return True


def files_under(path: str) -> list[str]:
    return [os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs]


def write_limit(path: str, size: int, threads: int = 4, bs: int = 4 * MiB) -> float:
    """Seconds to write ``size`` bytes with O_DIRECT pwrite from ``threads`` threads (4 MiB
    aligned blocks, disjoint regions), then fdatasync."""
    size = -(-size // bs) * bs
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        os.ftruncate(fd, size)
        nblocks = size // bs
        errors: list[BaseException] = []

        def work(t: int) -> None:
            buf = mmap.mmap(-1, bs)  # page-aligned
            buf.write(os.urandom(4096) * (bs // 4096))
            try:
                for b in range(t, nblocks, threads):
                    os.pwrite(fd, buf, b * bs)
            except BaseException as e:  # pragma: no cover - surfaced below
                errors.append(e)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        os.fdatasync(fd)
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return dt
    finally:
        os.close(fd)


def read_limit(path: str, tmp: str) -> tuple[float, str]:
    """Seconds to read ``path`` cold at the device's limit, and how it was measured."""
    try:
        from bench_read import build_limit, run_limit

        exe, why = build_limit(tmp)
        if exe is not None:
            evict(path)
            _bytes, _ops, secs, _cpu = run_limit(exe, ["seq", path, "32", str(MiB)])
            return secs, "limit: liburing qd32 1MiB O_DIRECT"
    except Exception:  # liburing not installed or not buildable: the plain loop below
        pass
    evict(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = mmap.mmap(-1, 4 * MiB)
    t0 = time.perf_counter()
    try:
        while os.readv(fd, [buf]) > 0:
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0, "limit: O_DIRECT pread 4MiB loop"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="state dict size (MiB)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the current directory)")
    ap.add_argument("--reps", type=int, default=1, help="runs per row; the best counts")
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args()

    root = tempfile.mkdtemp(prefix="bench_dcp_", dir=a.dir or os.getcwd())
    try:
        sd = make_state(a.size_mib * MiB)
        total = nbytes_of(sd)
        rows: list[Row] = []
        best = lambda f: min(f() for _ in range(max(1, a.reps)))  # noqa: E731

        lim_path = os.path.join(root, "limit.bin")
        t_wl = best(lambda: write_limit(lim_path, total))
        t_rl, rl_name = min((read_limit(lim_path, root) for _ in range(max(1, a.reps))), key=lambda r: r[0])
        os.unlink(lim_path)
        rows.append(Row("save", "limit: O_DIRECT pwrite x4 threads 4MiB + fdatasync", total, t_wl, total / t_wl / 1e9))
        rows.append(Row("load (cold)", rl_name, total, t_rl, total / t_rl / 1e9))

        writers = {
            "llmio StorageWriter": lambda p: StorageWriter(p),
            "llmio StorageWriter thread_count=4": lambda p: StorageWriter(p, thread_count=4),
            "torch FileSystemWriter thread_count=4": lambda p: dcp.FileSystemWriter(p, thread_count=4, sync_files=True),
        }
        readers = {
            "llmio StorageReader": ("llmio StorageWriter", lambda p: StorageReader(p)),
            "torch FileSystemReader": ("torch FileSystemWriter thread_count=4", lambda p: dcp.FileSystemReader(p)),
        }
        paths = {}
        for name, mk in writers.items():
            p = os.path.join(root, name.split()[0] + ("_t4" if "thread_count=4" in name else ""))
            paths[name] = p

            def run(p=p, mk=mk):
                shutil.rmtree(p, ignore_errors=True)
                return timed(lambda: dcp.save(sd, storage_writer=mk(p)))

            t = best(run)
            rows.append(Row("save", name, total, t, total / t / 1e9))
        for name, (wname, mk) in readers.items():
            p = paths[wname]
            out = zeros_like(sd)

            def run(p=p, mk=mk, out=out):
                evict(files_under(p))
                return timed(lambda: dcp.load(out, storage_reader=mk(p)))

            t = best(run)
            if not equal(sd, out):
                raise SystemExit(f"{name}: loaded state differs from the saved one")
            rows.append(Row("load (cold)", name, total, t, total / t / 1e9))

        for r in rows:
            lim = next(x for x in rows if x.section == r.section and x.name.startswith("limit"))
            tor = next((x for x in rows if x.section == r.section and x.name.startswith("torch")), None)
            if not r.name.startswith("limit"):
                r.vs_limit = r.gbps / lim.gbps
                r.vs_torch = r.gbps / tor.gbps if tor else None

        mach = common_machine()
        print(f"# bench_dcp: {total / MiB:.0f} MiB state dict ({len(sd['model'])} + {len(sd['optim'])} tensors, bf16 + fp32), "
              f"one process; {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB, kernel {mach['kernel']}; dir {root}")
        print(f"{'section':<12} {'name':<52} {'GB/s':>7} {'s':>7} {'x limit':>8} {'x torch':>8}")
        for r in rows:
            vl = f"{r.vs_limit:.2f}" if r.vs_limit is not None else "-"
            vt = f"{r.vs_torch:.2f}" if r.vs_torch is not None else "-"
            print(f"{r.section:<12} {r.name:<52} {r.gbps:>7.3f} {r.seconds:>7.3f} {vl:>8} {vt:>8}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"machine": mach, "state_bytes": total, "rows": [asdict(r) for r in rows]}, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
