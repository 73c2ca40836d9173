"""Window order: which window sits at each position of a source's stream, and which
(source, window) each row of a rank's batches holds (:class:`BatchPlanner`).

Window ``i`` of a source is tokens ``[i*T, i*T + T + 1)``; a source has
``n = (num_tokens - 1) // T`` windows and the tail tokens that do not complete one are
dropped. Position ``p`` of the source's stream is epoch ``p // n``, index ``p % n``.

* Uncompressed sources: index -> window through a seeded bijection of ``[0, n)`` keyed
  by (seed, epoch, source). No index, O(1) memory.
* Compressed sources: a chunk-level shuffle with a bounded shuffle buffer. Chunks form
  spans of ``span_chunks`` stream-consecutive chunks; the spans are permuted per epoch;
  ``group_spans`` consecutive spans of that order form a group, and the windows that
  start in a group are permuted within it. A group is decoded once, so host memory is
  about ``group_spans * (span_chunks + 1)`` decoded chunks per open group (the loader
  keeps the current group and decodes the next one ahead: two groups), and the bytes
  read per epoch are the compressed size plus one chunk per span (windows that run into
  the next span's first chunk; more when ``seq_len`` exceeds a chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .order import derive_key, permute, stride_schedule


@dataclass
class EpochLayout:
    """Compressed-source order of one epoch: spans in permuted order and their sizes."""

    span_order: np.ndarray  # [nspans] span ids in this epoch's order
    cum: np.ndarray  # [nspans + 1] windows before each span of span_order
    group_spans: int

    def group_bounds(self, g: int) -> tuple[int, int]:
        a = g * self.group_spans
        b = min(a + self.group_spans, len(self.span_order))
        return int(self.cum[a]), int(self.cum[b])


class SourcePlan:
    """Window order of one source (see the module docstring).

    Raises:
        ValueError: the source has no complete window for ``seq_len``.
    """

    def __init__(self, ds: Any, index: int, seq_len: int, seed: int, shuffle: bool,
                 span_chunks: int, group_spans: int) -> None:
        self.ds = ds
        self.index = index
        self.T = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n = (int(ds.num_tokens) - 1) // seq_len if ds.num_tokens > 0 else 0
        if self.n < 1:
            raise ValueError(
                f"source {index} ({getattr(ds, 'path', ds)}) has {ds.num_tokens} tokens: "
                f"no complete window of seq_len + 1 = {seq_len + 1} tokens")
        self.compressed = ds.codec != "none"
        self.token_bytes = int(np.dtype(ds.dtype).itemsize)
        if not self.compressed:
            ch = ds.chunks
            self.raw_first = ch["first_token"].astype(np.int64)
            self.raw_count = ch["token_count"].astype(np.int64)
            self.raw_file = ch["file"].astype(np.int64)
            self.raw_offset = ch["offset"].astype(np.int64)
        self.span_chunks = max(1, int(span_chunks))
        self.group_spans = max(1, int(group_spans))
        self._layouts: dict[int, EpochLayout] = {}
        if self.compressed:
            ch = ds.chunks
            self.chunk_first = ch["first_token"].astype(np.int64)
            self.chunk_count = ch["token_count"].astype(np.int64)
            # Windows whose start token i*T lies in chunk c: [lo_c, hi_c).
            lo = -(-self.chunk_first // seq_len)
            hi = -(-(self.chunk_first + self.chunk_count) // seq_len)
            self.chunk_wlo = np.minimum(lo, self.n)
            self.chunk_whi = np.minimum(hi, self.n)
            nc = len(ch)
            self.nspans = -(-nc // self.span_chunks)
            first = np.arange(self.nspans) * self.span_chunks
            last = np.minimum(first + self.span_chunks, nc) - 1
            self.span_wlo = self.chunk_wlo[first]
            self.span_whi = self.chunk_whi[last]
            # Last chunk a span's windows reach: the one holding the final token of the last
            # window that starts in the span (the span's own last chunk when it has none).
            # Usually the stream-next chunk; several chunks when seq_len > chunk_tokens.
            last_tok = np.minimum(np.maximum(self.span_whi - 1, 0) * seq_len + seq_len, int(ds.num_tokens) - 1)
            reach = np.searchsorted(self.chunk_first, last_tok, side="right") - 1
            self.span_reach = np.where(self.span_whi > self.span_wlo, np.maximum(reach, last), last)

    # ------------------------------------------------------------------ order
    def layout(self, epoch: int) -> EpochLayout:
        lay = self._layouts.get(epoch)
        if lay is None:
            if self.shuffle:
                order = permute(np.arange(self.nspans), self.nspans, derive_key(self.seed, epoch, self.index, 1))
                order = order.astype(np.int64)
            else:
                order = np.arange(self.nspans, dtype=np.int64)
            sizes = (self.span_whi - self.span_wlo)[order]
            cum = np.zeros(self.nspans + 1, dtype=np.int64)
            np.cumsum(sizes, out=cum[1:])
            lay = EpochLayout(order, cum, self.group_spans)
            if len(self._layouts) > 2:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = lay
        return lay

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at stream positions ``positions`` (int64, any epochs)."""
        pos = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(pos)
        epochs = pos // self.n
        idx = pos % self.n
        for e in np.unique(epochs):
            m = epochs == e
            if not self.shuffle and not self.compressed:
                out[m] = idx[m]
            elif not self.compressed:
                out[m] = permute(idx[m], self.n, derive_key(self.seed, int(e), self.index, 0)).astype(np.int64)
            else:
                out[m] = self._compressed_ids(int(e), idx[m])
        return out

    def group_of(self, epoch: int, j: int) -> int:
        lay = self.layout(epoch)
        k = int(np.searchsorted(lay.cum, j, side="right")) - 1
        return k // self.group_spans

    def group_keys(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch and group (compressed sources) of each stream position, as two int64 arrays."""
        pos = np.asarray(positions, dtype=np.int64)
        epochs = pos // self.n
        j = pos % self.n
        groups = np.empty_like(pos)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            groups[m] = (np.searchsorted(self.layout(e).cum, j[m], side="right") - 1) // self.group_spans
        return epochs, groups

    def _compressed_ids(self, epoch: int, j: np.ndarray) -> np.ndarray:
        lay = self.layout(epoch)
        span_rank = np.searchsorted(lay.cum, j, side="right") - 1
        group = span_rank // self.group_spans
        u = j.copy()
        if self.shuffle:
            for g in np.unique(group):
                m = group == g
                a, b = lay.group_bounds(int(g))
                u[m] = a + permute(j[m] - a, b - a, derive_key(self.seed, epoch, self.index, 2, int(g))).astype(np.int64)
        k = np.searchsorted(lay.cum, u, side="right") - 1
        return self.span_wlo[lay.span_order[k]] + (u - lay.cum[k])

    def raw_requests(self, windows: np.ndarray, file_base: int) -> list[tuple[int, int, int]]:
        """(file, byte offset, nbytes) reads of the windows of an uncompressed source, in
        order; a window that crosses a chunk or file boundary becomes several pieces."""
        T, tb = self.T, self.token_bytes
        a = np.asarray(windows, dtype=np.int64) * T
        c0 = np.searchsorted(self.raw_first, a, side="right") - 1
        c1 = np.searchsorted(self.raw_first, a + T, side="right") - 1
        offs = self.raw_offset[c0] + (a - self.raw_first[c0]) * tb
        files = self.raw_file[c0] + file_base
        if np.array_equal(c0, c1):  # no window crosses a chunk: one read each, no Python loop
            return list(zip(files.tolist(), offs.tolist(), [(T + 1) * tb] * len(a)))
        out: list[tuple[int, int, int]] = []
        for k in range(len(a)):
            if c0[k] == c1[k]:
                out.append((int(files[k]), int(offs[k]), (T + 1) * tb))
            else:
                out.extend((file_base + f, o, n) for f, o, n in self.ds.locate(int(a[k]), T + 1))
        return out

    def raw_chunks(self, windows: np.ndarray) -> np.ndarray:
        """Chunks holding tokens of the windows of an uncompressed source, sorted, unique."""
        a = np.asarray(windows, dtype=np.int64) * self.T
        c0 = np.searchsorted(self.raw_first, a, side="right") - 1
        c1 = np.searchsorted(self.raw_first, a + self.T, side="right") - 1
        if np.array_equal(c0, c1):
            return np.unique(c0)
        grid = c0[:, None] + np.arange(int((c1 - c0).max()) + 1)[None, :]
        return np.unique(grid[grid <= c1[:, None]])

    # ------------------------------------------------------------------ chunks
    def chunks_of_window(self, w: Any) -> tuple[Any, Any]:
        """First and last chunk holding tokens of window ``w`` (compressed sources): ints
        for one window, arrays for an array of windows."""
        a = np.asarray(w, dtype=np.int64) * self.T
        c0 = np.searchsorted(self.chunk_first, a, side="right") - 1
        c1 = np.searchsorted(self.chunk_first, a + self.T, side="right") - 1
        if c0.ndim == 0:
            return int(c0), int(c1)
        return c0, c1

    def group_chunks(self, epoch: int, g: int) -> list[int]:
        """Chunks a group needs: its spans' chunks plus the chunks after each span that
        its last windows run into (usually one)."""
        lay = self.layout(epoch)
        spans = lay.span_order[g * self.group_spans:(g + 1) * self.group_spans]
        need: list[int] = []
        for s in spans.tolist():
            a = s * self.span_chunks
            need.extend(range(a, int(self.span_reach[s]) + 1))
        return sorted(set(need))

    @property
    def num_groups(self) -> int:
        """Groups per epoch (compressed sources)."""
        return -(-self.nspans // self.group_spans)

    def next_group(self, epoch: int, g: int) -> tuple[int, int]:
        """The group that follows ``(epoch, g)`` in the stream."""
        return (epoch, g + 1) if g + 1 < self.num_groups else (epoch + 1, 0)

    def group_end_position(self, epoch: int, g: int) -> int:
        """Stream position one past the group's last window."""
        return epoch * self.n + self.layout(epoch).group_bounds(g)[1]


# ---------------------------------------------------------------------------------------
# Batches: the global stream cut into steps of B*W samples, rank r taking its slice.


class Batch:
    """One planned batch of this rank: (source, window id) per row, and the state after it.

    The pipeline fills in how each row is produced: ``ring_rows`` (uncompressed rows read
    into a ring slot, ordered by source then row: the slot holds ``ring_blocks``, one
    contiguous ``(source, rows, byte offset)`` block per source), ``cache_rows``
    (compressed rows assembled from the host cache) and ``gpu_rows`` (rans rows gathered
    from the device token cache), and ``verify`` (chunk checks the ring rows wait for).
    """

    __slots__ = ("index", "sources", "windows", "local", "pos_after", "counts_after", "ring_rows", "ring_blocks",
                 "cache_rows", "gpu_rows", "verify")

    def __init__(self, index: int, sources: np.ndarray, windows: np.ndarray, local: np.ndarray, pos_after: int,
                 counts_after: np.ndarray) -> None:
        self.index = index
        self.sources = sources
        self.windows = windows
        self.local = local
        self.pos_after = pos_after
        self.counts_after = counts_after
        empty = np.empty(0, dtype=np.int64)
        self.ring_rows: np.ndarray = empty
        self.ring_blocks: list[tuple[int, np.ndarray, int]] = []
        self.cache_rows: np.ndarray = empty
        self.gpu_rows: np.ndarray = empty
        self.verify: list[tuple[tuple[int, int], Any]] = []


def ranks_within(src: np.ndarray, num_sources: int) -> np.ndarray:
    """For each entry of ``src`` (source ids), how many earlier entries have the same source."""
    order = np.argsort(src, kind="stable")
    ss = src[order]
    first = np.searchsorted(ss, np.arange(num_sources))
    out = np.empty(len(src), dtype=np.int64)
    out[order] = np.arange(len(src), dtype=np.int64) - first[ss]
    return out


class BatchPlanner:
    """Which (source, window) each row of this rank's batches holds (see ``TokenLoader``).

    Global step ``t`` takes stream positions ``[t*B*W, (t+1)*B*W)``; rank ``r`` the slice
    ``[r*B, (r+1)*B)``. Several sources are mixed by stride scheduling; each source keeps
    its own position (``counts``), whose windows come from its :class:`SourcePlan`.
    """

    def __init__(self, plans: list[SourcePlan], weights: np.ndarray, batch_size: int, world_size: int,
                 rank: int) -> None:
        self.plans = plans
        self.weights = weights
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank

    def batches(self, pos: int, counts: np.ndarray, first_index: int) -> Iterator[Batch]:
        """Endless batches of this rank from stream position ``pos`` (per-source ``counts``),
        the first numbered ``first_index``."""
        B, W, r = self.batch_size, self.world_size, self.rank
        gb = B * W
        S = len(self.plans)
        counts = np.asarray(counts, dtype=np.int64).copy()
        t = first_index
        mine = slice(r * B, (r + 1) * B)
        while True:
            if S == 1:
                src_r = np.zeros(B, dtype=np.int64)
                local_r = counts[0] + np.arange(r * B, (r + 1) * B, dtype=np.int64)
                new_counts = counts + gb
                wins = self.plans[0].window_ids(local_r)
            else:
                src, new_counts = stride_schedule(counts, self.weights, gb)
                local = counts[src] + ranks_within(src, S)
                src_r, local_r = src[mine], local[mine]
                wins = np.empty(B, dtype=np.int64)
                for s in np.unique(src_r).tolist():  # one vectorised call per source
                    m = src_r == s
                    wins[m] = self.plans[s].window_ids(local_r[m])
            yield Batch(t, src_r, wins, local_r, pos + gb, new_counts)
            pos, counts, t = pos + gb, new_counts, t + 1
