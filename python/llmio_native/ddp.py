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

Where it runs:

* CPU buckets (gloo): the C++ oracle (``llmio_native._core``), synchronously.
* CUDA buckets with ``llmio_native._cuda`` usable: three fused kernels on the bucket's
  device, on ``torch.cuda.current_stream()`` — (a) residual-add + absmax + quantize + pack,
  ``all_to_all_single``, (b) dequantize-sum-requantize of the owned shard,
  ``all_gather_into_tensor``, (c) dequantize into the bucket — chained through the
  collectives' futures, with residuals as device tensors: no host synchronisation and no
  host copy. With NCCL the futures complete when the collective is enqueued, so the whole
  chain is issued inside the hook call and every rank issues its collectives in the same
  order. (A collective whose future is not complete at once is waited for before the next
  one is issued, for the same reason.)
* CUDA buckets without a usable ``_cuda`` (not built, or no driver): the CPU oracle through
  host copies, with a one-time ``RuntimeWarning``; the process group must then accept CPU
  tensors (gloo, or a ``"cpu:gloo,cuda:nccl"`` group).

``deterministic=True``: the phase-1 scales are shared by all ranks (one all-reduce MAX of the
per-block absmax of x + residual, N/256 fp32 values), phase 1 sends codes only, and the owner
sums the integer codes exactly (int32) — the result does not depend on the order in which
contributions arrive. Phase 2 is quantized by the owner alone, so its scales are unique by
construction. Extra bytes: 2 (W-1)/W * 4N/256 for the all-reduce, less (W-1)/W * 4N/256 of
scales not sent in phase 1: (W-1)/W * 4N/256 in all (``stats()["bytes_scale_allreduce"]``).

