"""TokenLoader's GPU decode path for rans sources.

The host side (which chunks a group stages, where each payload lands, the kernel's
descriptors, where each window starts in the device token cache) is plain numpy and is
tested here on any machine: the staged bytes are decoded by the kernel's host emulation
(``dataset.rans.emulate``) and windows gathered with the same indices, and must equal the
CPU loader's batches exactly. The loader's own GPU path also runs end to end on the host
through a test hook (``token_loader.emulate_gpu_decode``: emulation instead of the kernel, CPU tensors
instead of device ones). The ``cuda`` tests run the real path and skip without a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmio_native as lio
from llmio_native.dataset import format as F
from llmio_native.dataset import rans
from llmio_native.loader.gpu_decode import gather_windows, place_plain_chunks
from llmio_native.loader.staging import (STAGING_ALIGN, fill_staging, gather_parts, plan_group_staging,
                                         window_starts)
from llmio_native.loader.token_loader import emulate_gpu_decode, planned_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loader import corpus  # noqa: E402


def write(path: Path, docs, codec: str, dtype: str = "uint16", chunk_tokens: int = 1000,
          model_tokens: int = 1 << 20) -> str:
    kw = {"rans_model_tokens": model_tokens} if codec == "rans" else {}
    with lio.DatasetWriter(str(path), dtype=dtype, codec=codec, chunk_tokens=chunk_tokens, shard_tokens=50_000,
                           **kw) as w:
        for d in docs:
            w.add_document(d)
    return str(path)


def mixed_docs(seed: int, dtype=np.uint16) -> list[np.ndarray]:
    """Compressible documents with long uniformly random ones in between: with a model
    group spanning the whole dataset, the uint16 rans dataset stores the
    random chunks raw, so its decode groups mix rans and raw chunks. (uint32 chunks always
    compress: a model's ranks need at most log2(tokens in the group) bits.)"""
    rng = np.random.default_rng(seed)
    docs = corpus(seed, 120, dtype=dtype, vocab=600 if dtype == np.uint16 else 100_000)
    hi = 65536 if dtype == np.uint16 else 1 << 32
    for i in (10, 50, 90):
        docs.insert(i, rng.integers(0, hi, 20_000 if dtype == np.uint16 else 2500, dtype=np.uint64).astype(dtype))
    return docs





@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_path")
    docs = mixed_docs(0)
    docs32 = mixed_docs(1, np.uint32)
    out = {"tokens": np.concatenate(docs), "tokens32": np.concatenate(docs32)}
    out["rans"] = write(d / "rans", docs, "rans")
    out["rans32"] = write(d / "rans32", docs32, "rans", dtype="uint32", chunk_tokens=777, model_tokens=20_000)
    out["none"] = write(d / "none", docs, "none")
    out["zstd"] = write(d / "zstd", docs, "zstd")
    return out


def test_datasets_hold_rans_and_raw_chunks(data):
    codecs = set(lio.open_dataset(data["rans"]).chunks["codec"].tolist())
    assert codecs == {F.CODEC_NONE, F.CODEC_RANS}, codecs
    assert len(set(lio.open_dataset(data["rans32"]).chunks["model"].tolist())) > 1  # several models


def test_staging_layout(data):
    ds = lio.open_dataset(data["rans"])
    raw = np.flatnonzero(ds.chunks["codec"] == F.CODEC_NONE)[:2].tolist()
    chunks = [7, 3, 4, 5, 12, 13, 3] + raw
    st = plan_group_staging(ds, chunks)
    assert st.chunks.tolist() == sorted(set(chunks))
    assert st.gpu.tolist() == (ds.chunks["codec"][st.chunks] == F.CODEC_RANS).tolist()
    assert st.gpu.any() and not st.gpu.all()
    assert (st.src_offsets % STAGING_ALIGN == 0).all()
    ends = st.src_offsets + st.src_bytes
    order = np.argsort(st.src_offsets)
    assert (ends[order][:-1] <= st.src_offsets[order][1:]).all() and int(ends.max()) <= st.staging_bytes
    # chunks read in place lie where they lie in the file, modulo 4096, inside one aligned read
    offs = ds.chunks["offset"][st.chunks].astype(np.int64)
    assert st.in_place.tolist() == (st.gpu | (st.codecs == F.CODEC_NONE)).tolist()
    assert ((st.src_offsets - offs)[st.in_place] % 4096 == 0).all()
    for k in np.flatnonzero(st.in_place).tolist():
        f, o = int(ds.chunks["file"][st.chunks[k]]), int(offs[k])
        assert sum(rf == f and a0 <= o and o + int(st.stored_bytes[k]) <= a1
                   and at + o - a0 == int(st.src_offsets[k]) for rf, a0, a1, at in st.runs) == 1
    assert all(a0 % 4096 == 0 and at % 4096 == 0 for _, a0, _, at in st.runs)
    counts = ds.chunks["token_count"][st.chunks].astype(np.int64)
    assert st.out_offsets.tolist() == np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    assert st.num_tokens == int(counts.sum())
    # Descriptors cover exactly the rans chunks, with their staged places.
    g = np.flatnonzero(st.gpu)
    assert len(st.chunk_desc) == len(g)
    assert st.chunk_desc["src_offset"].tolist() == st.src_offsets[g].tolist()
    assert st.chunk_desc["out_offset"].tolist() == st.out_offsets[g].tolist()
    assert st.chunk_desc["num_tokens"].tolist() == counts[g].tolist()
    assert len(st.block_desc) == int(((counts[g] + rans.BLOCK_SYMBOLS - 1) // rans.BLOCK_SYMBOLS).sum())
    assert all(st.models[st.model_index[k]] is ds.model_of(int(st.chunks[k])) for k in g)
    assert (st.model_index[~st.gpu] == -1).all()


def decode_group_on_host(ds, chunks) -> tuple:
    """What the GPU path does for one group, with the kernel's host emulation."""
    st = plan_group_staging(ds, chunks)
    buf = np.zeros(st.staging_bytes, dtype=np.uint8)
    fill_staging(ds, st, buf, ds.reader.read_batch_into)
    tb = st.token_bytes
    out = np.zeros(st.num_tokens, dtype=f"<u{tb}")
    status = rans.emulate(buf, st.chunk_desc, st.block_desc, st.models, out)
    assert (np.asarray(status) == 0).all()
    place_plain_chunks(st, torch.from_numpy(buf), torch.from_numpy(out.view(f"<i{tb}")))
    return st, out


@pytest.mark.parametrize("kind", ["rans", "rans32"])
def test_group_decode_matches_the_stream(data, kind):
    ds = lio.open_dataset(data[kind])
    tokens = data["tokens" if kind == "rans" else "tokens32"]
    chunks = list(range(0, len(ds.chunks), 3)) + [1, 2]
    st, out = decode_group_on_host(ds, chunks)
    for k, ci in enumerate(st.chunks.tolist()):
        f, n = int(ds.chunks["first_token"][ci]), int(ds.chunks["token_count"][ci])
        o = int(st.out_offsets[k])
        np.testing.assert_array_equal(out[o:o + n], tokens[f:f + n])


@pytest.mark.parametrize("kind", ["rans", "rans32"])
@pytest.mark.parametrize("resume", [False, True])
def test_planned_gathers_equal_cpu_batches(data, kind, resume):
    # The planning functions alone, driven by the CPU loader's own batch plan: per group the
    # staged bytes are decoded by the emulation, windows gathered with numpy at
    # window_starts; the batches must equal the CPU loader's.
    ds = lio.open_dataset(data[kind])
    T, B = 45, 7
    kw = dict(batch_size=B, seq_len=T, seed=4, span_chunks=3, group_spans=2)
    ld = lio.TokenLoader(ds, **kw)
    it = iter(ld)
    if resume:
        for _ in range(11):
            next(it)
        sd = ld.state_dict()
        it.close()
        ld = lio.TokenLoader(ds, **kw)
        ld.load_state_dict(sd)
        it = iter(ld)
    plan = ld.plans[0]
    pos, counts = ld.position, ld.state_dict()["counts"]
    batches = planned_batches(ld, pos, counts)
    groups: dict = {}
    for _ in range(40):
        x, y = next(it)
        b = next(batches)
        keys, starts = [], np.empty(B, dtype=np.int64)
        for row in range(B):
            epoch, j = divmod(int(b.local[row]), plan.n)
            key = (epoch, plan.group_of(epoch, j))
            if key not in groups:
                groups[key] = decode_group_on_host(ds, plan.group_chunks(*key))
            keys.append(key)
            starts[row] = window_starts(plan, groups[key][0], b.windows[row:row + 1])[0]
        stage = np.empty((B, T + 1), dtype=np.int64)
        for key, rows, st in gather_parts(keys, starts):
            out = groups[key][1]
            stage[rows] = out[st[:, None] + np.arange(T + 1)]
        np.testing.assert_array_equal(stage[:, :-1], x.numpy())
        np.testing.assert_array_equal(stage[:, 1:], y.numpy())
    it.close()


def test_window_starts_refuses_windows_outside_the_group(data):
    ds = lio.open_dataset(data["rans"])
    ld = lio.TokenLoader(ds, batch_size=2, seq_len=40)
    st = plan_group_staging(ds, [0, 1])
    assert window_starts(ld.plans[0], st, [0, 1]).tolist() == [0, 40]
    with pytest.raises(RuntimeError, match="outside its decode group"):
        window_starts(ld.plans[0], st, [49])  # tokens 1960..2000 reach chunk 2


def test_gather_windows_unsigned():
    toks = np.array([0, 1, 65535, 32768, 7, 40000], dtype=np.uint16)
    w = gather_windows(torch.from_numpy(toks.view(np.int16)), torch.tensor([0, 2]), torch.arange(3))
    assert w.dtype == torch.int64 and w.tolist() == [[0, 1, 65535], [65535, 32768, 7]]
    t32 = np.array([4294967295, 2147483648, 5], dtype=np.uint32)
    w = gather_windows(torch.from_numpy(t32.view(np.int32)), torch.tensor([1, 0]), torch.arange(2))
    assert w.tolist() == [[2147483648, 5], [4294967295, 2147483648]]


def emulated(src, **kw) -> lio.TokenLoader:
    return emulate_gpu_decode(lio.TokenLoader(src, **kw))


def batches(ld, n=None):
    it = iter(ld)
    out = []
    for x, y in it:
        out.append((x.cpu().clone(), y.cpu().clone()))
        if n is not None and len(out) == n:
            break
    it.close()
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


@pytest.mark.parametrize("kind", ["rans", "rans32", "mix"])
def test_emulated_pipeline_equals_cpu_loader(data, kind):
    if kind == "mix":  # a rans source decoded on the "device" with raw and host-decoded rows
        src = [lio.open_dataset(data["rans"]), lio.open_dataset(data["none"]), lio.open_dataset(data["zstd"]),
               lio.open_dataset(data["rans32"])]
        kw = dict(weights=[0.4, 0.2, 0.2, 0.2])
    else:
        src = lio.open_dataset(data[kind])
        kw = {}
    kw.update(batch_size=6, seq_len=70, seed=9, steps=80, span_chunks=4, group_spans=3)
    cpu = batches(lio.TokenLoader(src, **kw))
    ld = emulated(src, **kw)
    assert same(batches(ld), cpu)
    st = ld.stats()
    assert st["gpu_decode_bytes"] > 0 and st["h2d_bytes"] > 0 and st["decoded_bytes"] >= 0


def test_emulated_pipeline_resumes_exactly(data):
    src = lio.open_dataset(data["rans"])
    kw = dict(batch_size=5, seq_len=60, seed=2, span_chunks=4, group_spans=2)
    ref = batches(lio.TokenLoader(src, **kw), 50)
    for stop in (1, 17, 33):
        a = emulated(src, **kw)
        it = iter(a)
        for _ in range(stop):
            next(it)
        sd = a.state_dict()
        it.close()
        b = emulated(src, **kw)
        b.load_state_dict(sd)
        assert same(batches(b, 50 - stop), ref[stop:]), stop
    # and a rewind while iterating
    c = emulated(src, **kw)
    it = iter(c)
    for _ in range(5):
        next(it)
    sd = c.state_dict()
    for _ in range(6):
        next(it)
    c.load_state_dict(sd)
    got = [next(it)[0] for _ in range(10)]
    it.close()
    assert all(torch.equal(g, r[0]) for g, r in zip(got, ref[5:15]))


def corrupt_rans_chunk(path: str, ci: int | None = None) -> tuple:
    """Zero the first lane state of a rans chunk on disk and fix up its checksum in the
    opened dataset's chunk table, so only the decoder can notice."""
    ds = lio.open_dataset(path)
    if ci is None:
        ci = int(np.flatnonzero(ds.chunks["codec"] == F.CODEC_RANS)[5])
    c = ds.chunks[ci]
    shard, off, n = ds.paths[int(c["file"])], int(c["offset"]), int(c["stored_bytes"])
    with open(shard, "r+b") as f:
        f.seek(off)
        payload = bytearray(f.read(n))
        nb = int(np.frombuffer(payload[8:12], "<u4")[0])
        payload[16 + 4 * nb:16 + 4 * nb + 4] = bytes(4)  # state 0 < L: kBadState
        f.seek(off)
        f.write(payload)
    ds.chunks["checksum"][ci] = F.checksum(bytes(payload))
    return ds, ci, shard


def test_emulated_corrupt_chunk_raises_format_error(data, tmp_path):
    path = write(tmp_path / "bad", mixed_docs(0), "rans")
    ds, ci, shard = corrupt_rans_chunk(path)
    local = ds.chunk_origin(ci)["chunk"]
    with pytest.raises(lio.FormatError, match=rf"chunk {local} .*rans decode failed on the GPU: invalid initial state") \
            as ei:
        for _ in emulated(ds, batch_size=8, seq_len=30, seed=3, span_chunks=4, group_spans=2):
            pass
    assert ei.value.path == shard and ei.value.chunk == local
    assert not isinstance(ei.value, lio.ChecksumError)
    with pytest.raises(lio.FormatError):  # and the CPU loader agrees the chunk is bad
        for _ in lio.TokenLoader(ds, batch_size=8, seq_len=30, seed=3, span_chunks=4, group_spans=2):
            pass


def test_emulated_checksum_error_still_raised(data, tmp_path):
    path = write(tmp_path / "bad", mixed_docs(0), "rans")
    ds = lio.open_dataset(path)
    ci = int(np.flatnonzero(ds.chunks["codec"] == F.CODEC_RANS)[2])
    ds.chunks["checksum"][ci] ^= 1
    with pytest.raises(lio.ChecksumError, match=rf"chunk {ds.chunk_origin(ci)['chunk']} .*checksum mismatch"):
        for _ in emulated(ds, batch_size=8, seq_len=30, seed=1):
            pass


# ----------------------------------------------------------------------------- on a GPU
def need_gpu():
    from llmio_native import _cuda

    if not torch.cuda.is_available() or _cuda is None:
        pytest.skip("needs a CUDA GPU and llmio_native._cuda")


def cuda_batches(ld, n=None):
    stream = torch.cuda.Stream()  # a non-default current stream: the loader orders against it
    out = []
    with torch.cuda.stream(stream):
        it = iter(ld)
        for x, y in it:
            assert x.is_cuda and x.dtype == torch.int64 and y.shape == x.shape
            out.append((x * 1, y * 1))  # consumed on the current stream right away
            if n is not None and len(out) == n:
                break
        it.close()
    torch.cuda.synchronize()
    return [(x.cpu(), y.cpu()) for x, y in out]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["none", "rans", "rans32", "mix"])
def test_cuda_loader_equals_cpu_loader(data, kind):
    need_gpu()
    if kind == "mix":
        src = [lio.open_dataset(data["rans"]), lio.open_dataset(data["none"]), lio.open_dataset(data["rans32"])]
        kw = dict(weights=[0.5, 0.25, 0.25])
    else:
        src = lio.open_dataset(data[kind])
        kw = {}
    kw.update(batch_size=8, seq_len=64, seed=1, steps=60, span_chunks=4, group_spans=3)
    cpu = batches(lio.TokenLoader(src, **kw))
    ld = lio.TokenLoader(src, device="cuda", **kw)
    assert same(cuda_batches(ld), cpu)
    st = ld.stats()
    if kind != "none":
        assert st["gpu_decode_bytes"] > 0 and st["decoded_bytes"] == 0  # no host decode
    assert st["h2d_bytes"] > 0 and st["h2d_gbps"] > 0
    ref = lio.TokenLoader(src, **kw)
    list(ref)
    assert ld.state_dict() == ref.state_dict()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["none", "rans"])
def test_cuda_loader_resumes_like_cpu(data, kind):
    need_gpu()
    src = lio.open_dataset(data[kind])
    kw = dict(batch_size=5, seq_len=60, seed=2, span_chunks=4, group_spans=2)
    ref = batches(lio.TokenLoader(src, **kw), 40)
    a = lio.TokenLoader(src, device="cuda", **kw)
    assert same(cuda_batches(a, 13), ref[:13])
    b = lio.TokenLoader(src, device="cuda", **kw)
    b.load_state_dict(a.state_dict())
    assert same(cuda_batches(b, 27), ref[13:])


@pytest.mark.cuda
def test_cuda_corrupt_rans_chunk_raises_format_error(data, tmp_path):
    need_gpu()
    path = write(tmp_path / "bad", mixed_docs(0), "rans")
    ds, ci, shard = corrupt_rans_chunk(path)
    local = ds.chunk_origin(ci)["chunk"]
    ld = lio.TokenLoader(ds, batch_size=8, seq_len=30, seed=3, device="cuda", span_chunks=4, group_spans=2)
    with pytest.raises(lio.FormatError, match=rf"chunk {local} .*rans decode failed on the GPU") as ei:
        cuda_batches(ld)
    assert ei.value.path == shard and ei.value.chunk == local
