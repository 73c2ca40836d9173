"""Writer: exact bytes from both engines for odd sizes and odd split points, O_DIRECT on
and off (and refused), the padded tail truncated away, errors that name the file and
offset (injected ENOSPC/EIO, a real full tmpfs, RLIMIT_FSIZE), non-regular and read-only
targets, abort, fsync_path and write_file.

The oracle is the source bytes themselves, compared with a plain Python read of the file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmio_native import _core
from llmio_native.errors import UnsupportedError
from llmio_native.io import Writer, fsync_path, write_file

from conftest import IO_URING_USABLE
from test_reader import call_with_deadline

pytestmark = pytest.mark.usefixtures("clean_io_env")

KIB, MIB = 1 << 10, 1 << 20
# chunk_bytes=8192 with 32 KiB of staging: 4 chunks, so every size here cycles the ring of chunks.
SMALL = dict(chunk_bytes=8192, staging_bytes=32 * KIB, queue_depth=3)
SIZES = [0, 1, 31, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 7, MIB + 1]
needs_uring = pytest.mark.skipif(not IO_URING_USABLE, reason="io_uring unusable here")


def source(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng([seed, n]).integers(0, 256, n, dtype=np.uint8).tobytes()


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def splits(n: int, rng: np.random.Generator) -> list[int]:
    """Cut points for n bytes: odd pieces, empty pieces, pieces across chunk boundaries."""
    cuts = {0, n}
    for k in (1, 3, 4095, 4097, 8191, 8193, 9000):
        if k < n:
            cuts.add(k)
    cuts.update(int(x) for x in rng.integers(0, n + 1, size=min(n, 12)))
    return sorted(cuts) + [n]  # n twice: one empty write at the end


def write_pieces(w: Writer, data: bytes, cuts: list[int]) -> None:
    for a, b in zip(cuts, cuts[1:]):
        assert w.tell() == a
        assert w.write(data[a:b]) == a  # returns the offset it starts at
    assert w.tell() == len(data)


# ---------------------------------------------------------------- exact bytes


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size", SIZES)
def test_exact_bytes_odd_sizes_and_splits(tmp_path, backend, direct, size):
    data = source(size)
    path = tmp_path / "out.bin"
    w = Writer(path, backend=backend, direct=direct, **SMALL)
    assert w.backend == backend and w.path == str(path)
    write_pieces(w, data, splits(size, np.random.default_rng(size)))
    w.close()
    assert file_bytes(path) == data
    assert os.path.getsize(path) == size  # padded O_DIRECT tail truncated away
    s = w.stats()
    assert s["bytes"] == size and s["closed"] and w.closed
    assert s["ops"] == -(-size // 8192)  # one op per chunk, the tail included
    if direct:
        assert w.direct_active and s["direct_active"] and s["ops_buffered"] == 0
        assert s["ops_direct"] == s["ops"]
        # every direct op is whole blocks: the tail went out padded
        assert s["bytes_direct"] == -(-size // 4096) * 4096
    else:
        assert not w.direct_active and s["ops_direct"] == 0 and s["bytes_buffered"] == size
    if backend == "io_uring":
        assert s["registered_buffers"] == 1 and s["fixed_buffer_ops"] == s["ops"]


def test_default_settings_large_writes_exact(tmp_path, backend):
    """Default chunk (4 MiB): a write bigger than a chunk, then odd ones."""
    data = source(9 * MIB + 3, seed=2)
    path = tmp_path / "big.bin"
    with Writer(path, backend=backend) as w:
        assert w.write(memoryview(data)[: 5 * MIB + 1]) == 0
        assert w.write(memoryview(data)[5 * MIB + 1 : 5 * MIB + 2]) == 5 * MIB + 1
        assert w.write(data[5 * MIB + 2 :]) == 5 * MIB + 2
    assert file_bytes(path) == data
    assert w.stats()["ops"] == 3 and w.closed


def test_caller_may_reuse_its_buffer_at_once(tmp_path, backend):
    buf = bytearray(source(20000))
    expect = bytes(buf) + bytes(b ^ 0xFF for b in buf)
    path = tmp_path / "reuse.bin"
    with Writer(path, backend=backend, **SMALL) as w:
        w.write(buf)
        for i in range(len(buf)):  # overwrite the source while its chunks may be in flight
            buf[i] ^= 0xFF
        w.write(buf)
        buf[:] = bytes(len(buf))
    assert file_bytes(path) == expect


@pytest.mark.parametrize("qd", [1, 2, 64])
def test_queue_depths_exact(tmp_path, backend, qd):
    data = source(200_003, seed=qd)
    path = tmp_path / f"qd{qd}.bin"
    size = write_file(path, [data[i : i + 7777] for i in range(0, len(data), 7777)], backend=backend,
                      queue_depth=qd, chunk_bytes=4096, staging_bytes=16 * KIB)
    assert size == len(data) and file_bytes(path) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.integers(0, 20000), min_size=0, max_size=12),
    chunk=st.sampled_from([1, 4096, 5000, 12288]),
    qd=st.integers(1, 6),
    engine=st.sampled_from(["io_uring", "threads"] if IO_URING_USABLE else ["threads"]),
    direct=st.booleans(),
)
def test_property_random_write_sequences_exact(tmp_path, pieces, chunk, qd, engine, direct):
    path = tmp_path / "prop.bin"
    data = source(sum(pieces), seed=len(pieces))
    with Writer(path, backend=engine, direct=direct, chunk_bytes=chunk, staging_bytes=3 * chunk,
                queue_depth=qd) as w:
        at = 0
        for n in pieces:
            assert w.write(np.frombuffer(data, np.uint8, count=n, offset=at)) == at
            at += n
        assert w.tell() == len(data)
    assert file_bytes(path) == data
    assert w.stats()["bytes"] == len(data)


# ---------------------------------------------------------------- inputs


def test_typed_tensors_and_arrays_written_as_raw_bytes(tmp_path, backend):
    bf16 = torch.randn(1001, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    parts: list = [bf16, np.arange(12, dtype=np.float64).reshape(3, 4), torch.arange(5, dtype=torch.int64)]
    expect = bf16.view(torch.uint8).numpy().tobytes() + parts[1].tobytes() + parts[2].numpy().tobytes()
    if hasattr(torch, "float8_e4m3fn"):
        fp8 = torch.linspace(-2, 2, 333).to(torch.float8_e4m3fn)
        parts.append(fp8)
        expect += fp8.view(torch.uint8).numpy().tobytes()
    parts.append(memoryview(b"tail"))
    expect += b"tail"
    path = tmp_path / "typed.bin"
    assert write_file(path, parts, backend=backend, **SMALL) == len(expect)
    assert file_bytes(path) == expect
    back = torch.frombuffer(bytearray(file_bytes(path)[: 2002]), dtype=torch.bfloat16)
    assert torch.equal(back, bf16)


def test_bad_inputs_rejected_clearly(tmp_path, backend):
    w = Writer(tmp_path / "x.bin", backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        w.write(torch.arange(10)[::2])
    with pytest.raises(TypeError, match="C-contiguous"):
        w.write(np.arange(10, dtype=np.uint8)[::2])
    with pytest.raises(TypeError):
        w.write(12345)
    if torch.cuda.is_available():  # pragma: no cover - no GPU on the dev VM
        with pytest.raises(ValueError, match="CPU"):
            w.write(torch.zeros(4, device="cuda"))
    assert w.tell() == 0  # nothing was taken
    w.write(b"ok")
    w.close()
    assert file_bytes(tmp_path / "x.bin") == b"ok"


# ---------------------------------------------------------------- lifecycle


def test_close_is_idempotent_and_closed_writer_refuses(tmp_path, backend):
    path = tmp_path / "c.bin"
    w = Writer(path, backend=backend)
    w.write(b"abc")
    w.flush()
    w.close()
    w.close()  # idempotent
    w.abort()  # no-op once closed
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")
    with pytest.raises(ValueError, match="closed"):
        w.flush()
    assert file_bytes(path) == b"abc"


@pytest.mark.parametrize("sync", ["data", "full", "none"])
def test_sync_modes(tmp_path, backend, sync):
    path = tmp_path / f"s-{sync}.bin"
    w = Writer(path, backend=backend)
    w.write(b"x" * 5000)
    w.close(sync=sync)
    assert file_bytes(path) == b"x" * 5000


def test_bad_sync_raises_value_error_and_leaves_writer_open(tmp_path, backend):
    path = tmp_path / "b.bin"
    w = Writer(path, backend=backend)
    w.write(b"abc")
    with pytest.raises(ValueError, match="sync"):
        w.close(sync="sometimes")
    assert not w.closed
    w.close()
    with pytest.raises(ValueError, match="sync"):
        write_file(tmp_path / "c.bin", [b"a"], sync="later")


def test_context_manager_aborts_on_exception(tmp_path, backend):
    path = tmp_path / "ctx.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with Writer(path, backend=backend, **SMALL) as w:
            w.write(source(10000))
            raise RuntimeError("boom")
    assert w.closed
    # abort: full chunks reached the file, the staged tail did not (and nothing was padded)
    assert file_bytes(path) == source(10000)[:8192]


def test_existing_file_truncated_and_exclusive_refuses(tmp_path, backend):
    path = tmp_path / "e.bin"
    path.write_bytes(b"y" * 100000)
    write_file(path, [b"short"], backend=backend)
    assert file_bytes(path) == b"short"
    with pytest.raises(FileExistsError) as ei:
        Writer(path, backend=backend, exclusive=True)
    assert ei.value.errno == errno.EEXIST and ei.value.filename == str(path) and "exclusive" in str(ei.value)
    assert file_bytes(path) == b"short"  # untouched
    new = tmp_path / "new.bin"
    write_file(new, [b"n"], backend=backend, exclusive=True)
    assert file_bytes(new) == b"n"


def test_writer_does_not_pickle(tmp_path):
    import pickle

    w = Writer(tmp_path / "p.bin", backend="threads")
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(w)
    w.close()


# ---------------------------------------------------------------- O_DIRECT fallbacks


def test_tmpfs_with_direct_writes_exact(backend):
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    path = os.path.join(shm, f"llmio-writer-{os.getpid()}.bin")
    data = source(3 * 8192 + 5)
    try:
        with Writer(path, backend=backend, direct=True, **SMALL) as w:
            write_pieces(w, data, splits(len(data), np.random.default_rng(1)))
        assert file_bytes(path) == data and os.path.getsize(path) == len(data)
        s = w.stats()
        # Whether tmpfs takes O_DIRECT depends on the kernel (6.6+ does); the record is coherent.
        if s["direct_active"]:
            assert s["ops_direct"] == s["ops"] and s["fallback_reason"] == ""
        else:
            assert s["ops_buffered"] == s["ops"] and "O_DIRECT" in s["fallback_reason"]
    finally:
        os.unlink(path)


@pytest.mark.parametrize("fault,words", [("direct_open_einval", "open refused"),
                                         ("direct_write_einval", "write refused")])
def test_o_direct_refused_falls_back_once_and_writes_exact(tmp_path, backend, faults, fault, words):
    faults(fault)
    data = source(5 * 8192 + 99)
    path = tmp_path / "fb.bin"
    with Writer(path, backend=backend, direct=True, **SMALL) as w:
        write_pieces(w, data, splits(len(data), np.random.default_rng(3)))
    assert file_bytes(path) == data and os.path.getsize(path) == len(data)
    s = w.stats()
    assert not w.direct_active and s["direct_fallbacks"] == 1, s
    assert words in s["fallback_reason"], s["fallback_reason"]
    assert s["ops_direct"] == 0 and s["ops_buffered"] == s["ops"] == 6
    assert s["bytes_buffered"] == len(data)  # no padding once buffered


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("fault,err", [("write_enospc", errno.ENOSPC), ("write_eio", errno.EIO)])
def test_injected_write_error_names_path_and_offset_and_never_hangs(tmp_path, backend, faults, direct, fault, err):
    limit = 3 * 8192 + 100  # inside the fourth chunk: that one is cut short, then fails
    faults(f"{fault}:{limit}")
    data = source(10 * 8192)
    path = tmp_path / "full.bin"
    w = Writer(path, backend=backend, direct=direct, **SMALL)

    def go():
        for i in range(0, len(data), 5000):
            w.write(data[i : i + 5000])
        w.close()

    with pytest.raises(OSError) as ei:
        call_with_deadline(go, 60)
    e = ei.value
    assert type(e) is OSError and e.errno == err, e
    assert e.filename == str(path) and str(path) in str(e)
    assert "@ 24576 (+8192)" in str(e), str(e)  # the failing chunk: offset and length
    assert os.strerror(err) in str(e)
    # what got through is exact: three chunks, then the cut-short part of the fourth
    # (a direct write stops at the alignment: nothing of the fourth)
    got = file_bytes(path)
    reached = 3 * 8192 + (0 if direct else 100)
    assert len(got) == reached and got == data[:reached]
    if not w.closed:  # raised by write(): sticky, and close() reports it too
        with pytest.raises(OSError) as again:
            w.write(b"x")
        assert again.value.errno == err and "@ 24576" in str(again.value)
        with pytest.raises(OSError) as at_close:
            call_with_deadline(w.close, 30)
        assert at_close.value.errno == err
    assert w.closed
    w.abort()  # never raises
    assert len(file_bytes(path)) == reached  # nothing padded or truncated after the error



@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_chunk_landing_after_a_failed_one_is_cut_off(tmp_path, backend, faults, direct):
    """Only the fourth chunk fails (fault range [24676, 24677)); the chunks in flight behind it
    succeed, as on a real disk that is full for one write and not the next (the CI failure of
    the 2 MiB tmpfs test). The file must still be an exact prefix: no hole of zeros, then data."""
    faults("write_eio:24676-24677")
    data = source(10 * 8192)
    path = tmp_path / "hole.bin"
    landed_past = 0
    for _ in range(3):  # whether a later chunk is in flight when the error is seen is up to timing
        w = Writer(path, backend=backend, direct=direct, chunk_bytes=8192, staging_bytes=64 * KIB, queue_depth=8)
        with pytest.raises(OSError) as ei:
            call_with_deadline(lambda: (w.write(data), w.close()), 60)
        assert ei.value.errno == errno.EIO and "@ 24576 (+8192)" in str(ei.value), str(ei.value)
        w.abort()
        got = file_bytes(path)
        reached = 3 * 8192 + (0 if direct else 100)
        assert len(got) == reached and got == data[:reached]
        st = w.stats()
        landed_past += st["bytes_direct"] + st["bytes_buffered"] > reached
        path.unlink()
    # eight chunks are submitted before the first completion is reaped, so chunks 4..7 land
    assert landed_past > 0, "no chunk past the failing one was written: the test did not test the cut"

def test_error_in_first_chunk_reported_by_close(tmp_path, backend, faults):
    faults("write_enospc")
    path = tmp_path / "tiny.bin"
    w = Writer(path, backend=backend)
    assert w.write(b"abc") == 0  # staged, nothing submitted yet
    with pytest.raises(OSError) as ei:
        w.close()
    assert ei.value.errno == errno.ENOSPC and "@ 0 (+4096)" in str(ei.value) and str(path) in str(ei.value)
    assert w.closed
    w.close()  # the error was reported once; the writer is closed


def test_abort_after_error_never_raises(tmp_path, backend, faults):
    faults("write_eio:8192")
    w = Writer(tmp_path / "a.bin", backend=backend, **SMALL)

    def go():
        for k in range(40):
            w.write(source(4000, seed=k))
        w.flush()

    with pytest.raises(OSError) as ei:
        call_with_deadline(go, 60)
    assert ei.value.errno == errno.EIO
    call_with_deadline(w.abort, 30)
    assert w.closed
    w.abort()
    with pytest.raises(ValueError, match="closed"):
        w.write(b"x")


def test_write_file_aborts_and_propagates(tmp_path, backend, faults):
    faults("write_enospc:4096")
    path = tmp_path / "wf.bin"
    with pytest.raises(OSError) as ei:
        write_file(path, [source(50000)], backend=backend, **SMALL)
    assert ei.value.errno == errno.ENOSPC and str(path) in str(ei.value)


def test_unknown_or_malformed_fault_raises(faults):
    with pytest.raises(ValueError, match="write_enospc"):
        faults("write_enospc:12x")
    with pytest.raises(ValueError, match="unknown fault"):
        faults("write_enosp")


FULL_CHILD = textwrap.dedent(
    r"""
    import errno, json, os, sys
    from llmio_native.io import Writer
    path, backend, direct, limit = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    if limit:
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    w = Writer(path, backend=backend, direct=direct, chunk_bytes=65536, staging_bytes=4 << 20)
    block = bytes(range(256)) * 4096  # 1 MiB
    out = {"raised": None}
    try:
        for _ in range(8):
            w.write(block)
        w.close()
    except OSError as e:
        out = {"raised": type(e).__name__, "errno": e.errno, "msg": str(e), "filename": e.filename}
        w.abort()
    out["closed"] = w.closed
    out["size"] = os.path.getsize(path)
    with open(path, "rb") as f:
        got = f.read()
    out["prefix_ok"] = got == (block * 8)[: len(got)]
    print(json.dumps(out))
    """
)


def _run_child(args: list[str], prefix: list[str] | None = None) -> dict:
    out = subprocess.run((prefix or []) + [sys.executable, "-c", FULL_CHILD] + args, capture_output=True,
                         text=True, timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_real_file_size_limit_raises_efbig(tmp_path, backend, direct):
    """ulimit -f: the kernel refuses writes past RLIMIT_FSIZE with EFBIG (a real OS error,
    no injection); the error names the file and the offset, and the bytes before it are exact."""
    res = _run_child([str(tmp_path / "fsize.bin"), backend, "1" if direct else "0", str(3 * MIB)])
    assert res["raised"] == "OSError" and res["errno"] == errno.EFBIG, res
    assert str(tmp_path / "fsize.bin") in res["msg"] and "ulimit -f" in res["msg"], res
    assert res["filename"] == str(tmp_path / "fsize.bin") and res["closed"] and res["prefix_ok"]
    assert res["size"] <= 3 * MIB


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_real_full_file_system_raises_enospc(tmp_path, backend, direct):
    """A 2 MiB tmpfs in a private mount namespace (root only; skipped otherwise): 8 MiB do not fit."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if os.geteuid() != 0 or not unshare or not mount:
        pytest.skip("needs root and unshare(1)/mount(8) to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run([unshare, "-m", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {mnt}"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()[:200]}")
    script = f'mount -t tmpfs -o size=2m tmpfs {mnt} && exec "$@"'
    res = _run_child([str(mnt / "full.bin"), backend, "1" if direct else "0", "0"],
                     prefix=[unshare, "-m", "sh", "-c", script, "sh"])
    assert res["raised"] == "OSError" and res["errno"] == errno.ENOSPC, res
    assert str(mnt / "full.bin") in res["msg"] and "@ " in res["msg"] and "full" in res["msg"], res
    assert res["closed"] and res["prefix_ok"] and 0 < res["size"] <= 2 * MIB, res


