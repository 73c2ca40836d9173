"""The host pipeline of one TokenLoader iteration: reader, ring, decode pool, checks, cache.

Uncompressed windows are read through the io engine into a ring of page-aligned slots (one
job per batch, ``prefetch`` batches ahead, each window's bytes contiguous; in a mixture the
slot holds the rows of each source as one block) and cut into ``(x, y)`` in C++. Every
chunk an uncompressed window touches is read whole and checked once per loader and process
(:class:`ChunkChecks`) on a small pool, before the first batch holding its tokens is handed
out. Compressed chunks are read and decoded on a thread pool a group at a time (the host
cache), the next group decoded ahead. With a CUDA device the batch goes through
:class:`~.cuda_path.CudaPath`; rans sources decoded on the GPU through
:class:`~.gpu_decode.GpuDecodePath`.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .._native import _core
from ..dataset.base import name_chunk_in_error, plan_staging_runs
from ..io import PinnedRing, Reader, empty_aligned
from .cuda_path import CudaPath
from .gpu_decode import GpuDecodePath
from .plan import Batch, BatchPlanner, SourcePlan
from .stats import LoaderStats

_RING, _GPU, _CACHE = 0, 1, 2  # how a source's rows are produced


@dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline needs to know of its loader (settings, not state).

    ``emulate_gpu_decode``: run the GPU decode path of rans sources on the host (a CPU
    loader; a test hook, see :func:`llmio_native.loader.token_loader.emulate_gpu_decode`).
    """

    datasets: tuple
    plans: tuple
    batch_size: int
    seq_len: int
    world_size: int
    device: torch.device
    prefetch: int
    backend: str
    direct: bool
    queue_depth: int
    num_threads: int
    pin: bool
    emulate_gpu_decode: bool = False


@dataclass(frozen=True)
class StreamPosition:
    """Where a pipeline starts: global stream position and samples drawn per source."""

    pos: int
    counts: np.ndarray


class ChunkChecks:
    """Which chunks of the uncompressed sources passed their checksum in this process.

    One bitmap per source, allocated on first use; plain numpy, so it pickles with the
    loader (a DataLoader worker starts from what its parent had checked).
    """

    def __init__(self, num_chunks: list[int]) -> None:
        self._num_chunks = list(num_chunks)
        self._done: dict[int, np.ndarray] = {}

    def _bitmap(self, s: int) -> np.ndarray:
        v = self._done.get(s)
        if v is None:
            v = self._done[s] = np.zeros(self._num_chunks[s], dtype=bool)
        return v

    def pending(self, s: int, chunks: np.ndarray) -> np.ndarray:
        """The chunks of source ``s`` among ``chunks`` not checked yet."""
        return chunks[~self._bitmap(s)[chunks]]

    def mark(self, s: int, c: int) -> None:
        """Chunk ``c`` of source ``s`` passed its checksum."""
        self._bitmap(s)[c] = True


