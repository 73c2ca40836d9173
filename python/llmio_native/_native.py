"""Loads the compiled modules. ``_core`` is required; ``_cuda`` is optional."""
from __future__ import annotations

from . import _core  # noqa: F401  (a broken build should fail loudly at import)

import importlib.util

CUDA_IMPORT_ERROR: str | None = None
if importlib.util.find_spec(f"{__package__}._cuda") is None:  # built only where nvcc was found
    _cuda = None
    CUDA_IMPORT_ERROR = "this build has no CUDA module (no nvcc at build time, or LLMIO_CUDA=OFF)"
else:
    try:  # imports without a GPU (static cudart)
        from . import _cuda  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the build machine
        _cuda = None
        CUDA_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_CUDA_GATE: tuple[bool, str] | None = None
_CUDA_WARNED: set[str] = set()


def cuda_usable() -> tuple[bool, str]:
    """Whether *our* CUDA module can run kernels here: ``(usable, reason if not)``. Cached.

    torch seeing a GPU is not enough: ``_cuda`` links its own CUDA runtime, which needs a
    driver at least as new as the toolkit it was built with. This asks ``_cuda`` itself.
    """
    global _CUDA_GATE
    if _CUDA_GATE is None:
        if _cuda is None:
            _CUDA_GATE = (False, f"llmio_native._cuda is not built ({CUDA_IMPORT_ERROR})")
        elif _cuda.device_count() == 0:
            why = _cuda.device_count_error() or "no GPU"
            rt = _cuda.runtime_version()
            drv = _cuda.driver_version()
            _CUDA_GATE = (False, f"llmio_native._cuda sees no device ({why}; built for CUDA runtime "
                                 f"{rt // 1000}.{rt % 1000 // 10}, driver supports {drv // 1000}.{drv % 1000 // 10})")
        else:
            _CUDA_GATE = (True, "")
    return _CUDA_GATE


def warn_cuda_fallback(what: str, fallback: str) -> None:
    """One warning per ``what`` saying why the GPU path is off and what runs instead."""
    if what in _CUDA_WARNED:
        return
    _CUDA_WARNED.add(what)
    import warnings

    why = cuda_usable()[1]
    warnings.warn(f"{what}: the llmio CUDA path is unusable ({why}); using {fallback} instead. "
                  "Install a wheel built for your driver's CUDA version, or upgrade the NVIDIA driver.",
                  RuntimeWarning, stacklevel=3)