@pytest.mark.parametrize("kind", ["fifo", "fifo-with-reader", "dev-null", "directory"])
def test_non_regular_target_refused_never_blocks(tmp_path, backend, kind):
    reader_fd = None
    if kind.startswith("fifo"):
        path, what = str(tmp_path / "a-fifo"), "FIFO"
        os.mkfifo(path)
        if kind == "fifo-with-reader":
            reader_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    elif kind == "dev-null":
        path, what = "/dev/null", "character device"
    else:
        path, what = str(tmp_path / "a-dir"), "directory"
        os.mkdir(path)

    def open_it():
        try:
            Writer(path, backend=backend)
        except OSError as exc:
            return exc
        return None

    try:
        exc = call_with_deadline(open_it, 30)
    finally:
        if reader_fd is not None:
            os.close(reader_fd)
    assert exc is not None, f"{kind}: opened for writing as if it were a regular file"
    assert exc.filename == path and path in str(exc), str(exc)
    if kind == "directory":
        assert isinstance(exc, IsADirectoryError)
    else:
        assert what in str(exc) and "regular files only" in str(exc), str(exc)
        assert exc.errno in ((errno.ENXIO,) if kind == "fifo" else (errno.EINVAL,)), exc


def test_missing_directory_raises_file_not_found(tmp_path, backend):
    path = tmp_path / "no-such-dir" / "x.bin"
    with pytest.raises(FileNotFoundError) as ei:
        Writer(path, backend=backend)
    assert ei.value.filename == str(path) and str(path) in str(ei.value)


