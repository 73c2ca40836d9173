"""The I/O layer: :class:`Reader` (io_uring / thread-pool engines), :class:`PinnedRing` (the
page-aligned slot ring that feeds the GPU) and aligned host memory."""
from __future__ import annotations

from .memory import empty_aligned
from .reader import Reader, resolve_backend
from .ring import PinnedRing

__all__ = ["Reader", "PinnedRing", "empty_aligned", "resolve_backend"]
