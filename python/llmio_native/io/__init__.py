"""The I/O layer: :class:`Reader` (io_uring / thread-pool engines), :class:`Writer` (the write
path: io_uring WRITE_FIXED or a pwrite pool, O_DIRECT), :class:`PinnedRing` (the page-aligned
slot ring that feeds the GPU) and aligned host memory."""
from __future__ import annotations

from .memory import empty_aligned
from .reader import Reader, resolve_backend
from .ring import PinnedRing
from .writer import Writer, fsync_path, reuse_staging, staging_for, staging_pool_stats, write_file

__all__ = ["Reader", "Writer", "PinnedRing", "empty_aligned", "fsync_path", "resolve_backend", "write_file",
           "reuse_staging", "staging_for", "staging_pool_stats"]
