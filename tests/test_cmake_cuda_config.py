"""CMake's CUDA choices (issue 16.1b, 16.6), checked by configuring only (no compile):
CUDAARCHS is honoured, the default architectures are Ampere..Blackwell real code plus PTX
of the newest that nvcc supports, and a toolkit major that differs from torch's warns."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (NVCC and shutil.which("cmake") and shutil.which("ninja")),
                                 reason="needs cmake, ninja and nvcc")]


def _configure(tmp_path: Path, env_extra: dict[str, str], *defs: str) -> str:
    pybind11 = pytest.importorskip("pybind11")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDAARCHS", "CUDACXX")}
    env.update(env_extra)
    p = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), "-G", "Ninja", "-DLLMIO_CUDA=ON",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DSKBUILD_PROJECT_VERSION=0.0.0", *defs],
                       env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return out


def test_cudaarchs_is_honoured_and_a_torch_mismatch_warns(tmp_path):
    out = _configure(tmp_path, {"CUDAARCHS": "86"}, "-DLLMIO_TORCH_CUDA=11.8")
    assert re.search(r"llmio: CUDA module ON \(.*, archs 86\)", out), out
    assert "but torch is built for CUDA 11.8" in out, out


def test_default_architectures_follow_nvcc(tmp_path):
    codes = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    want = [a for a in (80, 90, 100, 120) if f"sm_{a}" in codes]
    expect = ";".join([f"{a}-real" for a in want[:-1]] + [str(want[-1])])
    out = _configure(tmp_path, {}, "-DLLMIO_TORCH_CUDA=")
    assert f"archs {expect})" in out, out
    if "sm_120" in codes:  # nvcc >= 12.8: Blackwell real code, PTX of the newest
        assert expect == "80-real;90-real;100-real;120"
    assert "but torch is built for" not in out
