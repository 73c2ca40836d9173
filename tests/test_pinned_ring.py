"""Pinned ring: order, zero copy, back-pressure, shutdown, producer errors, no leaks."""
from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import llmio_native as lio
from llmio_native import _core
from llmio_native.io.ring import read_all


@pytest.fixture(autouse=True)
def no_faults():
    _core._set_faults("")
    yield
    _core._set_faults("")


def make_file(dirpath, size: int, name: str = "data.bin") -> tuple[str, bytes]:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = os.path.join(str(dirpath), name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def reader(tmp_path):
    path, data = make_file(tmp_path, 3 * (1 << 20) + 4097)
    return lio.Reader([path], backend="auto"), data


def random_jobs(size: int, n: int, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(n):
        job = []
        for _ in range(int(rng.integers(1, 6))):
            off = int(rng.integers(0, size + 1))
            job.append((0, off, int(rng.integers(0, min(size - off, 70000) + 1))))
        job.append((0, size - 5, 5))  # touches EOF
        jobs.append(job)
    return jobs


@pytest.mark.parametrize("producers", [1, 4])
@pytest.mark.parametrize("packed", [False, True])
def test_order_and_exact_bytes(reader, producers, packed):
    r, data = reader
    jobs = random_jobs(len(data), 40, seed=producers)
    with lio.PinnedRing(r, num_slots=4, slot_bytes=1 << 20, num_producers=producers, pin=False) as ring:
        for k, job in enumerate(jobs):
            ring.submit(job, tag=1000 + k, packed=packed)
        for k, job in enumerate(jobs):
            slot = ring.get(timeout=30)
            assert slot is not None and slot.seq == k and slot.tag == 1000 + k
            assert slot.nbytes == [n for _, _, n in job]
            for j, (_, off, n) in enumerate(job):
                assert slot.array(j).tobytes() == data[off : off + n]
                if not packed:
                    assert slot.offsets[j] % 4096 == off % 4096
            if packed:
                whole = bytes(memoryview(slot))[: sum(slot.nbytes)]
                assert whole == b"".join(data[off : off + n] for _, off, n in job)
            slot.release()
        stats = ring.stats()
    assert stats["submitted"] == stats["delivered"] == stats["released"] == len(jobs)
    assert stats["bytes"] == sum(n for job in jobs for _, _, n in job)


def test_zero_copy_views_outlive_ring(reader):
    r, data = reader
    ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 20, pin=False)
    ring.submit([(0, 4096, 8192)])
    slot = ring.get()
    t = lio.PinnedRing.tensor(slot)
    a = np.frombuffer(slot, dtype=np.uint8)
    view = slot.array(0)
    assert t.data_ptr() == slot.ptr == a.ctypes.data
    assert view.ctypes.data == slot.ptr + slot.offsets[0]
    ring.close()
    del ring, slot, t, a
    assert view.tobytes() == data[4096 : 4096 + 8192]  # arena alive while a view exists


def test_back_pressure_and_never_hang(reader):
    r, data = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        with pytest.raises(RuntimeError, match="no job"):
            ring.get(timeout=1)
        for k in range(6):
            ring.submit([(0, k * 100, 1000)], tag=k)
        held = [ring.get(timeout=10), ring.get(timeout=10)]
        time.sleep(0.2)
        # Producers wait for a free slot: nothing beyond the two held was read.
        assert ring.stats()["delivered"] == 2 and ring.pending == 4
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="held by the consumer"):
            ring.get(timeout=5)
        assert time.monotonic() - t0 < 2
        held[0].release()
        s = ring.get(timeout=10)
        assert s.tag == 2 and s.array(0).tobytes() == data[200:1200]
        held[1].release()
        s.release()
        s.release()  # idempotent
        tags = []
        for _ in range(3):
            s = ring.get(timeout=10)
            tags.append(s.tag)
            s.release()
        assert tags == [3, 4, 5]
        with pytest.raises(ValueError, match="does not fit|needs"):
            ring.submit([(0, 0, 70000)])


def test_get_timeout_returns_none_while_producer_busy(tmp_path):
    path, _ = make_file(tmp_path, 1 << 20)
    r = lio.Reader([path], backend="threads", num_threads=1, max_io_bytes=4096)
    with lio.PinnedRing(r, num_slots=1, slot_bytes=64 << 20, pin=False) as ring:
        # 16384 small reads keep the only producer busy well past a 1 ms timeout.
        ring.submit([(0, (k * 4096) % (1 << 20), 4096) for k in range(16384)])
        got = ring.get(timeout=0.001)
        if got is not None:
            pytest.skip("the producer finished within 1 ms")
        s = ring.get(timeout=60)
        assert s is not None and s.seq == 0 and len(s.nbytes) == 16384


