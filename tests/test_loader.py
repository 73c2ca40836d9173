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
from llmio_native.loader.order import permute_ref, stride_schedule_ref
from llmio_native.loader.token_loader import last_windows


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
            out.extend(last_windows(loaders[r]))
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
        for row, (_, w) in enumerate(last_windows(ld)):
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
        for row, (_, w) in enumerate(last_windows(ld)):
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


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_shuffle_false_walks_in_order(data, kind):
    src = open_src(data, kind)
    n = (src.num_tokens - 1) // 10
    ld = lio.TokenLoader(src, batch_size=50, seq_len=10, shuffle=False, steps=-(-n // 50) + 2)
    seen = []
    for _ in ld:
        seen.extend(w for _, w in last_windows(ld))
    assert seen[: n + 100] == list(range(n)) + list(range(100))


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
            rest.extend(last_windows(loaders[r]))
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
        picks.extend(s for s, _ in last_windows(ld))
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


def test_truncated_compressed_shard_raises(tmp_path):
    d = write(tmp_path / "z", corpus(0, 151), "zstd")
    ds = lio.open_dataset(str(d))
    shard = sorted(d.glob("shard-*.lio"))[-1]
    os.truncate(shard, 4096 + 100)  # after open: chunk reads of the last shard come up short
    ld = lio.TokenLoader(ds, batch_size=4, seq_len=100)
    with pytest.raises(OSError) as ei:
        for _ in ld:
            pass
    assert shard.name in str(ei.value)


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
    st = ld.stats()
    first = st["bytes_read"] - st["verify_bytes"]  # window reads (chunk checks are counted apart)
    list(ld)
    # Each iterator reads its 3 batches plus its read-ahead (prefetch 8), 17 uint16 per window.
    per_batch = 4 * 17 * 2
    assert first % per_batch == 0 and 3 * per_batch <= first <= (3 + 8) * per_batch
    st = ld.stats()
    assert st["batches"] == 6 and st["bytes_read"] - st["verify_bytes"] == 2 * first
    # Every chunk is checked at most once per loader, however many iterators read it.
    assert 0 < st["verify_bytes"] <= open_src(data, "none").stored_bytes


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


def test_dataloader_workers_round_robin(data):
    # Worker w yields global batches w, w+n, ...: the DataLoader's round-robin order equals the
    # plain one and `steps` counts the DataLoader's batches; after a resume at a position whose
    # batch index is not a multiple of the workers (saved with B=4, resumed with B=6) the
    # DataLoader still continues the stream exactly.
    script = f"""
import torch, llmio_native as lio
src = lio.open_dataset({str(data['none'])!r})
ld = lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3)
it = iter(ld)
plain = [next(it)[0].clone() for _ in range(14)]
it.close()
ld = lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=3)
list(ld)
sd = ld.state_dict()  # position 12
after = torch.cat(plain[3:]).reshape(-1)
for workers in (2, 3):
    got = [x for x, _ in torch.utils.data.DataLoader(
        lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=7), batch_size=None, num_workers=workers)]
    print("PLAIN", workers, len(got) == 7 and all(torch.equal(a, b) for a, b in zip(got, plain)))
    ld6 = lio.TokenLoader(src, batch_size=6, seq_len=16, seed=3, steps=7)
    ld6.load_state_dict(sd)  # 12 // 6 = batch index 2
    got = [x for x, _ in torch.utils.data.DataLoader(ld6, batch_size=None, num_workers=workers)]
    flat = torch.cat(got).reshape(-1)
    print("RESUMED", workers, len(got) == 7 and torch.equal(flat, after[: flat.numel()]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    for w in (2, 3):
        assert f"PLAIN {w} True" in out.stdout and f"RESUMED {w} True" in out.stdout, out.stdout + out.stderr[-2000:]


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


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_stream_runs_on_across_epochs(data, kind):
    # Batches straddle the epoch boundary; positions [e*n, (e+1)*n) are exactly epoch e, and
    # each epoch has its own order.
    src = open_src(data, kind)
    T, B = 41, 7
    n = (src.num_tokens - 1) // T
    assert n % B != 0
    ld = lio.TokenLoader(src, batch_size=B, seq_len=T, seed=8, steps=-(-2 * n // B) + 1)
    seen = []
    epochs = []
    for _ in ld:
        seen.extend(w for _, w in last_windows(ld))
        epochs.append(ld.epoch)
    e0, e1 = seen[:n], seen[n : 2 * n]
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n)) and e0 != e1
    assert len(ld) == -(-n // B) and epochs[len(ld) - 1] == 1 and epochs[len(ld) - 2] == 0
    assert ld.position == len(seen) and ld.state_dict()["counts"] == [len(seen)]


def test_mixture_sources_keep_their_own_epochs(data):
    # A small source (uint32, zstd) wraps three epochs while the large one (uint16, none) is
    # still in its first; each epoch of each source holds its windows exactly once; tokens right.
    small, big = open_src(data, "u32"), open_src(data, "none")
    refs = [data["tokens2"], data["tokens"]]
    T = 100
    ns, nb = (small.num_tokens - 1) // T, (big.num_tokens - 1) // T
    ld = lio.TokenLoader([small, big], batch_size=10, seq_len=T, weights=[3, 1], seed=5)
    it = iter(ld)
    per = {0: [], 1: []}
    for _ in range(-(-3 * ns * 4 // 3 // 10)):
        x, y = next(it)
        for row, (s, w) in enumerate(last_windows(ld)):
            per[s].append(w)
            np.testing.assert_array_equal(x[row].numpy(), refs[s][w * T : w * T + T])
            np.testing.assert_array_equal(y[row].numpy(), refs[s][w * T + 1 : w * T + T + 1])
    it.close()
    assert len(per[0]) >= 3 * ns and len(per[1]) < nb
    for e in range(3):
        assert sorted(per[0][e * ns : (e + 1) * ns]) == list(range(ns))
    assert len(set(per[1])) == len(per[1])
    assert ld.state_dict()["counts"] == [len(per[0]), len(per[1])]


def test_load_state_dict_while_iterating(data):
    src = open_src(data, "none")
    ld = lio.TokenLoader(src, batch_size=4, seq_len=20, seed=1)
    it = iter(ld)
    ref = [next(it)[0].clone() for _ in range(10)]
    it.close()
    ld = lio.TokenLoader(src, batch_size=4, seq_len=20, seed=1)
    it = iter(ld)
    for _ in range(3):
        next(it)
    sd3 = ld.state_dict()
    for _ in range(4):
        next(it)  # the pipeline has read ahead past batch 7
    ld.load_state_dict(sd3)  # rewind in the middle of iteration
    assert ld.position == 12
    got = [next(it)[0] for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(got, ref[3:]))
    it.close()


def test_compat_sources_llmc_and_megatron(tmp_path):
    rng = np.random.default_rng(4)
    toks = rng.integers(0, 50257, 20_000).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 1, len(toks)
    p = tmp_path / "train_000001.bin"
    p.write_bytes(header.tobytes() + toks.tobytes())
    t32 = rng.integers(0, 100_000, 15_000).astype(np.int32)
    prefix = tmp_path / "mega"
    (tmp_path / "mega.bin").write_bytes(t32.tobytes())
    lengths = np.array([5000, 1, 9999], dtype=np.int32)
    ptrs = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64) * 4
    import struct
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<Q", 3)
                + struct.pack("<Q", 3) + lengths.tobytes() + ptrs.tobytes() + np.array([0, 1, 3], np.int64).tobytes())
    for ds, ref in ((lio.open_dataset(str(p)), toks), (lio.open_dataset(str(prefix)), t32)):
        T = 97
        ld = lio.TokenLoader(ds, batch_size=8, seq_len=T, seed=2, steps=6)
        for x, y in ld:
            for row, (_, w) in enumerate(last_windows(ld)):
                np.testing.assert_array_equal(x[row].numpy(), ref[w * T : w * T + T].astype(np.int64))
                np.testing.assert_array_equal(y[row].numpy(), ref[w * T + 1 : w * T + T + 1].astype(np.int64))


def test_compressed_windows_longer_than_a_chunk(data):
    # seq_len 2500 > chunk_tokens 1000: a window spans three or four chunks; they belong to the
    # group's decode set, so nothing is decoded twice beyond the spans' reach.
    src = open_src(data, "zstd")
    tokens = data["tokens"]
    T = 2500
    n = (src.num_tokens - 1) // T
    ld = lio.TokenLoader(src, batch_size=3, seq_len=T, seed=6, span_chunks=2, group_spans=3)
    ld.steps = -(-n // 3)
    seen = []
    for x, _ in ld:
        for row, (_, w) in enumerate(last_windows(ld)):
            np.testing.assert_array_equal(x[row].numpy(), tokens[w * T : w * T + T].astype(np.int64))
            seen.append(w)
    assert sorted(seen[:n]) == list(range(n))
    st = ld.stats()
    assert 1.0 <= st["compressed_read_ratio"] <= 3.0, st


def test_shuffle_chunks_sets_the_group_size(data):
    src = open_src(data, "zstd")
    ld = lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=20)
    assert (ld.span_chunks, ld.group_spans) == (8, 3)
    ld = lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=4)
    assert (ld.span_chunks, ld.group_spans) == (4, 1)
    assert lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=24, group_spans=3).group_spans == 3
    with pytest.raises(ValueError, match="pass one of them"):
        lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=24, group_spans=5)
    for bad in ({"shuffle_chunks": 0}, {"span_chunks": 0}, {"group_spans": 0}, {"steps": -1}):
        with pytest.raises(ValueError):
            lio.TokenLoader(src, batch_size=4, seq_len=30, **bad)
    # The group size is part of the order, hence of the state's fingerprint.
    a = lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=16)
    with pytest.raises(ValueError, match="other sources or settings"):
        lio.TokenLoader(src, batch_size=4, seq_len=30, shuffle_chunks=32).load_state_dict(a.state_dict())
    raw = open_src(data, "none")  # it does not shape an uncompressed source's order: accepted
    b = lio.TokenLoader(raw, batch_size=4, seq_len=30, shuffle_chunks=16)
    lio.TokenLoader(raw, batch_size=4, seq_len=30, shuffle_chunks=32).load_state_dict(b.state_dict())


def test_stats_values(data):
    ld = lio.TokenLoader(open_src(data, "none"), batch_size=4, seq_len=16, steps=20, prefetch=2)
    list(ld)
    st = ld.stats()
    assert st["batches"] == 20 and st["active_s"] > 0 and st["stall_s"] >= 0
    assert st["bytes_read"] >= 20 * 4 * 17 * 2
    assert st["read_gbps"] == pytest.approx(st["bytes_read"] / st["active_s"] / 1e9)
    assert st["decoded_bytes"] == 0 and st["compressed_read_ratio"] == 0.0
    assert st["stall_per_batch_s"] == pytest.approx(st["stall_s"] / 20)


def test_corrupt_chunk_raises_quickly_naming_the_chunk(data, tmp_path):
    import time
    d = write(tmp_path / "bad", corpus(0, 151), "zstd")
    shard = corrupt_first_chunk(d)
    ld = lio.TokenLoader(str(d), batch_size=8, seq_len=30, seed=3)
    t0 = time.perf_counter()
    with pytest.raises(lio.ChecksumError, match=r"chunk 0 .*checksum mismatch") as ei:
        for _ in ld:
            pass
    assert ei.value.path == str(shard) and ei.value.chunk == 0
    assert time.perf_counter() - t0 < 5.0  # the whole epoch's first pass: never a hang


def test_stride_schedule_matches_greedy_reference():
    rng = np.random.default_rng(0)
    for trial in range(200):
        S = int(rng.integers(1, 6))
        w = rng.random(S) + 0.01 if trial % 3 else np.round(rng.random(S) * 4) + 1.0  # ties too
        w = w / w.sum()
        _, c0 = stride_schedule_ref(np.zeros(S, np.int64), w, int(rng.integers(0, 500)))
        m = int(rng.integers(0, 300))
        a, b = stride_schedule(c0, w, m), stride_schedule_ref(c0, w, m)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["none", "zstd", "bin", "mix"])
def test_cuda_batches_equal_cpu_batches(data, kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # "none"/"bin": pinned slots -> H2D on the side stream -> cut_windows kernel; "zstd"/"mix":
    # CPU decode/assembly, then H2D. 30 steps > ring slots, so slot releases wait on events.
    src = [open_src(data, "none"), open_src(data, "u32")] if kind == "mix" else open_src(data, kind)
    kw = dict(batch_size=8, seq_len=64, seed=1, steps=30, weights=[0.6, 0.4] if kind == "mix" else None)
    cpu = [(x.clone(), y.clone()) for x, y in lio.TokenLoader(src, **kw)]
    ld = lio.TokenLoader(src, device="cuda", **kw)
    stream = torch.cuda.Stream()  # a non-default current stream: the loader must order against it
    gpu = []
    with torch.cuda.stream(stream):
        for x, y in ld:
            assert x.is_cuda and x.dtype == torch.int64 and x.shape == (8, 64)
            gpu.append((x * 1, y * 1))  # consumed on the current stream right away
    torch.cuda.synchronize()
    assert len(gpu) == 30
    for (cx, cy), (gx, gy) in zip(cpu, gpu):
        assert torch.equal(cx, gx.cpu()) and torch.equal(cy, gy.cpu())
    ref = lio.TokenLoader(src, **kw)
    list(ref)
    assert ld.state_dict() == ref.state_dict()


@pytest.mark.cuda
def test_cuda_iterator_frees_pinned_memory(data):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = open_src(data, "none")
    gc.collect()
    live0 = _core.host_live_bytes()
    for _ in range(3):
        it = iter(lio.TokenLoader(src, batch_size=4, seq_len=64, device="cuda"))
        next(it)
        del it
        gc.collect()
    torch.cuda.synchronize()
    assert _core.host_live_bytes() == live0


def test_cuda_device_without_cuda_raises(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(lio.UnsupportedError, match="torch.cuda is not available"):
        lio.TokenLoader(open_src(data, "none"), device="cuda")


def test_bench_loader_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"
    if not script.exists():
        pytest.skip("benchmarks/bench_loader.py not present")
    out = subprocess.run([sys.executable, str(script), "--size-gib", "0.005", "--batches", "10",
                          "--dir", str(tmp_path / "data"), "--json", str(tmp_path / "l.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    res = json.loads((tmp_path / "l.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("TokenLoader (our format, none)", "TokenLoader (our format, none), 2nd pass", "TokenLoader (raw .bin)",
                 "nanoGPT np.memmap get_batch", "TokenLoader (zstd)", "TokenLoader (rans, CPU decode)"):
        assert name in rows, (name, sorted(rows))
        assert rows[name]["tokens_s"] > 0 and rows[name]["vs_limit"] > 0
    assert any(n.startswith("engine limit") and r["vs_limit"] == 1.0 for n, r in rows.items())
    assert res["seq_read_gbps"] > 0 and res["batches"] == 10


# ---------------------------------------------------------------------------------------
# Regressions from hostile testing (issue 9): wrong data, worker modes, pickling, state.

def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("mix", [False, True])
def test_corrupt_uncompressed_chunk_never_reaches_a_batch(tmp_path, mix):
    # codec=none: the ring reads only each window's bytes; every chunk a window touches must
    # have passed its checksum before a batch holding its tokens is handed out.
    docs = corpus(0, 151)
    clean = write(tmp_path / "clean", docs, "none")
    bad = write(tmp_path / "bad", docs, "none")
    shard = sorted(bad.glob("shard-*.lio"))[1]
    ds_bad = lio.open_dataset(str(bad))
    ci = int(np.flatnonzero(ds_bad.chunks["file"] == 1)[3])  # 4th chunk of the 2nd shard
    flip_byte(shard, int(ds_bad.chunks["offset"][ci]) + 7)
    extra = [lio.open_dataset(str(data_zstd))] if mix and (data_zstd := write(tmp_path / "z", docs, "zstd")) else []
    kw = dict(batch_size=8, seq_len=30, seed=5, weights=[2, 1] if mix else None)
    ref = lio.TokenLoader([lio.open_dataset(str(clean))] + extra, **kw)
    ld = lio.TokenLoader([ds_bad] + extra, **kw)
    handed = 0
    with pytest.raises(lio.ChecksumError, match=r"checksum mismatch") as ei:
        for (x, y), (rx, ry) in zip(ld, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)  # every batch handed out is clean
            handed += 1
    assert ei.value.path == str(shard) and ei.value.chunk == 3
    assert handed < 10_000
    # a clean source is checked once per chunk, not per window
    ok = lio.TokenLoader(str(clean), batch_size=8, seq_len=30, seed=5, steps=400)
    list(ok)
    assert ok.stats()["verify_bytes"] == lio.open_dataset(str(clean)).stored_bytes


DATALOADER_SCRIPT = r"""
import sys, torch, llmio_native as lio
def main():
    path, ctx, persistent = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    src = lio.open_dataset(path)
    it = iter(lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3))
    plain = [next(it)[0].clone() for _ in range(12)]
    extra = next(it)[0].clone()
    it.close()
    ld = lio.TokenLoader(src, batch_size=4, seq_len=16, seed=3, steps=4)
    dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2, multiprocessing_context=ctx,
                                     persistent_workers=persistent)
    got = []
    for epoch in range(3):  # each iter() continues the stream: global batches 0..11 once each
        got.extend(x for x, _ in dl)
    idx = [next((i for i, p in enumerate(plain) if torch.equal(p, g)), -1) for g in got]
    print("ORDER", idx)
    print("STATE", ld.state_dict()["position"])
    print("NEXT", torch.equal(next(iter(ld))[0], extra))  # plain iteration continues the stream too
