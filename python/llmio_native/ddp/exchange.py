"""The INT8 exchange of one bucket (int8_compress_hook): on CUDA a chain of Future ``.then``
stages on the current stream; for CPU buckets a job on one communication thread per process
(:class:`_CommThread`), so the hook returns at once and the exchange overlaps the rest of the
backward pass, as DDP's own all-reduce does; a large bucket's job pipelines the exchange in pieces
(:func:`_pipelined`)."""
import collections
import os
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _native
from . import ops as _ops
from .ops import BLOCK, DTYPE_CODES, _DeviceOps
from .state import Int8CompressState

# Step timeline for profiling (benchmarks/bench_ddp_hook.py --trace): None (off: one test per
# event), or a list that the hook and the communication thread append
# ``(time.perf_counter(), event, bucket index, piece)`` to. Events: ``hook`` (the hook called),
# ``job`` / ``job_end`` (the exchange on the communication thread), per piece ``quant`` /
# ``quant_end``, ``a2a_done``, ``requant_end``, ``ag_done``, ``unpack_end`` (a bucket exchanged
# whole is piece 0), ``future`` (the hook's future completed).
TRACE: Optional[List[Tuple[float, str, int, int]]] = None


def _mark(event: str, idx: int = -1, k: int = -1) -> None:
    """Appends one event to :data:`TRACE` when tracing is on."""
    tr = TRACE
    if tr is not None:
        tr.append((time.perf_counter(), event, idx, k))


