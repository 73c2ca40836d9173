"""``verify``: read back every chunk of a :class:`TokenDataset`, re-check every checksum and
size, and report the bad chunks (:class:`VerifyReport`, :class:`BadChunk`).

``TokenDataset.verify`` calls :func:`verify`. This module works on the dataset's chunk
table and its private helpers (``_check_stored``, ``_decode``, the region ends and file
sizes recorded at open): it is part of the generic dataset, split out for size.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import FormatError
from ..io import Reader, empty_aligned
from . import format as F
from .base import GROUP_BYTES, decode_pool, plan_staging_runs

if TYPE_CHECKING:
    from .base import TokenDataset


class BadChunk(NamedTuple):
    """One problem found by :meth:`TokenDataset.verify`.

    ``chunk`` is the chunk's index within ``path`` (``-1`` for a problem with the whole
    file); ``offset`` is the byte offset in ``path``.
    """

    path: str
    chunk: int
    offset: int
    reason: str


@dataclass
class VerifyReport:
    """What :meth:`TokenDataset.verify` found.

    Attributes:
        ok: no problem found.
        bad_chunks: one :class:`BadChunk` per problem, in stream order.
        chunks_checked: chunks whose bytes were read back.
        bytes_checked: bytes read.
        checksums: whether the format records checksums (compat formats do not: there,
            verify can only prove every byte is readable and every size consistent).
        seconds: wall time.
    """

    ok: bool
    bad_chunks: list[BadChunk] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    checksums: bool = True
    seconds: float = 0.0

    def __str__(self) -> str:
        head = (
            f"{'OK' if self.ok else 'FAILED'}: {self.chunks_checked} chunks, "
            f"{self.bytes_checked} bytes checked in {self.seconds:.2f} s"
            + ("" if self.checksums else " (format has no checksums: readability and sizes only)")
        )
        lines = [head] + [f"  {b.path} chunk {b.chunk} @ {b.offset}: {b.reason}" for b in self.bad_chunks]
        return "\n".join(lines)


def verify(ds: "TokenDataset", progress: bool = False) -> VerifyReport:
    """Read back every chunk of ``ds``, re-check every checksum and every size, report problems.

    For each chunk: the stored bytes are read (with the zero padding after them in
    our format), the checksum compared, the chunk decoded to its recorded size and
    the padding checked for zeros. A file whose size changed since open, a read error
    or a short read is reported too; so is damage around a rans model region, and a
    missing or damaged ``index.lio`` of our format (chunk ``-1``). Bad chunks never raise.

    A remote dataset (``ds.remote``) is checked through its cache: each group of chunks is
    fetched (what is not cached yet; a cache smaller than the data evicts as it goes) and
    pinned while it is read back, so every chunk of the store is checked, not the holes of
    the cache files. A chunk that cannot be fetched (after the retries), or fails its checksum
    in two fetches, is a bad chunk whose reason names the URL and byte range; with the store
    unreachable at open (``ds.remote.offline``) the chunks not in the cache are reported as
    not checked.

    Args:
        ds: the dataset.
        progress: show a tqdm progress bar over the bytes.

    Returns:
        A :class:`VerifyReport`; ``ok`` is false when anything was found.

    Raises:
        OSError: only if no data file can be read at all (e.g. the directory is gone).
        DatasetChangedError: a remote dataset changed in the store since it was opened.
    """
    t0 = time.perf_counter()
    remote = getattr(ds, "remote", None)
    limit = GROUP_BYTES if remote is None else min(GROUP_BYTES, remote.read_group_bytes)
    report = VerifyReport(ok=True, checksums=ds.has_checksums)
    bad = report.bad_chunks
    readable = []
    for f, p in enumerate(ds.paths):
        try:
            size = os.stat(p).st_size
        except OSError as exc:
            bad.append(BadChunk(p, -1, 0, f"cannot stat: {exc}"))
            continue
        if size != ds.file_sizes[f]:
            bad.append(BadChunk(p, -1, min(size, ds.file_sizes[f]),
                                f"file size is {size} bytes, expected {ds.file_sizes[f]}"))
        readable.append(f)
    if ds.paths and not readable:
        raise FileNotFoundError(f"{ds.path}: none of its {len(ds.paths)} data files can be read")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int((ds.region_ends - ds.chunks["offset"]).sum()), unit="B",
                   unit_scale=True, desc=f"verify {os.path.basename(ds.path)}")
    try:
        reader: Any = ds.reader
        fmap = {f: f for f in range(len(ds.paths))}
    except OSError:
        reader = Reader([ds.paths[f] for f in readable], **ds.reader_options)
        fmap = {f: k for k, f in enumerate(readable)}
    group: list[int] = []
    gbytes = 0
    skip = {f for f in range(len(ds.paths)) if f not in fmap}
    for ci in range(len(ds.chunks)):
        if int(ds.chunks[ci]["file"]) in skip:
            continue
        group.append(ci)
        gbytes += int(ds.region_ends[ci] - ds.chunks[ci]["offset"])
        if gbytes >= limit:
            _verify_group(ds, reader, fmap, group, report, bar)
            group, gbytes = [], 0
    if group:
        _verify_group(ds, reader, fmap, group, report, bar)
    if bar is not None:
        bar.close()
    _verify_model_padding(ds, reader, fmap, bad)
    if remote is None and hasattr(ds, "_metadata_problems"):  # our format: index.lio
        bad.extend(BadChunk(p, -1, off, reason) for p, off, reason in ds._metadata_problems())
    bad.sort(key=lambda b: (ds.paths.index(b.path) if b.path in ds.paths else -1, b.chunk))
    report.ok = not bad
    report.seconds = time.perf_counter() - t0
    return report


def _verify_model_padding(ds: "TokenDataset", reader: Any, fmap: dict, bad: list) -> None:
    """rans: the zero padding after each model region (up to the next multiple of 4096 in
    format v1, of 8 in v2; its contents are checked when the chunks that use it decode); a
    problem is reported with chunk -1."""
    rans = np.isin(ds.chunks["codec"], F.MODEL_CODECS)
    if not rans.any():
        return
    remote = getattr(ds, "remote", None)
    for f, off in sorted(set(zip(ds.chunks["file"][rans].tolist(), ds.chunks["model"][rans].tolist()))):
        if f not in fmap:
            continue
        path = ds.paths[f]
        held: Any = contextlib.nullcontext()
        if remote is not None:  # the model region travels with a chunk's unit: fetch and pin it
            ci = int(np.flatnonzero(rans & (ds.chunks["file"] == f) & (ds.chunks["model"] == off))[0])
            units = remote.units_of_chunks([ci])
            if remote.offline and not remote.present()[units].all():
                bad.append(BadChunk(path, -1, off, "rans model region not checked: not in the cache, and the store "
                                                   "was unreachable when the dataset was opened"))
                continue
            held = remote.pinned(units)
        try:
            with held:
                head = reader.read(fmap[f], off, F.MODEL_HEADER_BYTES)
                end = off + F.model_region_size(head, path, off)
                pad = reader.read(fmap[f], end, F.align_up(end, F.chunk_align(getattr(ds, "format_version", 1))) - end)
        except (OSError, FormatError, ValueError) as exc:
            bad.append(BadChunk(path, -1, off, f"rans model region: {exc}"))
            continue
        if pad.any():
            k = int(np.flatnonzero(pad)[0])
            bad.append(BadChunk(path, -1, end + k, f"nonzero padding byte @ offset {end + k} after the rans "
                                                   f"model region @ offset {off} (the file is damaged)"))


def _verify_group(ds: "TokenDataset", reader: Any, fmap: dict, group: list[int], report: VerifyReport,
                  bar: Any) -> None:
    remote = getattr(ds, "remote", None)
    if remote is None:
        _verify_read(ds, reader, fmap, group, report, bar)
        return
    from ..remote.cache import CacheFullError
    from ..remote.errors import DatasetChangedError, RemoteChecksumError, RemoteError

    if remote.offline:  # nothing can be fetched: what is not cached cannot be checked
        here = remote.present()
        cached = [ci for ci in group if here[remote.units_of_chunks([ci])].all()]
        kept = set(cached)
        for ci in (ci for ci in group if ci not in kept):
            _bad(ds, report, ci, "not checked: not in the cache, and the store was unreachable when the dataset "
                                 "was opened")
            report.chunks_checked += 1
        group = cached
        if not group:
            return
    try:
        with remote.pinned(remote.units_of_chunks(group)):
            _verify_read(ds, reader, fmap, group, report, bar)
        return
    except DatasetChangedError:
        raise
    except (RemoteError, RemoteChecksumError, CacheFullError) as exc:
        if len(group) > 1:  # find the chunk(s) at fault, one at a time
            for ci in group:
                _verify_group(ds, reader, fmap, [ci], report, bar)
            return
        report.chunks_checked += 1
        _bad(ds, report, group[0], f"{type(exc).__name__}: {exc}")


def _bad(ds: "TokenDataset", report: VerifyReport, ci: int, reason: str) -> None:
    c = ds.chunks[ci]
    report.bad_chunks.append(BadChunk(ds.paths[int(c["file"])], ds.chunk_origin(ci)["chunk"], int(c["offset"]), reason))


def _verify_read(ds: "TokenDataset", reader: Any, fmap: dict, group: list[int], report: VerifyReport,
                 bar: Any) -> None:
    """Read ``group``'s chunk regions back and check each (the chunks are local, or pinned)."""
    reqs = []
    for ci in group:
        c = ds.chunks[ci]
        reqs.append((fmap[int(c["file"])], int(c["offset"]), int(ds.region_ends[ci] - c["offset"])))
    try:
        # neighbouring regions (packed back to back in format v2) read as aligned runs: one
        # O_DIRECT read each, a block two chunks share read once
        sizes = [0] * (max(fmap.values()) + 1)
        for f, k in fmap.items():
            sizes[k] = ds.file_sizes[f]  # as opened: a shard cut short since then fails the read
        places, runs, total = plan_staging_runs(reqs, sizes)
        staging = empty_aligned(total)
        reader.read_batch_into([(f, a0, staging[at:at + a1 - a0]) for f, a0, a1, at in runs])
        bufs: list[Any] = [staging[p:p + n] for p, (_, _, n) in zip(places, reqs)]
    except OSError:
        bufs = []
        for (f, off, n), ci in zip(reqs, group):
            try:
                bufs.append(reader.read(f, off, n))
            except OSError as exc:
                bufs.append(exc)
    results = list(decode_pool().map(lambda ci, buf: _verify_one(ds, ci, buf), group, bufs))
    for ci, buf, reason in zip(group, bufs, results):
        report.chunks_checked += 1
        if not isinstance(buf, BaseException):
            report.bytes_checked += int(buf.nbytes)
        if reason is not None:
            _bad(ds, report, ci, reason)
    if bar is not None:
        bar.update(sum(r[2] for r in reqs))


def _verify_one(ds: "TokenDataset", ci: int, buf: Any) -> str | None:
    """Why chunk ``ci`` (its region as read, or the read's exception) is bad, or None."""
    if isinstance(buf, BaseException):
        return f"read failed: {buf}"
    c = ds.chunks[ci]
    n = int(c["stored_bytes"])
    stored = buf[:n]
    try:
        ds.decode_chunk(ci, stored)  # checks size and checksum, then decodes
    except (FormatError, NotImplementedError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    pad = buf[n:]
    if pad.any():
        k = int(np.flatnonzero(pad)[0])
        return (f"nonzero padding byte @ offset {int(c['offset']) + n + k} after the chunk "
                "(the tokens are intact; the file is damaged)")
    return None


__all__ = ["verify", "VerifyReport", "BadChunk"]
