"""Issue 16 on the CPU: the GPU decoder's gate on *our* CUDA module, the descriptor check
in the CUDA binding (made before any launch), stream 0, and info()["cuda"]'s driver fields."""
from __future__ import annotations

import builtins
import io
import re
from types import SimpleNamespace

import numpy as np
import pytest

import llmio_native as lio
from llmio_native import _core, _native
from llmio_native._native import _cuda
from llmio_native.dataset import rans as R

torch = pytest.importorskip("torch")

USABLE, WHY = _native.cuda_usable()
needs_cuda_module = pytest.mark.skipif(_cuda is None, reason="llmio_native._cuda is not built")
without_device = pytest.mark.skipif(USABLE, reason="a usable GPU: the fake device pointers would be launched")


def _batch():
    m = _core.RansModel.build([np.arange(50, dtype=np.uint16)], 2)
    p = np.frombuffer(m.encode(np.arange(50, dtype=np.uint16)), np.uint8)
    chunks, blocks = R.descriptors([0], [len(p)], [50], [0])
    return m, p, chunks, blocks


# ------------------------------------------------------------------ GpuDecoder gate (16.1a)
def test_gpu_decoder_refuses_when_our_module_sees_no_device_even_if_torch_does(monkeypatch):
    """torch (its own, older CUDA runtime) sees the GPU, our _cuda does not (driver too old
    for the runtime it links): the decoder must refuse with the reason, not launch."""
    reason = "llmio_native._cuda sees no device (cudaErrorInsufficientDriver: ...; built for CUDA runtime 13.0)"
    monkeypatch.setattr(_native, "_CUDA_GATE", (False, reason))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(lio.UnsupportedError, match=r"rans GPU decoder: " + re.escape(reason)):
        R.GpuDecoder("cuda")


@pytest.mark.skipif(USABLE, reason="our CUDA module is usable here")
def test_gpu_decoder_reason_is_cuda_usable_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(lio.UnsupportedError) as ei:
        R.GpuDecoder("cuda")
    assert WHY and WHY in str(ei.value)


