"""``Reader``: exact byte ranges of a fixed list of files, through io_uring or a pread pool."""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np

from .._native import _core
from ..errors import UnsupportedError

BACKENDS = ("auto", "io_uring", "threads")


def resolve_backend(backend: str = "auto") -> str:
    """Return the engine a Reader with ``backend`` would use.

    ``LLMIO_BACKEND`` (``threads`` | ``io_uring`` | ``auto``), when set, overrides the
    argument. ``auto`` picks io_uring when the kernel lets us use it, else threads.

    Raises:
        ValueError: unknown backend name.
        UnsupportedError: io_uring was forced (argument or environment) but is unusable;
            the message says why (ENOSYS, seccomp EPERM, sysctl, not compiled).
    """
    env = os.environ.get("LLMIO_BACKEND", "").strip()
    choice = env or backend
    if choice not in BACKENDS:
        src = "LLMIO_BACKEND" if env else "backend"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {choice!r}")
    probe = _core.probe_io_uring()
    if choice == "auto":
        return "io_uring" if probe["usable"] else "threads"
    if choice == "io_uring" and not probe["usable"]:
        src = " (forced by LLMIO_BACKEND)" if env else ""
        raise UnsupportedError(f"io_uring backend requested{src} but unusable: {probe['reason']}")
    return choice


def _check_path(p: Any) -> str:
    """``p`` (str, bytes or path-like) as a str. ValueError naming it for an embedded NUL:
    the C string would end there and open a different file (the prefix)."""
    path = os.fsdecode(os.fspath(p))
    if "\0" in path:
        raise ValueError(f"path {path!r} contains a NUL byte")
    return path


def _ensure_fd_limit(needed: int) -> None:
    """Each file takes two descriptors (buffered and O_DIRECT); a dataset of thousands of
    shards outgrows the usual soft RLIMIT_NOFILE of 1024. Raise the soft limit towards the
    hard one when needed (as many training stacks do); never lower it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - best effort
        pass


def _is_tensor(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.Tensor)


def _buffer_ptr(buf: Any) -> tuple[int, int, Any]:
    """(address, nbytes, keepalive) of a writable contiguous CPU buffer or tensor."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"read_into needs a CPU tensor, got one on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError("read_into needs a contiguous tensor")
        return buf.data_ptr(), buf.numel() * buf.element_size(), buf
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError(f"read_into needs a writable buffer, got a read-only {type(buf).__name__}")
    if not mv.c_contiguous:
        raise ValueError("read_into needs a C-contiguous buffer")
    arr = np.frombuffer(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv, dtype=np.uint8)
    return arr.ctypes.data, arr.nbytes, (mv, arr)


