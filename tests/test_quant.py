"""INT8 blockwise quantization (CPU oracle of the gradient hook's kernels)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from llmio_native import _core

BLOCK = _core.QUANT_BLOCK


def quantize(x: np.ndarray, residual: np.ndarray | None):
    n = x.size
    codes = np.empty(n, np.int8)
    scales = np.empty(-(-n // BLOCK), np.float32)
    _core.quantize_blocks_ref(x, residual, codes, scales)
    return codes, scales


def dequantize(codes, scales):
    out = np.empty(codes.size, np.float32)
    _core.dequantize_blocks_ref(codes, scales, out)
    return out


def numpy_quantize(v: np.ndarray):
    """Independent numpy reference for finite blocks."""
    n = v.size
    codes = np.zeros(n, np.int8)
    scales = np.zeros(-(-n // BLOCK), np.float32)
    for b in range(scales.size):
        blk = v[b * BLOCK : (b + 1) * BLOCK]
        s = np.float32(np.abs(blk).max() / np.float32(127))
        scales[b] = s
        if s != 0:
            codes[b * BLOCK : (b + 1) * BLOCK] = np.clip(np.rint(blk / s), -127, 127).astype(np.int8)
    return codes, scales


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 4096 + 3])
def test_matches_numpy_and_error_bound(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    codes, scales = quantize(x, None)
    ec, es = numpy_quantize(x)
    np.testing.assert_array_equal(scales, es)
    np.testing.assert_array_equal(codes, ec)
    deq = dequantize(codes, scales)
    bound = np.repeat(scales, BLOCK)[:n] / 2
    assert np.all(np.abs(deq - x) <= bound * (1 + 1e-6))
    assert np.abs(codes).max() == 127  # the absmax element maps to +-127


def test_error_feedback_carries_the_error_forward():
    rng = np.random.default_rng(1)
    n = 1000
    res = np.zeros(n, np.float32)
    total_in = np.zeros(n, np.float64)
    total_out = np.zeros(n, np.float64)
    for _ in range(200):
        x = rng.standard_normal(n).astype(np.float32)
        codes, scales = quantize(x, res)
        total_in += x
        total_out += dequantize(codes, scales)
    # With feedback the accumulated error is the final residual (bounded), not a sum of 200 errors.
    np.testing.assert_allclose(total_out + res, total_in, atol=1e-3)
    assert np.abs(total_out - total_in).max() < 0.05


def test_zero_and_denormal_blocks():
    x = np.zeros(300, np.float32)
    x[260] = np.float32(1e-44)  # denormal: absmax / 127 underflows to 0
    res = np.zeros(300, np.float32)
    codes, scales = quantize(x, res)
    assert scales[0] == 0 and scales[1] == 0 and not codes.any()
    assert res[260] == x[260]  # kept for the next step, not lost


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_block_becomes_nan_and_residual_resets(bad):
    x = np.ones(600, np.float32)
    x[300] = bad
    res = np.full(600, 0.25, np.float32)
    codes, scales = quantize(x, res)
    assert np.isnan(scales[1]) and np.isfinite(scales[0]) and np.isfinite(scales[2])
    deq = dequantize(codes, scales)
    assert np.isnan(deq[256:512]).all() and np.isfinite(deq[:256]).all()
    assert (res[256:512] == 0).all() and np.isfinite(res).all()


def test_dequant_sum_requant_is_the_average():
    rng = np.random.default_rng(2)
    W, n = 3, 700
    xs = rng.standard_normal((W, n)).astype(np.float32)
    cw = np.empty((W, n), np.int8)
    sw = np.empty((W, -(-n // BLOCK)), np.float32)
    for r in range(W):
        cw[r], sw[r] = quantize(xs[r], None)
    res = np.zeros(n, np.float32)
    codes = np.empty(n, np.int8)
    scales = np.empty(sw.shape[1], np.float32)
    _core.dequant_sum_requant_ref(cw, sw, res, codes, scales)
    deq_sum = sum(dequantize(cw[r], sw[r]).astype(np.float32) for r in range(W)) / np.float32(W)
    out = dequantize(codes, scales)
    np.testing.assert_allclose(out + res, deq_sum, atol=1e-6)
    assert np.abs(out - xs.mean(0)).max() < (sw.max() + scales.max())  # within the quantization steps
    # A NaN block from any rank poisons that block only.
    sw[1, 0] = np.nan
    _core.dequant_sum_requant_ref(cw, sw, res, codes, scales)
    assert np.isnan(scales[0]) and np.isfinite(scales[1:]).all()


def test_outputs_must_be_exact_dtype():
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError):
        _core.quantize_blocks_ref(x, None, np.empty(10, np.int16), np.empty(1, np.float32))
    with pytest.raises(TypeError):
        _core.quantize_blocks_ref(x, np.zeros(10, np.float64), np.empty(10, np.int8), np.empty(1, np.float32))
    with pytest.raises(ValueError):
        _core.quantize_blocks_ref(x, None, np.empty(9, np.int8), np.empty(1, np.float32))


# ---------------------------------------------------------------- deterministic mode (shared scales)


def np_block_absmax(v: np.ndarray) -> np.ndarray:
    """Per-block max |v|, +inf for a block holding inf/NaN."""
    nb = -(-v.size // BLOCK)
    out = np.empty(nb, np.float32)
    for b in range(nb):
        blk = v[b * BLOCK:(b + 1) * BLOCK]
        out[b] = np.abs(blk).max() if np.isfinite(blk).all() else np.inf
    return out


def np_quantize_shared(v: np.ndarray, gmax: np.ndarray):
    """numpy model of quantize_blocks_shared_ref on v = x + residual: codes, scales, new residual."""
    codes = np.zeros(v.size, np.int8)
    scales = np.empty(gmax.size, np.float32)
    res = np.empty_like(v)
    for b in range(gmax.size):
        sl = slice(b * BLOCK, (b + 1) * BLOCK)
        if not np.isfinite(gmax[b]):
            scales[b] = np.nan
            res[sl] = 0
            continue
        s = np.float32(gmax[b] / np.float32(127))
        scales[b] = s
        if s == 0:
            res[sl] = v[sl]
            continue
        q = np.clip(np.rint(v[sl] / s), -127, 127).astype(np.int8)
        codes[sl] = q
        res[sl] = v[sl] - q.astype(np.float32) * s
    return codes, scales, res


def special_inputs(W: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xs = (rng.standard_normal((W, n)) * np.float32(3)).astype(np.float32)
    xs[:, :BLOCK] = 0  # an all-zero block
    xs[:, BLOCK:2 * BLOCK] = 0
    xs[0, BLOCK + 5] = np.float32(1e-44)  # denormal: the shared scale underflows to 0
    xs[:, 2 * BLOCK + 7] = np.float32(127 * 0.5) * np.arange(1, W + 1)  # exact halves: round half to even
    return xs


@pytest.mark.parametrize("W", [2, 3])
def test_block_absmax_ref_matches_numpy_and_leaves_residual(W):
    xs = special_inputs(W, 1100, 5)
    res = np.random.default_rng(6).standard_normal(1100).astype(np.float32)
    res_copy = res.copy()
    xs[1, 900] = np.nan
    for r in range(W):
        am = np.empty(-(-1100 // BLOCK), np.float32)
        _core.block_absmax_ref(xs[r], res, am)
        np.testing.assert_array_equal(am, np_block_absmax(xs[r] + res))
        assert (am[3] == np.inf) == (r == 1)
    np.testing.assert_array_equal(res, res_copy)  # read only


@pytest.mark.parametrize("W", [2, 3])
def test_shared_scale_quantize_and_integer_sum_match_numpy(W):
    n = 1280
    xs = special_inputs(W, n, W)
    xs[W - 1, 1000] = np.inf  # block 3 non-finite on one rank -> NaN everywhere
    ress = [np.random.default_rng(10 + r).standard_normal(n).astype(np.float32) * np.float32(0.01) for r in range(W)]
    for r in range(W):
        ress[r][:2 * BLOCK] = 0  # blocks 0 (zeros) and 1 (one denormal) stay that small
    vs = [xs[r] + ress[r] for r in range(W)]
    gmax = np.max([np_block_absmax(v) for v in vs], axis=0)  # the all-reduce MAX
    codes_w = np.empty((W, n), np.int8)
    for r in range(W):
        codes = np.empty(n, np.int8)
        scales = np.empty(gmax.size, np.float32)
        res = ress[r].copy()
        _core.quantize_blocks_shared_ref(xs[r], res, gmax, codes, scales)
        ec, es, er = np_quantize_shared(vs[r], gmax)
        np.testing.assert_array_equal(codes, ec)
        np.testing.assert_array_equal(scales, es)
        np.testing.assert_array_equal(res, er)
        codes_w[r] = codes
        if r == 0:
            assert res[BLOCK + 5] == np.float32(1e-44)  # zero-scale block: the residual keeps v
    assert scales[0] == 0 and scales[1] == 0 and np.isnan(scales[3]) and np.isfinite(scales[4])
    assert (codes_w[:, 3 * BLOCK:4 * BLOCK] == 0).all() and np.abs(codes_w).max() == 127
    # Owner: exact int32 sum, / W (the mean code), * scale + residual, requantized with its own scale.
    owner_res = np.random.default_rng(3).standard_normal(n).astype(np.float32) * np.float32(0.01)
    s_int = codes_w.astype(np.int32).sum(0)
    v2 = (s_int.astype(np.float32) / np.float32(W)) * np.repeat(es, BLOCK)[:n] + owner_res
    ec2, es2 = numpy_quantize(np.nan_to_num(v2, nan=0.0))
    es2[3] = np.nan
    ec2[3 * BLOCK:4 * BLOCK] = 0
    outs = []
    for perm in (list(range(W)), list(range(W))[::-1]):  # arrival order does not matter
        r2 = owner_res.copy()
        c2 = np.empty(n, np.int8)
        s2 = np.empty(gmax.size, np.float32)
        _core.dequant_sum_requant_shared_ref(np.ascontiguousarray(codes_w[perm]), es, r2, c2, s2)
        outs.append((c2.tobytes(), s2.tobytes(), r2.tobytes()))
        np.testing.assert_array_equal(c2, ec2)
        np.testing.assert_array_equal(s2, es2)
        deq = dequantize(c2, s2)
        fin = np.isfinite(v2)
        np.testing.assert_array_equal(r2[fin], (v2 - deq)[fin])  # the owner's error kept
        assert (r2[~fin] == 0).all()
    assert outs[0] == outs[1]


def test_shared_ref_rejects_bad_sizes():
    x = np.ones(300, np.float32)
    with pytest.raises(ValueError):
        _core.block_absmax_ref(x, None, np.empty(1, np.float32))
    with pytest.raises(ValueError):
        _core.quantize_blocks_shared_ref(x, None, np.ones(1, np.float32), np.empty(300, np.int8),
                                         np.empty(2, np.float32))
    with pytest.raises(ValueError):
        _core.dequant_sum_requant_shared_ref(np.zeros((2, 300), np.int8), np.ones(1, np.float32), None,
                                             np.empty(300, np.int8), np.empty(2, np.float32))


# ---------------------------------------------------------------- values near the fp32 maximum (issue 9)

BIG = np.float32(3e38)  # two of these overflow fp32 (max 3.4e38) when summed


@pytest.mark.parametrize("W", [2, 3])
def test_dequant_sum_requant_near_fp32_max_does_not_overflow(W):
    """W ranks holding ~3e38 in the same block: the average is ~3e38, not inf/NaN. The sum of
    the dequantized copies overflowed before the division by W."""
    n = 2 * BLOCK
    xs = np.zeros((W, n), np.float32)
    xs[:, :BLOCK] = BIG  # block 0: every rank near the maximum
    xs[:, 7] = -BIG
    xs[:, BLOCK:] = np.float32(1.5)  # block 1: ordinary values
    cw = np.empty((W, n), np.int8)
    sw = np.empty((W, 2), np.float32)
    for r in range(W):
        cw[r], sw[r] = quantize(xs[r], None)
    res = np.zeros(n, np.float32)
    codes = np.empty(n, np.int8)
    scales = np.empty(2, np.float32)
    _core.dequant_sum_requant_ref(cw, sw, res, codes, scales)
    assert np.isfinite(scales).all() and np.isfinite(res).all(), scales
    out = dequantize(codes, scales)
    np.testing.assert_allclose(out[:BLOCK].astype(np.float64), xs[0, :BLOCK].astype(np.float64), rtol=1e-2)
    np.testing.assert_allclose(out[BLOCK:], 1.5, rtol=1e-2)
    # The exact formula: each copy divided by W, summed in rank order.
    v = np.zeros(n, np.float32)
    for r in range(W):
        v += (cw[r].astype(np.float32) * np.repeat(sw[r], BLOCK)) / np.float32(W)
    np.testing.assert_array_equal(out + res, v)


@pytest.mark.parametrize("W", [2, 3])
def test_shared_integer_sum_near_fp32_max_does_not_overflow(W):
    """Deterministic mode: the int32 code sum times the shared scale overflowed for W copies
    near the maximum; the mean code (sum / W, at most 127) times the scale does not."""
    n = BLOCK
    xs = np.full((W, n), BIG, np.float32)
    xs[:, 3] = -BIG
    am = np.empty(1, np.float32)
    gmax = np.zeros(1, np.float32)
    for r in range(W):
        _core.block_absmax_ref(xs[r], None, am)
        gmax = np.maximum(gmax, am)
    codes_w = np.empty((W, n), np.int8)
    for r in range(W):
        sc = np.empty(1, np.float32)
        _core.quantize_blocks_shared_ref(xs[r], None, gmax, codes_w[r], sc)
    res = np.zeros(n, np.float32)
    c2 = np.empty(n, np.int8)
    s2 = np.empty(1, np.float32)
    _core.dequant_sum_requant_shared_ref(codes_w, sc, res, c2, s2)
    assert np.isfinite(s2).all() and np.isfinite(res).all(), s2
    out = dequantize(c2, s2)
    np.testing.assert_allclose(out.astype(np.float64), xs[0].astype(np.float64), rtol=1e-2)


# ---------------------------------------------------------------------- host emulation of the CUDA kernels
#
# _core.int8_*_emulate run the kernels' per-lane code (csrc/quant/int8_device.hpp) in loops
# over (block, lane) with the warp collectives emulated: each must equal the CPU oracle bit
# for bit, on every machine (the kernels themselves are checked on a GPU, test_quant_cuda.py).
#
# _core.int8_*_fast (csrc/quant/int8_fast.cpp: vectorised, fused, multi-threaded) take the
# same arguments and must give the same bits: every emulation test below runs once per
# implementation, the fast path at every dispatch level this CPU has (forced), so CI
# exercises scalar, AVX2 and AVX-512 wherever the runner has them.

import torch  # noqa: E402  (only the emulation tests convert through torch)

DTYPE_CODES = _core.INT8_DTYPES
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
F32_MAX = np.finfo(np.float32).max


def edge_values(n: int, seed: int, nonfinite: bool = True, big: bool = False) -> np.ndarray:
    """Random values with zero blocks, denormals, exact halves, values near FLT_MAX and
    inf / NaN blocks, placed where the size allows (a partial last block when n % 256)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.uniform(0.01, 100)).astype(np.float32)
    blocks = -(-n // BLOCK)
    if blocks > 1:
        x[:BLOCK] = 0  # a zero block
    if blocks > 2:
        x[BLOCK:2 * BLOCK] = np.float32(1e-39) * rng.standard_normal(BLOCK).astype(np.float32)  # denormals
        x[BLOCK + 3] = np.float32(1e-44)
    if blocks > 3:
        blk = np.float32(127) * np.float32(0.25) * np.arange(-3, 5, dtype=np.float32)  # halves
        x[2 * BLOCK:2 * BLOCK + blk.size] = blk
    if blocks > 4 and big:
        x[3 * BLOCK:4 * BLOCK] = F32_MAX * rng.uniform(-1, 1, BLOCK).astype(np.float32)
        x[3 * BLOCK + 1] = F32_MAX
    if blocks > 5 and nonfinite:
        x[4 * BLOCK + 9] = np.inf
    if blocks > 6 and nonfinite:
        x[5 * BLOCK + 17] = np.nan
        x[5 * BLOCK + 18] = -np.inf
    if nonfinite and n % BLOCK and blocks > 1:
        x[-1] = np.nan  # a non-finite partial last block
    return x


def as_bucket(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the bucket as the kernels read it: float32 or the 16-bit bits, its values as float32)."""
    t = torch.from_numpy(x).to(TORCH_DTYPES[dtype])
    f32 = t.float().numpy()
    raw = f32 if dtype == "float32" else t.view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(raw), f32


def dequantize_packed(gathered: np.ndarray, world: int, shard: int) -> np.ndarray:
    """The CPU oracle's fp32 values of ``world`` packed copies (codes of ``shard`` values, then
    their block scales, per rank), concatenated."""
    gv = gathered.reshape(world, -1)
    full = np.empty(world * shard, np.float32)
    for r in range(world):
        _core.dequantize_blocks_ref(np.ascontiguousarray(gv[r, :shard]).view(np.int8),
                                    np.ascontiguousarray(gv[r, shard:]).view(np.float32),
                                    full[r * shard:(r + 1) * shard])
    return full


def oracle_packed(xf: np.ndarray, res: np.ndarray, n_pad: int, world: int) -> np.ndarray:
    """quantize_blocks_ref of xf (zero-padded to n_pad), packed per destination rank; res updated."""
    xp = np.zeros(n_pad, np.float32)
    xp[:xf.size] = xf
    codes = np.empty(n_pad, np.int8)
    scales = np.empty(n_pad // BLOCK, np.float32)
    _core.quantize_blocks_ref(xp, res, codes, scales)
    shard = n_pad // world
    sb = shard // BLOCK
    return np.concatenate([np.concatenate([codes[r * shard:(r + 1) * shard].view(np.uint8),
                                           scales[r * sb:(r + 1) * sb].view(np.uint8)]) for r in range(world)])


def check_quantize_pack(impl, raw: np.ndarray, dtype: str, xf: np.ndarray, n: int, n_pad: int, world: int,
                        res0: np.ndarray) -> None:
    """``impl.quantize_pack`` of the bucket ``raw`` (read as ``xf``) from residual ``res0``: the
    packed bytes and the new residual equal the oracle's, bit for bit."""
    exp_res = res0.copy()
    expected = oracle_packed(xf, exp_res, n_pad, world)
    res = res0.copy()
    send = np.full(expected.size, 0xAB, np.uint8)
    impl.quantize_pack(raw, DTYPE_CODES[dtype], n, n_pad, world, res, send)
    np.testing.assert_array_equal(send, expected)
    np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))


