"""TokenLoader: correct windows, exactly-once across ranks, order independent of W and B,
exact resume (also with another world size), mixtures, faults, cleanup."""
from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmio_native as lio
from llmio_native import _core
from llmio_native.loader import permute, stride_schedule
from llmio_native.loader.order import permute_ref


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def corpus(seed: int, ndocs: int, dtype=np.uint16, vocab: int = 600) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Zipf-like ids so zstd really compresses; lengths include empty and 1-token docs.
    lens = rng.integers(0, 2500, ndocs)
    lens[:3] = [0, 1, 7]
    return [np.minimum(rng.zipf(1.3, n), vocab - 1).astype(dtype) for n in lens]


def write(path: Path, docs: list[np.ndarray], codec: str, dtype: str = "uint16", chunk_tokens: int = 1000) -> Path:
    with lio.DatasetWriter(str(path), dtype=dtype, codec=codec, chunk_tokens=chunk_tokens, shard_tokens=50_000) as w:
        for d in docs:
            w.add_document(d)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    docs = corpus(0, 151)
    tokens = np.concatenate(docs)
    out = {"tokens": tokens}
    out["none"] = write(d / "none", docs, "none")
    out["zstd"] = write(d / "zstd", docs, "zstd")
    raw = d / "nanogpt.bin"
    tokens.tofile(raw)
    out["bin"] = raw
    docs2 = corpus(1, 40, dtype=np.uint32, vocab=100_000)
    out["tokens2"] = np.concatenate(docs2)
    out["u32"] = write(d / "u32", docs2, "zstd", dtype="uint32", chunk_tokens=777)
    return out


def open_src(data, kind):
    if kind == "bin":
        return lio.open_dataset(str(data["bin"]), dtype="uint16")
    return lio.open_dataset(str(data[kind]))


def global_stream(src, W: int, B: int, steps: int, seed: int = 0, T: int = 33, **kw) -> list:
    loaders = [lio.TokenLoader(src, batch_size=B, seq_len=T, rank=r, world_size=W, seed=seed, **kw) for r in range(W)]
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        for r in range(W):
            next(its[r])
            out.extend(loaders[r].last_windows)
    for it in its:
        it.close()
    return out


@pytest.mark.parametrize("kind", ["none", "zstd", "bin"])
def test_windows_are_the_right_tokens(data, kind):
    tokens = data["tokens"]
    T, B = 50, 6
    ld = lio.TokenLoader(open_src(data, kind), batch_size=B, seq_len=T, seed=5, steps=12)
    n = 0
    for x, y in ld:
        assert x.dtype == torch.int64 and x.shape == (B, T) and y.shape == (B, T)
        for row, (_, w) in enumerate(ld.last_windows):
            ref = tokens[w * T : w * T + T + 1].astype(np.int64)
            np.testing.assert_array_equal(x[row].numpy(), ref[:-1])
            np.testing.assert_array_equal(y[row].numpy(), ref[1:])
        n += 1
    assert n == 12 and ld.stats()["batches"] == 12 and ld.stats()["bytes_read"] > 0


def test_uint32_compressed(data):
    tokens = data["tokens2"]
    T = 40
    ld = lio.TokenLoader(str(data["u32"]), batch_size=3, seq_len=T, steps=5)
    for x, _ in ld:
        for row, (_, w) in enumerate(ld.last_windows):
            np.testing.assert_array_equal(x[row].numpy(), tokens[w * T : w * T + T].astype(np.int64))
    assert int(tokens.max()) > 65535


