"""The rans token codec: round trips, edge sizes, degenerate distributions, escapes,
adversarial payloads and models, the GPU kernel's host emulation, and rans datasets."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native import _core
from llmio_native.dataset import format as F
from llmio_native.dataset import rans as R

from shard_edit import reseal

B = _core.RANS_BLOCK_SYMBOLS  # 32768
L = _core.RANS_LANES  # 32
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
EDGE_SIZES = [0, 1, L - 1, L, L + 1, 2 * L + 3, B - 1, B, B + 1, 2 * B + L + 1]


def zipf(rng: np.random.Generator, n: int, vocab: int, s: float = 1.1, dtype=np.uint16) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1) ** s
    return rng.choice(vocab, size=n, p=p / p.sum()).astype(dtype)


def entropy_bits(t: np.ndarray) -> float:
    _, c = np.unique(t, return_counts=True)
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def roundtrip(tokens: np.ndarray, model=None, **kw) -> bytes:
    tb = tokens.dtype.itemsize
    m = model or _core.RansModel.build([tokens], tb, **kw)
    enc = m.encode(tokens)
    for simd in (True, False):  # the AVX2 path (where the CPU has it) and the scalar reference
        out = np.full(len(tokens), 0xAB, dtype=tokens.dtype)
        m.decode(enc, out, simd=simd)
        np.testing.assert_array_equal(out, tokens)
    m2 = _core.RansModel.parse(m.serialize())  # the stored model decodes the same
    out2 = np.empty_like(tokens)
    m2.decode(enc, out2)
    np.testing.assert_array_equal(out2, tokens)
    return enc


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_roundtrip_edge_sizes(dtype, n):
    rng = np.random.default_rng(n)
    t = zipf(rng, n, 5000, dtype=dtype)
    enc = roundtrip(t)
    nb = -(-n // B)
    assert len(enc) >= 16 + 132 * nb
    assert struct.unpack_from("<4sIII", enc) == (b"rANS", n, nb, 0)


@pytest.mark.parametrize("dtype, tokens", [
    (np.uint16, lambda rng: np.full(70000, 7, np.uint16)),                         # one symbol
    (np.uint16, lambda rng: np.zeros(1, np.uint16)),
    (np.uint16, lambda rng: rng.permutation(65536).astype(np.uint16)),           # all distinct
    (np.uint16, lambda rng: rng.integers(0, 65536, 200000).astype(np.uint16)),   # uniform, full range
    (np.uint32, lambda rng: rng.integers(0, 1 << 32, 50000, dtype=np.uint64).astype(np.uint32)),
    (np.uint32, lambda rng: np.array([0, (1 << 32) - 1] * 40000, np.uint32)),    # extremes
    (np.uint32, lambda rng: (zipf(rng, 100000, 128256, dtype=np.uint32) * 31 + 5)),  # sparse large ids
])
def test_roundtrip_degenerate_distributions(dtype, tokens):
    rng = np.random.default_rng(3)
    t = tokens(rng)
    assert t.dtype == dtype
    roundtrip(t)


def test_single_symbol_costs_only_headers():
    t = np.full(3 * B, 42, np.uint16)
    enc = roundtrip(t)
    assert len(enc) == 16 + 3 * 132  # zero words: the state never moves


@pytest.mark.parametrize("escape_max_count", [1, 3, (1 << 32) - 1])
@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65536), (np.uint32, 1 << 32)])
def test_escapes(escape_max_count, dtype, vocab):
    """Rare tokens escaped (coded by bit length + value, phase-3 raw bits for > 16 bits);
    (1 << 32) - 1 escapes everything (a model with no ranked symbol)."""
    rng = np.random.default_rng(escape_max_count)
    common = zipf(rng, 60000, 300, dtype=dtype)
    rare = rng.integers(0, vocab, 3000, dtype=np.uint64).astype(dtype)
    t = np.concatenate([common, rare, np.array([0, vocab - 1, 1, 2], dtype)])
    rng.shuffle(t)
    m = _core.RansModel.build([t], t.dtype.itemsize, escape_max_count=escape_max_count)
    _, counts = np.unique(t, return_counts=True)
    assert m.num_symbols == int((counts > escape_max_count).sum())
    roundtrip(t, m)


def test_model_from_other_data_rejects_unknown_tokens():
    m = _core.RansModel.build([np.arange(100, dtype=np.uint16)], 2)
    with pytest.raises(_core.CodecError, match="token 500 at position 3 is not in the model"):
        m.encode(np.array([1, 2, 3, 500], np.uint16))
    # with escapes reserved, unseen tokens are coded anyway
    m = _core.RansModel.build([np.arange(100, dtype=np.uint16).repeat(2), np.array([60000, 9], np.uint16)], 2,
                              escape_max_count=1)
    roundtrip(np.array([1, 2, 3, 500, 60001, 9], np.uint16), m)


def test_multi_part_model_equals_concatenation():
    rng = np.random.default_rng(5)
    parts = [zipf(rng, n, 900) for n in (10, 40000, 0, 777)]
    a = _core.RansModel.build(parts, 2)
    b = _core.RansModel.build([np.concatenate(parts)], 2)
    assert a.serialize() == b.serialize()


def test_argument_errors():
    t = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="scale_bits"):
        _core.RansModel.build([t], 2, scale_bits=8)
    with pytest.raises(ValueError, match="token_bytes"):
        _core.RansModel.build([t], 3)
    with pytest.raises(ValueError, match="2-byte tokens, token_bytes is 4"):
        _core.RansModel.build([t], 4)
    m = _core.RansModel.build([t], 2)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        m.encode(t.astype(np.int64))
    with pytest.raises(ValueError, match="model is for 2-byte tokens"):
        m.encode(t.astype(np.uint32))


# ------------------------------------------------------------------------------- ratio
def test_ratio_near_order0_entropy_on_zipf():
    """Compressed size (payloads + zstd'ed model region) within 3% of the order-0 bound."""
    rng = np.random.default_rng(0)
    t = zipf(rng, 2_000_000, 50257, s=1.1)
    m = _core.RansModel.build([t], 2)
    stored = sum(len(m.encode(t[i:i + 32768])) for i in range(0, len(t), 32768))
    stored += len(F.pack_model_region(m))
    bound = len(t) * entropy_bits(t) / 8
    assert stored / bound < 1.03, stored / bound
    assert m.bits_per_token == pytest.approx(entropy_bits(t), rel=0.01)


def test_ratio_on_real_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is absent (../shared/data beside the repository)")
    text = CORPUS.read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=4096, show_progress=False))
    t = np.array(tok.encode(text).ids, np.uint16)
    m = _core.RansModel.build([t], 2)
    stored = sum(len(m.encode(t[i:i + 32768])) for i in range(0, len(t), 32768)) + len(F.pack_model_region(m))
    bound = len(t) * entropy_bits(t) / 8
    assert stored / bound < 1.03, stored / bound


