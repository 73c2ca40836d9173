"""Read engine: exact bytes from both backends, errors that name the file, fallbacks."""
from __future__ import annotations

import errno
import os
import pickle
import platform
import random
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmio_native as lio
from llmio_native import _core

URING = _core.probe_io_uring()["usable"]
BACKENDS = [
    pytest.param("io_uring", marks=pytest.mark.skipif(not URING, reason="io_uring unusable here")),
    "threads",
]
BOUNDARY = [0, 1, 31, 32, 33, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1]
FILE_SIZES = [0, 1, 4095, 4097, 3 * 4096 + 7, (1 << 20) + 1, 5 * (1 << 20) + 123]


@pytest.fixture(autouse=True)
def no_faults(monkeypatch):
    monkeypatch.delenv("LLMIO_BACKEND", raising=False)
    _core._set_faults("")
    yield
    _core._set_faults("")


def make_file(dirpath, size: int, name: str | None = None, seed: int = 0) -> tuple[str, bytes]:
    data = np.random.default_rng(seed + size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = os.path.join(str(dirpath), name or f"f{size}.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def ranges_for(size: int, rng: random.Random, n: int = 40) -> list[tuple[int, int]]:
    out = [(0, size), (size, 0), (0, 0)]
    for b in BOUNDARY:
        for off in (0, 1, 4095, 4096, 4097, size - b):
            if 0 <= off and off + b <= size:
                out.append((off, b))
    for _ in range(n):
        off = rng.randrange(0, size + 1)
        out.append((off, rng.randrange(0, size - off + 1)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("max_io", [4096, 1 << 20])
def test_reads_match_python(tmp_path, backend, direct, max_io):
    files = [make_file(tmp_path, s) for s in FILE_SIZES]
    r = lio.Reader([p for p, _ in files], backend=backend, direct=direct, max_io_bytes=max_io)
    assert r.backend == backend
    rng = random.Random(7)
    for i, (_, data) in enumerate(files):
        for off, n in ranges_for(len(data), rng, 15):
            expect = data[off : off + n]
            got = r.read(i, off, n)
            assert got.dtype == np.uint8 and got.shape == (n,)
            assert got.tobytes() == expect, (i, off, n)
            odd = np.empty(n + 1, np.uint8)[1:]  # an address no O_DIRECT read can use directly
            assert r.read_into(i, off, odd) == n
            assert odd.tobytes() == expect, (i, off, n)
    st_ = r.stats()
    if direct:
        assert st_["ops_direct"] > 0 and st_["bounce_ops"] > 0 and st_["direct_fallbacks"] == []
    else:
        assert st_["ops_direct"] == 0 and st_["ops_buffered"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_into_buffer_kinds(tmp_path, backend):
    path, data = make_file(tmp_path, 3 * 4096 + 7)
    r = lio.Reader([path], backend=backend)
    ba = bytearray(1000)
    r.read_into(0, 5, ba)
    assert bytes(ba) == data[5:1005]
    t = torch.empty(250, dtype=torch.int32)
    r.read_into(0, 4096, t)
    assert t.numpy().tobytes() == data[4096:5096]
    aligned = lio.empty_aligned(8192)
    r.read_into(0, 4096, aligned)
    assert aligned.tobytes() == data[4096 : 4096 + 8192]
    mv = memoryview(bytearray(17))
    r.read_into(0, len(data) - 17, mv)
    assert bytes(mv) == data[-17:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_batch_many_files(tmp_path, backend):
    files = [make_file(tmp_path, s) for s in (4097, 5 * (1 << 20) + 123, 33)]
    r = lio.Reader([p for p, _ in files], backend=backend, max_io_bytes=8192, queue_depth=8)
    rng = random.Random(3)
    reqs = []
    for _ in range(300):
        i = rng.randrange(len(files))
        size = len(files[i][1])
        off = rng.randrange(0, size + 1)
        reqs.append((i, off, rng.randrange(0, min(size - off, 70000) + 1)))
    outs = r.read_batch(reqs)
    assert [o.tobytes() for o in outs] == [files[i][1][o : o + n] for i, o, n in reqs]
    bufs = [np.empty(n + 3, np.uint8)[3:] for _, _, n in reqs]
    r.read_batch_into([(i, o, b) for (i, o, _), b in zip(reqs, bufs)])
    assert all(b.tobytes() == files[i][1][o : o + n] for (i, o, n), b in zip(reqs, bufs))
    assert r.stats()["requests"] == 600


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(0, 3 * 4096 + 100),
    picks=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 7)), max_size=12),
    direct=st.booleans(),
    threads=st.booleans(),
)
def test_property_exact_bytes(tmp_path_factory, size, picks, direct, threads):
    if not threads and not URING:
        threads = True
    d = tmp_path_factory.mktemp("prop")
    path, data = make_file(d, size)
    r = lio.Reader([path], backend="threads" if threads else "io_uring", direct=direct, max_io_bytes=4096)
    reqs = []
    for a, b, shift in picks:
        off = a % (size + 1)
        n = b % (size - off + 1)
        reqs.append((off, n, shift))
    bufs = [np.empty(n + shift, np.uint8)[shift:] for _, n, shift in reqs]
    r.read_batch_into([(0, off, buf) for (off, _, _), buf in zip(reqs, bufs)])
    for (off, n, _), buf in zip(reqs, bufs):
        assert buf.tobytes() == data[off : off + n]


def test_tmpfs_with_direct(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    path, data = make_file(shm, 3 * 4096 + 7, name=f"llmio_test_{os.getpid()}.bin")
    try:
        for backend in ["threads"] + (["io_uring"] if URING else []):
            r = lio.Reader([path], backend=backend, direct=True)
            for off, n in [(0, len(data)), (1, 4097), (len(data) - 3, 3)]:
                assert r.read(0, off, n).tobytes() == data[off : off + n]
    finally:
        os.unlink(path)


# ---------------------------------------------------------------- errors


def test_missing_file_names_it(tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError) as ei:
        lio.Reader([missing])
    assert ei.value.filename == missing and missing in str(ei.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError) as ei:
        lio.Reader([str(tmp_path)])
    assert str(tmp_path) in str(ei.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_names_file(tmp_path):
    path, _ = make_file(tmp_path, 100)
    os.chmod(path, 0)
    with pytest.raises(PermissionError) as ei:
        lio.Reader([path])
    assert ei.value.filename == path


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_past_eof_raises_before_reading(tmp_path, backend):
    path, data = make_file(tmp_path, 5000)
    r = lio.Reader([path], backend=backend)
    with pytest.raises(lio.ShortReadError) as ei:
        r.read(0, 4990, 11)
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENODATA and e.filename == path
    assert "4990" in str(e) and "5000" in str(e)
    # Validation comes before any I/O: the good request's destination is untouched.
    good = np.full(10, 0xAB, np.uint8)
    bad = np.zeros(20, np.uint8)
    with pytest.raises(lio.ShortReadError):
        r.read_batch_into([(0, 0, good), (0, 4990, bad)])
    assert (good == 0xAB).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [True, False])
def test_truncated_after_open_raises(tmp_path, backend, direct):
    path, data = make_file(tmp_path, 5 * 4096 + 11)
    r = lio.Reader([path], backend=backend, direct=direct)
    os.truncate(path, 4096 + 100)
    assert r.read(0, 0, 4096).tobytes() == data[:4096]
    with pytest.raises(lio.ShortReadError) as ei:
        r.read(0, 4096, 3 * 4096)
    assert ei.value.filename == path and "end of file" in str(ei.value)
    with pytest.raises(lio.ShortReadError):
        r.read_batch([(0, 0, 10), (0, 3 * 4096, 5000)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eio_names_file_offset_length(tmp_path, backend):
    good, gdata = make_file(tmp_path, 9000, name="good.bin")
    bad, _ = make_file(tmp_path, 9000, name="failing-disk.bin")
    r = lio.Reader([good, bad], backend=backend)
    _core._set_faults("eio:failing-disk")
    with pytest.raises(OSError) as ei:
        r.read(1, 4096, 100)
    e = ei.value
    assert e.errno == errno.EIO and e.filename == bad
    assert "4096" in str(e) and "failing-disk.bin" in str(e)
    with pytest.raises(OSError):
        r.read_batch([(0, 0, 100), (1, 0, 100)])
    assert r.read(0, 0, 9000).tobytes() == gdata  # the engine still works afterwards


def test_bad_arguments(tmp_path):
    path, _ = make_file(tmp_path, 100)
    r = lio.Reader([path], backend="threads")
    with pytest.raises(IndexError):
        r.read(1, 0, 1)
    with pytest.raises(ValueError):
        r.read(0, -1, 1)
    with pytest.raises(TypeError):
        r.read_into(0, 0, b"read-only")
    with pytest.raises(ValueError):
        r.read_into(0, 0, np.zeros((4, 4), np.uint8)[:, 1])
    with pytest.raises(ValueError):
        lio.Reader([path], backend="bogus")
    with pytest.raises(ValueError):
        lio.Reader([path], queue_depth=0)


# ---------------------------------------------------------------- fallbacks


def test_env_forces_threads(tmp_path, monkeypatch):
    path, data = make_file(tmp_path, 5000)
    monkeypatch.setenv("LLMIO_BACKEND", "threads")
    r = lio.Reader([path], backend="io_uring")
    assert r.backend == "threads"
    assert r.read(0, 1, 4999).tobytes() == data[1:]


@pytest.mark.parametrize("fault,err", [("uring_eperm", errno.EPERM), ("uring_enosys", errno.ENOSYS)])
def test_uring_unusable_auto_falls_back_forced_raises(tmp_path, monkeypatch, fault, err):
    path, data = make_file(tmp_path, 5000)
    _core._set_faults(fault)
    info = lio.info()
    assert info["io_uring"]["usable"] is False and info["io_uring"]["errno"] == err
    assert info["backend"] == "threads"
    if err == errno.EPERM:
        assert "seccomp" in info["io_uring"]["reason"]
    r = lio.Reader([path], backend="auto")
    assert r.backend == "threads" and r.read(0, 0, 5000).tobytes() == data
    with pytest.raises(lio.UnsupportedError, match="io_uring"):
        lio.Reader([path], backend="io_uring")
    monkeypatch.setenv("LLMIO_BACKEND", "io_uring")
    with pytest.raises(lio.UnsupportedError, match="LLMIO_BACKEND"):
        lio.Reader([path])


SECCOMP_CHILD = textwrap.dedent(
    r"""
    import ctypes, errno, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF: if arch != x86_64 -> allow; if nr == io_uring_setup (425) -> ERRNO(EPERM); else allow.
    def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
    def jump(code, k, jt, jf): return struct.pack("HBBI", code, jt, jf, k)
    LD, JEQ, RET = 0x20, 0x15, 0x06
    prog = b"".join([
        stmt(LD, 4), jump(JEQ, 0xC000003E, 0, 3),
        stmt(LD, 0), jump(JEQ, 425, 0, 1),
        stmt(RET, 0x00050000 | errno.EPERM),
        stmt(RET, 0x7FFF0000),
    ])
    buf = ctypes.create_string_buffer(prog)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fp = Fprog(len(prog) // 8, ctypes.addressof(buf))
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:
        print("NOFILTER", ctypes.get_errno()); sys.exit(0)
    import llmio_native as lio
    i = lio.info()["io_uring"]
    r = lio.Reader([sys.argv[1]], backend="auto")
    data = open(sys.argv[1], "rb").read()
    ok = r.read(0, 7, 1000).tobytes() == data[7:1007]
    try:
        lio.Reader([sys.argv[1]], backend="io_uring"); forced = "no-error"
    except lio.UnsupportedError:
        forced = "unsupported"
    print("RESULT", i["usable"], i["errno"], r.backend, ok, forced)
    """
)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64")
def test_real_seccomp_denial_falls_back(tmp_path):
    if not _core.HAVE_URING:
        pytest.skip("built without liburing")
    path, _ = make_file(tmp_path, 5000)
    out = subprocess.run(
        [sys.executable, "-c", SECCOMP_CHILD, path], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("LLMIO_BACKEND", "LLMIO_FAULTS")},
    )
    assert out.returncode == 0, out.stderr
    if "NOFILTER" in out.stdout:
        pytest.skip(f"could not install a seccomp filter: {out.stdout.strip()}")
    assert "RESULT False 1 threads True unsupported" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["direct_open_einval", "direct_read_einval"])
def test_o_direct_refused_falls_back_once(tmp_path, backend, fault):
    path, data = make_file(tmp_path, 3 * 4096 + 7)
    _core._set_faults(fault)
    r = lio.Reader([path], backend=backend, direct=True, max_io_bytes=4096)
    for off, n in [(0, len(data)), (1, 4097), (4096, 4096), (len(data) - 1, 1)]:
        assert r.read(0, off, n).tobytes() == data[off : off + n]
    st_ = r.stats()
    assert st_["direct_active"] == [False]
    assert len(st_["direct_fallbacks"]) == 1 and path in st_["direct_fallbacks"][0]
    assert "EINVAL" in st_["direct_fallbacks"][0] or "Invalid" in st_["direct_fallbacks"][0]
    assert st_["ops_buffered"] > 0 and st_["ops_direct"] == 0


# ---------------------------------------------------------------- threads, pickling, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_python_threads(tmp_path, backend):
    path, data = make_file(tmp_path, 2 * (1 << 20) + 5)
    r = lio.Reader([path], backend=backend, max_io_bytes=65536)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            off = rng.randrange(0, len(data))
            n = rng.randrange(0, min(len(data) - off, 300000) + 1)
            if r.read(0, off, n).tobytes() != data[off : off + n]:
                errors.append(f"{seed}: {off}+{n}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reader thread hung"
    assert errors == []


def test_pickle_recreates_native_handle(tmp_path):
    path, data = make_file(tmp_path, 9000)
    r = lio.Reader([path], backend="threads")
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._native is None or r2._native is not r._native
    assert r2.read(0, 100, 5000).tobytes() == data[100:5100]
    assert r2.backend == "threads" and r2.paths == [path]


@pytest.mark.skipif(not URING, reason="io_uring unusable here")
def test_uring_stats_registered_and_fixed(tmp_path):
    path, data = make_file(tmp_path, 3 * 4096 + 7)
    r = lio.Reader([path], backend="io_uring", direct=True)
    r.read_batch([(0, 1, 10), (0, 4096, 4096), (0, 5, 3 * 4096)])
    odd = np.empty(101, np.uint8)[1:]
    r.read_into(0, 3, odd)
    st_ = r.stats()
    assert st_["bytes"] == 10 + 4096 + 3 * 4096 + 100
    assert st_["requests"] == 4 and st_["batches"] == 2
    assert st_["registered_files"] == 1
    assert st_["fixed_buffer_ops"] >= 1  # the odd-address read bounced through a fixed buffer
    assert st_["submits"] >= 2 and st_["queue_depth"] == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_many_scatter(tmp_path, backend):
    files = [make_file(tmp_path, s) for s in (3 * 4096 + 7, 70000)]
    r = lio.Reader([p for p, _ in files], backend=backend)
    rng = np.random.default_rng(0)
    n = 500
    fidx = rng.integers(0, 2, n)
    sizes = np.array([len(files[i][1]) for i in fidx])
    nbytes = rng.integers(0, 5000, n).clip(max=sizes)
    offs = (rng.random(n) * (sizes - nbytes + 1)).astype(np.int64)
    out = np.zeros(int(nbytes.sum()) + 11, np.uint8)
    r.read_many(fidx, offs, nbytes, out)
    pos = 0
    for i, o, k in zip(fidx, offs, nbytes):
        assert out[pos : pos + k].tobytes() == files[i][1][o : o + k]
        pos += k
    assert (out[pos:] == 0).all()  # nothing written past the requests
    # Explicit placement into an aligned buffer: 4 KiB reads at 4 KiB offsets go direct.
    dst = lio.empty_aligned(4 * 4096)
    r.read_many(0, np.array([8192, 0, 4096, 4096]), 4096, dst, np.array([0, 4096, 8192, 12288]))
    d0 = files[0][1]
    assert dst.tobytes() == d0[8192:12288] + d0[0:4096] + d0[4096:8192] + d0[4096:8192]
    with pytest.raises(ValueError, match="past the output buffer"):
        r.read_many(0, np.array([0]), 100, np.zeros(99, np.uint8))
    with pytest.raises(ValueError, match="same length"):
        r._handle().read_many(np.zeros(2, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64),
                              np.zeros(10, np.uint8), np.zeros(3, np.int64))
    with pytest.raises(lio.ShortReadError):
        r.read_many(1, np.array([69999]), 2, np.zeros(2, np.uint8))


def test_thousands_of_files_raise_the_fd_limit(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 1500 + 64:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        paths = []
        for k in range(1500):
            p = tmp_path / f"s{k}.bin"
            p.write_bytes(bytes([k % 251]) * 10)
            paths.append(str(p))
        r = lio.Reader(paths, backend="threads")  # 3000 descriptors: more than the old soft limit
        assert r.read(1499, 3, 2).tobytes() == bytes([1499 % 251]) * 2
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 3000
        del r
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
