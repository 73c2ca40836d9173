"""The rans1 token codec (context-modelled rans): round trips, edge sizes, escapes, the
gain of the context model, the three decoders (the kernel's logic on the CPU, the
independent reference decoder, the host emulation of the GPU kernel) bit for bit,
adversarial payloads and models, rans1 datasets, the loader's GPU path (emulated) and the
GPU kernel itself (``cuda``, skipped without a GPU)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native import _core
from llmio_native.dataset import format as F
from llmio_native.dataset import rans1 as R1

from shard_edit import reseal

B = _core.RANS_BLOCK_SYMBOLS  # 32768
L = _core.RANS_LANES  # 32
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
EDGE_SIZES = [0, 1, L - 1, L, L + 1, 2 * L + 3, 1000, B - 1, B, B + 1, 2 * B + L + 1]


def zipf(rng: np.random.Generator, n: int, vocab: int, s: float = 1.1, dtype=np.uint16) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1) ** s
    return rng.choice(vocab, size=n, p=p / p.sum()).astype(dtype)


def markov(rng: np.random.Generator, n: int, vocab: int, fanout: int, dtype=np.uint16) -> np.ndarray:
    """A first-order Markov chain: each token is followed by one of ``fanout`` successors
    (Zipf weights), a random id otherwise 1 time in 20. Its conditional entropy is far
    below its order-0 entropy, which only a context model can use."""
    succ = rng.integers(0, vocab, size=(vocab, fanout))
    w = 1.0 / np.arange(1, fanout + 1) ** 1.2
    cdf = np.cumsum(w / w.sum())
    pick = np.minimum(np.searchsorted(cdf, rng.random(n)), fanout - 1)
    jump = rng.random(n) < 0.05
    rnd = rng.integers(0, vocab, n)
    out = np.empty(n, np.int64)
    cur = 0
    for i in range(n):
        cur = int(rnd[i]) if jump[i] else int(succ[cur, pick[i]])
        out[i] = cur
    return out.astype(dtype)


def markov_rate(vocab: int, fanout: int) -> float:
    """The entropy rate of :func:`markov`'s source in bits/token (successor collisions
    aside, which only lower it)."""
    w = 1.0 / np.arange(1, fanout + 1) ** 1.2
    p = 0.95 * w / w.sum() + 0.05 / vocab
    return float(-(p * np.log2(p)).sum() - (1 - p.sum()) * np.log2(0.05 / vocab))


def h0_bits(t: np.ndarray) -> float:
    _, c = np.unique(t, return_counts=True)
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def h1_bits(t: np.ndarray) -> float:
    """Empirical H(next | previous) in bits/token."""
    key = t[:-1].astype(np.uint64) << np.uint64(32) | t[1:].astype(np.uint64)
    _, pc = np.unique(key, return_counts=True)
    _, cc = np.unique(t[:-1], return_counts=True)
    n = len(t) - 1
    return float((-(pc * np.log2(pc / n)).sum() + (cc * np.log2(cc / n)).sum()) / n)


ALL_LEVELS = ["scalar", "avx2", "avx512"]  # the CPU decoders' instruction sets (Rans1Model.decode(simd=...))
CPU_LEVELS = _core.rans_simd_levels()["cpu"]  # those this CPU runs
# The default path (the CPU's best level), its scalar code, the oracle, and every SIMD level
# the CPU runs by name (each bit-identical to the scalar code).
DECODERS = [dict(), dict(simd=False), dict(reference=True)] + [dict(simd=lv) for lv in CPU_LEVELS if lv != "scalar"]


def decode_all(m, enc: bytes, n: int, dtype) -> list[np.ndarray]:
    """The payload decoded by the default path, its scalar code, the reference decoder and
    each SIMD level the CPU runs."""
    outs = []
    for kw in DECODERS:
        out = np.full(n, 0xAB, dtype=dtype)
        m.decode(enc, out, **kw)
        outs.append(out)
    return outs


def roundtrip(tokens: np.ndarray, model=None, **kw) -> bytes:
    tb = tokens.dtype.itemsize
    m = model or _core.Rans1Model.build([tokens], tb, **kw)
    enc = m.encode(tokens)
    for out in decode_all(m, enc, len(tokens), tokens.dtype):
        np.testing.assert_array_equal(out, tokens)
    return enc


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_roundtrip_edge_sizes(dtype, n):
    rng = np.random.default_rng(n)
    t = markov(rng, n, 3000, 8, dtype) if n else np.zeros(0, dtype)
    enc = roundtrip(t)
    assert struct.unpack_from("<4sII", enc) == (b"rAN1", n, -(-n // B))


@pytest.mark.parametrize("dtype, tokens", [
    (np.uint16, np.full(5000, 7)),
    (np.uint16, np.arange(65536)),                      # every id once: no context repeats
    (np.uint16, np.tile([0, 65535], 3000)),             # two symbols, strictly alternating
    (np.uint32, np.array([0, 1, 2**32 - 1, 2**31] * 999)),
    (np.uint32, np.arange(0, 2**32 - 1, 2**32 // 70001)),
])
def test_roundtrip_degenerate_distributions(dtype, tokens):
    roundtrip(np.asarray(tokens, dtype=dtype))


@pytest.mark.parametrize("kw", [dict(scale_bits=9), dict(scale_bits=15), dict(ctx_bits=8), dict(ctx_bits=15),
                                dict(min_count=1), dict(min_count=50), dict(exact_min_count=1),
                                dict(max_exact=0), dict(max_exact=3), dict(entry_cost_bits=0),
                                dict(entry_cost_bits=1000)])
def test_roundtrip_across_settings(kw):
    rng = np.random.default_rng(3)
    t = np.concatenate([markov(rng, 3 * B, 5000, 12), zipf(rng, 4000, 60000)])
    roundtrip(t, **kw)


def test_a_model_over_its_slot_budget_gets_smaller_tables():
    """build() lowers ctx_bits (each context keeping its most frequent entries) until the
    tables fit the slot budget; what does not fit raises, naming the budget."""
    rng = np.random.default_rng(4)
    t = zipf(rng, 400_000, 500, s=0.8)  # ~800 tokens a context, often > 127 distinct ones twice
    big = _core.Rans1Model.build([t], 2, ctx_bits=13, entry_cost_bits=0)
    least = _core.Rans1Model.build([t], 2, ctx_bits=8, entry_cost_bits=0).num_slots
    budget = (least + big.num_slots) // 2
    small = _core.Rans1Model.build([t], 2, ctx_bits=13, entry_cost_bits=0, max_slots=budget)
    assert small.num_slots <= budget < big.num_slots and 8 <= small.ctx_bits < 13
    assert small.num_entries <= big.num_entries
    roundtrip(t, model=small)
    least_m = _core.Rans1Model.build([t], 2, ctx_bits=13, entry_cost_bits=0, max_slots=least)
    assert least_m.ctx_bits == 8 and least_m.num_entries < big.num_entries  # at most 127 entries a context
    roundtrip(t, model=least_m)
    assert _core.Rans1Model.parse(small.serialize()).ctx_bits == small.ctx_bits
    with pytest.raises(ValueError, match=f"slots even with ctx_bits 8, more than {least - 1}"):
        _core.Rans1Model.build([t], 2, ctx_bits=13, entry_cost_bits=0, max_slots=least - 1)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_tokens_the_model_never_saw_are_escaped(dtype):
    """A model codes every token of its type: tokens outside its data go through the
    order-0 escape buckets (bit length + raw bits), the widest ids included."""
    rng = np.random.default_rng(5)
    m = _core.Rans1Model.build([zipf(rng, 20000, 500, dtype=dtype)], np.dtype(dtype).itemsize)
    top = np.iinfo(dtype).max
    other = np.concatenate([rng.integers(0, top, 3000, dtype=np.uint64).astype(dtype),
                            np.array([0, top, top - 1, 1 << (8 * np.dtype(dtype).itemsize - 1)], dtype),
                            zipf(rng, 5000, 500, dtype=dtype)])
    roundtrip(other, model=m)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_every_escape_density_decodes_identically(dtype):
    """The SIMD decoders run the order-0 phases on the escaped lanes only, packed in lane
    order (AVX2: 8 a vector; AVX-512: into one vector when at most 16 escape, else both
    vectors under their escape masks). Streams
    from no escapes to every token escaped (all 32 lanes each step) decode identically with
    all decoders and the kernel emulation, and cost what their escapes say."""
    n = 2 * B + 1000
    base = markov(np.random.default_rng(7), n, 3000, 8, dtype)
    m = _core.Rans1Model.build([base], np.dtype(dtype).itemsize)
    rng = np.random.default_rng(8)
    bits = []
    for q in (0.0, 0.03, 0.2, 1.0):  # share of tokens replaced by ids the model never saw
        t = base.copy()
        hit = rng.random(n) < q
        t[hit] = rng.integers(3000, 60000, int(hit.sum())).astype(dtype)
        enc = roundtrip(t, model=m)
        bits.append(8 * len(enc) / n)
        chunks, blocks = R1.descriptors([0], [len(enc)], [n], [0])
        out = np.zeros(n, dtype)
        assert R1.emulate(np.frombuffer(enc, np.uint8).copy(), chunks, blocks, [m], out).tolist() == [0]
        np.testing.assert_array_equal(out, t)
    assert bits[0] < 6 and bits[-1] > 12, bits  # the model's own data vs. every token escaped
    assert bits == sorted(bits), bits


def test_build_and_argument_errors():
    t = np.arange(100, dtype=np.uint16)
    for kw, msg in [(dict(scale_bits=8), "scale_bits must be in"), (dict(scale_bits=16), "scale_bits must be in"),
                    (dict(ctx_bits=7), "ctx_bits must be in"), (dict(ctx_bits=16), "ctx_bits must be in"),
                    (dict(min_count=0), "min_count must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            _core.Rans1Model.build([t], 2, **kw)
    with pytest.raises(ValueError, match="token_bytes must be 2 or 4"):
        _core.Rans1Model.build([], 3)
    with pytest.raises(ValueError, match="a part has 2-byte tokens, token_bytes is 4"):
        _core.Rans1Model.build([t], 4)
    m = _core.Rans1Model.build([t], 2)
    with pytest.raises(ValueError, match="the model is for 2-byte tokens, got 4"):
        m.encode(t.astype(np.uint32))
    with pytest.raises(ValueError, match="contiguous 1-D uint16 or uint32"):
        m.encode(t[::2])
    with pytest.raises(ValueError, match="out has 4"):
        m.decode(m.encode(t), np.empty(100, np.uint32))


# ------------------------------------------------------------------------------- compression
def test_context_model_reaches_the_conditional_entropy():
    """On a Markov source the payload comes within a few % of the source's entropy rate,
    far below the order-0 entropy (which is all rans can reach); the model's own estimate
    agrees with the payload it writes."""
    rng = np.random.default_rng(7)
    t = markov(rng, 400_000, 2000, 16)
    chunks = [t[i:i + 65536] for i in range(0, len(t), 65536)]
    m = _core.Rans1Model.build(chunks, 2)
    payload = sum(len(m.encode(c)) for c in chunks)
    bits = 8 * payload / len(t)
    h0, h1 = h0_bits(t), h1_bits(t)
    rate = markov_rate(2000, 16)
    assert h1 < 0.6 * h0 and abs(h1 - rate) < 0.15 * rate  # the source is what the test needs
    assert bits < 1.03 * rate + 0.05, (bits, rate, h1, h0)
    assert abs(bits - m.bits_per_token) < 0.05 + 0.01 * bits  # headers: 132 bytes per block
    r0 = _core.RansModel.build(chunks, 2)
    rans_bits = 8 * sum(len(r0.encode(c)) for c in chunks) / len(t)
    assert bits < 0.7 * rans_bits


def test_smaller_than_rans_and_zstd19_on_real_tokens(tmp_path):
    """tinyshakespeare (~300K tokens, far below the issue's 2^24: the model's cost weighs
    more here), a 16K byte-level BPE trained on it: rans1 shards (payload + model region)
    beat rans and zstd -19 on the same token bytes."""
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is absent")
    pytest.importorskip("tokenizers")
    import zstandard

    from llmio_native.pack import train_bpe

    text = CORPUS.read_text(encoding="utf-8")
    tok = train_bpe([text], 16384, str(tmp_path / "tok.json"))
    t = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
    chunks = [t[i:i + 32768] for i in range(0, len(t), 32768)]
    m = _core.Rans1Model.build(chunks, 2)
    r1 = sum(len(m.encode(c)) for c in chunks) + len(F.pack_model_region(m))
    r0m = _core.RansModel.build(chunks, 2)
    r0 = sum(len(r0m.encode(c)) for c in chunks) + len(F.pack_model_region(r0m))
    z19 = len(zstandard.ZstdCompressor(level=19).compress(t.tobytes()))
    h0 = h0_bits(t)
    bits = 8 * r1 / len(t)
    assert r1 < 0.92 * r0 and r1 < 0.95 * z19, (r1, r0, z19)
    assert bits < 0.93 * h0, (bits, h0)


# ------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(11)
    t = np.concatenate([markov(rng, 2 * B + 500, 3000, 10), rng.integers(0, 65536, 300).astype(np.uint16)])
    m = _core.Rans1Model.build([t[:40000], t[40000:]], 2)
    return t, m, m.encode(t)


def test_model_serialises_raw_counts_and_the_decoder_requantises_identically(sample):
    """The serialised model holds raw counts; parse() quantises them again with integer
    arithmetic: the same decode image, word for word, and the same bytes back."""
    t, m, enc = sample
    raw = m.serialize()
    m2 = _core.Rans1Model.parse(raw)
    np.testing.assert_array_equal(m2.device_image(), m.device_image())
    assert m2.serialize() == raw
    assert (m2.num_contexts, m2.num_exact, m2.num_entries, m2.num_slots) == (
        m.num_contexts, m.num_exact, m.num_entries, m.num_slots)
    for out in decode_all(m2, enc, len(t), np.uint16):
        np.testing.assert_array_equal(out, t)


def test_decode_image_tables_are_consistent(sample):
    """Every context table of the image: its slots hold runs of equal entries whose
    frequency is the run length and whose (slot - cum) counts up from 0; the escape is
    the last run; next contexts are in range."""
    _, m, _ = sample
    img = m.device_image().astype(np.int64)
    assert img[0] == 0x4D493152  # "R1IM"
    nctx, ctx_off, slot_off, nslots = img[8], img[11], img[12], img[13]
    assert nctx == m.num_contexts and nslots == m.num_slots
    info = img[ctx_off:ctx_off + nctx]
    slots = img[slot_off:slot_off + 2 * nslots].reshape(-1, 2)
    first, bits = info >> 4, info & 15
    assert (np.diff(first) == (1 << bits)[:-1]).all() and first[-1] + (1 << bits[-1]) == nslots
    for c in range(0, nctx, max(1, nctx // 50)):
        s = slots[first[c]:first[c] + (1 << bits[c])]
        freq, bias = s[:, 1] & 0xFFFF, s[:, 1] >> 16
        starts = np.flatnonzero(bias == 0)
        runs = np.diff(np.r_[starts, len(s)])
        assert (freq[starts] == runs).all()
        assert (bias == np.arange(len(s)) - np.repeat(starts, runs)).all()
        assert (s[starts[-1]:, 0] & 0xFFFF == 0xFFFF).all()  # the escape: last
        assert ((s[:, 0] >> 16) < nctx).all()


def test_truncated_and_foreign_payloads_raise(sample):
    t, m, enc = sample
    out = np.empty_like(t)
    for cut in sorted({0, 1, 15, 16, 17, 100, 16 + 12 + 3 * 128, len(enc) // 2, len(enc) - 2, len(enc) - 1}):
        for kw in DECODERS:
            with pytest.raises(_core.CodecError):
                m.decode(enc[:cut], out, **kw)
    with pytest.raises(_core.CodecError):
        m.decode(enc + b"\0\0", out)
    with pytest.raises(_core.CodecError, match=f"holds {len(t)} tokens, expected {len(t) - 1}"):
        m.decode(enc, np.empty(len(t) - 1, np.uint16))
    rans_payload = _core.RansModel.build([t], 2).encode(t)
    with pytest.raises(_core.CodecError, match="bad magic"):
        m.decode(rans_payload, out)


def test_fuzz_corrupted_payloads(sample):
    """Seeded mutations: both decoders raise CodecError or return the same tokens; never a
    crash (the ASan/UBSan driver in tests/native covers the memory side). The codec alone
    detects almost every corruption; the chunk checksum catches the rest in datasets."""
    t, m, enc = sample
    rng = np.random.default_rng(1234)
    out = np.empty_like(t)
    detected, trials = 0, 300
    for _ in range(trials):
        b = bytearray(enc)
        kind = rng.integers(3)
        if kind == 0:
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        else:
            i, j = sorted(rng.integers(16 + 3 * 132, len(b) // 2, size=2) * 2)
            b[i:i + 2], b[j:j + 2] = b[j:j + 2], b[i:i + 2]
        results = []
        for kw in DECODERS:
            try:
                m.decode(bytes(b), out, **kw)
                results.append(out.copy())
            except _core.CodecError as exc:
                results.append(str(exc))
        if isinstance(results[0], str):
            assert all(isinstance(r, str) for r in results)
            detected += 1
        else:
            for r in results[1:]:
                np.testing.assert_array_equal(results[0], r)
    assert detected >= 0.9 * trials


def test_corrupted_models_raise_or_stay_well_formed(sample):
    t, m, enc = sample
    raw = m.serialize()
    for cut in range(0, len(raw) - 1, max(1, len(raw) // 60)):
        with pytest.raises(_core.CodecError):
            _core.Rans1Model.parse(raw[:cut])
    with pytest.raises(_core.CodecError, match="trailing bytes"):
        _core.Rans1Model.parse(raw + b"\0")
    with pytest.raises(_core.CodecError, match="version 2"):
        _core.Rans1Model.parse(struct.pack("<I", 2) + raw[4:])
    with pytest.raises(_core.CodecError, match="ctx_bits 16"):
        _core.Rans1Model.parse(raw[:12] + struct.pack("<I", 16) + raw[16:])
    rng = np.random.default_rng(9)
    out = np.empty_like(t)
    parsed = 0
    for _ in range(200):
        b = bytearray(raw)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        try:
            mm = _core.Rans1Model.parse(bytes(b))
        except _core.CodecError:
            continue
        parsed += 1
        for kw in DECODERS:  # a different but well-formed model: decodes or raises
            try:
                mm.decode(enc, out, **kw)
            except _core.CodecError:
                pass
    assert parsed < 200


# ------------------------------------------------------------------------------- SIMD levels
def _need_level(level: str) -> None:
    if level not in CPU_LEVELS:
        pytest.skip(f"this CPU lacks the {level} decoder's instruction set (it runs {CPU_LEVELS})")


def _level_corpora(dtype) -> list[np.ndarray]:
    """Context-heavy (Markov), escape-heavy (Zipf over a large vocabulary), every token
    escaped with the widest ids (uint32: raw bits above 16, phase 4), and mixes of them, at
    sizes with full blocks, a short last block and a last run of fewer than 16 steps."""
    rng = np.random.default_rng(31)
    top = int(np.iinfo(dtype).max)
    mk = markov(rng, 2 * B + 1000, 3000, 8, dtype)
    zf = zipf(rng, B + 33, 60000, s=0.9, dtype=dtype)
    wide = rng.integers(0, top, B - 1, dtype=np.uint64).astype(dtype)
    mix = mk[:B].copy()
    hit = rng.random(B) < 0.3
    mix[hit] = wide[: int(hit.sum())]
    return [mk, zf, wide, mix, mk[:1000], mk[:L * 16 + 5]]


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_each_simd_level_decodes_bit_for_bit_as_the_scalar_code(level, dtype):
    _need_level(level)
    corpora = _level_corpora(dtype)
    m = _core.Rans1Model.build(corpora[:1], np.dtype(dtype).itemsize)  # the others escape often
    for t in corpora:
        enc = m.encode(t)
        ref = np.full(len(t), 0xAB, dtype)
        m.decode(enc, ref, simd=False)
        np.testing.assert_array_equal(ref, t)
        out = np.full(len(t), 0xCD, dtype)
        m.decode(enc, out, simd=level)
        np.testing.assert_array_equal(out, t)


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_each_simd_level_flags_corruption_as_the_scalar_code(level):
    """Mutated payloads: each level raises the very error of the scalar code (the block,
    and overrun / bad symbol / bad final state) or returns its very tokens."""
    _need_level(level)
    rng = np.random.default_rng(41)
    outcomes = {}
    for dtype in (np.uint16, np.uint32):
        t = _level_corpora(dtype)[3]
        m = _core.Rans1Model.build([t], np.dtype(dtype).itemsize)
        enc = m.encode(t)
        hdr = 16 + 4 + 4 * L  # header, block table, the block's states
        for trial in range(150):
            b = bytearray(enc)
            kind = trial % 4
            if kind == 0:  # flip a bit in the states or the words
                b[int(rng.integers(16, len(b)))] ^= 1 << int(rng.integers(8))
            elif kind == 1:  # a word replaced
                i = int(rng.integers(hdr // 2, len(b) // 2)) * 2
                b[i:i + 2] = rng.integers(0, 256, 2, dtype=np.uint8).tobytes()
            elif kind == 2:  # two words swapped
                i, j = sorted(rng.integers(hdr // 2, len(b) // 2, size=2) * 2)
                b[i:i + 2], b[j:j + 2] = b[j:j + 2], b[i:i + 2]
            elif trial % 8 == 3:  # a lane's state lowered (it takes more words: overrun) or its low bits changed
                lane = int(rng.integers(L))
                x = struct.unpack_from("<I", b, 20 + 4 * lane)[0]
                x = (1 << 16) + int(rng.integers(256)) if trial % 16 == 3 else x ^ (1 << int(rng.integers(4)))
                b[20 + 4 * lane:24 + 4 * lane] = struct.pack("<I", x)
            else:  # the last word the block reads: only its final states differ
                b[-1 - int(rng.integers(2))] ^= 1 << int(rng.integers(8))
            res = []
            for kw in (dict(simd=False), dict(simd=level)):
                out = np.full(len(t), 0x5A, dtype)
                try:
                    m.decode(bytes(b), out, **kw)
                    res.append(out)
                except _core.CodecError as exc:
                    res.append(str(exc))
            if isinstance(res[0], str):
                assert res[1] == res[0]
                err = next((k for k in ("runs out of words", "decodes a symbol", "ends in states", "invalid state",
                                        "inconsistent") if k in res[0]), res[0])
                outcomes[err] = outcomes.get(err, 0) + 1
            else:
                assert not isinstance(res[1], str), res[1]
                np.testing.assert_array_equal(res[1], res[0])
    assert {"runs out of words", "decodes a symbol", "ends in states"} <= set(outcomes), outcomes


def test_simd_argument_errors(sample):
    t, m, enc = sample
    out = np.empty_like(t)
    with pytest.raises(ValueError, match="simd='avx1024': expected True, False, 'auto'"):
        m.decode(enc, out, simd="avx1024")
    with pytest.raises(TypeError, match="simd must be a bool or a level name"):
        m.decode(enc, out, simd=2)
    for level in ALL_LEVELS:
        if level not in CPU_LEVELS:  # asked for by name and missing: raises, naming what is missing
            with pytest.raises(lio.UnsupportedError, match=f'simd="{level}" requested, but this CPU lacks'):
                m.decode(enc, out, simd=level)
    m.decode(enc, out, simd="auto")
    np.testing.assert_array_equal(out, t)
    levels = _core.rans_simd_levels()
    assert levels["cpu"][0] == "scalar" and levels["default"] in levels["cpu"]
    assert lio.info()["codec_simd"] == levels


@pytest.mark.parametrize("env, expect", [("0", "scalar"), ("scalar", "scalar"), ("avx2", "avx2"),
                                         ("avx512", "best"), ("", "best"), ("sse9", "error")])
def test_llmio_rans_simd_caps_the_default_level(env, expect):
    """LLMIO_RANS_SIMD caps what simd=True runs (read once per process, so a subprocess);
    explicit levels still run; another value raises on the first decode, naming it."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from llmio_native import _core\n"
        "t = np.arange(3000, dtype=np.uint16) % 97\n"
        "m = _core.Rans1Model.build([t], 2); out = np.empty_like(t)\n"
        "try:\n"
        "    m.decode(m.encode(t), out); assert (out == t).all()\n"
        "    print(_core.rans_simd_levels()['default'])\n"
        "except ValueError as exc:\n"
        "    print('error:', exc)\n"
        "    import llmio_native; assert llmio_native.info()['codec_simd'] == 'error: ' + str(exc)\n"
        "m.decode(m.encode(t), out, simd=False); assert (out == t).all()\n"
    )
    root = str(Path(lio.__file__).parents[1])
    env_vars = {**os.environ, "PYTHONPATH": root, "LLMIO_RANS_SIMD": env}
    res = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = res.stdout.strip()
    if expect == "error":
        assert got == "error: LLMIO_RANS_SIMD=sse9: expected 0 or scalar, avx2, avx512, auto or 1", got
    elif expect == "best":
        assert got == CPU_LEVELS[-1]
    else:
        want = expect if expect in CPU_LEVELS else CPU_LEVELS[-1]  # a cap above the CPU's best is no cap
        assert got == want


