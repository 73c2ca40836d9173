"""safetensors, API-compatible, through the native read engine.

Loads (:func:`load_file`, :func:`safe_open`, :func:`load_into`) read every tensor's bytes with
:class:`llmio_native.io.Reader` (io_uring or a pread pool, O_DIRECT, large extents, many reads in
flight), straight into the memory the caller gets back:

* CPU: each tensor gets its own allocation, laid out so that its file offset and its address
  agree modulo the O_DIRECT alignment; the aligned superset of its bytes is read straight into it
  (no bounce copy, no page cache). The tensor's storage is private to it and may extend a few
  KiB (at most three alignment blocks) around the tensor's bytes: the slack of the aligned read.
  Tensors under 16 KiB get an exact allocation instead (the engine bounces their partial blocks).
  Fresh memory costs a page fault per page on first touch (on some VMs slower than the disk),
  so tensors from ``_REGION_MIN_BYTES`` up get their own anonymous mapping, 2 MiB-aligned,
  unmapped when the last tensor or view of it is freed; with ``populate``, helper threads
  (one per CPU, at most 4) pre-fault (``MADV_POPULATE_WRITE``) each chunk of reads before the
  engine reads it, running ahead while it reads. With ``alloc="adaptive"`` (the ``auto``
  choice where THP can be had by madvise) the helpers fault each 2 MiB step as a huge page
  while huge pages fault fast, and otherwise leave it in 4 KiB pages for the read to fault
  (:class:`_PageChooser`): huge pages are far faster to fault where the memory is backed and
  far slower where a VM balloon gave it back to the host. ``LLMIO_CKPT_ALLOC`` (``auto`` | ``adaptive`` | ``hugepage`` | ``plain``
  | ``torch``), ``LLMIO_CKPT_POPULATE`` (``auto`` | ``on`` | ``off``) and
  ``LLMIO_CKPT_POPULATE_THREADS`` force a path; where the kernel refuses one (no THP, no
  ``MADV_POPULATE_WRITE``) the load carries on without it (``stats`` reports what ran).
* CUDA: runs of consecutive tensors are read into page-locked staging slots and copied to their
  final allocations on a side stream; slot k+1 is read while slot k is being copied.

``io_mode="auto"`` probes the page cache with ``mincore(2)`` over the data region: when at least
half of it is resident the file is read buffered (a memcpy from the page cache beats re-reading
the disk); otherwise O_DIRECT. ``"direct"`` and ``"buffered"`` force one or the other (direct
still falls back per file where the file system refuses O_DIRECT, as every Reader does). A
buffered read of a file that was not resident drops the pages it brought in (POSIX_FADV_DONTNEED).

Saves (:func:`save_file`, :func:`save_sharded`) write the header padded with spaces so the data
region starts 4 KiB-aligned, tensors sorted by element size then name (as ``safetensors`` does, so
every tensor is aligned to its element size), and publish through the crash-safe commit protocol
(:mod:`llmio_native.checkpoint.commit`): staging name beside the target, fdatasync, index last,
rename or directory exchange, fsync of the parent.

Several ranks (``process_group=``, or ``rank=``/``world_size=`` of the default group): the
tensors are split between the ranks by bytes; each rank reads its share once and broadcasts it,
so each byte is read from storage once per group (pass a node-local group to read once per node).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import threading
import time
import weakref
from collections import namedtuple
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from . import commit as _commit
from .header import (DTYPES, MAX_HEADER_BYTES, TORCH_TO_DTYPE, Header, SafetensorsError, TensorInfo,
                     read_header, serialise)

if TYPE_CHECKING:  # pragma: no cover
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IO_MODES = ("auto", "direct", "buffered")
RESIDENT_THRESHOLD = 0.5
"""``io_mode="auto"`` reads buffered when at least this fraction of the data region is cached."""

_MAX_IO_BYTES = 4 << 20
_SLOT_BYTES = 64 << 20
_NUM_SLOTS = 3
_DIRECT_MIN_BYTES = 16 << 10
"""CPU tensors from this size up get the congruent layout (read straight in, a few KiB of
alignment slack in their storage); smaller ones get an exact allocation and the engine bounces
their partial blocks (a copy of at most a few KiB)."""
_REGION_MIN_BYTES = 1 << 20
"""CPU tensors from this size up get their own anonymous mapping (huge pages where allowed)."""
_HUGE_BYTES = 2 << 20
_POPULATE_CHUNK_BYTES = 1 << 30
"""With populate on, reads are issued in chunks, each once the helper threads have pre-faulted
it (they fault the next chunks while this one is read), doubling from 16 MiB up to this size."""
ALLOC_MODES = ("auto", "adaptive", "hugepage", "plain", "torch")
POPULATE_MODES = ("auto", "on", "off")
_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
_MADV_POPULATE_WRITE = 23
_ADAPTIVE_POPULATE_SMALL = False
"""alloc=adaptive: also fault the 4 KiB-page steps in the helpers (the alternative measured when
choosing; off: leaving them to the reads loaded faster on the dev VM once memory had settled)."""
_CPU_STAGING = False
"""Load CPU tensors through staging slots + memcpy instead of reading straight into them (the
alternative the benchmark measures; off: direct reads into the final memory won there)."""

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
"""What :func:`load_into` returns with ``strict=False`` (as ``Module.load_state_dict`` does)."""


# ---------------------------------------------------------------------------------------------
# dtypes and shapes
# ---------------------------------------------------------------------------------------------
def _torch() -> Any:
    import torch

    return torch


def _torch_dtype(info: TensorInfo, path: str) -> "torch.dtype":
    torch = _torch()
    d = DTYPES[info.dtype]
    td = getattr(torch, d.torch_name, None) if d.torch_name else None
    if td is None:
        raise SafetensorsError(f"{path}: tensor {info.name!r}: dtype {info.dtype} has no torch dtype in torch "
                               f"{torch.__version__}", path=path, tensor=info.name)
    return td


def _torch_shape(info: TensorInfo, path: str) -> tuple[int, ...]:
    if not DTYPES[info.dtype].packed_x2:
        return info.shape
    if not info.shape or info.shape[-1] % 2:
        raise SafetensorsError(f"{path}: tensor {info.name!r}: {info.dtype} shape {list(info.shape)} needs an even "
                               "last dimension to map onto torch's two-per-byte dtype", path=path, tensor=info.name)
    return info.shape[:-1] + (info.shape[-1] // 2,)


def _header_dtype_shape(name: str, t: "torch.Tensor") -> tuple[str, list[int]]:
    dn = TORCH_TO_DTYPE.get(str(t.dtype).split(".")[-1])
    if dn is None:
        raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors equivalent")
    shape = list(t.shape)
    if DTYPES[dn].packed_x2:
        if not shape:
            raise ValueError(f"tensor {name!r}: a 0-d {t.dtype} tensor cannot be stored as {dn}")
        shape[-1] *= 2
    return dn, shape


# ---------------------------------------------------------------------------------------------
# sources: a file, a directory, an index
# ---------------------------------------------------------------------------------------------
class _Source:
    """The files of a checkpoint and where each tensor lives: ``files[i]`` with ``headers[i]``;
    ``where[name] = i``."""

    def __init__(self, files: list[str], headers: list[Header], where: dict[str, int], origin: str) -> None:
        self.files, self.headers, self.where, self.origin = files, headers, where, origin

    def info(self, name: str) -> tuple[int, TensorInfo]:
        i = self.where.get(name)
        if i is None:
            raise SafetensorsError(f"{self.origin}: no tensor named {name!r}", path=self.origin, tensor=name)
        return i, self.headers[i].tensor(name)


def _open_index(index_path: Path, max_header_bytes: int) -> _Source:
    ip = os.fspath(index_path)
    try:
        raw = index_path.read_bytes()
    except FileNotFoundError:
        raise SafetensorsError(f"{ip}: index file not found", path=ip) from None

    def no_dup(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise SafetensorsError(f"{ip}: duplicate key {k!r} in the index", path=ip, tensor=k)
            out[k] = v
        return out

    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=no_dup)
    except SafetensorsError:
        raise
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"{ip}: malformed index JSON: {e}", path=ip) from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise SafetensorsError(f"{ip}: index lacks a weight_map of tensor name -> shard file name", path=ip)
    base = index_path.parent
    files: list[str] = []
    pos: dict[str, int] = {}
    for name, shard in wm.items():
        if shard not in pos:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise SafetensorsError(f"{ip}: tensor {name!r}: shard {shard!r} is not a plain file name in the "
                                       "index's directory", path=ip, tensor=name)
            pos[shard] = len(files)
            files.append(os.fspath(base / shard))
    headers = []
    for f in files:
        if not os.path.exists(f):
            who = next(n for n, s in wm.items() if os.fspath(base / s) == f)
            raise SafetensorsError(f"{ip}: shard {os.path.basename(f)} (holding tensor {who!r} and others) is missing",
                                   path=f, tensor=who)
        headers.append(read_header(f, max_header_bytes=max_header_bytes))
    where = {}
    for name, shard in wm.items():
        i = pos[shard]
        if name not in headers[i].tensors:
            raise SafetensorsError(f"{files[i]}: tensor {name!r} named in {ip} is not in this shard", path=files[i],
                                   tensor=name)
        where[name] = i
    return _Source(files, headers, where, ip)


def _open_files(files: list[str], origin: str, max_header_bytes: int) -> _Source:
    headers = [read_header(f, max_header_bytes=max_header_bytes) for f in files]
    where: dict[str, int] = {}
    for i, h in enumerate(headers):
        for name in h.tensors:
            if name in where:
                raise SafetensorsError(f"{origin}: tensor {name!r} is in both {files[where[name]]} and {files[i]}",
                                       path=files[i], tensor=name)
            where[name] = i
    return _Source(files, headers, where, origin)


def _open_source(path: str | os.PathLike[str], max_header_bytes: int) -> _Source:
    p = Path(os.fspath(path))
    _commit.recover(p)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return _open_index(p / INDEX_NAME, max_header_bytes)
        names = sorted(n.name for n in p.iterdir() if not _commit.is_staging_name(n.name))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        if len(indexes) == 1:
            return _open_index(p / indexes[0], max_header_bytes)
        files = [os.fspath(p / n) for n in names if n.endswith(".safetensors") and (p / n).is_file()]
        if not files:
            raise SafetensorsError(f"{p}: no .safetensors file or index in this directory", path=os.fspath(p))
        return _open_files(files, os.fspath(p), max_header_bytes)
    if p.name.endswith(".json"):
        return _open_index(p, max_header_bytes)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, f"checkpoint {p} does not exist", os.fspath(p))
    return _open_files([os.fspath(p)], os.fspath(p), max_header_bytes)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _resident_fraction(path: str, offset: int, length: int) -> float:
    """Fraction of the pages of ``[offset, offset + length)`` of ``path`` in the page cache
    (mincore over a read-only shared mapping; 0.0 where that is not possible)."""
    if length <= 0:
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols
        return 0.0
    page = os.sysconf("SC_PAGE_SIZE")
    start = offset - offset % page
    span = offset + length - start
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        addr = libc.mmap(None, span, 1, 1, fd, start)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            pages = (span + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), span, vec) != 0:
                return 0.0
            import numpy as np

            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), span)
    finally:
        os.close(fd)


def _choose_direct(src: _Source, io_mode: str) -> tuple[bool, list[bool]]:
    """(direct, cold[i]): whether to open the Reader with O_DIRECT, and which files were not
    resident before a buffered read (their pages are dropped afterwards)."""
    if io_mode not in IO_MODES:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
    if io_mode == "direct":
        return True, [False] * len(src.files)
    fr = [_resident_fraction(f, h.data_start, h.file_size - h.data_start) for f, h in zip(src.files, src.headers)]
    total = sum(h.file_size - h.data_start for h in src.headers)
    cached = sum(f * (h.file_size - h.data_start) for f, h in zip(fr, src.headers))
    if io_mode == "auto" and (total == 0 or cached / total < RESIDENT_THRESHOLD):
        return True, [False] * len(src.files)
    return False, [f < RESIDENT_THRESHOLD for f in fr]


def _drop_cache(files: Sequence[str], cold: Sequence[bool]) -> None:
    for f, c in zip(files, cold):
        if not c:
            continue
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _make_reader(src: _Source, io_mode: str, backend: str) -> tuple[Any, list[bool]]:
    from ..io import Reader

    direct, cold = _choose_direct(src, io_mode)
    return Reader(src.files, backend=backend, direct=direct, max_io_bytes=_MAX_IO_BYTES), cold


class _Libc:
    """ctypes handles on mmap/munmap/madvise (calls through ctypes release the GIL)."""

    _inst: "_Libc | None" = None

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.mmap = lib.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.munmap = lib.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.madvise = lib.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def get(cls) -> "_Libc | None":
        if cls._inst is None:
            try:
                cls._inst = cls()
            except (OSError, AttributeError, ValueError):  # pragma: no cover - no libc symbols
                return None
        return cls._inst


def _thp_mode() -> str:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ('' if unreadable)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
        return m.group(1) if m else ""
    except OSError:
        return ""


_BALLOON_DIR = "/sys/bus/virtio/drivers/virtio_balloon"
_VIRTIO_BALLOON_F_REPORTING = 5


def _free_page_reporting(balloon_dir: str | None = None) -> bool:
    """Whether a virtio balloon reports free pages to the hypervisor (feature bit 5 of one of its
    devices): free blocks of 2 MiB and up are then handed back to the host, and the next first
    touch of such a block faults on the host too (on one such VM: 0.3-0.8 GB/s for huge pages
    drawn from reported blocks, against 1.2-1.7 GB/s for 4 KiB pages from the unreported
    low-order free lists).

    Raises:
        Nothing (unreadable sysfs: False).
    """
    d = balloon_dir or _BALLOON_DIR
    try:
        devs = [e for e in os.listdir(d) if e.startswith("virtio")]
    except OSError:
        return False
    for e in devs:
        try:
            with open(os.path.join(d, e, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > _VIRTIO_BALLOON_F_REPORTING and bits[_VIRTIO_BALLOON_F_REPORTING] == "1":
            return True
    return False


def _auto_alloc() -> str:
    """What alloc='auto' means here: per-tensor mappings whose page size the populate helpers
    choose as they go (``adaptive``) where THP can be had by madvise; else torch's allocator.

    Huge pages are not always the cheaper ones to fault: on a VM whose balloon reports free
    pages to the host (:func:`_free_page_reporting`), a 2 MiB block the host took back faults
    several times slower per byte than 4 KiB pages, and not faster with more threads, while
    blocks freed a moment ago fault several times faster as huge pages. Which kind the kernel
    hands out next is not knowable in advance, so the helpers measure both and keep the faster."""
    if _Libc.get() is None or _thp_mode() not in ("always", "madvise"):
        return "torch"
    return "adaptive"


def _resolve_modes(alloc: str | None, populate: str | None) -> tuple[str, str]:
    """(alloc, populate) after the LLMIO_CKPT_ALLOC / LLMIO_CKPT_POPULATE environment and 'auto'.

    Raises:
        ValueError: an unknown mode (names the variable).
    """
    a = alloc if alloc is not None else os.environ.get("LLMIO_CKPT_ALLOC", "auto")
    p = populate if populate is not None else os.environ.get("LLMIO_CKPT_POPULATE", "auto")
    if a not in ALLOC_MODES:
        raise ValueError(f"LLMIO_CKPT_ALLOC / alloc must be one of {ALLOC_MODES}, got {a!r}")
    if p not in POPULATE_MODES:
        raise ValueError(f"LLMIO_CKPT_POPULATE / populate must be one of {POPULATE_MODES}, got {p!r}")
    if a == "auto":
        a = _auto_alloc()
    if a != "torch" and _Libc.get() is None:  # pragma: no cover - no libc symbols
        a = "torch"
    if p == "auto":
        p = "on" if a in ("hugepage", "adaptive") else "off"
    if a == "torch":
        p = "off"  # torch's allocator gives no mapping to pre-fault
    return a, p


class _RegionStats:
    def __init__(self) -> None:
        self.regions = 0
        self.region_bytes = 0
        self.huge_ok = 0
        self.huge_refused = 0
        self.populate_ok = 0
        self.populate_refused = 0
        self.huge_bytes = 0
        """Bytes the adaptive helpers faulted as huge pages (advised MADV_HUGEPAGE)."""
        self.small_bytes = 0
        """Bytes the adaptive helpers left to the reads as 4 KiB pages (MADV_NOHUGEPAGE)."""


_live_lock = threading.Lock()
_live_bytes = [0, 0]
"""[bytes, mappings] of load_file mappings not yet unmapped (diagnostics and tests)."""


def live_region_bytes() -> tuple[int, int]:
    """(bytes, count) of the anonymous mappings behind loaded CPU tensors still alive.

    Raises:
        Nothing.
    """
    with _live_lock:
        return _live_bytes[0], _live_bytes[1]


def _unmap_region(base: int, length: int) -> None:
    lc = _Libc.get()
    if lc is not None:
        lc.munmap(ctypes.c_void_p(base), length)
    with _live_lock:
        _live_bytes[0] -= length
        _live_bytes[1] -= 1


def _new_region(nbytes: int, huge: bool, rs: _RegionStats, advise: bool = True) -> "torch.Tensor":
    """A fresh anonymous private mapping of ``nbytes`` (rounded up to pages) as a uint8 tensor
    that owns it: munmap runs when the tensor's storage (every view of it) is freed. With
    ``huge``, the mapping starts 2 MiB-aligned and (``advise``) is advised MADV_HUGEPAGE (a
    refusal is counted, not raised); without ``advise`` the page size is left for the adaptive
    populate helpers to choose.

    Raises:
        MemoryError: mmap failed.
    """
    torch = _torch()
    lc = _Libc.get()
    assert lc is not None
    length = _align_up(max(nbytes, 1), lc.page)
    extra = _HUGE_BYTES if huge and length >= _HUGE_BYTES else 0
    span = length + extra
    addr = lc.mmap(None, span, 0x1 | 0x2, 0x02 | 0x20, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise MemoryError(f"mmap of {span} bytes for a checkpoint tensor failed: {os.strerror(e)}")
    base = addr
    if extra:
        base = _align_up(addr, _HUGE_BYTES)
        if base > addr:
            lc.munmap(ctypes.c_void_p(addr), base - addr)
        tail = addr + span - (base + length)
        if tail:
            lc.munmap(ctypes.c_void_p(base + length), tail)
    if huge and advise:
        if lc.madvise(ctypes.c_void_p(base), length, _MADV_HUGEPAGE) == 0:
            rs.huge_ok += 1
        else:
            rs.huge_refused += 1
    rs.regions += 1
    rs.region_bytes += length
    with _live_lock:
        _live_bytes[0] += length
        _live_bytes[1] += 1
    try:
        mv = memoryview((ctypes.c_ubyte * length).from_address(base)).cast("B")
        fin = weakref.finalize(mv, _unmap_region, base, length)
        fin.atexit = False  # at exit, tensors may outlive the finaliser registry: leave the mapping
        t = torch.frombuffer(mv, dtype=torch.uint8)
    except BaseException:
        _unmap_region(base, length)
        raise
    return t


class _Populator:
    """Helper threads that pre-fault (MADV_POPULATE_WRITE) the mappings of every read chunk, in
    read order, ahead of the engine: the reader waits (:meth:`wait`) until chunk k is populated,
    then reads it while the helpers fault chunk k+1, k+2... Fresh memory then faults on as many
    CPUs as there are helpers (a page fault is CPU work; an O_DIRECT read into populated memory
    is almost none), and the engine's reads never fault. A refusal (kernel before 5.14, or the
    advice unknown) stops the helpers, is counted, and releases every chunk: the engine's reads
    then fault the pages themselves."""

    _STEP = 16 << 20

    def __init__(self, chunks: Sequence[Sequence[tuple[int, ...]]], rs: _RegionStats, threads: int = 1,
                 chooser: "_PageChooser | None" = None) -> None:
        """``chunks[k]``: (address, bytes[, ends a region]) to populate before chunk k is read;
        with a ``chooser``, each piece is advised huge or 4 KiB pages just before it is faulted
        (the mappings must not have been advised, and be 2 MiB-aligned for huge pages)."""
        self.rs = rs
        self.chooser = chooser
        self.stop = threading.Event()
        self.ready = [threading.Event() for _ in chunks]
        self._lock = threading.Lock()
        self._left = [0] * len(chunks)  # pieces of each chunk not yet populated
        self._pieces: list[tuple[int, int, int, bool]] = []  # (chunk, address, bytes, last piece of its region)
        for c, chunk in enumerate(chunks):
            for item in chunk:
                addr, length = item[0], item[1]
                ends = item[2] if len(item) > 2 else True  # the region's last part (counted when done)
                pos = 0
                while pos < length:
                    n = min(self._STEP, length - pos)
                    self._pieces.append((c, addr + pos, n, ends and pos + n == length))
                    self._left[c] += 1
                    pos += n
            if not self._left[c]:
                self.ready[c].set()
        self._next = 0
        self.threads = [threading.Thread(target=self._run, name=f"llmio-ckpt-populate-{i}", daemon=True)
                        for i in range(max(1, min(threads, len(self._pieces))))]

    def _take(self) -> tuple[int, int, int, bool] | None:
        with self._lock:
            if self._next >= len(self._pieces) or self.stop.is_set():
                return None
            self._next += 1
            return self._pieces[self._next - 1]

    def _release_all(self) -> None:
        for e in self.ready:
            e.set()

    def _run(self) -> None:
        lc = _Libc.get()
        assert lc is not None
        try:
            while (piece := self._take()) is not None:
                c, addr, n, last = piece
                if not self._populate(lc, addr, n):
                    with self._lock:
                        self.rs.populate_refused += 1
                    self.stop.set()
                    break
                with self._lock:
                    if last:
                        self.rs.populate_ok += 1
                    self._left[c] -= 1
                    done = self._left[c] == 0
                if done:
                    self.ready[c].set()
        finally:
            if self.stop.is_set():
                self._release_all()

    def _populate(self, lc: _Libc, addr: int, n: int) -> bool:
        """Fault [addr, addr + n) (False: MADV_POPULATE_WRITE refused). With a chooser, step by
        step (2 MiB-aligned steps): a huge step is advised MADV_HUGEPAGE and faulted here, a
        small one advised MADV_NOHUGEPAGE and left for the engine's read to fault."""
        if self.chooser is None:
            return lc.madvise(ctypes.c_void_p(addr), n, _MADV_POPULATE_WRITE) == 0
        step = self.chooser.STEP
        pos, end = addr, addr + n
        while pos < end:
            nxt = min(end, _align_down(pos, step) + step)
            m = nxt - pos
            a = ctypes.c_void_p(pos)
            huge = m == step and self.chooser.choose()
            # unadvised memory gets 4 KiB pages unless THP is "always": advise only what differs
            advice = _MADV_HUGEPAGE if huge else (_MADV_NOHUGEPAGE if self.chooser.thp_always else 0)
            if advice and lc.madvise(a, m, advice) != 0:
                with self._lock:
                    self.rs.huge_refused += 1
                self.chooser.refuse()
                huge = False  # no THP here: the reads fault whatever pages the kernel gives
            if huge or _ADAPTIVE_POPULATE_SMALL:
                t0 = time.perf_counter()
                if lc.madvise(a, m, _MADV_POPULATE_WRITE) != 0:
                    return False
                if huge:
                    self.chooser.record(m, time.perf_counter() - t0)
            with self._lock:
                if huge:
                    self.rs.huge_bytes += m
                else:
                    self.rs.small_bytes += m
            pos = nxt
        return True

    def start(self) -> "_Populator":
        for t in self.threads:
            t.start()
        return self

    def wait(self, k: int) -> None:
        """Block until chunk ``k`` is populated (or the helpers stopped)."""
        self.ready[k].wait()

    def __enter__(self) -> "_Populator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def finish(self) -> None:
        """Wait until every chunk is populated (tests; loads stop it instead)."""
        for t in self.threads:
            t.join()


