"""Per-source window order: which window sits at each position of a source's stream.

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
from typing import Any

import numpy as np

from .order import derive_key, permute


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

    def __init__(self, ds, index: int, seq_len: int, seed: int, shuffle: bool,
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
        out: list[tuple[int, int, int]] = []
        offs = self.raw_offset[c0] + (a - self.raw_first[c0]) * tb
        files = self.raw_file[c0] + file_base
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
        return np.unique(np.concatenate([np.arange(x, y + 1) for x, y in zip(c0.tolist(), c1.tolist())]))

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
# GPU decode of rans sources: host-side planning (no CUDA here, so it is tested on any
# machine). A decode group's chunks are read into one pinned staging buffer, copied to
# the device, decoded there into one device token buffer per group, and windows are
# gathered from those buffers. These functions say where every byte and token goes.

#: Staging payloads start at multiples of this (the rans kernel reads 32-bit words).
STAGING_ALIGN = 4


@dataclass
class GroupStaging:
    """Layout of one decode group in the staging buffer (host) and the token buffer (device).

    Chunks are in ascending dataset order and their tokens packed in that order in the
    token buffer, so consecutive chunks are adjacent there and a window whose chunks are
    all in the group is one contiguous run of tokens.

    Attributes:
        chunks: dataset chunk ids (ascending).
        codecs: stored codec id of each chunk.
        gpu: True where the chunk is rans and decoded by the GPU kernel; the others are
            staged as plain tokens (a raw chunk's stored bytes, or a chunk of another codec
            decoded on the host) and copied into place on the device.
        src_offsets, src_bytes: where each chunk's staged bytes lie in the staging buffer
            (offsets are multiples of :data:`STAGING_ALIGN`).
        stored_bytes: bytes read from storage for each chunk.
        out_offsets, token_counts: each chunk's tokens in the token buffer.
        staging_bytes, num_tokens: sizes of the two buffers; token_bytes: 2 or 4.
        models: the distinct ``RansModel`` objects of the GPU chunks; ``model_index`` the
            index of each chunk's model in it (-1 where not GPU-decoded).
        chunk_desc, block_desc: the kernel's descriptor tables for the GPU chunks
            (:func:`llmio_native.dataset.rans.descriptors`).
    """

    chunks: np.ndarray
    codecs: np.ndarray
    gpu: np.ndarray
    src_offsets: np.ndarray
    src_bytes: np.ndarray
    stored_bytes: np.ndarray
    out_offsets: np.ndarray
    token_counts: np.ndarray
    staging_bytes: int
    num_tokens: int
    models: list
    model_index: np.ndarray
    chunk_desc: np.ndarray
    block_desc: np.ndarray
    token_bytes: int

    @property
    def decoded_bytes(self) -> int:
        """Token bytes the GPU kernel writes (GPU-decoded chunks only)."""
        return int(self.token_counts[self.gpu].sum()) * self.token_bytes


def plan_group_staging(ds, chunks, model_of=None) -> GroupStaging:
    """Plan the staging of ``chunks`` (dataset chunk ids) of ``ds`` for a GPU decode.

    ``model_of(ci)`` gives a rans chunk's model (default ``ds.model_of``: reads and caches
    the model region, so call this where I/O is fine). No per-token work.

    Raises:
        ChecksumError, FormatError, OSError: a model region cannot be read.
    """
    from ..dataset import format as F
    from ..dataset import rans

    ch = np.unique(np.asarray(chunks, dtype=np.int64))
    rows = ds.chunks[ch]
    tb = int(np.dtype(ds.dtype).itemsize)
    codecs = rows["codec"].astype(np.int64)
    counts = rows["token_count"].astype(np.int64)
    stored = rows["stored_bytes"].astype(np.int64)
    gpu = codecs == F.CODEC_RANS
    staged = np.where(gpu | (codecs == F.CODEC_NONE), stored, counts * tb)
    padded = -(-staged // STAGING_ALIGN) * STAGING_ALIGN
    src_off = np.zeros(len(ch), dtype=np.int64)
    if len(ch):
        np.cumsum(padded[:-1], out=src_off[1:])
    out_off = np.zeros(len(ch), dtype=np.int64)
    if len(ch):
        np.cumsum(counts[:-1], out=out_off[1:])
    model_of = ds.model_of if model_of is None else model_of
    models: list = []
    ids: dict[int, int] = {}
    midx = np.full(len(ch), -1, dtype=np.int64)
    for k in np.flatnonzero(gpu).tolist():
        m = model_of(int(ch[k]))
        j = ids.get(id(m))
        if j is None:
            j = ids[id(m)] = len(models)
            models.append(m)
        midx[k] = j
    cd, bd = rans.descriptors(src_off[gpu], staged[gpu], counts[gpu], midx[gpu], out_off[gpu])
    st = GroupStaging(chunks=ch, codecs=codecs, gpu=gpu, src_offsets=src_off, src_bytes=staged,
                      stored_bytes=stored, out_offsets=out_off, token_counts=counts,
                      staging_bytes=int(padded.sum()), num_tokens=int(counts.sum()), models=models,
                      model_index=midx, chunk_desc=cd, block_desc=bd, token_bytes=tb)
    return st


def fill_staging(ds, staging: GroupStaging, buf: np.ndarray, read_batch_into) -> None:
    """Read the group's chunks into ``buf`` (uint8, ``staging.staging_bytes``) and check them.

    ``read_batch_into(requests)`` reads ``(file index of ds, offset, writable view)``
    requests (one batched submission). Every chunk's length and checksum are checked over
    its stored bytes (xxhash: the only per-byte host work); rans and raw chunks are read
    straight into their place, other codecs are decoded into it on the host.

    Raises:
        ChecksumError, FormatError: a chunk is corrupt (names the file and chunk).
        OSError, ShortReadError: a read failed.
    """
    from ..dataset import format as F

    rows = ds.chunks[staging.chunks]
    direct = staging.gpu | (staging.codecs == F.CODEC_NONE)
    reqs, other = [], []
    for k in range(len(staging.chunks)):
        f, off, n = int(rows["file"][k]), int(rows["offset"][k]), int(staging.stored_bytes[k])
        if direct[k]:
            so = int(staging.src_offsets[k])
            reqs.append((f, off, buf[so:so + n]))
        else:
            tmp = np.empty(n, dtype=np.uint8)
            reqs.append((f, off, tmp))
            other.append((k, tmp))
    if reqs:
        read_batch_into(reqs)
    tmps = dict(other)
    dt = np.dtype(ds.dtype)
    for k in range(len(staging.chunks)):
        ci = int(staging.chunks[k])
        so, nb = int(staging.src_offsets[k]), int(staging.src_bytes[k])
        if direct[k]:
            ds.check_chunk(ci, buf[so:so + nb])
        else:  # zstd (or another host codec) inside a rans dataset: decoded here
            ds.decode_chunk(ci, tmps[k], out=buf[so:so + nb].view(dt))


def window_starts(plan: SourcePlan, staging: GroupStaging, windows) -> np.ndarray:
    """First token of each window (ids of ``plan``'s source) in the group's token buffer.

    Raises:
        RuntimeError: a window's chunks are not all in the group (a planning bug: a group
            holds every chunk its windows reach).
    """
    w = np.atleast_1d(np.asarray(windows, dtype=np.int64))
    a = w * plan.T
    c0, c1 = plan.chunks_of_window(w)
    k0 = np.searchsorted(staging.chunks, c0)
    k1 = np.searchsorted(staging.chunks, c1)
    n = len(staging.chunks)
    ok = (k1 < n) & (k0 < n)
    ok &= staging.chunks[np.minimum(k0, n - 1)] == c0
    ok &= staging.chunks[np.minimum(k1, n - 1)] == c1
    ok &= (k1 - k0) == (c1 - c0)
    if not ok.all():
        bad = int(w[np.flatnonzero(~ok)[0]])
        raise RuntimeError(f"window {bad} of source {plan.index} reaches chunks outside its decode group")
    return staging.out_offsets[k0] + (a - plan.chunk_first[c0])


def gather_parts(buffer_keys, starts) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Group a batch's rows by token buffer: ``[(key, rows, starts)]`` in first-use order.

    ``buffer_keys[i]`` names the buffer row ``i`` reads from (any hashable) and
    ``starts[i]`` its first token there; each part becomes one gather on the device.
    """
    order: dict = {}
    for i, k in enumerate(buffer_keys):
        order.setdefault(k, []).append(i)
    st = np.asarray(starts, dtype=np.int64)
    return [(k, np.asarray(r, dtype=np.int64), st[np.asarray(r, dtype=np.int64)]) for k, r in order.items()]