def f32_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


KERNELS = ("quantize_pack", "dequant_sum_requant", "unpack_dequantize", "block_absmax", "quantize_pack_shared",
           "dequant_sum_requant_shared")
IMPLS = ["emulate", "fast-scalar", "fast-avx2", "fast-avx512"]


class Impl:
    """One implementation of the six kernels: ``impl.quantize_pack(...)`` etc."""

    def __init__(self, suffix: str) -> None:
        for k in KERNELS:
            setattr(self, k, getattr(_core, f"int8_{k}_{suffix}"))


@pytest.fixture(params=IMPLS)
def impl(request):
    """The emulation, or the fast path forced to one level (skipped where the CPU lacks it)."""
    if request.param == "emulate":
        yield Impl("emulate")
        return
    isa = request.param.split("-", 1)[1]
    if isa not in _core.int8_fast_isas():
        pytest.skip(f"this CPU has no {isa} (supported: {_core.int8_fast_isas()})")
    prev = _core.int8_fast_set_isa(isa)
    try:
        assert _core.int8_fast_isa() == isa
        yield Impl("fast")
    finally:
        _core.int8_fast_set_isa(prev)


SHAPES = [(1, 1), (7, 2), (255, 3), (256, 1), (257, 4), (1000, 5), (2048, 2), (7 * 256 + 17, 3), (4096 + 3, 5),
          (3 * 256 * 5, 5)]


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("n,world", SHAPES)
@pytest.mark.parametrize("big", [False, True])
def test_quantize_pack_emulation_bit_identical(dtype, n, world, big, impl):
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    raw, xf = as_bucket(edge_values(n, n + world, big=big), dtype)
    res0 = (np.random.default_rng(n).standard_normal(n_pad) * np.float32(0.01)).astype(np.float32)
    res0[:BLOCK] = 0
    check_quantize_pack(impl, raw, dtype, xf, n, n_pad, world, res0)


