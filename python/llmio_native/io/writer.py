"""``Writer``: one file written append-only through io_uring (O_DIRECT, registered staging)
or a pwrite thread pool; :func:`fsync_path` and :func:`write_file`.

The native engine (``csrc/io/writer.hpp``) copies every ``write()`` into an aligned staging
arena and submits full chunks asynchronously; ``close()`` writes the tail padded to the
O_DIRECT alignment, truncates the file to its logical size and syncs it. Code writing many
files opens :func:`reuse_staging` around them so the arenas are mapped and registered once
(``csrc/io/staging_pool.hpp``), and sizes them with :func:`staging_for` when it knows the size.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from types import TracebackType
from typing import Any, Iterable, Iterator

from .._native import _core
from .reader import _check_path, resolve_backend

SYNC_MODES = ("data", "full", "none")


def _source(data: Any) -> tuple[int, int, Any] | None:
    """(address, nbytes, keepalive) for a CPU torch tensor (any dtype, bf16 and fp8 included),
    or None for anything else (passed to the buffer protocol as is).

    Raises:
        ValueError: a tensor that is not on the CPU or not contiguous.
    """
    # A tensor exists only once torch is imported: never pay that import (seconds) here.
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(data, torch.Tensor):
        return None
    if data.device.type != "cpu":
        raise ValueError(f"Writer.write needs a CPU tensor, got one on {data.device} (copy it to the CPU first)")
    if not data.is_contiguous():
        raise ValueError(f"Writer.write needs a contiguous tensor, got shape {tuple(data.shape)} "
                         f"with strides {data.stride()} (call .contiguous())")
    return data.data_ptr(), data.numel() * data.element_size(), data


class Writer:
    """Append-only file writer through the native engine (one file).

    ``write()`` copies the data into aligned staging memory (registered with io_uring as
    a fixed buffer when the memlock limit allows) before it returns, so the caller may
    reuse its buffer at once; full chunks are written asynchronously, up to
    ``queue_depth`` in flight, and ``write()`` blocks only when staging is full. O_DIRECT
    alignment is handled inside: every chunk is aligned, and ``close()`` writes the tail
    padded with zeros, then truncates the file to :meth:`tell` bytes. The GIL is released
    while copying and waiting. Not meant to be shared by threads (calls are serialised).

    Args:
        path: the file; created, or truncated when it exists.
        backend: ``"auto"`` | ``"io_uring"`` | ``"threads"``, resolved like the Reader's
            (:func:`llmio_native.io.resolve_backend`; ``LLMIO_BACKEND`` overrides).
        direct: use O_DIRECT when the file system allows it; otherwise (tmpfs, some FUSE)
            fall back to buffered writes silently (see :attr:`direct_active`, ``stats()``).
        queue_depth: write operations in flight at most.
        chunk_bytes: bytes per write operation (rounded up to the O_DIRECT alignment).
        staging_bytes: staging memory; holds ``max(2, min(staging_bytes // chunk_bytes,
            queue_depth + 1))`` chunks. Inside :func:`reuse_staging` it comes from the pool of
            idle arenas and goes back there at :meth:`close` / :meth:`abort`.
        exclusive: create the file with O_EXCL (fail when it exists).

    Attributes:
        path: the file's path (str). backend: the engine in use (``"io_uring"`` or ``"threads"``).

    Raises:
        FileExistsError: ``exclusive=True`` and the file exists.
        PermissionError, FileNotFoundError, IsADirectoryError, OSError (EROFS, ...): the file
            cannot be created; the message names the path.
        OSError (EINVAL, ENXIO): the path is a FIFO, device or socket (opening never blocks).
        UnsupportedError: io_uring forced but unusable.
        ValueError: bad option values or a path with an embedded NUL.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 32,
        chunk_bytes: int = 4 << 20,
        staging_bytes: int = 64 << 20,
        exclusive: bool = False,
    ) -> None:
        self.path: str = _check_path(path)
        self.backend: str = resolve_backend(backend)
        self._native: Any = _core.Writer(
            os.fsencode(self.path), self.backend, bool(direct), int(queue_depth), int(chunk_bytes),
            int(staging_bytes), bool(exclusive),
        )

    # -- writing ---------------------------------------------------------------------
    def write(self, data: Any) -> int:
        """Append ``data`` and return the file offset it starts at.

        ``data``: bytes, bytearray, memoryview, numpy array, or a CPU torch tensor of any
        dtype (bf16, fp8... written as its raw bytes); it must be C-contiguous.

        Raises:
            ValueError: a GPU or non-contiguous tensor, or the writer is closed.
            TypeError: ``data`` has no buffer interface or is not C-contiguous.
            OSError: an earlier write failed (the first error, with ``errno`` set, e.g.
                ENOSPC; the message names path, offset, length and the OS error).
        """
        src = _source(data)
        if src is None:
            return self._native.write(data)
        ptr, nbytes, keep = src
        offset = self._native.write_ptr(ptr, nbytes)
        del keep
        return offset

    def tell(self) -> int:
        """Logical size of the file so far: the bytes accepted by :meth:`write`."""
        return self._native.tell()

    def flush(self) -> None:
        """Wait for every write in flight. The staged tail (less than one chunk) is written
        at :meth:`close`.

        Raises:
            OSError: the first failed write (errno set; names path, offset and length).
            ValueError: the writer is closed.
        """
        self._native.flush()

    def close(self, sync: str = "data") -> None:
        """Flush, write the tail (padded to the O_DIRECT alignment, then the file truncated to
        :meth:`tell` bytes), sync, close. ``sync``: ``"data"`` (fdatasync), ``"full"`` (fsync),
        ``"none"``. Idempotent: a closed writer ignores further calls.

        Raises:
            OSError: the first failed write (the file is then closed unsynced), or a failed
                truncate, sync or close; the message names the path.
            ValueError: unknown ``sync``.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self._native.close(sync)

    def abort(self) -> None:
        """Stop: wait for writes in flight, close without syncing. The file keeps whatever
        reached it (callers remove it if they want). Never raises."""
        try:
            self._native.abort()
        except Exception:  # pragma: no cover - the native abort does not raise
            pass

    # -- facts -----------------------------------------------------------------------
    @property
    def direct_active(self) -> bool:
        """True while writes go through O_DIRECT (False: not asked, or refused and fallen back)."""
        return self._native.direct_active

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`."""
        return self._native.closed

    def stats(self) -> dict:
        """Counters: ``bytes`` (logical), ``ops``, ``ops_direct``/``ops_buffered`` and their
        bytes (padding included), ``fixed_buffer_ops`` (io_uring WRITE_FIXED), ``retries``
        (short writes resumed, EINTR/EAGAIN), ``submits``, ``wait_s`` (time blocked on
        completions), ``copy_s`` (time copying into staging), ``direct_active``,
        ``direct_fallbacks`` and ``fallback_reason``, plus the engine's settings."""
        return self._native.stats()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __repr__(self) -> str:
        return (f"Writer({self.path!r}, backend={self.backend!r}, direct_active={self.direct_active}, "
                f"tell={self.tell()}, closed={self.closed})")

    def __getstate__(self) -> dict:
        raise TypeError("a Writer cannot be pickled (it is an open file being written)")

    def __del__(self) -> None:
        # Never lose the staged tail silently: a Writer dropped unclosed warns (like an
        # unclosed file) and is aborted; what it had not written yet is not in the file.
        native = getattr(self, "_native", None)
        if native is None or native.closed:
            return
        try:
            warnings.warn(f"unclosed Writer {self.path!r} ({native.tell()} bytes written to it): aborted "
                          "without writing its staged tail or syncing; call close()", ResourceWarning,
                          stacklevel=2)
        except Exception:  # pragma: no cover - interpreter shutdown: warnings may be gone
            pass
        self.abort()


