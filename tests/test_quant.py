"""INT8 blockwise quantization (CPU oracle of the gradient hook's kernels)."""
from __future__ import annotations

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