def packed_copies(world: int, shard: int, seed: int, big: bool) -> np.ndarray:
    """world packed slots of one shard, as ranks send them (the oracle's quantization)."""
    slots = []
    for r in range(world):
        x = edge_values(shard, seed + r, nonfinite=(r == world - 1), big=big)
        slots.append(oracle_packed(x, np.zeros(shard, np.float32), shard, 1))
    return np.concatenate(slots)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("sblocks", [1, 3, 8])
@pytest.mark.parametrize("big", [False, True])
def test_dequant_sum_requant_emulation_bit_identical(world, sblocks, big, impl):
    shard = sblocks * BLOCK
    recv = packed_copies(world, shard, 40 + world, big)
    rv = recv.reshape(world, -1)
    codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
    scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
    res0 = (np.random.default_rng(world).standard_normal(shard) * np.float32(0.01)).astype(np.float32)
    exp_res = res0.copy()
    c = np.empty(shard, np.int8)
    s = np.empty(sblocks, np.float32)
    _core.dequant_sum_requant_ref(codes_w, scales_w, exp_res, c, s)
    expected = np.concatenate([c.view(np.uint8), s.view(np.uint8)])
    res = res0.copy()
    own = np.full(expected.size, 0xAB, np.uint8)
    impl.dequant_sum_requant(recv, world, shard, res, own)
    np.testing.assert_array_equal(own, expected)
    np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n_less", [0, 1, 255, 300])
