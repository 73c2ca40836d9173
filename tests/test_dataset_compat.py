"""Compatibility readers: nanoGPT raw .bin, llm.c .bin, Megatron .bin/.idx (docs/format.md)."""
from __future__ import annotations

import os
from pathlib import Path
import pickle
import struct

import numpy as np
import pytest

import llmio_native as lio
from llmio_native.dataset import compat


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Pseudo-chunks of 1000 tokens so that small files still have several."""
    monkeypatch.setattr(compat, "BLOCK_TOKENS", 1000)


def check_ranges(ds, allt):
    n = len(allt)
    assert ds.num_tokens == n
    rng = np.random.default_rng(0)
    cases = [(0, 0), (0, 1), (n - 1, 1), (0, n), (999, 2), (1000, 1000), (n, 0)]
    cases += [(s, int(rng.integers(0, n - s + 1))) for s in rng.integers(0, n, 30).tolist()]
    for s, c in cases:
        got = ds.read(s, c)
        assert got.dtype == ds.dtype
        np.testing.assert_array_equal(got, allt[s : s + c], err_msg=f"read({s}, {c})")
        pieces = ds.locate(s, c)
        assert len(pieces) <= 1  # one file, contiguous
        raw = b"".join(ds.reader.read(f, o, nb).tobytes() for f, o, nb in pieces)
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=ds.dtype), allt[s : s + c])
    with pytest.raises(IndexError):
        ds.read(n, 1)
    ch = ds.chunks
    assert ds.codec == "none" and not ds.has_checksums
    assert (ch["codec"] == 0).all() and (ch["token_count"] <= 1000).all() and len(ch) == -(-n // 1000)
    np.testing.assert_array_equal(ch["first_token"], np.arange(len(ch)) * 1000)
    for ci in (0, len(ch) - 1):
        c = ch[ci]
        stored = ds.reader.read(int(c["file"]), int(c["offset"]), int(c["stored_bytes"]))
        np.testing.assert_array_equal(ds.decode_chunk(ci, stored), allt[int(c["first_token"]) :][: int(c["token_count"])])
    rep = ds.verify()
    assert rep.ok and rep.chunks_checked == len(ch) and not rep.checksums
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2.read(3, 50), allt[3:53])


# -- nanoGPT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_nanogpt_raw(tmp_path, dtype):
    allt = np.random.default_rng(1).integers(0, 50257 if dtype == "uint16" else 128256, 4567).astype(dtype)
    p = tmp_path / "train.bin"
    allt.tofile(p)
    ds = lio.open_dataset(p, dtype=dtype)
    assert ds.format == "nanogpt" and ds.dtype == np.dtype(dtype) and ds.paths == [str(p)]
    assert ds.num_documents == 0 and ds.document_ends is None
    with pytest.raises(ValueError, match="no document boundaries"):
        ds.document(0)
    check_ranges(ds, allt)


def test_nanogpt_errors(tmp_path):
    p = tmp_path / "train.bin"
    np.arange(100, dtype=np.uint16).tofile(p)
    with pytest.raises(lio.FormatError, match=r"train.bin: cannot tell the format.*dtype='uint16'"):
        lio.open_dataset(p)
    with pytest.raises(ValueError, match="needs dtype"):
        lio.open_dataset(p, format="nanogpt")
    with open(p, "ab") as fh:
        fh.write(b"\x01")
    with pytest.raises(lio.FormatError, match=r"train.bin: 201 bytes is not a whole number of uint16 tokens"):
        lio.open_dataset(p, dtype="uint16")
    with pytest.raises(FileNotFoundError):
        lio.open_dataset(tmp_path / "nope.bin", dtype="uint16")


# -- llm.c ----------------------------------------------------------------------------------------


def write_llmc(path, tokens, magic, version, ntok=None):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if ntok is None else ntok
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(tokens.tobytes())


@pytest.mark.parametrize("magic, version, dtype", [(20240520, 1, "uint16"), (20240801, 7, "uint32")])
def test_llmc(tmp_path, magic, version, dtype):
    allt = np.random.default_rng(2).integers(0, 50257 if dtype == "uint16" else 128256, 3210).astype(dtype)
    p = tmp_path / "fineweb_train_000001.bin"
    write_llmc(p, allt, magic, version)
    ds = lio.open_dataset(p)
    assert ds.format == "llmc" and ds.dtype == np.dtype(dtype) and ds.document_ends is None
    assert (ds.chunks["offset"][0], ds.metadata["magic"]) == (1024, magic)
    assert lio.open_dataset(p, dtype=dtype).num_tokens == len(allt)
    other = "uint32" if dtype == "uint16" else "uint16"
    with pytest.raises(lio.FormatError, match=f"magic {magic} means {dtype} tokens but dtype='{other}'"):
        lio.open_dataset(p, dtype=other)
    check_ranges(ds, allt)


def test_llmc_errors(tmp_path):
    toks = np.arange(500, dtype=np.uint16)
    p = tmp_path / "a.bin"
    write_llmc(p, toks, 20240522, 1)  # llm.c's eval-file magic: not a token file
    with pytest.raises(lio.FormatError, match=r"a.bin: cannot tell the format.*20240522.*llm.c header"):
        lio.open_dataset(p)
    with pytest.raises(lio.FormatError, match=r"a.bin: bad llm.c magic 20240522 @ offset 0"):
        lio.open_dataset(p, format="llmc")
    write_llmc(p, toks, 20240520, 2)
    with pytest.raises(lio.FormatError, match=r"a.bin: llm.c version 2 @ offset 4 is not supported"):
        lio.open_dataset(p)
    write_llmc(p, toks, 20240520, 1)
    os.truncate(p, 1024 + 999)
    with pytest.raises(lio.FormatError, match=r"a.bin: file is 2023 bytes but its header promises 500 uint16 tokens .*truncated"):
        lio.open_dataset(p)
    write_llmc(p, toks, 20240520, 1, ntok=400)
    with pytest.raises(lio.FormatError, match="extra bytes"):
        lio.open_dataset(p)
    os.truncate(p, 100)
    with pytest.raises(lio.FormatError, match=r"a.bin: truncated llm.c header"):
        lio.open_dataset(p, format="llmc")


# -- Megatron ----------------------------------------------------------------------------------

DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def write_megatron(prefix, documents, dtype, modes=False):
    """Megatron-LM's IndexedDatasetBuilder layout, written by hand. ``documents`` is a list of
    documents, each a list of sequences (arrays)."""
    lengths, pointers, doc_idx = [], [], [0]
    ptr = 0
    itemsize = np.dtype(dtype).itemsize
    with open(str(prefix) + ".bin", "wb") as fh:
        for doc in documents:
            for seq in doc:
                arr = np.asarray(seq, dtype=dtype)
                fh.write(arr.tobytes(order="C"))
                lengths.append(arr.size)
                pointers.append(ptr)
                ptr += arr.size * itemsize
            doc_idx.append(len(lengths))
    with open(str(prefix) + ".idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00")
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", DTYPE_CODES[dtype]))
        fh.write(struct.pack("<Q", len(lengths)))
        fh.write(struct.pack("<Q", len(doc_idx)))
        fh.write(np.array(lengths, dtype=np.int32).tobytes(order="C"))
        fh.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        fh.write(np.array(doc_idx, dtype=np.int64).tobytes(order="C"))
        if modes:
            fh.write(np.zeros(len(lengths), dtype=np.int8).tobytes())


def megatron_docs(dtype, seed=3):
    rng = np.random.default_rng(seed)
    hi = 50000 if dtype == "uint16" else 100000
    docs = []
    for k in range(40):
        nseq = [1, 1, 3, 0, 2][k % 5]  # several sentences per document; one empty document in five
        docs.append([rng.integers(0, hi, int(rng.integers(1, 300))).astype(dtype) for _ in range(nseq)])
    return docs


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
@pytest.mark.parametrize("how", ["prefix", ".bin", ".idx"])
def test_megatron(tmp_path, dtype, how):
    docs = megatron_docs(dtype)
    prefix = tmp_path / "corpus_text_document"
    write_megatron(prefix, docs, dtype)
    flat = [np.concatenate(d) if d else np.zeros(0, dtype) for d in docs]
    allt = np.concatenate(flat)
    path = str(prefix) + ("" if how == "prefix" else how)
    ds = lio.open_dataset(path)
    assert ds.format == "megatron" and ds.dtype == np.dtype(dtype) and ds.paths == [str(prefix) + ".bin"]
    assert ds.num_documents == 40 and ds.metadata["num_sequences"] == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.document_ends, np.cumsum([len(f) for f in flat]))
    for i, f in enumerate(flat):
        np.testing.assert_array_equal(ds.document(i), f)
    for got, f in zip(ds.documents(batch_tokens=500), flat):
        np.testing.assert_array_equal(got, f)
    check_ranges(ds, allt)


def test_megatron_multimodal_modes_and_empty(tmp_path):
    docs = megatron_docs("uint16", seed=4)
    write_megatron(tmp_path / "m", docs, "uint16", modes=True)
    ds = lio.open_dataset(tmp_path / "m")
    assert ds.metadata["sequence_modes"] and ds.num_documents == 40
    write_megatron(tmp_path / "e", [[], []], "uint16")
    ds = lio.open_dataset(tmp_path / "e")
    assert (ds.num_tokens, ds.num_documents, ds.document_ends.tolist()) == (0, 2, [0, 0])


def test_megatron_errors(tmp_path):
    docs = megatron_docs("uint16")
    prefix = tmp_path / "c"
    idx, binp = str(prefix) + ".idx", str(prefix) + ".bin"

    def fresh():
        write_megatron(prefix, docs, "uint16")

    fresh()
    raw = bytearray(Path(idx).read_bytes())
    raw[0:3] = b"XXX"
    Path(idx).write_bytes(bytes(raw))
    with pytest.raises(lio.FormatError, match=r"c.idx: bad Megatron index magic"):
        lio.open_dataset(prefix)
    fresh()
    raw = bytearray(Path(idx).read_bytes())
    raw[9] = 2
    Path(idx).write_bytes(bytes(raw))
    with pytest.raises(lio.FormatError, match=r"c.idx: Megatron index version 2"):
        lio.open_dataset(prefix)
    fresh()
    os.truncate(binp, os.path.getsize(binp) - 2)
    with pytest.raises(lio.FormatError, match=r"c.bin: file is \d+ bytes, but .*c.idx describes \d+ uint16 tokens.*truncated"):
        lio.open_dataset(prefix)
    fresh()
    os.truncate(idx, os.path.getsize(idx) - 8)
    with pytest.raises(lio.FormatError, match=r"c.idx: index is \d+ bytes.*truncated"):
        lio.open_dataset(prefix)
    fresh()
    raw = bytearray(Path(idx).read_bytes())
    n = struct.unpack_from("<Q", raw, 18)[0]
    struct.pack_into("<q", raw, 34 + 4 * n + 8 * 2, 12345)  # pointer of sequence 2
    Path(idx).write_bytes(bytes(raw))
    with pytest.raises(lio.FormatError, match=r"c.idx: sequence 2 starts at byte 12345"):
        lio.open_dataset(prefix)
    fresh()
    raw = bytearray(Path(idx).read_bytes())
    d = struct.unpack_from("<Q", raw, 26)[0]
    struct.pack_into("<q", raw, 34 + 12 * n + 8 * (d - 1), n - 1)  # last document index != count
    Path(idx).write_bytes(bytes(raw))
    with pytest.raises(lio.FormatError, match=r"c.idx: document indices"):
        lio.open_dataset(prefix)
    fresh()
    with pytest.raises(lio.FormatError, match=r"c.idx: the dataset holds uint16 tokens but dtype='int32'"):
        lio.open_dataset(prefix, dtype="int32")
    os.unlink(binp)
    with pytest.raises(FileNotFoundError) as ei:
        lio.open_dataset(prefix)
    assert ei.value.filename == binp
    write_megatron(tmp_path / "f", [[np.zeros(3)]], "float32")
    with pytest.raises(lio.FormatError, match=r"f.idx: dtype code 7 \(float32\) holds floats"):
        lio.open_dataset(tmp_path / "f")


def test_single_shard_path_is_refused(tmp_path):
    with lio.DatasetWriter(tmp_path / "d") as w:
        w.add_document([1, 2, 3])
    with pytest.raises(lio.FormatError, match="one shard of an llmio dataset; open its directory"):
        lio.open_dataset(tmp_path / "d" / "shard-00000.lio")
    assert lio.open_dataset(tmp_path / "d" / "manifest.json").num_tokens == 3
    with pytest.raises(ValueError, match="format must be one of"):
        lio.open_dataset(tmp_path / "d", format="parquet")


@pytest.mark.parametrize("dtype", ["int16", "int32"])
def test_megatron_negative_token_ids_refused_everywhere(tmp_path, dtype):
    # One rule on every path: a negative stored value is corrupt data, never read as -1 by
    # read() and as 65535 by the loader. The error names the file and the byte offset.
    docs = [[np.arange(1, 400, dtype=dtype)], [np.arange(1, 300, dtype=dtype)]]
    bad_at = 450
    docs[1][0][bad_at - 399] = -1
    write_megatron(tmp_path / "neg", docs, dtype)
    ds = lio.open_dataset(tmp_path / "neg")
    isz = np.dtype(dtype).itemsize
    np.testing.assert_array_equal(ds.read(0, 400), np.concatenate([docs[0][0], docs[1][0][:1]]))  # clean part
    with pytest.raises(lio.FormatError, match=rf"neg.bin @ offset {bad_at * isz}: token {bad_at} is -1") as ei:
        ds.read(300, 200)
    assert ei.value.path.endswith("neg.bin") and ei.value.offset == bad_at * isz
    with pytest.raises(lio.FormatError, match="negative token id"):
        ds.document(1)
    ld = lio.TokenLoader(ds, batch_size=4, seq_len=16, seed=0)
    with pytest.raises(lio.FormatError, match=rf"neg.bin @ offset {bad_at * isz}: token {bad_at} is -1"):
        for x, _ in ld:
            assert int(x.max()) < 1000  # no batch before the error holds a wrapped id
