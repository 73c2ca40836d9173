"""cut_windows: the CPU oracle against numpy, and the CUDA kernel against the oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmio_native import _core
from llmio_native._native import _cuda


def numpy_windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[:, None] + np.arange(T)[None, :]
    return tokens[idx].astype(np.int64), tokens[idx + 1].astype(np.int64)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("T,B", [(1, 1), (7, 3), (256, 5), (1025, 2)])
def test_cut_windows_ref_matches_numpy(dtype, T, B):
    rng = np.random.default_rng(T * 31 + B)
    n = 5000
    tokens = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    tokens[-1] = np.iinfo(dtype).max  # the largest id survives the widening
    starts = rng.integers(0, n - T, B).astype(np.int64)
    starts[-1] = n - T - 1  # the last window that fits
    x, y = _core.cut_windows_ref(tokens, starts, T)
    ex, ey = numpy_windows(tokens, starts, T)
    assert x.dtype == np.int64 and x.shape == (B, T)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    assert y[-1, -1] == np.iinfo(dtype).max


def test_cut_windows_ref_rejects_bad_input():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="window 1 "):
        _core.cut_windows_ref(tokens, np.array([0, 90], np.int64), 10)
    with pytest.raises(ValueError, match="window 0 "):
        _core.cut_windows_ref(tokens, np.array([-1], np.int64), 10)
    with pytest.raises(ValueError):
        _core.cut_windows_ref(np.arange(100, dtype=np.int64), np.array([0], np.int64), 10)
    with pytest.raises(ValueError):
        _core.cut_windows_ref(np.arange(100, dtype=np.uint8), np.array([0], np.int64), 10)


@pytest.mark.skipif(_cuda is None or _cuda.device_count() > 0,
                    reason="needs llmio_native._cuda built and no usable device (a launch must fail on the device)")
def test_cuda_launch_accepts_stream_zero():
    """Stream 0 is torch's default stream (torch.cuda.current_stream().cuda_stream == 0): the
    binding must let it through argument validation; here the launch then fails only for want
    of a device (CudaError), not ValueError."""
    with pytest.raises(_core.CudaError) as ei:
        _cuda.cut_windows(0, 2, 10, 0, 1, 4, 0, 0, 0)
    assert not isinstance(ei.value, ValueError) and "stream" not in str(ei.value)


@pytest.mark.cuda
@pytest.mark.parametrize("on", ["default_stream", "side_stream"])
@pytest.mark.parametrize("dtype,tdtype", [(np.uint16, torch.uint16), (np.uint32, torch.uint32)])
def test_cuda_cut_windows_bit_exact(dtype, tdtype, on):
    if _cuda is None or _cuda.device_count() == 0 or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and llmio_native._cuda")
    rng = np.random.default_rng(5)
    n, T, B = 300_000, 1024, 37
    tokens = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    starts = rng.integers(0, n - T, B).astype(np.int64)
    starts[0] = n - T - 1
    ex, ey = _core.cut_windows_ref(tokens, starts, T)
    stream = torch.cuda.Stream() if on == "side_stream" else torch.cuda.default_stream()
    with torch.cuda.stream(stream):
        tok_dev = torch.from_numpy(tokens.view(np.int16 if dtype == np.uint16 else np.int32)).cuda()
        starts_dev = torch.from_numpy(starts).cuda()
        x = torch.full((B, T), -1, dtype=torch.int64, device="cuda")
        y = torch.full((B, T), -1, dtype=torch.int64, device="cuda")
        _cuda.cut_windows(tok_dev.data_ptr(), tokens.itemsize, n, starts_dev.data_ptr(), B, T,
                          x.data_ptr(), y.data_ptr(), stream.cuda_stream)
        assert (stream.cuda_stream == 0) == (on == "default_stream")
    stream.synchronize()
    np.testing.assert_array_equal(x.cpu().numpy(), ex)
    np.testing.assert_array_equal(y.cpu().numpy(), ey)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("T,B", [(1, 1), (2, 7), (255, 3), (256, 5), (257, 2), (1025, 2), (256 * 1024 + 5, 1)])
def test_cut_windows_emulation_matches_the_oracle(dtype, T, B):
    """_core.cut_windows_emulate runs the kernel's per-thread code over its launch grid
    (csrc/loader/cut_windows_device.hpp): equal to cut_windows_ref, including a window longer
    than one grid stride (1024 CTAs x 256 threads)."""
    rng = np.random.default_rng(T + B)
    n = T + 600
    tokens = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    starts = rng.integers(0, n - T, B).astype(np.int64)
    starts[-1] = n - T - 1
    ex, ey = _core.cut_windows_ref(tokens, starts, T)
    x, y = _core.cut_windows_emulate(tokens, starts, T)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)


def test_cut_windows_emulation_checks_arguments():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="window 0 "):
        _core.cut_windows_emulate(tokens, np.array([95], np.int64), 10)
    with pytest.raises(ValueError, match="65535"):
        _core.cut_windows_emulate(tokens, np.zeros(_core.CUT_MAX_BATCH + 1, np.int64), 1)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        _core.cut_windows_emulate(np.arange(100, dtype=np.uint8), np.array([0], np.int64), 10)