def test_unpack_dequantize_emulation_bit_identical(dtype, world, n_less, impl):
    shard = 3 * BLOCK
    n = max(1, world * shard - n_less)
    gathered = packed_copies(world, shard, 70 + world, big=True)
    full = dequantize_packed(gathered, world, shard)
    expected, _ = as_bucket(full[:n], dtype)
    isz = 4 if dtype == "float32" else 2
    out = np.full(n + 3, 0x5A5A5A5A if isz == 4 else 0x5A5A, np.uint32 if isz == 4 else np.uint16)
    impl.unpack_dequantize(gathered, world, shard, out[:n], DTYPE_CODES[dtype], n)
    got = out[:n].view(np.float32) if isz == 4 else torch.from_numpy(out[:n].view(np.int16)).view(
        TORCH_DTYPES[dtype]).float().numpy()
    want = expected.view(np.float32) if isz == 4 else torch.from_numpy(expected.view(np.int16)).view(
        TORCH_DTYPES[dtype]).float().numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    exp_bits = expected.view(np.uint32 if isz == 4 else np.uint16)
    np.testing.assert_array_equal(out[:n][~nan], exp_bits[~nan])  # bits, NaN payloads aside
    assert (out[n:] == out[-1]).all()  # nothing past n


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [5, 1000, 7 * 256 + 17])
def test_deterministic_emulations_bit_identical(dtype, world, n, impl):
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    nb = n_pad // BLOCK
    shard = n_pad // world
    sb = shard // BLOCK
    xs, xfs, ress = [], [], []
    for r in range(world):
        raw, xf = as_bucket(edge_values(n, 90 + r, nonfinite=(r == world - 1), big=(r == 0)), dtype)
        xs.append(raw)
        xp = np.zeros(n_pad, np.float32)
        xp[:n] = xf
        xfs.append(xp)
        ress.append((np.random.default_rng(r).standard_normal(n_pad) * np.float32(0.01)).astype(np.float32))
    # block absmax, then the all-reduce MAX
    ams = []
    for r in range(world):
        exp_am = np.empty(nb, np.float32)
        _core.block_absmax_ref(xfs[r], ress[r], exp_am)
        am = np.empty(nb, np.float32)
        res_before = ress[r].copy()
        impl.block_absmax(xs[r], DTYPE_CODES[dtype], n, n_pad, ress[r], am)
        np.testing.assert_array_equal(f32_bits(am), f32_bits(exp_am))
        np.testing.assert_array_equal(ress[r], res_before)
        ams.append(am)
    gmax = np.max(ams, axis=0).astype(np.float32)
    # shared-scale quantize + pack (codes only)
    sends = []
    for r in range(world):
        exp_res = ress[r].copy()
        codes = np.empty(n_pad, np.int8)
        exp_scales = np.empty(nb, np.float32)
        _core.quantize_blocks_shared_ref(xfs[r], exp_res, gmax, codes, exp_scales)
        res = ress[r].copy()
        send = np.full(n_pad, 0xAB, np.uint8)
        scales = np.empty(nb, np.float32)
        impl.quantize_pack_shared(xs[r], DTYPE_CODES[dtype], n, n_pad, world, res, gmax, send, scales)
        np.testing.assert_array_equal(send, codes.view(np.uint8))  # [world][shard]: the same order
        np.testing.assert_array_equal(f32_bits(scales), f32_bits(exp_scales))
        np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))
        sends.append(send.reshape(world, shard))
    # the owner of each shard: exact integer sum, requantized
    for owner in range(world):
        recv = np.ascontiguousarray(np.stack([sends[r][owner] for r in range(world)]))
        sh_scales = np.ascontiguousarray(scales[owner * sb:(owner + 1) * sb])
        res0 = (np.random.default_rng(owner + 7).standard_normal(shard) * np.float32(0.01)).astype(np.float32)
        exp_res = res0.copy()
        c = np.empty(shard, np.int8)
        s = np.empty(sb, np.float32)
        _core.dequant_sum_requant_shared_ref(recv.view(np.int8), sh_scales, exp_res, c, s)
        res = res0.copy()
        own = np.empty(shard + 4 * sb, np.uint8)
        impl.dequant_sum_requant_shared(recv.reshape(-1), world, shard, sh_scales, res, own)
        np.testing.assert_array_equal(own, np.concatenate([c.view(np.uint8), s.view(np.uint8)]))
        np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))


