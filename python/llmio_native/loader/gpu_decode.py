"""The GPU decode path of rans and rans1 sources: staging, decode on the device, status checks.

Per decode group (the chunks of one shuffle group of a source,
``SourcePlan.group_chunks``): a pool thread reads the compressed chunks into one
pinned staging buffer (payloads 4-byte aligned, see :func:`.staging.plan_group_staging`) and checks
their checksums; the consumer thread then copies the buffer to the device on the side
stream and launches the rans kernel there, writing the group's tokens into one device
buffer (the device token cache, one buffer per group, dropped like the host cache once
the stream has passed the group). A batch's rans windows are gathered from those buffers
on the side stream (one advanced-indexing op per buffer: start + arange(T + 1)), and the
current stream waits on an event. The host never touches a token.

Decode errors: the kernel writes a status per chunk; it is copied to pinned host memory
on the side stream behind an event, and checked when the first batch that gathers from
the group is assembled: by then the event has normally completed (the group was launched
while the previous one was consumed) and the check costs nothing; otherwise the host
waits for that side-stream event (counted in stall_s; the training stream is never
synchronised). A bad status raises FormatError naming the shard and chunk before any
batch holding tokens of that group is handed out, so wrong tokens never come out.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any, Callable

import numpy as np
import torch

from ..io import Reader, empty_aligned
from .cuda_path import CudaPath
from .plan import Batch, SourcePlan
from .stats import LoaderStats
from .staging import GroupStaging, fill_staging, plan_group_staging, window_starts

GroupKey = tuple[int, int, int]  # (source, epoch, group)

_SIGNED = {2: torch.int16, 4: torch.int32}
_UNSIGNED_NP = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SIGNED_NP = {2: np.dtype("<i2"), 4: np.dtype("<i4")}
_MASK = {2: 0xFFFF, 4: 0xFFFFFFFF}


def place_plain_chunks(staging: GroupStaging, src: torch.Tensor, out: torch.Tensor) -> None:
    """Copy the staged tokens of the chunks the kernel does not decode (raw chunks, host
    decoded ones) from ``src`` (the staging bytes, uint8) into ``out`` (token buffer of
    int16/int32 standing for uint16/uint32). Runs on any device; consecutive chunks are
    merged into one copy when they are adjacent in both buffers."""
    tb = staging.token_bytes
    ks = np.flatnonzero(~staging.gpu).tolist()
    i = 0
    while i < len(ks):
        k = ks[i]
        so, oo = int(staging.src_offsets[k]), int(staging.out_offsets[k])
        n = int(staging.token_counts[k])
        while (i + 1 < len(ks) and ks[i + 1] == ks[i] + 1
               and int(staging.src_offsets[ks[i + 1]]) == so + n * tb
               and int(staging.out_offsets[ks[i + 1]]) == oo + n):
            i += 1
            n += int(staging.token_counts[ks[i]])
        out[oo:oo + n].copy_(src[so:so + n * tb].view(out.dtype))
        i += 1


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Windows ``tokens[start : start + T + 1]`` for each start, as ``[n, T + 1]`` int64.

    ``tokens`` is a token buffer (int16/int32 standing for uint16/uint32), ``starts`` an
    int64 tensor of first tokens and ``offsets`` ``arange(T + 1)``, all on one device: one
    gather, one widening, one mask, whatever the device."""
    w = tokens[starts[:, None] + offsets[None, :]].to(torch.int64)
    return w.bitwise_and_(_MASK[tokens.element_size()])


class GroupJob:
    """One decode group of the GPU path: staged on the pool, decoded on the device."""

    __slots__ = ("key", "expires", "future", "staging", "tokens", "status", "event", "checked")

    def __init__(self, key: GroupKey, expires: int, future: cf.Future) -> None:
        self.key = key
        self.expires = expires
        self.future: cf.Future | None = future  # -> (GroupStaging, pinned host buffer)
        self.staging: GroupStaging | None = None
        self.tokens: Any = None  # device token buffer once launched
        self.status: Any = None  # per GPU chunk status (pinned host tensor or numpy)
        self.event: Any = None  # completes when ``status`` is valid (None: already valid)
        self.checked = False


