"""The code in the docs runs: docs/convert.md's converter on files of each in-place format."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import llmio_native as lio
from test_dataset_compat import write_llmc, write_megatron

ROOT = Path(__file__).resolve().parents[1]


def _converter():
    text = (ROOT / "docs" / "convert.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def convert(" in b)
    ns: dict = {}
    exec(compile(block.split("\nconvert(")[0], "docs/convert.md", "exec"), ns)  # the definition, not the example call
    return ns["convert"]


def _docs_of(stream: np.ndarray, eot: int) -> list[list[int]]:
    cuts = list(np.flatnonzero(stream == eot) + 1)
    out, prev = [], 0
    for c in cuts + ([len(stream)] if not cuts or cuts[-1] != len(stream) else []):
        out.append(stream[prev:c].tolist())
        prev = c
    return [d for d in out if d]


def test_convert_nanogpt_and_llmc_streams_split_at_eot(tmp_path):
    convert = _converter()
    rng = np.random.default_rng(5)
    stream = rng.integers(1, 60000, 100_000).astype(np.uint16)
    stream[rng.choice(len(stream), 300, replace=False)] = 50256  # end-of-text tokens
    nano = tmp_path / "train.bin"
    stream.tofile(nano)
    convert(str(nano), str(tmp_path / "nano-llmio"), dtype="uint16", eot=50256, block=7_777)
    ds = lio.open_dataset(str(tmp_path / "nano-llmio"))
    assert np.array_equal(ds.read(0, ds.num_tokens), stream)
    assert [d.tolist() for d in ds.documents()] == _docs_of(stream, 50256)
    assert ds.verify().ok

    llmc = tmp_path / "shard.bin"
    write_llmc(llmc, stream, 20240520, 1)
    convert(str(llmc), str(tmp_path / "llmc-llmio"), eot=50256, block=10_000)
    ds2 = lio.open_dataset(str(tmp_path / "llmc-llmio"))
    assert np.array_equal(ds2.read(0, ds2.num_tokens), stream)
    assert ds2.num_documents == len(_docs_of(stream, 50256))


def test_convert_megatron_keeps_its_documents(tmp_path):
    convert = _converter()
    rng = np.random.default_rng(6)
    docs = [rng.integers(0, 30000, int(n)).astype(np.uint16) for n in rng.integers(1, 3000, 50)]
    write_megatron(tmp_path / "corpus", docs, "uint16")
    convert(str(tmp_path / "corpus"), str(tmp_path / "mega-llmio"), codec="none")
    ds = lio.open_dataset(str(tmp_path / "mega-llmio"))
    assert [d.tolist() for d in ds.documents()] == [d.tolist() for d in docs]
    assert ds.codec == "none"