# ------------------------------------------------------------------------------- kernel emulation
def _batch(rng, makers):
    """One model per maker (its chunks), all payloads in one buffer at aligned offsets."""
    models, payloads, toks, mids = [], [], [], []
    for k, make in enumerate(makers):
        ts = make(rng)
        m = _core.Rans1Model.build(ts, ts[0].dtype.itemsize)
        models.append(m)
        for t in ts:
            payloads.append(m.encode(t))
            toks.append(t)
            mids.append(k)
    buf, offs = bytearray(), []
    for p in payloads:
        buf += bytes((-len(buf)) % 4 + 4 * int(rng.integers(2)))
        offs.append(len(buf))
        buf += p
    chunks, blocks = R1.descriptors(offs, [len(p) for p in payloads], [len(t) for t in toks], mids)
    return np.frombuffer(bytes(buf), np.uint8).copy(), chunks, blocks, models, toks, payloads


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_kernel_emulation_matches_both_cpu_decoders(dtype):
    rng = np.random.default_rng(21)
    big = 65535 if dtype == np.uint16 else 1 << 32
    makers = [
        lambda r: [markov(r, n, 4000, 8, dtype) for n in EDGE_SIZES if n],
        lambda r: [np.full(n, 3, dtype) for n in (1, B, 40)],
        lambda r: [r.integers(0, big, n, dtype=np.uint64).astype(dtype) for n in (5000, B + 7)],
    ]
    src, chunks, blocks, models, toks, payloads = _batch(rng, makers)
    out = np.zeros(sum(len(t) for t in toks), dtype)
    status = R1.emulate(src, chunks, blocks, models, out)
    assert status.tolist() == [0] * len(toks)
    np.testing.assert_array_equal(out, np.concatenate(toks))
    k = 0
    for mid, (t, p) in zip(chunks["model"].tolist(), zip(toks, payloads)):  # the CPU decoders, chunk by chunk
        for o in decode_all(models[mid], p, len(t), dtype):
            np.testing.assert_array_equal(o, out[k:k + len(t)])
        k += len(t)