if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("ctx,persistent", [("fork", False), ("fork", True), ("spawn", True), ("forkserver", False)])
def test_dataloader_stream_continues_across_iter(data, tmp_path, ctx, persistent):
    script = tmp_path / "dl.py"
    script.write_text(DATALOADER_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(data["none"]), ctx, "1" if persistent else "0"],
                         capture_output=True, text=True, timeout=300)
    assert f"ORDER {list(range(12))}" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "STATE 48" in out.stdout  # 12 batches of 4 consumed, seen by the main process's loader
    assert "NEXT True" in out.stdout


def test_loader_pickles_and_deepcopies(data):
    import copy
    for kind in ("none", "zstd"):
        ld = lio.TokenLoader(open_src(data, kind), batch_size=4, seq_len=16, seed=3)
        it = iter(ld)
        first = [next(it)[0].clone() for _ in range(3)]
        # a live iterator (threads, ring) does not stop the loader from pickling
        for clone in (pickle.loads(pickle.dumps(ld)), copy.deepcopy(ld)):
            assert clone.position == ld.position == 12
            it2 = iter(clone)
            nxt = [next(it2)[0].clone() for _ in range(2)]
            it2.close()
            assert clone.position == 20 and ld.position == 12  # the copy is independent
            ref = [next(it)[0].clone() for _ in range(2)]
            assert all(torch.equal(a, b) for a, b in zip(nxt, ref))
            ld.load_state_dict(clone.state_dict() | {"position": 12, "counts": [12]})
            it.close()
            it = iter(ld)
        it.close()
        assert first[0].shape == (4, 16)


