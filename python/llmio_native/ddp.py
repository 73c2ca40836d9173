"""INT8 gradient compression as a DistributedDataParallel comm hook.

    from llmio_native.ddp import Int8CompressState, int8_compress_hook
    ddp_model.register_comm_hook(Int8CompressState(process_group=None), int8_compress_hook)

Two-phase all-reduce of each bucket (DESIGN.md, "INT8 gradient hook"):

1. Every rank adds its worker residual, quantizes blockwise (256 values, symmetric absmax,
   fp32 scale, round half to even) and keeps the quantization error as the new residual.
2. ``all_to_all_single``: rank ``r`` receives every rank's quantized copy of shard ``r``.
3. The owner dequantizes the W copies in rank order with fp32 accumulation, divides by W,
   adds its shard residual and requantizes (keeping that error as the shard residual).
4. ``all_gather`` of the requantized shards; every rank, the owner included, dequantizes
   all of them into the bucket, in the bucket's dtype. Replicas stay bitwise identical.

Bytes each rank sends: 2 (W-1)/W * N * (1 + 4/256) against 2 (W-1)/W * 4N for an fp32
ring all-reduce (about a quarter) and half of ``bf16_compress_hook``. Buckets fall back to
a plain all-reduce during ``warmup_steps`` (DDP rebuilds its buckets after the first
step), below ``min_numel`` elements, and when W == 1. A block with inf/NaN comes out NaN on
every rank, so AMP's GradScaler skips the step everywhere.

This version runs the quantization on the CPU through the C++ oracle
(``llmio_native._core``): it serves gloo (CPU tensors). CUDA buckets are processed by the
same code through host copies until the fused CUDA kernels land.
"""
import warnings
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ._native import _core

BLOCK = _core.QUANT_BLOCK


