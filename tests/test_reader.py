"""Reader: exact bytes from both engines at any offset and length, into any buffer;
errors that name the file; fallbacks (forced threads, io_uring denied, O_DIRECT
refused); many threads; pickling and fork; stats.

The oracle is a plain Python read of the same file (``conftest.py_read``).
"""
from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmio_native as lio
from llmio_native import _core

from conftest import IO_URING_USABLE, DataFile, py_read

pytestmark = pytest.mark.usefixtures("clean_io_env")

KIB, MIB = 1 << 10, 1 << 20
BOUNDARY = [0, 1, 31, 32, 33, 4095, 4096, 4097, MIB, MIB + 1]
# None of these is a multiple of 4096.
FILE_SIZES = [0, 1, 4095, 4097, 3 * 4096 + 7, MIB + 1, 5 * MIB + 123]
SENTINEL = 0xA5

needs_uring = pytest.mark.skipif(not IO_URING_USABLE, reason="io_uring unusable here")
needs_uring_build = pytest.mark.skipif(not _core.HAVE_URING, reason="built without liburing")


def ranges_for(size: int, rng: random.Random, n_random: int) -> list[tuple[int, int]]:
    """(offset, nbytes) pairs inside a file of ``size`` bytes: whole file, empty reads,
    every boundary length at unaligned, aligned and EOF-touching offsets, and random ones."""
    out = {(0, size), (0, 0), (size, 0), (size // 2, 0)}
    for b in BOUNDARY:
        offs = (0, 1, 31, 4095, 4096, 4097, size // 2, size - b, size - b - 1)
        if b >= MIB:
            offs = (0, 1, size - b)  # keep the big ones few
        for off in offs:
            if 0 <= off and off + b <= size:
                out.add((off, b))
    for _ in range(n_random):
        off = rng.randrange(size + 1)
        out.add((off, rng.randrange(size - off + 1)))
    return sorted(out)


def call_with_deadline(fn, seconds: float = 60.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it has not
    returned after ``seconds``. A hang guard, not a timing test."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds}s: hung"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def guarded(kind: str, nbytes: int):
    """A destination of ``nbytes`` bytes of the given kind inside a larger sentinel-filled
    allocation. Returns (dst, dst_bytes(), guards_intact())."""
    pad = 64
    if kind == "numpy":
        big = np.full(nbytes + 2 * pad, SENTINEL, np.uint8)
        dst = big[pad : pad + nbytes]
    elif kind == "numpy-odd":  # an address no O_DIRECT read can use: bounce copies
        big = np.full(nbytes + 2 * pad, SENTINEL, np.uint8)
        dst = big[pad + 1 : pad + 1 + nbytes]
    elif kind == "aligned":  # 4096-aligned: aligned ranges go straight in
        big = lio.empty_aligned(nbytes + 2 * 4096)
        big[:] = SENTINEL
        dst = big[4096 : 4096 + nbytes]
        pad = 4096
    elif kind == "bytearray":
        ba = bytearray([SENTINEL]) * (nbytes + 2 * pad + 1)
        big = np.frombuffer(ba, np.uint8)
        dst = memoryview(ba)[pad + 1 : pad + 1 + nbytes]
    elif kind == "torch-odd":
        tbig = torch.full((nbytes + 2 * pad,), SENTINEL, dtype=torch.uint8)
        big = tbig.numpy()
        dst = tbig[pad + 1 : pad + 1 + nbytes]
        pad += 1
    else:
        raise AssertionError(kind)
    lo = pad + (1 if kind in ("numpy-odd", "bytearray") else 0)

    def dst_bytes() -> bytes:
        return bytes(big[lo : lo + nbytes])

    def guards_intact() -> bool:
        return bool((big[:lo] == SENTINEL).all() and (big[lo + nbytes :] == SENTINEL).all())

    return dst, dst_bytes, guards_intact


# ---------------------------------------------------------------- exact bytes


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("max_io", [4096, 8192, MIB], ids=["io4k", "io8k", "io1m"])
def test_read_matches_python_read(make_file, backend, direct, max_io):
    files = [make_file(s) for s in FILE_SIZES]
    r = lio.Reader([f.path for f in files], backend=backend, direct=direct, max_io_bytes=max_io)
    assert r.backend == backend and r.stats()["backend"] == backend
    rng = random.Random(max_io)
    for i, f in enumerate(files):
        assert r.file_size(i) == f.size
        for off, n in ranges_for(f.size, rng, 6):
            got = r.read(i, off, n)
            assert got.dtype == np.uint8 and got.shape == (n,)
            assert got.tobytes() == py_read(f.path, off, n), (f.size, off, n)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("kind", ["numpy", "numpy-odd", "aligned", "bytearray", "torch-odd"])
def test_read_into_matches_python_read_and_stays_in_bounds(make_file, backend, direct, kind):
    f = make_file(2 * MIB + 4097 + 5)
    r = lio.Reader([f.path], backend=backend, direct=direct, max_io_bytes=8192)
    for b in BOUNDARY:
        offs = (0, 1, 4095, 4096, 4097, f.size - b) if b < MIB else (1, f.size - b)
        for off in offs:
            dst, dst_bytes, guards_intact = guarded(kind, b)
            assert r.read_into(0, off, dst) == b
            assert dst_bytes() == f.data[off : off + b], (kind, off, b)
            assert guards_intact(), f"read_into wrote outside its {kind} destination ({off}, {b})"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_read_into_typed_tensors_and_arrays(make_file, backend, direct):
    f = make_file(3 * 4096 + 7)
    r = lio.Reader([f.path], backend=backend, direct=direct)
    t32 = torch.empty(250, dtype=torch.int32)  # 1000 bytes
    assert r.read_into(0, 4097, t32) == 1000
    assert t32.numpy().tobytes() == f.data[4097:5097]
    assert torch.equal(t32, torch.from_numpy(np.frombuffer(f.data[4097:5097], dtype=np.int32).copy()))
    t64 = torch.empty((3, 5), dtype=torch.float64)[1:]  # a contiguous view at an offset
    assert r.read_into(0, 3, t64) == 80
    assert t64.numpy().tobytes() == f.data[3:83]
    a16 = np.empty((7, 3), np.uint16)
    assert r.read_into(0, f.size - 42, a16) == 42
    assert a16.tobytes() == f.data[-42:]
    empty = torch.empty(0, dtype=torch.int32)
    assert r.read_into(0, f.size, empty) == 0
    ba = bytearray(1000)
    assert r.read_into(0, 5, ba) == 1000 and bytes(ba) == f.data[5:1005]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("max_io", [4096, 8192, MIB], ids=["io4k", "io8k", "io1m"])
def test_read_batch_many_requests_many_files(make_file, backend, direct, max_io):
    files = [make_file(s, seed=k) for k, s in enumerate((0, 33, 4097, 3 * 4096 + 7, 5 * MIB + 123))]
    r = lio.Reader([f.path for f in files], backend=backend, direct=direct, max_io_bytes=max_io, queue_depth=8)
    rng = random.Random(max_io + direct)
    reqs = [(0, 0, 0), (1, 33, 0), (4, 0, files[4].size), (3, files[3].size - 1, 1)]
    for _ in range(300):
        i = rng.randrange(len(files))
        size = files[i].size
        off = rng.choice([rng.randrange(size + 1), size - min(size, rng.randrange(5000))])
        reqs.append((i, off, rng.randrange(min(size - off, 70000) + 1)))
    reqs += reqs[:20]  # the same ranges twice in one batch
    expect = [files[i].data[o : o + n] for i, o, n in reqs]
    assert expect[2] == py_read(files[4].path, 0, files[4].size)

    outs = r.read_batch(reqs)
    assert [o.tobytes() for o in outs] == expect
    assert all(o.dtype == np.uint8 and o.shape == (n,) for o, (_, _, n) in zip(outs, reqs))

    kinds = ["numpy", "numpy-odd", "aligned", "bytearray", "torch-odd"]
    dsts = [guarded(kinds[k % len(kinds)], n) for k, (_, _, n) in enumerate(reqs)]
    assert r.read_batch_into([(i, o, d[0]) for (i, o, _), d in zip(reqs, dsts)]) is None
    assert [d[1]() for d in dsts] == expect
    assert all(d[2]() for d in dsts), "read_batch_into wrote outside a destination"
    s = r.stats()
    assert s["requests"] == 2 * len(reqs) and s["batches"] == 2
    assert s["bytes"] == 2 * sum(n for _, _, n in reqs)


@pytest.fixture(scope="module")
def cached_files(tmp_path_factory):
    """size -> DataFile, written once per module (Hypothesis reuses them)."""
    d = tmp_path_factory.mktemp("prop")
    cache: dict[int, DataFile] = {}

    def get(size: int) -> DataFile:
        if size not in cache:
            data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
            path = str(d / f"p{size}.bin")
            with open(path, "wb") as fh:
                fh.write(data)
            cache[size] = DataFile(path, data)
        return cache[size]

    return get


ENGINES = ["threads"] + (["io_uring"] if IO_URING_USABLE else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(st.sampled_from([0, 1, 4095, 4097, 3 * 4096 + 7, 64 * KIB + 1]), st.integers(0, 40000)),
    picks=st.lists(
        st.tuples(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=10
    ),
    engine=st.sampled_from(ENGINES),
    direct=st.booleans(),
    max_io=st.sampled_from([4096, 8192, 12288, 5000, MIB]),
)
def test_property_any_ranges_any_engine_exact(cached_files, size, picks, engine, direct, max_io):
    f = cached_files(size)
    r = lio.Reader([f.path], backend=engine, direct=direct, max_io_bytes=max_io, num_threads=3, queue_depth=4)
    reqs = []
    for a, b, shift in picks:
        off = a % (size + 1)
        reqs.append((off, b % (size - off + 1), shift))
    expect = [f.data[o : o + n] for o, n, _ in reqs]
    assert [a.tobytes() for a in r.read_batch([(0, o, n) for o, n, _ in reqs])] == expect
    bufs = [np.empty(n + s, np.uint8)[s:] for _, n, s in reqs]  # any address
    r.read_batch_into([(0, o, buf) for (o, _, _), buf in zip(reqs, bufs)])
    assert [b.tobytes() for b in bufs] == expect
    o, n, _ = reqs[0]
    assert r.read(0, o, n).tobytes() == expect[0]


def test_tmpfs_with_direct_reads_exact(make_file, backend):
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    files = [
        make_file(s, name=f"llmio-test-{os.getpid()}-{s}.bin", directory=shm) for s in (4097, 3 * 4096 + 7, MIB + 1)
    ]
    r = lio.Reader([f.path for f in files], backend=backend, direct=True, max_io_bytes=8192)
    rng = random.Random(1)
    for i, f in enumerate(files):
        for off, n in ranges_for(f.size, rng, 5):
            assert r.read(i, off, n).tobytes() == py_read(f.path, off, n), (f.size, off, n)
        odd = np.empty(f.size - 3 + 1, np.uint8)[1:]
        r.read_into(i, 3, odd)
        assert odd.tobytes() == f.data[3:]
    s = r.stats()
    # Whether tmpfs takes O_DIRECT depends on the kernel; either way the record is coherent.
    for i, f in enumerate(files):
        named = [x for x in s["direct_fallbacks"] if f.path in x]
        assert len(named) == (0 if s["direct_active"][i] else 1), s


# ---------------------------------------------------------------- errors


def test_missing_file_raises_file_not_found_naming_it(make_file, backend, tmp_path):
    good = make_file(10)
    missing = str(tmp_path / "no-such-shard.bin")
    with pytest.raises(FileNotFoundError) as ei:
        lio.Reader([good.path, missing], backend=backend)
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == missing and missing in str(ei.value)


def test_directory_raises_is_a_directory_naming_it(backend, tmp_path):
    d = tmp_path / "a-directory"
    d.mkdir()
    with pytest.raises(IsADirectoryError) as ei:
        lio.Reader([str(d)], backend=backend)
    assert ei.value.errno == errno.EISDIR
    assert ei.value.filename == str(d) and str(d) in str(ei.value)


@pytest.mark.parametrize("kind", ["fifo", "fifo-buffered", "dev-null", "dev-zero", "directory", "socket"])
def test_non_regular_file_refused_at_open_never_blocks(backend, tmp_path, kind):
    """Regression (issue 9): a FIFO given to Reader blocked forever in the constructor
    (open(2) of a FIFO waits for a writer); devices, sockets and directories were opened
    as if they were files. Now open never blocks and anything but a regular file raises
    an OSError naming the path and its type."""
    import socket

    sock = None
    if kind.startswith("fifo"):
        path = str(tmp_path / "a-fifo")
        os.mkfifo(path)
        what = "FIFO"
    elif kind == "dev-null":
        path, what = "/dev/null", "character device"
    elif kind == "dev-zero":
        path, what = "/dev/zero", "character device"
    elif kind == "directory":
        path, what = str(tmp_path / "a-dir"), "directory"
        os.mkdir(path)
    else:
        path, what = str(tmp_path / "a-socket"), "socket"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
    good = tmp_path / "good.bin"
    good.write_bytes(b"0123456789")
    direct = kind != "fifo-buffered"

    def open_it():
        try:
            lio.Reader([str(good), path], backend=backend, direct=direct)
        except OSError as exc:
            return exc
        return None

    try:
        exc = call_with_deadline(open_it, 30)  # before the fix: hung here (fifo)
    finally:
        if sock is not None:
            sock.close()
    assert exc is not None, f"{kind}: opened as if it were a regular file"
    assert exc.filename == path and path in str(exc) and what in str(exc), str(exc)
    assert "regular file" in str(exc)
    if kind == "socket":  # open(2) of a socket fails by itself
        assert exc.errno in (errno.ENXIO, errno.EINVAL)
    else:
        assert exc.errno == (errno.EISDIR if kind == "directory" else errno.EINVAL)
    if kind == "directory":
        assert isinstance(exc, IsADirectoryError)
    # the good file alone still opens and reads
    assert lio.Reader([str(good)], backend=backend).read(0, 2, 3).tobytes() == b"234"


def test_path_with_embedded_nul_raises_value_error_naming_it(make_file, backend):
    """Regression (issue 9): "data.bin\\0junk" silently opened "data.bin" (the C string
    ends at the NUL). A str or bytes path with a NUL is a ValueError naming it."""
    f = make_file(100)
    for bad in (f.path + "\0junk", f.path + "\0", "\0" + f.path):
        with pytest.raises(ValueError, match="NUL") as ei:
            lio.Reader([bad], backend=backend)
        assert f.path in str(ei.value)
        with pytest.raises(ValueError, match="NUL"):  # the native layer checks too
            _core.Reader([bad], "threads")
        with pytest.raises(ValueError, match="NUL"):  # and a bad path after a good one
            lio.Reader([f.path, bad], backend=backend)
    with pytest.raises(ValueError, match="NUL"):
        lio.Reader([os.fsencode(f.path) + b"\0x"], backend=backend)
    # bytes paths work (as one path or in a list) and read the right file
    assert lio.Reader(os.fsencode(f.path), backend=backend).read(0, 0, 100).tobytes() == f.data
    assert lio.Reader([os.fsencode(f.path)], backend=backend).paths == [f.path]


def test_path_that_is_not_utf8_opens_and_is_named_in_errors(tmp_path, backend):
    """A file name that is not valid UTF-8 (legal on Linux; os.fsdecode gives a str with
    surrogates) failed to cross into C++ ("incompatible constructor arguments"). Paths
    now cross as bytes and come back through os.fsdecode: reads, path(), stats() and
    error filenames all round-trip."""
    raw = os.fsencode(str(tmp_path)) + b"/shard-\xff\xfe.bin"
    data = bytes(range(256)) * 20
    with open(raw, "wb") as fh:
        fh.write(data)
    name = os.fsdecode(raw)
    for p in (raw, name):
        r = lio.Reader([p], backend=backend)
        assert r.paths == [name] and r.read(0, 5, 1000).tobytes() == data[5:1005]
        assert r._handle().path(0) == name and r.stats()["bytes"] == 1000
    missing = os.fsdecode(os.fsencode(str(tmp_path)) + b"/gone-\xff.bin")
    with pytest.raises(FileNotFoundError) as ei:
        lio.Reader([missing], backend=backend)
    assert ei.value.filename == missing and missing in str(ei.value)
    with pytest.raises(ValueError, match="NUL"):
        _core.Reader([raw + b"\0x"], "threads")


URING_FD_LIMIT_CHILD = textwrap.dedent(
    r"""
    import json, os, resource, sys
    import llmio_native as lio
    path = sys.argv[1]
    lio.resolve_backend("io_uring")  # the probe is cached before the limit drops
    lio.io.reader._ensure_fd_limit = lambda needed: None  # it would raise the soft limit again
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    base = len(os.listdir("/proc/self/fd"))
    seen = []
    for n in range(base - 3, base + 5):
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
        try:
            r = lio.Reader([path], backend="io_uring")
            ok = r.read(0, 0, 4096).tobytes() == open(path, "rb").read(4096) if n > base + 2 else True
            seen.append(["ok", ok])
            del r
        except Exception as exc:
            seen.append([type(exc).__name__, getattr(exc, "errno", None), str(exc)])
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(json.dumps(seen))
    """
)


@needs_uring
def test_io_uring_ring_refused_for_descriptors_is_a_resource_error(make_file):
    """A ring the kernel refuses for lack of a resource (EMFILE under RLIMIT_NOFILE,
    ENOMEM under RLIMIT_MEMLOCK on older kernels) raised UnsupportedError ("not
    available here"), which callers do not treat as an OSError. It is now
    ResourceError (an OSError) with the errno and the call."""
    f = make_file(3 * 4096)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
    out = subprocess.run([sys.executable, "-c", URING_FD_LIMIT_CHILD, f.path], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    kinds = [s[0] for s in seen]
    assert "UnsupportedError" not in kinds, seen
    assert "ResourceError" in kinds and kinds[-1] == "ok" and seen[-1][1] is True, seen
    for s in seen:
        if s[0] == "ResourceError":
            assert s[1] == errno.EMFILE and "io_uring_queue_init" in s[2], s
        elif s[0] != "ok":  # an open of the file itself: names it
            assert s[1] == errno.EMFILE and f.path in s[2], s


THREAD_LIMIT_CHILD = textwrap.dedent(
    r"""
    import json, os, resource, sys
    import numpy as np
    import llmio_native as lio
    path, size = sys.argv[1], int(sys.argv[2])
    def tasks(): return len(os.listdir("/proc/self/task"))
    base = tasks()
    out = {"base": base}
    # Two more threads than this process has now: the third worker is refused.
    resource.setrlimit(resource.RLIMIT_NPROC, (base + 2, base + 64))
    if os.geteuid() == 0:  # root ignores RLIMIT_NPROC
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    try:
        lio.Reader([path], backend="threads", num_threads=8)
        out["raised"] = None
    except Exception as exc:
        out.update(raised=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc),
                   is_oserror=isinstance(exc, OSError), is_resource=isinstance(exc, lio.errors.ResourceError))
    out["tasks_after"] = tasks()
    resource.setrlimit(resource.RLIMIT_NPROC, (base + 64, base + 64))
    r = lio.Reader([path], backend="threads", num_threads=8)
    out["tasks_ok"] = tasks()
    out["exact"] = r.read(0, 1, size - 1).tobytes() == open(path, "rb").read()[1:]
    print(json.dumps(out))
    """
)


def test_thread_refused_by_os_raises_resource_error_not_abort():
    """Regression (issue 9): when the OS refused a worker thread (RLIMIT_NPROC, a pids
    limit) the process died with 'terminate called without an active exception' (exit
    134). Now Reader raises ResourceError (an OSError, EAGAIN) naming what was started
    and how many, with the workers already started joined, and the process goes on."""
    d = tempfile.mkdtemp(prefix="llmio-nproc-", dir="/tmp")
    try:
        os.chmod(d, 0o755)  # readable after the child drops root
        path = os.path.join(d, "f.bin")
        data = os.urandom(3 * 4096 + 5)
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", THREAD_LIMIT_CHILD, path, str(len(data))],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["raised"] == "ResourceError" and res["is_oserror"] and res["is_resource"], res
        assert res["errno"] == errno.EAGAIN, res
        assert "thread engine workers" in res["message"] and "thread 3 of 8" in res["message"], res
        assert res["tasks_after"] == res["base"], res  # the two started workers were joined
        assert res["tasks_ok"] == res["base"] + 8 and res["exact"], res
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("bad", [0, -1, -(2**31), 1025, 2**32 + 1, 10**9])
def test_num_threads_out_of_range_raises_value_error_naming_it(make_file, bad):
    """num_threads is checked (an int64 above 2**32 used to wrap to a small count, and a
    huge one went to the OS as a thread storm)."""
    f = make_file(100)
    with pytest.raises(ValueError, match=r"num_threads must be between 1 and 1024, got " + str(bad)):
        lio.Reader([f.path], backend="threads", num_threads=bad)
    with pytest.raises(ValueError, match=r"queue_depth must be between 1 and 65536"):
        lio.Reader([f.path], backend="threads", queue_depth=2**32 + bad if bad > 0 else bad)


PERMISSION_CHILD = textwrap.dedent(
    r"""
    import json, os, sys, resource  # everything imported before giving up root
    import llmio_native as lio
    try:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    except OSError as exc:
        print(json.dumps({"setuid": str(exc)})); sys.exit(0)
    try:
        lio.Reader([sys.argv[1]], backend="threads")
        print(json.dumps({"raised": None}))
    except OSError as exc:
        print(json.dumps({"raised": type(exc).__name__, "errno": exc.errno,
                          "filename": exc.filename, "message": str(exc)}))
    """
)


def test_permission_denied_raises_permission_error_naming_it(make_file):
    if os.geteuid() != 0:
        f = make_file(100)
        os.chmod(f.path, 0)
        with pytest.raises(PermissionError) as ei:
            lio.Reader([f.path])
        assert ei.value.errno == errno.EACCES and ei.value.filename == f.path
        return
    # Root reads files whatever their mode: drop to nobody in a child process, with the
    # file in a directory nobody may enter, so only the file's own mode refuses.
    d = tempfile.mkdtemp(prefix="llmio-perm-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "locked.bin")
        with open(path, "wb") as fh:
            fh.write(b"x" * 100)
        os.chmod(path, 0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
        out = subprocess.run([sys.executable, "-c", PERMISSION_CHILD, path], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if "setuid" in res:
            pytest.skip(f"running as root and cannot drop privileges to test EACCES: {res['setuid']}")
        assert res["raised"] == "PermissionError" and res["errno"] == errno.EACCES, res
        assert res["filename"] == path and path in res["message"]
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_read_past_eof_raises_short_read_naming_file_offset_size(make_file, backend, direct):
    f = make_file(5000)
    r = lio.Reader([f.path], backend=backend, direct=direct)
    for off, n in [(4990, 11), (5000, 1), (0, 5001), (4096, 4096), (10**12, 1)]:
        with pytest.raises(lio.ShortReadError) as ei:
            r.read(0, off, n)
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.ENODATA
        assert e.filename == f.path and f.path in str(e)
        assert f"@ {off} " in str(e) and f"+{n}" in str(e) and "5000" in str(e), str(e)
    with pytest.raises(lio.ShortReadError):
        r.read_into(0, 0, np.empty(5001, np.uint8))
    with pytest.raises(lio.ShortReadError):
        r.read_batch([(0, 0, 10), (0, 4999, 2)])
    assert r.read(0, 4999, 1).tobytes() == f.data[-1:]  # the last byte itself is fine


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_failed_batch_is_validated_before_any_read(make_file, backend, direct):
    a, b = make_file(5000, seed=1), make_file(3 * 4096 + 7, seed=2)
    r = lio.Reader([a.path, b.path], backend=backend, direct=direct)
    before = r.stats()
    kinds = ["numpy", "numpy-odd", "aligned", "bytearray", "torch-odd"]
    bad_requests = [
        ((0, 4990, np.empty(11, np.uint8)), lio.ShortReadError),  # past EOF
        ((2, 0, np.empty(4, np.uint8)), IndexError),  # no such file
        ((1, -1, np.empty(4, np.uint8)), ValueError),  # negative offset
        ((1, 0, b"read-only"), TypeError),  # read-only destination
        ((1, 0, np.zeros((4, 4), np.uint8)[:, 1]), ValueError),  # not contiguous
    ]
    for bad, exc in bad_requests:
        for where in (0, 2, 5):  # first, middle, last
            dsts = [guarded(k, 4097) for k in kinds]
            reqs = [(k % 2, 1, d[0]) for k, d in enumerate(dsts)]
            reqs.insert(where, bad)
            with pytest.raises(exc):
                r.read_batch_into(reqs)
            for k, d in zip(kinds, dsts):
                assert d[1]() == bytes([SENTINEL]) * 4097, f"{k} written before {exc.__name__} was raised"
                assert d[2]()
    with pytest.raises(lio.ShortReadError):
        r.read_batch([(0, 0, 10), (1, 0, b.size + 1)])
    with pytest.raises(IndexError):
        r.read_batch([(0, 0, 10), (7, 0, 1)])
    after = r.stats()
    for key in ("batches", "requests", "bytes", "ops_direct", "ops_buffered"):
        assert after[key] == before[key], f"a rejected batch moved stats()[{key!r}]"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("cut", [4096 + 100, 2 * 4096], ids=["cut-unaligned", "cut-aligned"])
def test_file_truncated_after_open_raises_short_read(make_file, backend, direct, cut):
    f = make_file(5 * 4096 + 11)
    r = lio.Reader([f.path], backend=backend, direct=direct, max_io_bytes=8192)
    assert r.read(0, 0, f.size).tobytes() == f.data
    os.truncate(f.path, cut)
    assert r.file_size(0) == f.size  # the size when it was opened
    assert r.read(0, 1, 4000).tobytes() == f.data[1:4001]  # what is left still reads
    lost = [(4096, 3 * 4096), (cut, 1), (cut + 1, 100), (cut - 5, 10), (0, f.size)]
    for off, n in lost:
        with pytest.raises(lio.ShortReadError) as ei:
            r.read(0, off, n)
        e = ei.value
        assert e.errno == errno.ENODATA and e.filename == f.path
        assert "end of file" in str(e) and f.path in str(e), str(e)
        with pytest.raises(lio.ShortReadError):
            r.read_into(0, off, np.empty(n + 1, np.uint8)[1:])
    with pytest.raises(lio.ShortReadError):
        r.read_batch([(0, 0, 10), (0, 3 * 4096, 5000)])
    assert r.read(0, 5, 4000).tobytes() == f.data[5:4005]  # the engine still works


def test_failed_batch_returns_bounce_buffers_to_ring(make_file, backend):
    """Regression: on io_uring, an op partly read when another op of its batch failed kept
    its bounce buffer; with queue_depth=2 two such batches left the ring none, and the next
    unaligned read spun forever."""
    f = make_file(5 * 4096)
    r = lio.Reader([f.path], backend=backend, direct=True, queue_depth=2)
    os.truncate(f.path, 2 * 4096)  # a direct read of [0, 16 KiB) now stops, aligned, at 8 KiB

    def fail_batches() -> None:
        for _ in range(8):
            past_eof = lio.empty_aligned(4096)  # aligned: no bounce buffer, fails at once
            partial = np.empty(3 * 4096 + 1, np.uint8)[1:]  # bounce, read partly, then retried
            with pytest.raises(lio.ShortReadError):
                r.read_batch_into([(0, 3 * 4096, past_eof), (0, 1, partial)])

    call_with_deadline(fail_batches)
    odd = np.empty(101, np.uint8)[1:]
    call_with_deadline(lambda: r.read_into(0, 3, odd))
    assert odd.tobytes() == f.data[3:103]
    assert call_with_deadline(lambda: r.read(0, 1, 8000)).tobytes() == f.data[1:8001]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_eio_raises_oserror_naming_file(make_file, backend, direct, faults):
    good = make_file(20000, name="good.bin")
    bad = make_file(20000, name="bad-sector.bin")
    r = lio.Reader([good.path, bad.path], backend=backend, direct=direct, max_io_bytes=8192)
    faults("eio:bad-sector")
    with pytest.raises(OSError) as ei:
        r.read(1, 8192, 100)
    e = ei.value
    assert e.errno == errno.EIO and not isinstance(e, lio.ShortReadError)
    assert e.filename == bad.path and "bad-sector.bin" in str(e) and "@ 8192" in str(e), str(e)
    with pytest.raises(OSError) as ei:
        r.read_into(1, 3, np.empty(9000, np.uint8))
    assert ei.value.errno == errno.EIO and ei.value.filename == bad.path
    with pytest.raises(OSError) as ei:
        r.read_batch([(0, 0, 100), (1, 0, 20000), (0, 5, 15000)])
    assert ei.value.errno == errno.EIO and ei.value.filename == bad.path
    assert r.read(0, 1, 19999).tobytes() == good.data[1:]  # other files unaffected
    faults("")
    assert r.read(1, 1, 19999).tobytes() == bad.data[1:]  # and nothing stuck once the disk recovers


def test_bad_file_index_raises_index_error(make_file, backend):
    f = make_file(100)
    r = lio.Reader([f.path], backend=backend)
    buf = np.full(4, SENTINEL, np.uint8)
    for call in (
        lambda: r.read(1, 0, 1),
        lambda: r.read(-1, 0, 1),
        lambda: r.read_into(5, 0, buf),
        lambda: r.read_batch([(0, 0, 1), (1, 0, 1)]),
        lambda: r.read_batch_into([(0, 0, buf), (3, 0, np.empty(1, np.uint8))]),
        lambda: r.file_size(1),
        lambda: lio.Reader([], backend=backend).read(0, 0, 0),
    ):
        with pytest.raises(IndexError):
            call()
    assert (buf == SENTINEL).all()


def test_negative_offset_or_length_raises_value_error(make_file, backend):
    f = make_file(100)
    r = lio.Reader([f.path], backend=backend)
    for call in (
        lambda: r.read(0, -1, 1),
        lambda: r.read(0, 0, -1),
        lambda: r.read_into(0, -5, np.empty(4, np.uint8)),
        lambda: r.read_batch([(0, -1, 1)]),
        lambda: r.read_batch([(0, 0, -1)]),
        lambda: r.read_batch_into([(0, -1, np.empty(4, np.uint8))]),
    ):
        with pytest.raises(ValueError, match=">= 0"):
            call()


def test_read_into_rejects_read_only_and_non_contiguous(make_file, backend):
    f = make_file(100)
    r = lio.Reader([f.path], backend=backend)
    ro = np.full(10, SENTINEL, np.uint8)
    ro.setflags(write=False)
    for buf in (b"0123456789", ro, memoryview(b"0123456789")):
        with pytest.raises(TypeError, match="writable"):
            r.read_into(0, 0, buf)
    assert (ro == SENTINEL).all()
    base = np.full((4, 4), SENTINEL, np.uint8)
    tbase = torch.full((4, 4), SENTINEL, dtype=torch.uint8)
    for buf in (base[:, 1], base[::-1], tbase[:, 1], tbase.t(), tbase[::2]):
        with pytest.raises(ValueError, match="contiguous"):
            r.read_into(0, 0, buf)
    assert (base == SENTINEL).all() and bool((tbase == SENTINEL).all())


def test_bad_options_raise_value_error(make_file):
    f = make_file(100)
    for kwargs in ({"backend": "bogus"}, {"queue_depth": 0}, {"num_threads": 0}, {"max_io_bytes": 100}):
        with pytest.raises(ValueError):
            lio.Reader([f.path], **kwargs)


# ---------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("requested", ["io_uring", "auto", "threads"])
def test_env_forces_threads(make_file, monkeypatch, requested):
    f = make_file(3 * 4096 + 7)
    monkeypatch.setenv("LLMIO_BACKEND", "threads")
    r = lio.Reader([f.path], backend=requested, num_threads=5)
    assert r.backend == "threads"
    s = r.stats()
    assert s["backend"] == "threads" and s["num_threads"] == 5 and "queue_depth" not in s
    assert r.read(0, 1, f.size - 1).tobytes() == f.data[1:]
    assert lio.info()["backend"] == "threads"


def _io_uring_sysctl() -> int:
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


@needs_uring_build
@pytest.mark.parametrize(
    "fault,err,words",
    [("uring_eperm", errno.EPERM, ("EPERM", "seccomp")), ("uring_enosys", errno.ENOSYS, ("ENOSYS",))],
)
def test_io_uring_unusable_auto_picks_threads_forced_raises(make_file, faults, monkeypatch, fault, err, words):
    f = make_file(3 * 4096 + 7)
    faults(fault)
    probe = lio.info()["io_uring"]
    assert probe["compiled"] is True and probe["usable"] is False and probe["errno"] == err
    if _io_uring_sysctl() == 0:  # otherwise the sysctl is named as the reason instead
        assert all(w in probe["reason"] for w in words), probe["reason"]
    assert lio.info()["backend"] == "threads" and lio.resolve_backend("auto") == "threads"
    r = lio.Reader([f.path], backend="auto")
    assert r.backend == "threads" and r.stats()["backend"] == "threads"
    assert r.read(0, 3, f.size - 3).tobytes() == f.data[3:]
    with pytest.raises(lio.UnsupportedError) as ei:
        lio.Reader([f.path], backend="io_uring")
    assert probe["reason"] in str(ei.value)
    monkeypatch.setenv("LLMIO_BACKEND", "io_uring")
    for requested in ("auto", "threads", "io_uring"):  # the environment wins
        with pytest.raises(lio.UnsupportedError, match="LLMIO_BACKEND") as ei:
            lio.Reader([f.path], backend=requested)
        assert probe["reason"] in str(ei.value)
    monkeypatch.delenv("LLMIO_BACKEND")
    faults("")  # the cached probe is reset with the faults
    assert lio.info()["io_uring"]["usable"] is IO_URING_USABLE


SECCOMP_CHILD = textwrap.dedent(
    r"""
    import ctypes, errno, json, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    AUDIT_ARCH_X86_64, NR_IO_URING_SETUP = 0xC000003E, 425
    LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
    RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000

    def stmt(code, k):
        return struct.pack("HBBI", code, 0, 0, k)

    def jump(code, k, jt, jf):
        return struct.pack("HBBI", code, jt, jf, k)

    prog = b"".join([
        stmt(LD_W_ABS, 4),                          # seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 0, 3),       # another arch: allow
        stmt(LD_W_ABS, 0),                          # seccomp_data.nr
        jump(JEQ_K, NR_IO_URING_SETUP, 0, 1),
        stmt(RET_K, RET_ERRNO | errno.EPERM),       # io_uring_setup: EPERM, as Docker's profile
        stmt(RET_K, RET_ALLOW),
    ])
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        print(json.dumps({"nofilter": errno.errorcode.get(ctypes.get_errno(), "?")}))
        sys.exit(0)

    import llmio_native as lio
    path = sys.argv[1]
    data = open(path, "rb").read()
    probe = lio.info()["io_uring"]
    r = lio.Reader([path], backend="auto")
    exact = all(r.read(0, o, n).tobytes() == data[o:o + n] for o, n in [(0, len(data)), (7, 4097), (4096, 1)])
    odd = bytearray(len(data) - 1)
    r.read_into(0, 1, odd)
    try:
        lio.Reader([path], backend="io_uring")
        forced = None
    except lio.UnsupportedError as exc:
        forced = str(exc)
    print(json.dumps({"probe": probe, "backend": r.backend, "exact": exact and bytes(odd) == data[1:],
                      "forced": forced}))
    """
)


@needs_uring_build
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64 syscalls")
def test_real_seccomp_denial_falls_back_to_threads(make_file):
    f = make_file(3 * 4096 + 7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
    out = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, f.path], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "nofilter" in res:
        pytest.skip(f"cannot install a seccomp filter here ({res['nofilter']})")
    assert res["probe"]["usable"] is False and res["probe"]["errno"] == errno.EPERM, res
    assert "seccomp" in res["probe"]["reason"]
    assert res["backend"] == "threads" and res["exact"] is True
    assert res["forced"] is not None and "EPERM" in res["forced"]


@pytest.mark.parametrize("fault", ["direct_open_einval", "direct_read_einval"])
def test_o_direct_refused_falls_back_once_and_reads_exact(make_file, backend, faults, fault):
    f = make_file(MIB + 3 * 4096 + 7)
    faults(fault)
    r = lio.Reader([f.path], backend=backend, direct=True, max_io_bytes=4096, num_threads=8)
    # The first read is split into hundreds of ops that all meet EINVAL at once.
    assert r.read(0, 0, f.size).tobytes() == f.data
    for off, n in [(1, 4097), (4096, 4096), (f.size - 1, 1), (3, MIB)]:
        assert r.read(0, off, n).tobytes() == py_read(f.path, off, n)
        odd = np.empty(n + 1, np.uint8)[1:]
        r.read_into(0, off, odd)
        assert odd.tobytes() == f.data[off : off + n]
    outs = r.read_batch([(0, 5, 100), (0, 8192, 8192)])
    assert outs[0].tobytes() == f.data[5:105] and outs[1].tobytes() == f.data[8192:16384]
    s = r.stats()
    assert s["direct_active"] == [False] and s["direct_requested"] is True
    assert len(s["direct_fallbacks"]) == 1, s["direct_fallbacks"]
    why = s["direct_fallbacks"][0]
    assert f.path in why and ("EINVAL" in why or "Invalid argument" in why), why
    assert s["ops_direct"] == 0 and s["ops_buffered"] > 0 and s["bytes_direct"] == 0
    # Buffered readers never record a fallback: there was nothing to fall back from.
    rb = lio.Reader([f.path], backend=backend, direct=False)
    assert rb.read(0, 1, 10).tobytes() == f.data[1:11]
    assert rb.stats()["direct_fallbacks"] == [] and rb.stats()["direct_active"] == [False]


# ---------------------------------------------------------------- threads, pickling, fork


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_many_python_threads_share_one_reader(make_file, backend, direct):
    files = [make_file(3 * MIB + 5, seed=1), make_file(4097, seed=2)]
    r = lio.Reader([f.path for f in files], backend=backend, direct=direct, max_io_bytes=64 * KIB,
                   queue_depth=8, num_threads=4)
    mismatches: list[str] = []
    requests: list[int] = []
    calls = 60

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(calls):
            i = rng.randrange(2)
            data = files[i].data
            off = rng.randrange(len(data) + 1)
            n = rng.randrange(min(len(data) - off, 300 * KIB) + 1)
            kind = rng.randrange(3)
            requests.append(3 if kind == 2 else 1)
            if kind == 0:
                got = r.read(i, off, n).tobytes()
            elif kind == 1:
                buf = np.empty(n + 1, np.uint8)[1:]
                r.read_into(i, off, buf)
                got = buf.tobytes()
            else:
                outs = r.read_batch([(i, off, n), (1, 0, 4097), (0, 0, 0)])
                got = outs[0].tobytes()
                if outs[1].tobytes() != files[1].data:
                    mismatches.append(f"{seed}: batch file 1")
            if got != data[off : off + n]:
                mismatches.append(f"{seed}: file {i} @ {off} (+{n}) kind {kind}")

    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in range(8)]

    def run_all() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    call_with_deadline(run_all, 120)
    assert mismatches == []
    s = r.stats()
    assert s["batches"] == 8 * calls and s["requests"] == sum(requests)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_pickle_roundtrip_recreates_native_handle(make_file, backend, direct):
    f = make_file(3 * 4096 + 7)
    r = lio.Reader([f.path], backend=backend, direct=direct, queue_depth=16, num_threads=3, max_io_bytes=8192)
    assert r.read(0, 1, 100).tobytes() == f.data[1:101]
    blob = pickle.dumps(r)
    r2 = pickle.loads(blob)
    assert r2._native is None  # nothing native travelled
    assert (r2.paths, r2.backend, r2.direct, r2.queue_depth, r2.num_threads, r2.max_io_bytes) == (
        [f.path], backend, direct, 16, 3, 8192)
    assert r2.read(0, 3, f.size - 3).tobytes() == f.data[3:]
    assert r2._native is not None and r2._native is not r._native
    assert r2.stats()["requests"] == 1  # fresh counters: a new handle
    r3 = copy.deepcopy(r)
    assert r3.read_batch([(0, 4096, 4097)])[0].tobytes() == f.data[4096:8193]
    assert r.read(0, 0, f.size).tobytes() == f.data  # the original is untouched


@needs_uring
def test_unpickled_auto_reader_picks_threads_where_io_uring_unusable(make_file, faults):
    """Regression: a Reader(backend="auto") pickled where io_uring works kept "io_uring"
    and raised UnsupportedError when unpickled where it does not (a seccomp'd worker)."""
    f = make_file(4097)
    auto = pickle.dumps(lio.Reader([f.path], backend="auto"))
    forced = pickle.dumps(lio.Reader([f.path], backend="io_uring"))
    faults("uring_eperm")
    r = pickle.loads(auto)
    assert r.backend == "threads"
    assert r.read(0, 1, 4096).tobytes() == f.data[1:]
    with pytest.raises(lio.UnsupportedError):
        pickle.loads(forced)  # explicitly asked for: raises, never silently changes
    faults("")
    assert pickle.loads(auto).backend == "io_uring"


def test_reader_used_in_forked_child_does_not_hang(make_file, backend):
    """Regression: a threads-engine Reader used in the parent and then in a forked child
    (how DataLoader workers get their dataset) hung in the child: replacing the inherited
    handle joined worker threads that do not exist there."""
    f = make_file(3 * 4096 + 7)
    r = lio.Reader([f.path], backend=backend, max_io_bytes=4096)
    assert r.read(0, 0, f.size).tobytes() == f.data  # the parent's engine is live
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            ok = r.read(0, 1, f.size - 1).tobytes() == f.data[1:]
            ok = ok and r.read_batch([(0, 4096, 4097)])[0].tobytes() == f.data[4096:8193]
            code = 0 if ok else 3
        finally:
            os._exit(code)

    def wait_child() -> int:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    try:
        code = call_with_deadline(wait_child, 60)
    except AssertionError:
        os.kill(pid, 9)
        raise
    assert code == 0, f"child exited with {code} (3: wrong bytes)"
    assert r.read(0, 2, 10).tobytes() == f.data[2:12]  # the parent's Reader still works


class _ShardWindows(torch.utils.data.Dataset):
    """A dataset holding a Reader, as users write them."""

    def __init__(self, reader: lio.Reader, n: int, size: int) -> None:
        self.reader, self.n, self.size = reader, n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> torch.Tensor:
        off = (k * 7919) % (self.size - 100)
        return torch.from_numpy(self.reader.read(0, off, 100))


def test_reader_in_dataloader_workers(make_file, backend):
    f = make_file(64 * KIB + 3)
    r = lio.Reader([f.path], backend=backend)
    r.read(0, 0, 10)
    ds = _ShardWindows(r, 24, f.size)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, timeout=60)
    got = torch.cat([b.reshape(-1) for b in loader]).numpy().tobytes()
    expect = b"".join(f.data[(k * 7919) % (f.size - 100) :][:100] for k in range(24))
    assert got == expect


# ---------------------------------------------------------------- stats


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_stats_counters_move_as_expected(make_file, backend, direct):
    f = make_file(3 * 4096 + 7)
    r = lio.Reader([f.path], backend=backend, direct=direct, max_io_bytes=8192, queue_depth=16, num_threads=3)
    s0 = r.stats()
    if direct and not s0["direct_active"][0]:
        pytest.skip(f"the file system of {f.path} refuses O_DIRECT: {s0['direct_fallbacks']}")
    for key in ("batches", "requests", "bytes", "ops_direct", "ops_buffered", "bounce_ops", "bounce_bytes",
                "fixed_buffer_ops", "retries"):
        assert s0[key] == 0, key
    assert s0["direct_requested"] is direct and s0["direct_active"] == [direct] and s0["direct_fallbacks"] == []
    assert s0["max_io_bytes"] == 8192 and s0["backend"] == backend

    reqs = [(0, 1, 10), (0, 4096, 4096), (0, 5, 3 * 4096), (0, 0, 0), (0, f.size - 7, 7)]
    r.read_batch(reqs)
    r.read(0, 3, 12000)
    odd = np.empty(101, np.uint8)[1:]
    r.read_into(0, 3, odd)  # not congruent with its offset: a bounce read when direct
    requested = sum(n for _, _, n in reqs) + 12000 + 100
    s = r.stats()
    assert s["requests"] == len(reqs) + 2 and s["batches"] == 3 and s["bytes"] == requested
    assert s["wait_s"] > 0
    if direct:
        assert s["ops_direct"] >= 3 and s["ops_buffered"] == 0
        assert s["bytes_direct"] >= requested  # aligned reads cover at least what was asked
        # read()/read_batch() allocate padded, aligned arrays: only the odd read bounced.
        assert s["bounce_ops"] == 1 and s["bounce_bytes"] == 100
    else:
        assert s["ops_direct"] == 0 and s["bytes_direct"] == 0 and s["ops_buffered"] >= 3
        assert s["bytes_buffered"] == requested and s["bounce_ops"] == 0
    if backend == "io_uring":
        assert s["queue_depth"] == 16 and s["registered_files"] == 1 and s["submits"] >= 3
        if direct and s["registered_buffers"]:
            assert s["fixed_buffer_ops"] >= 1  # the bounce read used a registered buffer
        if not direct:
            assert s["fixed_buffer_ops"] == 0
    else:
        assert s["num_threads"] == 3 and s["submits"] == 0 and s["fixed_buffer_ops"] == 0


@needs_uring
def test_ring_failure_with_reads_in_flight_returns_bounce_buffers(tmp_path):
    """io_uring_submit_and_wait failing with bounce reads in flight (fault
    uring_submit_eio): the batch raises EIO, and later unaligned reads on the same ring
    still complete. Before the fix the failed batch kept the ring's bounce buffers, and
    the next bounce read waited for a free one forever (run in a subprocess with a timeout)."""
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    data.tofile(path)
    script = textwrap.dedent(f"""
        import errno, numpy as np, llmio_native as lio
        from llmio_native import _core
        r = lio.Reader([{str(path)!r}], backend='io_uring', direct=True, queue_depth=8)
        reqs = [(0, 4096 * k + 7, 100) for k in range(32)]
        buf = lio.empty_aligned(32 * 256)
        # destinations not congruent with the file offsets: every read goes through a bounce buffer
        dsts = [buf[256 * k + 1: 256 * k + 101] for k in range(32)]
        for _ in range(3):
            _core._set_faults('uring_submit_eio')
            try:
                r.read_batch_into([(f, off, d) for (f, off, n), d in zip(reqs, dsts)])
                raise SystemExit('no error')
            except OSError as e:
                assert e.errno == errno.EIO and 'io_uring_submit_and_wait' in str(e), e
            finally:
                _core._set_faults('')
        data = np.fromfile({str(path)!r}, dtype=np.uint8)
        r.read_batch_into([(f, off, d) for (f, off, n), d in zip(reqs, dsts)])
        assert all(bytes(d) == data[off:off + n].tobytes() for d, (_, off, n) in zip(dsts, reqs))
        assert r.stats()['bounce_ops'] >= 32, r.stats()
        print('ring ok')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "ring ok" in out.stdout


@needs_uring
def test_ring_failing_before_the_kernel_takes_the_reads_is_retired(tmp_path):
    """io_uring_enter failing before the kernel took the queued reads (fault
    uring_enter_eio): the batch raises EIO at once, and the Reader's next batches (bounce
    and direct reads) complete on a fresh ring. Before the fix the failed batch waited in
    io_uring_wait_cqe for completions of reads that were never submitted (forever), and a
    ring whose queue still held them would have submitted them into the caller's memory on
    its next use. Run in a subprocess with a timeout."""
    path = tmp_path / "f.bin"
    data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    data.tofile(path)
    script = textwrap.dedent(f"""
        import errno, numpy as np, llmio_native as lio
        from llmio_native import _core
        data = np.fromfile({str(path)!r}, dtype=np.uint8)
        r = lio.Reader([{str(path)!r}], backend='io_uring', direct=True, queue_depth=8)
        reqs = [(0, 4096 * k + 7, 100) for k in range(32)] + [(0, 65536 * k, 65536) for k in range(1, 8)]
        def batch():
            bufs = [lio.empty_aligned(8192 + n) for _, _, n in reqs]
            # bounce reads (destination not congruent with the offset) and direct ones
            dsts = [b[1:1 + n] if n == 100 else b[:n] for b, (_, _, n) in zip(bufs, reqs)]
            r.read_batch_into([(f, off, d) for (f, off, n), d in zip(reqs, dsts)])
            assert all(bytes(d) == data[off:off + n].tobytes() for d, (_, off, n) in zip(dsts, reqs))
        batch()
        for _ in range(3):
            _core._set_faults('uring_enter_eio')
            try:
                batch()
                raise SystemExit('no error')
            except OSError as e:
                assert e.errno == errno.EIO and 'io_uring_submit_and_wait' in str(e), e
            finally:
                _core._set_faults('')
            batch()
            batch()
        print('retired ok')
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a read batch hung after io_uring_enter failed with reads queued")
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "retired ok" in out.stdout


@pytest.mark.parametrize("backend", ENGINES)
def test_zero_length_reads_up_to_eof_and_never_past_it(make_file, backend):
    f = make_file(5000)
    r = lio.Reader([f.path], backend=backend)
    assert r.read(0, 5000, 0).size == 0 and r.read(0, 0, 0).size == 0
    assert [x.size for x in r.read_batch([(0, 5000, 0), (0, 10, 0)])] == [0, 0]
    for call in (lambda: r.read(0, 5001, 0), lambda: r.read_batch([(0, 0, 1), (0, 5001, 0)]),
                 lambda: r.read_into(0, 9999, np.empty(0, np.uint8))):
        with pytest.raises(lio.ShortReadError, match=r"@ (5001|9999) \(\+0\): past end of file \(size 5000 bytes\)") as ei:
            call()
        assert ei.value.filename == f.path


# ---------------------------------------------------------------- vectorised reads, many files, defaults
# (merged from the former tests/test_engine.py; its other cases are covered above)


def test_read_many_scatter(make_file, backend):
    files = [make_file(s, seed=k) for k, s in enumerate((3 * 4096 + 7, 70000))]
    r = lio.Reader([f.path for f in files], backend=backend)
    rng = np.random.default_rng(0)
    n = 500
    fidx = rng.integers(0, 2, n)
    sizes = np.array([files[i].size for i in fidx])
    nbytes = rng.integers(0, 5000, n).clip(max=sizes)
    offs = (rng.random(n) * (sizes - nbytes + 1)).astype(np.int64)
    out = np.zeros(int(nbytes.sum()) + 11, np.uint8)
    r.read_many(fidx, offs, nbytes, out)
    pos = 0
    for i, o, k in zip(fidx, offs, nbytes):
        assert out[pos : pos + k].tobytes() == files[i].data[o : o + k]
        pos += k
    assert (out[pos:] == 0).all()  # nothing written past the requests
    # Explicit placement into an aligned buffer: 4 KiB reads at 4 KiB offsets go direct.
    dst = lio.empty_aligned(4 * 4096)
    r.read_many(0, np.array([8192, 0, 4096, 4096]), 4096, dst, np.array([0, 4096, 8192, 12288]))
    d0 = files[0].data
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


@needs_uring
def test_io_uring_default_queue_depth_registered_files_and_fixed_buffers(make_file):
    f = make_file(3 * 4096 + 7)
    r = lio.Reader([f.path], backend="io_uring", direct=True)
    r.read_batch([(0, 1, 10), (0, 4096, 4096), (0, 5, 3 * 4096)])
    odd = np.empty(101, np.uint8)[1:]
    r.read_into(0, 3, odd)
    s = r.stats()
    assert s["bytes"] == 10 + 4096 + 3 * 4096 + 100
    assert s["requests"] == 4 and s["batches"] == 2
    assert s["registered_files"] == 1
    assert s["fixed_buffer_ops"] >= 1  # the odd-address read bounced through a fixed buffer
    assert s["submits"] >= 2 and s["queue_depth"] == 64