def staging_for(expected_nbytes: int, *, align: int = 4096) -> dict[str, int]:
    """``chunk_bytes`` and ``staging_bytes`` for a :class:`Writer` of a file of about
    ``expected_nbytes``: staging that fits the file (a 1 MiB file does not get, map and register
    64 MiB), chunks of 64 KiB to 4 MiB, at most the defaults (4 MiB chunks, 64 MiB staging).

    Raises:
        ValueError: ``expected_nbytes`` is negative.
    """
    if expected_nbytes < 0:
        raise ValueError(f"expected_nbytes must be >= 0, got {expected_nbytes}")
    chunk = min(4 << 20, max(64 << 10, -(-expected_nbytes // align) * align))
    staging = min(64 << 20, max(2 * chunk, -(-expected_nbytes // chunk) * chunk + chunk))
    return {"chunk_bytes": chunk, "staging_bytes": staging}


@contextlib.contextmanager
def reuse_staging() -> Iterator[None]:
    """While this context is open (in any thread of the process), a new :class:`Writer` takes
    its staging arena from a process-wide pool of idle ones, and a closed or aborted Writer
    returns its arena there: a save that writes many files maps, faults in and (io_uring)
    registers its staging memory about once, not once per file. Idle arenas are bounded by
    ``staging_pool_stats()["max_idle_bytes"]`` (256 MiB; least recently used unmapped first),
    and all of them are unmapped when the last open context exits. Contexts nest. A forked
    child starts with an empty pool and no open context.

    Raises:
        Nothing of its own.
    """
    _core.staging_pool_enter()
    try:
        yield
    finally:
        _core.staging_pool_exit()


def staging_pool_stats() -> dict[str, int]:
    """The staging pool's counters: ``idle_bytes``, ``idle_count`` (arenas kept for reuse),
    ``hits`` / ``misses`` (Writers that took a pooled arena / mapped a new one while a
    :func:`reuse_staging` context was open), ``scopes`` (contexts open now),
    ``max_idle_bytes``."""
    return dict(_core.staging_pool_stats())


def fsync_path(path: str | os.PathLike[str] | bytes, *, data_only: bool = False) -> None:
    """Open ``path`` (a file or a directory) and fsync it (fdatasync when ``data_only``).
    Syncing the directory makes a new or renamed entry in it durable.

    Raises:
        FileNotFoundError, PermissionError: the path cannot be opened.
        OSError: the sync failed (EIO, or EINVAL for things that cannot be synced such as a
            FIFO); the message names the path.
        ValueError: a path with an embedded NUL.
    """
    _core.fsync_path(os.fsencode(_check_path(path)), data_only)


def write_file(path: str | os.PathLike[str] | bytes, buffers: Iterable[Any], *, sync: str = "data",
               **writer_kwargs: Any) -> int:
    """Write ``buffers`` back to back into ``path`` through a :class:`Writer`, close it with
    ``sync`` and return the file size. On any error the writer is aborted (the partial file
    stays) and the error propagates.

    Raises:
        As :class:`Writer`, :meth:`Writer.write` and :meth:`Writer.close`.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    w = Writer(path, **writer_kwargs)
    try:
        for b in buffers:
            w.write(b)
        size = w.tell()
        w.close(sync)
    except BaseException:
        w.abort()
        raise
    return size


__all__ = ["Writer", "fsync_path", "write_file", "SYNC_MODES", "reuse_staging", "staging_for", "staging_pool_stats"]
