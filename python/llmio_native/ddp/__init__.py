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

* CPU buckets (gloo): the fast C++ kernels (``llmio_native._core.int8_*_fast``,
  csrc/quant/int8_fast.cpp: fused, AVX2 / AVX-512 with runtime dispatch, a small thread pool for
  large buckets, bit-identical to the oracle and to the CUDA kernels), reading and writing the
  bucket in place, with per-bucket buffers kept across steps. The exchange runs on one
  communication thread per process (FIFO, so every rank issues its collectives in the same
  order), and the hook returns at once: communication overlaps the rest of the backward pass.
  The last bucket of a step returns once all queued collectives are issued. A large bucket
  (over 2 * ``piece_numel`` values: ``Int8CompressState(piece_numel=)``, default
  ``exchange.PIECE_NUMEL`` = 2**19) is exchanged in pieces,
  pipelined: piece k+1 is quantized while piece k is on the wire (piece k holds the same part of
  every rank's shard, so ownership, residuals, the result and the bytes are the whole bucket's,
  bit for bit). DDP's default 25 MB buckets put most of a small model's gradients into one
  bucket that is ready only at the end of backward; a smaller ``bucket_cap_mb`` lets the earlier
  buckets travel during backward (benchmarks/bench_ddp_hook.py measures both).
* CUDA buckets with ``llmio_native._cuda`` usable: three fused kernels on the bucket's
  device, on ``torch.cuda.current_stream()`` — (a) residual-add + absmax + quantize + pack,
  ``all_to_all_single``, (b) dequantize-sum-requantize of the owned shard,
  ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.13), (c) dequantize into the bucket — chained through the
  collectives' futures, with residuals as device tensors: no host synchronisation and no
  host copy. With NCCL the futures complete when the collective is enqueued, so the whole
  chain is issued inside the hook call and every rank issues its collectives in the same
  order. (A collective whose future is not complete at once is waited for before the next
  one is issued, for the same reason.)
* CUDA buckets without a usable ``_cuda`` (``_native.cuda_usable()`` false: not built, or
  no driver): the CPU kernels through host copies, inside the hook call, when the process group accepts CPU tensors
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

Layout: :mod:`.state` (Int8CompressState: settings, residual bookkeeping, state_dict),
:mod:`.ops` (the CUDA kernels and the fast CPU kernels, the path choice), :mod:`.exchange`
(int8_compress_hook: the exchange as a chain of Future ``.then`` stages on CUDA, a job on the
communication thread for CPU buckets).
"""
from .exchange import _allreduce, _drive, _int8_bytes, _two_phase, int8_compress_hook
from .ops import (BLOCK, DTYPE_CODES, _DeviceOps, _HostOps, _ops_for, choose_path, cuda_kernels_usable, ops_for,
                  group_takes_cpu_tensors)
from .state import Int8CompressState

# Pickles name the class by its public path (llmio_native.ddp.Int8CompressState), as the
# single-module ddp.py did: old pickles load, and new ones load in old versions.
Int8CompressState.__module__ = __name__

__all__ = ["Int8CompressState", "int8_compress_hook", "cuda_kernels_usable", "choose_path",
           "group_takes_cpu_tensors", "BLOCK", "DTYPE_CODES"]
