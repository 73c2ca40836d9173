"""TokenLoader: random windows of tokenized corpora, exact and resumable, for one GPU to many nodes."""
from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .._native import _core, _cuda
from ..reader import Reader
from ..ring import PinnedRing
from .order import stride_schedule
from .plan import SourcePlan

STATE_VERSION = 1


def _open_source(src: Any) -> Any:
    if hasattr(src, "num_tokens") and hasattr(src, "read"):
        return src
    from ..dataset import open_dataset

    return open_dataset(os.fspath(src))


class _Batch:
    """One planned batch of this rank: (source, window id) per row, and the state after it."""

    __slots__ = ("index", "sources", "windows", "local", "pos_after", "counts_after", "ring_rows", "cache_rows")

    def __init__(self, index: int, sources: np.ndarray, windows: np.ndarray, pos_after: int,
                 counts_after: np.ndarray) -> None:
        self.index = index
        self.sources = sources
        self.windows = windows
        self.pos_after = pos_after
        self.counts_after = counts_after
        self.ring_rows: list[int] = []
        self.cache_rows: list[int] = []


class TokenLoader(torch.utils.data.IterableDataset):
    """Batches of random token windows ``(x, y)``, ``[batch_size, seq_len]`` int64 on ``device``.

    Window ``i`` of a source is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``; ``y`` is ``x``
    shifted by one. Each source has ``(num_tokens - 1) // seq_len`` windows; the tail that does
    not complete a window is dropped.

    Order: the global sample stream is a function of ``(seed, epoch)`` only. Global step ``t``
    takes stream positions ``[t*B*W, (t+1)*B*W)`` and rank ``r`` the slice ``[r*B, (r+1)*B)`` of
    them, so over an epoch every window is produced exactly once across all ranks, and the
    stream continues into the next epoch without a gap (a batch may straddle the boundary).
    Uncompressed sources are shuffled globally by a seeded bijection of window ids (no index
    to build); compressed sources by a chunk-level shuffle with a bounded buffer (see
    :mod:`llmio_native.loader.plan`). Several sources mix by ``weights`` with deterministic
    stride scheduling. Iteration is endless (training loops stop by step count) unless
    ``steps`` is given.

    State: :meth:`state_dict` is a few hundred bytes (stream position, per-source counts,
    a fingerprint of the sources); :meth:`load_state_dict` is O(1), and resuming reproduces
    the uninterrupted stream exactly, also with another world size (same or different global
    batch: the stream is the same, ranks slice it differently).

    Pipeline: uncompressed windows are read through the io_uring/thread engine into a pinned
    ring (one job per batch, ``prefetch`` batches ahead) and cut into ``(x, y)`` without
    per-token Python work; compressed chunks are read and decoded on a thread pool, a group
    of spans at a time. With ``device="cuda"`` the raw tokens go host-to-device on a side
    stream and are cut on the GPU; the training stream waits on an event, not on the host.
    Memory: ``prefetch + 2`` ring slots of one batch of raw tokens each, plus for compressed
    sources about two open groups of ``group_spans * (span_chunks + 1)`` decoded chunks.
    Known cost: with W ranks on compressed data, each rank decodes the groups its slices
    touch, so a node decodes each group up to W times.

    Args:
        sources: a dataset path, an opened dataset (``open_dataset``), or a list of them.
        batch_size: rows per batch on this rank (B).
        seq_len: tokens per row (T).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        weights: sampling proportions of the sources (normalised); default equal.
        seed: the order's seed. shuffle: ``False`` walks windows in order.
        rank, world_size: default from ``torch.distributed`` when initialised, else 0 and 1.
        steps: stop each iteration after this many batches (None: endless).
        prefetch: batches read ahead. backend, direct, queue_depth: read engine options.
        num_threads: decode threads for compressed sources (default: cores).
        span_chunks, group_spans: compressed shuffle granularity (see above).
        pin: page-lock ring slots (default: when ``device`` is CUDA).

    Raises:
        ValueError: bad sizes, weights, rank/world size, or a source without a full window.
    """

    def __init__(
        self,
        sources: Any,
        batch_size: int = 8,
        seq_len: int = 1024,
        device: str | torch.device = "cpu",
        weights: Sequence[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        steps: int | None = None,
        prefetch: int = 8,
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 64,
        num_threads: int | None = None,
        span_chunks: int = 8,
        group_spans: int = 8,
        pin: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "num_tokens"):
            sources = [sources]
        self.datasets = [_open_source(s) for s in sources]
        if not self.datasets:
            raise ValueError("TokenLoader needs at least one source")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world_size = dist.get_world_size() if world_size is None else world_size
            else:
                rank = 0 if rank is None else rank
                world_size = 1 if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        w = np.ones(len(self.datasets)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.datasets),) or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise ValueError(f"weights must be {len(self.datasets)} positive numbers, got {weights!r}")
        self.weights = w / w.sum()
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.steps = steps
        self.prefetch = max(1, int(prefetch))
        self.backend, self.direct, self.queue_depth = backend, bool(direct), int(queue_depth)
        self.num_threads = num_threads or os.cpu_count() or 2
        self.pin = (self.device.type == "cuda") if pin is None else bool(pin)
        self.plans = [SourcePlan(ds, i, self.seq_len, self.seed, self.shuffle, span_chunks, group_spans)
                      for i, ds in enumerate(self.datasets)]
        self._pos = 0
        self._counts = np.zeros(len(self.datasets), dtype=np.int64)
        self._stats = _Stats()
        self.last_windows: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        """Batches per epoch on this rank (single source)."""
        if len(self.plans) != 1:
            raise TypeError("len() is defined for a single source; a mixture has no common epoch")
        gb = self.batch_size * self.world_size
        return -(-self.plans[0].n // gb)

    @property
    def num_windows(self) -> list[int]:
        return [p.n for p in self.plans]

    @property
    def epoch(self) -> int:
        """Current epoch of the first source (completed passes over its windows)."""
        return int(self._counts[0] // self.plans[0].n)

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # no native handles live on the loader itself

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> list:
        return [self.seq_len, self.seed, self.shuffle, [round(float(x), 12) for x in self.weights],
                [[int(ds.num_tokens), str(np.dtype(ds.dtype)), ds.codec, p.n, p.span_chunks, p.group_spans]
                 for ds, p in zip(self.datasets, self.plans)]]

    def state_dict(self) -> dict:
        """The stream position after the last batch handed out, as a small dict.

        Every rank's state is the global state (a batch counts as consumed by all ranks).
        """
        return {"version": STATE_VERSION, "position": int(self._pos), "counts": self._counts.tolist(),
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict`; the next batch continues the stream exactly.

        Raises:
            ValueError: another version, or sources/seq_len/seed/weights that differ.
        """
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"TokenLoader state version {sd.get('version')!r}; this build reads {STATE_VERSION}")
        if sd.get("fingerprint") != self._fingerprint():
            raise ValueError("TokenLoader state was saved for other sources or settings: saved "
                             f"{sd.get('fingerprint')!r}, here {self._fingerprint()!r}")
        counts = np.asarray(sd["counts"], dtype=np.int64)
        if counts.shape != self._counts.shape or int(counts.sum()) != int(sd["position"]):
            raise ValueError("TokenLoader state is inconsistent (counts do not add up to the position)")
        self._pos = int(sd["position"])
        self._counts = counts.copy()

    def stats(self) -> dict:
        """Bytes read, read and decode GB/s, batches, and the consumer's stall (total, per batch)."""
        return self._stats.as_dict()

    # ------------------------------------------------------------------ planning
    def _plan_batches(self, pos: int, counts: np.ndarray, first_index: int) -> Iterator[_Batch]:
        B, W, r = self.batch_size, self.world_size, self.rank
        gb = B * W
        counts = counts.copy()
        t = first_index
        while True:
            if len(self.plans) == 1:
                src = np.zeros(gb, dtype=np.int64)
                local = counts[0] + np.arange(gb, dtype=np.int64)
                new_counts = counts + gb
            else:
                src, new_counts = stride_schedule(counts, self.weights, gb)
                local = np.empty(gb, dtype=np.int64)
                for s in range(len(self.plans)):
                    m = src == s
                    local[m] = counts[s] + np.arange(int(m.sum()), dtype=np.int64)
            mine = slice(r * B, (r + 1) * B)
            src_r, local_r = src[mine], local[mine]
            wins = np.empty(B, dtype=np.int64)
            for s in np.unique(src_r):
                m = src_r == s
                wins[m] = self.plans[int(s)].window_ids(local_r[m])
            b = _Batch(t, src_r, wins, pos + gb, new_counts)
            b.local = local_r
            yield b
            pos, counts, t = pos + gb, new_counts, t + 1

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        stride, offset = (info.num_workers, info.id) if info is not None else (1, 0)
        pipe = _Pipeline(self, stride, offset)
        try:
            n = 0
            while self.steps is None or n < self.steps:
                batch, x, y = pipe.next()
                self._pos, self._counts = batch.pos_after, batch.counts_after
                self.last_windows = list(zip(batch.sources.tolist(), batch.windows.tolist()))
                n += 1
                yield x, y
        finally:
            pipe.close()


class _Stats:
    def __init__(self) -> None:
        self.batches = 0
        self.stall_s = 0.0
        self.ring_bytes = 0
        self.ring_read_s = 0.0
        self.read_s = 0.0
        self.compressed_bytes_read = 0
        self.decoded_bytes = 0
        self.decode_s = 0.0
        self.t0 = time.perf_counter()

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "bytes_read": self.ring_bytes + self.compressed_bytes_read,
            "read_gbps": (self.ring_bytes + self.compressed_bytes_read) / (self.read_s + self.ring_read_s) / 1e9
            if self.read_s + self.ring_read_s else 0.0,
            "compressed_bytes_read": self.compressed_bytes_read,
            "decoded_bytes": self.decoded_bytes,
            "decode_gbps": self.decoded_bytes / self.decode_s / 1e9 if self.decode_s else 0.0,
            "stall_s": self.stall_s,
            "stall_per_batch_s": self.stall_s / self.batches if self.batches else 0.0,
            "wall_s": time.perf_counter() - self.t0,
        }


class _Pipeline:
    """The native side of one iteration: a reader, a ring, a decode pool; closed when done."""

    def __init__(self, loader: TokenLoader, stride: int, offset: int) -> None:
        self.L = loader
        self.stats = loader._stats
        self.closed = False
        paths: list[str] = []
        self.file_base: list[int] = []
        for ds in loader.datasets:
            self.file_base.append(len(paths))
            paths.extend(ds.paths)
        self.reader = Reader(paths, backend=loader.backend, direct=loader.direct, queue_depth=loader.queue_depth)
        T = loader.seq_len
        self.raw = [p for p in loader.plans if not p.compressed]
        itemsizes = {np.dtype(ds.dtype).itemsize for ds in loader.datasets}
        slot_bytes = loader.batch_size * (T + 1) * max(itemsizes) + 8192
        self.ring = None
        self._ring_seen = (0, 0.0)
        if self.raw:
            self.ring = PinnedRing(self.reader, num_slots=loader.prefetch + 2, slot_bytes=slot_bytes,
                                   num_producers=min(4, loader.prefetch), pin=loader.pin)
        self.pool = cf.ThreadPoolExecutor(loader.num_threads, thread_name_prefix="llmio-decode") \
            if any(p.compressed for p in loader.plans) else None
        self.cache: dict[tuple[int, int], tuple[cf.Future, int]] = {}  # (source, chunk) -> (future, expires)
        self.opened_groups: set[tuple[int, int, int]] = set()
        first = loader._pos // (loader.batch_size * loader.world_size)
        self.batches = loader._plan_batches(loader._pos, loader._counts, first)
        self.stride, self.offset = stride, offset
        self.ahead: deque[_Batch] = deque()
        self.uniform = len({str(np.dtype(ds.dtype)) for ds in loader.datasets}) == 1 and not any(
            p.compressed for p in loader.plans)
        self.cuda = loader.device.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device=loader.device)
        self._fill()

    # ---------------------------------------------------------------- planning ahead
    def _next_plan(self) -> _Batch:
        while True:
            b = next(self.batches)
            if (b.index - self.offset) % self.stride == 0:
                return b

    def _fill(self) -> None:
        while len(self.ahead) < self.L.prefetch:
            b = self._next_plan()
            self._submit(b)
            self.ahead.append(b)

    def _submit(self, b: _Batch) -> None:
        L = self.L
        reqs: list[tuple[int, int, int]] = []
        if len(L.plans) == 1 and not L.plans[0].compressed:
            b.ring_rows = list(range(len(b.windows)))
            reqs = L.plans[0].raw_requests(b.windows, self.file_base[0])
        else:
            for row, (s, w) in enumerate(zip(b.sources.tolist(), b.windows.tolist())):
                plan = L.plans[s]
                if not plan.compressed:
                    b.ring_rows.append(row)
                    reqs.extend(plan.raw_requests(np.array([w]), self.file_base[s]))
                else:
                    b.cache_rows.append(row)
                    self._open_group_for(s, int(b.local[row]))
        if reqs:
            self.ring.submit(reqs, tag=b.index, packed=True)

    def _open_group_for(self, s: int, local_pos: int) -> None:
        plan = self.L.plans[s]
        epoch, j = divmod(local_pos, plan.n)
        g = plan.group_of(epoch, j)
        key = (s, epoch, g)
        if key in self.opened_groups:
            return
        self.opened_groups.add(key)
        expires = plan.group_end_position(epoch, g)
        for c in plan.group_chunks(epoch, g):
            old = self.cache.get((s, c))
            if old is not None:
                self.cache[(s, c)] = (old[0], max(old[1], expires))
            else:
                self.cache[(s, c)] = (self.pool.submit(self._decode, s, c), expires)

    def _decode(self, s: int, c: int) -> np.ndarray:
        ds = self.L.datasets[s]
        row = ds.chunks[c]
        t0 = time.perf_counter()
        raw = self.reader.read(self.file_base[s] + int(row["file"]), int(row["offset"]), int(row["stored_bytes"]))
        t1 = time.perf_counter()
        tokens = ds.decode_chunk(c, raw)
        t2 = time.perf_counter()
        st = self.stats
        st.compressed_bytes_read += raw.nbytes
        st.read_s += t1 - t0
        st.decoded_bytes += tokens.nbytes
        st.decode_s += t2 - t1
        return tokens

    def _chunk(self, s: int, c: int) -> np.ndarray:
        ent = self.cache.get((s, c))
        if ent is None:  # a window reached a chunk outside its group's set: decode it now
            ent = (self.pool.submit(self._decode, s, c), 0)
            self.cache[(s, c)] = ent
        t0 = time.perf_counter()
        arr = ent[0].result()
        self.stats.stall_s += time.perf_counter() - t0
        return arr

    def _evict(self, consumed: np.ndarray) -> None:
        for key in [k for k, (_, exp) in self.cache.items() if exp <= consumed[k[0]]]:
            del self.cache[key]
        self.opened_groups = {k for k in self.opened_groups
                              if self.L.plans[k[0]].group_end_position(k[1], k[2]) > consumed[k[0]]}

    # ---------------------------------------------------------------- assembly
    def next(self) -> tuple[_Batch, torch.Tensor, torch.Tensor]:
        L = self.L
        b = self.ahead.popleft()
        B, T = L.batch_size, L.seq_len
        slot = None
        if b.ring_rows:
            t0 = time.perf_counter()
            slot = self.ring.get()
            self.stats.stall_s += time.perf_counter() - t0
            if slot.tag != b.index:  # pragma: no cover - the ring delivers in order
                raise RuntimeError(f"ring delivered batch {slot.tag}, expected {b.index}")
        if self.uniform and slot is not None and not self.cuda:
            tokens = np.frombuffer(slot, dtype=L.datasets[0].dtype, count=B * (T + 1))
            x, y = _core.cut_windows_ref(tokens, np.arange(B, dtype=np.int64) * (T + 1), T)
            slot.release()
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        elif self.uniform and slot is not None and self.cuda and _cuda is not None:
            xt, yt = self._cut_on_gpu(slot)
        else:
            stage = np.empty((B, T + 1), dtype=np.int64)
            if slot is not None:
                off = 0
                for row in b.ring_rows:
                    dt = np.dtype(L.datasets[int(b.sources[row])].dtype)
                    stage[row] = np.frombuffer(slot, dtype=dt, count=T + 1, offset=off)
                    off += (T + 1) * dt.itemsize
                slot.release()
            for row in b.cache_rows:
                stage[row] = self._window_from_cache(int(b.sources[row]), int(b.windows[row]))
            xt = torch.from_numpy(np.ascontiguousarray(stage[:, :-1]))
            yt = torch.from_numpy(np.ascontiguousarray(stage[:, 1:]))
            if self.cuda:
                xt, yt = self._to_device(xt, yt)
        if self.ring is not None:  # ring counters restart per iterator: add their deltas
            rs = self.ring.stats()
            self.stats.ring_bytes += rs["bytes"] - self._ring_seen[0]
            self.stats.ring_read_s += rs["producer_busy_s"] - self._ring_seen[1]
            self._ring_seen = (rs["bytes"], rs["producer_busy_s"])
        self.stats.batches += 1
        if b.cache_rows:
            self._evict(b.counts_after)
        self._fill()
        return b, xt, yt

    def _window_from_cache(self, s: int, w: int) -> np.ndarray:
        plan = self.L.plans[s]
        T = self.L.seq_len
        a, e = w * T, w * T + T + 1
        c0, c1 = plan.chunks_of_window(w)
        parts = []
        for c in range(c0, c1 + 1):
            tok = self._chunk(s, c)
            f = int(plan.chunk_first[c])
            parts.append(tok[max(a, f) - f: min(e, f + len(tok)) - f])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _cut_on_gpu(self, slot: Any) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.L
        B, T = L.batch_size, L.seq_len
        isz = np.dtype(L.datasets[0].dtype).itemsize
        nbytes = B * (T + 1) * isz
        host = PinnedRing.tensor(slot)[:nbytes]
        dev = L.device
        with torch.cuda.stream(self.side):
            raw = host.to(dev, non_blocking=True)
            starts = torch.arange(B, dtype=torch.int64, device=dev) * (T + 1)
            x = torch.empty((B, T), dtype=torch.int64, device=dev)
            y = torch.empty((B, T), dtype=torch.int64, device=dev)
            _cuda.cut_windows(raw.data_ptr(), isz, B * (T + 1), starts.data_ptr(), B, T,
                              x.data_ptr(), y.data_ptr(), self.side.cuda_stream)
            ev = torch.cuda.Event()
            ev.record(self.side)
        self.ring.release(slot, ev)  # back to the ring only once the copy is done
        cur = torch.cuda.current_stream(dev)
        cur.wait_event(ev)
        for t in (raw, starts, x, y):
            t.record_stream(cur)
        return x, y

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.L.device
        with torch.cuda.stream(self.side):
            xd = x.pin_memory().to(dev, non_blocking=True)
            yd = y.pin_memory().to(dev, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.side)
        cur = torch.cuda.current_stream(dev)
        cur.wait_event(ev)
        xd.record_stream(cur)
        yd.record_stream(cur)
        return xd, yd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.cache.clear()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.reader = None
