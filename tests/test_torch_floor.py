"""The torch floor declared in pyproject.toml is the newest torch feature the package uses.

The table below is the documented check: each row is a torch feature the package uses (a
pattern over python/llmio_native/**/*.py) and the first torch release that has it. A new
use of a newer feature gets a row here, and the test then asks for the floor to be raised.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "llmio_native"

# (pattern, first torch version, what needs it)
FEATURES: list[tuple[str, tuple[int, int], str]] = [
    (r"torch\.frombuffer\(", (1, 10), "ring slots as tensors (io/ring.py)"),
    (r"\.get_future\(\)", (1, 8), "DDP comm hook futures (ddp/)"),
    (r"all_gather_into_tensor|reduce_scatter_tensor", (2, 0), "INT8 hook collectives (ddp/)"),
    (r"torch\.uint(16|32|64)\b", (2, 3), "unsigned tensor dtypes"),
    # the rans model image is a uint32 array (RansModel.device_image) uploaded as is
    (r"torch\.from_numpy\(model\.device_image\(\)\)", (2, 3), "from_numpy on uint32 (dataset/rans.py)"),
]


def _declared_floor() -> tuple[int, ...]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"torch>=([0-9.]+)"', text)
    assert m, "pyproject.toml declares no torch floor"
    return tuple(int(x) for x in m.group(1).split("."))


def test_pyproject_torch_floor_is_what_the_code_needs():
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    used = [(v, why) for pat, v, why in FEATURES if re.search(pat, source)]
    assert used, "no torch feature of the table found: the table is stale"
    need = max(v for v, _ in used)
    assert _declared_floor()[:2] == need, (
        f"pyproject says torch>={'.'.join(map(str, _declared_floor()))}, the code needs {need}: "
        + "; ".join(f"{why} >= {v}" for v, why in used))


def test_the_device_image_is_uint32():
    """Why from_numpy(device_image()) needs torch 2.3 (uint32 tensors)."""
    from llmio_native import _core

    m = _core.RansModel.build([np.arange(10, dtype=np.uint16)], 2)
    assert m.device_image().dtype == np.uint32