def test_early_stop_joins_threads_and_submit_after_close(reader):
    r, _ = reader
    before = tasks()
    ring = lio.PinnedRing(r, num_slots=4, slot_bytes=1 << 20, num_producers=3, pin=False)
    assert tasks() == before + 3
    for k in range(50):
        ring.submit([(0, k * 4096, 1 << 19)], tag=k)
    for _ in range(3):
        ring.get(timeout=10).release()
    t0 = time.monotonic()
    ring.close()
    assert time.monotonic() - t0 < 5
    assert tasks() == before
    ring.close()
    with pytest.raises(RuntimeError, match="closed"):
        ring.submit([(0, 0, 10)])


def test_producer_error_after_good_jobs(tmp_path):
    path, data = make_file(tmp_path, 5 * 4096)
    r = lio.Reader([path], backend="auto")
    ring = lio.PinnedRing(r, num_slots=3, slot_bytes=65536, num_producers=2, pin=False)
    ring.submit([(0, 0, 100)], tag=7)
    ring.submit([(0, 4096, 100)], tag=8)
    os.truncate(path, 8192)  # the third job now reads past the real end
    ring.submit([(0, 12288, 4096)], tag=9)
    ring.submit([(0, 0, 10)], tag=10)
    a = ring.get(timeout=10)
    b = ring.get(timeout=10)
    assert (a.tag, b.tag) == (7, 8)
    assert a.array(0).tobytes() == data[:100] and b.array(0).tobytes() == data[4096:4196]
    with pytest.raises(lio.ShortReadError) as ei:
        ring.get(timeout=10)
    msg = str(ei.value)
    assert ei.value.filename == path and "job 2" in msg and "tag 9" in msg and "12288" in msg
    with pytest.raises(lio.ShortReadError):  # stays failed, does not hang
        ring.get(timeout=10)
    ring.close()


def test_producer_eio(tmp_path):
    path, _ = make_file(tmp_path, 9000, name="bad-sector.bin")
    r = lio.Reader([path], backend="auto")
    _core._set_faults("eio:bad-sector")
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        ring.submit([(0, 0, 100)], tag=3)
        with pytest.raises(OSError) as ei:
            ring.get(timeout=10)
    assert ei.value.errno == errno.EIO and "bad-sector.bin" in str(ei.value)


def test_deferred_release_waits_for_event(reader):
    r, _ = reader

    class FakeEvent:
        def __init__(self) -> None:
            self.done = False

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.done = True

    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        ring.submit([(0, 0, 10)])
        ring.submit([(0, 10, 10)])
        ev = FakeEvent()
        ring.release(ring.get(timeout=10), ev)
        assert ring.stats()["released"] == 0
        ev.done = True
        ring.release(ring.get(timeout=10))
        assert ring.stats()["released"] == 2


def test_read_all_in_order(reader):
    r, data = reader
    jobs = [[(0, k * 1000, 500)] for k in range(20)]
    with lio.PinnedRing(r, num_slots=3, slot_bytes=65536, num_producers=2, pin=False) as ring:
        got = []
        for slot in read_all(ring, jobs):
            got.append(slot.array(0).tobytes())
            slot.release()
    assert got == [data[k * 1000 : k * 1000 + 500] for k in range(20)]


def test_thousand_rings_leave_memory_flat(reader):
    r, _ = reader
    gc.collect()
    live0, count0, tasks0 = _core.host_live_bytes(), _core.host_live_count(), tasks()
    for k in range(30):  # warm up allocators
        with lio.PinnedRing(r, num_slots=4, slot_bytes=1 << 20, pin=False) as ring:
            ring.submit([(0, 0, 4096)])
            ring.get(timeout=10).release()
    rss0 = rss_bytes()
    for k in range(1000):
        ring = lio.PinnedRing(r, num_slots=4, slot_bytes=1 << 20, pin=False)
        ring.submit([(0, k, 4096)])
        ring.get(timeout=10).release()
        ring.close()
        del ring
    assert _core.host_live_bytes() == live0 and _core.host_live_count() == count0
    assert tasks() == tasks0
    assert rss_bytes() - rss0 < 32 << 20


def test_host_buffer_alignment():
    small = _core.HostBuffer(10000)
    big = _core.HostBuffer(5 << 20)
    assert small.ptr % 4096 == 0 and big.ptr % (2 << 20) == 0
    assert small.nbytes == 10000 and big.nbytes == 5 << 20
    a = np.frombuffer(big, dtype=np.uint8)
    a[:] = 7
    assert a.sum() == 7 * (5 << 20)
    e = lio.empty_aligned(3 * 4096, np.uint16)
    assert e.ctypes.data % 4096 == 0 and e.dtype == np.uint16 and e.size == 3 * 2048