class _PageChooser:
    """Chooses, for each 2 MiB step of a mapping, between huge pages faulted by the populate
    helpers and 4 KiB pages left for the engine's reads to fault.

    Measured on the dev VM (a balloon reporting free pages to the host): a huge page faults
    either far faster than the disk reads (a block freed a moment ago and still backed: 13-24
    GB/s per thread) or far slower (a block the host took back: 0.1-0.5 GB/s, and no faster
    with more threads), and a load can meet both, in runs. 4 KiB pages left unfaulted until
    the O_DIRECT read pins them load at 1.9 GB/s there, where faulting them ahead with
    ``MADV_POPULATE_WRITE`` loaded at 1.0-1.1 GB/s (see docs/guide.md, Checkpoints). So each
    step goes to huge pages while the last huge step faulted at ``HUGE_MIN_RATE`` or more per
    thread, else to the reads; after a slow huge step, one step in ``every`` tries huge pages
    again, ``every`` chosen so that the probes cost at most ``1 / PROBE_COST`` of the time (2 %)
    (a probe against steps loading at about ``SMALL_RATE``)."""

    STEP = _HUGE_BYTES
    HUGE_MIN_RATE = 2e9
    SMALL_RATE = 1.5e9
    PROBE_COST = 50
    MIN_PROBE_EVERY = 16
    MAX_PROBE_EVERY = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.huge_rate: float | None = None
        self.steps = 0
        self._last_probe = 0
        self._refused = False
        self.thp_always = _thp_mode() == "always"

    def choose(self) -> bool:
        """True: fault the next step as a huge page now; False: leave it to the reads."""
        with self._lock:
            self.steps += 1
            if self._refused:
                return False
            rh = self.huge_rate
            if rh is None or rh >= self.HUGE_MIN_RATE:
                return True
            every = min(self.MAX_PROBE_EVERY,
                        max(self.MIN_PROBE_EVERY, int(self.PROBE_COST * self.SMALL_RATE / max(rh, 1e6))))
            if self.steps - self._last_probe >= every:
                self._last_probe = self.steps
                return True
            return False

    def record(self, nbytes: int, seconds: float) -> None:
        """A huge step of ``nbytes`` faulted in ``seconds``."""
        with self._lock:
            self.huge_rate = nbytes / max(seconds, 1e-9)
            self._last_probe = self.steps  # the next probe counts from this measurement

    def refuse(self) -> None:
        """The kernel refused a page-size advice: no huge pages from now on."""
        with self._lock:
            self._refused = True


