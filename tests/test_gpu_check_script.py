"""tools/gpu_check.sh on a machine without a usable GPU: it still runs what it can, says
which steps were skipped and why, prints the summary table and exits non-zero."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llmio_native import _native

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ["build", "info", "gpu_gate", "pytest_cuda", "memcheck_rans", "memcheck_int8", "bench_codec",
         "bench_loader", "bench_ddp_hook", "bench_checkpoint"]
GPU_STEPS = STEPS[3:]
no_gpu_here = pytest.mark.skipif(_native.cuda_usable()[0], reason="a usable GPU here: the script would run it all")


def test_gpu_check_is_bash_n_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def _run(tmp_path: Path, path_prefix: str | None) -> tuple[int, str]:
    env = dict(os.environ, GPU_CHECK_SKIP_BUILD="1", GPU_CHECK_LOG_DIR=str(tmp_path / "logs"))
    env.pop("PYTHONPATH", None)  # the script puts the tree's python/ first itself
    path = env.get("PATH", "")
    if path_prefix is None:  # hide any nvidia-smi
        path = os.pathsep.join(p for p in path.split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())
    else:
        path = path_prefix + os.pathsep + path
    env["PATH"] = path
    p = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        name = line.split(" ", 1)[0]
        if name in STEPS:
            rows[name] = line[len(name):].strip()
    return rows


@no_gpu_here
def test_without_nvidia_smi_every_gpu_step_is_skipped_and_the_run_fails(tmp_path):
    rc, out = _run(tmp_path, None)
    assert rc == 2, out
    rows = _table(out)
    assert list(rows) == STEPS, out
    assert rows["info"].startswith("ok"), out
    assert "'driver_required'" in out and "'usable': False" in out  # info()["cuda"] printed
    assert rows["gpu_gate"].startswith("FAIL (no GPU: nvidia-smi not found)")
    for s in GPU_STEPS:
        assert rows[s].startswith("skipped (no GPU: nvidia-smi not found)"), (s, out)
    assert "NO GPU STEP RAN" in out


@no_gpu_here
def test_a_gpu_our_module_cannot_use_is_named(tmp_path):
    """nvidia-smi lists a GPU (torch would see it) but our _cuda sees none: the issue-16 host."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    rc, out = _run(tmp_path, str(fake))
    assert rc == 2, out
    rows = _table(out)
    why = _native.cuda_usable()[1]
    assert rows["gpu_gate"].startswith("FAIL (our _cuda is unusable: "), out
    assert why[:30] in out
    assert all(rows[s].startswith("skipped (our _cuda is unusable") for s in GPU_STEPS), out
