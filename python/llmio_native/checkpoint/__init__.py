"""Checkpoints through the native engine.

* safetensors, API-compatible: :func:`load_file`, :func:`safe_open`, :func:`load_into`,
  :func:`save_file`, :func:`save_sharded` (module ``safetensors_io``);
* PyTorch Distributed Checkpoint backend: :class:`StorageWriter`, :class:`StorageReader`
  (module ``dcp``);
* the crash-safe commit protocol both use (module ``commit``).

Names resolve lazily, so ``import llmio_native.checkpoint`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_file": "safetensors_io",
    "safe_open": "safetensors_io",
    "load_into": "safetensors_io",
    "save_file": "safetensors_io",
    "save_sharded": "safetensors_io",
    "SafetensorsError": "safetensors_io",
    "StorageWriter": "dcp",
    "StorageReader": "dcp",
    "CheckpointFormatError": "dcp_metadata",
    "recover": "commit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'llmio_native.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