def _populate_threads() -> int:
    """Helper threads for populate: ``LLMIO_CKPT_POPULATE_THREADS``, else the CPUs this process
    may run on, at most 4 (fault throughput grows with CPUs; past a few, the disk is the limit).

    Raises:
        ValueError: the variable is not a positive integer (names it).
    """
    v = os.environ.get("LLMIO_CKPT_POPULATE_THREADS")
    if v is not None:
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"LLMIO_CKPT_POPULATE_THREADS must be a positive integer, got {v!r}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _align_down(x: int, a: int) -> int:
    return x - x % a


def _align_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _alloc_cpu_congruent(reader: Any, fi: int, abs_off: int, nbytes: int) -> tuple[Any, tuple[int, int, int, int], int]:
    """A uint8 CPU buffer laid out so the aligned superset of ``[abs_off, abs_off + nbytes)``
    reads straight into it. Returns (raw, request, start of the tensor's bytes in raw)."""
    torch = _torch()
    A = reader.alignment(fi)
    size = reader.file_size(fi)
    a0 = _align_down(abs_off, A)
    a1 = min(_align_up(abs_off + nbytes, A), size)
    raw = torch.empty(a1 - a0 + A, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % A
    return raw, (fi, a0, raw.data_ptr() + shift, a1 - a0), shift + (abs_off - a0)


def _view_as(raw_u8: "torch.Tensor", dtype: "torch.dtype", shape: Sequence[int]) -> "torch.Tensor":
    t = raw_u8.view(dtype) if raw_u8.numel() else raw_u8.new_empty(0).view(dtype)
    return t.view(tuple(shape))


def _read_cpu(reader: Any, src: _Source, names: Sequence[str], direct: bool, alloc: str | None = None,
              populate: str | None = None, stats: dict | None = None) -> dict[str, "torch.Tensor"]:
    """Read ``names`` into fresh CPU tensors, each its own allocation (an anonymous mapping from
    ``_REGION_MIN_BYTES`` up unless ``alloc`` is "torch"), in one batch (chunks with populate).

    Raises:
        ValueError: an unknown alloc or populate mode, a bad LLMIO_CKPT_POPULATE_THREADS.
        MemoryError: a mapping could not be made.
        OSError: a read failed.
    """
    torch = _torch()
    amode, pmode = _resolve_modes(alloc, populate)
    rs = _RegionStats()
    out: dict[str, torch.Tensor] = {}
    reqs: list[tuple[int, int, int, int]] = []
    regions: list[tuple[int, int]] = []  # (address, bytes) of each request's mapping (0, 0: none)
    active = reader.stats()["direct_active"] if direct else []
    for name in names:
        fi, info = src.info(name)
        h = src.headers[fi]
        dtype, shape = _torch_dtype(info, h.path), _torch_shape(info, h.path)
        abs_off = h.data_start + info.begin
        if info.nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        itemsize = dtype.itemsize
        congruent = direct and active[fi] and info.nbytes >= _DIRECT_MIN_BYTES
        if amode != "torch" and info.nbytes >= _REGION_MIN_BYTES:
            A = reader.alignment(fi)
            if congruent and _Libc.get().page % A == 0:  # type: ignore[union-attr]
                a0 = _align_down(abs_off, A)
                a1 = min(_align_up(abs_off + info.nbytes, A), reader.file_size(fi))
                raw = _new_region(a1 - a0, amode in ("hugepage", "adaptive"), rs, amode == "hugepage")
                start = abs_off - a0
                if (raw.data_ptr() + start) % itemsize == 0:
                    reqs.append((fi, a0, raw.data_ptr(), a1 - a0))
                    regions.append((raw.data_ptr(), raw.numel()))
                    out[name] = _view_as(raw[start:start + info.nbytes], dtype, shape)
                    continue
                del raw
            raw = _new_region(info.nbytes, amode in ("hugepage", "adaptive"), rs, amode == "hugepage")
            reqs.append((fi, abs_off, raw.data_ptr(), info.nbytes))
            regions.append((raw.data_ptr(), raw.numel()))
            out[name] = _view_as(raw[:info.nbytes], dtype, shape)
            continue
        if congruent:
            raw, req, start = _alloc_cpu_congruent(reader, fi, abs_off, info.nbytes)
            if (raw.data_ptr() + start) % itemsize == 0:
                reqs.append(req)
                regions.append((0, 0))
                out[name] = _view_as(raw[start:start + info.nbytes], dtype, shape)
                continue
        t = torch.empty(shape, dtype=dtype)
        reqs.append((fi, abs_off, t.data_ptr(), info.nbytes))
        regions.append((0, 0))
        out[name] = t
    nthreads = 0
    if reqs:
        native = reader.native()
        if pmode == "on" and any(r[1] for r in regions):
            nthreads = _populate_threads()
            chunks = _populate_chunks(reqs, regions)
            chooser = _PageChooser() if amode == "adaptive" else None
            with _Populator([[p for _, p in c if p[1]] for c in chunks], rs, nthreads, chooser) as pop:
                for k, c in enumerate(chunks):
                    pop.wait(k)
                    native.read_batch_ptr([r for r, _ in c])
        else:
            native.read_batch_ptr(reqs)
    if stats is not None:
        stats.update(alloc=amode, populate=pmode, regions=rs.regions, region_bytes=rs.region_bytes,
                     hugepage_advised=rs.huge_ok, hugepage_refused=rs.huge_refused,
                     populated_regions=rs.populate_ok, populate_refused=rs.populate_refused,
                     populate_threads=nthreads, huge_bytes=rs.huge_bytes, small_page_bytes=rs.small_bytes)
    return out


def _populate_chunks(reqs: list[tuple[int, int, int, int]], regions: list[tuple[int, int]]
                     ) -> list[list[tuple[tuple[int, int, int, int], tuple[int, int, bool]]]]:
    """Reads grouped into chunks that double in size from ``_Populator._STEP`` (the engine
    starts early) up to ``_POPULATE_CHUNK_BYTES`` (few waits: the engine's queue drains at the
    end of each chunk, which costs most where the reads fault the pages themselves), each read
    paired with the part of its
    mapping it fills, as (address, bytes, ends the mapping) ((0, 0, False): none). A read into a
    mapping that is longer than a step is cut at multiples of ``_Populator._STEP`` from its
    start (aligned as the read itself is)."""
    step = _Populator._STEP
    Piece = tuple[tuple[int, int, int, int], tuple[int, int, bool]]
    pieces: list[Piece] = []
    for r, reg in zip(reqs, regions):
        fi, off, ptr, n = r
        if not reg[1] or n <= step:
            pieces.append((r, (ptr, n, True) if reg[1] else (0, 0, False)))
            continue
        for pos in range(0, n, step):
            m = min(step, n - pos)
            pieces.append(((fi, off + pos, ptr + pos, m), (ptr + pos, m, pos + m == n)))
    chunks: list[list[Piece]] = [[]]
    acc, limit = 0, step
    for p in pieces:
        if acc >= limit:
            chunks.append([])
            acc, limit = 0, min(2 * limit, _POPULATE_CHUNK_BYTES)
        chunks[-1].append(p)
        acc += p[0][3]
    return chunks


class _Pipeline:
    """Staging slots and (CUDA) a side stream: runs of file bytes are read into slot k+1 while
    slot k is copied into its destinations (async H2D from page-locked slots on the side
    stream). Blocking: ``run`` returns once every copy has completed. On a CPU ``device`` the
    same arithmetic runs with plain slots and synchronous copies (how the tests check it here).
    """

    def __init__(self, device: "torch.device", slot_bytes: int | None = None, num_slots: int | None = None) -> None:
        torch = _torch()
        self.device = device
        self.cuda = device.type == "cuda"
        self.slot_bytes = int(slot_bytes or _SLOT_BYTES)
        self.align = 1 << 21
        self.slots = []
        for _ in range(int(num_slots or _NUM_SLOTS)):
            raw = torch.empty(self.slot_bytes + self.align, dtype=torch.uint8, pin_memory=self.cuda)
            shift = (-raw.data_ptr()) % self.align
            self.slots.append(raw[shift:shift + self.slot_bytes])
        self.events: list[Any] = [None] * len(self.slots)
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def run(self, reader: Any, runs: Iterable[tuple[int, int, list[tuple[int, int, "torch.Tensor"]]]]) -> None:
        """``runs``: (file index, absolute file offset, [(offset in run, nbytes, destination uint8
        view)]) with each run's aligned superset at most ``slot_bytes`` long.

        Raises:
            ValueError: a run longer than a slot.
            OSError: a read failed (copies already queued complete before it propagates).
        """
        torch = _torch()
        cur = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda:
            self.stream.wait_stream(cur)  # destinations may still be in use on the caller's stream
        ctx = (lambda: torch.cuda.stream(self.stream)) if self.cuda else contextlib.nullcontext
        k = 0
        try:
            for fi, off, parts in runs:
                s = k % len(self.slots)
                k += 1
                if self.events[s] is not None:
                    self.events[s].synchronize()  # slot s's previous copies are done: reuse it
                    self.events[s] = None
                slot = self.slots[s]
                A = reader.alignment(fi)
                end = off + max((o + n for o, n, _ in parts), default=0)
                a0, a1 = _align_down(off, A), min(_align_up(end, A), reader.file_size(fi))
                if a1 - a0 > self.slot_bytes:
                    raise ValueError(f"run of {a1 - a0} bytes exceeds the staging slot ({self.slot_bytes})")
                reader.native().read_batch_ptr([(fi, a0, slot.data_ptr(), a1 - a0)])
                base = off - a0
                with ctx():
                    for o, n, dst in parts:
                        dst.copy_(slot[base + o:base + o + n], non_blocking=self.cuda)
                    if self.cuda:
                        ev = torch.cuda.Event()
                        ev.record(self.stream)
                        self.events[s] = ev
        finally:
            if self.cuda:
                self.stream.synchronize()
        if self.cuda:
            cur.wait_stream(self.stream)


def _runs_for(src: _Source, reader: Any, items: Sequence[tuple[str, "torch.Tensor"]], slot_bytes: int
              ) -> Iterator[tuple[int, int, list[tuple[int, int, "torch.Tensor"]]]]:
    """Group (name, destination) pairs into runs of adjacent file bytes whose aligned superset
    fits a slot; a tensor larger than a slot is split over several runs."""
    limit = slot_bytes - 2 * max((reader.alignment(i) for i in range(len(src.files))), default=4096)
    if limit <= 0:
        raise ValueError(f"staging slot of {slot_bytes} bytes is smaller than two alignment blocks")
    order = sorted(items, key=lambda it: (src.info(it[0])[0], src.info(it[0])[1].begin))
    run_fi, run_off, run_end, parts = -1, 0, 0, []
    for name, dst in order:
        fi, info = src.info(name)
        h = src.headers[fi]
        flat = dst.view(-1).view(_torch().uint8) if info.nbytes else None
        pos = 0
        while pos < info.nbytes:
            abs_off = h.data_start + info.begin + pos
            if parts and (fi != run_fi or abs_off != run_end or run_end - run_off >= limit):
                yield run_fi, run_off, parts
                parts = []
            if not parts:
                run_fi, run_off, run_end = fi, abs_off, abs_off
            n = min(info.nbytes - pos, limit - (run_end - run_off))
            parts.append((run_end - run_off, n, flat[pos:pos + n]))
            run_end += n
            pos += n
    if parts:
        yield run_fi, run_off, parts


# ---------------------------------------------------------------------------------------------
# several ranks
# ---------------------------------------------------------------------------------------------
class _Group:
    def __init__(self, pg: Any, rank: int, world: int) -> None:
        self.pg, self.rank, self.world = pg, rank, world

    def global_rank(self, r: int) -> int:
        import torch.distributed as dist

        return r if self.pg is None else dist.get_global_rank(self.pg, r)


def _group(process_group: Any, rank: int | None, world_size: int | None) -> _Group | None:
    if process_group is None and rank is None and world_size is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("rank/world_size/process_group given but torch.distributed is not initialised "
                         "(call init_process_group first)")
    r, w = dist.get_rank(process_group), dist.get_world_size(process_group)
    if (rank is not None and rank != r) or (world_size is not None and world_size != w):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group "
                         f"(rank {r} of {w})")
    if w == 1:
        return None
    return _Group(process_group, r, w)