def test_state_of_another_dataset_is_refused(tmp_path):
    a = write(tmp_path / "a", corpus(0, 60), "none")
    docs_b = corpus(0, 60)
    docs_b[5] = (docs_b[5] + 1) % 600  # same sizes, dtype and codec; other tokens
    b = write(tmp_path / "b", docs_b, "none")
    la, lb = lio.TokenLoader(str(a), batch_size=4, seq_len=16), lio.TokenLoader(str(b), batch_size=4, seq_len=16)
    assert lio.open_dataset(str(a)).num_tokens == lio.open_dataset(str(b)).num_tokens
    with pytest.raises(ValueError, match=r"fingerprint.sources\[0\].content"):
        lb.load_state_dict(la.state_dict())
    lb.load_state_dict(lio.TokenLoader(str(b), batch_size=4, seq_len=16).state_dict())  # its own is fine
    # nanoGPT .bin files of the same length: identified by their bytes, not their size
    ta = np.concatenate(corpus(0, 60))
    ta.tofile(tmp_path / "a.bin")
    tb = ta.copy()
    tb[-1] ^= 1
    tb.tofile(tmp_path / "b.bin")
    na = lio.TokenLoader(lio.open_dataset(str(tmp_path / "a.bin"), dtype="uint16"), batch_size=4, seq_len=16)
    nb = lio.TokenLoader(lio.open_dataset(str(tmp_path / "b.bin"), dtype="uint16"), batch_size=4, seq_len=16)
    with pytest.raises(ValueError, match="content"):
        nb.load_state_dict(na.state_dict())