class Reader:
    """Reads exact byte ranges of ``paths`` through io_uring (O_DIRECT) or a pread pool.

    Any offset and any length work: O_DIRECT alignment is handled inside (aligned
    bounce reads for ragged heads and tails), and a file system that refuses O_DIRECT
    falls back to buffered reads for that file, once (see ``stats()['direct_fallbacks']``).
    All files are opened at construction. The native handle is created lazily in the
    process that uses it, so a Reader pickles (for DataLoader workers) without it.
    Safe to use from several threads; the GIL is released while reading.

    Args:
        paths: files to serve; ``read(i, ...)`` addresses ``paths[i]``.
        backend: ``"auto"`` | ``"io_uring"`` | ``"threads"`` (``LLMIO_BACKEND`` overrides).
        direct: try O_DIRECT (page cache bypass); falls back per file when refused.
        queue_depth: io_uring operations in flight per ring.
        num_threads: workers of the thread engine.
        max_io_bytes: largest single read; bigger requests are split and run in parallel.

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: a path cannot be opened.
        OSError (EINVAL): a path is not a regular file (FIFO, device, socket); the open
            never blocks.
        ResourceError (an OSError, EAGAIN): the OS refused a worker thread.
        UnsupportedError: io_uring forced but unusable.
        ValueError: bad option values, or a path with an embedded NUL.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 64,
        num_threads: int = 16,
        max_io_bytes: int = 1 << 20,
    ) -> None:
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]
        self.paths = [_check_path(p) for p in paths]
        self.direct = bool(direct)
        self.queue_depth = int(queue_depth)
        self.num_threads = int(num_threads)
        self.max_io_bytes = int(max_io_bytes)
        self._requested_backend = backend
        self.backend = resolve_backend(backend)
        _ensure_fd_limit(2 * len(self.paths) + 64)
        self._native: Any = None
        self._native_pid = -1
        self._handle()  # open now so missing files fail here, in the caller

    # -- lifecycle -----------------------------------------------------------------
    def native(self) -> Any:
        """The ``_core.Reader`` behind this reader in this process (opened on first use, and
        again in a forked child): what native components such as the pinned ring read through.

        Raises:
            FileNotFoundError, PermissionError, OSError: a file cannot be opened.
        """
        return self._handle()

    def _handle(self) -> Any:
        if self._native is None or self._native_pid != os.getpid():
            # As bytes (os.fsencode): a file name that is not valid UTF-8 reaches open(2)
            # unchanged (a str would fail to convert).
            self._native = _core.Reader(
                [os.fsencode(p) for p in self.paths], self.backend, self.direct, self.queue_depth, self.num_threads, self.max_io_bytes
            )
            self._native_pid = os.getpid()
        return self._native

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_native"] = None
        state["_native_pid"] = -1
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # Choose the engine again where the handle will live: io_uring may be
        # usable in the pickling process and not in this one (a worker under
        # seccomp), and "auto" must then mean threads, not UnsupportedError.
        self.backend = resolve_backend(self._requested_backend)

    def __repr__(self) -> str:
        return f"Reader({len(self.paths)} files, backend={self.backend!r}, direct={self.direct})"

    # -- reads -----------------------------------------------------------------------
    def read(self, i: int, offset: int, nbytes: int) -> np.ndarray:
        """Return bytes ``[offset, offset + nbytes)`` of ``paths[i]`` as a new uint8 array.

        Raises:
            IndexError: ``i`` is not a file index.
            ValueError: negative offset or length.
            ShortReadError: the range ends past the end of the file.
            OSError: the read failed (message names file, offset, length, OS error).
        """
        return self._handle().read(i, offset, nbytes)

    def read_into(self, i: int, offset: int, buf: Any) -> int:
        """Fill ``buf`` (numpy array, CPU tensor, bytearray, ring slot...) with bytes of
        ``paths[i]`` starting at ``offset``; reads exactly ``len(buf)`` bytes. Returns that count.

        Raises:
            TypeError, ValueError: ``buf`` is read-only, not contiguous, or a GPU tensor.
            IndexError, ShortReadError, OSError: as for :meth:`read`.
        """
        ptr, nbytes, keep = _buffer_ptr(buf)
        self._handle().read_batch_ptr([(i, offset, ptr, nbytes)])
        del keep
        return nbytes

    def read_batch(self, requests: Iterable[tuple[int, int, int]]) -> list[np.ndarray]:
        """Submit all ``(i, offset, nbytes)`` requests at once; return their arrays in order.

        Raises:
            As :meth:`read`; every request is validated before any is read.
        """
        return self._handle().read_batch([tuple(map(int, r)) for r in requests])

    def read_batch_into(self, requests: Iterable[tuple[int, int, Any]]) -> None:
        """Submit all ``(i, offset, buf)`` requests at once; each ``buf`` is filled whole.

        Raises:
            As :meth:`read_into`.
        """
        keep = []
        native = []
        for i, off, buf in requests:
            ptr, n, k = _buffer_ptr(buf)
            keep.append(k)
            native.append((int(i), int(off), ptr, n))
        self._handle().read_batch_ptr(native)

    def read_many(
        self,
        files: int | np.ndarray,
        offsets: np.ndarray,
        nbytes: int | np.ndarray,
        out: Any,
        out_offsets: np.ndarray | None = None,
    ) -> None:
        """Vectorised scatter read, one submission: request ``k`` reads ``nbytes[k]`` bytes of
        ``paths[files[k]]`` at ``offsets[k]`` into ``out`` at byte ``out_offsets[k]`` (default:
        packed back to back). Scalars broadcast. For many small reads (random 4 KiB, token
        windows) this avoids a Python object per request; with ``out`` from
        :func:`empty_aligned` and 4096-aligned offsets and lengths, every read is direct.

        Raises:
            ValueError: mismatched lengths, negative values, or a request past the end of ``out``.
            TypeError: ``out`` is not a writable contiguous buffer.
            IndexError, ShortReadError, OSError: as for :meth:`read`.
        """
        offs = np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)
        n = offs.size
        fil = np.ascontiguousarray(np.broadcast_to(np.asarray(files, dtype=np.int64), (n,)))
        nb = np.ascontiguousarray(np.broadcast_to(np.asarray(nbytes, dtype=np.int64), (n,)))
        if out_offsets is None:
            oo = np.zeros(n, dtype=np.int64)
            if n > 1:
                np.cumsum(nb[:-1], out=oo[1:])
        else:
            oo = np.ascontiguousarray(out_offsets, dtype=np.int64).reshape(-1)
        if isinstance(out, np.ndarray) or not _is_tensor(out):
            self._handle().read_many(fil, offs, nb, out, oo)
        else:
            ptr, size, keep = _buffer_ptr(out)
            arr = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * size).from_address(ptr))
            self._handle().read_many(fil, offs, nb, arr, oo)
            del keep

    # -- facts -------------------------------------------------------------------------
    def file_size(self, i: int) -> int:
        """Size in bytes of ``paths[i]`` when it was opened."""
        return self._handle().file_size(i)

    def alignment(self, i: int) -> int:
        """O_DIRECT alignment of ``paths[i]`` (statx DIOALIGN, at least 4096)."""
        return self._handle().alignment(i)

    def stats(self) -> dict:
        """Counters: requests, bytes, direct/buffered ops and bytes, bounce copies,
        fixed-buffer ops, retries, io_uring submits, time spent waiting (``wait_s``),
        per-file ``direct_active`` and the files that fell back from O_DIRECT, with why."""
        return self._handle().stats()