def _bcast_on_device(group: _Group) -> bool:
    """nccl broadcasts device tensors only; gloo takes CPU tensors."""
    import torch.distributed as dist

    return dist.get_backend(group.pg) == "nccl"


def _owners(src: _Source, names: Sequence[str], world: int) -> dict[str, int]:
    """Deterministic split of ``names`` over ``world`` ranks, balanced by bytes (largest first,
    each to the least-loaded rank); every rank computes the same answer."""
    load = [0] * world
    own: dict[str, int] = {}
    for name in sorted(names, key=lambda n: (-src.info(n)[1].nbytes, n)):
        r = min(range(world), key=lambda i: (load[i], i))
        own[name] = r
        load[r] += src.info(name)[1].nbytes
    return own


def _broadcast(group: _Group, owners: Mapping[str, int], tensors: Mapping[str, "torch.Tensor"]) -> None:
    import torch.distributed as dist

    for name in sorted(owners):
        t = tensors[name]
        if t.numel() == 0:
            continue
        dist.broadcast(t, src=group.global_rank(owners[name]), group=group.pg)


# ---------------------------------------------------------------------------------------------
# public: loads
# ---------------------------------------------------------------------------------------------
def _as_device(device: Any) -> "torch.device":
    torch = _torch()
    d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return d


