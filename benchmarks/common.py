"""Helpers every benchmark shares: page-cache eviction for cold runs."""
from __future__ import annotations

import os
import platform
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


def machine() -> dict:
    """Facts about this machine for a benchmark's header: host, CPU model, cores, RAM, kernel, Python."""
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version()}
