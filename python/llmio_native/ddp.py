"""INT8 gradient compression as a DistributedDataParallel comm hook.

    from llmio_native.ddp import Int8CompressState, int8_compress_hook
    ddp_model.register_comm_hook(Int8CompressState(process_group=None), int8_compress_hook)

Two-phase all-reduce of each bucket (DESIGN.md, "INT8 gradient hook"):

1. Every rank adds its worker residual, quantizes blockwise (256 values, symmetric absmax,
   fp32 scale, round half to even) and keeps the quantization error as the new residual.
2. ``all_to_all_single``: rank ``r`` receives every rank's quantized copy of shard ``r``.
3. The owner dequantizes the W copies in rank order, divides each by W before adding it
   (fp32; values near the fp32 maximum on several ranks do not overflow), adds its shard
   residual and requantizes (keeping that error as the shard residual).
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
* CUDA buckets without a usable ``_cuda`` (``_native.cuda_usable()`` false: not built, or
  no driver): the CPU oracle through host copies when the process group accepts CPU tensors
  (gloo, or a ``"cpu:gloo,cuda:nccl"`` group), else (NCCL alone) a plain all-reduce of the
  bucket; either with a one-time ``RuntimeWarning`` (:func:`choose_path`).

``deterministic=True``: the phase-1 scales are shared by all ranks (one all-reduce MAX of the
per-block absmax of x + residual, N/256 fp32 values), phase 1 sends codes only, and the owner
sums the integer codes exactly (int32) — the result does not depend on the order in which
contributions arrive; it scales the mean code (sum / W, at most 127) so it cannot overflow.
Phase 2 is quantized by the owner alone, so its scales are unique by
construction. Extra bytes: 2 (W-1)/W * 4N/256 for the all-reduce, less (W-1)/W * 4N/256 of
scales not sent in phase 1: (W-1)/W * 4N/256 in all (``stats()["bytes_scale_allreduce"]``).

``hierarchical`` (``None``: on when the group spans more than one node, from
``local_world_size`` or ``LOCAL_WORLD_SIZE``): an fp32 reduce-scatter inside each node
(``L`` ranks), the INT8 two-phase exchange of each rank's chunk across the ``M`` nodes among
the ranks with the same local rank, and an all-gather inside the node. Ranks must be laid out
node by node (rank = node * L + local rank, as torchrun does); every rank checks its own
view and one all-reduce before any ``new_group`` shares the verdicts, so a bad layout raises
on every rank. Each rank's values are divided by L before the intra-node sum (no overflow).
Inter-node bytes per rank:
2 (M-1)/M * (N/L) * (1 + 4/256).
"""
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _native
from ._native import _core

BLOCK = _core.QUANT_BLOCK
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CUDA_USABLE: Optional[Tuple[bool, str]] = None


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