def _fill_stats(stats: dict | None, reader: Any, direct: bool) -> None:
    if stats is not None:
        s = reader.stats()
        s["io_direct"] = direct
        stats.update(s)


def _load_names(src: _Source, names: Sequence[str], device: "torch.device", io_mode: str, backend: str,
                stats: dict | None) -> dict[str, "torch.Tensor"]:
    """Read ``names`` of ``src`` onto ``device`` (every byte once, in one Reader)."""
    torch = _torch()
    reader, cold = _make_reader(src, io_mode, backend)
    direct = reader.direct
    alloc_stats: dict = {}
    try:
        if device.type == "cpu" and not _CPU_STAGING:
            out = _read_cpu(reader, src, names, direct, stats=alloc_stats)
        else:
            out = {}
            for name in names:
                fi, info = src.info(name)
                path = src.headers[fi].path
                out[name] = torch.empty(_torch_shape(info, path), dtype=_torch_dtype(info, path), device=device)
            pipe = _Pipeline(device)
            pipe.run(reader, _runs_for(src, reader, list(out.items()), pipe.slot_bytes))
    finally:
        _drop_cache(src.files, cold)
    _fill_stats(stats, reader, direct)
    if stats is not None:
        stats.update(alloc_stats)
    return out


def load_file(path: str | os.PathLike[str], device: Any = "cpu", *, dtype: "torch.dtype | None" = None,
              keys: Iterable[str] | None = None, io_mode: str = "auto", process_group: Any = None,
              rank: int | None = None, world_size: int | None = None, backend: str = "auto",
              max_header_bytes: int = MAX_HEADER_BYTES, stats: dict | None = None) -> dict[str, "torch.Tensor"]:
    """Load a safetensors checkpoint: a ``.safetensors`` file, a directory (its
    ``*.safetensors.index.json``, else its ``.safetensors`` files), or an index JSON.

    Every tensor is read once through the native engine into memory owned by the caller (no
    mmap, no shared buffer). Validation of every header, index and requested key happens before
    any byte is read: on error nothing is returned.

    Args:
        path: file, directory or index.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or a CUDA index.
        dtype: when given, floating-point tensors are converted to it (others keep theirs).
        keys: load only these tensors (each must exist).
        io_mode: ``"auto"`` (buffered when the data is mostly in the page cache, else O_DIRECT),
            ``"direct"`` or ``"buffered"``.
        process_group, rank, world_size: read as a group: each rank reads a byte-balanced share
            and broadcasts it (the group's backend must handle tensors on ``device``: gloo for
            CPU, nccl for CUDA). ``rank``/``world_size`` alone mean the default group and must
            match it.
        backend: the Reader engine (``"auto"`` | ``"io_uring"`` | ``"threads"``).
        max_header_bytes: refuse headers longer than this.
        stats: when a dict, updated with the Reader's counters (``bytes``, ``bytes_direct``...)
            and ``io_direct``; on the CPU also the fresh-memory path taken (``alloc``,
            ``populate``, ``populate_threads``, ``regions``, ``hugepage_advised``,
            ``hugepage_refused``, ``populated_regions``, ``populate_refused``, ``huge_bytes``,
            ``small_page_bytes``).

    CPU tensors of 1 MiB and more live in their own anonymous mapping (faulted in huge pages by
    helper threads while the disk reads where that is fast here, else in 4 KiB pages by the
    reads; ``LLMIO_CKPT_ALLOC`` / ``LLMIO_CKPT_POPULATE`` / ``LLMIO_CKPT_POPULATE_THREADS``
    force a path), private to that tensor and its views (no two returned tensors share
    memory), unmapped as soon as the tensor and its views are freed; such tensors cannot grow
    in place (``resize_`` past their storage raises ``RuntimeError``; ``clone()`` first).

    Returns:
        name -> tensor, in file order.

    Raises:
        SafetensorsError: a malformed file or index, a missing shard, a missing key, a dtype
            torch lacks; the message names the file and the tensor.
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad ``device``, ``io_mode``, or group arguments; an unknown
            ``LLMIO_CKPT_ALLOC`` / ``LLMIO_CKPT_POPULATE`` / ``LLMIO_CKPT_POPULATE_THREADS`` value.
        MemoryError: a tensor's mapping could not be made.
        OSError: a read failed (names file, offset, length).
    """
    torch = _torch()
    dev = _as_device(device)
    src = _open_source(path, max_header_bytes)
    if keys is None:
        names = [n for i, h in enumerate(src.headers) for n in h.tensors if src.where.get(n) == i]
    else:
        names = list(dict.fromkeys(keys))
        for n in names:
            src.info(n)
    for n in names:  # dtype and shape problems surface before any read
        fi, info = src.info(n)
        _torch_dtype(info, src.headers[fi].path)
        _torch_shape(info, src.headers[fi].path)
    group = _group(process_group, rank, world_size)
    if group is None:
        out = _load_names(src, names, dev, io_mode, backend, stats)
    else:
        owners = _owners(src, names, group.world)
        mine = [n for n in names if owners[n] == group.rank]
        got = _load_names(src, mine, dev, io_mode, backend, stats)
        out = {}
        for n in names:
            if n in got:
                out[n] = got[n]
            else:
                fi, info = src.info(n)
                p = src.headers[fi].path
                out[n] = torch.empty(_torch_shape(info, p), dtype=_torch_dtype(info, p), device=dev)
        _broadcast(group, owners, out)
    if dtype is not None:
        out = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in out.items()}
    return out