def test_kernel_emulation_flags_only_the_corrupt_chunk():
    rng = np.random.default_rng(5)
    src, chunks, blocks, models, toks, _ = _batch(rng, [lambda r: [markov(r, n, 2000, 6) for n in (B + 100, 900, 5000)]])
    ref = np.concatenate(toks)
    # (chunk, byte offset in its payload, new bytes, expected status): magic, token count,
    # the word_end of block 0 (chunk 0 has two blocks), lane 0's state below L, a word
    for victim, where, new, expect in [(1, 0, b"x", {1}), (2, 4, b"\x01", {1}), (0, 16, b"\xff\xff\xff\x7f", {1}),
                                       (0, 24 + 2, b"\0\0", {2}), (2, 300, b"\x5a\xa5", {3, 4, 5})]:
        s = src.copy()
        off = int(chunks["src_offset"][victim]) + where
        s[off:off + len(new)] = np.frombuffer(new, np.uint8)
        out = np.zeros(len(ref), np.uint16)
        status = R1.emulate(s, chunks, blocks, models, out)
        assert int(status[victim]) in expect, (victim, where, status)
        for c in range(len(toks)):
            if c != victim:
                assert status[c] == 0
                a, n = int(chunks["out_offset"][c]), int(chunks["num_tokens"][c])
                np.testing.assert_array_equal(out[a:a + n], ref[a:a + n])


