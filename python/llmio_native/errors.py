"""Exceptions raised by llmio_native.

The C++ core raises these through the bindings:

* ``OSError`` subclasses chosen by errno (``FileNotFoundError``, ``PermissionError``,
  ``IsADirectoryError``, plain ``OSError`` for EIO), with ``filename`` set and a message
  that names the file, offset and length: ``read shard.bin @ 4096 (+1048576): ...``.
* :class:`ShortReadError` (an ``OSError``, errno ENODATA): the file ended before the
  requested range did (a truncated file, or a request past EOF).
* :class:`UnsupportedError`: a capability that was explicitly asked for (a forced
  backend, ``LLMIO_BACKEND=io_uring``) is not available here.
* :class:`CudaError`: a CUDA call failed.
* ``ValueError`` for bad arguments, ``IndexError`` for a bad file index.
"""
from __future__ import annotations

from ._native import _core

UnsupportedError = _core.UnsupportedError
ShortReadError = _core.ShortReadError
CudaError = _core.CudaError

__all__ = ["UnsupportedError", "ShortReadError", "CudaError"]
