"""The INT8 kernels behind one interface: the fused CUDA kernels (``_DeviceOps``) or the fast
C++ CPU kernels on host tensors (``_HostOps``), and the choice between them (:func:`choose_path`).

The quantization block and the bucket dtype codes come from the C++ core
(``_core.QUANT_BLOCK``, ``_core.INT8_DTYPES``), defined once in csrc/quant/int8_device.hpp.
"""
from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .._native import _core

BLOCK: int = _core.QUANT_BLOCK
# torch dtype -> the kernels' bucket dtype code (csrc/quant/int8_device.hpp, exported by _core)
DTYPE_CODES: Dict[torch.dtype, int] = {getattr(torch, name): code for name, code in _core.INT8_DTYPES.items()}
_DTYPE_CODES = DTYPE_CODES  # the name ddp.py used


def cuda_kernels_usable() -> Tuple[bool, str]:
    """Whether the fused CUDA kernels can run here: ``(usable, reason if not)``.

    :func:`llmio_native._native.cuda_usable` (does *our* ``_cuda`` module see a device),
    plus a check that the build has the INT8 kernels.

    Raises:
        Nothing: an unusable module is reported in the returned reason.
    """
    ok, why = _native.cuda_usable()
    if ok and not hasattr(_native._cuda, "int8_quantize_pack"):
        return False, "llmio_native._cuda has no INT8 kernels (stale build)"
    return ok, why


def group_takes_cpu_tensors(backend: str) -> bool:
    """Whether a process group with this backend (``str(dist.get_backend(group))``) accepts
    CPU tensors: ``gloo`` / ``mpi`` / ``ucc``, or a per-device backend string with a ``cpu``
    entry (``"cpu:gloo,cuda:nccl"``).

    Raises:
        Nothing: an unknown backend name counts as not taking CPU tensors.
    """
    b = str(backend).lower().replace(" ", "")
    if ":" in b:
        return any(part.split(":", 1)[0] == "cpu" for part in b.split(","))
    return b in ("gloo", "mpi", "ucc")


def choose_path(device_type: str, kernels_usable: bool, backend: str) -> str:
    """Where a bucket on ``device_type`` is compressed: ``"device"`` (the fused kernels),
    ``"host"`` (the fast CPU kernels; through host copies for a CUDA bucket) or ``"allreduce"``
    (a plain all-reduce of the bucket: a CUDA bucket whose kernels are unusable, on a group
    that takes no CPU tensors, e.g. NCCL alone).

    Raises:
        Nothing: every combination has a path.
    """
    if device_type != "cuda":
        return "host"
    if kernels_usable:
        return "device"
    return "host" if group_takes_cpu_tensors(backend) else "allreduce"


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; bfloat16 / float16 as their 16-bit bits."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def _host_bucket(x: torch.Tensor, n: int) -> Tuple[np.ndarray, int]:
    """The first ``n`` values of ``x`` as the fast kernels read them: a view of the bucket when it
    is a contiguous CPU tensor of a kernel dtype (fp32 / bf16 / fp16), else an fp32 host copy
    (a CUDA bucket, float64), and the dtype code."""
    flat = x.detach().reshape(-1)[:n]
    if flat.device.type != "cpu" or flat.dtype not in DTYPE_CODES:
        flat = flat.to("cpu", torch.float32)
    flat = flat.contiguous()
    return _np(flat), DTYPE_CODES[flat.dtype]


