"""State of the INT8 comm hook: settings, per-parameter residuals, counters, checkpoints."""
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist


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
        piece_numel: CPU buckets: the exchange of a bucket of more than ``2 * piece_numel``
            values is cut into pieces of about this many values, pipelined (piece k+1 quantized
            while piece k is on the wire; bit for bit the whole bucket's result). 0: never cut.
            ``None``: the module default, ``llmio_native.ddp.exchange.PIECE_NUMEL`` (2**19),
            read at each bucket.

    Residuals are kept per parameter: :meth:`state_dict` / :meth:`load_state_dict` save and
    restore them by parameter name (worker and shard residuals apart, so a restart with the
    same bucket layout continues bit for bit; another layout gets them per parameter).
    Pickling (without the process group and the hierarchical sub-groups, as PowerSGDState
    does) keeps them per parameter name where the state knows the names (``model=``,
    :meth:`bind`, or an earlier :meth:`state_dict` / :meth:`load_state_dict`), else per
    parameter slice of each bucket (restored into a bucket with the same index and parameter
    shapes: pass ``model=`` where layers repeat), never by memory address.

    Raises:
        ValueError: a negative ``warmup_steps`` / ``min_numel`` / ``piece_numel``, a
            ``local_world_size`` < 1, or ``hierarchical`` not None/True/False.
        TypeError: ``piece_numel`` not an int or None.
    """

    __slots__ = ("process_group", "warmup_steps", "min_numel", "iteration", "_residuals", "_signatures",
                 "counters", "_bucket_params", "_pending", "deterministic", "hierarchical", "local_world_size",
                 "_layout", "_topo", "_groups", "_warned_host", "_names", "_path", "_buffers", "piece_numel")

    def __init__(self, process_group: Any = None, warmup_steps: int = 2, min_numel: int = 1024,
                 deterministic: bool = False, hierarchical: Optional[bool] = None,
                 local_world_size: Optional[int] = None, model: Optional[torch.nn.Module] = None,
                 piece_numel: Optional[int] = None) -> None:
        if warmup_steps < 0 or min_numel < 0:
            raise ValueError(f"warmup_steps and min_numel must be >= 0, got warmup_steps={warmup_steps}, "
                             f"min_numel={min_numel}")
        if hierarchical not in (None, True, False):
            raise ValueError(f"hierarchical must be None, True or False, got {hierarchical!r}")
        if local_world_size is not None and int(local_world_size) < 1:
            raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
        if piece_numel is not None:
            if isinstance(piece_numel, bool) or not isinstance(piece_numel, (int, np.integer)):
                raise TypeError(f"piece_numel must be an int or None, got {type(piece_numel).__name__} "
                                f"({piece_numel!r})")
            if piece_numel < 0:
                raise ValueError(f"piece_numel must be >= 0 (0: never cut a bucket), got {piece_numel}")
        self.piece_numel = None if piece_numel is None else int(piece_numel)
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
        self.counters = {"buckets_compressed": 0, "buckets_bypassed": 0, "bytes_sent": 0, "bytes_sent_int8": 0,
                       "bytes_sent_full_precision": 0, "bytes_scale_allreduce": 0, "bytes_fp32_allreduce": 0}
        # bucket index -> [(data_ptr, numel, shape)] in bucket order, refreshed at every compressed step
        self._bucket_params: Dict[int, List[Tuple[int, int, tuple]]] = {}
        # parameter key -> (worker residual, shard residual) [numel] each, waiting for its bucket
        self._pending: Dict[_ParamKey, Tuple[np.ndarray, np.ndarray]] = {}
        self._names: Dict[int, str] = {}  # data_ptr -> parameter name (this process only)
        self._topo: Optional[tuple] = None
        self._path: Optional[tuple] = None  # (world, path every rank agreed on), see agree_path
        self._groups: Optional[tuple] = None  # (intra-node group, cross-node group), created lazily
        self._warned_host = False
        # (bucket index, name) -> host buffer of the exchange, kept across steps (no allocation and
        # page faults per step); used by one job at a time (the communication thread runs them in turn)
        self._buffers: Dict[Tuple[int, str], torch.Tensor] = {}
        if model is not None:
            self.bind(model)

    def __getstate__(self) -> Dict[str, Any]:
        skip = ("process_group", "_groups", "_topo", "_path", "_names", "_residuals", "_signatures", "_layout",
                "_bucket_params", "_pending", "_buffers")
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
        self._path = None
        # defaults for states pickled before these settings existed
        self.deterministic, self.hierarchical, self.local_world_size = False, None, None
        self.piece_numel = None
        self._layout, self._warned_host, self._names, self._buffers = {}, False, {}, {}
        self._residuals, self._signatures, self._bucket_params, self._pending = {}, {}, {}, {}
        for k, v in state.items():
            if k in ("_residuals", "_signatures", "_layout", "_bucket_params"):
                continue  # old pickles: keyed by addresses of another process
            setattr(self, "counters" if k == "_stats" else k, v)  # old pickles name the counters _stats

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
        s = dict(self.counters)
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

    def settled(self, world: int) -> bool:
        """Whether the path and the topology for ``world`` ranks are agreed already (no more
        one-time collectives on the caller's thread), and the hierarchical groups exist if used.

        Raises:
            Nothing.
        """
        if self._path is None or self._path[0] != world or self._topo is None or self._topo[0] != world:
            return False
        return not self._topo[1][0] or self._groups is not None

    def host_buffer(self, idx: int, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Bucket ``idx``'s host buffer ``name`` of ``numel`` values (uninitialised), kept across
        steps and reallocated when the size or dtype changes.

        Raises:
            RuntimeError: out of memory.
        """
        t = self._buffers.get((idx, name))
        if t is None or t.numel() != numel or t.dtype != dtype:
            t = torch.empty(numel, dtype=dtype)
            self._buffers[(idx, name)] = t
        return t

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

    def agree_path(self, path: str, group: Any, world: int, device: torch.device) -> str:
        """The compression path every rank of ``group`` takes: the most conservative of the
        ranks' own choices (``allreduce`` < ``host`` < ``device``), agreed by one all-reduce
        (MIN) at the first compressed bucket and cached. Ranks that chose differently (one
        rank's kernels unusable, another's fine) would otherwise issue different collectives
        and wait on each other forever.

        Raises:
            RuntimeError: the all-reduce failed.
        """
        if world == 1:
            return path
        if self._path is not None and self._path[0] == world:
            return self._path[1]
        order = ("allreduce", "host", "device")
        t = torch.tensor([order.index(path)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        agreed = order[int(t.item())]
        self._path = (world, agreed)
        return agreed

    def topology(self, group: Any, world: int, rank: int, device: torch.device) -> Tuple[bool, int, int, int, int]:
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

    def hier_groups(self, L: int, M: int, local: int, node: int) -> Tuple[Any, Any]:
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

    def residual_buffers(self, bucket: Any, n_pad: int, chunk: int, shard: int, chunk_off: int, shard_off: int,
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