def test_load_state_dict_names_bad_keys_and_values(data):
    ld = lio.TokenLoader(open_src(data, "none"), batch_size=4, seq_len=16)
    good = ld.state_dict()
    cases = [
        ([1, 2], TypeError, "expects the dict"),
        ({k: v for k, v in good.items() if k != "counts"}, ValueError, r"lacks the key\(s\) \['counts'\]"),
        (good | {"version": 1}, ValueError, "version 1"),
        (good | {"position": 4.0, "counts": [4]}, TypeError, r"'position' must be an int, got 4.0"),
        (good | {"position": 1 << 70, "counts": [1 << 70]}, ValueError, r"'position' = \d+ is outside"),
        (good | {"position": 4, "counts": [True]}, TypeError, r"'counts\[0\]' must be an int"),
        (good | {"position": 4, "counts": 4}, TypeError, "'counts' must be a list"),
        (good | {"position": 4, "counts": [3]}, ValueError, "add up to 3, position is 4"),
        (good | {"position": 8, "counts": [4, 4]}, ValueError, "2 entries, the loader has 1"),
        (good | {"fingerprint": good["fingerprint"] | {"seed": 9}}, ValueError, r"fingerprint.seed: saved 9, here 0"),
    ]
    for sd, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ld.load_state_dict(sd)
    assert ld.position == 0  # nothing half-applied
    ld.load_state_dict(good | {"position": 8, "counts": [8]})
    assert ld.position == 8


