"""llmio_native: native I/O for training LLMs with PyTorch.

io_uring/O_DIRECT shard reads (with a pread thread pool where io_uring is unusable),
pinned host rings that feed the GPU, and the CUDA kernels behind them.
"""
from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

from ._native import CUDA_IMPORT_ERROR, _core, _cuda
from .errors import CudaError, ResourceError, ShortReadError, UnsupportedError
from .errors import ChecksumError, FormatError, IncompleteDatasetError
from .io import PinnedRing, Reader, empty_aligned, resolve_backend
from .dataset import DatasetWriter, TokenDataset, VerifyReport, open_dataset

if TYPE_CHECKING:  # for type checkers only; at run time these load lazily (below)
    from . import ddp
    from .loader import TokenLoader

# Names whose modules import torch load on first use, so `import llmio_native` stays
# torch-free: the CLI starts fast and worker processes stay cheap.
_LAZY = {"TokenLoader": ("llmio_native.loader", "TokenLoader"), "ddp": ("llmio_native.ddp", None)}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'llmio_native' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(target[0])
    value = mod if target[1] is None else getattr(mod, target[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "info",
    "Reader",
    "PinnedRing",
    "UnsupportedError",
    "ShortReadError",
    "CudaError",
    "ResourceError",
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
    or the error it would raise); ``cuda`` (see below); ``codec_simd`` (the CPU token
    decoders' instruction sets: ``{"cpu": the levels this CPU runs, "default": what runs
    unless a decode names one}``, the default capped by ``LLMIO_RANS_SIMD``; a string
    ``"error: ..."`` when that variable holds a bad value); ``kernel``, ``python``, ``faults``
    (test-only injection).

    ``cuda`` holds: ``built``; ``device_count`` (devices *our* module sees); ``usable`` and,
    when not, ``reason`` (``_native.cuda_usable()``: torch seeing a GPU is not enough);
    ``runtime_version``/``driver_version`` (cudart integers, e.g. 13000; the driver's is the
    newest CUDA it supports, 0 without a driver); ``runtime`` (e.g. ``"13.0"``, the CUDA
    runtime linked in); ``driver_required`` (the oldest Linux driver that runtime runs on:
    13.x 580.65.06, 12.x 525.60.13 and 11.x 450.80.02 with minor-version compatibility);
    ``driver_found`` (the loaded NVIDIA kernel driver, from /proc/driver/nvidia/version, or
    None); ``driver_cuda`` (e.g. ``"12.2"``, the CUDA version that driver supports, or None);
    ``driver_ok`` (found >= required, None when either is unknown).

    Raises:
        Nothing: what cannot be probed is reported as None or a reason string.
    """
    probe = dict(_core.probe_io_uring())
    try:
        backend: str = resolve_backend("auto")
    except (ValueError, UnsupportedError) as exc:
        backend = f"error: {exc}"
    from . import _native

    def vtuple(v: str | None) -> tuple[int, ...] | None:
        try:
            return tuple(int(x) for x in v.split(".")) if v else None
        except ValueError:
            return None

    def cuda_str(v: int) -> str | None:
        return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else None

    cuda: dict[str, Any] = {"built": _cuda is not None}
    usable, why = _native.cuda_usable()
    cuda["usable"] = usable
    if _cuda is None:
        import glob

        here = os.path.dirname(os.path.abspath(__file__))
        if not glob.glob(os.path.join(here, "_cuda*.so")):  # not built: the import error says nothing useful
            cuda["reason"] = "llmio_native._cuda was not built (no CUDA compiler at build time, or LLMIO_CUDA=OFF)"
        else:
            cuda["reason"] = f"llmio_native._cuda failed to import: {CUDA_IMPORT_ERROR}"
        cuda["device_count"] = 0
        cuda["runtime"] = cuda["driver_required"] = None
    else:
        cuda["runtime_version"] = int(_cuda.runtime_version())
        cuda["driver_version"] = int(_cuda.driver_version())
        cuda["device_count"] = int(_cuda.device_count())
        if cuda["device_count"] == 0:
            cuda["reason"] = why or _cuda.device_count_error() or "no CUDA device"
        elif not usable:
            cuda["reason"] = why
        cuda["runtime"] = cuda_str(cuda["runtime_version"])
        # Oldest Linux driver per runtime major (NVIDIA's CUDA compatibility table; 11.x and
        # later run on the first driver of their major through minor-version compatibility).
        min_driver = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
        cuda["driver_required"] = min_driver.get(cuda["runtime_version"] // 1000)
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            words = f.readline().split()
        found = next((w for w in words if vtuple(w) and w.count(".") >= 1), None)
    except OSError:
        found = None
    cuda["driver_found"] = found
    cuda["driver_cuda"] = cuda_str(cuda.get("driver_version", 0))
    need, have = vtuple(cuda["driver_required"]), vtuple(found)
    cuda["driver_ok"] = None if need is None or have is None else have >= need
    try:
        codec_simd: Any = dict(_core.rans_simd_levels())
    except ValueError as exc:  # a bad LLMIO_RANS_SIMD
        codec_simd = f"error: {exc}"
    return {
        "version": __version__,
        "compiled": {"io_uring": bool(_core.HAVE_URING), "cuda": _cuda is not None, "zstd": _zstd_version() is not None},
        "zstd": _zstd_version(),
        "io_uring": probe,
        "backend": backend,
        "env_backend": os.environ.get("LLMIO_BACKEND") or None,
        "cuda": cuda,
        "codec_simd": codec_simd,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "faults": _core._faults() or None,
    }
