"""The INT8 exchange of one bucket as a chain of Future ``.then`` stages (int8_compress_hook)."""
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .. import _native
from . import ops as _ops
from .ops import BLOCK, DTYPE_CODES, _DeviceOps
from .state import Int8CompressState

Stage = Callable[[], Optional[Any]]  # runs local work; returns the Work of the collective it issued, or None


def _two_phase(ops: Any, group: Any, world: int, rank: int, x: torch.Tensor, n: int, n_pad: int,
               res_w: torch.Tensor, res_s: torch.Tensor, out: torch.Tensor, out_n: int, deterministic: bool,
               temps: List[torch.Tensor]) -> List[Stage]:
    """The INT8 exchange of ``x[:n]`` (zero-padded to ``n_pad``) among ``group`` as stages for
    :func:`_drive` (their temporaries appended to ``temps``); the dequantized average lands in
    ``out[:out_n]``.

    Raises:
        Nothing here: the stages raise (bad sizes, a failed launch or collective) when run.
    """
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


def _allreduce(state: Int8CompressState, group: Any, buf: torch.Tensor, world: int) -> torch.futures.Future:
    """The bucket averaged by a plain all-reduce (divided by W first: no overflow).

    Raises:
        RuntimeError: a failed collective, through the returned future.
    """
    state.counters["buckets_bypassed"] += 1
    buf.div_(world)  # before the sum: W values near the dtype's maximum do not overflow
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


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
    path = _ops.choose_path(buf.device.type, _ops.cuda_kernels_usable()[0] if buf.device.type == "cuda" else False,
                            str(dist.get_backend(group)))
    path = state.agree_path(path, group, world, buf.device)  # one choice on every rank
    if path == "allreduce":  # CUDA bucket, kernels unusable, a group without CPU tensors (NCCL alone)
        _native.warn_cuda_fallback("int8_compress_hook (CUDA bucket, no CPU backend in the group)",
                                   "a plain all-reduce of the bucket (no compression)")
        return _allreduce(state, group, buf, world)

    rank = dist.get_rank(group)
    hier, L, M, local, node = state.topology(group, world, rank,
                                              buf.device if path == "device" else torch.device("cpu"))
    ops = _ops.ops_for(path, buf)
    dev = ops.device
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
        stages = _two_phase(ops, group, world, rank, x, n, n_pad, res_w, res_s, out, n, state.deterministic, temps)

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
        xf = torch.zeros(n_pad, dtype=torch.float32, device=dev)
        chunk = torch.empty(chunk_n, dtype=torch.float32, device=dev)
        out_dtype = buf.dtype if (dev.type == "cpu" or buf.dtype in DTYPE_CODES) else torch.float32
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
