"""The pack library (llmio_native.pack): BPE-safe splitting, the input readers, the
tokenizer checks, encoding in this process or in worker processes, and ``pack()`` itself.

What ``llmio pack`` adds on top (arguments, exit statuses, one-line errors, signals, the
output lock seen from two processes) is tests/test_cli.py.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native import pack as pack_lib
from llmio_native.pack import PackError, encode, inputs, pack

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_corpus = pytest.mark.skipif(not CORPUS.exists(), reason=f"the corpus {CORPUS} is absent")
PYTHON_DIR = Path(pack_lib.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 512-id byte-level BPE trained on tinyshakespeare."""
    pytest.importorskip("tokenizers", reason="llmio pack needs the tokenizers package")
    if not CORPUS.exists():
        pytest.skip(f"the corpus {CORPUS} is absent")
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    pack_lib.train_bpe([CORPUS.read_text(encoding="utf-8")], 512, path)
    return path


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    if not CORPUS.exists():
        pytest.skip(f"the corpus {CORPUS} is absent")
    return [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:300]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------- imports
def test_pack_and_cli_import_neither_torch_nor_tokenizers() -> None:
    """The pack/ and cli/ modules themselves: the package ``__init__`` is replaced by a bare
    package so that only these modules' own imports count."""
    code = f"""
import sys, types
pkg = types.ModuleType("llmio_native")
pkg.__path__ = [{str(PYTHON_DIR / "llmio_native")!r}]
sys.modules["llmio_native"] = pkg
import llmio_native.pack, llmio_native.pack.encode, llmio_native.pack.inputs, llmio_native.pack.tokenizer
import llmio_native.cli, llmio_native.cli.pack, llmio_native.cli.inspect, llmio_native.cli.verify
import llmio_native.cli.bench, llmio_native.cli.info
heavy = sorted(m for m in ("torch", "tokenizers", "pyarrow", "tqdm") if m in sys.modules)
print(",".join(heavy))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported at import time: {r.stdout.strip()}"


# ----------------------------------------------------------------------------- split
def test_safe_cut_pieces_join_back_and_respect_the_limit() -> None:
    rng = random.Random(0)
    alphabet = ["a", "bc", "é", "\n", "\n\n", " ", "  ", "\t", ".", "'s", "\r\n", "12", "東"]
    text = "".join(rng.choice(alphabet) for _ in range(20000))
    for limit in (7, 64, 1000):
        parts = pack_lib.split_text(text, limit)
        assert "".join(parts) == text
        start = 0
        for p in parts:  # longer than limit only where no safe cut point is inside the piece
            end = start + len(p)
            assert len(p) <= limit or pack_lib.split.next_cut(text, start + 1) in (end, None), (limit, start)
            start = end
        assert limit < 1000 or all(len(p) <= limit for p in parts)  # safe points are common in text
    assert pack_lib.split_text("short", 10) == ["short"]
    assert pack_lib.safe_cut("ab cd\nef gh", 1, 11) == 6  # after the lone newline, not before a space
    assert pack_lib.safe_cut("ab cd  ef", 1, 9) == 2  # before the lone space
    assert pack_lib.safe_cut("abcdefgh", 1, 5) is None  # nothing safe: no cut at all
    # a run without a safe cut point is kept whole: the piece ends at the next safe cut
    assert pack_lib.split_text("ab " + "x" * 20 + " cd ef", 8) == ["ab", " " + "x" * 20, " cd ef"]
    assert pack_lib.split_text("y" * 30, 8) == ["y" * 30]


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("read_bytes", [1, 7, 100, 5000])
def test_streamed_text_files_are_cut_like_split_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     read_bytes: int) -> None:
    """The txt reader streams the file and cuts it while reading; a run without a safe cut
    that straddles reads must end where :func:`split_text` ends it."""
    rng = random.Random(read_bytes)
    alphabet = ["a", "bc", "é", "\n", " ", "  ", ".", "東", "x" * 40, "yz" * 90]
    text = "".join(rng.choice(alphabet) for _ in range(3000)) + "q" * 700
    src = tmp_path / "t.txt"
    src.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(inputs, "READ_BYTES", read_bytes)
    for limit in (16, 128, 600):
        pieces = list(pack_lib.iter_pieces([str(src)], piece_chars=limit))
        assert [p.text for p in pieces] == pack_lib.split_text(text, limit), limit
        assert sum(p.nbytes for p in pieces) == src.stat().st_size and pieces[-1].ends


def test_every_input_byte_is_accounted_for(tmp_path: Path) -> None:
    """The progress bar's unit: the pieces' ``nbytes`` add up to the input sizes, blank and
    skipped lines included, for every reader and document separator."""
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\n\nTo be, or not\r\nto be.\r\n\r\n\r\nThat is\nthe question.\n \n")
    jl = tmp_path / "b.jsonl"
    jl.write_bytes(b'\n{"text": "one"}\n\n{"text": null}\n\n')
    for doc_sep in pack_lib.DOC_SEPS:
        pieces = list(pack_lib.iter_pieces([str(txt), str(jl)], doc_sep=doc_sep))
        assert sum(p.nbytes for p in pieces) == txt.stat().st_size + jl.stat().st_size, doc_sep
    docs = [p.text for p in pack_lib.iter_pieces([str(jl)]) if p.ends]
    assert docs == ["one", ""]  # null is an empty document
    assert pack_lib.input_format("x.NDJSON") == "jsonl" and pack_lib.input_format("x.pq") == "parquet"
    assert pack_lib.input_format("x.parquet", "txt") == "txt"
    with pytest.raises(PackError, match="no such file"):
        list(pack_lib.iter_pieces([str(tmp_path / "missing.txt")]))


def _long_run_document(paragraphs: list[str]) -> str:
    """Shakespeare with runs of > 4096 characters without whitespace: random letters, a
    URL-ish run with punctuation and digits, base64-ish, and a run at the very end."""
    rng = random.Random(7)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(9000))
    url = "https://example.com/" + "/".join("".join(rng.choice("abcxyz0123456789-_.?=&%")
                                                     for _ in range(rng.randint(1, 12))) for _ in range(900))
    b64 = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(6000))
    head = "\n\n".join(paragraphs[:40])
    mid = "\n\n".join(paragraphs[40:80])
    return f"{head}\n{letters} {url}\n{mid} {b64}é東\n{head[:5000]} {letters[:4500]}{b64[:4000]}"


@needs_corpus
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_runs_longer_than_a_piece_pack_to_the_ids_of_one_call(tok_path: str, paragraphs: list[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Issue 9.1: a run of > PIECE_CHARS characters without whitespace was cut inside,
    where the BPE gives other ids than one call on the whole document."""
    doc = _long_run_document(paragraphs)
    assert max(len(r) for r in doc.split()) > 2 * pack_lib.PIECE_CHARS
    tok = pack_lib.load_tokenizer(tok_path)
    whole = tok.encode(doc, add_special_tokens=False).ids
    src = tmp_path / f"doc{suffix}"
    if suffix == ".jsonl":
        src.write_text(json.dumps({"text": doc}) + "\n", encoding="utf-8")
    else:
        src.write_text(doc, encoding="utf-8")
        monkeypatch.setattr(inputs, "READ_BYTES", 3000)  # runs straddle many reads
    pieces = [p.text for p in pack_lib.iter_pieces([str(src)]) if p.text]
    assert "".join(pieces) == doc and len(pieces) > 5
    assert any(len(p) > pack_lib.PIECE_CHARS for p in pieces)  # the long runs stay whole
    out = tmp_path / "o"
    res = pack([str(src)], str(out), tokenizer=tok_path)
    assert res.out == str(out) and res.notes == [] and res.input_bytes == src.stat().st_size
    ds = lio.open_dataset(str(out))
    assert ds.num_documents == 1
    assert ds.document(0).tolist() == whole + [tok.token_to_id("<|endoftext|>")]