class Int8CompressState:
    """State of :func:`int8_compress_hook`: settings, residuals, counters.

    Args:
        process_group: the group to reduce over (None: the default group).
        warmup_steps: steps of plain all-reduce first (DDP rebuilds buckets after step 1).
        min_numel: buckets smaller than this are all-reduced uncompressed.

    Pickles without the process group (as PowerSGDState does); residuals survive a
    checkpoint per parameter through :meth:`state_dict` / :meth:`load_state_dict`.
    """

    __slots__ = ("process_group", "warmup_steps", "min_numel", "iteration", "_residuals", "_signatures",
                 "_stats", "_bucket_params", "_pending")

    def __init__(self, process_group: Any = None, warmup_steps: int = 2, min_numel: int = 1024) -> None:
        if warmup_steps < 0 or min_numel < 0:
            raise ValueError("warmup_steps and min_numel must be >= 0")
        self.process_group = process_group
        self.warmup_steps = int(warmup_steps)
        self.min_numel = int(min_numel)
        self.iteration = 0
        self._residuals: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._signatures: Dict[int, tuple] = {}
        self._stats = {"buckets_compressed": 0, "buckets_bypassed": 0, "bytes_sent": 0, "bytes_fp32_allreduce": 0}
        self._bucket_params: Dict[int, list] = {}  # bucket index -> [(data_ptr, numel)] in bucket order
        self._pending: Dict[int, np.ndarray] = {}  # data_ptr -> residual loaded by load_state_dict

    def __getstate__(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "process_group"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.process_group = None
        for k, v in state.items():
            setattr(self, k, v)

    def stats(self) -> Dict[str, float]:
        """Buckets compressed and bypassed; bytes this rank sent against an fp32 ring all-reduce."""
        s = dict(self._stats)
        s["ratio_vs_fp32"] = s["bytes_sent"] / s["bytes_fp32_allreduce"] if s["bytes_fp32_allreduce"] else 0.0
        return s

    def state_dict(self, model: torch.nn.Module) -> Dict[str, Any]:
        """Residuals per parameter name of ``model`` (this rank's), so a checkpoint survives a
        different ``bucket_cap_mb``. The owner's shard residual is folded into its worker
        residual (the error it stands for is then fed back by this rank next step)."""
        names = {p.data_ptr(): n for n, p in model.named_parameters()}
        out: Dict[str, np.ndarray] = {}
        rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        for idx, (worker, shard_res) in self._residuals.items():
            total = worker.copy()
            total[rank * shard_res.size:(rank + 1) * shard_res.size] += shard_res
            off = 0
            for ptr, numel in self._bucket_params.get(idx, []):
                if ptr in names:
                    out[names[ptr]] = total[off:off + numel].copy()
                off += numel
        return {"version": 1, "iteration": self.iteration, "residuals": out}

    def load_state_dict(self, sd: Dict[str, Any], model: torch.nn.Module) -> None:
        """Restore residuals saved by :meth:`state_dict`; they are applied per parameter when
        each bucket is next compressed, whatever the new bucket layout.

        Raises:
            ValueError: an unknown version, or a residual whose size does not match its parameter.
        """
        if sd.get("version") != 1:
            raise ValueError(f"Int8CompressState state version {sd.get('version')!r} is not 1")
        params = dict(model.named_parameters())
        self._pending = {}
        for name, res in sd["residuals"].items():
            if name not in params:
                raise ValueError(f"residual for unknown parameter {name!r}")
            p = params[name]
            if res.size != p.numel():
                raise ValueError(f"residual of {name!r} has {res.size} values, the parameter {p.numel()}")
            self._pending[p.data_ptr()] = np.asarray(res, np.float32)
        self.iteration = int(sd["iteration"])
        self._residuals.clear()
        self._signatures.clear()

    def _residual(self, bucket: Any, n_pad: int, shard: int) -> Tuple[np.ndarray, np.ndarray]:
        idx = bucket.index()
        sig = (n_pad, tuple(tuple(p.shape) for p in bucket.parameters()))
        if idx in self._residuals and self._signatures.get(idx) != sig:
            warnings.warn(f"Int8CompressState: bucket {idx} changed shape (DDP rebuilt its buckets); "
                          "its residual is reset", RuntimeWarning, stacklevel=3)
            del self._residuals[idx]
        if idx not in self._residuals:
            worker = np.zeros(n_pad, np.float32)
            off = 0
            for p in bucket.parameters():  # residuals restored by load_state_dict, per parameter
                res = self._pending.pop(p.data_ptr(), None)
                if res is not None:
                    worker[off:off + p.numel()] = res
                off += p.numel()
            self._residuals[idx] = (worker, np.zeros(shard, np.float32))
            self._signatures[idx] = sig
            self._bucket_params[idx] = [(p.data_ptr(), p.numel()) for p in bucket.parameters()]
        return self._residuals[idx]


def _allreduce(state: Int8CompressState, group: Any, buf: torch.Tensor, world: int) -> torch.futures.Future:
    state._stats["buckets_bypassed"] += 1
    buf.div_(world)
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def int8_compress_hook(state: Int8CompressState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket all-reduced (averaged) through INT8 exchanges.

    Raises:
        RuntimeError: a collective failed (from torch.distributed).
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    n = buf.numel()
    if bucket.is_last():
        state.iteration += 1
    if world == 1 or state.iteration <= state.warmup_steps or n < state.min_numel:
        return _allreduce(state, group, buf, world)

    rank = dist.get_rank(group)
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    shard = n_pad // world
    sblocks = shard // BLOCK
    packed = shard + 4 * sblocks
    res_worker, res_shard = state._residual(bucket, n_pad, shard)

    x = np.zeros(n_pad, np.float32)
    x[:n] = buf.detach().to("cpu", torch.float32).numpy()
    codes = np.empty(n_pad, np.int8)
    scales = np.empty(n_pad // BLOCK, np.float32)
    _core.quantize_blocks_ref(x, res_worker, codes, scales)

    send = np.empty((world, packed), np.uint8)
    for r in range(world):  # per destination rank: its shard's codes, then its scales
        send[r, :shard] = codes[r * shard:(r + 1) * shard].view(np.uint8)
        send[r, shard:] = scales[r * sblocks:(r + 1) * sblocks].view(np.uint8)
    recv = torch.empty((world, packed), dtype=torch.uint8)
    dist.all_to_all_single(recv, torch.from_numpy(send), group=group)

    rv = recv.numpy()
    codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
    scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
    own = np.empty(packed, np.uint8)
    own_codes = np.empty(shard, np.int8)
    own_scales = np.empty(sblocks, np.float32)
    _core.dequant_sum_requant_ref(codes_w, scales_w, res_shard, own_codes, own_scales)
    own[:shard] = own_codes.view(np.uint8)
    own[shard:] = own_scales.view(np.uint8)

    parts = [torch.empty(packed, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, torch.from_numpy(own), group=group)  # list form: every torch and backend
    gv = torch.stack(parts).numpy()
    out = np.empty(n_pad, np.float32)
    for r in range(world):  # rank order: identical arithmetic on every rank
        c = np.ascontiguousarray(gv[r, :shard]).view(np.int8)
        s = np.ascontiguousarray(gv[r, shard:]).view(np.float32)
        _core.dequantize_blocks_ref(c, s, out[r * shard:(r + 1) * shard])
    buf.copy_(torch.from_numpy(out[:n]).to(buf.device, buf.dtype))

    st = state._stats
    st["buckets_compressed"] += 1
    st["bytes_sent"] += 2 * (world - 1) * packed
    st["bytes_fp32_allreduce"] += 2 * (world - 1) * 4 * n // world
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    _ = rank
    return fut