def test_gpu_decoder_checks_tensor_devices_before_launching():
    dec = R.GpuDecoder.__new__(R.GpuDecoder)  # the device checks are Python, before any CUDA call
    dec.device = torch.device("cuda", 0)
    dec._images = {}
    m, p, chunks, blocks = _batch()
    with pytest.raises(ValueError, match=r"src must be a tensor on cuda:0, got cpu"):
        dec.decode(torch.from_numpy(p.copy()), chunks, blocks, [m], torch.zeros(50, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"src must be a tensor on cuda:0, got ndarray"):
        dec.decode(p, chunks, blocks, [m], torch.zeros(50, dtype=torch.int16))


# ------------------------------------------------------------------ CUDA binding (16.4, 16.3)
def _launch(chunks, blocks, *, src=0x10000, src_nbytes=None, num_images=1, out_tokens=50, stream=0, p=None):
    return _cuda.rans_decode(src, 0x20000, len(chunks), 0x30000, len(blocks), 0x40000, 0x50000, 2, 0x60000, stream,
                             src_nbytes=len(p) if src_nbytes is None else src_nbytes, chunks_host=chunks,
                             blocks_host=blocks, num_images=num_images, out_tokens=out_tokens)


@needs_cuda_module
@without_device
def test_cuda_binding_accepts_stream_0():
    """torch's default stream is 0: validation passes and the launch itself fails here
    only because there is no device (CudaError, not ValueError)."""
    m, p, chunks, blocks = _batch()
    with pytest.raises(lio.CudaError, match="rans_decode_kernel launch: cuda"):
        _launch(chunks, blocks, p=p, stream=0)


@needs_cuda_module
@without_device
def test_cuda_binding_checks_descriptors_before_launching():
    m, p, chunks, blocks = _batch()
    n = len(p)
    bad = chunks.copy()
    bad["src_bytes"][0] = n + 1
    with pytest.raises(ValueError, match=rf"chunk 0: source range \[0, \+{n + 1}\) lies outside src \({n} bytes\)"):
        _launch(bad, blocks, p=p)
    bad = chunks.copy()
    bad["model"][0] = 1
    with pytest.raises(ValueError, match=r"chunk 0: model index 1 out of range \(1 model image\(s\)\)"):
        _launch(bad, blocks, p=p)
    with pytest.raises(ValueError, match=r"chunk 0: output range \[0, \+50\) lies outside out \(49 tokens\)"):
        _launch(chunks, blocks, p=p, out_tokens=49)
    with pytest.raises(ValueError, match=r"chunk 0: misaligned source: payload at address 0x10002 "
                                         r"\(src 0x10002 \+ offset 0\) is not 4-byte aligned"):
        _launch(chunks, blocks, p=p, src=0x10002)
    with pytest.raises(ValueError, match=r"chunks_host must be 2 contiguous 32-byte records, got 32 bytes"):
        _cuda.rans_decode(0x10000, 0x20000, 2, 0x30000, 1, 0x40000, 0x50000, 2, 0x60000, 0, src_nbytes=len(p),
                          chunks_host=chunks, blocks_host=blocks, num_images=1, out_tokens=50)
    with pytest.raises(TypeError):  # the host tables are required: no unchecked launch
        _cuda.rans_decode(0x10000, 0x20000, 1, 0x30000, 1, 0x40000, 0x50000, 2, 0x60000, 0)


# ------------------------------------------------------------------ info()["cuda"] (16.1c)
def test_info_cuda_says_usable_and_why():
    c = lio.info()["cuda"]
    assert c["usable"] is USABLE
    if not USABLE:
        assert c["reason"] and (c["reason"] == WHY or _cuda is None)
    for k in ("runtime", "driver_required", "driver_found", "driver_cuda", "driver_ok"):
        assert k in c


@needs_cuda_module
def test_info_cuda_driver_required_matches_this_build():
    c = lio.info()["cuda"]
    rt = _cuda.runtime_version()
    assert c["runtime"] == f"{rt // 1000}.{rt % 1000 // 10}"
    assert c["driver_required"] == {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}[rt // 1000]


def _fake_cuda(runtime: int, driver: int, devices: int) -> SimpleNamespace:
    return SimpleNamespace(runtime_version=lambda: runtime, driver_version=lambda: driver,
                           device_count=lambda: devices, device_count_error=lambda: "" if devices else "cudaErrorX")


@pytest.mark.parametrize("runtime, need", [(13000, "580.65.06"), (12040, "525.60.13"), (12090, "525.60.13"),
                                           (11080, "450.80.02")])
@pytest.mark.parametrize("found, drv", [("535.104.05", 12020), ("580.82.07", 13000), (None, 0)])
def test_info_cuda_driver_required_and_found(monkeypatch, runtime, need, found, drv):
    monkeypatch.setattr(lio, "_cuda", _fake_cuda(runtime, drv, 0))
    monkeypatch.setattr(_native, "_CUDA_GATE", (False, "sees no device (test)"))
    real_open = builtins.open

    def fake_open(path, *a, **kw):
        if path == "/proc/driver/nvidia/version":
            if found is None:
                raise FileNotFoundError(path)
            return io.StringIO(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {found}  Sat Aug 19 01:15:15 UTC 2023\n")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    c = lio.info()["cuda"]
    assert c["runtime"] == f"{runtime // 1000}.{runtime % 1000 // 10}"
    assert c["driver_required"] == need
    assert c["driver_found"] == found
    assert c["driver_cuda"] == (None if drv == 0 else f"{drv // 1000}.{drv % 1000 // 10}")
    expect_ok = None if found is None else tuple(map(int, found.split("."))) >= tuple(map(int, need.split(".")))
    assert c["driver_ok"] is expect_ok
    assert c["usable"] is False and c["reason"] == "sees no device (test)"
    if found == "535.104.05" and runtime == 13000:  # the H100-cluster case of issue 16
        assert c["driver_ok"] is False


@pytest.mark.skipif(_cuda is not None, reason="llmio_native._cuda is built here")
def test_info_cuda_reason_when_not_built():
    c = lio.info()["cuda"]
    assert c["built"] is False and c["usable"] is False and c["device_count"] == 0
    assert c["reason"] == "llmio_native._cuda was not built (no CUDA compiler at build time, or LLMIO_CUDA=OFF)"
    assert c["runtime"] is None and c["driver_required"] is None