# ----------------------------------------------------------------------------- tokenizer
def test_cuts_are_exact_for_byte_level_bpe_only(tok_path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert pack_lib.cuts_are_exact(pack_lib.load_tokenizer(tok_path))
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not pack_lib.cuts_are_exact(sp)
    prefixed = Tokenizer(models.BPE())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not pack_lib.cuts_are_exact(prefixed)


# ----------------------------------------------------------------------------- encode
@needs_corpus
def test_output_is_the_same_for_any_number_of_workers(tok_path: str, paragraphs: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    # small batches and pieces, so that both runs cut many batches and tasks
    monkeypatch.setattr(encode, "WORKER_BATCH_CHARS", 8192)
    monkeypatch.setattr(encode, "BATCH_CHARS", 30000)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        res = pack([str(jl), str(CORPUS)], str(out), tokenizer=tok_path, chunk_tokens=4096, num_workers=workers)
        assert res.num_workers == workers
        outs.append(_files(out))
    assert outs[0] == outs[1]  # shards, manifest and tokenizer byte for byte
    ds = lio.open_dataset(str(tmp_path / "w2"))
    assert ds.num_documents == len(paragraphs) + 1 and len(ds.chunks) > 10


def _die(*args: object) -> None:
    """A worker initializer that dies at once (imported by name in the worker process)."""
    os._exit(3)


@needs_corpus
def test_a_dying_worker_fails_the_pack_cleanly(tok_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "_worker_init", _die)
    out = tmp_path / "o"
    with pytest.raises(PackError, match="tokenizer worker process exited (with status 3|abruptly)"):
        pack([str(CORPUS)], str(out), tokenizer=tok_path, num_workers=2)
    assert not out.exists()


def test_encode_batches_stops_early_and_checks_the_dtype(tok_path: str) -> None:
    """A consumer that stops early (an error while writing, Ctrl-C) closes the stream: the
    workers are killed, nothing hangs; an id beyond the dtype fails naming it."""
    tok = pack_lib.load_tokenizer(tok_path)
    batch = [pack_lib.Piece("to be or not to be", True, 18)]
    for workers in (1, 2):
        stream = pack_lib.encode_batches(tok, iter([batch] * 50), np.dtype("uint16"), workers)
        first, ids = next(stream)
        assert first is batch and ids[0].tolist() == tok.encode("to be or not to be").ids
        stream.close()
    big = np.array([70000], dtype=np.int64)
    with pytest.raises(PackError, match="token id 70000 does not fit uint16"):
        encode.fit(big, np.dtype("uint16"))


def test_auto_workers() -> None:
    small = encode.AUTO_WORKERS_MIN_BYTES - 1
    assert encode.auto_workers(small) == 1
    n = encode.auto_workers(1 << 40)
    cpus = encode.cpus()
    assert n == 1 if cpus < encode.AUTO_WORKERS_MIN_CPUS else 2 <= n <= min(cpus - 1, encode.AUTO_WORKERS_MAX)


# ----------------------------------------------------------------------------- pack()
def test_pack_refuses_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("to be\n", encoding="utf-8")
    with pytest.raises(ValueError, match="exactly one"):
        pack([str(src)], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="exactly one"):
        pack([str(src)], str(tmp_path / "o"), tokenizer="t.json", train_bpe=300)
    with pytest.raises(PackError, match="an input cannot be the --output"):
        pack([str(src)], str(src), train_bpe=300)
    assert not (tmp_path / "o").exists()