def test_keyboard_interrupt_during_wait(tmp_path):
    """Ctrl-C reaches a consumer blocked in get(): the wait runs in 50 ms slices."""
    path, _ = make_file(tmp_path, 1 << 20)
    child = textwrap.dedent(
        r"""
        import os, signal, sys, threading, time
        import llmio_native as lio
        from llmio_native import _core
        _core._set_faults("")
        r = lio.Reader([sys.argv[1]], backend="threads", num_threads=1, max_io_bytes=4096)
        ring = lio.PinnedRing(r, num_slots=2, slot_bytes=64 << 20, pin=False)
        # A job of 16384 tiny reads keeps the producer busy for a while.
        ring.submit([(0, (k * 4096) % (1 << 20), 4096) for k in range(16384)])
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            s = ring.get()
            print("GOT", s.tag)
        except KeyboardInterrupt:
            print("INTERRUPTED", time.monotonic() - t0)
        t1 = time.monotonic()
        ring.close()
        print("CLOSED", time.monotonic() - t1)
        """
    )
    out = subprocess.run([sys.executable, "-c", child, path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "GOT" in out.stdout:
        pytest.skip("the producer finished before the interrupt; machine too fast for this setup")
    assert "INTERRUPTED" in out.stdout and "CLOSED" in out.stdout, out.stdout + out.stderr
    waited = float(out.stdout.split("INTERRUPTED")[1].split()[0])
    assert waited < 5


@pytest.mark.cuda
def test_pinned_arena_is_page_locked(reader):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    r, data = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 20, pin=True) as ring:
        assert ring.pinned
        ring.submit([(0, 0, 1 << 20)])
        slot = ring.get(timeout=10)
        t = lio.PinnedRing.tensor(slot)
        assert t.is_pinned()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dev = t.to("cuda", non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        ring.release(slot, ev)
        stream.synchronize()
        assert dev.cpu().numpy().tobytes() == data[: 1 << 20]


def test_ring_inherited_by_a_forked_child_never_hangs(tmp_path):
    """A DataLoader worker forked while the parent holds a ring with live producers:
    in the child, dropping the ring returns at once and using it raises naming both
    processes; the parent's ring keeps working. (Before the fix the child hung in the
    destructor, tearing down producer threads and the condition variables they wait
    on, which do not exist there; `get` returned None after its timeout instead of raising.)"""
    script = textwrap.dedent(f"""
        import gc, multiprocessing as mp, os, sys, numpy as np
        import llmio_native as lio
        path = {str(tmp_path / 'f.bin')!r}
        open(path, 'wb').write(np.arange(1 << 16, dtype=np.uint32).tobytes())
        r = lio.Reader([path], backend='threads')
        ring = lio.PinnedRing(r, num_slots=4, slot_bytes=1 << 16, num_producers=2, pin=False)
        ring.submit([(0, 0, 4096)], tag=1)
        s = ring.get(timeout=10); s.release()
        del s   # no slot view left: dropping the ring in the child reaches ~SlotRing
        ring.submit([(0, 4096, 4096)], tag=2)   # producers busy or waiting at fork time

        def use():
            try:
                ring.submit([(0, 0, 4096)], tag=3)
                sys.exit(7)
            except RuntimeError as e:
                if not ('submit()' in str(e) and 'forked child' in str(e)):
                    sys.exit(8)
            try:
                ring.get(timeout=1)
            except RuntimeError as e:
                ok = 'forked child' in str(e) and str(os.getppid()) in str(e)
                ring.close()            # a no-op here, never a hang
                sys.exit(0 if ok else 3)
            sys.exit(4)

        def drop():
            global ring
            mapped = lio._core.host_live_bytes()
            arena = ring._ring.arena_bytes
            del ring
            gc.collect()
            # the child's copy of the arena is unmapped (nothing in the child can still
            # read or write it); threads and sync objects are what is left to the exit
            sys.exit(0 if lio._core.host_live_bytes() <= mapped - arena else 6)

        ctx = mp.get_context('fork')
        for fn in (use, drop):
            p = ctx.Process(target=fn); p.start(); p.join(20)
            if p.exitcode is None:
                p.kill(); print('HANG', fn.__name__); sys.exit(5)
            assert p.exitcode == 0, (fn.__name__, p.exitcode)
        s = ring.get(timeout=10)
        assert s.tag == 2 and np.frombuffer(s, np.uint32)[0] == 1024
        s.release(); ring.close()
        print('fork ok')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "fork ok" in out.stdout


# ---------------------------------------------------------------- thread limits (issue 9)

RING_THREAD_LIMIT_CHILD = textwrap.dedent(
    r"""
    import gc, json, os, resource, sys
    import llmio_native as lio
    from llmio_native import _core
    path, size = sys.argv[1], int(sys.argv[2])
    def tasks(): return len(os.listdir("/proc/self/task"))
    r = lio.Reader([path], backend="threads", num_threads=1)
    base, live = tasks(), _core.host_live_count()
    out = {"base": base}
    resource.setrlimit(resource.RLIMIT_NPROC, (base + 2, base + 64))
    if os.geteuid() == 0:  # root ignores RLIMIT_NPROC
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    try:
        lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, num_producers=6, pin=False)
        out["raised"] = None
    except Exception as exc:
        out.update(raised=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc),
                   is_oserror=isinstance(exc, OSError))
    gc.collect()
    out["tasks_after"], out["arenas_left"] = tasks(), _core.host_live_count() - live
    resource.setrlimit(resource.RLIMIT_NPROC, (base + 64, base + 64))
    with lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, num_producers=6, pin=False) as ring:
        out["tasks_ok"] = tasks()
        ring.submit([(0, 3, size - 3)])
        s = ring.get(timeout=30)
        out["exact"] = s.array(0).tobytes() == open(path, "rb").read()[3:]
        s.release()
    print(json.dumps(out))
    """
)


def test_producer_thread_refused_raises_resource_error_not_abort():
    """Regression (issue 9): a ring producer the OS refused (RLIMIT_NPROC, a pids limit)
    aborted the process (std::terminate from a joinable std::thread in a throwing
    constructor). Now PinnedRing raises ResourceError (OSError, EAGAIN) naming the
    producers, with the started ones joined and the arena unmapped."""
    import json
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="llmio-nproc-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "f.bin")
        with open(path, "wb") as fh:
            fh.write(os.urandom(20000))
        os.chmod(path, 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", RING_THREAD_LIMIT_CHILD, path, "20000"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["raised"] == "ResourceError" and res["is_oserror"] and res["errno"] == errno.EAGAIN, res
        assert "ring producers" in res["message"] and "thread 3 of 6" in res["message"], res
        assert res["tasks_after"] == res["base"] and res["arenas_left"] == 0, res
        assert res["tasks_ok"] == res["base"] + 6 and res["exact"], res
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("bad", [0, -3, 1025, 2**32 + 2])
def test_num_producers_out_of_range_raises_value_error(reader, bad):
    r, _ = reader
    with pytest.raises(ValueError, match=f"num_producers must be between 1 and 1024, got {bad}"):
        lio.PinnedRing(r, num_slots=2, slot_bytes=4096, num_producers=bad, pin=False)
    with pytest.raises(ValueError, match="num_slots must be between"):
        lio.PinnedRing(r, num_slots=2**32 + 1, slot_bytes=4096, pin=False)
    with pytest.raises(ValueError, match="larger than the address space"):
        lio.PinnedRing(r, num_slots=1 << 20, slot_bytes=1 << 40, pin=False)


# ---------------------------------------------------------------- MADV_DONTFORK (issue 16.6)

DONTFORK_CHILD = textwrap.dedent(
    r"""
    import ctypes, gc, json, mmap, os, sys
    import numpy as np
    import llmio_native as lio
    path = sys.argv[1]
    r = lio.Reader([path], backend="threads")
    ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, num_producers=2, pin=False)
    lo, n = ring._ring.arena_ptr, ring._ring.arena_bytes
    ring.submit([(0, 0, 4096)])
    s = ring.get(timeout=10)

    def mapped(lo, hi):
        with open("/proc/self/maps") as f:
            for line in f:
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                if a < hi and lo < b:
                    return True
        return False

    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        res = {"mapped_in_child": mapped(lo, lo + n)}
        try:
            bytes(memoryview(s)); res["view"] = "read"
        except BufferError as e:
            res["view"] = "refused: " + str(e.__cause__ or e)
        try:
            s.array(0); res["array"] = "read"
        except RuntimeError as e:
            res["array"] = "refused: " + str(e)
        # Something of the child's own at the arena's address: dropping the ring must
        # not unmap it.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        MAP_FIXED_NOREPLACE = 0x100000
        p = libc.mmap(lo, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        res["own_map"] = p == lo
        if p == lo:
            ctypes.memset(lo, 0x5A, 4096)
        del s, ring
        gc.collect()
        res["own_map_intact"] = p == lo and mapped(lo, lo + 4096) and ctypes.string_at(lo, 1) == b"\x5a"
        os.write(wr, json.dumps(res).encode())
        os._exit(0)
    os.close(wr)
    status = os.waitpid(pid, 0)[1]
    child = json.loads(os.read(rd, 65536).decode() or "{}")
    out = {"status": status, "child": child, "mapped_in_parent": mapped(lo, lo + n),
           "parent_reads": s.array(0).tobytes() == open(path, "rb").read(4096)}
    s.release(); ring.close()
    print(json.dumps(out))
    """
)


def test_arena_is_not_inherited_by_a_forked_child(tmp_path):
    """Regression (issue 16.6): the ring arena (page-locked for DMA) was inherited by a
    fork copy-on-write. Now it is MADV_DONTFORK: not mapped in the child, slot views
    refuse there (instead of faulting), and dropping the ring in the child leaves the
    child's own mappings at that address alone. The parent's ring is untouched."""
    import json

    path, _ = make_file(tmp_path, 1 << 16)
    out = subprocess.run([sys.executable, "-c", DONTFORK_CHILD, path], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 0, res  # the child did not crash
    child = res["child"]
    assert child["mapped_in_child"] is False, res
    assert child["view"].startswith("refused") and child["array"].startswith("refused"), res
    assert "forked child" in child["array"] and "MADV_DONTFORK" in child["array"], res
    assert child["own_map"] is True and child["own_map_intact"] is True, res
    assert res["mapped_in_parent"] is True and res["parent_reads"] is True, res


def test_empty_aligned_memory_is_still_inherited_by_fork():
    """MADV_DONTFORK is for ring arenas only: user buffers from empty_aligned stay
    readable in a forked child (DataLoader workers)."""
    a = lio.empty_aligned(1 << 16)
    a[:] = 7
    pid = os.fork()
    if pid == 0:
        os._exit(0 if int(a.sum()) == 7 * (1 << 16) else 3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# ---------------------------------------------------------------- CUDA registration (issue 16.3)


class _FakeErr:
    """A cudaError as torch's cudart returns it: int() gives the code, str() is useless."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __int__(self) -> int:
        return self.code

    def __str__(self) -> str:
        return "cudaError.???"


class _FakeCudart:
    def __init__(self, register_err: int = 0, unregister_err: int = 0) -> None:
        self.register_err, self.unregister_err = register_err, unregister_err
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return _FakeErr(self.register_err)

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return _FakeErr(self.unregister_err)

    def cudaGetErrorString(self, err):
        return {2: "out of memory", 712: "part or all of the requested memory range is already mapped"}[int(err)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """PinnedRing's CUDA path with a recording runtime: which device each call ran on,
    and whether the runtime's last error was cleared."""
    from llmio_native.io import ring as ring_mod

    seen: dict = {"devices": [], "cleared": 0}

    class OnDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            seen["devices"].append(self.index)

        def __exit__(self, *exc):
            pass

    def clear():
        seen["cleared"] += 1
        return True

    monkeypatch.setattr(ring_mod, "_on_device", OnDevice)
    monkeypatch.setattr(ring_mod, "_clear_cuda_error", clear)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def install(rt):
        monkeypatch.setattr(ring_mod, "_cuda_runtime", lambda: rt)
        return seen

    return install


def test_register_runs_on_the_ring_device_portable(reader, fake_cuda):
    r, _ = reader
    rt = _FakeCudart()
    seen = fake_cuda(rt)
    ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, device="cuda:1")
    assert ring.pinned and ring.device == 1
    assert rt.calls == [("register", ring._ring.arena_ptr, ring._ring.arena_bytes, 1)]  # portable
    ring.close()
    assert rt.calls[-1] == ("unregister", ring._ring.arena_ptr)
    assert seen["devices"] == [1, 1] and seen["cleared"] == 0 and not ring.pinned
    for dev, index in ((torch.device("cuda", 1), 1), (1, 1), (None, None), ("cuda", None)):
        with lio.PinnedRing(r, num_slots=1, slot_bytes=4096, device=dev) as ring2:
            assert ring2.device == index
    assert seen["devices"][-2:] == [None, None]
    # a CPU device: no pinning (and pin=True there is a ValueError naming it)
    n = len(rt.calls)
    with lio.PinnedRing(r, num_slots=1, slot_bytes=4096, device="cpu") as ring3:
        assert not ring3.pinned and len(rt.calls) == n
    with pytest.raises(ValueError, match="device='cpu'"):
        lio.PinnedRing(r, num_slots=1, slot_bytes=4096, pin=True, device="cpu")
    with pytest.raises(ValueError, match="device='cuda:5'.*2 CUDA devices"):
        lio.PinnedRing(r, num_slots=1, slot_bytes=4096, device="cuda:5")


def test_failed_register_clears_the_error_names_it_and_frees_the_arena(reader, fake_cuda):
    """Regression (issue 16.3): a failed cudaHostRegister printed `cudaError.???` and left
    the error set in the runtime (the next torch kernel raised it)."""
    r, _ = reader
    gc.collect()
    live = _core.host_live_count()
    seen = fake_cuda(_FakeCudart(register_err=2))
    with pytest.raises(lio.CudaError) as ei:
        lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, device="cuda:1")
    msg = str(ei.value)
    assert "???" not in msg and "CUDA error 2: out of memory" in msg, msg
    assert "cudaHostRegister" in msg and "cuda:1" in msg and str(2 * (1 << 16)) in msg, msg
    assert seen["cleared"] == 1 and seen["devices"] == [1]
    gc.collect()
    assert _core.host_live_count() == live  # the ring was closed and its arena unmapped