# a parameter name (str), ("ptr", data_ptr) in this process, or ("bucket", index, position, all the bucket's
# parameter shapes): a slice of a bucket, restored only into a bucket with the same index and shapes
_ParamKey = Any


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
        model: the module whose gradients are reduced (optional; see :meth:`bind`): residuals
            are then pickled per parameter name.

    Residuals are kept per parameter: :meth:`state_dict` / :meth:`load_state_dict` save and
    restore them by parameter name (worker and shard residuals apart, so a restart with the
    same bucket layout continues bit for bit; another layout gets them per parameter).
    Pickling (without the process group and the hierarchical sub-groups, as PowerSGDState
    does) keeps them per parameter name where the state knows the names (``model=``,
    :meth:`bind`, or an earlier :meth:`state_dict` / :meth:`load_state_dict`), else per
    parameter slice of each bucket (restored into a bucket with the same index and parameter
    shapes: pass ``model=`` where layers repeat), never by memory address.

    Raises:
        ValueError: a negative ``warmup_steps`` / ``min_numel``, a ``local_world_size`` < 1,
            or ``hierarchical`` not None/True/False.
    """

    __slots__ = ("process_group", "warmup_steps", "min_numel", "iteration", "_residuals", "_signatures",
                 "_stats", "_bucket_params", "_pending", "deterministic", "hierarchical", "local_world_size",
                 "_layout", "_topo", "_groups", "_warned_host", "_names")

    def __init__(self, process_group: Any = None, warmup_steps: int = 2, min_numel: int = 1024,
                 deterministic: bool = False, hierarchical: Optional[bool] = None,
                 local_world_size: Optional[int] = None, model: Optional[torch.nn.Module] = None) -> None:
        if warmup_steps < 0 or min_numel < 0:
            raise ValueError(f"warmup_steps and min_numel must be >= 0, got warmup_steps={warmup_steps}, "
                             f"min_numel={min_numel}")
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
        # bucket index -> [(data_ptr, numel, shape)] in bucket order, refreshed at every compressed step
        self._bucket_params: Dict[int, List[Tuple[int, int, tuple]]] = {}
        # parameter key -> (worker residual, shard residual) [numel] each, waiting for its bucket
        self._pending: Dict[_ParamKey, Tuple[np.ndarray, np.ndarray]] = {}
        self._names: Dict[int, str] = {}  # data_ptr -> parameter name (this process only)
        self._topo: Optional[tuple] = None
        self._groups: Optional[tuple] = None  # (intra-node group, cross-node group), created lazily
        self._warned_host = False
        if model is not None:
            self.bind(model)

    def __getstate__(self) -> Dict[str, Any]:
        skip = ("process_group", "_groups", "_topo", "_names", "_residuals", "_signatures", "_layout",
                "_bucket_params", "_pending")
        state = {k: getattr(self, k) for k in self.__slots__ if k not in skip}
        # Residuals leave per parameter: by name where known, else by bucket slice; never by
        # address (a new process has new tensors).
        pending: Dict[_ParamKey, Tuple[np.ndarray, np.ndarray]] = {}
        for key, ent in self._pending.items():
            if isinstance(key, tuple) and key[0] == "ptr":
                if key[1] in self._names:
                    pending[self._names[key[1]]] = ent
            else:
                pending[key] = ent
        for idx in self._residuals:
            for key, w, sr in self._export(idx, portable=True):
                pending[key] = (w, sr)
        state["_pending"] = pending
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.process_group = None
        self._groups = None
        self._topo = None
        # defaults for states pickled before these settings existed
        self.deterministic, self.hierarchical, self.local_world_size = False, None, None
        self._layout, self._warned_host, self._names = {}, False, {}
        self._residuals, self._signatures, self._bucket_params, self._pending = {}, {}, {}, {}
        for k, v in state.items():
            if k in ("_residuals", "_signatures", "_layout", "_bucket_params"):
                continue  # old pickles: keyed by addresses of another process
            setattr(self, k, v)

    def bind(self, model: torch.nn.Module) -> None:
        """Learns the parameter names of ``model`` (the module DDP wraps, or the DDP module),
        so residuals are pickled and checkpointed per name.

        Raises:
            TypeError: ``model`` is not a ``torch.nn.Module``.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Int8CompressState.bind: model must be a torch.nn.Module, got {type(model).__name__}")
        names = {}
        for n, p in model.named_parameters():
            names[p.data_ptr()] = n[len("module."):] if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
                and n.startswith("module.") else n
        self._names = names

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

    def _export(self, idx: int, portable: bool) -> List[Tuple[_ParamKey, np.ndarray, np.ndarray]]:
        """Bucket ``idx``'s residuals per parameter: (key, worker [numel], shard [numel], zero
        outside the part of the parameter in this rank's shard). Key: the name when known,
        else ("ptr", data_ptr) (this process) or, ``portable``, ("bucket", idx, position, shape)."""
        worker, shard_res = self._residuals[idx]
        w = worker.detach().float().cpu().numpy()
        sr = shard_res.detach().float().cpu().numpy()
        chunk_off, shard_off = self._layout.get(idx, (0, 0))
        params = self._bucket_params.get(idx, [])
        n_pad = max(self._signatures[idx][0] if idx in self._signatures else w.size, chunk_off + w.size)
        tw = np.zeros(n_pad, np.float32)
        ts = np.zeros(n_pad, np.float32)
        tw[chunk_off:chunk_off + w.size] = w
        ts[chunk_off + shard_off:chunk_off + shard_off + sr.size] = sr
        out = []
        off = 0
        for pos, (ptr, numel, shape) in enumerate(params):
            key = self._names.get(ptr)
            if key is None:  # a bucket slice: the bucket's index, the position in it and all its shapes
                key = ("bucket", idx, pos, tuple(q[2] for q in params)) if portable else ("ptr", ptr)
            out.append((key, tw[off:off + numel].copy(), ts[off:off + numel].copy()))
            off += numel
        return out

    def state_dict(self, model: torch.nn.Module) -> Dict[str, Any]:
        """This rank's residuals per parameter name of ``model`` (version 2), so a checkpoint
        survives a restart (new tensors) and a different ``bucket_cap_mb``:
        ``{"version": 2, "iteration": int, "residuals": {name: float32 [numel]} (worker
        residuals), "shard_residuals": {name: float32 [numel]} (the owner's shard residual,
        zero outside this rank's shard; only parameters with a nonzero one)}``. In hierarchical
        mode a rank holds residuals only for the chunk of each bucket it compresses; the other
        values are saved as zeros.

        Raises:
            TypeError: ``model`` is not a ``torch.nn.Module``.
        """
        self.bind(model)
        res: Dict[str, np.ndarray] = {}
        shard: Dict[str, np.ndarray] = {}
        unnamed = 0

        def put(key: _ParamKey, w: np.ndarray, sr: np.ndarray) -> None:
            nonlocal unnamed
            if isinstance(key, tuple) and key[0] == "ptr":
                key = self._names.get(key[1], key)
            if not isinstance(key, str):
                unnamed += 1
                return
            res[key] = w
            if sr.any():
                shard[key] = sr

        for key, (w, sr) in self._pending.items():  # loaded or unpickled, not yet placed in a bucket
            put(key, w, sr)
        for idx in self._residuals:
            for key, w, sr in self._export(idx, portable=False):
                put(key, w, sr)
        if unnamed:
            warnings.warn(f"Int8CompressState.state_dict: {unnamed} parameter residual(s) could not be named (a "
                          "state unpickled without parameter names; they are restored into the same bucket layout "
                          "at the next step): pass model= to Int8CompressState or call bind(model) before "
                          "pickling", RuntimeWarning, stacklevel=2)
        return {"version": 2, "iteration": self.iteration, "residuals": res, "shard_residuals": shard}

    def load_state_dict(self, sd: Mapping[str, Any], model: torch.nn.Module) -> None:
        """Restore residuals saved by :meth:`state_dict` (version 1 or 2); they are applied per
        parameter when each bucket is next compressed, whatever the new bucket layout (bit for
        bit when the layout is the same).

        Raises:
            TypeError: ``sd`` not a mapping, ``model`` not a module, ``iteration`` not an int,
                ``residuals`` / ``shard_residuals`` not a mapping of name -> array, or a
                residual that is not a numeric array (key, expected and found type named).
            ValueError: an unknown version, a missing key, a negative iteration, a residual
                for a parameter ``model`` does not have, a non-float residual, or a residual
                whose shape does not match its parameter (expected and found shape named).
        """
        if not isinstance(sd, Mapping):
            raise TypeError(f"Int8CompressState.load_state_dict: sd must be a mapping (from state_dict), got "
                            f"{type(sd).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Int8CompressState.load_state_dict: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        where = "Int8CompressState.load_state_dict"
        for k in ("version", "iteration", "residuals"):
            if k not in sd:
                raise ValueError(f"{where}: missing key {k!r} (expected keys 'version', 'iteration', 'residuals'"
                                 f"[, 'shard_residuals']; got {sorted(map(str, sd))})")
        version = sd["version"]
        if isinstance(version, bool) or version not in (1, 2):
            raise ValueError(f"{where}: sd['version'] must be 1 or 2, got {version!r}")
        it = sd["iteration"]
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)):
            raise TypeError(f"{where}: sd['iteration'] must be an int, got {type(it).__name__} ({it!r})")
        if it < 0:
            raise ValueError(f"{where}: sd['iteration'] must be >= 0, got {it}")
        params = dict(model.named_parameters())

        def arrays(key: str) -> Dict[str, np.ndarray]:
            d = sd.get(key, {})
            if not isinstance(d, Mapping):
                raise TypeError(f"{where}: sd[{key!r}] must be a mapping of parameter name -> float32 array, got "
                                f"{type(d).__name__}")
            out = {}
            for name, r in d.items():
                if name not in params:
                    known = sorted(params)
                    raise ValueError(f"{where}: sd[{key!r}] has a residual for {name!r}, which the model does not "
                                     f"have (its parameters: {known[:8]}{' ...' if len(known) > 8 else ''})")
                if isinstance(r, torch.Tensor):
                    r = r.detach().cpu().numpy()
                if not isinstance(r, np.ndarray):
                    raise TypeError(f"{where}: sd[{key!r}][{name!r}] must be a numpy array or tensor, got "
                                    f"{type(r).__name__}")
                if r.dtype.kind != "f":
                    raise ValueError(f"{where}: sd[{key!r}][{name!r}] must hold floats (float32), got dtype {r.dtype}")
                p = params[name]
                if r.size != p.numel() or (r.ndim != 1 and tuple(r.shape) != tuple(p.shape)):
                    raise ValueError(f"{where}: sd[{key!r}][{name!r}] has shape {tuple(r.shape)}, expected "
                                     f"({p.numel()},) or {tuple(p.shape)} (parameter {name!r})")
                out[name] = np.ascontiguousarray(r, np.float32).reshape(-1)
            return out

        worker = arrays("residuals")
        shard = arrays("shard_residuals") if version == 2 else {}
        self.bind(model)
        pending: Dict[_ParamKey, Tuple[np.ndarray, np.ndarray]] = {}
        for name in set(worker) | set(shard):
            n = params[name].numel()
            pending[name] = (worker.get(name, np.zeros(n, np.float32)), shard.get(name, np.zeros(n, np.float32)))
        self._pending = pending
        self.iteration = int(it)
        self._residuals.clear()
        self._signatures.clear()
        self._layout.clear()
        self._bucket_params.clear()

    # ------------------------------------------------------------------ internals

    def _topology_local(self, world: int, rank: int,
                        full_world: Optional[int] = None) -> Tuple[bool, int, int, int, int]:
        """This rank's view: (hierarchical, L ranks per node, M nodes, local rank, node).
        No collective; :meth:`_topology` agrees on the verdict across ranks.

        Raises:
            ValueError: an unusable configuration (sizes named).
            RuntimeError: this rank's ``LOCAL_RANK`` says the ranks are not laid out node by node.
        """
        L = self.local_world_size
        from_env = False
        if L is None and os.environ.get("LOCAL_WORLD_SIZE"):
            L, from_env = int(os.environ["LOCAL_WORLD_SIZE"]), True
        if self.hierarchical is False:
            return (False, world, 1, rank, 0)
        if L is None:
            if self.hierarchical:
                raise ValueError("Int8CompressState(hierarchical=True) needs the node size: pass local_world_size= "
                                 "or set LOCAL_WORLD_SIZE")
            return (False, world, 1, rank, 0)
        if L < 1 or world % L:
            raise ValueError(f"Int8CompressState: world size {world} is not divisible by local_world_size {L}")
        M = world // L
        if self.hierarchical and M == 1:
            raise ValueError(f"Int8CompressState(hierarchical=True) but the group is one node: world size {world}, "
                             f"local_world_size {L}")
        if M > 1:
            full = dist.get_world_size() if full_world is None else full_world
            if world != full:
                raise ValueError(f"Int8CompressState: hierarchical mode needs the process group to span the whole "
                                 f"job (group size {world}, world size {full}): pass hierarchical=False")
            if from_env and os.environ.get("LOCAL_RANK") not in (None, "") and int(os.environ["LOCAL_RANK"]) != rank % L:
                raise RuntimeError(f"Int8CompressState: ranks are not laid out node by node: rank {rank} has "
                                   f"LOCAL_RANK {os.environ['LOCAL_RANK']}, expected {rank} % {L} = {rank % L}")
        return (M > 1, L, M, rank % L, rank // L)

    def _topology(self, group: Any, world: int, rank: int, device: torch.device) -> Tuple[bool, int, int, int, int]:
        """(hierarchical, L, M, local rank, node), agreed by every rank of ``group``: each rank
        checks its own view, then one all-reduce (before any ``new_group``) shares the verdicts
        and node sizes, so a bad layout raises on every rank instead of leaving the others
        waiting in ``new_group``. Cached.

        Raises:
            ValueError: an unusable configuration on any rank (sizes named), or ranks that
                disagree on the node size.
            RuntimeError: ranks not laid out node by node (on any rank).
        """
        if self._topo is not None and self._topo[0] == world:
            return self._topo[1]
        err: Optional[BaseException] = None
        try:
            topo = self._topology_local(world, rank)
        except (ValueError, RuntimeError) as exc:
            err, topo = exc, (False, world, 1, rank, 0)
        if self.hierarchical is not False and world > 1:
            # [code per rank, L per rank]: code 0 fine, 1 ValueError, 2 RuntimeError
            t = torch.zeros(2 * world, dtype=torch.int64, device=device)
            t[rank] = 0 if err is None else (1 if isinstance(err, ValueError) else 2)
            t[world + rank] = topo[1] if topo[0] else 0
            dist.all_reduce(t, group=group)
            codes, sizes = t[:world].tolist(), t[world:].tolist()
            bad = [r for r, c in enumerate(codes) if c]
            if err is not None:
                raise err
            if bad:
                kind = ValueError if codes[bad[0]] == 1 else RuntimeError
                raise kind(f"Int8CompressState: the hierarchical configuration was refused on rank(s) {bad} "
                           f"({'not laid out node by node' if kind is RuntimeError else 'unusable sizes'}; see "
                           "their error); every rank raises")
            if any(s_ != sizes[0] for s_ in sizes):
                raise ValueError(f"Int8CompressState: ranks disagree on local_world_size (per rank, 0 = flat): "
                                 f"{sizes}; set LOCAL_WORLD_SIZE / local_world_size alike on every rank")
        elif err is not None:
            raise err
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
        params = list(bucket.parameters())
        info = [(p.data_ptr(), p.numel(), tuple(p.shape)) for p in params]
        sig = (n_pad, tuple(i[2] for i in info), chunk, shard, chunk_off, shard_off, str(device))
        stale = idx in self._residuals and self._signatures.get(idx) != sig
        if not stale and idx not in self._residuals and self._residuals:
            ptrs = {i[0] for i in info}
            stale = any(q[0] in ptrs for j in self._residuals for q in self._bucket_params.get(j, []))
        if stale:
            # DDP rebuilt its buckets (it does after the first step, and a restart's first step
            # uses the initial layout): every bucket's residuals go back per parameter and are
            # placed into the new buckets as they come.
            for j in list(self._residuals):
                for key, w, sr in self._export(j, portable=False):
                    self._pending[key] = (w, sr)
            self._residuals.clear()
            self._signatures.clear()
            self._layout.clear()
            self._bucket_params.clear()
        if idx not in self._residuals:
            full_w = np.zeros(n_pad, np.float32)
            full_s = np.zeros(n_pad, np.float32)
            off = 0
            for pos, (ptr, numel, shape) in enumerate(info):  # residuals restored per parameter
                name = self._names.get(ptr)
                # every entry for this parameter, summed: e.g. an unpickled bucket-slice residual that
                # waited through a restart's first DDP layout, and what that step left
                slice_key = ("bucket", idx, pos, sig[1])
                for key in ((name,) if name is not None else ()) + (("ptr", ptr), slice_key):
                    ent = self._pending.pop(key, None)
                    if ent is not None:
                        full_w[off:off + numel] += ent[0]
                        full_s[off:off + numel] += ent[1]
                off += numel
            lo, hi = chunk_off + shard_off, chunk_off + shard_off + shard
            shard_res = full_s[lo:hi].copy()  # the part this rank owns now: exact
            full_s[lo:hi] = 0
            fold = full_s != 0  # shard residuals of elements it no longer owns: fed back as worker residual
            full_w[fold] += full_s[fold]
            worker = torch.from_numpy(full_w[chunk_off:chunk_off + chunk].copy()).to(device)
            self._residuals[idx] = (worker, torch.from_numpy(shard_res).to(device))
            self._signatures[idx] = sig
            self._layout[idx] = (chunk_off, shard_off)
        self._bucket_params[idx] = info  # refreshed every step: addresses are this process's
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
            return dist.all_gather_into_tensor(gathered, own, group=group, async_op=True)

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
            return dist.all_gather_into_tensor(gathered, own, group=group, async_op=True)

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
    buf.div_(world)  # before the sum: W values near the dtype's maximum do not overflow
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _ops_for(path: str, buf: torch.Tensor) -> Any:
    """The kernels for a path of :func:`choose_path` (``"device"`` or ``"host"``); warns once
    when a CUDA bucket goes through host copies."""
    if path == "device":
        return _DeviceOps(buf.device)
    if buf.device.type == "cuda":
        _native.warn_cuda_fallback("int8_compress_hook (CUDA bucket)",
                                   "the CPU oracle through host copies (slow; the group takes CPU tensors)")
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
            A bad hierarchical configuration raises on every rank (agreed by one
            all-reduce before any group is created).
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    n = buf.numel()
    if bucket.is_last():
        state.iteration += 1
    if world == 1 or state.iteration <= state.warmup_steps or n < state.min_numel:
        return _allreduce(state, group, buf, world)
    path = choose_path(buf.device.type, cuda_kernels_usable()[0] if buf.device.type == "cuda" else False,
                       str(dist.get_backend(group)))
    if path == "allreduce":  # CUDA bucket, kernels unusable, a group without CPU tensors (NCCL alone)
        _native.warn_cuda_fallback("int8_compress_hook (CUDA bucket, no CPU backend in the group)",
                                   "a plain all-reduce of the bucket (no compression)")
        return _allreduce(state, group, buf, world)

    rank = dist.get_rank(group)
    hier, L, M, local, node = state._topology(group, world, rank,
                                              buf.device if path == "device" else torch.device("cpu"))
    ops = _ops_for(path, buf)
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
            xf.div_(L)  # scaled before the sum: L values near the fp32 maximum do not overflow
            return dist.reduce_scatter_tensor(chunk, xf, op=dist.ReduceOp.SUM, group=intra, async_op=True)

        inner = _two_phase(ops, cross, M, node, chunk, chunk_n, chunk_n, res_w, res_s, out_chunk, chunk_n,
                           state.deterministic, temps)

        def h2() -> Any:
            return dist.all_gather_into_tensor(full, out_chunk, group=intra, async_op=True)

        stages = [h0] + inner + [h2]

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
