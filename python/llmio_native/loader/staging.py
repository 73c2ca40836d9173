"""GPU decode of rans sources: host-side planning of a decode group's staging.

No CUDA here, so it is tested on any machine. A decode group's chunks are read into one
pinned staging buffer, copied to the device, decoded there into one device token buffer per
group, and windows are gathered from those buffers (:mod:`llmio_native.loader.gpu_decode`).
These functions say where every byte and token goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from ..dataset.base import name_chunk_in_error, plan_staging_runs
from .plan import SourcePlan

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
            (offsets are multiples of :data:`STAGING_ALIGN`). A chunk read in place (GPU
            decoded or raw) lies where it lies in its file modulo 4096, inside its run.
        in_place: True where the chunk is read in place by ``runs`` (else read apart and
            decoded or copied into its place on the host).
        runs: ``(file, file_offset, file_end, staging_offset)``: the reads that fill the
            staging buffer, each the 4096-aligned superset of neighbouring chunks of one file
            (chunks packed back to back share their boundary blocks: one read, O_DIRECT
            straight into the staging buffer; ``dataset.base.plan_staging_runs``).
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
    runs: list = field(default_factory=list)
    in_place: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def decoded_bytes(self) -> int:
        """Token bytes the GPU kernel writes (GPU-decoded chunks only)."""
        return int(self.token_counts[self.gpu].sum()) * self.token_bytes


def plan_group_staging(ds: Any, chunks: Sequence[int] | np.ndarray,
                       model_of: Callable[[int], Any] | None = None) -> GroupStaging:
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
    gpu = np.isin(codecs, F.MODEL_CODECS)
    staged = np.where(gpu | (codecs == F.CODEC_NONE), stored, counts * tb)
    # read in place: GPU chunks and raw ones, where the file offset keeps the payload aligned
    offs = rows["offset"].astype(np.int64)
    inplace = (gpu | (codecs == F.CODEC_NONE)) & (offs % STAGING_ALIGN == 0)
    files = rows["file"].astype(np.int64)
    pieces = [(int(files[k]), int(offs[k]), int(stored[k])) if inplace[k] else None for k in range(len(ch))]
    places, runs, pos = plan_staging_runs(pieces, ds.file_sizes)
    src_off = np.asarray(places, dtype=np.int64).reshape(-1)
    for k in np.flatnonzero(~inplace).tolist():  # decoded (or copied) on the host, after the runs
        src_off[k] = pos
        pos += -(-int(staged[k]) // STAGING_ALIGN) * STAGING_ALIGN
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
                      staging_bytes=pos, num_tokens=int(counts.sum()), models=models,
                      model_index=midx, chunk_desc=cd, block_desc=bd, token_bytes=tb, runs=runs,
                      in_place=inplace)
    return st


def fill_staging(ds: Any, staging: GroupStaging, buf: np.ndarray,
                 read_batch_into: Callable[[list[tuple[int, int, np.ndarray]]], Any]) -> None:
    """Read the group's chunks into ``buf`` (uint8, ``staging.staging_bytes``) and check them.

    ``read_batch_into(requests)`` reads ``(file index of ds, offset, writable view)``
    requests (one batched submission). Every chunk's length and checksum are checked over
    its stored bytes (xxhash: the only per-byte host work); rans and raw chunks are read
    straight into their place (``staging.runs``: aligned O_DIRECT reads when ``buf`` is
    page-aligned), other codecs are decoded into it on the host.

    Raises:
        ChecksumError, FormatError: a chunk is corrupt (names the file and chunk).
        OSError, ShortReadError: a read failed.
    """
    rows = ds.chunks[staging.chunks]
    reqs: list = [(f, a0, buf[at:at + a1 - a0]) for f, a0, a1, at in staging.runs]
    placed = staging.in_place
    other = []
    for k in np.flatnonzero(~placed).tolist():
        f, off, n = int(rows["file"][k]), int(rows["offset"][k]), int(staging.stored_bytes[k])
        tmp = np.empty(n, dtype=np.uint8)
        reqs.append((f, off, tmp))
        other.append((k, tmp))
    if reqs:
        try:
            read_batch_into(reqs)
        except OSError:  # a run holds several chunks: read each alone, the error names its own range
            for k in range(len(staging.chunks)):
                f, off, n = int(rows["file"][k]), int(rows["offset"][k]), int(staging.stored_bytes[k])
                so = int(staging.src_offsets[k])
                try:
                    read_batch_into([(f, off, buf[so:so + n] if placed[k] else dict(other)[k])])
                except OSError as exc:
                    raise name_chunk_in_error(exc, ds.describe_chunk(int(staging.chunks[k]))) from None
    tmps = dict(other)
    dt = np.dtype(ds.dtype)
    for k in range(len(staging.chunks)):
        ci = int(staging.chunks[k])
        so, nb = int(staging.src_offsets[k]), int(staging.src_bytes[k])
        if placed[k]:
            ds.check_chunk(ci, buf[so:so + nb])
        else:  # zstd (or another host codec) inside a rans dataset, or a misaligned raw chunk
            ds.decode_chunk(ci, tmps[k], out=buf[so:so + nb].view(dt))


def window_starts(plan: SourcePlan, staging: GroupStaging, windows: Any) -> np.ndarray:
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


def gather_parts(buffer_keys: Sequence[Hashable], starts: Any) -> list[tuple[Hashable, np.ndarray, np.ndarray]]:
    """Group a batch's rows by token buffer: ``[(key, rows, starts)]`` in first-use order.

    ``buffer_keys[i]`` names the buffer row ``i`` reads from (any hashable) and
    ``starts[i]`` its first token there; each part becomes one gather on the device.
    """
    order: dict = {}
    for i, k in enumerate(buffer_keys):
        order.setdefault(k, []).append(i)
    st = np.asarray(starts, dtype=np.int64)
    return [(k, np.asarray(r, dtype=np.int64), st[np.asarray(r, dtype=np.int64)]) for k, r in order.items()]