def _targets_of(module_or_state_dict: Any) -> dict[str, "torch.Tensor"]:
    torch = _torch()
    if isinstance(module_or_state_dict, torch.nn.Module):
        return dict(module_or_state_dict.state_dict(keep_vars=True))
    if isinstance(module_or_state_dict, Mapping):
        return dict(module_or_state_dict)
    raise TypeError(f"load_into needs an nn.Module or a mapping of name -> tensor, got "
                    f"{type(module_or_state_dict).__name__}")


def load_into(module_or_state_dict: Any, path: str | os.PathLike[str], strict: bool = True, *,
              io_mode: str = "auto", process_group: Any = None, rank: int | None = None,
              world_size: int | None = None, backend: str = "auto", max_header_bytes: int = MAX_HEADER_BYTES,
              stats: dict | None = None) -> IncompatibleKeys:
    """Read a checkpoint straight into existing tensors (parameters and buffers of a module, or
    the values of a state dict), on CPU or CUDA, with no intermediate copy of the model.

    CPU targets are read into directly (the engine bounces only the partial blocks it must).
    CUDA targets are filled from page-locked staging slots by async copies on a side stream,
    overlapping the read of slot k+1 with the copy of slot k; the caller's current stream waits
    for them. A target whose dtype differs from the file's is read into a temporary and
    converted with ``copy_``; a non-contiguous target likewise.

    Every key, shape and dtype is checked before any target is written, so a mismatch leaves
    every target untouched. An I/O error in the middle of the read can leave targets partly
    written (the error says which file and offset).

    Args:
        module_or_state_dict: ``nn.Module`` (its ``state_dict(keep_vars=True)``) or a mapping.
        path: file, directory or index, as for :func:`load_file`.
        strict: every target must be in the checkpoint and every checkpoint tensor a target.
        io_mode, process_group, rank, world_size, backend, max_header_bytes, stats: as for
            :func:`load_file`.

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)`` (both empty when ``strict``).

    Raises:
        SafetensorsError: malformed checkpoint; with ``strict``, missing or unexpected keys;
            a shape that differs from the target's (names the file and the tensor).
        TypeError: ``module_or_state_dict`` is neither a module nor a mapping.
        ValueError, OSError: as for :func:`load_file`.
    """
    torch = _torch()
    targets = _targets_of(module_or_state_dict)
    src = _open_source(path, max_header_bytes)
    missing = sorted(n for n in targets if n not in src.where)
    unexpected = sorted(n for n in src.where if n not in targets)
    if strict and (missing or unexpected):
        raise SafetensorsError(f"{src.origin}: keys do not match (strict=True): missing in the checkpoint "
                               f"{missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected "
                               f"{unexpected[:10]}{'...' if len(unexpected) > 10 else ''}", path=src.origin,
                               tensor=(missing or unexpected)[0])
    names = [n for n in targets if n in src.where]
    direct_into: dict[str, torch.Tensor] = {}
    convert: list[str] = []
    for n in names:
        fi, info = src.info(n)
        p = src.headers[fi].path
        dt, shape = _torch_dtype(info, p), _torch_shape(info, p)
        t = targets[n]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"target {n!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise SafetensorsError(f"{p}: tensor {n!r}: shape {list(shape)} in the file, {list(t.shape)} in the "
                                   "target", path=p, tensor=n)
        if t.dtype == dt and t.is_contiguous() and t.device.type in ("cpu", "cuda"):
            direct_into[n] = t.detach()
        else:
            convert.append(n)
    group = _group(process_group, rank, world_size)
    owners = _owners(src, names, group.world) if group else {n: 0 for n in names}
    me = group.rank if group else 0
    with torch.no_grad():
        mine_cpu = [n for n in direct_into if owners[n] == me and direct_into[n].device.type == "cpu"]
        mine_cuda = [n for n in direct_into if owners[n] == me and direct_into[n].device.type == "cuda"]
        if mine_cpu or mine_cuda:
            reader, cold = _make_reader(src, io_mode, backend)
            try:
                reqs = []
                for n in mine_cpu:
                    fi, info = src.info(n)
                    if info.nbytes:
                        reqs.append((fi, src.headers[fi].data_start + info.begin, direct_into[n].data_ptr(),
                                     info.nbytes))
                if reqs:
                    reader.native().read_batch_ptr(reqs)
                by_dev: dict[Any, list[tuple[str, torch.Tensor]]] = {}
                for n in mine_cuda:
                    by_dev.setdefault(direct_into[n].device, []).append((n, direct_into[n]))
                for dev, items in by_dev.items():
                    pipe = _Pipeline(dev)
                    pipe.run(reader, _runs_for(src, reader, items, pipe.slot_bytes))
            finally:
                _drop_cache(src.files, cold)
            _fill_stats(stats, reader, reader.direct)
        # Targets of another dtype or layout: read (or receive) in the file's dtype, then convert.
        mine_conv = [n for n in convert if owners[n] == me]
        tmp = _load_names(src, mine_conv, torch.device("cpu"), io_mode, backend, None) if mine_conv else {}
        if group is not None:
            for n in convert:
                if n not in tmp:
                    fi, info = src.info(n)
                    p = src.headers[fi].path
                    dev = targets[n].device if _bcast_on_device(group) else torch.device("cpu")
                    tmp[n] = torch.empty(_torch_shape(info, p), dtype=_torch_dtype(info, p), device=dev)
                elif _bcast_on_device(group):
                    tmp[n] = tmp[n].to(targets[n].device)
            _broadcast(group, owners, {**direct_into, **tmp})
        for n in convert:
            targets[n].copy_(tmp[n])
    return IncompatibleKeys(missing, unexpected)