``hierarchical`` (``None``: on when the group spans more than one node, from
``local_world_size`` or ``LOCAL_WORLD_SIZE``): an fp32 reduce-scatter inside each node
(``L`` ranks), the INT8 two-phase exchange of each rank's chunk across the ``M`` nodes among
the ranks with the same local rank, and an all-gather inside the node. Ranks must be laid out
node by node (rank = node * L + local rank, as torchrun does). Inter-node bytes per rank:
2 (M-1)/M * (N/L) * (1 + 4/256).
"""
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _native
from ._native import _core

BLOCK = _core.QUANT_BLOCK
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CUDA_USABLE: Optional[Tuple[bool, str]] = None


def cuda_kernels_usable() -> Tuple[bool, str]:
    """Whether the fused CUDA kernels can run here: ``(usable, reason if not)``. Cached."""
    global _CUDA_USABLE
    if _CUDA_USABLE is None:
        c = _native._cuda
        if c is None:
            _CUDA_USABLE = (False, f"llmio_native._cuda is not built ({_native.CUDA_IMPORT_ERROR})")
        elif not hasattr(c, "int8_quantize_pack"):
            _CUDA_USABLE = (False, "llmio_native._cuda has no INT8 kernels (stale build)")
        elif c.device_count() == 0:
            _CUDA_USABLE = (False, f"llmio_native._cuda sees no device ({c.device_count_error() or 'no GPU'})")
        else:
            _CUDA_USABLE = (True, "")
    return _CUDA_USABLE


def _gather_fn() -> Callable[..., Any]:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn() -> Callable[..., Any]:
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Int8CompressState:
    """State of :func:`int8_compress_hook`: settings, residuals, counters.

    Args:
        process_group: the group to reduce over (None: the default group).
        warmup_steps: steps of plain all-reduce first (DDP rebuilds buckets after step 1).
        min_numel: buckets smaller than this are all-reduced uncompressed.
        deterministic: share the phase-1 block scales across ranks (one all-reduce MAX of
            N/256 values per bucket) so the owner sums integer codes exactly; the result
            does not depend on the order contributions arrive in.
        hierarchical: ``None`` (auto: on when the group spans more than one node), ``True``
            or ``False``. See the module docstring.
        local_world_size: ranks per node; overrides the ``LOCAL_WORLD_SIZE`` environment
            variable (torchrun sets it).

    Pickles without the process group and the hierarchical sub-groups (as PowerSGDState
    does); residuals survive a checkpoint per parameter through :meth:`state_dict` /
    :meth:`load_state_dict`.

    Raises:
        ValueError: a negative ``warmup_steps`` / ``min_numel``, a ``local_world_size`` < 1,
            or ``hierarchical`` not None/True/False.
    """

    __slots__ = ("process_group", "warmup_steps", "min_numel", "iteration", "_residuals", "_signatures",
                 "_stats", "_bucket_params", "_pending", "deterministic", "hierarchical", "local_world_size",
                 "_layout", "_topo", "_groups", "_warned_host")

    def __init__(self, process_group: Any = None, warmup_steps: int = 2, min_numel: int = 1024,
                 deterministic: bool = False, hierarchical: Optional[bool] = None,
                 local_world_size: Optional[int] = None) -> None:
        if warmup_steps < 0 or min_numel < 0:
            raise ValueError("warmup_steps and min_numel must be >= 0")
        if hierarchical not in (None, True, False):
            raise ValueError(f"hierarchical must be None, True or False, got {hierarchical!r}")
        if local_world_size is not None and int(local_world_size) < 1:
            raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
        self.process_group = process_group
        self.warmup_steps = int(warmup_steps)
        self.min_numel = int(min_numel)
        self.deterministic = bool(deterministic)
        self.hierarchical = hierarchical
        self.local_world_size = None if local_world_size is None else int(local_world_size)
        self.iteration = 0
        self._residuals: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # worker, shard (host or device)
        self._layout: Dict[int, Tuple[int, int]] = {}  # bucket -> (chunk offset in the bucket, shard offset in it)
        self._signatures: Dict[int, tuple] = {}
        self._stats = {"buckets_compressed": 0, "buckets_bypassed": 0, "bytes_sent": 0, "bytes_sent_int8": 0,
                       "bytes_sent_full_precision": 0, "bytes_scale_allreduce": 0, "bytes_fp32_allreduce": 0}
        self._bucket_params: Dict[int, list] = {}  # bucket index -> [(data_ptr, numel)] in bucket order
        self._pending: Dict[int, np.ndarray] = {}  # data_ptr -> residual loaded by load_state_dict
        self._topo: Optional[tuple] = None
        self._groups: Optional[tuple] = None  # (intra-node group, cross-node group), created lazily
        self._warned_host = False

    def __getstate__(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("process_group", "_groups", "_topo")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.process_group = None
        self._groups = None
        self._topo = None
        # defaults for states pickled before these settings existed
        self.deterministic, self.hierarchical, self.local_world_size = False, None, None
        self._layout, self._warned_host = {}, False
        for k, v in state.items():
            setattr(self, k, v)

    def stats(self) -> Dict[str, float]:
        """Counters of this rank.

        ``buckets_compressed`` / ``buckets_bypassed``; ``bytes_sent`` (everything this rank
        sent) = ``bytes_sent_int8`` (the two INT8 phases, including, with
        ``deterministic=True``, ``bytes_scale_allreduce``: the all-reduce MAX of the block
        absmax) + ``bytes_sent_full_precision`` (hierarchical mode: the intra-node fp32
        reduce-scatter and the all-gather in the bucket's dtype); ``bytes_fp32_allreduce``:
        what a flat fp32 ring all-reduce of the same buckets would have sent;
        ``ratio_vs_fp32`` and ``ratio_int8_vs_fp32`` (the inter-node share in hierarchical
        mode). Ring algorithms assumed for the collectives.
        """
        s = dict(self._stats)
        base = s["bytes_fp32_allreduce"]
        s["ratio_vs_fp32"] = s["bytes_sent"] / base if base else 0.0
        s["ratio_int8_vs_fp32"] = s["bytes_sent_int8"] / base if base else 0.0
        return s

    def state_dict(self, model: torch.nn.Module) -> Dict[str, Any]:
        """Residuals per parameter name of ``model`` (this rank's), so a checkpoint survives a
        different ``bucket_cap_mb``. The owner's shard residual is folded into its worker
        residual (the error it stands for is then fed back by this rank next step). In
        hierarchical mode a rank holds residuals only for the chunk of each bucket it
        compresses; the other values are saved as zeros."""
        names = {p.data_ptr(): n for n, p in model.named_parameters()}
        out: Dict[str, np.ndarray] = {}
        for idx, (worker, shard_res) in self._residuals.items():
            w = worker.detach().cpu().numpy()
            sr = shard_res.detach().cpu().numpy()
            chunk_off, shard_off = self._layout.get(idx, (0, 0))
            n_pad = self._signatures[idx][0] if idx in self._signatures else w.size
            total = np.zeros(max(n_pad, chunk_off + w.size), np.float32)
            total[chunk_off:chunk_off + w.size] = w
            total[chunk_off + shard_off:chunk_off + shard_off + sr.size] += sr
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
        self._layout.clear()

    # ------------------------------------------------------------------ internals

    def _topology(self, group: Any, world: int, rank: int) -> Tuple[bool, int, int, int, int]:
        """(hierarchical, L ranks per node, M nodes, local rank, node) for this group.

        Raises:
            ValueError: an unusable configuration (sizes named).
            RuntimeError: ranks not laid out node by node.
        """
        if self._topo is not None and self._topo[0] == world:
            return self._topo[1]
        L = self.local_world_size
        from_env = False
        if L is None and os.environ.get("LOCAL_WORLD_SIZE"):
            L, from_env = int(os.environ["LOCAL_WORLD_SIZE"]), True
        if self.hierarchical is False:
            topo = (False, world, 1, rank, 0)
        elif L is None:
            if self.hierarchical:
                raise ValueError("Int8CompressState(hierarchical=True) needs the node size: pass local_world_size= "
                                 "or set LOCAL_WORLD_SIZE")
            topo = (False, world, 1, rank, 0)
        else:
            if L < 1 or world % L:
                raise ValueError(f"Int8CompressState: world size {world} is not divisible by local_world_size {L}")
            M = world // L
            if self.hierarchical and M == 1:
                raise ValueError(f"Int8CompressState(hierarchical=True) but the group is one node: world size {world}, "
                                 f"local_world_size {L}")
            if M > 1:
                full = dist.get_world_size()
                if world != full:
                    raise ValueError(f"Int8CompressState: hierarchical mode needs the process group to span the whole "
                                     f"job (group size {world}, world size {full}): pass hierarchical=False")
                if from_env and os.environ.get("LOCAL_RANK") not in (None, "") and int(os.environ["LOCAL_RANK"]) != rank % L:
                    raise RuntimeError(f"Int8CompressState: ranks are not laid out node by node: rank {rank} has "
                                       f"LOCAL_RANK {os.environ['LOCAL_RANK']}, expected {rank} % {L} = {rank % L}")
            topo = (M > 1, L, M, rank % L, rank // L)
        self._topo = (world, topo)
        return topo

    def _hier_groups(self, L: int, M: int, local: int, node: int) -> Tuple[Any, Any]:
        """The intra-node and cross-node groups, created once, on every rank in the same order.

        Raises:
            RuntimeError: a group could not be created (sizes named).
        """
        if self._groups is None:
            intra = cross = None
            try:
                for m in range(M):
                    g = dist.new_group([m * L + j for j in range(L)])
                    if m == node:
                        intra = g
                for j in range(L):
                    g = dist.new_group([m * L + j for m in range(M)])
                    if j == local:
                        cross = g
            except Exception as exc:  # noqa: BLE001 - re-raised with the configuration
                raise RuntimeError(f"Int8CompressState: could not create the hierarchical groups ({M} nodes x {L} "
                                   f"ranks per node): {exc}") from exc
            self._groups = (intra, cross)
        return self._groups

    def _residual(self, bucket: Any, n_pad: int, chunk: int, shard: int, chunk_off: int, shard_off: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = bucket.index()
        sig = (n_pad, tuple(tuple(p.shape) for p in bucket.parameters()), chunk, shard, chunk_off, shard_off,
               str(device))
        if idx in self._residuals and self._signatures.get(idx) != sig:
            warnings.warn(f"Int8CompressState: bucket {idx} changed shape (DDP rebuilt its buckets); "
                          "its residual is reset", RuntimeWarning, stacklevel=4)
            del self._residuals[idx]
        if idx not in self._residuals:
            full = np.zeros(n_pad, np.float32)
            off = 0
            for p in bucket.parameters():  # residuals restored by load_state_dict, per parameter
                res = self._pending.pop(p.data_ptr(), None)
                if res is not None:
                    full[off:off + p.numel()] = res
                off += p.numel()
            worker = torch.from_numpy(full[chunk_off:chunk_off + chunk].copy()).to(device)
            self._residuals[idx] = (worker, torch.zeros(shard, dtype=torch.float32, device=device))
            self._signatures[idx] = sig
            self._layout[idx] = (chunk_off, shard_off)
            self._bucket_params[idx] = [(p.data_ptr(), p.numel()) for p in bucket.parameters()]
        return self._residuals[idx]


# ---------------------------------------------------------------------- kernels: host oracle / CUDA


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
    """The kernels through the C++ oracle on host tensors (numpy views)."""

    device = torch.device("cpu")

    def quantize_pack(self, x, n, n_pad, world, res, send) -> None:
        codes = np.empty(n_pad, np.int8)
        scales = np.empty(n_pad // BLOCK, np.float32)
        _core.quantize_blocks_ref(_f32_padded(x, n, n_pad), res.numpy(), codes, scales)
        _pack(send, world, codes, scales)

    def dequant_sum_requant(self, recv, world, shard, res, own) -> None:
        rv = recv.numpy().reshape(world, -1)
        codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
        scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
        self._requant_out(own, shard, lambda c, s: _core.dequant_sum_requant_ref(codes_w, scales_w, res.numpy(), c, s))

    @staticmethod
    def _requant_out(own, shard, fn) -> None:
        c = np.empty(shard, np.int8)
        s = np.empty(shard // BLOCK, np.float32)
        fn(c, s)
        ov = own.numpy()
        ov[:shard] = c.view(np.uint8)
        ov[shard:] = s.view(np.uint8)

    def unpack_dequantize(self, gathered, world, shard, out, n) -> None:
        gv = gathered.numpy().reshape(world, -1)
        full = np.empty(world * shard, np.float32)
        for r in range(world):  # rank order: identical arithmetic on every rank
            c = np.ascontiguousarray(gv[r, :shard]).view(np.int8)
            s = np.ascontiguousarray(gv[r, shard:]).view(np.float32)
            _core.dequantize_blocks_ref(c, s, full[r * shard:(r + 1) * shard])
        out.reshape(-1)[:n].copy_(torch.from_numpy(full[:n]))

    def block_absmax(self, x, n, n_pad, res, absmax) -> None:
        _core.block_absmax_ref(_f32_padded(x, n, n_pad), res.numpy(), absmax.numpy())

    def quantize_pack_shared(self, x, n, n_pad, world, res, absmax, send, scales) -> None:
        codes = np.empty(n_pad, np.int8)
        _core.quantize_blocks_shared_ref(_f32_padded(x, n, n_pad), res.numpy(), absmax.numpy(), codes, scales.numpy())
        _pack(send, world, codes, None)

    def dequant_sum_requant_shared(self, recv, world, shard, shared_scales, res, own) -> None:
        codes_w = recv.numpy().reshape(world, shard).view(np.int8)
        self._requant_out(own, shard, lambda c, s: _core.dequant_sum_requant_shared_ref(
            codes_w, shared_scales.numpy(), res.numpy(), c, s))


class _DeviceOps:
    """The fused kernels of ``llmio_native._cuda`` on the current CUDA stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.k = _native._cuda

    def _s(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def quantize_pack(self, x, n, n_pad, world, res, send) -> None:
        self.k.int8_quantize_pack(x.data_ptr(), _DTYPE_CODES[x.dtype], n, n_pad, world, res.data_ptr(),
                                  send.data_ptr(), self._s())

    def dequant_sum_requant(self, recv, world, shard, res, own) -> None:
        self.k.int8_dequant_sum_requant(recv.data_ptr(), world, shard, res.data_ptr(), own.data_ptr(), self._s())

    def unpack_dequantize(self, gathered, world, shard, out, n) -> None:
        self.k.int8_unpack_dequantize(gathered.data_ptr(), world, shard, out.data_ptr(), _DTYPE_CODES[out.dtype], n,
                                      self._s())

    def block_absmax(self, x, n, n_pad, res, absmax) -> None:
        self.k.int8_block_absmax(x.data_ptr(), _DTYPE_CODES[x.dtype], n, n_pad, res.data_ptr(), absmax.data_ptr(),
                                 self._s())

    def quantize_pack_shared(self, x, n, n_pad, world, res, absmax, send, scales) -> None:
        self.k.int8_quantize_pack_shared(x.data_ptr(), _DTYPE_CODES[x.dtype], n, n_pad, world, res.data_ptr(),
                                         absmax.data_ptr(), send.data_ptr(), scales.data_ptr(), self._s())

    def dequant_sum_requant_shared(self, recv, world, shard, shared_scales, res, own) -> None:
        self.k.int8_dequant_sum_requant_shared(recv.data_ptr(), world, shard, shared_scales.data_ptr(),
                                               res.data_ptr(), own.data_ptr(), self._s())


# ---------------------------------------------------------------------- the exchange as stages

Stage = Callable[[], Optional[Any]]  # runs local work; returns the Work of the collective it issued, or None


def _two_phase(ops: Any, group: Any, world: int, rank: int, x: torch.Tensor, n: int, n_pad: int,
               res_w: torch.Tensor, res_s: torch.Tensor, out: torch.Tensor, out_n: int, deterministic: bool,
               temps: List[torch.Tensor]) -> List[Stage]:
    """The INT8 exchange of ``x[:n]`` (zero-padded to ``n_pad``) among ``group``; the
    dequantized average lands in ``out[:out_n]``."""
    dev = ops.device
    shard = n_pad // world
    sblocks = shard // BLOCK
    packed = shard + 4 * sblocks
    u8 = dict(dtype=torch.uint8, device=dev)
    own = torch.empty(packed, **u8)
    gathered = torch.empty(world * packed, **u8)
    stages: List[Stage] = []
    if deterministic:
        absmax = torch.empty(n_pad // BLOCK, dtype=torch.float32, device=dev)
        scales = torch.empty(n_pad // BLOCK, dtype=torch.float32, device=dev)
        send = torch.empty(world * shard, **u8)
        recv = torch.empty(world * shard, **u8)
        temps += [absmax, scales, send, recv]

        def s0() -> Any:
            ops.block_absmax(x, n, n_pad, res_w, absmax)
            return dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group, async_op=True)

        def s1() -> Any:
            ops.quantize_pack_shared(x, n, n_pad, world, res_w, absmax, send, scales)
            return dist.all_to_all_single(recv, send, group=group, async_op=True)

        def s2() -> Any:
            ops.dequant_sum_requant_shared(recv, world, shard, scales[rank * sblocks:(rank + 1) * sblocks], res_s, own)
            return _gather_fn()(gathered, own, group=group, async_op=True)

        stages += [s0, s1, s2]
    else:
        send = torch.empty(world * packed, **u8)
        recv = torch.empty(world * packed, **u8)
        temps += [send, recv]

        def s1() -> Any:
            ops.quantize_pack(x, n, n_pad, world, res_w, send)
            return dist.all_to_all_single(recv, send, group=group, async_op=True)

        def s2() -> Any:
            ops.dequant_sum_requant(recv, world, shard, res_s, own)
            return _gather_fn()(gathered, own, group=group, async_op=True)

        stages += [s1, s2]
    temps += [own, gathered]

    def s3() -> None:
        ops.unpack_dequantize(gathered, world, shard, out, out_n)

    stages.append(s3)
    return stages


def _drive(stages: List[Stage], device: torch.device, temps: List[torch.Tensor],
           finish: Callable[[], torch.Tensor]) -> torch.futures.Future:
    """Runs the stages, each after the previous collective's future, and completes the
    returned future with ``finish()``. A future not yet complete when its successor would
    be chained (gloo; NCCL completes at enqueue) is waited for first, so every rank issues
    its collectives in the same order whatever the bucket. On CUDA the callbacks run on the
    streams torch gives them (synchronised with the collective); the temporaries are
    recorded on those streams so the caching allocator does not reuse them early."""
    cuda = device.type == "cuda"
    result: torch.futures.Future = torch.futures.Future(devices=[device]) if cuda else torch.futures.Future()
    home = torch.cuda.current_stream(device) if cuda else None

    def run_from(i: int) -> None:
        try:
            if cuda:
                cur = torch.cuda.current_stream(device)
                if cur != home:
                    for t in temps:
                        t.record_stream(cur)
            while i < len(stages):
                work = stages[i]()
                i += 1
                if work is not None:
                    try:
                        fut = work.get_future()
                    except RuntimeError:  # a Work without a future (some gloo collectives): wait for it
                        work.wait()
                        continue
                    if not fut.done():
                        work.wait()
                    nxt = i
                    fut.add_done_callback(lambda f: cont(f, nxt))
                    return
            result.set_result(finish())
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            if not result.done():
                result.set_exception(exc)

    def cont(f: torch.futures.Future, i: int) -> None:
        try:
            f.value()  # raises the collective's error
        except BaseException as exc:  # noqa: BLE001
            if not result.done():
                result.set_exception(exc)
            return
        run_from(i)

    run_from(0)
    return result


def _allreduce(state: Int8CompressState, group: Any, buf: torch.Tensor, world: int) -> torch.futures.Future:
    state._stats["buckets_bypassed"] += 1
    buf.div_(world)
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _ops_for(state: Int8CompressState, buf: torch.Tensor) -> Any:
    if buf.device.type != "cuda":
        return _HostOps()
    ok, why = cuda_kernels_usable()
    if ok:
        return _DeviceOps(buf.device)
    if not state._warned_host:
        state._warned_host = True
        warnings.warn(f"int8_compress_hook: CUDA bucket but the fused kernels are unusable ({why}); running the CPU "
                      "oracle through host copies (slow; the process group must accept CPU tensors)",
                      RuntimeWarning, stacklevel=3)
    return _HostOps()


def int8_compress_hook(state: Int8CompressState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket all-reduced (averaged) through INT8 exchanges.

    Returns a future completed with the bucket tensor (averaged in place). On CUDA the
    future is stream-ordered: no host synchronisation happens in the hook.

    Raises:
        ValueError: an unusable hierarchical configuration (world size not divisible by the
            node size, ``hierarchical=True`` on one node, a sub-group that does not span the
            job), raised at the first compressed bucket.
        RuntimeError: ranks not laid out node by node, hierarchical groups that cannot be
            created, or a failed collective (the latter through the returned future).
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
    hier, L, M, local, node = state._topology(group, world, rank)
    ops = _ops_for(state, buf)
    dev = ops.device
    x = buf
    temps: List[torch.Tensor] = []
    if isinstance(ops, _DeviceOps) and buf.dtype not in _DTYPE_CODES:
        x = buf.float()  # e.g. float64 buckets: staged through fp32
        temps.append(x)
    st = state._stats
    if not hier:
        unit = BLOCK * world
        n_pad = -(-n // unit) * unit
        shard = n_pad // world
        res_w, res_s = state._residual(bucket, n_pad, n_pad, shard, 0, rank * shard, dev)
        # The host oracle writes (converting) straight into the bucket, wherever it lives; the
        # kernels write in place too, except for a bucket dtype they lack (fp32 staging copy).
        out = x if isinstance(ops, _DeviceOps) else buf
        stages = _two_phase(ops, group, world, rank, x, n, n_pad, res_w, res_s, out, n, state.deterministic, temps)

        def finish() -> torch.Tensor:
            if out is not buf:
                buf.copy_(out.reshape(-1)[:n])
            return buf

        int8_bytes = _int8_bytes(world, n_pad, state.deterministic, st)
        st["bytes_sent"] += int8_bytes
    else:
        intra, cross = state._hier_groups(L, M, local, node)
        unit = BLOCK * M * L
        n_pad = -(-n // unit) * unit
        chunk_n = n_pad // L
        shard = chunk_n // M
        res_w, res_s = state._residual(bucket, n_pad, chunk_n, shard, local * chunk_n, node * shard, dev)
        xf = torch.zeros(n_pad, dtype=torch.float32, device=dev)
        chunk = torch.empty(chunk_n, dtype=torch.float32, device=dev)
        out_dtype = buf.dtype if (dev.type == "cpu" or buf.dtype in _DTYPE_CODES) else torch.float32
        out_chunk = torch.empty(chunk_n, dtype=out_dtype, device=dev)
        full = torch.empty(n_pad, dtype=out_dtype, device=dev)
        temps += [xf, chunk, out_chunk, full]

        def h0() -> Any:
            xf[:n].copy_(buf.reshape(-1))
            return _reduce_scatter_fn()(chunk, xf, op=dist.ReduceOp.SUM, group=intra, async_op=True)

        def h1() -> None:
            chunk.div_(L)

        inner = _two_phase(ops, cross, M, node, chunk, chunk_n, chunk_n, res_w, res_s, out_chunk, chunk_n,
                           state.deterministic, temps)

        def h2() -> Any:
            return _gather_fn()(full, out_chunk, group=intra, async_op=True)

        stages = [h0, h1] + inner + [h2]

        def finish() -> torch.Tensor:
            buf.copy_(full[:n])
            return buf

        int8_bytes = _int8_bytes(M, chunk_n, state.deterministic, st)
        fp = (L - 1) * chunk_n * 4 + (L - 1) * chunk_n * out_chunk.element_size()
        st["bytes_sent_full_precision"] += fp
        st["bytes_sent"] += int8_bytes + fp

    st["buckets_compressed"] += 1
    st["bytes_fp32_allreduce"] += 2 * (world - 1) * 4 * n // world
    return _drive(stages, dev if dev.type == "cuda" else torch.device("cpu"), temps, finish)


def _int8_bytes(world: int, n_pad: int, deterministic: bool, st: Dict[str, int]) -> int:
    """Bytes one rank sends in the INT8 exchange of ``n_pad`` values among ``world`` ranks
    (ring collectives), counted into ``st``."""
    shard = n_pad // world
    packed = shard + 4 * (shard // BLOCK)
    if deterministic:
        scale_ar = 2 * (world - 1) * 4 * (n_pad // BLOCK) // world
        b = (world - 1) * shard + (world - 1) * packed + scale_ar
        st["bytes_scale_allreduce"] += scale_ar
    else:
        b = 2 * (world - 1) * packed
    st["bytes_sent_int8"] += b
    return b