def test_kernel_emulation_checks_descriptors_and_models():
    rng = np.random.default_rng(6)
    src, chunks, blocks, models, toks, _ = _batch(rng, [lambda r: [markov(r, n, 500, 4) for n in (900, 5000)]])
    out = np.zeros(sum(len(t) for t in toks), np.uint16)
    for field, value, msg in [("src_bytes", len(src) + 1, r"chunk 1: source range .* lies outside src"),
                              ("model", 5, r"chunk 1: model index 5 out of range"),
                              ("out_offset", len(out), r"chunk 1: output range .* lies outside out")]:
        bad = chunks.copy()
        bad[field][1] = value
        with pytest.raises(ValueError, match=msg):
            R1.emulate(src, bad, blocks, models, out)
    with pytest.raises(ValueError, match="model 0 is a RansModel, not a Rans1Model"):
        R1.emulate(src, chunks, blocks, [_core.RansModel.build([toks[0]], 2)], out)
    with pytest.raises(ValueError, match="is not a rans1 decode image"):
        _core.rans1_emulate_gpu(src, chunks, blocks, [_core.RansModel.build([toks[0]], 2).device_image()], out)
    # a model for other token widths: status "bad header", no write outside the chunk
    st = R1.emulate(src, chunks, blocks, models, np.zeros(len(out), np.uint32))
    assert st.tolist() == [1, 1]