class _SafeSlice:
    """A lazily read tensor of a :func:`safe_open` file, as ``safetensors``' ``PySafeSlice``:
    ``get_shape()``, ``get_dtype()``, and indexing (ints, slices with positive steps, Ellipsis)
    that reads only the rows of the first dimension the index touches."""

    def __init__(self, owner: "_SafeOpen", name: str) -> None:
        self._owner, self._name = owner, name
        self._fi, self._info = owner._src.info(name)

    def get_shape(self) -> list[int]:
        """The tensor's shape as the header states it.

        Raises:
            Nothing.
        """
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The header's dtype name (``"BF16"``...).

        Raises:
            Nothing.
        """
        return self._info.dtype

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._info.shape[0]

    def __getitem__(self, index: Any) -> "torch.Tensor":
        """Read the part of the tensor ``index`` selects (a new tensor on the file's device).

        Raises:
            IndexError: an integer index out of range.
            ValueError: a slice with a step <= 0.
            SafetensorsError: a dtype torch lacks.
            OSError: the read failed.
        """
        info, path = self._info, self._owner._src.headers[self._fi].path
        shape = _torch_shape(info, path)
        idx = index if isinstance(index, tuple) else (index,)
        if not shape or not idx or info.nbytes == 0:
            return self._owner.get_tensor(self._name)[index]
        first = idx[0]
        rows = shape[0]
        row_bytes = info.nbytes // rows if rows else 0
        if isinstance(first, int):
            r = first + rows if first < 0 else first
            if not 0 <= r < rows:
                raise IndexError(f"index {first} out of range for dimension 0 of {self._name!r} (size {rows})")
            lo, hi, rest = r, r + 1, (0,) + idx[1:]
        elif isinstance(first, slice):
            start, stop, step = first.indices(rows)
            if step <= 0:
                raise ValueError(f"slice step must be positive, got {step}")
            lo, hi = start, max(start, stop)
            rest = (slice(0, hi - lo, step),) + idx[1:]
        else:  # Ellipsis, None, tensors: read it all
            return self._owner.get_tensor(self._name)[index].clone()
        part = self._owner._read_range(self._fi, info, lo * row_bytes, (hi - lo) * row_bytes)
        dt = _torch_dtype(info, path)
        t = _view_as(part, dt, ((hi - lo),) + tuple(shape[1:]))
        return t[rest].contiguous().to(self._owner._device)


class _SafeOpen:
    """What :func:`safe_open` returns (also a context manager)."""

    def __init__(self, path: str | os.PathLike[str], framework: str, device: Any, io_mode: str, backend: str,
                 max_header_bytes: int) -> None:
        if framework not in ("pt", "torch"):
            raise ValueError(f"framework must be 'pt', got {framework!r} (only torch tensors are produced)")
        self._device = _as_device(device)
        self._src = _open_source(path, max_header_bytes)
        if len(self._src.files) != 1:
            raise ValueError(f"safe_open takes one .safetensors file; {path} has {len(self._src.files)} "
                             "(use load_file for a sharded checkpoint)")
        self._io_mode, self._backend = io_mode, backend
        self._reader: Any = None
        self._cold: list[bool] = []
        self._pipe: _Pipeline | None = None

    def _get_reader(self) -> Any:
        if self._reader is None:
            self._reader, self._cold = _make_reader(self._src, self._io_mode, self._backend)
        return self._reader

    def _read_range(self, fi: int, info: TensorInfo, rel: int, nbytes: int) -> "torch.Tensor":
        torch = _torch()
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._get_reader().read_into(fi, self._src.headers[fi].data_start + info.begin + rel, out)
        return out

    def keys(self) -> list[str]:
        """Tensor names, sorted (as ``safetensors``).

        Raises:
            Nothing.
        """
        return sorted(self._src.where)

    def offset_keys(self) -> list[str]:
        """Tensor names in file order.

        Raises:
            Nothing.
        """
        return list(self._src.headers[0].tensors)

    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` map, or None.

        Raises:
            Nothing.
        """
        m = self._src.headers[0].metadata
        return dict(m) if m is not None else None

    def get_tensor(self, name: str) -> "torch.Tensor":
        """Read tensor ``name`` into a new tensor on this file's device.

        Raises:
            SafetensorsError: no such tensor, or a dtype torch lacks.
            OSError: the read failed.
        """
        fi, info = self._src.info(name)
        reader = self._get_reader()
        if self._device.type == "cpu":
            return _read_cpu(reader, self._src, [name], reader.direct)[name]
        path = self._src.headers[fi].path
        t = _torch().empty(_torch_shape(info, path), dtype=_torch_dtype(info, path), device=self._device)
        if self._pipe is None:
            self._pipe = _Pipeline(self._device, slot_bytes=min(_SLOT_BYTES, 16 << 20), num_slots=2)
        self._pipe.run(reader, _runs_for(self._src, reader, [(name, t)], self._pipe.slot_bytes))
        return t

    def get_slice(self, name: str) -> _SafeSlice:
        """A lazy view of tensor ``name``; index it to read part of it.

        Raises:
            SafetensorsError: no such tensor.
        """
        return _SafeSlice(self, name)

    def close(self) -> None:
        """Release the reader (tensors already returned stay valid: they own their memory).

        Raises:
            Nothing.
        """
        if self._reader is not None:
            _drop_cache(self._src.files, self._cold)
        self._reader = None
        self._pipe = None

    def __enter__(self) -> "_SafeOpen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def safe_open(path: str | os.PathLike[str], framework: str = "pt", device: Any = "cpu", *, io_mode: str = "auto",
              backend: str = "auto", max_header_bytes: int = MAX_HEADER_BYTES) -> _SafeOpen:
    """Open one safetensors file for lazy access, as ``safetensors.safe_open``: ``keys()``,
    ``metadata()``, ``get_tensor(name)``, ``get_slice(name)``; a context manager.

    Raises:
        SafetensorsError: the header is malformed (names the file and tensor).
        FileNotFoundError: no such file.
        ValueError: ``framework`` other than ``"pt"``, a bad device or io_mode, or a path that
            holds several files.
    """
    return _SafeOpen(path, framework, device, io_mode, backend, max_header_bytes)