#: ``host_rows(batch, slot, rows)``: ``[len(rows), T + 1]`` int64 windows of the batch's host
#: rows (ring and host cache), assembled by the host pipeline; releases the slot.
HostRows = Callable[[Batch, Any, np.ndarray], np.ndarray]


class GpuDecodePath:
    """The device token cache of rans sources (see the module docstring).

    With ``cuda=None`` (a CPU loader, for tests) the same planning, staging, checks, gathers
    and error reporting run on the host: the kernel is replaced by its host emulation
    (``dataset.rans.emulate``) and device tensors by CPU tensors.

    Args:
        datasets, plans: the loader's sources and their plans.
        batch_size, seq_len: B and T.
        pool: the decode pool (staging runs there); reader, file_base: the pipeline's reader
            and the index of each source's first file in it.
        stats: the loader's counters. cuda: the pipeline's CUDA path, or None to emulate.
    """

    def __init__(self, datasets: list[Any], plans: list[SourcePlan], batch_size: int, seq_len: int,
                 pool: cf.ThreadPoolExecutor, reader: Reader, file_base: list[int], stats: LoaderStats,
                 cuda: CudaPath | None) -> None:
        from ..dataset import rans, rans1

        self.datasets, self.plans = datasets, plans
        self.batch_size, self.seq_len = batch_size, seq_len
        self.pool, self.reader, self.file_base = pool, reader, file_base
        self.stats = stats
        self.cuda = cuda
        self.emulate = cuda is None
        self.rans = rans
        # the codec module of each source (emulate / GpuDecoder): rans1 sources run its kernel
        self.codecs = [rans1 if getattr(ds, "codec", "rans") == "rans1" else rans for ds in datasets]
        self.decoders: dict[Any, Any] = {}
        self.jobs: dict[GroupKey, GroupJob] = {}
        T = seq_len
        if cuda is None:
            self.dev = torch.device("cpu")
            self.offsets = torch.arange(T + 1, dtype=torch.int64)
        else:
            self.dev = cuda.device
            self.side = cuda.side
            for mod in set(self.codecs):
                self.decoders[mod] = mod.GpuDecoder(self.dev)
            with torch.cuda.stream(self.side):
                self.offsets = torch.arange(T + 1, dtype=torch.int64, device=self.dev)

    # ---------------------------------------------------------------- staging (pool)
    def open(self, key: GroupKey) -> None:
        """Start staging group ``key`` on the pool (no-op when already open)."""
        if key in self.jobs:
            return
        s, epoch, g = key
        plan = self.plans[s]
        chunks = plan.group_chunks(epoch, g)
        fut = self.pool.submit(self._stage, s, chunks)
        self.jobs[key] = GroupJob(key, plan.group_end_position(epoch, g), fut)

    def open_rows(self, b: Batch) -> None:
        """Open the groups of ``b``'s GPU rows and, for each newly opened one, the group after it."""
        rows = b.gpu_rows
        if not len(rows):
            return
        for key in self.row_keys(b, rows):
            if key not in self.jobs:
                self.open(key)
                s, e, g = key
                self.open((s, *self.plans[s].next_group(e, g)))

    def row_keys(self, b: Batch, rows: np.ndarray) -> list[GroupKey]:
        """The distinct group keys of ``rows`` of ``b``, in first-use order."""
        keys, _ = self._keys(b, rows)
        return keys

    def _keys(self, b: Batch, rows: np.ndarray) -> tuple[list[GroupKey], np.ndarray]:
        """Distinct keys of ``rows`` (first-use order) and each row's index into them."""
        srcs, local = b.sources[rows], b.local[rows]
        table = np.empty((len(rows), 3), dtype=np.int64)
        table[:, 0] = srcs
        for s in np.unique(srcs).tolist():
            m = srcs == s
            table[m, 1], table[m, 2] = self.plans[s].group_keys(local[m])
        uniq, first, inv = np.unique(table, axis=0, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(first, kind="stable")  # first-use order
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        keys = [tuple(k) for k in uniq[order].tolist()]
        return keys, rank[inv]

    def _stage(self, s: int, chunks: list[int]) -> tuple[GroupStaging, Any]:
        ds = self.datasets[s]
        t0 = time.perf_counter()
        st = plan_group_staging(ds, chunks)
        if self.emulate:
            host = empty_aligned(st.staging_bytes)
            view = host
        else:
            host = torch.empty(st.staging_bytes, dtype=torch.uint8, pin_memory=True)
            view = host.numpy()
        fb = self.file_base[s]
        reader = self.reader
        fill_staging(ds, st, view, lambda reqs: reader.read_batch_into([(fb + f, o, b) for f, o, b in reqs]))
        t1 = time.perf_counter()
        with self.stats.lock:
            self.stats.compressed_bytes_read += int(st.stored_bytes.sum())
            self.stats.read_s += t1 - t0
        return st, host

    # ---------------------------------------------------------------- decode (consumer thread)
    def pump(self) -> None:
        """Launch every group whose staging is done (a staging that failed raises later, when
        a batch needs that group, like the host path)."""
        for job in list(self.jobs.values()):
            if (job.tokens is None and job.future is not None and job.future.done()
                    and job.future.exception() is None):
                self._launch(job)

    def _launch(self, job: GroupJob) -> None:
        fut = job.future
        if not fut.done():
            t0 = time.perf_counter()
            fut.result()
            self.stats.stall_s += time.perf_counter() - t0
        st, host = fut.result()  # raises the pool's ChecksumError / OSError here
        job.future = None
        job.staging = st
        tb = st.token_bytes
        ngpu = len(st.chunk_desc)
        if self.cuda is None:
            out = np.zeros(st.num_tokens, dtype=_UNSIGNED_NP[tb])
            src = torch.from_numpy(host)
            tokens = torch.from_numpy(out.view(_SIGNED_NP[tb]))
            place_plain_chunks(st, src, tokens)
            if ngpu:
                job.status = self.codecs[job.key[0]].emulate(host, st.chunk_desc, st.block_desc, st.models, out)
            else:
                job.status = np.zeros(0, dtype=np.int32)
            job.tokens = tokens
            self.stats.h2d_bytes += st.staging_bytes
            self.stats.gpu_decode_bytes += st.decoded_bytes
            return
        side = self.side
        with torch.cuda.stream(side):
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record(side)
            src = host.to(self.dev, non_blocking=True)  # pinned: async DMA on the side stream
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record(side)
            tokens = torch.empty(st.num_tokens, dtype=_SIGNED[tb], device=self.dev)
            place_plain_chunks(st, src, tokens)
            if ngpu:
                decoder = self.decoders[self.codecs[job.key[0]]]
                status = decoder.decode(src, st.chunk_desc, st.block_desc, st.models, tokens, side)
                e2 = torch.cuda.Event(enable_timing=True)
                e2.record(side)
                sh = torch.empty(ngpu, dtype=torch.int32, pin_memory=True)
                sh.copy_(status, non_blocking=True)
            else:
                e2 = None
                sh = torch.zeros(0, dtype=torch.int32)
            ev = torch.cuda.Event()
            ev.record(side)
        # host and src are freed here; the caching allocators keep both until the side
        # stream is past the copy and the kernel (stream-ordered / recorded events).
        self.cuda.time(e0, e1, "h2d", st.staging_bytes)
        if e2 is not None:
            self.cuda.time(e1, e2, "decode", st.decoded_bytes)
        job.tokens, job.status, job.event = tokens, sh, ev

    def _check(self, job: GroupJob, wait: bool) -> bool:
        """True once ``job``'s statuses are known good; raises FormatError on a bad chunk."""
        if job.checked:
            return True
        if job.event is not None and not job.event.query():
            if not wait:
                return False
            t0 = time.perf_counter()
            job.event.synchronize()  # a side-stream event: the training stream is not touched
            self.stats.stall_s += time.perf_counter() - t0
        status = job.status.numpy() if isinstance(job.status, torch.Tensor) else job.status
        ds = self.datasets[job.key[0]]
        gpu_chunks = job.staging.chunks[job.staging.gpu]  # status i belongs to the i-th GPU chunk

        self.rans.check_status(status, lambda i: ds.describe_chunk(int(gpu_chunks[i])),
                               lambda i: ds.chunk_origin(int(gpu_chunks[i])))
        job.checked = True
        job.status = job.event = None
        return True

    def _ready(self, key: GroupKey) -> GroupJob:
        job = self.jobs.get(key)
        if job is None:  # not opened by open_rows (cannot happen by construction): open now
            self.open(key)
            job = self.jobs[key]
        if job.tokens is None:
            self._launch(job)
        self._check(job, wait=True)
        return job

    # ---------------------------------------------------------------- batches
    def assemble(self, b: Batch, slot: Any, host_rows_of: HostRows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of batch ``b``: rans rows gathered on the device, the others (ring
        rows, host-decoded sources of a mixture: ``host_rows_of``) assembled on the host and
        copied.

        Raises:
            ChecksumError, FormatError, OSError: staging or decoding a group failed (names
                the file and chunk).
        """
        B = self.batch_size
        rows = np.asarray(b.gpu_rows, dtype=np.int64)
        keys, kid = self._keys(b, rows)
        starts = np.empty(len(rows), dtype=np.int64)
        parts = []
        for k, key in enumerate(keys):
            job = self._ready(key)
            m = kid == k
            starts[m] = window_starts(self.plans[key[0]], job.staging, b.windows[rows[m]])
            parts.append((job, rows[m], starts[m]))
        host_rows = np.setdiff1d(np.arange(B, dtype=np.int64), rows)
        hstage = host_rows_of(b, slot, host_rows) if len(host_rows) else None
        whole = len(parts) == 1 and not len(host_rows) and np.array_equal(parts[0][1], np.arange(B))
        if self.cuda is None:
            return self._cut(parts, [torch.from_numpy(p[1]) for p in parts], [torch.from_numpy(p[2]) for p in parts],
                             torch.from_numpy(host_rows), None if hstage is None else torch.from_numpy(hstage), whole)
        # One small H2D of every index (rows, starts, host rows) and, in mixtures, the host rows.
        meta = np.concatenate([p[1] for p in parts] + [p[2] for p in parts] + [host_rows]).astype(np.int64)
        cur = torch.cuda.current_stream(self.dev)
        with torch.cuda.stream(self.side):
            md = torch.from_numpy(meta).pin_memory().to(self.dev, non_blocking=True)
            hd = None
            if hstage is not None:
                hp = torch.from_numpy(hstage).pin_memory()
                t0 = torch.cuda.Event(enable_timing=True)
                t0.record(self.side)
                hd = hp.to(self.dev, non_blocking=True)
                t1 = torch.cuda.Event(enable_timing=True)
                t1.record(self.side)
                self.cuda.time(t0, t1, "h2d", hstage.nbytes)
            sizes = [len(p[1]) for p in parts]
            cuts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
            n = cuts[-1]
            rows_d = [md[cuts[i]:cuts[i + 1]] for i in range(len(parts))]
            starts_d = [md[n + cuts[i]:n + cuts[i + 1]] for i in range(len(parts))]
            x, y = self._cut(parts, rows_d, starts_d, md[2 * n:], hd, whole)
            ev = torch.cuda.Event()
            ev.record(self.side)
        cur.wait_event(ev)  # the training stream waits for this batch only
        x.record_stream(cur)  # allocated on the side stream, used on the current one
        y.record_stream(cur)
        return x, y

    def _cut(self, parts: list, rows: list, starts: list, host_rows: torch.Tensor, hstage: Any,
             whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if whole:
            stage = gather_windows(parts[0][0].tokens, starts[0], self.offsets)
        else:
            stage = torch.empty((B, T + 1), dtype=torch.int64, device=self.dev)
            for (job, _, _), r, st in zip(parts, rows, starts):
                stage.index_copy_(0, r, gather_windows(job.tokens, st, self.offsets))
            if hstage is not None:
                stage.index_copy_(0, host_rows, hstage)
        return stage[:, :-1].contiguous(), stage[:, 1:].contiguous()

    # ---------------------------------------------------------------- lifetime
    def evict(self, consumed: np.ndarray) -> None:
        """Drop the groups the stream has passed (``consumed``: per-source positions)."""
        for key in [k for k, j in self.jobs.items() if j.expires <= consumed[k[0]]]:
            del self.jobs[key]

    def close(self) -> None:
        """Drop every group."""
        self.jobs = {}