def _all_gather_flat(output: torch.Tensor, inp: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """``inp`` of every rank of ``group``, concatenated into ``output``: ``dist.all_gather_single``
    where torch has it (torch 2.13 renamed ``all_gather_into_tensor`` and warns on the old name),
    else ``dist.all_gather_into_tensor`` (torch 2.0 to 2.12). Looked up at each call.

    Raises:
        RuntimeError: the collective failed (or, with ``async_op``, through its Work).
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, inp, group=group, async_op=async_op)


def _reduce_scatter_flat(output: torch.Tensor, inp: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                         async_op: bool = False) -> Any:
    """``inp`` reduced over ``group``, rank r's slice into ``output``: ``dist.reduce_scatter_single``
    where torch has it (the torch 2.13 name), else ``dist.reduce_scatter_tensor``.

    Raises:
        RuntimeError: the collective failed (or, with ``async_op``, through its Work).
    """
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, inp, op=op, group=group, async_op=async_op)


Stage = Callable[[], Optional[Any]]  # runs local work; returns the Work of the collective it issued, or None


Alloc = Callable[[str, int, torch.dtype], torch.Tensor]  # (name, numel, dtype) -> an uninitialised buffer


def _fresh(dev: torch.device) -> Alloc:
    """Buffers allocated per call (CUDA: the caching allocator reuses them, stream-ordered)."""
    return lambda name, numel, dtype: torch.empty(numel, dtype=dtype, device=dev)


def _two_phase(ops: Any, group: Any, world: int, rank: int, x: torch.Tensor, n: int, n_pad: int,
               res_w: torch.Tensor, res_s: torch.Tensor, out: torch.Tensor, out_n: int, deterministic: bool,
               temps: List[torch.Tensor], alloc: Optional[Alloc] = None, idx: int = -1,
               piece_numel: Optional[int] = None) -> List[Stage]:
    """The INT8 exchange of ``x[:n]`` (zero-padded to ``n_pad``) among ``group`` as stages for
    :func:`_drive` (their temporaries appended to ``temps``); the dequantized average lands in
    ``out[:out_n]``. ``alloc`` gives the temporaries (default: fresh tensors; the host path
    passes the state's per-bucket buffers, kept across steps); ``idx``: the bucket's index, for
    :data:`TRACE`; ``piece_numel``: the pieces of a host exchange (None: :data:`PIECE_NUMEL`).

    Raises:
        Nothing here: the stages raise (bad sizes, a failed launch or collective) when run.
    """
    dev = ops.device
    get = alloc if alloc is not None else _fresh(dev)
    shard = n_pad // world
    sblocks = shard // BLOCK
    bufs = _buffers(get, world, shard, deterministic, temps)
    absmax, scales, send, recv, own, gathered = bufs
    stages: List[Stage] = []
    piece = _piece_values(ops, world, shard, PIECE_NUMEL if piece_numel is None else piece_numel)
    if piece < shard:
        return _pipelined(ops, group, world, rank, x, n, n_pad, res_w, res_s, out, out_n, deterministic, bufs,
                          piece, idx)
    if deterministic:
        assert absmax is not None and scales is not None

        def s0() -> Any:
            ops.block_absmax(x, n, n_pad, res_w, absmax)
            return dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group, async_op=True)

        def s1() -> Any:
            ops.quantize_pack_shared(x, n, n_pad, world, res_w, absmax, send, scales)
            return dist.all_to_all_single(recv, send, group=group, async_op=True)

        def s2() -> Any:
            ops.dequant_sum_requant_shared(recv, world, shard, scales[rank * sblocks:(rank + 1) * sblocks], res_s, own)
            return _all_gather_flat(gathered, own, group=group, async_op=True)

        stages += [s0, s1, s2]
    else:

        def s1() -> Any:
            ops.quantize_pack(x, n, n_pad, world, res_w, send)
            return dist.all_to_all_single(recv, send, group=group, async_op=True)

        def s2() -> Any:
            ops.dequant_sum_requant(recv, world, shard, res_s, own)
            return _all_gather_flat(gathered, own, group=group, async_op=True)

        stages += [s1, s2]

    def s3() -> None:
        ops.unpack_dequantize(gathered, world, shard, out, out_n)

    stages.append(s3)
    return stages


# Host path: a bucket's exchange is cut into pieces of about this many bucket values (a multiple
# of 256 per rank's shard), pipelined on the communication thread: piece k+1 is quantized while
# piece k is on the wire, and piece k is requantized and unpacked while later pieces travel
# (:func:`_pipelined`). A bucket of at most 2 pieces' worth goes whole. The result is bit for bit
# that of the whole-bucket exchange (every block is quantized alike, each rank owns the same
# values). 0: never cut. The default of ``Int8CompressState(piece_numel=None)``.
PIECE_NUMEL = 1 << 19


def _piece_values(ops: Any, world: int, shard: int, piece_numel: int) -> int:
    """Values of each rank's shard per piece of ``piece_numel`` bucket values (a multiple of
    BLOCK; ``shard``: not cut). Only the host path is cut: on CUDA the whole chain is already
    issued inside the hook call."""
    if piece_numel <= 0 or ops.device.type != "cpu" or world * shard < 2 * piece_numel:
        return shard
    return max(BLOCK, piece_numel // world // BLOCK * BLOCK)


def _pipelined(ops: Any, group: Any, world: int, rank: int, x: torch.Tensor, n: int, n_pad: int,
               res_w: torch.Tensor, res_s: torch.Tensor, out: torch.Tensor, out_n: int, deterministic: bool,
               bufs: tuple, piece: int, idx: int = -1) -> List[Stage]:
    """The exchange of :func:`_two_phase` as one stage that cuts it into pieces and pipelines them.

    Piece k holds values ``[k*piece, (k+1)*piece)`` of EVERY rank's shard (so each rank owns the
    same values, with the same shard residual, as in the whole-bucket exchange): rank r's slot of
    the piece's ``all_to_all_single`` is the quantized piece of shard r, the owner requantizes its
    piece of its own shard, and the ``all_gather`` brings every shard's piece back. Collectives are
    issued in one fixed order on every rank (a2a 0, a2a 1, ag 0, a2a 2, ag 1, ...), each waited for
    only when its result is needed, so the wire carries piece k while piece k+1 is quantized. Per
    block the arithmetic is the whole-bucket exchange's: bit for bit the same result, residuals
    and bytes on the wire.

    Raises:
        Nothing here: the stage raises (bad sizes, a failed collective) when run.
    """
    shard = n_pad // world
    starts = list(range(0, shard, piece))
    lens = [min(piece, shard - s) for s in starts]
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    stride = _packed  # bytes of one rank's packed slot of a piece of L values
    absmax, scales, send, recv, own, gathered = bufs  # from _buffers
    slot = (lambda L: L) if deterministic else _packed  # phase 1 sends codes only when deterministic

    def valid(off: int, L: int) -> int:  # values of the bucket (not padding) among [off, off + L)
        return max(0, min(L, n - off))

    def quantize(k: int) -> Any:
        s, L = starts[k], lens[k]
        _mark("quant", idx, k)
        base = world * slot(s)
        for r in range(world):
            off = r * shard + s
            dst = send[base + r * slot(L):base + (r + 1) * slot(L)]
            if deterministic:
                b0, nb = off // BLOCK, L // BLOCK
                ops.quantize_pack_shared(flat_x[off:], valid(off, L), L, 1, res_w[off:off + L],
                                         absmax[b0:b0 + nb], dst, scales[b0:b0 + nb])
            else:
                ops.quantize_pack(flat_x[off:], valid(off, L), L, 1, res_w[off:off + L], dst)
        _mark("quant_end", idx, k)
        return dist.all_to_all_single(recv[base:base + world * slot(L)], send[base:base + world * slot(L)],
                                      group=group, async_op=True)

    def requant(k: int, a2a: Any) -> Any:
        s, L = starts[k], lens[k]
        a2a.wait()
        _mark("a2a_done", idx, k)
        got = recv[world * slot(s):world * slot(s + L)]
        mine = own[stride(s):stride(s + L)]
        if deterministic:
            b0 = (rank * shard + s) // BLOCK
            ops.dequant_sum_requant_shared(got, world, L, scales[b0:b0 + L // BLOCK], res_s[s:s + L], mine)
        else:
            ops.dequant_sum_requant(got, world, L, res_s[s:s + L], mine)
        _mark("requant_end", idx, k)
        return _all_gather_flat(gathered[world * stride(s):world * stride(s + L)], mine, group=group,
                                           async_op=True)

    def unpack(k: int, ag: Any) -> None:
        s, L = starts[k], lens[k]
        ag.wait()
        _mark("ag_done", idx, k)
        base = world * stride(s)
        for r in range(world):
            off = r * shard + s
            m = max(0, min(L, out_n - off))
            if m:
                ops.unpack_dequantize(gathered[base + r * stride(L):base + (r + 1) * stride(L)], 1, L,
                                      flat_out[off:], m)
        _mark("unpack_end", idx, k)

    def run() -> None:
        if deterministic:
            ops.block_absmax(x, n, n_pad, res_w, absmax)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group, async_op=True).wait()
        a2a = {0: quantize(0)}
        ag = {}
        for k in range(len(starts)):
            if k + 1 < len(starts):
                a2a[k + 1] = quantize(k + 1)  # on the wire while piece k is requantized
            ag[k] = requant(k, a2a.pop(k))
            if k:
                unpack(k - 1, ag.pop(k - 1))
        unpack(len(starts) - 1, ag.pop(len(starts) - 1))

    return [run]


def _buffers(get: Alloc, world: int, shard: int, deterministic: bool, temps: List[torch.Tensor]) -> tuple:
    """The exchange's temporaries, appended to ``temps``: ``(absmax, scales, send, recv, own,
    gathered)``. ``absmax``/``scales`` (one per block of the bucket) exist only when
    ``deterministic`` (else None); phase 1's ``send``/``recv`` then carry codes only, otherwise
    codes and block scales; ``own`` is this rank's requantized shard, ``gathered`` every rank's."""
    absmax = scales = None
    if deterministic:
        absmax = get("absmax", world * shard // BLOCK, torch.float32)
        scales = get("scales", world * shard // BLOCK, torch.float32)
        temps += [absmax, scales]
    slot = shard if deterministic else _packed(shard)
    send = get("send", world * slot, torch.uint8)
    recv = get("recv", world * slot, torch.uint8)
    own = get("own", _packed(shard), torch.uint8)
    gathered = get("gathered", world * _packed(shard), torch.uint8)
    temps += [send, recv, own, gathered]
    return absmax, scales, send, recv, own, gathered


def _packed(values: int) -> int:
    """Bytes of ``values`` codes (a multiple of BLOCK) and their block scales."""
    return values + 4 * (values // BLOCK)


def _collective_future(work: Any, device: torch.device, temps: List[torch.Tensor]) -> torch.futures.Future:
    """The completed future of the collective ``work`` a stage issued (``None``: no collective).

    Waited for here when not complete at once (gloo; NCCL completes at enqueue and ``wait``
    only orders the current stream after it), so every rank issues its collectives in the same
    order whatever the bucket. Its value holds the device temporaries, so the next ``.then``
    stage runs on a stream ordered after this one's kernels.

    Raises:
        RuntimeError: the collective failed.
    """
    if work is not None:
        try:
            fut = work.get_future()
        except RuntimeError:  # a Work without a future (some gloo collectives): wait for it
            work.wait()
        else:
            fut.wait()  # raises the collective's error; CUDA: the current stream waits for it
    done: torch.futures.Future = torch.futures.Future(devices=[device]) if device.type == "cuda" \
        else torch.futures.Future()
    done.set_result(list(temps))
    return done


def _drive(stages: List[Stage], device: torch.device, temps: List[torch.Tensor],
           finish: Callable[[], torch.Tensor]) -> torch.futures.Future:
    """Runs the stages as a Future ``.then`` chain, as PyTorch's own comm hooks do: the first
    on the caller's stream, each next one in a callback of the previous stage's future, and
    completes the returned future with ``finish()``. A collective not complete when its stage
    returns (gloo; NCCL completes at enqueue) is waited for first, so the whole chain is issued
    inside the hook call and every rank issues its collectives in the same order. On CUDA the
    callbacks run on the streams torch gives them (ordered after the previous stage); the
    temporaries are recorded on those streams so the caching allocator does not reuse them
    early. An error (a stage's or a collective's) is delivered through the returned future.

    Raises:
        Nothing directly: errors complete the returned future.
    """
    cuda = device.type == "cuda"
    home = torch.cuda.current_stream(device) if cuda else None

    def run(stage: Stage) -> torch.futures.Future:
        if cuda:
            cur = torch.cuda.current_stream(device)
            if cur != home:
                for t in temps:
                    t.record_stream(cur)
        return _collective_future(stage(), device, temps)

    def then(stage: Stage) -> Callable[[torch.futures.Future], Any]:
        def cb(prev: torch.futures.Future) -> Any:
            prev.value()  # re-raises an earlier stage's error
            return run(stage).value()
        return cb

    try:
        fut = run(stages[0])
    except BaseException as exc:  # noqa: BLE001 - delivered through the future
        fut = torch.futures.Future(devices=[device]) if cuda else torch.futures.Future()
        fut.set_exception(exc)
    for stage in stages[1:]:
        fut = fut.then(then(stage))

    def done(prev: torch.futures.Future) -> torch.Tensor:
        prev.value()
        if cuda:
            cur = torch.cuda.current_stream(device)
            if cur != home:
                for t in temps:
                    t.record_stream(cur)
        return finish()

    return fut.then(done)


# Host-path exchanges run on the communication thread (overlapping backward). False: inside the
# hook call, as before (kept for tests that compare the two bit for bit, and for debugging).
HOST_ASYNC = True

Job = Callable[[], Any]  # returns the bucket tensor, or a Future completed with it


class _CommThread:
    """One daemon thread per process that runs the host path's exchanges one after another,
    in the order the hooks submitted them.

    Every rank must issue its collectives in the same order (gloo pairs them by sequence).
    DDP calls the hook bucket by bucket in the same order on every rank; running all of a
    process's host-path collectives (plain all-reduces of small buckets included) on this one
    thread, FIFO, keeps that order, while the autograd thread goes on with backward. Collectives
    the hook issues on the caller's thread (the one-time path and topology agreement, group
    creation) first :meth:`drain` the queue, and so does the last bucket of a step (DDP may issue
    its own collectives, e.g. the unused-parameter map, right after it). A job returns the
    bucket, or a future (a plain all-reduce issued asynchronously) whose result completes the
    hook's future; errors complete it exceptionally. Recreated after ``fork``.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._jobs: Deque[Tuple[Job, torch.futures.Future]] = collections.deque()
        self._busy = 0  # jobs queued or running
        self._thread: Optional[threading.Thread] = None
        self._pid = -1

    def submit(self, job: Job) -> torch.futures.Future:
        """Queues ``job``; returns the future it completes.

        Raises:
            RuntimeError: the thread could not be started.
        """
        fut: torch.futures.Future = torch.futures.Future()
        with self._cv:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs.clear()  # a forked child inherits none of the parent's work
                self._busy = 0
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="llmio-int8-comm", daemon=True)
                self._thread.start()
            self._jobs.append((job, fut))
            self._busy += 1
            self._cv.notify_all()
        return fut

    def drain(self) -> None:
        """Waits until every queued job has issued all its collectives (and finished its work).

        Raises:
            Nothing: a failed job reports through its own future.
        """
        with self._cv:
            if self._thread is None or self._pid != os.getpid():
                return
            self._cv.wait_for(lambda: self._busy == 0)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: len(self._jobs) > 0)
                job, fut = self._jobs.popleft()
            try:
                res = job()
            except BaseException as exc:  # noqa: BLE001 - delivered through the hook's future
                res = exc
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()
            _complete(fut, res)