# ---------------------------------------------------------------------------------------------
# saves
# ---------------------------------------------------------------------------------------------
def _cpu_contiguous(t: "torch.Tensor") -> "torch.Tensor":
    """The tensor's bytes as a contiguous CPU tensor (a copy only for device or strided ones)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def _prepare(tensors: Mapping[str, "torch.Tensor"]) -> list[tuple[str, str, list[int], "torch.Tensor"]]:
    torch = _torch()
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str -> Tensor, got {type(tensors).__name__}")
    out = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {name!r} is {t.layout}; only dense tensors can be saved")
        dn, shape = _header_dtype_shape(name, t)
        out.append((name, dn, shape, t))
    out.sort(key=lambda e: (-max(DTYPES[e[1]].bits // 8, 1), e[0]))
    return out


def _write_one(path: str | os.PathLike[str], entries: list[tuple[str, str, list[int], "torch.Tensor"]],
               metadata: Mapping[str, str] | None) -> None:
    """Header then every tensor's bytes through the engine's Writer (O_DIRECT where the file
    system allows, the tail padded and the file truncated), fdatasynced before it returns. Its
    staging fits the file (at most 64 MiB); inside :func:`reuse_staging` it comes from the pool."""
    from ..io import Writer, staging_for

    prefix, offsets = serialise([(n, d, s, t.numel() * t.element_size()) for n, d, s, t in entries], metadata)
    w = Writer(path, **staging_for(len(prefix) + (offsets[-1][1] if offsets else 0)))
    try:
        w.write(prefix)
        for (_n, _d, _s, t), (b, e) in zip(entries, offsets):
            if e > b:
                w.write(_cpu_contiguous(t))
        w.close(sync="data")
    except BaseException:
        w.abort()
        raise


def save_file(tensors: Mapping[str, "torch.Tensor"], path: str | os.PathLike[str],
              metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` to one safetensors file, crash-safely.

    The file is written under a staging name beside ``path``, flushed (fdatasync), renamed over
    ``path`` and the directory fsynced: a crash at any instant leaves either the previous file or
    the new one under ``path``. Non-contiguous and device tensors are copied to CPU contiguous
    memory first. Readable by ``safetensors`` (the header is padded with spaces to 4 KiB).

    Raises:
        TypeError: not a mapping of str -> Tensor.
        ValueError: a dtype safetensors cannot hold, a sparse tensor, metadata not str -> str,
            a reserved name (``__metadata__``).
        OSError: writing, flushing or renaming failed; the previous file is then untouched.
    """
    entries = _prepare(tensors)
    target = Path(os.fspath(path))
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save a checkpoint file over directory {target}", str(target))
    _commit.remove_stale(target)
    st = _commit.staging_path(target)
    try:
        _write_one(st, entries, metadata)
        _commit.commit(st, target, synced=[st])
    except BaseException:
        _commit.discard(st)
        raise


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10**9), ``"500MiB"`` (2**20).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be bytes or a size string, got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size (examples: 5GB, 500MiB, 1000000)")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _shard_plan(entries: list[tuple[str, "torch.Tensor"]], limit: int) -> list[list[str]]:
    """Split as ``huggingface_hub.split_torch_state_dict_into_shards`` does: in order, a new
    shard when the next tensor would tip the current one over ``limit``; a tensor bigger than
    ``limit`` alone in its own shard."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for name, t in entries:
        n = t.numel() * t.element_size()
        if n > limit:
            shards.append([name])
            continue
        if cur and cur_size + n > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += n
    if cur:
        shards.append(cur)
    return shards


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def save_sharded(tensors: Mapping[str, "torch.Tensor"], directory: str | os.PathLike[str],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None) -> list[str]:
    """Save ``tensors`` as a sharded checkpoint directory, as Hugging Face transformers does:
    ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json`` (one shard:
    ``model.safetensors`` alone), crash-safely.

    The whole directory is built under a staging name beside ``directory`` (shards fdatasynced,
    index written last) and swapped in atomically; files of an existing ``directory`` that are
    not safetensors shards or indexes (``config.json``...) are carried over (hard-linked).

    Args:
        tensors: name -> tensor.
        directory: the checkpoint directory (replaced whole; missing parents are created).
        max_shard_size: bytes, or a string (``"5GB"`` = 5*10**9, ``"2GiB"`` = 2*2**30).
        metadata: ``__metadata__`` of every shard (default ``{"format": "pt"}``).

    Returns:
        The shard file names, in order.

    Raises:
        TypeError, ValueError: as for :func:`save_file`; a bad ``max_shard_size``; an existing
            ``directory`` that is a file or holds sub-directories.
        OSError: writing or committing failed; the previous checkpoint is then untouched.
    """
    from ..io import reuse_staging, write_file

    limit = parse_size(max_shard_size)
    prepared = {n: (d, s, t) for n, d, s, t in _prepare(tensors)}
    order = [(n, prepared[n][2]) for n in tensors]
    plan = _shard_plan(order, limit)
    if not plan:
        plan = [[]]
    total = len(plan)
    names = [SINGLE_NAME] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    target = Path(os.fspath(directory))
    target.parent.mkdir(parents=True, exist_ok=True)
    carry: list[Path] = []
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"checkpoint directory {target} is a file", str(target))
        for p in target.iterdir():
            if p.is_dir() and not p.is_symlink():
                raise ValueError(f"{target} holds the sub-directory {p.name}; save_sharded replaces the directory "
                                 "whole and only carries plain files over")
            if not _is_checkpoint_file(p.name):
                carry.append(p)
    _commit.remove_stale(target)
    st = _commit.staging_path(target)
    st.mkdir()
    try:
        synced = []
        for p in carry:
            try:
                os.link(p, st / p.name, follow_symlinks=False)
            except OSError:
                shutil.copy2(p, st / p.name, follow_symlinks=False)
        weight_map: dict[str, str] = {}
        total_size = 0
        with reuse_staging():  # one staging arena for all shards, not one per file
            for fname, shard in zip(names, plan):
                entries = [(n,) + prepared[n] for n in shard]
                entries.sort(key=lambda e: (-max(DTYPES[e[1]].bits // 8, 1), e[0]))
                _write_one(st / fname, entries, meta)
                synced.append(st / fname)
                for n in shard:
                    weight_map[n] = fname
                    total_size += prepared[n][2].numel() * prepared[n][2].element_size()
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            ip = st / INDEX_NAME
            write_file(ip, [(json.dumps(index, indent=2, sort_keys=True) + "\n").encode()], sync="data", direct=False)
            synced.append(ip)
        _commit.commit(st, target, synced=synced)
    except BaseException:
        _commit.discard(st)
        raise
    return names


__all__ = ["load_file", "safe_open", "load_into", "save_file", "save_sharded", "SafetensorsError", "parse_size",
           "IncompatibleKeys"]