def test_bad_argument_types_and_values(data):
    src = open_src(data, "none")
    cases = [
        (dict(batch_size="4"), TypeError, r"batch_size=...\) must be an int, got '4'"),
        (dict(batch_size=2.5), TypeError, r"batch_size=...\) must be an int, got 2.5"),
        (dict(seq_len=True), TypeError, "seq_len"),
        (dict(device="meta"), ValueError, r"device='meta'.*'cpu' or 'cuda\[:i\]'"),
        (dict(device="bogus"), ValueError, "not a device"),
        (dict(backend="xyz"), ValueError, r"backend='xyz'.*auto, io_uring, threads"),
        (dict(num_threads=-1), ValueError, r"num_threads=-1\): must be in \[1, 1024\]"),
        (dict(prefetch=0), ValueError, "prefetch"),
        (dict(queue_depth=0), ValueError, "queue_depth"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(shuffle="yes"), TypeError, "shuffle"),
        (dict(rank=0.0, world_size=2), TypeError, "rank"),
        (dict(weights=["a"]), TypeError, "weights"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lio.TokenLoader(src, **kw)
    with pytest.raises(TypeError, match="sources"):
        lio.TokenLoader(42)


def test_cuda_gate_asks_our_module():
    # torch seeing a GPU is not enough: the GPU paths are gated on our _cuda module seeing it
    # (a CUDA 13 runtime on an older driver sees none); the reason names what it found.
    from llmio_native import _native
    ok, why = _native.cuda_usable()
    if _native._cuda is None:
        assert not ok and "not built" in why
    elif _native._cuda.device_count() == 0:
        assert not ok and "sees no device" in why and "built for CUDA runtime" in why
    else:
        assert ok and why == ""


def write_megatron_prefix(prefix: Path, tokens: np.ndarray) -> None:
    """A one-document Megatron indexed dataset (``prefix.bin`` + ``prefix.idx``)."""
    import struct

    Path(str(prefix) + ".bin").write_bytes(tokens.tobytes())
    code = {np.dtype("int16"): 3, np.dtype("int32"): 4}[tokens.dtype]  # Megatron dtype codes
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", 1)
                + struct.pack("<Q", 2) + np.array([len(tokens)], np.int32).tobytes()
                + np.array([0], np.int64).tobytes() + np.array([0, 1], np.int64).tobytes())


@pytest.mark.parametrize("dtype", ["int16", "int32"])
def test_mixture_of_signed_raw_and_compressed_sources(data, tmp_path, dtype):
    # Rows of a signed Megatron source, an uncompressed and a compressed source in one batch:
    # each row holds its window's tokens; a negative id in the signed source is refused
    # (naming the file and offset) before a batch holding it is handed out.
    rng = np.random.default_rng(3)
    signed = rng.integers(0, 30_000, 12_000).astype(dtype)
    write_megatron_prefix(tmp_path / "sg", signed)
    refs = [signed, data["tokens"], data["tokens"]]
    T = 50
    kw = dict(batch_size=12, seq_len=T, weights=[1, 1, 1], seed=2)
    srcs = [lio.open_dataset(str(tmp_path / "sg")), open_src(data, "none"), open_src(data, "zstd")]
    ld = lio.TokenLoader(srcs, steps=40, **kw)
    kinds = set()
    for x, y in ld:
        for row, (s, w) in enumerate(last_windows(ld)):
            kinds.add(s)
            np.testing.assert_array_equal(x[row].numpy(), refs[s][w * T: w * T + T].astype(np.int64))
            np.testing.assert_array_equal(y[row].numpy(), refs[s][w * T + 1: w * T + T + 1].astype(np.int64))
    assert kinds == {0, 1, 2}
    bad_at = 7777
    signed[bad_at] = -1
    write_megatron_prefix(tmp_path / "neg", signed)
    srcs[0] = lio.open_dataset(str(tmp_path / "neg"))
    isz = np.dtype(dtype).itemsize
    with pytest.raises(lio.FormatError, match=rf"neg.bin @ offset {bad_at * isz}: token {bad_at} is -1"):
        for x, _ in lio.TokenLoader(srcs, **kw):
            assert int(x.min()) >= 0 and int(x.max()) < 65536


def test_test_helpers_and_pickling_after_batches(data):
    # last_windows is a module function (not an attribute of the loader); the loader still
    # pickles after handing out batches (the last batch, with its pipeline's futures, is not
    # part of its state) and the copy continues the stream.
    ld = lio.TokenLoader([open_src(data, "none"), open_src(data, "zstd")], batch_size=4, seq_len=30, seed=3)
    assert last_windows(ld) == [] and not hasattr(ld, "last_windows")
    it = iter(ld)
    next(it)
    assert len(last_windows(ld)) == 4
    copy = pickle.loads(pickle.dumps(ld))
    assert last_windows(copy) == [] and copy.state_dict() == ld.state_dict()
    x, _ = next(iter(copy))
    assert torch.equal(x, next(it)[0])
    it.close()
    with pytest.raises(TypeError, match="expects a TokenLoader"):
        last_windows(object())
