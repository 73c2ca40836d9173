"""safetensors through the native engine: bit-exact interop both ways with the ``safetensors``
library for every dtype, zero-size and scalar tensors and ``__metadata__``; the 4 KiB-aligned
data region; io modes; ownership of returned tensors; safe_open/get_slice against the library's
own answers; load_into; sharded saves as Hugging Face lays them out; several ranks reading each
byte once; every kind of bad input refused with an error naming the file and the tensor; a
seeded fuzz of the header parser.

The oracle is the ``safetensors`` library itself (and ``huggingface_hub`` for shard layout).
"""
from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import llmio_native
from llmio_native import checkpoint as ck
from llmio_native.checkpoint import header as hdr
from llmio_native.checkpoint.header import SafetensorsError
from llmio_native.errors import FormatError

st = pytest.importorskip("safetensors")
from safetensors import safe_open as st_open  # noqa: E402
from safetensors.torch import load_file as st_load  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20

# Every dtype the safetensors library maps to torch (in this torch); F4 counts 4-bit elements.
TORCH_DTYPES = [getattr(torch, d.torch_name) for d in hdr.DTYPES.values()
                if d.torch_name and getattr(torch, d.torch_name, None) is not None]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random *bytes* viewed as ``dtype`` (NaN payloads, denormals, every bit pattern; bool
    limited to 0/1 as torch requires)."""
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype != torch.float4_e2m1fn_x2 else 1
    n = int(np.prod(shape)) * itemsize
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dtype == torch.bool:
        raw &= 1
    t = torch.from_numpy(raw.copy())
    return t.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def zoo(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype in several shapes: odd sizes, a scalar, zero-size ones, big enough to span
    several 4 KiB blocks."""
    out = {}
    for k, dt in enumerate(TORCH_DTYPES):
        name = str(dt).split(".")[-1]
        shapes = [(3, 5), (), (0,), (2, 0, 3), (1031,), (17, 263)]
        for j, shape in enumerate(shapes):
            if dt == torch.float4_e2m1fn_x2 and shape == ():
                continue  # F4 needs a last dimension (two elements per byte)
            out[f"{name}.{j}"] = random_tensor(dt, shape, seed * 1000 + k * 10 + j)
    return out


