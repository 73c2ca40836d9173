"""llmio_native: native I/O for training LLMs with PyTorch.

io_uring/O_DIRECT shard reads (with a pread thread pool where io_uring is unusable),
pinned host rings that feed the GPU, and the CUDA kernels behind them.
"""
from __future__ import annotations

import os
import platform
from typing import Any

from ._native import CUDA_IMPORT_ERROR, _core, _cuda
from .errors import CudaError, ShortReadError, UnsupportedError
from .errors import ChecksumError, FormatError, IncompleteDatasetError
from .memory import empty_aligned
from .reader import Reader, resolve_backend
from .ring import PinnedRing
from .dataset import DatasetWriter, TokenDataset, VerifyReport, open_dataset
from .loader import TokenLoader

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "info",
    "Reader",
    "PinnedRing",
    "UnsupportedError",
    "ShortReadError",
    "CudaError",
    "resolve_backend",
    "empty_aligned",
    "DatasetWriter",
    "open_dataset",
    "TokenDataset",
    "VerifyReport",
    "FormatError",
    "ChecksumError",
    "IncompleteDatasetError",
    "TokenLoader",
]


def _zstd_version() -> str | None:
    """libzstd version through the `zstandard` bindings (the zstd codec), or None."""
    try:
        import zstandard

        return str(zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION)))
    except ImportError:
        return None


def info() -> dict[str, Any]:
    """What this build can do on this machine, and why not where it cannot.

    Returns a dict with: ``version``; ``compiled`` (features built in: ``io_uring``,
    ``cuda``, ``zstd`` via the ``zstandard`` bindings); ``io_uring`` (``usable``, ``errno``, ``reason`` when not
    usable: ENOSYS, seccomp EPERM, the ``kernel.io_uring_disabled`` sysctl, not
    compiled); ``backend`` (what ``backend="auto"`` picks, honouring ``LLMIO_BACKEND``,
    or the error it would raise); ``cuda`` (module built, devices, runtime and driver
    versions, why unavailable); ``kernel``, ``python``, ``faults`` (test-only injection).
    """
    probe = dict(_core.probe_io_uring())
    try:
        backend: str = resolve_backend("auto")
    except (ValueError, UnsupportedError) as exc:
        backend = f"error: {exc}"
    cuda: dict[str, Any] = {"built": _cuda is not None}
    if _cuda is None:
        cuda["reason"] = CUDA_IMPORT_ERROR or "built without a CUDA compiler"
        cuda["device_count"] = 0
    else:
        cuda["runtime_version"] = _cuda.runtime_version()
        cuda["driver_version"] = _cuda.driver_version()
        cuda["device_count"] = _cuda.device_count()
        if cuda["device_count"] == 0:
            cuda["reason"] = _cuda.device_count_error() or "no CUDA device"
    return {
        "version": __version__,
        "compiled": {"io_uring": bool(_core.HAVE_URING), "cuda": _cuda is not None, "zstd": _zstd_version() is not None},
        "zstd": _zstd_version(),
        "io_uring": probe,
        "backend": backend,
        "env_backend": os.environ.get("LLMIO_BACKEND") or None,
        "cuda": cuda,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "faults": _core._faults() or None,
    }