def test_read_only_location_raises_permission_error(backend):
    """An unprivileged user (root drops to nobody in a child) in a read-only directory."""
    import tempfile

    base = tempfile.mkdtemp(prefix="llmio-ro-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        target = os.path.join(ro, "x.bin")
        code = textwrap.dedent(
            f"""
            import os
            from llmio_native.io import Writer  # imported first: the interpreter may be root's only
            if os.geteuid() == 0:
                os.setgid(65534); os.setuid(65534)
            try:
                Writer({target!r}, backend={backend!r})
            except PermissionError as e:
                print("PermissionError", e.errno, e.filename == {target!r}, {target!r} in str(e))
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["PermissionError", str(errno.EACCES), "True", "True"], out.stdout
        assert not os.path.exists(target)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_path_with_nul_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="NUL"):
        Writer(str(tmp_path / "a\0b"))
    with pytest.raises(ValueError, match="NUL"):
        fsync_path(str(tmp_path / "a\0b"))


def test_bad_options_raise_value_error(tmp_path):
    p = tmp_path / "o.bin"
    for kw, word in [({"queue_depth": 0}, "queue_depth"), ({"chunk_bytes": 0}, "chunk_bytes"),
                     ({"chunk_bytes": 2 << 30}, "chunk_bytes"), ({"staging_bytes": -1}, "staging_bytes"),
                     ({"backend": "fast"}, "backend")]:
        with pytest.raises(ValueError, match=word):
            Writer(p, **kw)


def test_backend_resolution_like_reader(tmp_path, faults, monkeypatch):
    monkeypatch.setenv("LLMIO_BACKEND", "threads")
    w = Writer(tmp_path / "t.bin", backend="io_uring")
    assert w.backend == "threads" and w.stats()["backend"] == "threads"
    w.close()
    monkeypatch.delenv("LLMIO_BACKEND")
    if not _core.HAVE_URING:
        pytest.skip("built without liburing")
    faults("uring_eperm")
    w = Writer(tmp_path / "a.bin", backend="auto")
    assert w.backend == "threads"
    w.write(b"abc")
    w.close()
    assert file_bytes(tmp_path / "a.bin") == b"abc"
    with pytest.raises(UnsupportedError, match="EPERM"):
        Writer(tmp_path / "u.bin", backend="io_uring")


# ---------------------------------------------------------------- fsync_path


def test_fsync_path_files_and_directories(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    fsync_path(f)
    fsync_path(f, data_only=True)
    fsync_path(tmp_path)  # a directory: makes new entries durable
    fsync_path(str(tmp_path).encode())
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as ei:
        fsync_path(missing)
    assert ei.value.filename == str(missing) and str(missing) in str(ei.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as ei:
        call_with_deadline(lambda: fsync_path(fifo), 30)  # never blocks on the FIFO
    assert ei.value.errno == errno.EINVAL and str(fifo) in str(ei.value)


# ---------------------------------------------------------------- io_uring specifics


@needs_uring
def test_io_uring_uses_fixed_buffers_and_keeps_many_in_flight(tmp_path):
    data = source(8 * MIB, seed=9)
    path = tmp_path / "u.bin"
    with Writer(path, backend="io_uring", chunk_bytes=MIB, staging_bytes=16 * MIB, queue_depth=8) as w:
        w.write(data)
        s = w.stats()
        assert s["registered_files"] == 1 and s["registered_buffers"] == 1 and s["ring_entries"] == 8
    assert file_bytes(path) == data
    s = w.stats()
    assert s["ops"] == 8 and s["fixed_buffer_ops"] == 8 and s["ops_direct"] == 8
    assert s["submits"] >= 1


def test_unclosed_writer_warns_and_aborts(tmp_path, backend):
    """Dropping a Writer without close() must not lose data silently: a ResourceWarning says so."""
    import gc

    path = tmp_path / "unclosed.bin"
    w = Writer(path, backend=backend, **SMALL)
    w.write(source(10000))
    with pytest.warns(ResourceWarning, match="unclosed Writer"):
        del w
        gc.collect()
    assert file_bytes(path) == source(10000)[:8192]  # full chunks only: the tail was staged


def assert_in_forked_child(check) -> None:
    """Runs ``check()`` in a forked child and asserts that it returned True there (an exception
    in the child, or a child that does not exit cleanly, fails too)."""
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                code = 0 if check() else 2
            except BaseException:  # noqa: BLE001 - reported to the parent as a failure
                code = 3
            os.write(wfd, b"%d" % code)
        finally:
            os._exit(0)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    got = os.read(r, 16)
    os.close(r)
    assert got == b"0" and status == 0, f"child check failed (code {got!r}, status {status})"


def test_writer_used_in_forked_child_raises_and_parent_continues(tmp_path, backend):
    path = tmp_path / "fork.bin"
    w = Writer(path, backend=backend, **SMALL)
    w.write(source(9000))

    def child() -> bool:  # every call refuses, nothing hangs, the parent's file is not touched
        try:
            w.write(b"x")
        except RuntimeError as e:
            refused = "forked child" in str(e)
        else:
            refused = False
        w.abort()  # a no-op here
        return refused

    assert_in_forked_child(child)
    w.write(source(9000, seed=1))
    w.close()
    assert file_bytes(path) == source(9000) + source(9000, seed=1)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_short_writes_are_resumed_exact(tmp_path, backend, faults, direct):
    """Every write(2) cut to half (fault write_short): the rest is resubmitted until done."""
    faults("write_short")
    data = source(5 * 8192 + 4097)
    path = tmp_path / "short.bin"
    with Writer(path, backend=backend, direct=direct, **SMALL) as w:
        write_pieces(w, data, splits(len(data), np.random.default_rng(5)))
    assert file_bytes(path) == data and os.path.getsize(path) == len(data)
    s = w.stats()
    assert s["ops"] == 6 and s["retries"] >= 5, s  # every full chunk was cut at least once
    assert (s["ops_direct"] == 6) if direct else (s["ops_buffered"] == 6), s


@needs_uring
@pytest.mark.parametrize("fault", ["uring_submit_eio", "uring_enter_eio"])
def test_failing_ring_fails_the_writes_names_the_file_and_never_hangs(tmp_path, faults, fault):
    """The ring itself fails (after the kernel took writes, or before it took any): every
    write still owed fails with EIO naming the file and the ring call, the writes the kernel
    had are waited for, and the writer closes and aborts without hanging."""
    path = tmp_path / "ring.bin"
    data = source(12 * 8192)
    w = Writer(path, backend="io_uring", **SMALL)
    w.write(data[: 2 * 8192 + 5])  # two chunks in flight before the fault
    faults(fault)

    def go():
        for i in range(2 * 8192 + 5, len(data), 3000):
            w.write(data[i : i + 3000])
        w.close()

    with pytest.raises(OSError) as ei:
        call_with_deadline(go, 60)
    e = ei.value
    assert e.errno == errno.EIO and e.filename == str(path) and "io_uring_submit" in str(e), str(e)
    faults("")
    if not w.closed:
        with pytest.raises(OSError):
            call_with_deadline(w.close, 30)
    call_with_deadline(w.abort, 30)
    assert w.closed
    got = file_bytes(path)
    assert got == data[: len(got)]  # whatever reached the file is exact
    # a new writer on the same path works: nothing stuck in the process
    write_file(path, [data], backend="io_uring", **SMALL)
    assert file_bytes(path) == data


def test_many_writers_in_parallel_threads_exact(tmp_path, backend):
    """A checkpoint writes many files at once, one Writer per file and thread."""
    import threading

    datas = [source(70_000 + 4099 * k, seed=k) for k in range(6)]
    errors: list = []

    def run(k: int) -> None:
        try:
            with Writer(tmp_path / f"part-{k}.bin", backend=backend, **SMALL) as w:
                for i in range(0, len(datas[k]), 6001):
                    w.write(datas[k][i : i + 6001])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer thread hung"
    assert not errors, errors
    for k, d in enumerate(datas):
        assert file_bytes(tmp_path / f"part-{k}.bin") == d


# -- staging pool (io/staging_pool.hpp, llmio_native.io.reuse_staging) ---------------------------
def test_reuse_staging_hands_an_arena_to_the_next_writer_and_data_stays_exact(tmp_path, backend):
    """Inside reuse_staging a closed Writer's arena serves the next one (hits), a reused arena's
    old bytes never reach the new file (the padded O_DIRECT tail included), and the pool is
    empty once the context exits."""
    from llmio_native.io import reuse_staging, staging_pool_stats

    base = staging_pool_stats()
    assert base["scopes"] == 0 and base["idle_bytes"] == 0
    big, small = source(5 * 8192 + 4097, seed=1), source(1000, seed=2)
    with reuse_staging():
        with Writer(tmp_path / "a.bin", backend=backend, **SMALL) as w:
            w.write(big)
        s1 = staging_pool_stats()
        assert s1["scopes"] == 1 and s1["idle_count"] == 1 and s1["idle_bytes"] > 0
        with Writer(tmp_path / "b.bin", backend=backend, **SMALL) as w:
            w.write(small)
        s2 = staging_pool_stats()
        assert s2["hits"] == s1["hits"] + 1 and s2["misses"] == s1["misses"] and s2["idle_count"] == 1
        w3 = Writer(tmp_path / "c.bin", backend=backend, **SMALL)
        w3.write(small)
        w3.abort()  # an aborted writer gives its arena back too
        assert staging_pool_stats()["idle_count"] == 1
    assert file_bytes(tmp_path / "a.bin") == big
    assert file_bytes(tmp_path / "b.bin") == small  # not a byte of a.bin's data in the padding
    end = staging_pool_stats()
    assert end["scopes"] == 0 and end["idle_bytes"] == 0 and end["idle_count"] == 0
    # outside any context nothing is pooled
    with Writer(tmp_path / "d.bin", backend=backend, **SMALL) as w:
        w.write(small)
    assert staging_pool_stats()["idle_count"] == 0 and staging_pool_stats()["hits"] == end["hits"]


def test_staging_pool_keeps_at_most_its_bound_and_writers_in_flight_own_theirs(tmp_path):
    from llmio_native.io import reuse_staging, staging_pool_stats

    cap = staging_pool_stats()["max_idle_bytes"]
    n = cap // (64 << 20) + 2  # more 64 MiB arenas than the pool may keep
    with reuse_staging():
        ws = [Writer(tmp_path / f"{i}.bin", backend="threads", staging_bytes=64 << 20, chunk_bytes=4 << 20)
              for i in range(n)]
        assert staging_pool_stats()["idle_count"] == 0  # open writers hold theirs
        for i, w in enumerate(ws):
            w.write(source(100, seed=i))
            w.close()
        s = staging_pool_stats()
        assert s["idle_count"] == cap // (64 << 20) and s["idle_bytes"] <= cap
    assert staging_pool_stats()["idle_bytes"] == 0
    assert all(file_bytes(tmp_path / f"{i}.bin") == source(100, seed=i) for i in range(n))


def test_staging_pool_in_a_forked_child_starts_empty(tmp_path, backend):
    """A child forked inside reuse_staging does not see the parent's arenas (MADV_DONTFORK: not
    mapped there) nor its open context; it writes with its own; the parent's pool is intact."""
    from llmio_native.io import reuse_staging, staging_pool_stats

    with reuse_staging():
        with Writer(tmp_path / "p.bin", backend=backend, **SMALL) as w:
            w.write(source(9000))
        assert staging_pool_stats()["idle_count"] == 1

        def child() -> bool:
            s = staging_pool_stats()
            ok = s["idle_count"] == 0 and s["scopes"] == 0
            with reuse_staging():
                for k in range(2):
                    with Writer(tmp_path / f"child{k}.bin", backend=backend, **SMALL) as cw:
                        cw.write(source(9000, seed=3))
                s = staging_pool_stats()
                ok = ok and s["hits"] == 1 and s["misses"] == 1
            return ok and file_bytes(tmp_path / "child1.bin") == source(9000, seed=3)

        assert_in_forked_child(child)
        hits = staging_pool_stats()["hits"]
        with Writer(tmp_path / "p2.bin", backend=backend, **SMALL) as w:  # the parent's arena still serves
            w.write(source(9000, seed=4))
        assert staging_pool_stats()["hits"] == hits + 1
    assert file_bytes(tmp_path / "p2.bin") == source(9000, seed=4)
