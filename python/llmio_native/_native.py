"""Loads the compiled modules. ``_core`` is required; ``_cuda`` is optional."""
from __future__ import annotations

from . import _core  # noqa: F401  (a broken build should fail loudly at import)

try:  # built only where nvcc was found; imports without a GPU (static cudart)
    from . import _cuda  # type: ignore[attr-defined]
    CUDA_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build machine
    _cuda = None
    CUDA_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
