"""The llmio command: pack (trained BPE on the real corpus, JSONL, Parquet), inspect, verify,
info, bench; exit statuses, one-line errors, signals, the output lock.

The key check: byte-level BPE round-trips, so decoding every packed document with the
tokenizer saved beside the shards gives back the input text exactly. The pack library
itself (inputs, BPE-safe splitting, tokenizer, encoding workers) is tests/test_pack.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native import pack as pack_lib
from llmio_native.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_corpus = pytest.mark.skipif(not CORPUS.exists(), reason=f"the corpus {CORPUS} is absent")
tokenizers = pytest.importorskip("tokenizers", reason="llmio pack needs the tokenizers package")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare packed with a 512-id BPE trained on it, several zstd chunks."""
    if not CORPUS.exists():
        pytest.skip(f"the corpus {CORPUS} is absent")
    out = tmp_path_factory.mktemp("cli") / "ts"
    assert main(["pack", str(CORPUS), "-o", str(out), "--train-bpe", "512", "-q", "--chunk-tokens", "50000"]) == 0
    return out


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    if not CORPUS.exists():
        pytest.skip(f"the corpus {CORPUS} is absent")
    return [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:300]


def _tok(packed: Path):
    return tokenizers.Tokenizer.from_file(str(packed / "tokenizer.json"))


# ----------------------------------------------------------------------------- pack
@needs_corpus
def test_pack_round_trips_the_text(packed: Path) -> None:
    ds = lio.open_dataset(str(packed))
    tok = _tok(packed)
    text = CORPUS.read_text(encoding="utf-8")
    assert ds.dtype == np.uint16 and ds.codec == "zstd" and ds.num_documents == 1
    assert ds.tokenizer_path == str(packed / "tokenizer.json")
    assert tok.get_vocab_size() == 512
    ids = ds.document(0).tolist()
    assert ids[-1] == ds.eot_token == tok.token_to_id("<|endoftext|>")
    assert tok.decode(ids[:-1]) == text  # byte-level BPE: exact, whatever the pieces
    # pieces cut by safe_cut give the ids of one call on the whole text
    assert ids[:-1] == tok.encode(text, add_special_tokens=False).ids
    assert len(ds.chunks) > 1 and (ds.chunks["token_count"][:-1] == 50000).all()


@needs_corpus
def test_jsonl_and_parquet_inputs(packed: Path, paragraphs: list[str], tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jl = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "body": p}) for i, p in enumerate(paragraphs)]
    lines.insert(5, "")  # blank lines are skipped
    jl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = paragraphs + [None, ""]  # null and empty rows are empty documents (the EOT only)
    pqf = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": pa.array(rows, pa.string()), "n": list(range(len(rows)))}), pqf,
                   row_group_size=64)
    tok_path = str(packed / "tokenizer.json")
    tok = _tok(packed)
    eot = tok.token_to_id("<|endoftext|>")
    for src, n in ((jl, len(paragraphs)), (pqf, len(rows))):
        out = tmp_path / (src.suffix[1:] + "_ds")
        assert main(["pack", str(src), "-o", str(out), "--tokenizer", tok_path, "--field", "body", "-q",
                     "--codec", "none"]) == 0
        ds = lio.open_dataset(str(out))
        assert ds.num_documents == n and ds.codec == "none" and ds.eot_token == eot
        for i in range(len(paragraphs)):
            ids = ds.document(i).tolist()
            assert ids[-1] == eot and tok.decode(ids[:-1]) == paragraphs[i]
        for i in range(len(paragraphs), n):
            assert ds.document(i).tolist() == [eot]
        assert (out / "tokenizer.json").read_bytes() == Path(tok_path).read_bytes()


@needs_corpus
def test_txt_doc_sep_modes(packed: Path, tmp_path: Path) -> None:
    tok_path = str(packed / "tokenizer.json")
    tok = _tok(packed)
    src = tmp_path / "a.txt"
    src.write_bytes(b"To be, or not\r\nto be.\r\n\r\n\r\nThat is\nthe question.\n \nWhether\n")
    expect = {
        "file": ["To be, or not\r\nto be.\r\n\r\n\r\nThat is\nthe question.\n \nWhether\n"],
        "blank": ["To be, or not\r\nto be.", "That is\nthe question.", "Whether"],
        "line": ["To be, or not", "to be.", "That is", "the question.", "Whether"],
    }
    for mode, docs in expect.items():
        out = tmp_path / mode
        assert main(["pack", str(src), "-o", str(out), "--tokenizer", tok_path, "--doc-sep", mode, "-q"]) == 0
        ds = lio.open_dataset(str(out))
        assert [tok.decode(ds.document(i).tolist()[:-1]) for i in range(ds.num_documents)] == docs, mode