def test_emulations_check_arguments_like_the_kernels():
    f32 = np.zeros(512, np.float32)
    u8 = np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match="n_pad=500"):
        _core.int8_quantize_pack_emulate(f32, 0, 10, 500, 2, f32[:500], u8)
    with pytest.raises(ValueError, match="dtype"):
        _core.int8_quantize_pack_emulate(f32, 5, 10, 512, 2, f32, u8)
    with pytest.raises(ValueError, match="world"):
        _core.int8_quantize_pack_emulate(f32, 0, 10, 512, 0, f32, u8)
    with pytest.raises(ValueError, match="shard"):
        _core.int8_dequant_sum_requant_emulate(u8, 2, 100, f32[:100], u8[:104])
    with pytest.raises(ValueError, match="exceeds"):
        _core.int8_unpack_dequantize_emulate(u8[:2 * 260], 2, 256, f32, 0, 513)
    with pytest.raises(ValueError, match=r"send must be .* 520 items .* got 4096"):
        _core.int8_quantize_pack_emulate(f32, 0, 10, 512, 2, f32, u8)
    with pytest.raises(ValueError, match="residual must be 16-byte aligned"):
        r = np.zeros(513, np.float32)[1:]
        _core.int8_quantize_pack_emulate(f32, 0, 10, 512, 2, r, u8[:520])
    assert DTYPE_CODES == {"float32": 0, "bfloat16": 1, "float16": 2}


# ---------------------------------------------------------------------- the fast CPU path only

def test_fast_checks_arguments_like_the_kernels():
    f32 = np.zeros(512, np.float32)
    u8 = np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match="int8_quantize_pack_fast: .*n_pad=500"):
        _core.int8_quantize_pack_fast(f32, 0, 10, 500, 2, f32[:500], u8)
    with pytest.raises(ValueError, match="int8_dequant_sum_requant_fast: shard"):
        _core.int8_dequant_sum_requant_fast(u8, 2, 100, f32[:100], u8[:104])
    with pytest.raises(ValueError, match=r"int8_quantize_pack_fast: send must be .* 520 items .* got 4096"):
        _core.int8_quantize_pack_fast(f32, 0, 10, 512, 2, f32, u8)
    with pytest.raises(ValueError, match="int8_unpack_dequantize_fast: n=513 exceeds"):
        _core.int8_unpack_dequantize_fast(u8[:2 * 260], 2, 256, f32, 0, 513)


