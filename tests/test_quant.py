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