# ------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_rans1_dataset_roundtrip_and_groups(tmp_path, dtype):
    rng = np.random.default_rng(2)
    vocab = 30000 if dtype == "uint16" else 128256
    docs = [markov(rng, int(rng.integers(1, 9000)), vocab, 12, np.dtype(dtype)) for _ in range(60)]
    docs.append(rng.integers(0, np.iinfo(dtype).max, 3000, dtype=np.uint64).astype(dtype))  # incompressible
    with lio.DatasetWriter(tmp_path / "d", dtype=dtype, codec="rans1", chunk_tokens=3000, shard_tokens=120_000,
                           rans_model_tokens=50_000) as w:
        w.add_documents(docs)
    ds = lio.open_dataset(tmp_path / "d")
    allt = np.concatenate(docs)
    assert ds.codec == "rans1" and ds.num_tokens == len(allt)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), allt)
    for s, c in [(1, 5), (2999, 2), (50_000, 10_000), (len(allt) - 7, 7)]:
        np.testing.assert_array_equal(ds.read(s, c), allt[s:s + c])
    for i in (0, 33, len(docs) - 1):
        np.testing.assert_array_equal(ds.document(i), docs[i])
    r1 = ds.chunks["codec"] == F.CODEC_RANS1
    assert r1.sum() >= len(ds.chunks) - 2
    assert len(set(zip(ds.chunks["file"][r1].tolist(), ds.chunks["model"][r1].tolist()))) >= len(allt) // 50_000
    assert (ds.chunks["model"][~r1] == 0).all()
    assert isinstance(ds.model_of(int(np.flatnonzero(r1)[0])), _core.Rans1Model)
    assert ds.verify().ok
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["codec"] == "rans1" and manifest["rans_model_tokens"] == 50_000
    shard = (tmp_path / "d" / "shard-00000.lio").read_bytes()
    moff = int(ds.chunks["model"][0])
    assert shard[moff:moff + 8] == F.MODEL1_MAGIC