def test_failed_unregister_clears_the_error_and_raises_on_close(reader, fake_cuda):
    r, _ = reader
    rt = _FakeCudart(unregister_err=712)
    seen = fake_cuda(rt)
    ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, device=1)
    with pytest.raises(lio.CudaError, match="cudaHostUnregister.*cuda:1.*CUDA error 712: part or all"):
        ring.close()
    assert seen["cleared"] == 1 and not ring.pinned
    ring.close()  # idempotent: nothing left to unregister
    assert [c[0] for c in rt.calls] == ["register", "unregister"]


def test_clear_cuda_error_calls_the_loaded_runtime(tmp_path):
    """_clear_cuda_error calls cudaGetLastError in the libcudart already loaded in the
    process (found in /proc/self/maps, opened RTLD_NOLOAD): exercised with a stand-in
    library that counts the calls."""
    import ctypes
    import shutil

    from llmio_native.io import ring as ring_mod

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "fake.c"
    src.write_text("int calls = 0; int cudaGetLastError(void) { ++calls; return 0; }\n")
    lib = tmp_path / "libcudart_llmio_test.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    handle = ctypes.CDLL(str(lib))
    before = ctypes.c_int.in_dll(handle, "calls").value
    assert ring_mod._clear_cuda_error() is True
    assert ctypes.c_int.in_dll(handle, "calls").value == before + 1