def evict(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def header_of(path: str | os.PathLike) -> tuple[int, dict]:
    b = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return n, json.loads(b[8:8 + n])


def write_raw(path: Path, header: bytes | dict, data: bytes = b"", n: int | None = None) -> Path:
    """A hand-made file: 8-byte length (``n`` or the header's length), header, data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


# ---------------------------------------------------------------------------------------------
# interop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("io_mode", ["direct", "buffered", "auto"])
def test_files_written_by_safetensors_load_bit_exactly(tmp_path, io_mode):
    sd = zoo(1)
    p = tmp_path / "lib.safetensors"
    st_save(sd, str(p), metadata={"format": "pt", "note": "ünïcode"})
    got = ck.load_file(p, io_mode=io_mode)
    assert set(got) == set(st_load(str(p)))
    for k, v in sd.items():
        assert same_bits(got[k], v), k
    with ck.safe_open(p, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}


def test_files_we_write_load_bit_exactly_in_safetensors(tmp_path):
    sd = zoo(2)
    p = tmp_path / "ours.safetensors"
    ck.save_file(sd, p, metadata={"step": "7"})
    got = st_load(str(p))
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert same_bits(got[k], v), k
    with st_open(str(p), "pt") as f:
        assert f.metadata() == {"step": "7"}
    back = ck.load_file(p, io_mode="direct")
    assert all(same_bits(back[k], v) for k, v in sd.items())


@pytest.mark.parametrize("seed", range(12))
def test_random_state_dicts_round_trip_both_ways(tmp_path, seed):
    """Seeded random dicts: odd names (unicode, quotes, empty, slashes), random dtypes and
    shapes; ours -> library, library -> ours, and ours -> ours with random key subsets."""
    rng = random.Random(seed)
    names = ["", "ü/ß.weight", 'quo"te', "back\\slash", "a" * 300, "__meta", "x.0", "x.1", "emoji 🚀"]
    sd = {}
    for i in range(rng.randint(1, 12)):
        dt = rng.choice(TORCH_DTYPES)
        nd = rng.randint(0 if dt != torch.float4_e2m1fn_x2 else 1, 3)
        shape = tuple(rng.choice([0, 1, 2, 3, 7, 64, 513]) for _ in range(nd))
        name = names[i] if i < len(names) and rng.random() < 0.5 else f"t{i}"
        sd[name] = random_tensor(dt, shape, seed * 100 + i)
    a, b = tmp_path / "ours.safetensors", tmp_path / "lib.safetensors"
    ck.save_file(sd, a, metadata={"seed": str(seed), "ü": "ß"})
    st_save(sd, str(b), metadata={"seed": str(seed)})
    lib_of_ours = st_load(str(a))
    for mode in ("direct", "buffered"):
        ours_of_lib, ours_of_ours = ck.load_file(b, io_mode=mode), ck.load_file(a, io_mode=mode)
        for k, v in sd.items():
            assert same_bits(lib_of_ours[k], v) and same_bits(ours_of_lib[k], v) and same_bits(ours_of_ours[k], v), k
    sub = rng.sample(sorted(sd), rng.randint(1, len(sd)))
    got = ck.load_file(a, keys=sub)
    assert list(got) == sub and all(same_bits(got[k], sd[k]) for k in sub)


def test_every_safetensors_dtype_name_is_in_the_table():
    import safetensors.torch as stt

    assert set(stt._TYPES) <= set(hdr.DTYPES)
    for name, dt in stt._TYPES.items():
        assert hdr.DTYPES[name].torch_name == str(dt).split(".")[-1], name


def test_data_region_is_4k_aligned_and_header_padded_with_spaces(tmp_path):
    for k, sd in enumerate([{}, {"a": torch.zeros(3)}, zoo(3)]):
        p = tmp_path / f"{k}.safetensors"
        ck.save_file(sd, p, metadata={"m": "x" * 5000} if k == 2 else None)
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 4096 == 0
        text = raw[8:8 + n]
        assert text.rstrip(b" ").endswith(b"}") and len(text) - len(text.rstrip(b" ")) < 4096
        h = hdr.read_header(p)
        assert h.data_start % 4096 == 0 and h.file_size == 8 + n + sum(t.nbytes for t in h.tensors.values())


def test_tensors_sorted_by_element_size_so_each_is_aligned(tmp_path):
    sd = {"b": torch.zeros(3, dtype=torch.int8), "a": torch.zeros(5, dtype=torch.float64),
          "c": torch.zeros(7, dtype=torch.bfloat16), "d": torch.zeros(1, dtype=torch.float32)}
    p = tmp_path / "x.safetensors"
    ck.save_file(sd, p)
    h = hdr.read_header(p)
    assert list(h.tensors) == ["a", "d", "c", "b"]
    for t in h.tensors.values():
        assert (h.data_start + t.begin) % (hdr.DTYPES[t.dtype].bits // 8) == 0


def test_noncontiguous_and_sliced_inputs_are_saved_by_value(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {"t": base.t(), "s": base[2:4], "step": base[:, ::3]}
    p = tmp_path / "v.safetensors"
    ck.save_file(sd, p)
    got = st_load(str(p))
    for k, v in sd.items():
        assert torch.equal(got[k], v.contiguous()), k


# ---------------------------------------------------------------------------------------------
# reads: modes, ownership, keys, dtype
# ---------------------------------------------------------------------------------------------
def test_io_mode_auto_probes_the_page_cache(tmp_path):
    sd = {"w": random_tensor(torch.float32, (512, 300), 5)}
    p = tmp_path / "w.safetensors"
    ck.save_file(sd, p)
    with open(p, "rb") as f:
        f.read()  # now cached
    s1: dict = {}
    ck.load_file(p, io_mode="auto", stats=s1)
    assert s1["io_direct"] is False and s1["bytes_buffered"] >= sd["w"].numel() * 4
    evict(p)
    s2: dict = {}
    got = ck.load_file(p, io_mode="auto", stats=s2)
    assert same_bits(got["w"], sd["w"])
    if not s2["direct_active"][0]:
        pytest.skip("file system refused O_DIRECT")
    assert s2["io_direct"] is True and s2["bytes_direct"] >= sd["w"].numel() * 4


def test_direct_reads_land_in_final_memory_without_bounce_except_at_eof(tmp_path):
    sd = {f"t{i}": random_tensor(torch.bfloat16, (257, 129 + i), i) for i in range(12)}
    p = tmp_path / "x.safetensors"
    ck.save_file(sd, p)
    s: dict = {}
    got = ck.load_file(p, io_mode="direct", stats=s)
    if not s["direct_active"][0]:
        pytest.skip("file system refused O_DIRECT")
    assert all(same_bits(got[k], v) for k, v in sd.items())
    h = hdr.read_header(p)
    data = h.file_size - h.data_start
    # every byte once, plus at most the shared boundary blocks of neighbours
    assert data <= s["bytes"] <= data + 2 * 4096 * len(sd)
    # only requests that end in the file's last, partial block go through a bounce buffer
    assert s["bounce_bytes"] <= 4096 * len(sd) and s["bounce_ops"] <= len(sd)
    assert s["bytes_direct"] >= data - 4096 * len(sd)


def test_returned_tensors_are_owned_and_independent(tmp_path):
    sd = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(10, 20, dtype=torch.float32)}
    p = tmp_path / "o.safetensors"
    ck.save_file(sd, p)
    for mode in ("direct", "buffered"):
        got = ck.load_file(p, io_mode=mode)
        assert got["a"].untyped_storage().data_ptr() != got["b"].untyped_storage().data_ptr()
        got["a"].fill_(-1)
        assert torch.equal(got["b"], sd["b"])
    with ck.safe_open(p, "pt") as f:
        t1, t2 = f.get_tensor("a"), f.get_tensor("a")
    t1.zero_()
    assert torch.equal(t2, sd["a"])  # no buffer reuse, valid after close()
    os.unlink(p)
    assert torch.equal(t2 + 0, sd["a"])  # no mmap behind it


def test_keys_subset_and_missing_key(tmp_path):
    sd = zoo(4)
    p = tmp_path / "k.safetensors"
    st_save(sd, str(p))
    want = ["float32.0", "bfloat16.4", "int64.1"]
    s: dict = {}
    got = ck.load_file(p, keys=want, stats=s)
    assert list(got) == want and all(same_bits(got[k], sd[k]) for k in want)
    assert s["bytes"] < 3 * 3 * 4096 + 4096  # only those tensors' blocks were read
    with pytest.raises(SafetensorsError, match=r"k\.safetensors.*'nope'") as ei:
        ck.load_file(p, keys=["float32.0", "nope"])
    assert ei.value.tensor == "nope"


def test_dtype_converts_floating_tensors_only(tmp_path):
    sd = {"w": torch.randn(4, 4), "i": torch.arange(5), "h": torch.randn(3).half()}
    p = tmp_path / "d.safetensors"
    ck.save_file(sd, p)
    got = ck.load_file(p, dtype=torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and got["h"].dtype == torch.bfloat16 and got["i"].dtype == torch.int64
    assert torch.equal(got["w"], sd["w"].bfloat16()) and torch.equal(got["i"], sd["i"])


def test_threads_and_uring_backends_agree(tmp_path):
    from conftest import IO_URING_USABLE

    sd = zoo(6)
    p = tmp_path / "b.safetensors"
    ck.save_file(sd, p)
    for backend in ["threads"] + (["io_uring"] if IO_URING_USABLE else []):
        got = ck.load_file(p, backend=backend, io_mode="direct")
        assert all(same_bits(got[k], v) for k, v in sd.items()), backend


# ---------------------------------------------------------------------------------------------
# safe_open
# ---------------------------------------------------------------------------------------------
SLICES = [
    (slice(None),), (slice(2, 9),), (slice(-5, None),), (3,), (-1,), (slice(1, 17, 4),),
    (slice(2, 5), slice(3, 40)), (0, slice(10, 20)), (slice(0, 0),), (slice(3, 6), 7), (Ellipsis, 3),
    (slice(4, 2),),
]


def test_safe_open_matches_the_library(tmp_path):
    sd = {"w": random_tensor(torch.float32, (23, 57), 1), "b": random_tensor(torch.bfloat16, (23, 57), 2),
          "s": torch.tensor(2.5), "e": torch.zeros(0, 3), "v": random_tensor(torch.int16, (41,), 3)}
    p = tmp_path / "s.safetensors"
    st_save(sd, str(p), metadata={"a": "b"})
    with ck.safe_open(p, framework="pt", device="cpu") as ours, st_open(str(p), "pt") as lib:
        assert ours.keys() == sorted(lib.keys()) and ours.metadata() == lib.metadata()
        assert ours.offset_keys() == lib.offset_keys()
        for k in sd:
            assert same_bits(ours.get_tensor(k), lib.get_tensor(k)), k
            a, b = ours.get_slice(k), lib.get_slice(k)
            assert a.get_shape() == b.get_shape() and a.get_dtype() == b.get_dtype()
        for k in ("w", "b"):
            a, b = ours.get_slice(k), lib.get_slice(k)
            for idx in SLICES:
                want = sd[k][idx if len(idx) > 1 else idx[0]]
                got = a[idx if len(idx) > 1 else idx[0]]
                assert same_bits(got, want.contiguous()), (k, idx)
                if not any(isinstance(i, slice) and i.step not in (None, 1) for i in idx):
                    assert same_bits(got, b[idx if len(idx) > 1 else idx[0]]), (k, idx)
        v = ours.get_slice("v")
        assert same_bits(v[5:9], sd["v"][5:9]) and len(v) == 41


def test_get_slice_reads_only_the_rows_it_needs(tmp_path):
    w = random_tensor(torch.float32, (4096, 256), 9)  # 1 KiB rows, 4 MiB
    p = tmp_path / "r.safetensors"
    ck.save_file({"w": w}, p)
    f = ck.safe_open(p, "pt", io_mode="direct")
    got = f.get_slice("w")[100:110, 5:7]
    assert same_bits(got, w[100:110, 5:7].contiguous())
    assert f._get_reader().stats()["bytes"] <= 10 * 1024 + 2 * 4096
    with pytest.raises(IndexError, match="out of range"):
        f.get_slice("w")[5000]
    f.close()


def test_safe_open_rejects_other_frameworks_and_missing_tensors(tmp_path):
    p = tmp_path / "f.safetensors"
    ck.save_file({"a": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match="framework"):
        ck.safe_open(p, framework="flax")
    with ck.safe_open(p, "pt") as f, pytest.raises(SafetensorsError, match=r"f\.safetensors.*'b'"):
        f.get_tensor("b")


# ---------------------------------------------------------------------------------------------
# load_into
# ---------------------------------------------------------------------------------------------
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 33))
    m.register_buffer("steps", torch.tensor(0, dtype=torch.int64))
    return m


def test_load_into_module_writes_parameters_in_place(tmp_path):
    src = tiny_model()
    with torch.no_grad():
        for q in src.parameters():
            q.uniform_(-3, 3)
        src.steps.fill_(41)
    p = tmp_path / "m.safetensors"
    ck.save_file(src.state_dict(), p)
    dst = tiny_model()
    ptrs = {n: t.data_ptr() for n, t in dst.state_dict().items()}
    res = ck.load_into(dst, p)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for n, t in dst.state_dict().items():
        assert t.data_ptr() == ptrs[n], n  # the same memory, written in place
        assert torch.equal(t, src.state_dict()[n]), n
    assert all(q.requires_grad for q in dst.parameters())


def test_load_into_state_dict_with_conversion_and_noncontiguous_targets(tmp_path):
    sd = {"a": torch.randn(8, 6).bfloat16(), "b": torch.randn(6, 8), "c": torch.arange(7, dtype=torch.int32)}
    p = tmp_path / "c.safetensors"
    ck.save_file(sd, p)
    tgt = {"a": torch.zeros(8, 6), "b": torch.zeros(8, 6).t(), "c": torch.zeros(7, dtype=torch.int32)}
    ck.load_into(tgt, p)
    assert torch.equal(tgt["a"], sd["a"].float()) and torch.equal(tgt["b"], sd["b"]) and torch.equal(tgt["c"], sd["c"])


def test_load_into_strict_and_shape_errors_touch_nothing(tmp_path):
    p = tmp_path / "e.safetensors"
    ck.save_file({"a": torch.ones(3), "b": torch.ones(2, 2), "x": torch.ones(1)}, p)
    tgt = {"a": torch.zeros(3), "b": torch.zeros(2, 2), "y": torch.zeros(1)}
    with pytest.raises(SafetensorsError, match=r"missing.*'y'.*unexpected.*'x'"):
        ck.load_into(tgt, p)
    assert all(float(t.abs().sum()) == 0 for t in tgt.values())
    res = ck.load_into(tgt, p, strict=False)
    assert res.missing_keys == ["y"] and res.unexpected_keys == ["x"]
    assert torch.equal(tgt["a"], torch.ones(3)) and float(tgt["y"].sum()) == 0
    bad = {"a": torch.zeros(3), "b": torch.zeros(4)}
    with pytest.raises(SafetensorsError, match=r"e\.safetensors: tensor 'b': shape \[2, 2\]"):
        ck.load_into(bad, p, strict=False)
    assert float(bad["a"].sum()) == 0  # checked before anything was written
    with pytest.raises(TypeError):
        ck.load_into([torch.zeros(1)], p)


# ---------------------------------------------------------------------------------------------
# I/O faults: the error names the file, nothing partial, the previous checkpoint untouched
# ---------------------------------------------------------------------------------------------
def test_read_error_in_one_shard_names_it_and_returns_nothing(tmp_path, faults):
    import errno

    d = tmp_path / "ck"
    names = ck.save_sharded(gpt_like(), d, max_shard_size=30_000)
    victim = names[1]
    faults(f"eio:{victim}")
    for mode in ("direct", "buffered"):
        with pytest.raises(OSError) as ei:
            ck.load_file(d, io_mode=mode)
        assert ei.value.errno == errno.EIO and victim in str(ei.value), str(ei.value)
    tgt = {k: torch.zeros_like(v) for k, v in gpt_like().items()}
    with pytest.raises(OSError, match=victim):
        ck.load_into(tgt, d)
    faults("")
    assert all(same_bits(v, gpt_like()[k]) for k, v in ck.load_file(d).items())


def test_o_direct_refused_falls_back_to_buffered_reads(tmp_path, faults):
    sd = zoo(14)
    p = tmp_path / "f.safetensors"
    ck.save_file(sd, p)
    faults("direct_open_einval")
    s: dict = {}
    got = ck.load_file(p, io_mode="direct", stats=s)
    assert s["direct_active"] == [False] and all(same_bits(got[k], v) for k, v in sd.items())


def test_load_from_tmpfs(tmp_path):
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        sd = zoo(15)
        p = os.path.join(d, "t.safetensors")
        ck.save_file(sd, p)
        for mode in ("direct", "auto", "buffered"):
            got = ck.load_file(p, io_mode=mode)
            assert all(same_bits(got[k], v) for k, v in sd.items()), mode


@pytest.mark.parametrize("spec", ["write_enospc:5000", "write_eio:0", "write_enospc:20000"])
def test_failed_save_leaves_previous_checkpoint_and_no_staging(tmp_path, faults, spec):
    import errno

    old = gpt_like(seed=1)
    f, d = tmp_path / "m.safetensors", tmp_path / "ck"
    ck.save_file(old, f)
    ck.save_sharded(old, d, max_shard_size=30_000)
    before = sorted(os.listdir(d))
    faults(spec)
    for fn in (lambda: ck.save_file(gpt_like(seed=2), f), lambda: ck.save_sharded(gpt_like(seed=2), d, 30_000)):
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno in (errno.ENOSPC, errno.EIO), ei.value
        assert ".tmp-" in str(ei.value)  # names the staging file it was writing
    faults("")
    assert sorted(os.listdir(tmp_path)) == ["ck", "m.safetensors"] and sorted(os.listdir(d)) == before
    for target in (f, d):
        got = ck.load_file(target)
        assert all(same_bits(got[k], v) for k, v in old.items())


# ---------------------------------------------------------------------------------------------
# sharded saves and directory / index loads
# ---------------------------------------------------------------------------------------------
def gpt_like(n_layer: int = 4, d: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"wte.weight": torch.randn(300, d, generator=g).bfloat16()}
    for i in range(n_layer):
        sd[f"h.{i}.ln.weight"] = torch.randn(d, generator=g)
        sd[f"h.{i}.attn.weight"] = torch.randn(3 * d, d, generator=g).bfloat16()
        sd[f"h.{i}.mlp.weight"] = torch.randn(4 * d, d, generator=g).bfloat16()
    sd["lm_head.weight"] = torch.randn(300, d, generator=g).bfloat16()
    return sd


@pytest.mark.parametrize("limit", [30_000, "40KB", "100KB", 10**9])
def test_save_sharded_lays_out_shards_as_huggingface(tmp_path, limit):
    hub = pytest.importorskip("huggingface_hub")
    sd = gpt_like()
    ours, theirs = tmp_path / "ours", tmp_path / "hub"
    names = ck.save_sharded(sd, ours, max_shard_size=limit)
    theirs.mkdir()
    hub.save_torch_state_dict(sd, theirs, max_shard_size=limit)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert names == sorted(n for n in os.listdir(ours) if n.endswith(".safetensors"))
    if len(names) > 1:
        mine = json.loads((ours / ck.safetensors_io.INDEX_NAME).read_text())
        hubs = json.loads((theirs / ck.safetensors_io.INDEX_NAME).read_text())
        assert mine == hubs
        text = (ours / ck.safetensors_io.INDEX_NAME).read_text()
        assert text == json.dumps(mine, indent=2, sort_keys=True) + "\n"  # transformers' layout
    for n in names:
        with st_open(str(ours / n), "pt") as a, st_open(str(theirs / n), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == {"format": "pt"}
            for k in a.keys():
                assert same_bits(a.get_tensor(k), b.get_tensor(k))
    # loads: the directory, the index, and the library reading each shard
    for target in (ours, ours / ck.safetensors_io.INDEX_NAME if len(names) > 1 else ours / names[0], theirs):
        got = ck.load_file(target)
        assert set(got) == set(sd) and all(same_bits(got[k], v) for k, v in sd.items()), target


def test_parse_size():
    ps = ck.safetensors_io.parse_size
    assert ps("5GB") == 5 * 10**9 and ps("2GiB") == 2 * 2**30 and ps("500MB") == 500 * 10**6
    assert ps("1.5kb") == 1500 and ps(123) == 123 and ps("77") == 77
    for bad in ("", "5 parsecs", "-1GB", 0, True, "GB"):
        with pytest.raises(ValueError):
            ps(bad)


def test_save_sharded_replaces_the_directory_and_carries_other_files(tmp_path):
    d = tmp_path / "ckpt"
    ck.save_sharded(gpt_like(seed=1), d, max_shard_size=20_000)
    (d / "config.json").write_text('{"n_layer": 4}')
    first = sorted(os.listdir(d))
    sd2 = {"only": torch.arange(10.0)}
    assert ck.save_sharded(sd2, d) == ["model.safetensors"]
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # old shards and index gone
    assert (d / "config.json").read_text() == '{"n_layer": 4}'
    assert len(first) > 3
    got = ck.load_file(d)
    assert list(got) == ["only"] and torch.equal(got["only"], sd2["only"])
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt"]  # no staging left beside it


def test_index_with_missing_shard_or_key(tmp_path):
    d = tmp_path / "ck"
    ck.save_sharded(gpt_like(), d, max_shard_size=30_000)
    index = json.loads((d / ck.safetensors_io.INDEX_NAME).read_text())
    shard2 = sorted(set(index["weight_map"].values()))[1]
    victim = next(k for k, v in index["weight_map"].items() if v == shard2)
    os.rename(d / shard2, tmp_path / "aside")
    with pytest.raises(SafetensorsError, match=rf"shard {shard2}.*{victim}.*missing") as ei:
        ck.load_file(d)
    assert ei.value.tensor == victim and ei.value.path.endswith(shard2)
    os.rename(tmp_path / "aside", d / shard2)
    index["weight_map"]["ghost"] = shard2
    (d / ck.safetensors_io.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=rf"{shard2}: tensor 'ghost' named in"):
        ck.load_file(d)
    index["weight_map"]["ghost"] = "../escape.safetensors"
    (d / ck.safetensors_io.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match="not a plain file name"):
        ck.load_file(d)


def test_directory_without_index_and_duplicate_tensors(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    ck.save_file({"a": torch.ones(2)}, d / "one.safetensors")
    ck.save_file({"b": torch.zeros(3)}, d / "two.safetensors")
    (d / ".one.safetensors.tmp-host-1-abcd").write_bytes(b"garbage")  # a killed save's staging
    got = ck.load_file(d)
    assert set(got) == {"a", "b"}
    ck.save_file({"a": torch.ones(1)}, d / "three.safetensors")
    with pytest.raises(SafetensorsError, match="'a' is in both"):
        ck.load_file(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafetensorsError, match="no .safetensors file"):
        ck.load_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        ck.load_file(tmp_path / "nothing.safetensors")


# ---------------------------------------------------------------------------------------------
# bad input: each refused with SafetensorsError naming the file (and the tensor)
# ---------------------------------------------------------------------------------------------
def good_header() -> dict:
    return {"__metadata__": {"k": "v"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I16", "shape": [4], "data_offsets": [24, 32]}}


def bad_cases(tmp: Path) -> list[tuple[str, Path, str, str | None]]:
    """(case, file, regex the message must match, tensor named or None)."""
    g = good_header()
    data = bytes(range(32))
    cases = []

    def case(name, header, payload=data, n=None, match="", tensor=None):
        cases.append((name, write_raw(tmp / f"{name}.safetensors", header, payload, n), match, tensor))

    case("truncated", g, data[:20], match="truncated file", tensor="b")
    case("header_past_end", g, data, n=10_000, match="header length 10000 runs past the end")
    case("header_over_limit", g, data, n=100_000_001, match="exceeds the limit")
    case("malformed_json", b'{"a": {"dtype": "F32",', data, match="malformed header JSON")
    case("not_utf8", b'{"a\xff": 1}', data, match="not valid UTF-8")
    case("not_object", b"[1, 2]", data, match="does not start with")
    case("duplicate_keys", b'{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, '
                           b'"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}', data[:24],
         match="duplicate key 'a'", tensor="a")
    gap = good_header()
    gap["b"]["data_offsets"] = [28, 36]
    case("gap", gap, data + b"1234", match="non-contiguous offsets.*leaves a gap", tensor="b")
    ovl = good_header()
    ovl["b"]["data_offsets"] = [16, 24]
    ovl["a"]["data_offsets"] = [0, 24]
    case("overlap", ovl, data[:24], match="non-contiguous offsets.*overlaps", tensor="b")
    case("trailing_bytes", g, data + b"xx", match="trailing bytes")
    unk = good_header()
    unk["a"]["dtype"] = "F128"
    case("unknown_dtype", unk, match="unknown dtype 'F128'", tensor="a")
    mis = good_header()
    mis["a"]["shape"] = [2, 4]
    case("shape_size_mismatch", mis, match="shape/size mismatch", tensor="a")
    neg = good_header()
    neg["a"]["shape"] = [2, -3]
    case("negative_dim", neg, match="non-negative integers", tensor="a")
    rev = good_header()
    rev["a"]["data_offsets"] = [24, 0]
    case("reversed_offsets", rev, match="begin <= end", tensor="a")
    meta = good_header()
    meta["__metadata__"] = {"k": 3}
    case("metadata_not_str", meta, match="__metadata__ must map strings")
    nod = good_header()
    del nod["b"]["dtype"]
    case("entry_lacks_dtype", nod, match="lacks 'dtype'", tensor="b")
    case("nan_constant", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', b"",
         match="non-standard constant NaN")
    f4 = {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}
    case("half_byte", f4, b"\0\0", match="not a whole number of bytes", tensor="a")
    (tmp / "tiny.safetensors").write_bytes(b"\x05\0\0")
    cases.append(("shorter_than_8", tmp / "tiny.safetensors", "too short for the 8-byte header length", None))
    return cases


def test_bad_input_each_raises_safetensors_error_naming_file_and_tensor(tmp_path):
    cases = bad_cases(tmp_path)
    assert len(cases) >= 19
    for name, path, match, tensor in cases:
        for fn in (lambda: ck.load_file(path), lambda: ck.safe_open(path, "pt"),
                   lambda: ck.load_into({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int16)}, path)):
            with pytest.raises(SafetensorsError) as ei:
                fn()
            msg = str(ei.value)
            assert path.name in msg and ei.value.path == str(path), (name, msg)
            assert __import__("re").search(match, msg), (name, msg)
            if tensor is not None:
                assert repr(tensor) in msg and ei.value.tensor == tensor, (name, msg)
            assert isinstance(ei.value, FormatError) and isinstance(ei.value, ValueError)


def test_library_agrees_those_inputs_are_bad(tmp_path):
    """Every case we refuse, the safetensors library refuses too (except the stricter ones:
    duplicate keys, NaN constants, which it takes silently or differently)."""
    stricter = {"duplicate_keys", "nan_constant"}
    for name, path, _m, _t in bad_cases(tmp_path):
        if name in stricter:
            continue
        with pytest.raises(Exception):
            st_load(str(path))


def test_header_limit_is_configurable(tmp_path):
    p = tmp_path / "big.safetensors"
    ck.save_file({"a": torch.zeros(1)}, p, metadata={"pad": "x" * 20_000})
    n = hdr.read_header(p).header_len
    assert n > 20_000
    with pytest.raises(SafetensorsError, match=f"header length {n} exceeds the limit of 10000"):
        ck.load_file(p, max_header_bytes=10_000)
    assert torch.equal(ck.load_file(p, max_header_bytes=n)["a"], torch.zeros(1))


def test_dtype_torch_lacks_is_refused_at_load_not_parse(tmp_path):
    p = write_raw(tmp_path / "f6.safetensors", {"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]},
                                                "b": {"dtype": "U8", "shape": [1], "data_offsets": [3, 4]}},
                  b"\1\2\3\4")
    with ck.safe_open(p, "pt") as f:
        assert f.keys() == ["a", "b"] and f.get_slice("a").get_dtype() == "F6_E2M3"
        assert torch.equal(f.get_tensor("b"), torch.tensor([4], dtype=torch.uint8))
        with pytest.raises(SafetensorsError, match="'a': dtype F6_E2M3 has no torch dtype"):
            f.get_tensor("a")
    with pytest.raises(SafetensorsError, match="F6_E2M3"):
        ck.load_file(p)
    assert torch.equal(ck.load_file(p, keys=["b"])["b"], torch.tensor([4], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# fuzz: every mutated header parses to a valid layout or raises SafetensorsError
# ---------------------------------------------------------------------------------------------
def check_layout(h: hdr.Header) -> None:
    pos = 0
    for t in h.tensors.values():
        assert t.begin == pos and t.end >= t.begin
        bits = int(np.prod(t.shape, dtype=object)) * hdr.DTYPES[t.dtype].bits
        assert bits == 8 * t.nbytes
        pos = t.end
    assert pos == h.file_size - h.data_start


def seeds() -> list[bytes]:
    out = [json.dumps(good_header()).encode()]
    prefix, _ = hdr.serialise([(f"t{i}", d, [i % 3 + 1, 2], (i % 3 + 1) * 2 * hdr.DTYPES[d].bits // 8)
                               for i, d in enumerate(["F32", "BF16", "U8", "I64", "BOOL", "F8_E5M2"])],
                              {"format": "pt"})
    out.append(prefix[8:])
    out.append(b'{"e": {"dtype": "F16", "shape": [0, 5], "data_offsets": [0, 0]}}')
    out.append(b"{}")
    return out


def mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = bytes([rng.choice(b'{}[]",:0123456789-. eE\\a')])
        elif op == 2 and b:
            del b[i:i + rng.randint(1, 8)]
        elif op == 3:
            b = b[:i]
        elif op == 4:
            tok = rng.choice([b"99999999999999999999", b"-1", b"null", b"true", b"[]", b"{}", b'"F4"', b"1e400",
                              b'"__metadata__"', b"[" * 50, b"\xc3\x28"])
            b[i:i] = tok
        else:
            j = rng.randrange(len(b) + 1)
            b[i:j] = b[j:i] if j < i else b[i:j][::-1]
    return bytes(b)


def test_fuzz_header_parser_seeded_mutations():
    rng = random.Random(1234)
    ok = bad = 0
    for k in range(4000):
        base = rng.choice(seeds())
        m = mutate(rng, base)
        data_len = rng.choice([0, 8, 24, 32, 36, 64, rng.randrange(200)])
        try:
            h = hdr.parse(m, path="fuzz.safetensors", file_size=8 + len(m) + data_len)
        except SafetensorsError as e:
            assert "fuzz.safetensors" in str(e)
            bad += 1
        else:
            check_layout(h)
            ok += 1
    assert bad > 1000 and ok >= 10, (ok, bad)


def test_fuzz_header_parser_hypothesis():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st_

    ints = st_.one_of(st_.integers(-3, 70), st_.just(2**64), st_.booleans(), st_.none())
    entry = st_.fixed_dictionaries({"dtype": st_.sampled_from(list(hdr.DTYPES) + ["X", 5]),
                                    "shape": st_.lists(ints, max_size=3),
                                    "data_offsets": st_.lists(ints, min_size=0, max_size=3)})
    headers = st_.dictionaries(st_.text(max_size=4), st_.one_of(entry, ints, st_.text(max_size=3)), max_size=4)

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(headers, st_.integers(0, 300), st_.integers(0, 3))
    def run(h, data_len, pad):
        raw = json.dumps(h).encode() + b" " * pad
        try:
            out = hdr.parse(raw, path="hyp.safetensors", file_size=8 + len(raw) + data_len)
        except SafetensorsError:
            return
        check_layout(out)

    run()


def test_serialise_refuses_bad_entries():
    with pytest.raises(ValueError, match="reserved or used twice"):
        hdr.serialise([("a", "F32", [1], 4), ("a", "F32", [1], 4)])
    with pytest.raises(ValueError, match="reserved"):
        hdr.serialise([("__metadata__", "F32", [1], 4)])
    with pytest.raises(ValueError, match="needs 8 bytes, got 4"):
        hdr.serialise([("a", "F32", [2], 4)])
    with pytest.raises(ValueError, match="metadata must map str to str"):
        hdr.serialise([], {"a": 1})
    with pytest.raises(ValueError, match="no safetensors equivalent"):
        ck.save_file({"q": torch.zeros(2, dtype=torch.complex128)}, "/nonexistent/x.safetensors")
    with pytest.raises(ValueError, match="only dense tensors"):
        ck.save_file({"q": torch.zeros(2).to_sparse()}, "/nonexistent/x.safetensors")


# ---------------------------------------------------------------------------------------------
# several ranks: each byte read once across the group, the rest broadcast
# ---------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init: str, path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        s: dict = {}
        got = ck.load_file(path, io_mode="direct", rank=rank, world_size=world, stats=s)
        tgt = {k: torch.zeros_like(v) for k, v in got.items()}
        s2: dict = {}
        ck.load_into(tgt, path, process_group=dist.group.WORLD, io_mode="direct", stats=s2)
        torch.save({"got": got, "into": tgt, "bytes": s.get("bytes", 0), "bytes_into": s2.get("bytes", 0)},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_each_byte_once_and_broadcast(tmp_path):
    import socket

    import torch.multiprocessing as mp

    sd = gpt_like(n_layer=6, d=96, seed=3)
    p = tmp_path / "g.safetensors"
    ck.save_file(sd, p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, f"tcp://127.0.0.1:{port}", str(p), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    h = hdr.read_header(p)
    data = h.file_size - h.data_start
    for r in res:
        for k, v in sd.items():
            assert same_bits(r["got"][k], v) and same_bits(r["into"][k], v), k
    for key in ("bytes", "bytes_into"):
        per = [r[key] for r in res]
        assert all(0 < b < 0.75 * data for b in per), (key, per, data)  # both read, neither all
        assert data <= sum(per) <= data + 2 * 4096 * len(sd), (key, per, data)


def test_group_arguments_are_checked(tmp_path):
    p = tmp_path / "g.safetensors"
    ck.save_file({"a": torch.ones(2)}, p)
    with pytest.raises(ValueError, match="not initialised"):
        ck.load_file(p, rank=0, world_size=2)
    with pytest.raises(ValueError, match="not initialised"):
        ck.load_into({"a": torch.zeros(2)}, p, rank=1, world_size=2)


@pytest.mark.parametrize("slot_kib", [12, 20, 64, 1024])
def test_staging_pipeline_arithmetic_on_cpu(tmp_path, slot_kib):
    """The CUDA path's runs and slots (tensors packed into runs, big ones split over several
    slots, aligned supersets, slot reuse) with CPU destinations: bit-exact at every slot size."""
    from llmio_native.checkpoint import safetensors_io as sio

    sd = zoo(12)
    sd["big"] = random_tensor(torch.float32, (300, 129), 13)  # 151 KiB: split at small slots
    p = tmp_path / "pipe.safetensors"
    ck.save_file(sd, p)
    src = sio._open_source(p, hdr.MAX_HEADER_BYTES)
    for mode in ("direct", "buffered"):
        reader, _ = sio._make_reader(src, mode, "auto")
        dst = {k: torch.empty_like(v) for k, v in sd.items()}
        pipe = sio._Pipeline(torch.device("cpu"), slot_bytes=slot_kib * 1024, num_slots=2)
        runs = list(sio._runs_for(src, reader, list(dst.items()), pipe.slot_bytes))
        assert all(sum(n for _, n, _ in parts) <= pipe.slot_bytes for _, _, parts in runs)
        if slot_kib <= 64:
            assert len(runs) > 3  # the big tensor and the packing were really split
        pipe.run(reader, iter(runs))
        for k, v in sd.items():
            assert same_bits(dst[k], v), (slot_kib, mode, k)
    with pytest.raises(ValueError, match="smaller than two alignment blocks"):
        list(sio._runs_for(src, reader, list(dst.items()), 4096))


# ---------------------------------------------------------------------------------------------
# CUDA (run where a GPU is lent)
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_load_file_to_cuda_through_pinned_staging(tmp_path, monkeypatch):
    sd = zoo(8)
    sd["big"] = random_tensor(torch.bfloat16, (3000, 1500), 11)  # 9 MB: several slots when slots are small
    p = tmp_path / "c.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setattr(ck.safetensors_io, "_SLOT_BYTES", 2 << 20)
    for mode in ("direct", "buffered"):
        got = ck.load_file(p, device="cuda", io_mode=mode)
        for k, v in sd.items():
            assert got[k].device.type == "cuda" and same_bits(got[k].cpu(), v), (mode, k)


@pytest.mark.cuda
@cuda
def test_load_into_cuda_module_and_safe_open_on_cuda(tmp_path, monkeypatch):
    src = tiny_model()
    with torch.no_grad():
        for q in src.parameters():
            q.normal_()
    p = tmp_path / "m.safetensors"
    ck.save_file(src.state_dict(), p)
    monkeypatch.setattr(ck.safetensors_io, "_SLOT_BYTES", 1 << 20)
    dst = tiny_model().cuda()
    ptrs = {n: t.data_ptr() for n, t in dst.state_dict().items()}
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # a non-default current stream
        ck.load_into(dst, p)
        for n, t in dst.state_dict().items():
            assert t.data_ptr() == ptrs[n] and torch.equal(t.cpu(), src.state_dict()[n]), n
    with ck.safe_open(p, "pt", device="cuda") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            assert t.is_cuda and torch.equal(t.cpu(), src.state_dict()[k])


# ---------------------------------------------------------------------------------------------
# the benchmark script runs at a tiny size (so it does not rot)
# ---------------------------------------------------------------------------------------------
def test_bench_checkpoint_smoke(tmp_path):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_checkpoint.py"
    env = dict(os.environ, PYTHONPATH=str(Path(llmio_native.__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(bench), "--size", "24MiB", "--dir", str(tmp_path), "--shards", "4",
                          "--json", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads((tmp_path / "c.json").read_text())
    rows = {(r["section"], r["name"]) for r in res["rows"]}
    for key in [("save", "llmio save_file"), ("save", "safetensors save_file + fsync"), ("save", "torch.save + fsync"),
                ("load", "llmio load_file"), ("load", "safetensors load_file + touch"),
                ("load", "torch.load(mmap=True) + touch"), ("save", "llmio save_sharded x4"),
                ("save", "safetensors save_file x4 + fsync")]:
        assert key in rows, (key, sorted(rows))
    assert any(s == "load" and n.startswith("limit") for s, n in rows)
    assert all(r["gbps"] > 0 and r["seconds"] > 0 for r in res["rows"])
    assert res["state_dict_bytes"] > 20 * MIB and res["cuda_run"] == torch.cuda.is_available()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bench_ckpt")] == []  # cleaned up
    for alloc, pop in (("torch", "off"), ("plain", "off"), ("plain", "on"), ("hugepage", "off"), ("hugepage", "on"),
                       ("adaptive", "on")):
        assert ("load", f"llmio load_file alloc={alloc} populate={pop}") in rows
    assert ("load", "memory: first touch, MADV_HUGEPAGE mapping") in rows
    assert ("load", "read into touched 4KiB pages") in rows
    import importlib.util

    for peer, mod in (("runai-model-streamer + clone", "runai_model_streamer"),
                      ("fastsafetensors nogds cpu + clone", "fastsafetensors")):
        if importlib.util.find_spec(mod) is not None:
            assert ("load", peer) in rows
        else:  # absent: said so, with the import error
            assert f"{peer}: not run (ModuleNotFoundError" in out.stdout
    # --load-only: no save rows; --repeat keeps one (the best) row per name
    out = subprocess.run([sys.executable, str(bench), "--size", "24MiB", "--dir", str(tmp_path), "--load-only",
                          "--no-dcp", "--repeat", "2", "--settle", "0.01", "--json", str(tmp_path / "l.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads((tmp_path / "l.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert all(r["section"] == "load" for r in res["rows"]) and len(names) == len(set(names))
    assert "llmio load_file alloc=hugepage populate=on" in names and sum(n.startswith("limit") for n in names) == 1


# ---------------------------------------------------------------------------------------------
# fresh memory: per-tensor anonymous mappings (huge pages), pre-faulting, release, fallbacks
# ---------------------------------------------------------------------------------------------
from llmio_native.checkpoint import safetensors_io as sio  # noqa: E402


def mappings() -> list[tuple[int, int, str]]:
    """(start, end, VmFlags) of every mapping of this process (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = head.split("-")
                cur = [int(a, 16), int(b, 16), ""]
                out.append(cur)
            elif head == "VmFlags:" and cur is not None:
                cur[2] = line.split(":", 1)[1]
    return [tuple(m) for m in out]


def mapping_of(addr: int) -> tuple[int, int, str] | None:
    return next((m for m in mappings() if m[0] <= addr < m[1]), None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def region_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors below, around and above the mapping threshold and the 2 MiB huge-page size, odd
    sizes included, plus small ones that keep torch allocations."""
    return {
        "big": random_tensor(torch.bfloat16, (1531, 1409), seed),            # ~4.1 MiB, odd
        "huge_exact": random_tensor(torch.float32, (512, 1024), seed + 1),   # 2 MiB exactly
        "mid": random_tensor(torch.float16, (700, 777), seed + 2),           # ~1.04 MiB
        "below": random_tensor(torch.float32, (1000, 200), seed + 3),        # 800 KB: torch memory
        "small": random_tensor(torch.int64, (3, 7), seed + 4),
        "odd_u8": random_tensor(torch.uint8, (1 << 20) + 13, seed + 5),      # 1 MiB + 13 bytes
        "empty": torch.empty(0, 5, dtype=torch.bfloat16),
    }


@pytest.fixture
def small_chunks(monkeypatch):
    """Several populate chunks even for a few MiB, long reads cut in 1 MiB steps, so the helper
    threads have work."""
    monkeypatch.setattr(sio, "_POPULATE_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(sio._Populator, "_STEP", 1 << 20)


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
@pytest.mark.parametrize("alloc", ["adaptive", "hugepage", "plain", "torch"])
@pytest.mark.parametrize("populate", ["on", "off"])
def test_every_alloc_and_populate_path_loads_bit_exactly(tmp_path, monkeypatch, small_chunks, io_mode, alloc,
                                                         populate):
    sd = region_dict(1)
    p = tmp_path / "r.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", alloc)
    monkeypatch.setenv("LLMIO_CKPT_POPULATE", populate)
    s: dict = {}
    got = ck.load_file(p, io_mode=io_mode, stats=s)
    assert list(got) == list(hdr.read_header(p).tensors)
    assert all(same_bits(got[k], v) for k, v in sd.items())
    big = [k for k, v in sd.items() if v.numel() * v.element_size() >= sio._REGION_MIN_BYTES]
    assert s["alloc"] == alloc and s["populate"] == (populate if alloc != "torch" else "off")
    assert s["regions"] == (len(big) if alloc != "torch" else 0)
    if alloc == "hugepage":
        assert s["hugepage_advised"] + s["hugepage_refused"] == len(big)
    else:
        assert s["hugepage_advised"] == s["hugepage_refused"] == 0  # adaptive: advised step by step, not here
    if alloc == "adaptive" and populate == "on" and not s["populate_refused"]:
        want = sum(sio._align_up(sd[k].numel() * sd[k].element_size(), 4096) for k in big)
        # every mapped tensor's bytes were faulted as one page size or the other (4 KiB slack each
        # at most: the read covers the aligned superset of the tensor, the mapping whole pages)
        assert want - 4096 * len(big) <= s["huge_bytes"] + s["small_page_bytes"] <= want + 2 * 4096 * len(big)
    for k in big:
        m = mapping_of(got[k].data_ptr())
        assert m is not None
        if alloc == "torch":
            continue
        # the tensor's own mapping (the kernel may merge neighbours into one VMA): its storage
        # starts at a page boundary within an alignment block of the tensor's bytes
        st = got[k].untyped_storage()
        nb = sd[k].numel() * sd[k].element_size()
        assert st.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0
        assert st.data_ptr() <= got[k].data_ptr() < st.data_ptr() + 4096 and st.nbytes() - nb < 3 * 4096 + 4096
        assert m[1] >= got[k].data_ptr() + nb
        if alloc == "hugepage" and s["hugepage_refused"] == 0:
            assert " hg" in m[2], m  # advised MADV_HUGEPAGE
            if st.nbytes() >= 2 * MIB:
                assert st.data_ptr() % (2 * MIB) == 0  # 2 MiB-aligned start: every whole 2 MiB can be one page
        if alloc == "plain":
            assert " hg" not in m[2]


def test_region_tensors_are_owned_and_independent_between_loads(tmp_path, monkeypatch):
    sd = region_dict(2)
    p = tmp_path / "o.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "hugepage")
    a = ck.load_file(p, io_mode="direct")
    b = ck.load_file(p, io_mode="direct")
    spans = []
    for got in (a, b):
        for k, t in got.items():
            if t.numel():
                st = t.untyped_storage()
                spans.append((st.data_ptr(), st.data_ptr() + st.nbytes(), k))
    spans.sort()
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])), "two tensors share memory"
    a["big"].fill_(3.0)
    a["huge_exact"].zero_()
    a["odd_u8"].fill_(7)
    assert all(same_bits(b[k], v) for k, v in sd.items())  # the other load is untouched
    assert same_bits(a["mid"], sd["mid"])  # and so are the other tensors of the same load
    c = ck.load_file(p, io_mode="direct")  # a later load does not reuse or alias
    assert all(same_bits(c[k], v) for k, v in sd.items())
    assert torch.all(a["big"] == 3.0) and torch.all(a["odd_u8"] == 7)
    os.unlink(p)
    assert same_bits(b["big"] + 0, sd["big"] + 0)  # no file mapping behind it


def test_freeing_loaded_tensors_unmaps_their_memory(tmp_path, monkeypatch):
    import gc

    n = 24
    sd = {f"w{i}": random_tensor(torch.bfloat16, (1024, 1536), 100 + i) for i in range(n)}  # 3 MiB each
    p = tmp_path / "m.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "hugepage")
    gc.collect()
    live0 = sio.live_region_bytes()
    r0 = rss_bytes()
    got = ck.load_file(p, io_mode="direct")
    total = n * 3 * MIB
    live1 = sio.live_region_bytes()
    assert live1[1] - live0[1] == n and total <= live1[0] - live0[0] <= total + n * 3 * 4096
    r_loaded = rss_bytes()
    assert r_loaded - r0 >= 0.9 * total  # the data really is in this process's memory
    # one tensor freed: its mapping goes, the others stay valid
    r1 = rss_bytes()
    del got["w0"]
    gc.collect()
    assert sio.live_region_bytes()[1] == live1[1] - 1
    assert r1 - rss_bytes() >= 2 * MIB  # its 3 MiB left the process
    assert same_bits(got["w1"], sd["w1"])
    # a view keeps its tensor's mapping alive after the tensor and the dict are gone
    view = got["w2"][5:9, 100:200]
    expect = sd["w2"][5:9, 100:200].clone()
    del got
    gc.collect()
    assert sio.live_region_bytes()[1] == live0[1] + 1 and same_bits(view.contiguous(), expect)
    del view
    gc.collect()
    assert sio.live_region_bytes() == live0
    # the memory went back to the system (measured as the drop: other allocations of the
    # process, e.g. the engine's buffers, may stay)
    assert r_loaded - rss_bytes() >= 0.9 * total


def _resident_pages(t: torch.Tensor) -> int:
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    pages = -(-t.numel() // page)
    vec = (ctypes.c_ubyte * pages)()
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert lib.mincore(ctypes.c_void_p(t.data_ptr()), t.numel(), vec) == 0
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("threads", [1, 3])
def test_populate_helpers_prefault_every_chunk_and_release_each_when_done(monkeypatch, threads):
    monkeypatch.setattr(sio._Populator, "_STEP", 1 * MIB)  # several pieces per region
    rs = sio._RegionStats()
    regs = [sio._new_region(n, False, rs) for n in (3 * MIB, 5 * MIB + 4096, 64 * KIB)]
    page = os.sysconf("SC_PAGE_SIZE")
    assert sio._Libc.get() is not None and all(_resident_pages(t) == 0 for t in regs)  # fresh: nothing faulted
    pop = sio._Populator([[(regs[0].data_ptr(), regs[0].numel())], [],
                          [(regs[1].data_ptr(), regs[1].numel()), (regs[2].data_ptr(), regs[2].numel())]], rs,
                         threads)
    assert len(pop.threads) == threads
    assert pop.ready[1].is_set() and not pop.ready[0].is_set()  # a chunk with nothing to fault is ready at once
    with pop:
        for k in range(3):
            pop.wait(k)
        pop.finish()
    if rs.populate_refused:
        pytest.skip("kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    assert rs.populate_ok == 3  # every region, the first chunk's included
    assert [_resident_pages(t) for t in regs] == [-(-t.numel() // page) for t in regs]
    assert torch.count_nonzero(regs[1]) == 0  # populated pages read as zeros
    assert not any(t.is_alive() for t in pop.threads)


def test_populate_chunks_cut_long_reads_at_aligned_steps(monkeypatch):
    monkeypatch.setattr(sio._Populator, "_STEP", 1 * MIB)
    monkeypatch.setattr(sio, "_POPULATE_CHUNK_BYTES", 2 * MIB)
    base = 1 << 40
    reqs = [(0, 4096, base, 3 * MIB + 100), (0, 8 * MIB, 77, 5000), (1, 0, base + 8 * MIB, 512 * KIB)]
    regions = [(base, 3 * MIB + 4096), (0, 0), (base + 8 * MIB, 512 * KIB)]
    chunks = sio._populate_chunks(reqs, regions)
    flat = [r for c in chunks for r, _ in c]
    # the reads still cover exactly the same bytes, file offsets and addresses moving together
    assert flat == [(0, 4096, base, MIB), (0, 4096 + MIB, base + MIB, MIB), (0, 4096 + 2 * MIB, base + 2 * MIB, MIB),
                    (0, 4096 + 3 * MIB, base + 3 * MIB, 100), (0, 8 * MIB, 77, 5000), reqs[2]]
    ends = [False, False, False, True, False, True]  # a mapping counts as populated once its last part is
    assert [p for c in chunks for _, p in c] == [(r[2], r[3], e) if i != 4 else (0, 0, False)
                                                 for i, (r, e) in enumerate(zip(flat, ends))]
    # the first chunk is one step (the engine starts early), the others about the chunk size
    assert [sum(r[3] for r, _ in c) for c in chunks] == [MIB, 2 * MIB, 100 + 5000 + 512 * KIB]


def test_page_chooser_keeps_huge_pages_while_they_fault_fast_and_probes_rarely_after():
    ch = sio._PageChooser()
    assert ch.choose() is True  # nothing measured: try a huge page
    ch.record(2 * MIB, 2 * MIB / 20e9)  # a backed block: 20 GB/s
    assert all(ch.choose() for _ in range(1000))  # huge pages while they fault fast
    ch.record(2 * MIB, 2 * MIB / 0.25e9)  # a block the host took back: 0.25 GB/s
    picks = [ch.choose() for _ in range(900)]
    # 4 KiB pages for the reads; a huge probe costs 6 small steps' time: one every 50 * 6 = 300
    assert picks.count(True) == 900 // 300 and picks[:250] == [False] * 250
    ch.record(2 * MIB, 2 * MIB / 5e9)  # a probe found backed memory again
    assert ch.choose() is True
    ch.record(2 * MIB, 2 * MIB / 1e6)  # very slow: probes as rare as allowed
    picks = [ch.choose() for _ in range(3 * ch.MAX_PROBE_EVERY)]
    assert picks.count(True) == 3
    ch.refuse()
    assert not any(ch.choose() for _ in range(5000))  # no THP: never huge again, no probes


def test_adaptive_populate_faults_huge_steps_and_leaves_small_ones_to_the_reads(monkeypatch):
    """Each 2 MiB step chosen huge is advised MADV_HUGEPAGE (VmFlags hg) and faulted by the
    helper; one chosen small is left unfaulted in 4 KiB pages (no hg) for the read to fault."""
    picks = iter([True, False, False, True, True, False] * 4)
    monkeypatch.setattr(sio._PageChooser, "choose", lambda self: next(picks))
    rs = sio._RegionStats()
    t = sio._new_region(12 * MIB + 4096, True, rs, advise=False)  # 6 whole steps and one page
    assert t.data_ptr() % (2 * MIB) == 0 and rs.huge_ok == rs.huge_refused == 0
    assert " hg" not in mapping_of(t.data_ptr())[2]  # not advised before it is populated
    pop = sio._Populator([[(t.data_ptr(), t.numel())]], rs, 1, sio._PageChooser())
    with pop:
        pop.finish()
    if rs.populate_refused or rs.huge_refused:
        pytest.skip("kernel refuses MADV_POPULATE_WRITE or THP advice")
    want = [True, False, False, True, True, False]
    step_pages = 2 * MIB // 4096
    for k, huge in enumerate(want):
        flags = mapping_of(t.data_ptr() + k * 2 * MIB)[2]
        assert (" hg" in flags) == huge, (k, flags)
        assert _resident_pages(t[k * 2 * MIB:(k + 1) * 2 * MIB]) == (step_pages if huge else 0), k
    assert rs.huge_bytes == 3 * 2 * MIB and rs.small_bytes == 3 * 2 * MIB + 4096  # the tail page: 4 KiB
    assert torch.count_nonzero(t) == 0  # every page reads as zeros, faulted or not


def test_adaptive_load_faults_every_byte_once_and_loads_bit_exactly(tmp_path, monkeypatch):
    sd = {"a": random_tensor(torch.bfloat16, (3000, 2000), 3), "b": random_tensor(torch.float32, (2048, 1500), 4),
          "c": random_tensor(torch.float16, (5,), 5)}
    p = tmp_path / "ad.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_POPULATE_THREADS", "2")
    monkeypatch.setattr(sio._Populator, "_STEP", 4 * MIB)
    monkeypatch.setattr(sio, "_POPULATE_CHUNK_BYTES", 4 * MIB)
    s: dict = {}
    got = ck.load_file(p, io_mode="direct", stats=s)  # LLMIO_CKPT_ALLOC unset: auto
    assert all(same_bits(got[k], v) for k, v in sd.items())
    if sio._thp_mode() not in ("always", "madvise"):
        pytest.skip(f"no THP by madvise here (alloc=auto is {s['alloc']})")
    assert s["alloc"] == "adaptive"
    if s["populate_refused"]:
        pytest.skip("kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    assert s["populate"] == "on" and s["populated_regions"] == s["regions"] == 2
    want = sum(sio._align_up(v.numel() * v.element_size(), 4096) for k, v in sd.items() if k != "c")
    assert want - 2 * 4096 <= s["huge_bytes"] + s["small_page_bytes"] <= want + 4 * 4096
    assert s["huge_bytes"] >= 2 * MIB  # the first step tries a huge page


def test_populate_threads_come_from_the_environment_or_the_cpus(monkeypatch):
    monkeypatch.delenv("LLMIO_CKPT_POPULATE_THREADS", raising=False)
    assert sio._populate_threads() == max(1, min(4, len(os.sched_getaffinity(0))))
    monkeypatch.setenv("LLMIO_CKPT_POPULATE_THREADS", "3")
    assert sio._populate_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("LLMIO_CKPT_POPULATE_THREADS", bad)
        with pytest.raises(ValueError, match=f"LLMIO_CKPT_POPULATE_THREADS.*{bad}"):
            sio._populate_threads()


def test_load_with_populate_faults_every_mapping_before_reading_it(tmp_path, monkeypatch, small_chunks):
    sd = region_dict(6)
    p = tmp_path / "pop.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "plain")
    monkeypatch.setenv("LLMIO_CKPT_POPULATE", "on")
    monkeypatch.setenv("LLMIO_CKPT_POPULATE_THREADS", "2")
    s: dict = {}
    got = ck.load_file(p, io_mode="direct", stats=s)
    assert all(same_bits(got[k], v) for k, v in sd.items())
    if s["populate_refused"]:
        pytest.skip("kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    assert s["populate_threads"] == 2
    assert s["populated_regions"] == s["regions"] > 0  # the first chunk's mappings too


def test_refused_advice_falls_back_and_still_loads_bit_exactly(tmp_path, monkeypatch, small_chunks):
    sd = region_dict(3)
    p = tmp_path / "f.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "hugepage")
    monkeypatch.setenv("LLMIO_CKPT_POPULATE", "on")
    monkeypatch.setattr(sio, "_MADV_HUGEPAGE", 4242)  # an advice no kernel knows: EINVAL, as without THP
    monkeypatch.setattr(sio, "_MADV_POPULATE_WRITE", 4243)  # as before Linux 5.14
    s: dict = {}
    got = ck.load_file(p, io_mode="direct", stats=s)
    assert all(same_bits(got[k], v) for k, v in sd.items())
    assert s["hugepage_refused"] == s["regions"] > 0 and s["hugepage_advised"] == 0
    assert s["populated_regions"] == 0
    rs = sio._RegionStats()
    t = sio._new_region(3 * MIB, True, rs)
    pop = sio._Populator([[], [(t.data_ptr(), t.numel())]], rs)
    with pop:
        pop.wait(1)  # a refusal releases every chunk: the engine faults the pages itself
        pop.finish()
    assert rs.populate_refused == 1 and rs.populate_ok == 0 and rs.huge_refused == 1
    t.fill_(9)  # the mapping is usable all the same
    assert int(t.sum()) == 9 * t.numel()


def test_auto_alloc_follows_the_kernel_and_libc(tmp_path, monkeypatch):
    sd = region_dict(4)
    p = tmp_path / "a.safetensors"
    ck.save_file(sd, p)
    monkeypatch.delenv("LLMIO_CKPT_ALLOC", raising=False)
    monkeypatch.delenv("LLMIO_CKPT_POPULATE", raising=False)
    monkeypatch.setattr(sio, "_free_page_reporting", lambda: False)
    for thp, expect in (("never", "torch"), ("madvise", "adaptive"), ("always", "adaptive"), ("", "torch")):
        monkeypatch.setattr(sio, "_thp_mode", lambda thp=thp: thp)
        s: dict = {}
        got = ck.load_file(p, io_mode="direct", stats=s)
        assert s["alloc"] == expect, thp
        assert s["populate"] == ("on" if expect == "adaptive" else "off")  # populate=auto follows the pages
        assert all(same_bits(got[k], v) for k, v in sd.items())
    # a balloon that reports free pages to the host: still adaptive (the helpers measure which
    # page size faults faster at the moment instead of guessing from the machine)
    monkeypatch.setattr(sio, "_free_page_reporting", lambda: True)
    monkeypatch.setattr(sio, "_thp_mode", lambda: "madvise")
    s = {}
    got = ck.load_file(p, io_mode="direct", stats=s)
    assert s["alloc"] == "adaptive" and all(same_bits(got[k], v) for k, v in sd.items())
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "hugepage")  # forcing still works there
    s = {}
    ck.load_file(p, io_mode="direct", stats=s)
    assert s["alloc"] == "hugepage" and s["regions"] > 0
    # no libc mmap/madvise at all: even a forced mapping path becomes torch memory
    monkeypatch.setattr(sio._Libc, "get", classmethod(lambda cls: None))
    for alloc in ("adaptive", "hugepage", "plain", "auto"):
        monkeypatch.setenv("LLMIO_CKPT_ALLOC", alloc)
        s = {}
        got = ck.load_file(p, io_mode="direct", stats=s)
        assert s["alloc"] == "torch" and s["regions"] == 0 and s["populate"] == "off"
        assert all(same_bits(got[k], v) for k, v in sd.items())


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path):
    d = tmp_path / "virtio_balloon"
    assert sio._free_page_reporting(str(d)) is False  # no balloon driver
    (d / "virtio0").mkdir(parents=True)
    (d / "bind").write_text("")  # driver files that are not devices are ignored
    assert sio._free_page_reporting(str(d)) is False  # a device without a features file
    (d / "virtio0" / "features").write_text("0110000000000000\n")  # stats, no reporting
    assert sio._free_page_reporting(str(d)) is False
    (d / "virtio3").mkdir()
    (d / "virtio3" / "features").write_text("0110010100000000\n")  # bit 5: VIRTIO_BALLOON_F_REPORTING
    assert sio._free_page_reporting(str(d)) is True
    (d / "virtio3" / "features").write_text("0110\n")  # too short to hold bit 5
    assert sio._free_page_reporting(str(d)) is False


def test_unknown_alloc_or_populate_mode_is_refused_naming_the_variable(tmp_path, monkeypatch):
    p = tmp_path / "u.safetensors"
    ck.save_file({"x": torch.ones(3)}, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "gigantic")
    with pytest.raises(ValueError, match="LLMIO_CKPT_ALLOC.*gigantic"):
        ck.load_file(p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "plain")
    monkeypatch.setenv("LLMIO_CKPT_POPULATE", "sometimes")
    with pytest.raises(ValueError, match="LLMIO_CKPT_POPULATE.*sometimes"):
        ck.load_file(p)


def test_read_error_with_populate_names_the_file_and_stops_the_helper(tmp_path, monkeypatch, small_chunks, faults):
    import errno
    import threading

    sd = region_dict(5)
    p = tmp_path / "e.safetensors"
    ck.save_file(sd, p)
    monkeypatch.setenv("LLMIO_CKPT_ALLOC", "hugepage")
    monkeypatch.setenv("LLMIO_CKPT_POPULATE", "on")
    faults("eio:e.safetensors")
    with pytest.raises(OSError) as ei:
        ck.load_file(p, io_mode="direct")
    assert ei.value.errno == errno.EIO and "e.safetensors" in str(ei.value)
    assert not any(t.name.startswith("llmio-ckpt-populate") for t in threading.enumerate())