def test_fast_isa_and_thread_controls():
    isas = _core.int8_fast_isas()
    assert isas[0] == "scalar" and set(isas) <= {"scalar", "avx2", "avx512"}
    prev = _core.int8_fast_isa()
    if not os.environ.get("LLMIO_INT8_ISA"):
        assert prev == isas[-1]  # the best level unless forced
    with pytest.raises(ValueError, match="unknown INT8 kernel level 'sse9'"):
        _core.int8_fast_set_isa("sse9")
    for isa in isas:
        assert _core.int8_fast_set_isa(isa) in isas
        assert _core.int8_fast_isa() == isa
    _core.int8_fast_set_isa(prev)
    t = _core.int8_fast_threads()
    assert t >= 1
    with pytest.raises(ValueError, match="1..64, got 0"):
        _core.int8_fast_set_threads(0)
    assert _core.int8_fast_set_threads(3) == t and _core.int8_fast_threads() == 3
    _core.int8_fast_set_threads(t)


def test_fast_isa_forced_by_environment():
    import subprocess
    import sys
    code = "from llmio_native import _core; print(_core.int8_fast_isa())"
    for isa in _core.int8_fast_isas():
        env = dict(os.environ, LLMIO_INT8_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == isa
    env = dict(os.environ, LLMIO_INT8_ISA="avx9000")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown INT8 kernel level 'avx9000'" in out.stderr


def edge_positions(n_pad: int, seed: int) -> np.ndarray:
    """Blocks whose absmax sits at a block or vector edge (lanes 0, 7, 8, 15, 16, 31, 255),
    ties of +/-absmax, -0.0 blocks, values at exact half-codes, and denormal-only blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n_pad).astype(np.float32)
    nb = n_pad // BLOCK
    for b in range(nb):
        blk = x[b * BLOCK:(b + 1) * BLOCK]
        kind = b % 8
        if kind < 5:
            pos = (0, 7, 8, 15, 255)[kind] if kind < 5 else 0
            blk[pos] = np.float32(9.5) * (1 if b % 2 else -1)
        elif kind == 5:
            blk[16], blk[31] = np.float32(3.0), np.float32(-3.0)  # a tie of +/- absmax
        elif kind == 6:
            blk[:] = -0.0
        else:
            blk[:] = np.float32(1e-41) * rng.integers(-127, 128, BLOCK).astype(np.float32)
    return x


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fast_large_bucket_threads_bit_identical(threads):
    """A bucket large enough to be split over the pool: every level and thread count gives
    the oracle's bits (workers take the caller's MXCSR)."""
    world = 2
    n = 3 * 1024 * BLOCK + 77  # > 1024 blocks per thread-task: threads share it
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    shard = n_pad // world
    x = edge_positions(n_pad, 3)[:n].copy()
    x[12345] = np.nan
    res0 = (np.random.default_rng(5).standard_normal(n_pad) * np.float32(0.01)).astype(np.float32)
    exp_res = res0.copy()
    expected = oracle_packed(x, exp_res, n_pad, world)
    # the owner's step on two copies, and the final dequantization, from the oracle
    recv = np.concatenate([expected.reshape(world, -1)[0], expected.reshape(world, -1)[0]])
    rv = recv.reshape(world, -1)
    ress0 = (np.random.default_rng(6).standard_normal(shard) * np.float32(0.01)).astype(np.float32)
    exp_ress = ress0.copy()
    c = np.empty(shard, np.int8)
    s = np.empty(shard // BLOCK, np.float32)
    _core.dequant_sum_requant_ref(np.ascontiguousarray(rv[:, :shard]).view(np.int8),
                                  np.ascontiguousarray(rv[:, shard:]).view(np.float32), exp_ress, c, s)
    exp_own = np.concatenate([c.view(np.uint8), s.view(np.uint8)])
    exp_out = dequantize_packed(np.concatenate([exp_own, exp_own]), world, shard)[:n]
    prev_isa, prev_t = _core.int8_fast_isa(), _core.int8_fast_set_threads(threads)
    try:
        for isa in _core.int8_fast_isas():
            _core.int8_fast_set_isa(isa)
            res = res0.copy()
            send = np.empty_like(expected)
            _core.int8_quantize_pack_fast(x, 0, n, n_pad, world, res, send)
            np.testing.assert_array_equal(send, expected, err_msg=isa)
            np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res), err_msg=isa)
            ress = ress0.copy()
            own = np.empty_like(exp_own)
            _core.int8_dequant_sum_requant_fast(recv, world, shard, ress, own)
            np.testing.assert_array_equal(own, exp_own, err_msg=isa)
            np.testing.assert_array_equal(f32_bits(ress), f32_bits(exp_ress), err_msg=isa)
            out = np.empty(n, np.float32)
            _core.int8_unpack_dequantize_fast(np.concatenate([own, own]), world, shard, out, 0, n)
            np.testing.assert_array_equal(f32_bits(out), f32_bits(exp_out), err_msg=isa)
    finally:
        _core.int8_fast_set_isa(prev_isa)
        _core.int8_fast_set_threads(prev_t)


def test_fast_edge_positions_bit_identical(impl):
    """absmax at block and vector-width edges, -0.0 blocks, denormal blocks (per level)."""
    world = 1
    n_pad = 16 * BLOCK
    for n in (n_pad, n_pad - 1, n_pad - 9, n_pad - 17):  # partial last blocks, not a multiple of 8 or 16
        x = edge_positions(n_pad, n)[:n].copy()
        res0 = (np.random.default_rng(n).standard_normal(n_pad) * np.float32(1e-3)).astype(np.float32)
        res0[6 * BLOCK:7 * BLOCK] = -0.0  # a -0.0 block stays -0.0 + -0.0 = -0.0 (residual kept)
        exp_res = res0.copy()
        expected = oracle_packed(x, exp_res, n_pad, world)
        res = res0.copy()
        send = np.empty_like(expected)
        impl.quantize_pack(x, 0, n, n_pad, world, res, send)
        np.testing.assert_array_equal(send, expected)
        np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))


def near_half_codes(nblocks: int, seed: int) -> np.ndarray:
    """Blocks whose values sit at, or a few ulps either side of, (k + 1/2) * scale for the
    block's own scale = absmax / 127: where a reciprocal multiply and the oracle's division can
    round to different codes (the fast path must detect them and divide)."""
    rng = np.random.default_rng(seed)
    x = np.empty(nblocks * BLOCK, np.float32)
    for b in range(nblocks):
        absmax = np.float32(rng.uniform(0.5, 2.0) * 10.0 ** rng.integers(-30, 30))
        scale = np.float32(absmax / np.float32(127))
        k = rng.integers(-127, 127, BLOCK).astype(np.float32)
        v = ((k + np.float32(0.5)) * scale).astype(np.float32)
        steps = rng.integers(-3, 4, BLOCK)
        for s_ in (-1, 1):
            sel = np.sign(steps) == s_
            for _ in range(3):
                v[sel & (np.abs(steps) > _)] = np.nextafter(v[sel & (np.abs(steps) > _)], np.float32(s_ * np.inf))
        v = np.clip(v, -absmax, absmax)
        v[0] = absmax  # the block's absmax, so its scale is the one aimed at
        x[b * BLOCK:(b + 1) * BLOCK] = v
    return x


def test_fast_near_half_codes_bit_identical(impl):
    """Quantization at and around the rounding boundaries, for scales over 60 decades."""
    n = 64 * BLOCK
    x = near_half_codes(64, 11)
    res0 = np.zeros(n, np.float32)
    exp_res = res0.copy()
    expected = oracle_packed(x, exp_res, n, 1)
    res = res0.copy()
    send = np.empty_like(expected)
    impl.quantize_pack(x, 0, n, n, 1, res, send)
    np.testing.assert_array_equal(send, expected)
    np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))
    # the same boundaries through the owner's requantization (W = 2: the multiply by 1/2 path)
    recv = np.concatenate([expected, expected])
    exp_sres = np.zeros(n, np.float32)
    rv = recv.reshape(2, -1)
    c = np.empty(n, np.int8)
    s = np.empty(n // BLOCK, np.float32)
    _core.dequant_sum_requant_ref(np.ascontiguousarray(rv[:, :n]).view(np.int8),
                                  np.ascontiguousarray(rv[:, n:]).view(np.float32), exp_sres, c, s)
    sres = np.zeros(n, np.float32)
    own = np.empty(n + 4 * (n // BLOCK), np.uint8)
    impl.dequant_sum_requant(recv, 2, n, sres, own)
    np.testing.assert_array_equal(own, np.concatenate([c.view(np.uint8), s.view(np.uint8)]))
    np.testing.assert_array_equal(f32_bits(sres), f32_bits(exp_sres))


def all_finite_16bit(dtype: str) -> np.ndarray:
    """Every finite 16-bit pattern of ``dtype`` (bf16 / fp16: subnormals, +-0, the largest values),
    in a seeded random order, as the uint16 bits of a bucket."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp_all_ones = (bits & 0x7f80) == 0x7f80 if dtype == "bfloat16" else (bits & 0x7c00) == 0x7c00
    bits = bits[~exp_all_ones]
    return bits[np.random.default_rng(5).permutation(bits.size)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fast_16bit_buckets_read_bit_identical(dtype, impl):
    """Every finite bf16 / fp16 value read from the bucket (vectorised widening at the fast
    levels) gives the oracle's codes, scales and residuals, with a last block not a multiple of
    the vector width."""
    raw = all_finite_16bit(dtype)
    n = raw.size - 13
    raw = np.ascontiguousarray(raw[:n])
    xf = torch.from_numpy(raw.view(np.int16)).view(TORCH_DTYPES[dtype]).float().numpy()
    world = 2
    n_pad = -(-n // (BLOCK * world)) * BLOCK * world
    res0 = np.zeros(n_pad, np.float32)
    check_quantize_pack(impl, raw, dtype, xf, n, n_pad, world, res0)  # the residual holds the value read, exactly
    absmax = np.empty(n_pad // BLOCK, np.float32)
    res = res0.copy()
    impl.block_absmax(raw, DTYPE_CODES[dtype], n, n_pad, res, absmax)
    xp = np.zeros(n_pad, np.float32)
    xp[:n] = xf
    np.testing.assert_array_equal(f32_bits(absmax), f32_bits(np.abs(xp).reshape(-1, BLOCK).max(axis=1)))


def rounding_scales(dtype: str, count: int, seed: int) -> np.ndarray:
    """fp32 block scales at the target dtype's rounding boundaries (exact ties, one ulp either
    side), in its subnormal range, at its overflow threshold, and random finite fp32 patterns."""
    rng = np.random.default_rng(seed)
    mbits = 7 if dtype == "bfloat16" else 10
    emin, emax = (-133, 127) if dtype == "bfloat16" else (-24, 15)
    m = rng.integers(1 << mbits, 1 << (mbits + 1), count).astype(np.float64)
    e = rng.integers(emin, emax + 1, count)
    ties = np.ldexp(m + 0.5, e - mbits).astype(np.float32)
    ties = ties[np.isfinite(ties) & (ties > 0)]
    near = np.concatenate([ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf))])
    over = np.array([65504, 65519.996, 65520, 65536, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14,
                     np.finfo(np.float32).max, 3.3961776e38, 3.3895314e38], np.float32)
    rnd = rng.integers(0, 0x7f800000, count, dtype=np.uint32).view(np.float32)
    out = np.concatenate([near, over, rnd]).astype(np.float32)
    return out[rng.permutation(out.size)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fast_16bit_buckets_written_bit_identical(dtype, impl):
    """The dequantized values written into a bf16 / fp16 bucket (vectorised narrowing at the fast
    levels) are torch's round-to-nearest-even conversion of the oracle's fp32 values, bit for
    bit: ties, one ulp either side, subnormals, overflow to inf; a NaN block is FromF32's NaN."""
    world, sblocks = 2, 24
    shard = sblocks * BLOCK
    rng = np.random.default_rng(3)
    scales = rounding_scales(dtype, 4 * world * sblocks, 9)[:world * sblocks].reshape(world, sblocks)
    codes = rng.integers(-127, 128, (world, shard)).astype(np.int8)
    small = rng.random((world, shard)) < 0.5  # many +-1, +-2, +-4: the scale itself, exactly, and its doubles
    codes[small] = (rng.choice([-4, -2, -1, 1, 2, 4], int(small.sum()))).astype(np.int8)
    scales[1, 5] = np.nan  # a non-finite block reaches the bucket as NaN
    gathered = np.concatenate([np.concatenate([codes[r].view(np.uint8), scales[r].view(np.uint8)])
                               for r in range(world)])
    full = dequantize_packed(gathered, world, shard)
    for n in (world * shard, world * shard - 1, world * shard - 9, world * shard - 200):
        expected = torch.from_numpy(full[:n]).to(TORCH_DTYPES[dtype]).view(torch.int16).numpy().view(np.uint16)
        out = np.full(n + 3, 0x5A5A, np.uint16)
        impl.unpack_dequantize(gathered, world, shard, out[:n], DTYPE_CODES[dtype], n)
        nan = np.isnan(full[:n])
        assert nan.sum() == min(BLOCK, max(0, n - (sblocks + 5) * BLOCK))
        np.testing.assert_array_equal(out[:n][~nan], expected[~nan])
        if nan.any():  # FromF32's NaN: 0x7fc0 for bf16, sign | 0x7e00 for fp16 (the scale's NaN is positive)
            assert set(np.unique(out[:n][nan]).tolist()) == {0x7fc0 if dtype == "bfloat16" else 0x7e00}
        assert (out[n:] == 0x5A5A).all()  # nothing past n


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_fast_owner_step_scale_fold_boundaries_bit_identical(world, impl):
    """The vector levels multiply codes by sc * (1/W) in one step for a power-of-two W when every
    scale of the block is in [2^-126 W, 2^120]: scales at, and one ulp either side of, both ends
    (codes up to +-127 and -128 from the wire, results near the subnormal range and near
    overflow), blocks with one rank's scale outside, give the oracle's bits."""
    lo = np.float32(2.0 ** -126 * world)
    hi = np.float32(2.0 ** 120)
    edges = [lo, np.nextafter(lo, np.float32(0)), np.nextafter(lo, np.float32(np.inf)), hi,
             np.nextafter(hi, np.float32(0)), np.nextafter(hi, np.float32(np.inf)), np.float32(2.0 ** 126),
             np.float32(3e-39), np.float32(1e-45), np.float32(0), np.float32(1.0), np.float32(0.1) * lo]
    rng = np.random.default_rng(world)
    sblocks = 48
    shard = sblocks * BLOCK
    scales = np.empty((world, sblocks), np.float32)
    for b in range(sblocks):
        base = edges[b % len(edges)]
        scales[:, b] = base
        if b >= len(edges):  # later blocks: the other ranks elsewhere in (or out of) the range
            scales[1:, b] = np.float32(edges[rng.integers(len(edges))]) if world > 1 else base
    codes = rng.integers(-128, 128, (world, shard)).astype(np.int8)
    codes[:, ::7] = 127
    codes[:, 3::7] = -128
    codes[:, 5::11] = 0
    recv = np.concatenate([np.concatenate([codes[r].view(np.uint8), scales[r].view(np.uint8)])
                           for r in range(world)])
    res0 = (np.random.default_rng(1).standard_normal(shard) * np.float32(1e-38)).astype(np.float32)
    exp_res = res0.copy()
    c = np.empty(shard, np.int8)
    s = np.empty(sblocks, np.float32)
    _core.dequant_sum_requant_ref(codes, scales, exp_res, c, s)
    res = res0.copy()
    own = np.full(shard + 4 * sblocks, 0xAB, np.uint8)
    impl.dequant_sum_requant(recv, world, shard, res, own)
    np.testing.assert_array_equal(own, np.concatenate([c.view(np.uint8), s.view(np.uint8)]))
    np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))


