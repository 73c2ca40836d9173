"""Helpers every benchmark shares: page-cache eviction for cold runs."""
from __future__ import annotations

import os
from typing import Iterable


def evict(paths: str | Iterable[str]) -> None:
    """Drop ``paths`` from the page cache (fsync, then POSIX_FADV_DONTNEED) so the next read is cold."""
    for p in [paths] if isinstance(paths, str) else paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