class Pipeline:
    """The native side of one iteration: a reader, a ring, a decode pool; closed when done.

    Args:
        config: the loader's settings. planner: its batch planner. start: the stream
            position the iteration starts at. stats: the loader's counters (shared by its
            pipelines). checks: the loader's chunk-check registry.
        stride, offset: take batches ``offset, offset + stride, ...`` of the stream
            (DataLoader workers), counted from the one at ``start``.

    Raises:
        OSError, ValueError, ResourceError: the reader or the ring cannot be set up.
    """

    def __init__(self, config: PipelineConfig, planner: BatchPlanner, start: StreamPosition, stats: LoaderStats,
                 checks: ChunkChecks, stride: int = 1, offset: int = 0) -> None:
        self.cfg = config
        self.stats = stats
        self.checks = checks
        self.closed = False
        self.ring: PinnedRing | None = None
        self.pool: cf.ThreadPoolExecutor | None = None
        self.vpool: cf.ThreadPoolExecutor | None = None
        self.vfut: dict[tuple[int, int], cf.Future] = {}
        self.gpu: GpuDecodePath | None = None
        self.cuda: CudaPath | None = None
        self.stats.begin(id(self))
        try:
            self._open(planner, start, stride, offset)
        except BaseException:
            self.close()
            raise

    def _open(self, planner: BatchPlanner, start: StreamPosition, stride: int, offset: int) -> None:
        cfg = self.cfg
        paths: list[str] = []
        self.file_base: list[int] = []
        for ds in cfg.datasets:
            self.file_base.append(len(paths))
            paths.extend(ds.paths)
        self.reader = Reader(paths, backend=cfg.backend, direct=cfg.direct, queue_depth=cfg.queue_depth)
        T, B = cfg.seq_len, cfg.batch_size
        plans: tuple[SourcePlan, ...] = cfg.plans
        raw = [p for p in plans if not p.compressed]
        itemsizes = {np.dtype(ds.dtype).itemsize for ds in cfg.datasets}
        slot_bytes = B * (T + 1) * max(itemsizes) + 8192
        self._ring_seen = (0, 0.0)
        cuda = cfg.device.type == "cuda"
        if raw:
            self.ring = PinnedRing(self.reader, num_slots=cfg.prefetch + 2, slot_bytes=slot_bytes,
                                   num_producers=min(4, cfg.prefetch), pin=cfg.pin,
                                   device=cfg.device if cuda else None)
        if any(p.compressed for p in plans):
            self.pool = cf.ThreadPoolExecutor(cfg.num_threads, thread_name_prefix="llmio-decode")
        # Uncompressed sources: the ring reads only each window's bytes, so every chunk a
        # window touches is read whole and checked once (per loader and process) on this
        # pool, ahead, before the first batch holding its tokens is handed out.
        if any(not p.compressed and p.ds.has_checksums for p in plans):
            self.vpool = cf.ThreadPoolExecutor(min(4, cfg.num_threads), thread_name_prefix="llmio-verify")
        self.cache: dict[tuple[int, int], tuple[cf.Future, int]] = {}  # (source, chunk) -> (future, expires)
        self.opened_groups: set[tuple[int, int, int]] = set()  # (source, epoch, group)
        gb = B * cfg.world_size
        self.first = start.pos // gb
        self.batches: Iterator[Batch] = planner.batches(start.pos, start.counts, self.first)
        self.last_counts = np.asarray(start.counts, dtype=np.int64).copy()
        self.stride, self.offset = stride, offset
        self.ahead: deque[Batch] = deque()
        dt = {np.dtype(ds.dtype) for ds in cfg.datasets}
        # One token type of 2 or 4 bytes in the ring and nothing compressed: cut in one call.
        self.uniform = len(dt) == 1 and next(iter(dt)).itemsize in (2, 4) and not any(p.compressed for p in plans)
        self.token_dtype = next(iter(dt))
        self.dtypes = [np.dtype(ds.dtype) for ds in cfg.datasets]
        # Signed token files (Megatron int16/int32): a negative value is refused, never read
        # as a large unsigned id (the same rule as TokenDataset.read).
        self.signed = any(d.kind == "i" for d in dt)
        self.starts_host = np.arange(B, dtype=np.int64) * (T + 1)
        self.window_offsets = np.arange(T + 1, dtype=np.int64)
        if cuda:
            self.cuda = CudaPath(cfg.device, B, T)
        # rans sources: GPU decode (device cache) when our CUDA kernels can run; the host
        # emulation of the same path on a CPU loader is a test hook (emulate_gpu_decode).
        # (remote sources decode on the host: their chunk reads go through the cache)
        rans_src = np.array([ds.codec in ("rans", "rans1") and getattr(ds, "remote", None) is None
                             for ds in cfg.datasets])
        kernels = self.cuda is not None and self.cuda.kernels
        gpu_src = rans_src if rans_src.any() and (kernels or cfg.emulate_gpu_decode) else np.zeros_like(rans_src)
        self.kind = np.where([not p.compressed for p in plans], _RING, np.where(gpu_src, _GPU, _CACHE))
        if gpu_src.any():
            self.gpu = GpuDecodePath(list(cfg.datasets), list(plans), B, T, self.pool, self.reader, self.file_base,
                                     self.stats, self.cuda)
        # Remote sources (llmio_native.remote): the cache is told this pipeline's exact future
        # (evicts the chunk needed farthest ahead, prefetches along it); reads pin their chunks.
        self.remote = [getattr(ds, "remote", None) for ds in cfg.datasets]
        self.remote_pins: dict[int, list[tuple[Any, np.ndarray]]] = {}
        for s, rc in enumerate(self.remote):
            if rc is not None:
                # each window pins at most the 2 chunks it spans (+1 rans model), for the batches in flight
                per_window = 2 if not plans[s].compressed else 3
                rc.follow(self._remote_future(s, planner.batches(start.pos, start.counts, self.first)),
                          pinned_units=(cfg.prefetch + 2) * B * per_window,
                          what=f"TokenLoader(prefetch={cfg.prefetch}, batch_size={B})")
        self._fill()

    def _remote_chunks(self, s: int, windows: np.ndarray) -> np.ndarray:
        """Chunks of source ``s`` the windows read."""
        plan = self.cfg.plans[s]
        if not plan.compressed:
            return plan.raw_chunks(windows)
        c0, c1 = plan.chunks_of_window(windows)
        grid = c0[:, None] + np.arange(int((c1 - c0).max()) + 1 if len(c0) else 1)[None, :]
        return np.unique(grid[grid <= c1[:, None]])

    def _remote_future(self, s: int, batches: Iterator[Batch]) -> Iterator[tuple[int, np.ndarray]]:
        """``(batch index, units of source s)`` of this pipeline's coming batches, in order."""
        rc = self.remote[s]
        for b in batches:
            if (b.index - self.first - self.offset) % self.stride:
                continue
            rows = np.flatnonzero(b.sources == s)
            if len(rows):
                yield b.index, rc.units_of_chunks(self._remote_chunks(s, b.windows[rows]))

    # ---------------------------------------------------------------- planning ahead
    def _next_plan(self) -> Batch:
        while True:
            b = next(self.batches)
            if (b.index - self.first - self.offset) % self.stride == 0:
                return b

    def _fill(self) -> None:
        while len(self.ahead) < self.cfg.prefetch:
            b = self._next_plan()
            self._submit(b)
            self.ahead.append(b)

    def _submit(self, b: Batch) -> None:
        plans = self.cfg.plans
        for rc in self.remote:
            if rc is not None:
                rc.advance(b.index)  # the cache's view of the future moves with the batches
        reqs: list[tuple[int, int, int]] = []
        if len(plans) == 1 and not plans[0].compressed:
            b.ring_rows = np.arange(len(b.windows), dtype=np.int64)
            b.ring_blocks = [(0, b.ring_rows, 0)]
            reqs = plans[0].raw_requests(b.windows, self.file_base[0])
        else:
            kind = self.kind[b.sources]
            ring = np.flatnonzero(kind == _RING)
            # The slot holds one block per source (stable: rows in batch order within it).
            ring = ring[np.argsort(b.sources[ring], kind="stable")]
            b.ring_rows = ring
            off = 0
            rsrc = b.sources[ring]
            for s in np.unique(rsrc).tolist():
                rows = ring[rsrc == s]
                b.ring_blocks.append((s, rows, off))
                off += len(rows) * (self.cfg.seq_len + 1) * self.dtypes[s].itemsize
                reqs.extend(plans[s].raw_requests(b.windows[rows], self.file_base[s]))
            b.gpu_rows = np.flatnonzero(kind == _GPU)
            b.cache_rows = np.flatnonzero(kind == _CACHE)
            # GPU path: the batch's groups, then the groups after them, are staged and decoded
            # a whole group at a time (read and checked on the pool, decoded on the device).
            if self.gpu is not None:
                self.gpu.open_rows(b)
            if len(b.cache_rows):
                self._want_cache_rows(b)
        if reqs:
            pins = []
            for s, rows, _ in b.ring_blocks:
                rc = self.remote[s]
                if rc is not None:  # the ring reads the cache files: make the chunks present, pin them
                    pins.append((rc, rc.acquire(rc.units_of_chunks(plans[s].raw_chunks(b.windows[rows])), b.index)))
            if pins:
                self.remote_pins[b.index] = pins
            if self.vpool is not None:
                self._verify_ahead(b)
            self.ring.submit(reqs, tag=b.index, packed=True)

    def _want_cache_rows(self, b: Batch) -> None:
        """Chunks the host-cache rows of ``b`` need go to the decode queue first, then the
        rest of their groups, then the groups after them (decoded while these are consumed)."""
        plans = self.cfg.plans
        rows = b.cache_rows
        srcs = b.sources[rows]
        opened: list[tuple[int, int, int]] = []
        for s in np.unique(srcs).tolist():
            m = srcs == s
            plan = plans[s]
            epochs, groups = plan.group_keys(b.local[rows[m]])
            c0, c1 = plan.chunks_of_window(b.windows[rows[m]])
            keys = np.stack([epochs, groups], axis=1)
            uniq, first = np.unique(keys, axis=0, return_index=True)
            for k in np.argsort(first, kind="stable").tolist():  # groups in first-use order
                e, g = int(uniq[k, 0]), int(uniq[k, 1])
                if (s, e, g) in self.opened_groups:
                    continue
                mk = (epochs == e) & (groups == g)
                expires = plan.group_end_position(e, g)
                lo, hi = c0[mk], c1[mk]
                span = int((hi - lo).max()) + 1
                need = (lo[:, None] + np.arange(span)[None, :])
                need = np.unique(need[need <= hi[:, None]])
                for c in need.tolist():
                    self._want(s, c, expires)
                opened.append((s, e, g))
        for key in opened:
            self._open_group(key)
        for s, e, g in opened:
            ne, ng = plans[s].next_group(e, g)
            self._open_group((s, ne, ng))

    def _verify_ahead(self, b: Batch) -> None:
        """Queue the checks of the not yet verified chunks the ring rows of ``b`` read."""
        plans = self.cfg.plans
        for s, rows, _ in b.ring_blocks:
            plan = plans[s]
            if not plan.ds.has_checksums:
                continue
            for c in self.checks.pending(s, plan.raw_chunks(b.windows[rows])).tolist():
                f = self.vfut.get((s, c))
                if f is None:
                    f = self.vfut[(s, c)] = self.vpool.submit(self._verify_chunk, s, c)
                b.verify.append(((s, c), f))

    def _read_chunk(self, s: int, c: int) -> np.ndarray:
        """The stored bytes of chunk ``c`` of source ``s`` (through the cache of a remote source)."""
        row = self.cfg.datasets[s].chunks[c]
        rc = self.remote[s]
        args = (self.file_base[s] + int(row["file"]), int(row["offset"]), int(row["stored_bytes"]))
        if rc is None:
            return self.reader.read(*args)
        with rc.pinned(rc.units_of_chunks([c])):
            return self.reader.read(*args)

    def _verify_chunk(self, s: int, c: int) -> None:
        ds = self.cfg.datasets[s]
        t0 = time.perf_counter()
        raw = self._read_chunk(s, c)
        ds.check_chunk(c, raw)
        with self.stats.lock:
            self.stats.verify_bytes += raw.nbytes
            self.stats.verify_s += time.perf_counter() - t0

    def _wait_verified(self, b: Batch) -> None:
        """Every chunk the ring rows of ``b`` read has passed its checksum (or this raises)."""
        for key, f in b.verify:
            if not f.done():
                t0 = time.perf_counter()
                cf.wait([f])
                self.stats.stall_s += time.perf_counter() - t0
            f.result()  # ChecksumError / FormatError / OSError naming the chunk
            self.checks.mark(*key)
            self.vfut.pop(key, None)

    def _want(self, s: int, c: int, expires: int) -> None:
        old = self.cache.get((s, c))
        if old is not None:
            if expires > old[1]:
                self.cache[(s, c)] = (old[0], expires)
        else:
            self.cache[(s, c)] = (self.pool.submit(self._decode, s, c), expires)

    def _open_group(self, key: tuple[int, int, int]) -> None:
        if key in self.opened_groups:
            return
        self.opened_groups.add(key)
        s, epoch, g = key
        plan = self.cfg.plans[s]
        expires = plan.group_end_position(epoch, g)
        new = []
        for c in plan.group_chunks(epoch, g):
            c = int(c)
            if (s, c) in self.cache:
                self._want(s, c, expires)
            else:
                new.append(c)
        if len(new) < 2 or self.remote[s] is not None:  # a remote source pins chunk by chunk
            for c in new:
                self._want(s, c, expires)
            return
        # one batched read of the group: neighbouring chunks (packed back to back in format v2)
        # share their boundary blocks, read once; then each chunk decodes on the pool
        new = sorted(set(new))
        futs = [cf.Future() for _ in new]
        for c, fut in zip(new, futs):
            self.cache[(s, c)] = (fut, expires)
        self.pool.submit(self._read_group, s, new, futs)

    def _read_group(self, s: int, chunks: list[int], futs: list[cf.Future]) -> None:
        """Read chunks ``chunks`` (ascending) of source ``s`` in one batch of aligned runs
        (``plan_staging_runs``: O_DIRECT, shared blocks read once), then queue their decodes,
        each completing its future of ``futs``; a failure fails them all."""
        ds = self.cfg.datasets[s]
        t0 = time.perf_counter()
        try:
            rows = ds.chunks[chunks]
            places, runs, total = plan_staging_runs(
                [(int(r["file"]), int(r["offset"]), int(r["stored_bytes"])) for r in rows], ds.file_sizes)
            buf = empty_aligned(total)
            fb = self.file_base[s]
            stored = [buf[p:p + int(r["stored_bytes"])] for p, r in zip(places, rows)]
            try:
                self.reader.read_batch_into([(fb + f, a0, buf[at:at + a1 - a0]) for f, a0, a1, at in runs])
            except OSError:  # read chunk by chunk: the error then names the chunk's own range
                for k, (r, raw) in enumerate(zip(rows, stored)):
                    try:
                        self.reader.read_into(fb + int(r["file"]), int(r["offset"]), raw)
                    except OSError as exc:
                        futs[k].set_exception(name_chunk_in_error(exc, ds.describe_chunk(chunks[k])))
            with self.stats.lock:
                self.stats.compressed_bytes_read += sum(x.nbytes for x in stored)
                self.stats.read_s += time.perf_counter() - t0
            for c, raw, fut in zip(chunks, stored, futs):
                if not fut.done():
                    self.pool.submit(self._decode_into_future, s, c, raw, fut)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer through the futures
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)

    def _decode_into_future(self, s: int, c: int, raw: np.ndarray, fut: cf.Future) -> None:
        try:
            fut.set_result(self._decode_stored(s, c, raw))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            fut.set_exception(exc)

    def _decode(self, s: int, c: int) -> np.ndarray:
        t0 = time.perf_counter()
        raw = self._read_chunk(s, c)
        with self.stats.lock:
            self.stats.compressed_bytes_read += raw.nbytes
            self.stats.read_s += time.perf_counter() - t0
        return self._decode_stored(s, c, raw)

    def _decode_stored(self, s: int, c: int, raw: np.ndarray) -> np.ndarray:
        t1 = time.perf_counter()
        tokens = self.cfg.datasets[s].decode_chunk(c, raw)
        st = self.stats
        with st.lock:
            st.decoded_bytes += tokens.nbytes
            st.decode_s += time.perf_counter() - t1
        return tokens

    def _chunk(self, s: int, c: int) -> np.ndarray:
        ent = self.cache.get((s, c))
        if ent is None:  # outside every open group's set (cannot happen by construction): decode now
            ent = (self.pool.submit(self._decode, s, c), 0)
            self.cache[(s, c)] = ent
        fut = ent[0]
        if not fut.done():
            t0 = time.perf_counter()
            arr = fut.result()
            self.stats.stall_s += time.perf_counter() - t0
            return arr
        return fut.result()

    def _evict(self, consumed: np.ndarray) -> None:
        for key in [k for k, (_, exp) in self.cache.items() if exp <= consumed[k[0]]]:
            del self.cache[key]
        plans = self.cfg.plans
        self.opened_groups = {k for k in self.opened_groups
                              if plans[k[0]].group_end_position(k[1], k[2]) > consumed[k[0]]}

    # ---------------------------------------------------------------- assembly
    def next(self) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """The next batch of this pipeline and its ``(x, y)``.

        Raises:
            ChecksumError, FormatError: a chunk is corrupt (names the file and chunk).
            OSError, ShortReadError: a read failed or a file shrank (names file and offset).
        """
        cfg = self.cfg
        b = self.ahead.popleft()
        B, T = cfg.batch_size, cfg.seq_len
        slot = None
        if len(b.ring_rows):
            t0 = time.perf_counter()
            slot = self.ring.get()
            self.stats.stall_s += time.perf_counter() - t0
            if slot.tag != b.index:  # pragma: no cover - the ring delivers in order
                raise RuntimeError(f"ring delivered batch {slot.tag}, expected {b.index}")
            if b.verify:
                self._wait_verified(b)
            for rc, units in self.remote_pins.pop(b.index, ()):
                rc.release(units)  # read (and checked): evictable again
            if self.signed:
                self._check_token_ids(b, slot)
        if self.gpu is not None:
            self.gpu.pump()
        if self.cuda is not None:
            self.cuda.poll_timings(self.stats)
        if len(b.gpu_rows):
            xt, yt = self.gpu.assemble(b, slot, self._host_rows)
        elif self.uniform and self.cuda is None:
            tokens = np.frombuffer(slot, dtype=self.token_dtype, count=B * (T + 1))
            x, y = _core.cut_windows_ref(tokens, self.starts_host, T)
            slot.release()
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        elif self.uniform and self.cuda.kernels:
            xt, yt = self.cuda.cut(slot, self.ring, self.token_dtype)
        else:
            stage = self._host_rows(b, slot, np.arange(B, dtype=np.int64))
            xt = torch.from_numpy(np.ascontiguousarray(stage[:, :-1]))
            yt = torch.from_numpy(np.ascontiguousarray(stage[:, 1:]))
            if self.cuda is not None:
                xt, yt = self.cuda.to_device(xt, yt)
        st = self.stats
        if self.ring is not None:  # ring counters restart per iterator: add their deltas
            rs = self.ring.stats()
            st.ring_bytes += rs["bytes"] - self._ring_seen[0]
            st.ring_read_s += rs["producer_busy_s"] - self._ring_seen[1]
            self._ring_seen = (rs["bytes"], rs["producer_busy_s"])
        st.batches += 1
        st.consumed += b.counts_after - self.last_counts
        self.last_counts = b.counts_after
        if len(b.cache_rows) or self.cache:
            self._evict(b.counts_after)
        if self.gpu is not None:
            self.gpu.evict(b.counts_after)
        self._fill()
        return b, xt, yt

    def _ring_block(self, slot: Any, s: int, rows: np.ndarray, off: int) -> np.ndarray:
        """``[len(rows), T + 1]`` raw tokens of source ``s``'s block in ``slot``."""
        n = self.cfg.seq_len + 1
        return np.frombuffer(slot, dtype=self.dtypes[s], count=len(rows) * n, offset=off).reshape(len(rows), n)

    def _check_token_ids(self, b: Batch, slot: Any) -> None:
        """Raise FormatError (naming file and offset) if a ring row of ``b`` holds a negative id
        (the first such row of the batch)."""
        bad: tuple[int, int, np.ndarray] | None = None
        for s, rows, off in b.ring_blocks:
            if self.dtypes[s].kind != "i":
                continue
            blk = self._ring_block(slot, s, rows, off)
            neg = np.flatnonzero((blk < 0).any(axis=1))
            if len(neg) and (bad is None or rows[neg[0]] < bad[0]):
                bad = (int(rows[neg[0]]), s, blk[neg[0]])
        if bad is not None:
            row, s, tokens = bad
            self.cfg.datasets[s].check_token_ids(tokens, int(b.windows[row]) * self.cfg.seq_len)

    def _host_rows(self, b: Batch, slot: Any, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), T + 1]`` int64 windows of the host rows (ring and host cache) of
        ``b``, ``rows`` being all of them in batch order (ascending); releases ``slot``."""
        T = self.cfg.seq_len
        stage = np.empty((len(rows), T + 1), dtype=np.int64)
        if slot is not None:
            for s, brows, off in b.ring_blocks:
                stage[np.searchsorted(rows, brows)] = self._ring_block(slot, s, brows, off)
            slot.release()
        if len(b.cache_rows):
            self._cache_windows(b, stage, np.searchsorted(rows, b.cache_rows))
        return stage

    def _cache_windows(self, b: Batch, stage: np.ndarray, at: np.ndarray) -> None:
        """Write the windows of ``b``'s host-cache rows into ``stage[at]``: one gather per
        chunk for the windows inside one chunk, a concatenation for those that cross."""
        plans = self.cfg.plans
        T = self.cfg.seq_len
        rows = b.cache_rows
        srcs = b.sources[rows]
        for s in np.unique(srcs).tolist():
            m = np.flatnonzero(srcs == s)
            plan = plans[s]
            wins = b.windows[rows[m]]
            c0, c1 = plan.chunks_of_window(wins)
            a = wins * T
            inside = c0 == c1
            mi = m[inside]
            ci, ai = c0[inside], a[inside]
            rel = ai - plan.chunk_first[ci]  # first token of each window in its chunk
            for c in np.unique(ci).tolist():
                k = ci == c
                stage[at[mi[k]]] = self._chunk(s, c)[rel[k][:, None] + self.window_offsets]
            for j in np.flatnonzero(~inside).tolist():
                parts = []
                for c in range(int(c0[j]), int(c1[j]) + 1):
                    tok = self._chunk(s, c)
                    f = int(plan.chunk_first[c])
                    parts.append(tok[max(int(a[j]), f) - f: min(int(a[j]) + T + 1, f + len(tok)) - f])
                stage[at[m[j]]] = np.concatenate(parts)

    def close(self) -> None:
        """Stop the pools, drop the caches, close the ring (waits for its copies)."""
        if self.closed:
            return
        self.closed = True
        self.stats.end(id(self))
        try:
            for pool in (self.pool, self.vpool):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.vfut = {}
            self.cache = {}
            for rc in getattr(self, "remote", ()):
                if rc is not None:
                    rc.stop_follow()
            if self.gpu is not None:
                self.gpu.close()
            if self.cuda is not None:
                self.cuda.close()
            if self.ring is not None:
                self.ring.close()  # waits for pending copy events, joins the producers
                self.ring = None
            for pins in getattr(self, "remote_pins", {}).values():
                for rc, units in pins:
                    rc.release(units)
            self.remote_pins = {}
            self.reader = None
