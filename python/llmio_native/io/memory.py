"""Aligned host memory for reads that should land without a bounce copy."""
from __future__ import annotations

import numpy as np

from .._native import _core


def empty_aligned(nbytes: int, dtype: np.dtype | type | str = np.uint8) -> np.ndarray:
    """A 1-D numpy array of ``nbytes`` bytes (viewed as ``dtype``) whose data is 4 KiB-aligned
    (2 MiB-aligned and huge-page advised from 2 MiB up).

    ``numpy.empty`` returns memory at an arbitrary 16- or 64-byte alignment; an O_DIRECT read
    into it goes through bounce buffers and costs an extra memcpy. Reading file offsets that
    are multiples of 4096 into this memory is a straight direct read. The array keeps its
    native buffer alive; the memory is unmapped when the last view is gone.

    Raises:
        ValueError: ``nbytes`` is negative or not a multiple of the dtype's itemsize.
        OSError: the mapping failed (ENOMEM).
    """
    dt = np.dtype(dtype)
    if nbytes < 0 or nbytes % dt.itemsize:
        raise ValueError(f"nbytes must be a non-negative multiple of {dt.itemsize}, got {nbytes}")
    if nbytes == 0:
        return np.empty(0, dtype=dt)
    buf = _core.HostBuffer(nbytes)
    return np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize)