def _one_rans1_shard(tmp_path):
    rng = np.random.default_rng(4)
    docs = [markov(rng, 4000, 1000, 8) for _ in range(10)]
    with lio.DatasetWriter(tmp_path / "d", codec="rans1", chunk_tokens=4096, rans_model_tokens=1 << 30) as w:
        w.add_documents(docs)
    return lio.open_dataset(tmp_path / "d"), np.concatenate(docs), tmp_path / "d" / "shard-00000.lio"



def test_corrupt_payload_with_fixed_checksum_is_a_format_error(tmp_path):
    ds, allt, shard = _one_rans1_shard(tmp_path)
    c = ds.chunks[1]
    raw = bytearray(shard.read_bytes())
    off, n = int(c["offset"]), int(c["stored_bytes"])
    raw[off + n - 3] ^= 0x10
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    struct.pack_into("<Q", raw, hdr["table_offset"] + 1 * 48 + 32, F.checksum(bytes(raw[off:off + n])))
    reseal(shard, raw)
    ds = lio.open_dataset(tmp_path / "d")
    np.testing.assert_array_equal(ds.read(0, 4096), allt[:4096])
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio chunk 1 .*rans1 payload") as ei:
        ds.read(4096, 10)
    assert ei.value.chunk == 1
    assert [b.chunk for b in ds.verify().bad_chunks] == [1]


