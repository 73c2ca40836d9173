"""The INT8 kernels behind one interface: the fused CUDA kernels (``_DeviceOps``) or the C++
CPU oracle on host tensors (``_HostOps``), and the choice between them (:func:`choose_path`).

The quantization block and the bucket dtype codes come from the C++ core
(``_core.QUANT_BLOCK``, ``_core.INT8_DTYPES``), defined once in csrc/quant/int8_device.hpp.
"""
from typing import Any, Callable, Dict, Optional, Tuple

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
    ``"host"`` (the CPU oracle; through host copies for a CUDA bucket) or ``"allreduce"``
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


def _f32_padded(x: torch.Tensor, n: int, n_pad: int) -> np.ndarray:
    xf = np.zeros(n_pad, np.float32)
    xf[:n] = x.detach().reshape(-1)[:n].to("cpu", torch.float32).numpy()
    return xf


def _pack(send: torch.Tensor, world: int, codes: np.ndarray, scales: Optional[np.ndarray]) -> None:
    shard = codes.size // world
    sv = send.numpy().reshape(world, -1)
    for r in range(world):  # per destination rank: its shard's codes, then its scales
        sv[r, :shard] = codes[r * shard:(r + 1) * shard].view(np.uint8)
        if scales is not None:
            sb = scales.size // world
            sv[r, shard:] = scales[r * sb:(r + 1) * sb].view(np.uint8)


class _HostOps:
    """The kernels through the C++ oracle on host tensors (numpy views). Same methods and
    arguments as :class:`_DeviceOps`; tensors are CPU tensors (residuals and outputs are
    updated in place).

    Raises:
        ValueError / TypeError: from the oracle, on sizes or dtypes that do not match.
    """

    device = torch.device("cpu")

    def quantize_pack(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, send: Tensor) -> None:
        codes = np.empty(n_pad, np.int8)
        scales = np.empty(n_pad // BLOCK, np.float32)
        _core.quantize_blocks_ref(_f32_padded(x, n, n_pad), res.numpy(), codes, scales)
        _pack(send, world, codes, scales)

    def dequant_sum_requant(self, recv: Tensor, world: int, shard: int, res: Tensor, own: Tensor) -> None:
        rv = recv.numpy().reshape(world, -1)
        codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
        scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
        self._requant_out(own, shard, lambda c, s: _core.dequant_sum_requant_ref(codes_w, scales_w, res.numpy(), c, s))

    @staticmethod
    def _requant_out(own: torch.Tensor, shard: int, fn: Callable[[np.ndarray, np.ndarray], None]) -> None:
        c = np.empty(shard, np.int8)
        s = np.empty(shard // BLOCK, np.float32)
        fn(c, s)
        ov = own.numpy()
        ov[:shard] = c.view(np.uint8)
        ov[shard:] = s.view(np.uint8)

    def unpack_dequantize(self, gathered: torch.Tensor, world: int, shard: int, out: torch.Tensor, n: int) -> None:
        gv = gathered.numpy().reshape(world, -1)
        full = np.empty(world * shard, np.float32)
        for r in range(world):  # rank order: identical arithmetic on every rank
            c = np.ascontiguousarray(gv[r, :shard]).view(np.int8)
            s = np.ascontiguousarray(gv[r, shard:]).view(np.float32)
            _core.dequantize_blocks_ref(c, s, full[r * shard:(r + 1) * shard])
        out.reshape(-1)[:n].copy_(torch.from_numpy(full[:n]))

    def block_absmax(self, x: torch.Tensor, n: int, n_pad: int, res: torch.Tensor, absmax: torch.Tensor) -> None:
        _core.block_absmax_ref(_f32_padded(x, n, n_pad), res.numpy(), absmax.numpy())

    def quantize_pack_shared(self, x: Tensor, n: int, n_pad: int, world: int, res: Tensor, absmax: Tensor,
                             send: Tensor, scales: Tensor) -> None:
        codes = np.empty(n_pad, np.int8)
        _core.quantize_blocks_shared_ref(_f32_padded(x, n, n_pad), res.numpy(), absmax.numpy(), codes, scales.numpy())
        _pack(send, world, codes, None)

    def dequant_sum_requant_shared(self, recv: Tensor, world: int, shard: int, shared_scales: Tensor, res: Tensor,
                                   own: Tensor) -> None:
        codes_w = recv.numpy().reshape(world, shard).view(np.int8)
        self._requant_out(own, shard, lambda c, s: _core.dequant_sum_requant_shared_ref(
            codes_w, shared_scales.numpy(), res.numpy(), c, s))


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
                                   "the CPU oracle through host copies (slow; the group takes CPU tensors)")
    return _HostOps()


_ops_for = ops_for  # the name ddp.py used