@pytest.mark.parametrize("kind", ["none", "zstd"])
@pytest.mark.parametrize("W", [1, 2, 3, 5])
def test_exactly_once_per_epoch(data, kind, W):
    src = open_src(data, kind)
    T, B = 37, 4  # n_windows is not a multiple of B*W
    n = (src.num_tokens - 1) // T
    steps = -(-n // (B * W))
    stream = global_stream(src, W, B, steps, seed=11, T=T)
    epoch0 = [w for _, w in stream[:n]]
    assert sorted(epoch0) == list(range(n))  # every window once, none twice
    assert epoch0 != sorted(epoch0)  # and shuffled


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_order_independent_of_world_and_batch_size(data, kind):
    src = open_src(data, kind)
    ref = global_stream(src, 1, 12, 7)
    assert global_stream(src, 2, 6, 7) == ref
    assert global_stream(src, 3, 4, 7) == ref
    other_seed = global_stream(src, 1, 12, 7, seed=1)
    assert other_seed != ref


def test_shuffle_false_walks_in_order(data):
    ld = lio.TokenLoader(open_src(data, "none"), batch_size=5, seq_len=10, shuffle=False, steps=3)
    seen = []
    for _ in ld:
        seen.extend(w for _, w in ld.last_windows)
    assert seen == list(range(15))


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_resume_reproduces_uninterrupted_run(data, kind):
    src = open_src(data, kind)
    T, B = 29, 5
    full = lio.TokenLoader(src, batch_size=B, seq_len=T, seed=2)
    it = iter(full)
    ref = [next(it)[0].clone() for _ in range(60)]
    it.close()
    rng = np.random.default_rng(0)
    for stop in sorted(rng.choice(np.arange(1, 59), 6, replace=False)):
        a = lio.TokenLoader(src, batch_size=B, seq_len=T, seed=2)
        it = iter(a)
        for _ in range(stop):
            next(it)
        sd = pickle.loads(pickle.dumps(a.state_dict()))
        it.close()
        assert len(pickle.dumps(sd)) < 4096
        b = lio.TokenLoader(src, batch_size=B, seq_len=T, seed=2)
        b.load_state_dict(sd)
        it = iter(b)
        for k in range(stop, 60):
            assert torch.equal(next(it)[0], ref[k]), (stop, k)
        it.close()


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_resume_with_another_world_size(data, kind):
    src = open_src(data, kind)
    T = 31
    n = (src.num_tokens - 1) // T
    # Run with W=2, B=6 for 5 steps, resume with W=4, B=3 (same global batch) to the epoch end.
    first = global_stream(src, 2, 6, 5, T=T, seed=4)
    probe = lio.TokenLoader(src, batch_size=6, seq_len=T, rank=0, world_size=2, seed=4)
    it = iter(probe)
    for _ in range(5):
        next(it)
    sd = probe.state_dict()
    it.close()
    W2, B2 = 4, 3
    rest_steps = -(-(n - len(first)) // (W2 * B2))
    loaders = [lio.TokenLoader(src, batch_size=B2, seq_len=T, rank=r, world_size=W2, seed=4) for r in range(W2)]
    for ld in loaders:
        ld.load_state_dict(sd)
    its = [iter(ld) for ld in loaders]
    rest = []
    for _ in range(rest_steps):
        for r in range(W2):
            next(its[r])
            rest.extend(loaders[r].last_windows)
    for it in its:
        it.close()
    epoch = [w for _, w in (first + rest)[:n]]
    assert sorted(epoch) == list(range(n))  # nothing lost, nothing repeated
    assert first + rest[: len(first)] != []  # sanity: both parts produced windows


def test_mixture_proportions_and_resume(data):
    srcs = [open_src(data, "none"), open_src(data, "zstd")]
    ld = lio.TokenLoader(srcs, batch_size=10, seq_len=20, weights=[0.7, 0.3], seed=9)
    it = iter(ld)
    picks = []
    for _ in range(100):
        next(it)
        picks.extend(s for s, _ in ld.last_windows)
    it.close()
    counts = np.bincount(picks, minlength=2)
    assert abs(counts[0] - 700) <= 1 and abs(counts[1] - 300) <= 1
    # Resume in the middle of the mixture.
    a = lio.TokenLoader(srcs, batch_size=10, seq_len=20, weights=[0.7, 0.3], seed=9)
    it = iter(a)
    for _ in range(37):
        next(it)
    sd = a.state_dict()
    expect = [next(it)[0].clone() for _ in range(10)]
    it.close()
    b = lio.TokenLoader(srcs, batch_size=10, seq_len=20, weights=[0.7, 0.3], seed=9)
    b.load_state_dict(sd)
    it = iter(b)
    assert all(torch.equal(next(it)[0], e) for e in expect)
    it.close()
    with pytest.raises(ValueError, match="other sources or settings"):
        lio.TokenLoader(srcs, batch_size=10, seq_len=20, weights=[0.5, 0.5], seed=9).load_state_dict(sd)
    with pytest.raises(ValueError, match="other sources or settings"):
        lio.TokenLoader(srcs[0], batch_size=10, seq_len=20).load_state_dict(sd)


def test_state_dict_size_independent_of_dataset(data, tmp_path):
    small = lio.TokenLoader(open_src(data, "none"), batch_size=4, seq_len=16)
    big_docs = corpus(3, 1500)
    big = lio.TokenLoader(str(write(tmp_path / "big", big_docs, "none")), batch_size=4, seq_len=16)
    for ld in (small, big):
        it = iter(ld)
        next(it)
        it.close()
    assert abs(len(pickle.dumps(small.state_dict())) - len(pickle.dumps(big.state_dict()))) < 32
    assert len(pickle.dumps(big.state_dict())) < 1024


def test_bad_arguments(data):
    src = open_src(data, "none")
    with pytest.raises(ValueError):
        lio.TokenLoader(src, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        lio.TokenLoader(src, rank=3, world_size=3)
    with pytest.raises(ValueError, match="weights"):
        lio.TokenLoader([src, src], weights=[1, -1])
    with pytest.raises(ValueError, match="no complete window"):
        lio.TokenLoader(src, seq_len=src.num_tokens)


def corrupt_first_chunk(ds_dir: Path) -> Path:
    shard = sorted(ds_dir.glob("shard-*.lio"))[0]
    with open(shard, "r+b") as f:
        f.seek(4096 + 10)
        b = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    return shard


def test_corrupt_chunk_raises_in_consumer(data, tmp_path):
    docs = corpus(0, 151)
    d = write(tmp_path / "bad", docs, "zstd")
    shard = corrupt_first_chunk(d)
    ld = lio.TokenLoader(str(d), batch_size=8, seq_len=30, shuffle=False)
    with pytest.raises(lio.ChecksumError) as ei:
        for _ in ld:
            pass
    assert shard.name in str(ei.value)


def test_truncated_shard_raises(data, tmp_path):
    raw = tmp_path / "t.bin"
    data["tokens"].tofile(raw)
    ds = lio.open_dataset(str(raw), dtype="uint16")
    os.truncate(raw, 2000)  # after open: the reads hit the missing range
    ld = lio.TokenLoader(ds, batch_size=4, seq_len=100, shuffle=True)
    with pytest.raises(OSError) as ei:
        for _ in ld:
            pass
    assert "t.bin" in str(ei.value)


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_abandoned_iterator_frees_threads_and_memory(data, kind):
    src = open_src(data, kind)
    gc.collect()
    t0, live0 = tasks(), _core.host_live_bytes()
    for _ in range(5):
        ld = lio.TokenLoader(src, batch_size=4, seq_len=64)
        it = iter(ld)
        next(it)
        next(it)
        del it
        gc.collect()
    assert tasks() == t0
    assert _core.host_live_bytes() == live0


def test_compressed_epoch_reads_close_to_compressed_size(data):
    ds = open_src(data, "zstd")
    T, B = 33, 8
    ld = lio.TokenLoader(ds, batch_size=B, seq_len=T, seed=0, span_chunks=4, group_spans=4)
    ld.steps = -(-ld.num_windows[0] // B)  # one epoch
    for _ in ld:
        pass
    read = ld.stats()["compressed_bytes_read"]
    stored = int(ds.chunks["stored_bytes"].sum())
    # Each chunk once, plus at most one boundary chunk per span of 4 (and the next group's
    # first chunks opened by the last batch).
    assert stored <= read <= 1.45 * stored, (read, stored)
    assert ld.stats()["bytes_read"] == read and ld.stats()["decode_gbps"] > 0


def test_stats_accumulate_across_iterators(data):
    ld = lio.TokenLoader(open_src(data, "none"), batch_size=4, seq_len=16, steps=3)
    list(ld)
    first = ld.stats()["bytes_read"]
    list(ld)
    # Each iterator reads its 3 batches plus its read-ahead (prefetch 8), 17 uint16 per window.
    per_batch = 4 * 17 * 2
    assert first % per_batch == 0 and 3 * per_batch <= first <= (3 + 8) * per_batch
    assert ld.stats()["batches"] == 6 and ld.stats()["bytes_read"] == 2 * first


def test_keyboard_interrupt_stops_cleanly(data):
    script = f"""
import os, signal, threading, time, llmio_native as lio
from llmio_native import _core
src = lio.open_dataset({str(data['zstd'])!r})
base = len(os.listdir('/proc/self/task'))
ld = lio.TokenLoader(src, batch_size=4, seq_len=16)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    for _ in ld:
        time.sleep(0.001)
except KeyboardInterrupt:
    time.sleep(0.2)
    print("STOPPED", len(os.listdir('/proc/self/task')) <= base + 1, _core.host_live_bytes())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "STOPPED True 0" in out.stdout, out.stdout + out.stderr[-2000:]


def test_inside_torch_dataloader(data):
    src = open_src(data, "none")
    plain = lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=8)
    ref = [x.clone() for x, _ in plain]
    dl = torch.utils.data.DataLoader(lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=8), batch_size=None)
    got = [x for x, _ in dl]
    assert len(got) == 8 and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_dataloader_workers_round_robin(data, tmp_path):
    # Worker w yields global batches w, w+n, ...: the DataLoader's round-robin order equals the plain one.
    script = f"""
import torch, llmio_native as lio
src = lio.open_dataset({str(data['none'])!r})
ref = [x.clone() for x, _ in lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=8)]
ld = lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=4)
dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2)
got = [x for x, _ in dl]
print("SAME", len(got) == 8 and all(torch.equal(a, b) for a, b in zip(got, ref)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "SAME True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_permutation_is_bijective():
    for n in [1, 2, 3, 4, 5, 1000, 1023, 1024, 1025, 65535, 65537]:
        p = permute(np.arange(n), n, key=n * 7 + 1)
        assert np.array_equal(np.sort(p), np.arange(n)), n
    with pytest.raises(ValueError):
        permute(np.array([5]), 5, key=1)


def test_permutation_cpp_matches_reference():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 1000, 1 << 20, (1 << 20) + 1, 10**9 + 7, 1 << 40]:
        idx = rng.integers(0, n, 3000)
        for key in (0, 1, 2**63 + 5, 2**64 - 1):
            np.testing.assert_array_equal(permute(idx, n, key), permute_ref(idx, n, key))


def test_stride_schedule_prefix_balance():
    w = np.array([0.5, 0.3, 0.2])
    src, counts = stride_schedule(np.zeros(3, np.int64), w, 1000)
    for m in (10, 97, 500, 1000):
        c = np.bincount(src[:m], minlength=3)
        assert np.all(np.abs(c - w * m) <= 1.0 + 1e-9), (m, c)
    assert counts.tolist() == [500, 300, 200]


@pytest.mark.cuda
def test_cuda_batches_equal_cpu_batches(data):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for kind in ("none", "zstd"):
        src = open_src(data, kind)
        cpu = [x.clone() for x, _ in lio.TokenLoader(src, batch_size=8, seq_len=64, seed=1, steps=10)]
        gpu = [(x.cpu(), y.cpu()) for x, y in
               lio.TokenLoader(src, batch_size=8, seq_len=64, seed=1, steps=10, device="cuda")]
        assert all(torch.equal(a, g[0]) for a, g in zip(cpu, gpu))


def test_bench_loader_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"
    if not script.exists():
        pytest.skip("benchmarks/bench_loader.py not present")
    out = subprocess.run([sys.executable, str(script), "--size-gib", "0.005", "--batches", "10",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TokenLoader" in out.stdout and "np.memmap" in out.stdout