def test_corrupt_model_region_is_named(tmp_path):
    ds, _, shard = _one_rans1_shard(tmp_path)
    moff = int(ds.chunks["model"][0])
    raw = bytearray(shard.read_bytes())
    raw[moff + F.MODEL_HEADER_BYTES + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ds = lio.open_dataset(tmp_path / "d")
    with pytest.raises(lio.ChecksumError, match=rf"shard-00000.lio: rans model region @ offset {moff}: checksum"):
        ds.read(0, 10)


def test_a_rans_chunk_pointing_at_a_rans1_model_is_a_format_error(tmp_path):
    ds, _, shard = _one_rans1_shard(tmp_path)
    raw = bytearray(shard.read_bytes())
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    struct.pack_into("<H", raw, hdr["table_offset"] + 0 * 48 + 28, F.CODEC_RANS)
    reseal(shard, raw)
    ds = lio.open_dataset(tmp_path / "d")
    with pytest.raises(lio.FormatError, match="rans chunk whose model region holds a rans1 model"):
        ds.read(0, 10)


def test_pack_writes_rans1(tmp_path):
    from llmio_native.cli import main as cli_main

    rng = np.random.default_rng(12)
    words = [f"w{i}" for i in range(300)]
    text = "\n\n".join(" ".join(rng.choice(words, size=200)) for _ in range(60))
    (tmp_path / "in.txt").write_text(text)
    rc = cli_main(["pack", str(tmp_path / "in.txt"), "-o", str(tmp_path / "ds"), "--train-bpe", "600",
                   "--codec", "rans1", "--doc-sep", "blank"])
    assert rc in (0, None)
    ds = lio.open_dataset(tmp_path / "ds")
    assert ds.codec == "rans1" and (ds.chunks["codec"] == F.CODEC_RANS1).all()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json"))
    assert tok.decode(ds.document(0).tolist()) == text.split("\n\n")[0]


def test_loader_gpu_path_emulated_equals_cpu_loader(tmp_path):
    """TokenLoader's GPU decode path for a rans1 source (the kernel's host emulation in
    place of the launch, CPU tensors) yields exactly the CPU loader's batches."""
    import torch

    from llmio_native.loader.token_loader import emulate_gpu_decode

    rng = np.random.default_rng(13)
    docs = [markov(rng, int(rng.integers(50, 3000)), 900, 6) for _ in range(80)]
    with lio.DatasetWriter(tmp_path / "d", codec="rans1", chunk_tokens=1000, rans_model_tokens=20_000) as w:
        w.add_documents(docs)
    src = lio.open_dataset(tmp_path / "d")
    kw = dict(batch_size=6, seq_len=70, seed=9, steps=40, span_chunks=4, group_spans=3)

    def batches(ld):
        return [(x.clone(), y.clone()) for x, y in ld]

    cpu = batches(lio.TokenLoader(src, **kw))
    ld = emulate_gpu_decode(lio.TokenLoader(src, **kw))
    emu = batches(ld)
    assert len(cpu) == len(emu) == 40
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(cpu, emu))
    assert ld.stats()["gpu_decode_bytes"] > 0


# ------------------------------------------------------------------------------- GPU
cuda_ok = pytest.mark.skipif(
    not (lio._native.cuda_usable()[0] and __import__("torch").cuda.is_available()),
    reason="needs a CUDA GPU that llmio_native._cuda can use: " + lio._native.cuda_usable()[1])


