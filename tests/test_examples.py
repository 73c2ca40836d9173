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
    ds_dir = tmp_path / "out" / "tinyshakespeare"
    import llmio_native as lio
    assert lio.open_dataset(str(ds_dir)).num_tokens > 100_000