def _complete(fut: torch.futures.Future, res: Any) -> None:
    """Completes ``fut`` with ``res`` (a tensor, an exception, or a future to follow)."""
    if isinstance(res, BaseException):
        fut.set_exception(res)
    elif isinstance(res, torch._C.Future):  # torch.futures.Future and the collectives' futures
        def follow(f: torch.futures.Future) -> None:
            try:
                fut.set_result(f.value())
            except BaseException as exc:  # noqa: BLE001 - delivered through the hook's future
                fut.set_exception(exc)
        res.add_done_callback(follow)
    else:
        fut.set_result(res)


_COMM = _CommThread()


def _run_stages(stages: List[Stage], finish: Callable[[], torch.Tensor], idx: int = -1) -> torch.Tensor:
    """The stages one after another on this thread, each collective waited for before the next
    stage (which needs its result); then ``finish()``. ``idx``: the bucket's index, for
    :data:`TRACE` (``stage_end`` / ``wait_done``, piece = the stage's position).

    Raises:
        RuntimeError: a failed collective; whatever a stage raises.
    """
    _mark("job", idx)
    for i, stage in enumerate(stages):
        work = stage()
        _mark("stage_end", idx, i)
        if work is not None:
            work.wait()
            _mark("wait_done", idx, i)
    out = finish()
    _mark("job_end", idx)
    return out