def test_uint32_when_the_vocabulary_needs_it_and_whole_documents_for_other_tokenizers(tmp_path: Path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 1, "to": 2, "be": 3, "<|endoftext|>": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])  # keeps its id 70000
    assert not pack_lib.cuts_are_exact(tok)  # no byte-level pre-tokenizer: documents are not cut
    tok_path = tmp_path / "wl.json"
    tok.save(str(tok_path))
    src = tmp_path / "a.txt"
    src.write_text("to be or not to be\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["pack", str(src), "-o", str(out), "--tokenizer", str(tok_path), "-q"]) == 0
    ds = lio.open_dataset(str(out))
    assert ds.dtype == np.uint32 and ds.eot_token == 70000
    assert ds.document(0).tolist() == [2, 3, 1, 1, 2, 3, 70000]
    # forcing uint16 fails cleanly, naming the id that does not fit
    capsys.readouterr()
    assert main(["pack", str(src), "-o", str(tmp_path / "o16"), "--tokenizer", str(tok_path), "-q",
                 "--dtype", "uint16"]) == 1
    assert "end-of-text id 70000 does not fit uint16" in capsys.readouterr().err
    special = tmp_path / "b.txt"
    special.write_text("to <|endoftext|> be\n", encoding="utf-8")  # the added token matches in text
    assert main(["pack", str(special), "-o", str(tmp_path / "o16"), "--tokenizer", str(tok_path), "-q",
                 "--dtype", "uint16", "--eot-id", "0"]) == 1
    assert "token id 70000 does not fit uint16" in capsys.readouterr().err
    assert not (tmp_path / "o16").exists()
    assert main(["pack", str(src), "-o", str(tmp_path / "o16"), "--tokenizer", str(tok_path), "-q",
                 "--dtype", "uint16", "--no-eot"]) == 0
    assert lio.open_dataset(str(tmp_path / "o16")).document(0).tolist() == [2, 3, 1, 1, 2, 3]


# ----------------------------------------------------------------------------- errors
@needs_corpus
def test_bad_jsonl_line_names_file_and_line_and_leaves_nothing(packed: Path, tmp_path: Path, capsys) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    out = tmp_path / "o"
    assert main(["pack", str(jl), "-o", str(out), "--tokenizer", str(packed / "tokenizer.json"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{jl}:2: not valid JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # the aborted pack removed what it wrote
    jl.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    assert main(["pack", str(jl), "-o", str(out), "--train-bpe", "300", "-q"]) == 1
    assert f"{jl}:2: no field 'text'" in capsys.readouterr().err
    jl.write_text('{"text": "ok"}\n\n{"text": "a \\ud800 b"}\n', encoding="utf-8")  # a broken \u escape
    assert main(["pack", str(jl), "-o", str(out), "--tokenizer", str(packed / "tokenizer.json"), "-q"]) == 1
    assert f"{jl}:3: field 'text' has a lone surrogate" in capsys.readouterr().err


def test_not_utf8_and_missing_inputs_fail_with_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    assert main(["pack", str(bad), "-o", str(tmp_path / "o"), "--train-bpe", "300", "-q"]) == 1
    assert f"{bad}: not UTF-8 text (byte 3" in capsys.readouterr().err
    assert main(["pack", str(bad), "-o", str(tmp_path / "o"), "--train-bpe", "300", "--doc-sep", "line"]) == 1
    assert f"{bad}:1: not UTF-8" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"), "--train-bpe", "300"]) == 1
    err = capsys.readouterr().err
    assert "nope.txt: no such file" in err and "Traceback" not in err
    assert main(["pack", str(bad), "-o", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "none.json")]) == 1
    assert "none.json: no such tokenizer file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "nothing" in capsys.readouterr().err


@needs_corpus
def test_existing_output_refused_then_overwritten(packed: Path, tmp_path: Path, capsys) -> None:
    tok_path = str(packed / "tokenizer.json")
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n\nthat is the question\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q", "--doc-sep", "blank"]) == 0
    assert lio.open_dataset(str(out)).num_documents == 2
    capsys.readouterr()
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q"]) == 1
    assert "already holds a dataset" in capsys.readouterr().err
    assert lio.open_dataset(str(out)).num_documents == 2  # untouched
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q", "--overwrite"]) == 0
    assert lio.open_dataset(str(out)).num_documents == 1
    # an unfinished dataset (shards, no manifest) is refused as incomplete
    (out / "manifest.json").unlink()
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q"]) == 1
    err = capsys.readouterr().err
    assert "incomplete dataset" in err and "--overwrite" in err
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q", "--overwrite"]) == 0
    assert lio.open_dataset(str(out)).num_documents == 1


def _pack_cmd(src: Path, out: Path, tok_path: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmio_native.cli", "pack", str(src), "-o", str(out), "--tokenizer", tok_path,
            "-q", *extra]


def _subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(tmp))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lio.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@needs_corpus
def test_a_pack_into_a_locked_output_fails_and_writes_nothing(packed: Path, tmp_path: Path, capsys) -> None:
    """Issue 9.2: a second pack into the same directory reported success too."""
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n", encoding="utf-8")
    tok_path = str(packed / "tokenizer.json")
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running pack holds it
        assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q"]) == 1
        err = capsys.readouterr().err
        assert f"{out}: another llmio pack is writing to this directory" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert list(out.iterdir()) == []  # nothing written
    finally:
        os.close(fd)
    assert main(["pack", str(small), "-o", str(out), "--tokenizer", tok_path, "-q"]) == 0
    assert lio.open_dataset(str(out)).document(0).tolist()[:-1] == _tok(packed).encode("to be or not to be\n").ids


@needs_corpus
def test_two_concurrent_packs_into_one_output(packed: Path, tmp_path: Path) -> None:
    """Issue 9.2: of two packs started at once into one directory exactly one succeeds and
    its dataset is intact."""
    src = tmp_path / "big.txt"
    text = CORPUS.read_text(encoding="utf-8") * 4
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "o"
    tok_path = str(packed / "tokenizer.json")
    env = _subprocess_env(tmp_path)
    procs = [subprocess.Popen(_pack_cmd(src, out, tok_path, "--chunk-tokens", "4096", "--num-workers", "1"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert str(out) in err and ("another llmio pack is writing" in err or "already holds a dataset" in err), err
    assert "Traceback" not in err
    assert main(["verify", str(out), "-q"]) == 0
    ds = lio.open_dataset(str(out))
    assert ds.num_documents == 1
    assert ds.document(0).tolist()[:-1] == _tok(packed).encode(text, add_special_tokens=False).ids


@needs_corpus
@pytest.mark.parametrize("signame,group,workers", [("SIGTERM", False, 1), ("SIGTERM", True, 2), ("SIGHUP", True, 2)])
def test_sigterm_during_a_pack_removes_its_output_and_temp_files(packed: Path, tmp_path: Path, signame: str,
                                                                 group: bool, workers: int) -> None:
    """Issue 9.4: SIGTERM left partial shards and the temp directory behind (SIGINT did not).
    Also sent to the whole process group (as ``timeout`` or a job scheduler may), where the
    tokenizer worker processes get it too, and SIGHUP (the terminal went away); with
    tokenizing in this process (1) and in worker processes (2)."""
    sig = getattr(signal, signame)
    src = tmp_path / "big.txt"
    src.write_text(CORPUS.read_text(encoding="utf-8") * 24, encoding="utf-8")  # 26 MB
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "o"
    proc = subprocess.Popen(_pack_cmd(src, out, str(packed / "tokenizer.json"), "--chunk-tokens", "4096",
                                      "--shard-tokens", "100000", "--doc-sep", "blank",
                                      "--num-workers", str(workers)),
                            env=_subprocess_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and len(list(out.glob("shard-*"))) >= 2):  # mid-way: shards being written
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(tmp.iterdir())  # the pack's temp directory exists now
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # 143 for SIGTERM, 129 for SIGHUP
    assert f"terminated ({signame})" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # no shards, no empty directory
    assert list(tmp.iterdir()) == []  # no llmio_pack_ temp directory


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["pack"]) == 2
    assert main(["pack", "x.txt", "-o", str(tmp_path / "o")]) == 2  # no tokenizer
    assert main(["pack", "x.txt", "-o", str(tmp_path / "o"), "--train-bpe", "100"]) == 2
    assert main(["pack", "x.txt", "-o", str(tmp_path / "o"), "--train-bpe", "300", "--tokenizer", "t.json"]) == 2
    assert main(["pack", "x.txt", "-o", str(tmp_path / "o"), "--train-bpe", "300", "--chunk-tokens", "0"]) == 2
    assert main(["inspect", "x", "--sample", "0"]) == 2
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    assert main(["bench", "nosuchbench"]) == 2
    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmio_native {lio.__version__}"
    assert main(["pack", "--help"]) == 0
    assert "--doc-sep" in capsys.readouterr().out


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``main(argv)``, expect a usage error: exit 2, one line on stderr, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_argument_bounds_are_usage_errors(tmp_path: Path, capsys) -> None:
    """Issue 9.3 and 9.5: --train-bpe 10^9 aborted in the tokenizer's allocator, 10^20 gave
    a traceback; --eot-id 5e9 with --dtype uint32 said "use --dtype uint32"; siblings."""
    src = tmp_path / "a.txt"
    src.write_text("to be or not to be\n", encoding="utf-8")
    base = ["pack", str(src), "-o", str(tmp_path / "o")]
    bpe = base + ["--train-bpe", "300"]
    err = _usage_error(capsys, base + ["--train-bpe", "1000000000"])
    assert "--train-bpe" in err and "1000000000" in err and "2^24 = 16777216" in err
    err = _usage_error(capsys, base + ["--train-bpe", "99999999999999999999"])
    assert "--train-bpe" in err and "99999999999999999999" in err and "16777216" in err
    err = _usage_error(capsys, base + ["--train-bpe", "256"])
    assert "needs at least 257" in err and "got 256" in err
    err = _usage_error(capsys, bpe + ["--eot-id", "5000000000", "--dtype", "uint32"])
    assert "--eot-id" in err and "5000000000" in err and "uint32 range" in err and "use --dtype" not in err
    err = _usage_error(capsys, bpe + ["--eot-id", "-1"])
    assert "--eot-id" in err and "must be >= 0, got -1" in err
    err = _usage_error(capsys, bpe + ["--chunk-tokens", "300000000"])  # was a SystemExit out of main()
    assert "--chunk-tokens" in err and "must be <= 2^28, got 300000000" in err
    for opt in ("--chunk-tokens", "--shard-tokens", "--rans-model-tokens"):
        for bad in ("0", "-5"):
            err = _usage_error(capsys, bpe + [opt, bad])
            assert opt in err and f"must be >= 1, got {bad}" in err
    err = _usage_error(capsys, bpe + ["--zstd-level", "99"])  # was exit 1 after training the BPE
    assert "--zstd-level" in err and "must be <= 22, got 99" in err
    err = _usage_error(capsys, bpe + ["--num-workers", "100000"])  # would start 100000 processes
    assert "--num-workers" in err and "must be <= 256, got 100000" in err
    err = _usage_error(capsys, bpe + ["--shard-tokens", "many"])
    assert "--shard-tokens" in err and "expected an integer, got 'many'" in err
    err = _usage_error(capsys, ["pack", str(src), "-o", "", "--train-bpe", "300"])  # was: pack into the cwd
    assert "-o/--output is ''" in err
    assert not (tmp_path / "o").exists()
    assert main(bpe + ["-q", "--zstd-level", "-5", "--eot-id", "299"]) == 0  # the bounds themselves are fine
    assert lio.open_dataset(str(tmp_path / "o")).eot_token == 299


def test_output_and_input_path_errors_name_the_path(tmp_path: Path, capsys) -> None:
    src = tmp_path / "a.txt"
    src.write_text("to be\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["pack", str(src), "-o", str(src), "--train-bpe", "300"]) == 1  # the output is a file
    assert f"{src}: an input cannot be the --output" in capsys.readouterr().err
    other = tmp_path / "b.txt"
    other.write_text("x", encoding="utf-8")
    assert main(["pack", str(src), "-o", str(other), "--train-bpe", "300"]) == 1
    assert f"{other}: exists and is not a directory" in capsys.readouterr().err
    assert other.read_text() == "x"
    assert main(["pack", str(src), "-o", str(other / "sub"), "--train-bpe", "300"]) == 1  # under a file
    err = capsys.readouterr().err
    assert str(other) in err and "Not a directory" in err and "Traceback" not in err
    assert main(["pack", str(src), str(tmp_path), "-o", str(tmp_path / "o"), "--train-bpe", "300"]) == 1
    assert f"{tmp_path}: not a file" in capsys.readouterr().err
    assert main(["pack", str(src), "-o", str(tmp_path / "o"), "--tokenizer", str(tmp_path)]) == 1  # was "no such"
    assert f"{tmp_path}: not a file (--tokenizer wants a tokenizer.json file)" in capsys.readouterr().err
    for cmd in ("inspect", "verify"):  # a raw token file: the hint names the option, not the Python argument
        assert main([cmd, str(src)]) == 1
        err = capsys.readouterr().err
        assert f"{src}: " in err and "needs --dtype uint16 or --dtype uint32" in err and "dtype='" not in err
    assert not (tmp_path / "o").exists()


def test_deeply_nested_json_fails_naming_file_and_line(tmp_path: Path, capsys) -> None:
    """Issue 9.5: a RecursionError traceback on deeply nested JSON in a JSONL input."""
    jl = tmp_path / "deep.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": ' + "[" * 100000 + "]" * 100000 + "}\n", encoding="utf-8")
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["pack", str(jl), "-o", str(out), "--train-bpe", "300", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{jl}:2: JSON nested too deeply" in err and "100000" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs (root only): writes to it fail with a real ENOSPC."""
    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({r.stderr.strip()})")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@needs_corpus
def test_a_full_disk_names_the_output_and_leaves_nothing(packed: Path, full_disk: Path, tmp_path: Path,
                                                         capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9.5: "No space left on device" did not say where."""
    out = full_disk / "ds"
    capsys.readouterr()
    assert main(["pack", str(CORPUS), "-o", str(out), "--tokenizer", str(packed / "tokenizer.json"), "-q",
                 "--codec", "none"]) == 1
    err = capsys.readouterr().err
    assert f"{out}: writing the dataset failed: No space left on device" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(full_disk.iterdir()) == []  # shards and directory removed
    # the temp directory (the trained tokenizer goes there first) on the full disk
    monkeypatch.setattr(tempfile, "tempdir", str(full_disk))
    out2 = tmp_path / "ds2"
    assert main(["pack", str(CORPUS), "-o", str(out2), "--train-bpe", "3000", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{full_disk}/llmio_pack_" in err and "tokenizer.json: cannot save the trained tokenizer" in err, err
    assert "No space left on device" in err and "Traceback" not in err
    assert not out2.exists() and list(full_disk.iterdir()) == []


@needs_corpus
def test_pack_with_the_rans_codec_round_trips_and_inspect_shows_its_models(packed: Path, tmp_path: Path,
                                                                         capsys) -> None:
    out = tmp_path / "r"
    assert main(["pack", str(CORPUS), "-o", str(out), "--tokenizer", str(packed / "tokenizer.json"), "-q",
                 "--codec", "rans", "--chunk-tokens", "50000", "--rans-model-tokens", "200000"]) == 0
    ref = lio.open_dataset(str(packed))
    ds = lio.open_dataset(str(out))
    assert ds.codec == "rans" and ds.num_tokens == ref.num_tokens
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), ref.read(0, ref.num_tokens))  # the exact tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rans_model_tokens"] == 200000
    rans = ds.chunks["codec"] == lio.dataset.CODEC_IDS["rans"]
    assert rans.all()
    models = sorted(set(ds.chunks["model"].tolist()))
    assert len(models) == -(-len(ds.chunks) // 4)  # 4 chunks of 50000 per group of 200000 tokens
    tokens = ds.read(0, ds.num_tokens)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / tokens.size
    h0 = float(-(p * np.log2(p)).sum())  # order-0 entropy, bits/token
    assert 8 * ds.stored_bytes / ds.num_tokens < 1.01 * h0  # within 1% of the order-0 bound
    capsys.readouterr()

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codec"] == "rans" and info["chunk_codecs"] == {"rans": len(ds.chunks)}
    r = info["rans"]
    assert r["models"] == len(models) and r["rans_chunks"] == len(ds.chunks) and r["rans_tokens"] == ds.num_tokens
    assert 0 < r["model_bytes"] < info["bytes_on_disk"] - info["stored_bytes"]
    assert r["max_symbols"] == max(int(ds.model_of(i).num_symbols) for i in range(len(ds.chunks))) <= 512
    assert r["bits_per_token"] == pytest.approx(8 * ds.stored_bytes / ds.num_tokens)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"rans ({len(ds.chunks)} rans chunks)" in text
    assert f"rans models    {len(models)} ({r['model_bytes']:,} bytes" in text
    assert main(["verify", str(out), "-q"]) == 0
    # zstd datasets report no rans models
    assert main(["inspect", str(packed), "--json", "--sample", "1000"]) == 0
    assert json.loads(capsys.readouterr().out)["rans"] is None


# ----------------------------------------------------------------------------- inspect, verify
@needs_corpus
def test_inspect_reports_what_open_dataset_sees(packed: Path, capsys) -> None:
    assert main(["inspect", str(packed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ds = lio.open_dataset(str(packed))
    tokens = ds.read(0, ds.num_tokens)
    stored = int(ds.chunks["stored_bytes"].sum())
    assert info["format"] == "llmio" and info["num_tokens"] == ds.num_tokens == tokens.size
    assert info["format_version"] == ds.format_version == 2  # zstd: packed chunks (format v2)
    assert info["num_documents"] == ds.num_documents and info["dtype"] == "uint16" and info["codec"] == "zstd"
    assert info["files"] == 1 and info["chunks"] == len(ds.chunks)
    assert info["stored_bytes"] == stored and info["decoded_bytes"] == 2 * ds.num_tokens
    assert info["ratio"] == pytest.approx(2 * ds.num_tokens / stored) and info["ratio"] > 1.2
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in packed.iterdir() if p.name != "tokenizer.json")
    assert info["eot_token"] == ds.eot_token and info["tokens_scanned"] == ds.num_tokens
    counts = np.bincount(tokens)
    top = sorted(range(counts.size), key=lambda i: (-counts[i], i))[:10]
    assert [t["id"] for t in info["top_tokens"]] == top
    assert [t["count"] for t in info["top_tokens"]] == [int(counts[i]) for i in top]
    assert info["top_tokens"][0]["share"] == pytest.approx(counts[top[0]] / ds.num_tokens)
    assert info["top_tokens"][0]["token"] == _tok(packed).id_to_token(top[0])
    assert info["distinct_ids"] == int((counts > 0).sum())

    assert main(["inspect", str(packed)]) == 0  # the human-readable form shows the same numbers
    text = capsys.readouterr().out
    for needle in (f"{ds.num_tokens:,}", "uint16", "zstd", f"{stored:,}", f"{info['ratio']:.3f}",
                   f"{int(counts[top[0]]):,}"):
        assert needle in text

    assert main(["inspect", str(packed), "--json", "--sample", "100000"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["tokens_scanned"] == 100000 and sampled["sampled"]
    assert sum(t["count"] for t in sampled["top_tokens"]) <= 100000


@needs_corpus
def test_inspect_and_verify_a_nanogpt_bin(packed: Path, tmp_path: Path, capsys) -> None:
    ds = lio.open_dataset(str(packed))
    raw = tmp_path / "train.bin"
    ds.read(0, ds.num_tokens).tofile(raw)
    assert main(["inspect", str(raw), "--dtype", "uint16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "nanogpt" and info["num_tokens"] == ds.num_tokens and info["num_documents"] is None
    assert info["ratio"] == 1.0 and not info["has_checksums"]
    assert main(["verify", str(raw), "--dtype", "uint16"]) == 0
    assert "no checksums" in capsys.readouterr().out


@needs_corpus
def test_verify_then_corrupt_one_chunk(packed: Path, tmp_path: Path, capsys) -> None:
    assert main(["verify", str(packed)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    ds = lio.open_dataset(str(bad))
    chunk = ds.chunks[2]
    shard = Path(ds.paths[int(chunk["file"])])
    at = int(chunk["offset"]) + int(chunk["stored_bytes"]) // 2
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x55]))
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{shard}: chunk 2 @ byte {int(chunk['offset'])}" in err and "checksum" in err
    assert "chunk 1 " not in err and "chunk 3 " not in err
    assert main(["verify", str(bad), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and [(b["path"], b["chunk"]) for b in rep["bad_chunks"]] == [(str(shard), 2)]
    assert main(["inspect", str(bad)]) == 1  # the histogram reads the damaged chunk
    assert "chunk 2" in capsys.readouterr().err


@needs_corpus
def test_load_the_packed_shards(packed: Path) -> None:
    ds = lio.open_dataset(str(packed))
    tokens = ds.read(0, ds.num_tokens).astype(np.int64)
    seq = 128
    windows = tokens[: (tokens.size - 1) // seq * seq].reshape(-1, seq)
    loader = lio.TokenLoader(str(packed), batch_size=4, seq_len=seq, device="cpu", steps=3)
    n = 0
    for x, y in loader:
        assert x.shape == (4, seq) and y.shape == (4, seq)
        for row in range(4):
            xr = x[row].numpy()
            w = np.flatnonzero((windows == xr).all(axis=1))
            assert w.size >= 1, "a batch row is not a window of the packed stream"
            start = int(w[0]) * seq
            assert np.array_equal(y[row].numpy(), tokens[start + 1 : start + seq + 1])
        n += 1
    assert n == 3


# ----------------------------------------------------------------------------- other commands
def test_info_and_bench_help(capsys) -> None:
    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == lio.__version__
    assert main(["bench", "--help"]) == 0
    listed = capsys.readouterr().out
    assert "read" in listed and "codec" in listed  # llmio bench codec runs benchmarks/bench_codec.py


@needs_corpus
def test_console_script_runs(packed: Path) -> None:
    script = Path(sys.executable).parent / "llmio"
    if not script.exists():
        found = shutil.which("llmio")
        if found is None:
            pytest.skip("the llmio console script is not installed (pip install -e .)")
        script = Path(found)
    out = subprocess.run([str(script), "inspect", str(packed), "--json", "--sample", "5000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["num_tokens"] == lio.open_dataset(str(packed)).num_tokens and info["tokens_scanned"] == 5000
    assert out.stderr == ""  # no progress bar without a terminal


def test_bench_writes_json_and_chart(tmp_path, monkeypatch, capfd) -> None:
    """``llmio bench NAME --quick --out DIR`` runs the script with --quick and --json, and draws
    the JSON's chart (or the rows' ratios when it has none) into DIR/NAME.png."""
    bdir = tmp_path / "benchmarks"
    bdir.mkdir()
    (bdir / "bench_toy.py").write_text(
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "quick = '--quick' in a\n"
        "out = a[a.index('--json') + 1]\n"
        "rows = [{'name': 'limit: loop', 'ratio': 1.0}, {'name': 'llmio toy', 'ratio': 0.5 if quick else 0.9},\n"
        "        {'name': 'numpy', 'ratio': 0.25}]\n"
        "print('| toy table |')\n"
        "json.dump({'rows': rows, 'machine': {'cpu': 'x', 'cores': 2, 'ram_gib': 1}}, open(out, 'w'))\n")
    (bdir / "bench_ddp_hook.py").write_text("import sys; sys.exit(3)\n")
    monkeypatch.setenv("LLMIO_BENCH_DIR", str(bdir))
    out = tmp_path / "o"
    assert main(["bench", "toy", "--quick", "--out", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "| toy table |" in printed and "--quick" in printed
    res = json.loads((out / "toy.json").read_text())
    assert [r["ratio"] for r in res["rows"]] == [1.0, 0.5, 0.25]
    from llmio_native.cli.bench import chart_spec
    spec = chart_spec("toy", res)
    assert [(b["label"], b["value"], b["kind"]) for b in spec["bars"]] == [
        ("limit: loop", 1.0, "limit"), ("llmio toy", 0.5, "ours"), ("numpy", 0.25, "baseline")]
    pytest.importorskip("matplotlib")
    png = (out / "toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # the hook benchmark is reached by its short name, and a failing script's status is ours
    assert main(["bench", "hook"]) == 3
    assert main(["bench", "nosuch"]) == 2
    capfd.readouterr()
    assert main(["bench", "--help"]) == 0
    listed = capfd.readouterr().out
    assert "toy" in listed and "hook" in listed and "ddp_hook" not in listed