class _HostOps:
    """The kernels on the CPU: ``_core.int8_*_fast`` (csrc/quant/int8_fast.cpp: fused,
    vectorised, multi-threaded, bit-identical to the C++ oracle and to the CUDA kernels'
    emulation). Same methods and arguments as :class:`_DeviceOps`; the packed buffers and the
    residuals are CPU tensors updated in place; the bucket is read and written in place when it
    is a CPU tensor of a kernel dtype (no padded or packed intermediate copies).

    Raises:
        ValueError: from the kernels' argument checks, on sizes that do not match.
    """

    device = torch.device("cpu")

    def quantize_pack(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, send: Tensor) -> None:
        xa, code = _host_bucket(x, n)
        _core.int8_quantize_pack_fast(xa, code, n, n_pad, world, res.numpy(), send.numpy())

    def dequant_sum_requant(self, recv: Tensor, world: int, shard: int, res: Tensor, own: Tensor) -> None:
        _core.int8_dequant_sum_requant_fast(recv.numpy(), world, shard, res.numpy(), own.numpy())

    def unpack_dequantize(self, gathered: torch.Tensor, world: int, shard: int, out: torch.Tensor, n: int) -> None:
        flat = out.reshape(-1)
        if out.device.type == "cpu" and out.dtype in DTYPE_CODES and out.is_contiguous():
            _core.int8_unpack_dequantize_fast(gathered.numpy(), world, shard, _np(flat), DTYPE_CODES[out.dtype], n)
            return
        tmp = torch.empty(n, dtype=torch.float32)  # a CUDA or float64 bucket: through fp32 on the host
        _core.int8_unpack_dequantize_fast(gathered.numpy(), world, shard, tmp.numpy(), DTYPE_CODES[torch.float32], n)
        flat[:n].copy_(tmp)

    def block_absmax(self, x: torch.Tensor, n: int, n_pad: int, res: torch.Tensor, absmax: torch.Tensor) -> None:
        xa, code = _host_bucket(x, n)
        _core.int8_block_absmax_fast(xa, code, n, n_pad, res.numpy(), absmax.numpy())

    def quantize_pack_shared(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, absmax: Tensor,
                             send: Tensor, scales: Tensor) -> None:
        xa, code = _host_bucket(x, n)
        _core.int8_quantize_pack_shared_fast(xa, code, n, n_pad, world, res.numpy(), absmax.numpy(), send.numpy(),
                                             scales.numpy())

    def dequant_sum_requant_shared(self, recv: Tensor, world: int, shard: int, shared_scales: Tensor, res: Tensor,
                                   own: Tensor) -> None:
        _core.int8_dequant_sum_requant_shared_fast(recv.numpy(), world, shard, shared_scales.numpy(), res.numpy(),
                                                   own.numpy())


class _DeviceOps:
    """The fused kernels of ``llmio_native._cuda`` on the current CUDA stream, one method per
    kernel (device tensors passed by ``data_ptr()``, sizes in elements).

    Raises:
        ValueError: bad sizes, dtype code or alignment (checked by the binding, before launch).
        llmio_native._core.CudaError: a failed launch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.k = _native._cuda

    def _s(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def quantize_pack(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, send: Tensor) -> None:
        self.k.int8_quantize_pack(x.data_ptr(), DTYPE_CODES[x.dtype], n, n_pad, world, res.data_ptr(),
                                  send.data_ptr(), self._s())

    def dequant_sum_requant(self, recv: Tensor, world: int, shard: int, res: Tensor, own: Tensor) -> None:
        self.k.int8_dequant_sum_requant(recv.data_ptr(), world, shard, res.data_ptr(), own.data_ptr(), self._s())

    def unpack_dequantize(self, gathered: torch.Tensor, world: int, shard: int, out: torch.Tensor, n: int) -> None:
        self.k.int8_unpack_dequantize(gathered.data_ptr(), world, shard, out.data_ptr(), DTYPE_CODES[out.dtype], n,
                                      self._s())

    def block_absmax(self, x: torch.Tensor, n: int, n_pad: int, res: torch.Tensor, absmax: torch.Tensor) -> None:
        self.k.int8_block_absmax(x.data_ptr(), DTYPE_CODES[x.dtype], n, n_pad, res.data_ptr(), absmax.data_ptr(),
                                 self._s())

    def quantize_pack_shared(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, absmax: Tensor,
                             send: Tensor, scales: Tensor) -> None:
        self.k.int8_quantize_pack_shared(x.data_ptr(), DTYPE_CODES[x.dtype], n, n_pad, world, res.data_ptr(),
                                         absmax.data_ptr(), send.data_ptr(), scales.data_ptr(), self._s())

    def dequant_sum_requant_shared(self, recv: Tensor, world: int, shard: int, shared_scales: Tensor, res: Tensor,
                                   own: Tensor) -> None:
        self.k.int8_dequant_sum_requant_shared(recv.data_ptr(), world, shard, shared_scales.data_ptr(),
                                               res.data_ptr(), own.data_ptr(), self._s())


def ops_for(path: str, buf: torch.Tensor) -> Any:
    """The kernels for a path of :func:`choose_path` (``"device"`` or ``"host"``); warns once
    when a CUDA bucket goes through host copies.

    Raises:
        Nothing: the path was chosen by :func:`choose_path`.
    """
    if path == "device":
        return _DeviceOps(buf.device)
    if buf.device.type == "cuda":
        _native.warn_cuda_fallback("int8_compress_hook (CUDA bucket)",
                                   "the CPU kernels through host copies (slow; the group takes CPU tensors)")
    return _HostOps()


_ops_for = ops_for  # the name ddp.py used