@pytest.mark.cuda
def test_register_failure_on_a_real_device_does_not_poison_torch(reader):
    """A real failure (registering the arena twice: already registered): CudaError with the
    runtime's text, and the next unrelated torch kernel runs clean."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmio_native.io import ring as ring_mod

    r, _ = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, pin=True, device="cuda:0") as ring:
        assert ring.pinned and ring.device == 0
        with pytest.raises(lio.CudaError) as ei:
            ring_mod._cuda_host_call(torch.cuda.cudart(), 0, "second register", "cudaHostRegister",
                                     ring._ring.arena_ptr, ring._ring.arena_bytes, 1)
        assert "???" not in str(ei.value) and "already" in str(ei.value).lower()
        assert torch.ones(8, device="cuda:0").sum().item() == 8  # no stale error raised here


@pytest.mark.cuda
def test_ring_on_cuda1_creates_no_context_on_gpu0(tmp_path):
    """device="cuda:1": the registration (and unregistration) run on GPU 1; GPU 0's
    primary context is never created."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    path, _ = make_file(tmp_path, 1 << 16)
    script = textwrap.dedent(f"""
        import ctypes, llmio_native as lio, torch
        r = lio.Reader([{path!r}], backend="threads")
        ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, pin=True, device="cuda:1")
        ring.close()
        cu = ctypes.CDLL("libcuda.so.1")
        def active(d):
            flags, state = ctypes.c_uint(), ctypes.c_int()
            assert cu.cuDevicePrimaryCtxGetState(d, ctypes.byref(flags), ctypes.byref(state)) == 0
            return state.value
        print("STATE", active(0), active(1))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "STATE 0 1" in out.stdout, out.stdout


# ---------------------------------------------------------------- release fences (the slot lifecycle in C++)


class Fence:
    """A real fence, like a CUDA event recorded after the copy out of a slot: it
    completes when ``complete()`` is called (from any thread, as the GPU would);
    ``synchronize()`` really waits for that. It can be told to raise once from
    ``query()`` or ``synchronize()``, and records which threads called it."""

    def __init__(self, raise_query: BaseException | None = None,
                 raise_sync: BaseException | None = None) -> None:
        self._done = threading.Event()
        self.raise_query, self.raise_sync = raise_query, raise_sync
        self.queries = self.syncs = 0
        self.threads: set[int] = set()

    def complete(self) -> None:
        self._done.set()

    def complete_after(self, seconds: float) -> threading.Timer:
        t = threading.Timer(seconds, self.complete)
        t.start()
        return t

    def query(self) -> bool:
        self.queries += 1
        self.threads.add(threading.get_ident())
        if self.raise_query is not None:
            e, self.raise_query = self.raise_query, None
            raise e
        return self._done.is_set()

    def synchronize(self) -> None:
        self.syncs += 1
        self.threads.add(threading.get_ident())
        if self.raise_sync is not None:
            e, self.raise_sync = self.raise_sync, None
            raise e
        assert self._done.wait(30), "fence never completed"


def fill(ring, n: int, size: int = 1000) -> None:
    for k in range(n):
        ring.submit([(0, k * size, size)], tag=k)


def test_fenced_release_keeps_the_slot_until_the_fence_completes(reader):
    r, data = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        fill(ring, 4)
        s0 = ring.get(timeout=10)
        view = s0.array(0)  # a live view of the slot (a copy to the GPU would read it)
        f = Fence()
        ring.release(s0, f)
        assert s0.released and ring.releasing == 1 and ring._ring.held == 0
        st = ring.stats()
        assert st["released"] == 0 and st["releasing"] == 1
        s1 = ring.get(timeout=10)
        assert s1.index != s0.index
        ring.release(s1)
        # Jobs 2 and 3 can only use s1's slot: s0's is still read behind the fence.
        for k in (2, 3):
            s = ring.get(timeout=10)
            assert s.tag == k and s.index == s1.index
            assert s.array(0).tobytes() == data[k * 1000 : k * 1000 + 1000]
            ring.release(s)
        assert view.tobytes() == data[:1000] and ring.releasing == 1
        assert f.queries >= 3 and f.syncs == 0  # asked at release, submit and every get
        assert ring.poll() == 0
        f.complete()
        assert ring.poll() == 1 and ring.releasing == 0
        st = ring.stats()
        assert st["released"] == 4 and st["releasing"] == 0 and st["fence_waits"] == 0
        # the slot is reusable again
        ring.submit([(0, 5000, 10)], tag=9)
        ring.submit([(0, 6000, 10)], tag=10)
        a, b = ring.get(timeout=10), ring.get(timeout=10)
        assert {a.index, b.index} == {0, 1}
        a.release(), b.release()
    assert f.threads == {threading.get_ident()}  # only the consumer's own calls


def test_fence_already_complete_frees_the_slot_at_release(reader):
    r, _ = reader
    with lio.PinnedRing(r, num_slots=1, slot_bytes=65536, pin=False) as ring:
        fill(ring, 2)
        f = Fence()
        f.complete()
        ring.release(ring.get(timeout=10), f)
        assert ring.releasing == 0 and ring.stats()["released"] == 1 and f.syncs == 0
        assert ring.get(timeout=10).tag == 1


def test_get_with_every_slot_releasing_waits_on_the_oldest_fence(reader):
    r, data = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        fill(ring, 4)
        f0, f1 = Fence(), Fence()
        ring.release(ring.get(timeout=10), f0)
        ring.release(ring.get(timeout=10), f1)
        assert ring.releasing == 2
        time.sleep(0.1)  # producers are idle, waiting for a slot
        timer = f0.complete_after(0.3)  # the "GPU" finishes the oldest copy later
        t0 = time.monotonic()
        s = ring.get(timeout=10)  # used to raise "held by the consumer"
        waited = time.monotonic() - t0
        timer.join()
        assert s.tag == 2 and s.array(0).tobytes() == data[2000:3000]
        assert waited >= 0.25 and f0.syncs == 1 and f1.syncs == 0
        assert ring.releasing == 1 and ring.stats()["fence_waits"] == 1
        # Consumer holds one slot, the other waits on f1: get() waits on f1 next.
        timer = f1.complete_after(0.1)
        s3 = ring.get(timeout=10)
        timer.join()
        assert s3.tag == 3 and ring.releasing == 0 and f1.syncs == 1
        assert ring.stats()["fence_waits"] == 2
        s.release(), s3.release()
        # Every slot held by the consumer itself still raises at once.
        fill(ring, 3)
        held = [ring.get(timeout=10), ring.get(timeout=10)]
        with pytest.raises(RuntimeError, match="held by the consumer"):
            ring.get(timeout=5)
        for h in held:
            h.release()
        ring.get(timeout=10).release()
    assert f0.threads | f1.threads == {threading.get_ident()}


def test_close_synchronizes_pending_fences(reader):
    r, _ = reader
    ring = lio.PinnedRing(r, num_slots=3, slot_bytes=65536, pin=False)
    fill(ring, 3)
    fences = [Fence() for _ in range(3)]
    for f in fences:
        ring.release(ring.get(timeout=10), f)
    fences[1].complete()
    assert ring.poll() == 1 and ring.releasing == 2
    timers = [f.complete_after(0.2) for f in (fences[0], fences[2])]
    t0 = time.monotonic()
    ring.close()
    assert time.monotonic() - t0 >= 0.15
    for t in timers:
        t.join()
    assert [f.syncs for f in fences] == [1, 0, 1]
    assert ring.releasing == 0 and ring.stats()["released"] == 3
    ring.close()  # idempotent: nothing left to wait for
    assert [f.syncs for f in fences] == [1, 0, 1]


def test_fence_query_that_raises_leaves_the_slot_releasing(reader):
    r, data = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        fill(ring, 4)
        s0 = ring.get(timeout=10)
        f = Fence(raise_query=KeyError("query failed"))
        with pytest.raises(KeyError, match="query failed"):
            ring.release(s0, f)
        # The slot left the consumer's hands and is not reused until the fence completes.
        assert s0.released and ring.releasing == 1 and ring._ring.held == 0
        s1 = ring.get(timeout=10)
        ring.release(s1)
        s2 = ring.get(timeout=10)
        assert s2.index == s1.index and s2.array(0).tobytes() == data[2000:3000]
        ring.release(s2)
        f.complete()
        s3 = ring.get(timeout=10)  # polls: the fence answers now and frees the slot
        assert s3.tag == 3 and ring.releasing == 0 and ring.stats()["released"] == 3
        s3.release()


def test_fence_synchronize_that_raises_propagates_from_get_and_close(reader):
    r, data = reader
    ring = lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False)
    fill(ring, 3)
    f0 = Fence(raise_sync=OSError(5, "sync failed"))
    f1 = Fence()
    ring.release(ring.get(timeout=10), f0)
    ring.release(ring.get(timeout=10), f1)
    with pytest.raises(OSError, match="sync failed"):
        ring.get(timeout=10)
    assert ring.releasing == 2 and ring.stats()["released"] == 0  # nothing was freed
    timer = f0.complete_after(0.1)
    s = ring.get(timeout=10)  # asks the same fence again; now it works
    timer.join()
    assert s.tag == 2 and s.array(0).tobytes() == data[2000:3000] and f0.syncs == 2
    s.release()
    # close(): a fence that raises stops it, its slot stays releasing; close() again goes on.
    f1.raise_sync = RuntimeError("sync failed at close")
    with pytest.raises(RuntimeError, match="at close"):
        ring.close()
    assert ring._ring.closed and ring.releasing == 1
    f1.complete()
    ring.close()
    assert ring.releasing == 0 and f1.syncs == 2


def test_release_with_a_non_fence_is_a_type_error_and_keeps_the_slot(reader):
    r, _ = reader
    with lio.PinnedRing(r, num_slots=2, slot_bytes=65536, pin=False) as ring:
        fill(ring, 1)
        s = ring.get(timeout=10)
        with pytest.raises(TypeError, match="query"):
            ring.release(s, object())
        assert not s.released and ring._ring.held == 1 and ring.releasing == 0
        ring.release(s)
        assert ring._ring.held == 0


def test_forked_child_never_touches_the_fences_of_a_releasing_slot(tmp_path):
    """A ring with a slot releasing behind a fence, inherited by a forked child: the
    child's calls raise as before (poll/release too), close() is a no-op and dropping
    the ring never calls the fence (a CUDA event must not be used there). The parent's
    ring goes on and frees the slot when the fence completes."""
    script = textwrap.dedent(f"""
        import gc, multiprocessing as mp, os, sys, numpy as np
        import llmio_native as lio
        path = {str(tmp_path / 'f.bin')!r}
        open(path, 'wb').write(np.arange(1 << 16, dtype=np.uint32).tobytes())

        class Fence:
            def __init__(self): self.done = False; self.calls = []
            def query(self): self.calls.append(('query', os.getpid())); return self.done
            def synchronize(self): self.calls.append(('sync', os.getpid())); self.done = True

        r = lio.Reader([path], backend='threads')
        ring = lio.PinnedRing(r, num_slots=2, slot_bytes=1 << 16, num_producers=2, pin=False)
        for k in range(3):
            ring.submit([(0, 4096 * k, 4096)], tag=k)
        f = Fence()
        ring.release(ring.get(timeout=10), f)
        held = ring.get(timeout=10)

        def child():
            errs = []
            for call in (ring.poll, lambda: ring.get(timeout=1), lambda: ring.release(held, Fence())):
                try:
                    call(); sys.exit(7)
                except RuntimeError as e:
                    errs.append('forked child' in str(e))
            ring.close()
            global_ring = globals().pop('ring')
            del global_ring
            gc.collect()
            mine = [c for c in f.calls if c[1] == os.getpid()]
            sys.exit(0 if all(errs) and not mine else 3)

        p = mp.get_context('fork').Process(target=child); p.start(); p.join(20)
        if p.exitcode is None:
            p.kill(); print('HANG'); sys.exit(5)
        assert p.exitcode == 0, p.exitcode
        assert ring.releasing == 1
        held.release()
        s = ring.get(timeout=10)
        assert s.tag == 2 and np.frombuffer(s, np.uint32)[0] == 2048
        s.release()
        f.done = True
        assert ring.poll() == 1 and ring.releasing == 0
        ring.close()
        assert all(c[1] == os.getpid() for c in f.calls)
        print('fork ok')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    assert "fork ok" in out.stdout
