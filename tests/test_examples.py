"""The README's first command on a fresh clone: the example needs nothing beside the checkout."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_and_benchmarks_never_need_shared():
    # ../shared exists only beside this repository's CI checkout, never in a user's clone.
    offenders = []
    for p in [ROOT / "README.md", *ROOT.glob("examples/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/*.md")]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"\.\./shared|[\"']shared[\"']\s*[,/)]", line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert (ROOT / "examples" / "data" / "tinyshakespeare.txt").stat().st_size > 1_000_000


def test_train_gpt_runs_from_a_bare_directory(tmp_path):
    pytest.importorskip("tokenizers", reason="examples/train_gpt.py packs with the tokenizers package")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--steps", "3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "examples/data/tinyshakespeare.txt" in out.stdout and "step    3  loss" in out.stdout
    ds_dir = tmp_path / "out" / "tinyshakespeare-zstd"
    import llmio_native as lio
    assert lio.open_dataset(str(ds_dir)).num_tokens > 100_000


def _children(pid):
    """Pids of the processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _wait_gone(pids, timeout=30.0):
    """Wait until every pid has exited; SIGKILL the survivors and fail if one outlives ``timeout``."""
    import os
    import signal
    import time
    end = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < end:
        alive = [q for q in alive if Path(f"/proc/{q}").exists()
                 and Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.05)
    for q in alive:
        os.kill(q, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their SIGKILLed launcher"


def _torchrun(tmp_path, *args, kill_at=None):
    """Run the example on 2 CPU ranks; with kill_at, SIGKILL the whole process group (agent and
    ranks, as a dying node would) once rank 0 has printed that step."""
    import os
    import signal
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train_gpt.py"), "--d-model", "64", "--layers", "1", "--batch-size", "4",
           "--seq-len", "64", "--log-every", "5", "--ckpt-every", "10", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env=env)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if kill_at is not None and line.startswith(f"step {kill_at:4d} "):
                ranks = _children(p.pid)
                assert len(ranks) == 2, ranks
                os.killpg(p.pid, signal.SIGKILL)  # torchrun's group only: the ranks are in sessions of their own
                _wait_gone(ranks)  # ... and die with it (the example asks for PR_SET_PDEATHSIG)
                break
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, "".join(lines)


def _steps(out):
    return {int(l.split()[1]): (l.split()[3], l.split()[-1]) for l in out.splitlines() if l.startswith("step ")}


@pytest.mark.parametrize("hook", ["none", "int8"])
def test_train_gpt_ddp_sigkill_and_resume_continue_the_exact_run(tmp_path, hook):
    """Two ranks with llmio checkpoints: a run SIGKILLed midway and resumed reports, at every
    later step, the same hash of all batches consumed as a run that was never interrupted, and
    the same loss, bit for bit, with a plain all-reduce and with the INT8 hook (the example
    settles DDP's bucket layout before the first step of every process)."""
    pytest.importorskip("tokenizers", reason="examples/train_gpt.py packs with the tokenizers package")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    rc, ref = _torchrun(clean, "--steps", "30", "--hook", hook)
    assert rc == 0, ref[-3000:]
    if hook == "int8":
        assert "gradient exchange: llmio INT8 hook" in ref and "0.254 x" in ref
    rc, first = _torchrun(killed, "--steps", "30", "--hook", hook, kill_at=25)
    assert rc != 0, first[-2000:]
    rc, second = _torchrun(killed, "--steps", "30", "--hook", hook, "--resume")
    assert rc == 0, second[-3000:]
    assert "resumed from out/train_gpt.ckpt at step 20" in second, second[-3000:]
    want, got = _steps(ref), _steps(second)
    assert sorted(got) == [25, 30]
    for s in got:
        assert got[s][1] == want[s][1], (s, got[s], want[s])  # the batch hash: exact
        assert got[s][0] == want[s][0], (s, got[s], want[s])  # the loss: bit for bit (6 decimals printed)
    assert ref.split("batches consumed (hash over all ranks, from step 0): ")[1].split()[0] == \
        second.split("batches consumed (hash over all ranks, from step 0): ")[1].split()[0]
