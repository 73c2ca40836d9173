"""The llmio command on the real corpus: pack (trained BPE), inspect, verify, load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_corpus = pytest.mark.skipif(not CORPUS.exists(), reason=f"{CORPUS} is absent")
tokenizers = pytest.importorskip("tokenizers", reason="llmio pack needs the tokenizers package")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is absent")
    out = tmp_path_factory.mktemp("cli") / "ts"
    assert main(["pack", str(CORPUS), "-o", str(out), "--train-bpe", "512", "-q", "--chunk-tokens", "50000"]) == 0
    return out


@needs_corpus
def test_pack_round_trips_the_text(packed):
    ds = lio.open_dataset(str(packed))
    tok = tokenizers.Tokenizer.from_file(str(packed / "tokenizer.json"))
    assert ds.dtype == np.uint16 and ds.codec == "zstd" and ds.num_documents == 1
    ids = ds.document(0).tolist()
    assert ids[-1] == ds.eot_token == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids[:-1]) == CORPUS.read_text(encoding="utf-8")
    assert len(ds.chunks) > 1  # spans several chunks


@needs_corpus
def test_inspect_reports_what_open_dataset_sees(packed, capsys):
    assert main(["inspect", str(packed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ds = lio.open_dataset(str(packed))
    assert info["num_tokens"] == ds.num_tokens and info["num_documents"] == ds.num_documents
    assert info["dtype"] == "uint16" and info["codec"] == "zstd"
    tokens = ds.read(0, ds.num_tokens)
    counts = np.bincount(tokens)
    top_id, top_count, _ = info["top_tokens"][0]
    assert top_count == counts.max() and counts[top_id] == top_count
    assert info["ratio"] > 1.2  # zstd really compressed the BPE ids


@needs_corpus
def test_verify_then_corrupt(packed, tmp_path, capsys):
    assert main(["verify", str(packed)]) == 0
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    shard = sorted(bad.glob("shard-*.lio"))[0]
    with open(shard, "r+b") as f:
        f.seek(4096 + 100)
        byte = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([byte[0] ^ 0x55]))
    capsys.readouterr()
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "chunk 0" in err


@needs_corpus
def test_load_with_token_loader(packed):
    ds = lio.open_dataset(str(packed))
    ld = lio.TokenLoader(ds, batch_size=4, seq_len=128, steps=3)
    tokens = ds.read(0, ds.num_tokens)
    for x, y in ld:
        for row, (_, w) in enumerate(ld.last_windows):
            assert np.array_equal(x[row].numpy(), tokens[w * 128 : w * 128 + 128])


@needs_corpus
def test_jsonl_and_parquet_inputs(packed, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paras = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:200]
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"body": p}) + "\n" for p in paras), encoding="utf-8")
    pqf = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": paras}), pqf, row_group_size=64)
    tok_path = str(packed / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(tok_path)
    for src in (jl, pqf):
        out = tmp_path / (src.suffix[1:] + "_ds")
        assert main(["pack", str(src), "-o", str(out), "--tokenizer", tok_path, "--field", "body", "-q",
                     "--codec", "none"]) == 0
        ds = lio.open_dataset(str(out))
        assert ds.num_documents == len(paras) and ds.codec == "none"
        for i in (0, 57, len(paras) - 1):
            ids = ds.document(i).tolist()
            assert tok.decode(ids[:-1]) == paras[i]


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is absent")
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    rc = main(["pack", str(jl), "-o", str(tmp_path / "o"), "--train-bpe", "300", "-q"])
    assert rc == 1
    assert f"{jl}:2" in capsys.readouterr().err


@needs_corpus
def test_existing_output_refused_then_overwritten(packed, tmp_path, capsys):
    tok_path = str(packed / "tokenizer.json")
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n\nthat is the question\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q", "--doc-sep", "blank"]) == 0
    assert lio.open_dataset(str(out)).num_documents == 2
    capsys.readouterr()
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q"]) == 1
    assert "already" in capsys.readouterr().err
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q", "--overwrite"]) == 0
    assert lio.open_dataset(str(out)).num_documents == 1


def test_usage_errors_exit_2_and_missing_input_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["pack"])
    assert ei.value.code == 2
    assert main(["pack", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"), "--train-bpe", "300"]) == 1
    assert "nope.txt" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmio_native.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == lio.__version__