def test_fast_shared_scale_below_the_values_clamps_like_the_oracle(impl):
    """quantize_pack_shared with a shared absmax below some |x + residual| (the clamp to +-127
    binds: a caller's bad absmax, not the hook's): every level clamps as the emulation does (the
    fast levels skip the clamp only where the block's own absmax makes it a no-op)."""
    world, n = 2, 8 * BLOCK
    x = edge_values(n, 17, nonfinite=False)
    res0 = np.zeros(n, np.float32)
    absmax = np.empty(n // BLOCK, np.float32)
    _core.int8_block_absmax_emulate(x, 0, n, n, res0.copy(), absmax)
    absmax *= np.float32(0.6)  # codes up to 127 / 0.6: clamped
    ref = Impl("emulate")
    exp_res, exp_send, exp_sc = res0.copy(), np.empty(n, np.uint8), np.empty(n // BLOCK, np.float32)
    ref.quantize_pack_shared(x, 0, n, n, world, exp_res, absmax, exp_send, exp_sc)
    assert (np.abs(exp_send.view(np.int8).astype(int)) == 127).sum() > n // 20  # the clamp binds
    res, send, sc = res0.copy(), np.empty(n, np.uint8), np.empty(n // BLOCK, np.float32)
    impl.quantize_pack_shared(x, 0, n, n, world, res, absmax, send, sc)
    np.testing.assert_array_equal(send, exp_send)
    np.testing.assert_array_equal(f32_bits(sc), f32_bits(exp_sc))
    np.testing.assert_array_equal(f32_bits(res), f32_bits(exp_res))