# ------------------------------------------------------------------------------- adversarial input
@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(11)
    t = np.concatenate([zipf(rng, B + 500, 3000), rng.integers(0, 65536, 100).astype(np.uint16)])
    m = _core.RansModel.build([t], 2, escape_max_count=1)
    return t, m, m.encode(t)


def test_truncated_payload_raises(sample):
    t, m, enc = sample
    out = np.empty_like(t)
    for cut in sorted({0, 1, 15, 16, 17, 19, 20, 100, 16 + 8 + 256, len(enc) // 2, len(enc) - 2, len(enc) - 1}):
        with pytest.raises(_core.CodecError):
            m.decode(enc[:cut], out)
    with pytest.raises(_core.CodecError):
        m.decode(enc + b"\0\0", out)
    with pytest.raises(_core.CodecError, match=f"holds {len(t)} tokens, expected {len(t) - 1}"):
        m.decode(enc, np.empty(len(t) - 1, np.uint16))
    with pytest.raises(_core.CodecError, match="bad magic"):
        m.decode(b"zstd" + enc[4:], out)


def test_fuzz_corrupted_payloads(sample):
    """Seeded mutations (bit flips, byte sets, word swaps): the decoder raises CodecError
    or returns; it never crashes (this test also runs under AddressSanitizer, see
    test_native_fuzz_under_asan). Almost every corruption is detected by the codec alone;
    the chunk checksum catches the rest in datasets."""
    t, m, enc = sample
    rng = np.random.default_rng(1234)
    out = np.empty_like(t)
    detected = 0
    trials = 400
    for _ in range(trials):
        b = bytearray(enc)
        kind = rng.integers(3)
        if kind == 0:
            pos = int(rng.integers(len(b)))
            b[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            pos = int(rng.integers(len(b)))
            b[pos] = int(rng.integers(256))
        else:
            i, j = sorted(rng.integers(16 + 264, len(b) // 2, size=2) * 2)
            b[i:i + 2], b[j:j + 2] = b[j:j + 2], b[i:i + 2]
        results = []
        for simd in (True, False):  # both decoders: the same outcome, error or tokens
            try:
                m.decode(bytes(b), out, simd=simd)
                results.append(out.copy())
            except _core.CodecError as exc:
                results.append(str(exc))
        if isinstance(results[0], str):
            assert isinstance(results[1], str)
            detected += 1
        else:
            np.testing.assert_array_equal(results[0], results[1])
    assert detected >= 0.9 * trials


def test_corrupted_models_raise(sample):
    _, m, _ = sample
    raw = m.serialize()
    for cut in range(0, len(raw) - 1, max(1, len(raw) // 50)):
        with pytest.raises(_core.CodecError):
            _core.RansModel.parse(raw[:cut])
    rng = np.random.default_rng(9)
    for _ in range(300):  # mutations: a clean CodecError, or a model that is still well-formed
        b = bytearray(raw)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        try:
            mm = _core.RansModel.parse(bytes(b))
        except _core.CodecError:
            continue
        assert int(mm.freq.sum()) in (0, 1 << mm.scale_bits)
    bad_version = struct.pack("<I", 2) + raw[4:]
    with pytest.raises(_core.CodecError, match="version 2"):
        _core.RansModel.parse(bad_version)


def test_native_fuzz_under_asan(tmp_path):
    """Builds tests/native/rans_fuzz.cpp with the codec sources under AddressSanitizer and
    UndefinedBehaviorSanitizer and runs its seeded corpus (encoder round trips, mutated
    payloads and models through the decoder and the kernel emulation)."""
    import os
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "rans_fuzz"
    with open(os.path.join(root, "tests", "native", "rans_fuzz.sources")) as f:
        sources = [os.path.join(root, line.strip()) for line in f if line.strip() and not line.startswith("#")]
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-I", os.path.join(root, "csrc"), os.path.join(root, "tests", "native", "rans_fuzz.cpp"),
           *sources, "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "asan" in r.stderr.lower() and "cannot find" in r.stderr.lower():
        pytest.skip("AddressSanitizer runtime not installed: " + r.stderr[-300:])
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe), "300"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "rans_fuzz ok" in r.stdout


# ------------------------------------------------------------------------------- kernel emulation
def _batch(rng, specs):
    """specs: (dtype, tokens-maker, escape) per model -> src, descriptors, models, tokens."""
    models, payloads, toks, mids = [], [], [], []
    for k, (make, esc) in enumerate(specs):
        ts = make(rng)
        m = _core.RansModel.build(ts, ts[0].dtype.itemsize, escape_max_count=esc)
        models.append(m)
        for t in ts:
            payloads.append(m.encode(t))
            toks.append(t)
            mids.append(k)
    buf, offs = bytearray(), []
    for p in payloads:
        buf += bytes((-len(buf)) % 4 + 4 * int(rng.integers(2)))  # aligned, sometimes with a gap
        offs.append(len(buf))
        buf += p
    chunks, blocks = R.descriptors(offs, [len(p) for p in payloads], [len(t) for t in toks], mids)
    return np.frombuffer(bytes(buf), np.uint8).copy(), chunks, blocks, models, toks


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_kernel_emulation_matches_cpu_decoder(dtype):
    rng = np.random.default_rng(21)
    big = 70000 if dtype == np.uint32 else 65535
    specs = [
        (lambda r: [zipf(r, n, 50257 if dtype == np.uint16 else 128256, dtype=dtype) for n in EDGE_SIZES], 0),
        (lambda r: [np.full(n, 3, dtype) for n in (1, B, 40)], 0),
        (lambda r: [r.integers(0, big, n).astype(dtype) for n in (5000, B + 7)], 1),  # escapes
    ]
    if dtype == np.uint32:
        specs.append((lambda r: [r.integers(0, 1 << 32, 9000, dtype=np.uint64).astype(np.uint32)], (1 << 32) - 1))
    src, chunks, blocks, models, toks = _batch(rng, specs)
    out = np.zeros(sum(len(t) for t in toks), dtype)
    status = R.emulate(src, chunks, blocks, models, out)
    assert status.tolist() == [0] * len(toks)
    np.testing.assert_array_equal(out, np.concatenate(toks))
    assert len(blocks) == sum(-(-len(t) // B) for t in toks)


def test_kernel_emulation_flags_only_the_corrupt_chunk():
    rng = np.random.default_rng(5)
    src, chunks, blocks, models, toks = _batch(rng, [(lambda r: [zipf(r, n, 2000) for n in (B + 100, 900, 5000)], 0)])
    ref = np.concatenate(toks)
    # (chunk, byte offset in its payload, new bytes, expected status): magic, token count,
    # the word_end of block 1 (chunk 0 has two blocks), lane 0's state below L, a word
    for victim, where, new, expect in [(1, 0, b"x", {1}), (2, 4, b"\x01", {1}), (0, 20, b"\xff", {1}),
                                       (0, 24 + 2, b"\0\0", {2}), (2, 300, b"\x5a\xa5", {3, 4, 5})]:
        s = src.copy()
        off = int(chunks["src_offset"][victim]) + where
        s[off:off + len(new)] = np.frombuffer(new, np.uint8)
        out = np.zeros(len(ref), np.uint16)
        status = R.emulate(s, chunks, blocks, models, out)
        assert int(status[victim]) in expect, (victim, where, status)
        for c in range(len(toks)):
            if c != victim:
                assert status[c] == 0
                a, n = int(chunks["out_offset"][c]), int(chunks["num_tokens"][c])
                np.testing.assert_array_equal(out[a:a + n], ref[a:a + n])
    with pytest.raises(lio.FormatError, match="shard-x chunk 1: rans decode failed on the GPU"):
        R.check_status(np.array([0, 3, 0]), ["a", "shard-x chunk 1", "c"])


def _two_chunk_batch():
    """Two aligned payloads of one model in one source buffer, and their tables."""
    m = _core.RansModel.build([np.arange(100, dtype=np.uint16)], 2)
    t0, t1 = np.arange(10, dtype=np.uint16), np.arange(40, 100, dtype=np.uint16)
    p0, p1 = m.encode(t0), m.encode(t1)
    off1 = -(-len(p0) // 4) * 4
    src = np.zeros(off1 + len(p1), np.uint8)
    src[:len(p0)] = np.frombuffer(p0, np.uint8)
    src[off1:] = np.frombuffer(p1, np.uint8)
    chunks, blocks = R.descriptors([0, off1], [len(p0), len(p1)], [10, 60], [0, 0])
    return m, src, chunks, blocks, np.concatenate([t0, t1])


def test_kernel_emulation_rejects_descriptors_outside_buffers():
    """The descriptor check (rans::check_descriptors, shared with the CUDA binding) names
    the chunk and the value, before anything is decoded."""
    m, src, chunks, blocks, ref = _two_chunk_batch()
    out = np.zeros(len(ref), np.uint16)
    assert R.emulate(src, chunks, blocks, [m], out).tolist() == [0, 0]
    np.testing.assert_array_equal(out, ref)
    n = len(src)
    cases = [
        ("src_bytes", 1, int(chunks["src_bytes"][1]) + 4,
         rf"chunk 1: source range \[{int(chunks['src_offset'][1])}, \+{int(chunks['src_bytes'][1]) + 4}\) "
         rf"lies outside src \({n} bytes\)"),
        ("src_offset", 0, 1 << 63, rf"chunk 0: source range \[{1 << 63}, .*outside src"),  # no wrap-around
        ("src_bytes", 0, (1 << 64) - 1, r"chunk 0: source range \[0, \+18446744073709551615\) lies outside src"),
        ("model", 1, 3, r"chunk 1: model index 3 out of range \(1 model image\(s\)\)"),
        ("out_offset", 1, 11, rf"chunk 1: output range \[11, \+60\) lies outside out \({len(ref)} tokens\)"),
        ("num_tokens", 0, 71, rf"chunk 0: output range \[0, \+71\) lies outside out \({len(ref)} tokens\)"),
    ]
    for field, chunk, value, msg in cases:
        bad = chunks.copy()
        bad[field][chunk] = value
        with pytest.raises(ValueError, match=msg):
            R.emulate(src, bad, blocks, [m], out)
    bad_blocks = blocks.copy()
    bad_blocks["chunk"][0] = 2
    with pytest.raises(ValueError, match=r"block 0: chunk index 2 out of range \(2 chunk\(s\)\)"):
        R.emulate(src, chunks, bad_blocks, [m], out)
    bad_blocks = blocks.copy()
    bad_blocks["block"][1] = 1
    with pytest.raises(ValueError, match=r"block 1: block 1 of chunk 1, which has 1 block\(s\)"):
        R.emulate(src, chunks, bad_blocks, [m], out)
    # A block missing from the table left zeros in `out` with status ok: every block of every
    # chunk must be listed exactly once.
    with pytest.raises(ValueError, match=r"lists 1 block\(s\), the chunks have 2"):
        R.emulate(src, chunks, blocks[:1], [m], out)
    twice = blocks.copy()
    twice[1] = twice[0]
    with pytest.raises(ValueError, match=r"block 1: block 0 of chunk 0 is listed twice"):
        R.emulate(src, chunks, twice, [m], out)
    with pytest.raises(ValueError, match="4-byte aligned"):
        R.descriptors([2], [len(src)], [10], [0])


def test_kernel_emulation_reports_a_misaligned_source_with_its_address():
    """A payload whose address is not 4-byte aligned was reported as status 1 ("header
    inconsistent") by the kernel; the descriptor check names it, with the address."""
    m, src, chunks, blocks, ref = _two_chunk_batch()
    buf = np.zeros(len(src) + 8, np.uint8)
    shifted = buf[1:1 + len(src)]  # same bytes, one byte past an aligned address
    shifted[:] = src
    addr = shifted.__array_interface__["data"][0]
    assert addr % 4 == 1
    with pytest.raises(ValueError, match=rf"chunk 0: misaligned source: payload at address {addr:#x} "
                                         rf"\(src {addr:#x} \+ offset 0\) is not 4-byte aligned"):
        R.emulate(shifted, chunks, blocks, [m], np.zeros(len(ref), np.uint16))


# ------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_rans_dataset_roundtrip_and_groups(tmp_path, dtype):
    rng = np.random.default_rng(2)
    vocab = 50257 if dtype == "uint16" else 128256
    docs = [zipf(rng, int(rng.integers(1, 9000)), vocab, dtype=np.dtype(dtype)) for _ in range(120)]
    docs.append(rng.integers(0, np.iinfo(dtype).max, 3000, dtype=np.uint64).astype(dtype))  # incompressible
    with lio.DatasetWriter(tmp_path / "d", dtype=dtype, codec="rans", chunk_tokens=3000, shard_tokens=200_000,
                           rans_model_tokens=50_000) as w:
        w.add_documents(docs)
    ds = lio.open_dataset(tmp_path / "d")
    allt = np.concatenate(docs)
    assert ds.codec == "rans" and ds.num_tokens == len(allt)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), allt)
    for s, c in [(1, 5), (2999, 2), (50_000, 10_000), (len(allt) - 7, 7)]:
        np.testing.assert_array_equal(ds.read(s, c), allt[s:s + c])
    for i in (0, 57, len(docs) - 1):
        np.testing.assert_array_equal(ds.document(i), docs[i])
    codecs = set(ds.chunks["codec"].tolist())
    assert F.CODEC_RANS in codecs
    rans_chunks = ds.chunks[ds.chunks["codec"] == F.CODEC_RANS]
    # one model per 50k-token group, never spanning shards
    assert len(set(zip(rans_chunks["file"].tolist(), rans_chunks["model"].tolist()))) >= len(allt) // 50_000
    assert (ds.chunks["model"][ds.chunks["codec"] != F.CODEC_RANS] == 0).all()
    assert ds.stored_bytes < 0.85 * allt.nbytes
    assert ds.verify().ok
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["codec"] == "rans" and manifest["rans_model_tokens"] == 50_000


def _one_rans_shard(tmp_path, version=None):
    rng = np.random.default_rng(4)
    docs = [zipf(rng, 4000, 1000) for _ in range(10)]
    with lio.DatasetWriter(tmp_path / "d", codec="rans", chunk_tokens=4096, rans_model_tokens=1 << 30,
                           _format_version=version) as w:
        w.add_documents(docs)
    ds = lio.open_dataset(tmp_path / "d")
    return ds, np.concatenate(docs), tmp_path / "d" / "shard-00000.lio"


def test_corrupt_model_region_is_named(tmp_path):
    ds, allt, shard = _one_rans_shard(tmp_path)
    moff = int(ds.chunks["model"][0])
    raw = bytearray(shard.read_bytes())
    raw[moff + F.MODEL_HEADER_BYTES + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ds = lio.open_dataset(tmp_path / "d")  # tables intact: opens
    with pytest.raises(lio.ChecksumError, match=rf"shard-00000.lio: rans model region @ offset {moff}: checksum "
                                                r"mismatch.*\(model of .*shard-00000.lio chunk 0"):
        ds.read(0, 10)
    rep = ds.verify()
    assert not rep.ok and len(rep.bad_chunks) == len(ds.chunks)
    assert "model region" in rep.bad_chunks[0].reason


def test_verify_checks_the_padding_after_a_model_region(tmp_path):
    ds, allt, shard = _one_rans_shard(tmp_path, version=1)  # v1: zeros to the next 4096
    moff = int(ds.chunks["model"][0])
    raw = bytearray(shard.read_bytes())
    size = F.model_region_size(bytes(raw[moff:moff + 32]), str(shard), moff)
    assert (moff + size) % 4096  # there is padding to damage
    raw[moff + size] = 1
    shard.write_bytes(bytes(raw))
    ds = lio.open_dataset(tmp_path / "d")
    np.testing.assert_array_equal(ds.read(0, len(allt)), allt)  # the tokens are intact
    rep = ds.verify()
    assert [(b.chunk, b.offset) for b in rep.bad_chunks] == [(-1, moff + size)]
    assert "after the rans model region" in rep.bad_chunks[0].reason



def test_corrupt_payload_with_fixed_checksum_is_a_format_error(tmp_path):
    """A payload that passes its checksum but does not decode (an encoder bug, or a
    deliberate rewrite): FormatError naming shard and chunk, never wrong tokens."""
    ds, allt, shard = _one_rans_shard(tmp_path)
    c = ds.chunks[1]
    raw = bytearray(shard.read_bytes())
    off, n = int(c["offset"]), int(c["stored_bytes"])
    raw[off + n - 3] ^= 0x10
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    struct.pack_into("<Q", raw, hdr["table_offset"] + 1 * 48 + 32, F.checksum(bytes(raw[off:off + n])))
    reseal(shard, raw)
    ds = lio.open_dataset(tmp_path / "d")
    np.testing.assert_array_equal(ds.read(0, 4096), allt[:4096])  # chunk 0 fine
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio chunk 1 .*rans payload") as ei:
        ds.read(4096, 10)
    assert ei.value.chunk == 1
    assert [b.chunk for b in ds.verify().bad_chunks] == [1]


def test_model_offset_on_a_raw_chunk_is_rejected_at_open(tmp_path):
    ds, _, shard = _one_rans_shard(tmp_path)
    raw = bytearray(shard.read_bytes())
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    struct.pack_into("<H", raw, hdr["table_offset"] + 2 * 48 + 28, F.CODEC_NONE)
    reseal(shard, raw)
    with pytest.raises(lio.FormatError, match=r"chunk 2 @ offset \d+: (raw chunk size|nonzero model_offset)"):
        lio.open_dataset(tmp_path / "d")


def test_rans_dataset_pickles_without_models(tmp_path):
    import pickle

    ds, allt, _ = _one_rans_shard(tmp_path)
    ds.read(0, 10)
    assert ds._models
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2._models == {}
    np.testing.assert_array_equal(ds2.read(100, 9000), allt[100:9100])


# ------------------------------------------------------------------------------- GPU
cuda_ok = pytest.mark.skipif(
    not (lio._native.cuda_usable()[0] and __import__("torch").cuda.is_available()),
    reason="needs a CUDA GPU that llmio_native._cuda can use: " + lio._native.cuda_usable()[1])


@pytest.mark.cuda
@cuda_ok
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_gpu_decode_bit_exact_on_a_side_stream(dtype):
    import torch

    rng = np.random.default_rng(8)
    specs = [(lambda r: [zipf(r, n, 50257, dtype=dtype) for n in EDGE_SIZES + [5 * B]], 0),
             (lambda r: [r.integers(0, 60000, 7000).astype(dtype)], 1)]
    src, chunks, blocks, models, toks = _batch(rng, specs)
    ref = np.concatenate(toks)
    dec = R.GpuDecoder("cuda")
    side = torch.cuda.Stream()
    tdt = torch.int16 if dtype == np.uint16 else torch.int32
    with torch.cuda.stream(side):
        dsrc = torch.from_numpy(src).to("cuda", non_blocking=False)
        out = torch.zeros(len(ref), dtype=tdt, device="cuda")
        status = dec.decode(dsrc, chunks, blocks, models, out, stream=side)
    side.synchronize()
    assert status.cpu().tolist() == [0] * len(toks)
    got = out.cpu().numpy().view(dtype)
    np.testing.assert_array_equal(got, ref)
    # corrupt one chunk: only its status is set
    bad = src.copy()
    bad[int(chunks["src_offset"][2]) + 40] ^= 0x77
    with torch.cuda.stream(side):
        status = dec.decode(torch.from_numpy(bad).cuda(), chunks, blocks, models, out, stream=side)
    side.synchronize()
    st = status.cpu().numpy()
    assert st[2] != 0 and (np.delete(st, 2) == 0).all()


@pytest.mark.cuda
@cuda_ok
def test_gpu_decode_on_the_default_stream():
    """torch's default stream is handle 0: the binding used to refuse it."""
    import torch

    rng = np.random.default_rng(9)
    src, chunks, blocks, models, toks = _batch(rng, [(lambda r: [zipf(r, n, 50257) for n in (B + 5, 77)], 0)])
    ref = np.concatenate(toks)
    dec = R.GpuDecoder("cuda")
    default = torch.cuda.default_stream()
    assert default.cuda_stream == 0
    with torch.cuda.stream(default):
        out = torch.zeros(len(ref), dtype=torch.int16, device="cuda")
        status = dec.decode(torch.from_numpy(src).cuda(), chunks, blocks, models, out)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [0, 0]
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint16), ref)


@pytest.mark.cuda
@cuda_ok
def test_gpu_decode_refuses_bad_descriptors_and_the_context_survives():
    import torch

    rng = np.random.default_rng(10)
    src, chunks, blocks, models, toks = _batch(rng, [(lambda r: [zipf(r, n, 2000) for n in (900, 5000)], 0)])
    ref = np.concatenate(toks)
    dec = R.GpuDecoder("cuda")
    dsrc = torch.from_numpy(src).cuda()
    out = torch.zeros(len(ref), dtype=torch.int16, device="cuda")
    for field, value, msg in [("src_bytes", len(src) + 1, r"chunk 1: source range .* lies outside src"),
                              ("model", 5, r"chunk 1: model index 5 out of range"),
                              ("out_offset", len(ref), r"chunk 1: output range .* lies outside out")]:
        bad = chunks.copy()
        bad[field][1] = value
        with pytest.raises(ValueError, match=msg):
            dec.decode(dsrc, bad, blocks, models, out)
    with pytest.raises(ValueError, match=r"misaligned source: payload at address"):
        dec.decode(torch.from_numpy(np.concatenate([[0], src]).astype(np.uint8)).cuda()[1:], chunks, blocks,
                   models, out)
    with pytest.raises(ValueError, match=r"src must be a tensor on cuda"):
        dec.decode(torch.from_numpy(src), chunks, blocks, models, out)
    with pytest.raises(ValueError, match=r"model 0 is for 2-byte tokens, out has 4-byte elements"):
        dec.decode(dsrc, chunks, blocks, models, out.view(torch.int32)[: len(ref) // 2])
    status = dec.decode(dsrc, chunks, blocks, models, out)  # the context is fine
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [0, 0]
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint16), ref)


def test_exported_constants_match_python_layout():
    """The descriptor layouts and status codes are defined once in C++ (rans_device.hpp,
    rans_check.cpp) and exported; the dataset layer's copies must agree with them."""
    from llmio_native.dataset import rans as drans

    # the layouts the planner fills (loader staging) and the kernel reads: names, sizes, order
    assert drans.CHUNK_DESC.names == ("src_offset", "src_bytes", "out_offset", "num_tokens", "model")
    assert drans.CHUNK_DESC.itemsize == 32 and drans.BLOCK_DESC.itemsize == 8
    assert drans.BLOCK_DESC.names == ("chunk", "block")
    assert _core.RANS_STATUS == drans.STATUS
    assert _core.RANS_STATUS_OK == 0 and _core.RANS_STATUS_BAD_FINAL == max(_core.RANS_STATUS)
    assert _core.RANS_PAYLOAD_ALIGN == 4 == drans.PAYLOAD_ALIGN and F.RANS_SCALE_BITS == 14
    assert _core.RANS_MIN_SCALE_BITS <= _core.RANS_SCALE_BITS_DEFAULT <= _core.RANS_MAX_SCALE_BITS