@pytest.mark.cuda
@cuda_ok
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_gpu_decode_bit_exact(dtype):
    import torch

    rng = np.random.default_rng(8)
    makers = [lambda r: [markov(r, n, 5000, 8, dtype) for n in EDGE_SIZES + [5 * B] if n],
              lambda r: [r.integers(0, 60000, 7000).astype(dtype)]]
    src, chunks, blocks, models, toks, _ = _batch(rng, makers)
    ref = np.concatenate(toks)
    dec = R1.GpuDecoder("cuda")
    side = torch.cuda.Stream()
    tdt = torch.int16 if dtype == np.uint16 else torch.int32
    with torch.cuda.stream(side):
        dsrc = torch.from_numpy(src).to("cuda")
        out = torch.zeros(len(ref), dtype=tdt, device="cuda")
        status = dec.decode(dsrc, chunks, blocks, models, out, stream=side)
    side.synchronize()
    assert status.cpu().tolist() == [0] * len(toks)
    np.testing.assert_array_equal(out.cpu().numpy().view(dtype), ref)
    emu = np.zeros(len(ref), dtype)  # the emulation agrees with the kernel on corrupt input too
    bad = src.copy()
    bad[int(chunks["src_offset"][2]) + 40] ^= 0x77
    with torch.cuda.stream(side):
        status = dec.decode(torch.from_numpy(bad).cuda(), chunks, blocks, models, out, stream=side)
    side.synchronize()
    st = status.cpu().numpy()
    assert st.tolist() == R1.emulate(bad, chunks, blocks, models, emu).tolist()
    assert st[2] != 0 and (np.delete(st, 2) == 0).all()


# ------------------------------------------------------------------------------- the format, from its spec
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


def _bucket(r: int) -> int:
    if r < 128:
        return r
    e = r.bit_length() - 1
    return 128 + 8 * (e - 7) + ((r >> (e - 3)) & 7)


def _quantize(counts: list[int], bits: int) -> list[int]:
    """docs/format.md "Quantisation", written from the text."""
    M, k = 1 << bits, len(counts)
    T = sum(counts)
    f = [1 + (c * (M - k) // T if T else 0) for c in counts]
    f[counts.index(max(counts))] += M - sum(f)
    return f


def _ceil_log2(v: int) -> int:
    return 0 if v <= 1 else (v - 1).bit_length()


def test_serialised_model_and_decode_tables_follow_the_spec(sample):
    """A parser written from docs/format.md ("The rans1 codec") reads the serialised model,
    derives every context's table (contexts, quantisation, slot order) and finds them,
    slot by slot, in the decoder's image: the spec is complete and the code follows it."""
    _, m, _ = sample
    raw = m.serialize()
    version, tb, sb, cb, ns, exact = struct.unpack_from("<6I", raw)
    assert (version, tb, sb, cb, ns, exact) == (1, 2, m.scale_bits, m.ctx_bits, m.num_symbols, m.num_exact)
    nrb = _bucket(ns - 1) + 1
    nb = nrb + 8 * tb + 1
    pos = 24
    bucket_count = []
    for _ in range(nb):
        v, pos = _varint(raw, pos)
        bucket_count.append(v)
    for b in range(nrb):  # symbol lists: skip (rans' format)
        lo = b if b < 128 else (8 + (b - 128) % 8) << (7 + (b - 128) // 8 - 3)
        size = 1 if b < 128 else 1 << (7 + (b - 128) // 8 - 3)
        for _ in range(lo, min(ns, lo + size)):
            _, pos = _varint(raw, pos)
    cls0 = _bucket(exact) if exact < ns else nrb
    nctx = exact + (nrb - cls0) + 2
    assert nctx == m.num_contexts

    def context_of(r: int | None) -> int:
        if r is None:
            return nctx - 2
        return r if r < exact else exact + _bucket(r) - cls0

    img = m.device_image().astype(np.int64)
    ctx_off, slot_off = int(img[11]), int(img[12])
    slots = img[slot_off:].reshape(-1, 2)
    first = 0
    for c in range(nctx):
        k, pos = _varint(raw, pos)
        esc, pos = _varint(raw, pos)
        ranks, counts, prev = [], [], 0
        for i in range(k):
            d, pos = _varint(raw, pos)
            cnt, pos = _varint(raw, pos)
            prev = d if i == 0 else prev + d
            ranks.append(prev)
            counts.append(cnt + 1)
        cs = counts + [esc + 1]
        T, smallest = sum(cs), min(cs)
        bits = min(cb, max(_ceil_log2(2 * (k + 1)), min(_ceil_log2(T), _ceil_log2(-(-T // smallest)) + 4)))
        f = _quantize(cs, bits)
        assert int(img[ctx_off + c]) == first << 4 | bits, c
        want, cum = [], 0
        for r, fr in zip(ranks + [None], f):
            w0 = 0xFFFF if r is None else r | context_of(r) << 16
            want += [(w0, fr | (s << 16)) for s in range(fr)]
            cum += fr
        got = [tuple(x) for x in slots[first:first + (1 << bits)].tolist()]
        assert got == want, c
        first += 1 << bits
    assert pos == len(raw) and first == m.num_slots
    # the order-0 part: quantised bucket counts
    f0 = _quantize([c for c in bucket_count], sb)
    bucket_off = int(img[5])
    assert img[bucket_off:bucket_off + 4 * nb:4].tolist() == f0