def _allreduce(state: Int8CompressState, group: Any, buf: torch.Tensor, world: int) -> torch.futures.Future:
    """The bucket averaged by a plain all-reduce (divided by W first: no overflow).

    Raises:
        RuntimeError: a failed collective, through the returned future.
    """
    state.counters["buckets_bypassed"] += 1
    return _allreduce_issue(group, buf, world)


def int8_compress_hook(state: Int8CompressState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket all-reduced (averaged) through INT8 exchanges.

    Returns a future completed with the bucket tensor (averaged in place). On CUDA the
    future is stream-ordered: no host synchronisation happens in the hook. For a CPU bucket the
    exchange runs on the communication thread (:class:`_CommThread`) and the future completes
    when it is done, so it overlaps the rest of the backward pass; the last bucket of a step
    returns once every queued collective has been issued.

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
    _mark("hook", bucket.index())
    if HOST_ASYNC and world > 1 and buf.device.type == "cpu":
        fut = _hook_queued(state, bucket, group, world)
        if bucket.is_last():
            _COMM.drain()  # DDP may issue its own collectives right after the last bucket
        return fut
    return _hook_now(state, bucket, group, world)


def _hook_queued(state: Int8CompressState, bucket: dist.GradBucket, group: Any,
                 world: int) -> torch.futures.Future:
    """A CPU bucket: the hook's decisions and bookkeeping here, the exchange (or the plain
    all-reduce) queued on the communication thread. Returns the job's future.

    Raises:
        ValueError / RuntimeError: as :func:`int8_compress_hook` (configuration errors).
    """
    if not state.settled(world):
        _COMM.drain()  # the one-time agreement collectives below run on this thread
    prepared = _prepare(state, bucket, group, world, host_buffers=True)
    if prepared is None:  # a plain all-reduce, issued in order on the communication thread
        buf = bucket.buffer()
        return _COMM.submit(lambda: _allreduce_issue(group, buf, world))
    stages, _dev, _temps, finish = prepared
    idx = bucket.index()
    fut = _COMM.submit(lambda: _run_stages(stages, finish, idx))
    if TRACE is not None:
        fut.add_done_callback(lambda f: _mark("future", idx))
    return fut


def _hook_now(state: Int8CompressState, bucket: dist.GradBucket, group: Any, world: int) -> torch.futures.Future:
    """CUDA buckets (and everything with ``HOST_ASYNC`` off): the exchange issued inside the
    hook call as a Future chain (:func:`_drive`).

    Raises:
        ValueError / RuntimeError: as :func:`int8_compress_hook` (configuration errors).
    """
    prepared = _prepare(state, bucket, group, world, host_buffers=False)
    if prepared is None:
        return _allreduce_issue(group, bucket.buffer(), world)
    stages, dev, temps, finish = prepared
    return _drive(stages, dev, temps, finish)


def _allreduce_issue(group: Any, buf: torch.Tensor, world: int) -> torch.futures.Future:
    """The bucket averaged by a plain all-reduce (divided by W first: no overflow), issued now;
    the future completes with the bucket.

    Raises:
        RuntimeError: the collective could not be issued.
    """
    buf.div_(world)  # before the sum: W values near the dtype's maximum do not overflow
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _prepare(state: Int8CompressState, bucket: dist.GradBucket, group: Any, world: int,
             host_buffers: bool) -> Optional[Tuple[List[Stage], torch.device, List[torch.Tensor],
                                                   Callable[[], torch.Tensor]]]:
    """Everything of the hook but running the exchange: counters, the path agreed by every rank,
    the topology, residuals; returns the stages, their device and temporaries and the finishing
    step, or None for a plain all-reduce (counted as bypassed). ``host_buffers``: temporaries
    from the state's per-bucket buffers (kept across steps) instead of fresh tensors.

    Raises:
        ValueError / RuntimeError: as :func:`int8_compress_hook` (configuration errors).
    """
    buf = bucket.buffer()
    n = buf.numel()
    if bucket.is_last():
        state.iteration += 1
    if world == 1 or state.iteration <= state.warmup_steps or n < state.min_numel:
        state.counters["buckets_bypassed"] += 1
        return None
    path = _ops.choose_path(buf.device.type, _ops.cuda_kernels_usable()[0] if buf.device.type == "cuda" else False,
                            str(dist.get_backend(group)))
    path = state.agree_path(path, group, world, buf.device)  # one choice on every rank
    if path == "allreduce":  # CUDA bucket, kernels unusable, a group without CPU tensors (NCCL alone)
        _native.warn_cuda_fallback("int8_compress_hook (CUDA bucket, no CPU backend in the group)",
                                   "a plain all-reduce of the bucket (no compression)")
        state.counters["buckets_bypassed"] += 1
        return None

    rank = dist.get_rank(group)
    hier, L, M, local, node = state.topology(group, world, rank,
                                              buf.device if path == "device" else torch.device("cpu"))
    ops = _ops.ops_for(path, buf)
    dev = ops.device
    idx = bucket.index()
    alloc: Alloc = ((lambda name, numel, dtype: state.host_buffer(idx, name, numel, dtype))
                    if host_buffers and dev.type == "cpu" else _fresh(dev))
    x = buf
    temps: List[torch.Tensor] = []
    if isinstance(ops, _DeviceOps) and buf.dtype not in DTYPE_CODES:
        x = buf.float()  # e.g. float64 buckets: staged through fp32
        temps.append(x)
    st = state.counters
    if not hier:
        unit = BLOCK * world
        n_pad = -(-n // unit) * unit
        shard = n_pad // world
        res_w, res_s = state.residual_buffers(bucket, n_pad, n_pad, shard, 0, rank * shard, dev)
        # The host oracle writes (converting) straight into the bucket, wherever it lives; the
        # kernels write in place too, except for a bucket dtype they lack (fp32 staging copy).
        out = x if isinstance(ops, _DeviceOps) else buf
        stages = _two_phase(ops, group, world, rank, x, n, n_pad, res_w, res_s, out, n, state.deterministic, temps,
                            alloc, idx, state.piece_numel)

        def finish() -> torch.Tensor:
            if out is not buf:
                buf.copy_(out.reshape(-1)[:n])
            return buf

        int8_bytes = _int8_bytes(world, n_pad, state.deterministic, st)
        st["bytes_sent"] += int8_bytes
    else:
        intra, cross = state.hier_groups(L, M, local, node)
        unit = BLOCK * M * L
        n_pad = -(-n // unit) * unit
        chunk_n = n_pad // L
        shard = chunk_n // M
        res_w, res_s = state.residual_buffers(bucket, n_pad, chunk_n, shard, local * chunk_n, node * shard, dev)
        xf = alloc("h_xf", n_pad, torch.float32)
        chunk = alloc("h_chunk", chunk_n, torch.float32)
        out_dtype = buf.dtype if (dev.type == "cpu" or buf.dtype in DTYPE_CODES) else torch.float32
        out_chunk = alloc("h_out_chunk", chunk_n, out_dtype)
        full = alloc("h_full", n_pad, out_dtype)
        temps += [xf, chunk, out_chunk, full]

        def h0() -> Any:
            xf[:n].copy_(buf.reshape(-1))
            xf[n:].zero_()
            xf.div_(L)  # scaled before the sum: L values near the fp32 maximum do not overflow
            return _reduce_scatter_flat(chunk, xf, op=dist.ReduceOp.SUM, group=intra, async_op=True)

        inner = _two_phase(ops, cross, M, node, chunk, chunk_n, chunk_n, res_w, res_s, out_chunk, chunk_n,
                           state.deterministic, temps, alloc, idx, state.piece_numel)

        def h2() -> Any:
            return _all_gather_flat(full, out_chunk, group=intra, async_op=True)

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
    return stages, (dev if dev.type == "cuda" else torch.device("cpu")), temps, finish


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
