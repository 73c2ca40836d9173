"""Exceptions raised by llmio_native.

The C++ core raises these through the bindings:

* ``OSError`` subclasses chosen by errno (``FileNotFoundError``, ``PermissionError``,
  ``IsADirectoryError``, plain ``OSError`` for EIO), with ``filename`` set and a message
  that names the file, offset and length: ``read shard.bin @ 4096 (+1048576): ...``.
* :class:`ShortReadError` (an ``OSError``, errno ENODATA): the file ended before the
  requested range did (a truncated file, or a request past EOF).
* :class:`ResourceError` (an ``OSError``, errno ``EAGAIN``): the OS refused a native
  thread (``ulimit -u`` / RLIMIT_NPROC, a container pids limit); the message names what
  was being started and how many threads. Nothing is left half-built.
* :class:`UnsupportedError`: a capability that was explicitly asked for (a forced
  backend, ``LLMIO_BACKEND=io_uring``) is not available here.
* :class:`CudaError`: a CUDA call failed.
* ``ValueError`` for bad arguments, ``IndexError`` for a bad file index.

The token-dataset layer (``llmio_native.dataset``) adds, all naming the file and the
chunk or byte offset:

* :class:`FormatError` (a ``ValueError``): a file is not what its format says (wrong
  magic, unknown version, truncated, tables or manifest inconsistent, dtype mismatch).
* :class:`ChecksumError` (a :class:`FormatError`): stored bytes do not match their checksum.
* :class:`IncompleteDatasetError` (a :class:`FormatError`): a dataset directory without
  ``manifest.json`` (the writer did not finish).
"""
from __future__ import annotations

from ._native import _core

UnsupportedError = _core.UnsupportedError
ShortReadError = _core.ShortReadError
ResourceError = _core.ResourceError
CudaError = _core.CudaError


class FormatError(ValueError):
    """A dataset file is malformed or inconsistent with its manifest.

    Attributes (``None`` where they do not apply): ``path`` (the file), ``chunk`` (chunk
    index within that file), ``offset`` (byte offset in that file).
    """

    def __init__(self, message: str, *, path: str | None = None, chunk: int | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.chunk = chunk
        self.offset = offset


class ChecksumError(FormatError):
    """Stored bytes of a chunk do not match the checksum recorded for them."""


class IncompleteDatasetError(FormatError):
    """A dataset directory has no ``manifest.json``: its writer did not finish."""


__all__ = ["UnsupportedError", "ShortReadError", "ResourceError", "CudaError", "FormatError", "ChecksumError",
           "IncompleteDatasetError"]
