"""The generic token dataset: :class:`TokenDataset` and its read planner.

Every source (our shard directories, ``llmio.py``, and the compatibility formats of
``compat.py``) is described the same way: a list of files (``paths``) and a table of
chunks in stream order (``chunks``), each chunk a byte range of one file holding
``token_count`` tokens stored with ``codec``. Reads, ``locate``, ``decode_chunk`` and
``verify`` (``verify.py``) are written once against that description; the formats differ
only in how they build it.

A read is planned as a list of typed steps (:class:`DirectRaw`, :class:`StagedRaw`,
:class:`StagedChunk`), run in groups of at most :data:`GROUP_BYTES` staged bytes: one
batch of reads through the :class:`Reader`, then each step's ``finish`` (check, decode,
copy), on the decode pool when the group is large.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import numpy as np
import xxhash

from ..errors import ChecksumError, FormatError
from ..io import empty_aligned
from ..io import Reader
from . import format as F

if TYPE_CHECKING:
    from .verify import VerifyReport

#: Stored bytes gathered per batch of reads (bounds the temporary memory of read/verify).
GROUP_BYTES = 64 << 20
#: Decoded bytes above which a batch decodes on the thread pool instead of inline.
PARALLEL_DECODE_BYTES = 1 << 20
#: ``read`` results at least this large are page-aligned (O_DIRECT lands in them directly).
DIRECT_OUT_BYTES = 256 << 10
#: Steps per read group at most (bounds the size of one ``read_batch_into``).
GROUP_STEPS = 4096

_pool_lock = threading.Lock()
_pool: tuple[int, cf.ThreadPoolExecutor] | None = None


def decode_pool() -> cf.ThreadPoolExecutor:
    """One decode pool per process (recreated after fork), shared by reads and verify."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4,
                                                         thread_name_prefix="llmio-decode"))
        return _pool[1]


# -- read plan steps --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirectRaw:
    """Raw tokens read straight into their place in the output (file offset and destination
    congruent modulo 4096). ``check``: the piece is a whole chunk whose checksum is then
    checked in place."""

    chunk: int
    file: int
    offset: int
    dst: np.ndarray
    check: bool

    staged_bytes = 0

    def finish(self, ds: "TokenDataset", src: np.ndarray | None) -> None:
        """Check the chunk's bytes where they landed (only planned when ``check``)."""
        ds._check_stored(self.chunk, self.dst.view(np.uint8))


@dataclass(frozen=True)
class StagedRaw:
    """Raw tokens read into staging at a congruent offset, then copied to ``dst`` (an
    incongruent destination). ``check``: the piece is a whole chunk, checksummed on the way."""

    chunk: int
    file: int
    offset: int
    dst: np.ndarray
    check: bool

    @property
    def nbytes(self) -> int:
        """Bytes read."""
        return self.dst.nbytes

    @property
    def staged_bytes(self) -> int:
        """Staging bytes the step may take (its bytes plus alignment)."""
        return self.dst.nbytes + F.ALIGN

    def finish(self, ds: "TokenDataset", src: np.ndarray | None) -> None:
        """Check (when asked) and copy the staged bytes into ``dst``."""
        assert src is not None
        if self.check:
            ds._check_stored(self.chunk, src)
        self.dst.view(np.uint8)[:] = src


@dataclass(frozen=True)
class StagedChunk:
    """A whole stored chunk read into staging, checked and decoded; its tokens
    ``[lo, hi)`` go to ``dst`` (compressed chunks, and raw chunks to check but only partly
    wanted)."""

    chunk: int
    file: int
    offset: int
    nbytes: int
    dst: np.ndarray
    lo: int
    hi: int

    @property
    def staged_bytes(self) -> int:
        """Staging bytes the step may take (its bytes plus alignment)."""
        return self.nbytes + F.ALIGN

    def finish(self, ds: "TokenDataset", src: np.ndarray | None) -> None:
        """Check the stored bytes, decode them (or slice raw ones) into ``dst``."""
        assert src is not None
        ci = self.chunk
        ds._check_stored(ci, src)
        tc = int(ds.chunks[ci]["token_count"])
        if self.lo == 0 and self.hi == tc:
            ds._decode(ci, src, self.dst)
        elif int(ds.chunks[ci]["codec"]) == F.CODEC_NONE:
            self.dst[:] = src.view(ds.dtype)[self.lo : self.hi]
        else:
            tmp = np.empty(tc, dtype=ds.dtype)
            ds._decode(ci, src, tmp)
            self.dst[:] = tmp[self.lo : self.hi]


ReadStep = Union[DirectRaw, StagedRaw, StagedChunk]


def name_chunk_in_error(exc: OSError, where: str) -> OSError:
    """``exc`` (an ``OSError`` from a read) again, its message ending with ``(reading <where>)``:
    the engine names the aligned block it read, which in format v2 is not the chunk's offset.
    Same type, errno and file name; ``exc`` itself when it carries no errno."""
    if exc.errno is None or exc.strerror is None:
        return exc
    try:
        out = type(exc)(exc.errno, f"{exc.strerror} (reading {where})", exc.filename)
    except TypeError:  # a subclass with another constructor
        return exc
    out.__traceback__ = exc.__traceback__
    return out


def plan_staging_runs(pieces: Sequence[tuple[int, int, int] | None], file_sizes: Sequence[int],
                      align: int = F.ALIGN) -> tuple[list[int], list[tuple[int, int, int, int]], int]:
    """Lay out byte ranges of files in one staging buffer so that each is read with O_DIRECT.

    ``pieces[k]`` is ``(file, offset, nbytes)`` or ``None`` (not staged). Pieces of one file
    whose aligned supersets touch or share a block (chunks packed back to back, format v2;
    or v1 chunks with their padding) are coalesced into one *run*: one read of the aligned
    superset ``[align_down(first offset), align_up(last end))`` (cut at the file's end), so a
    block two chunks share is read once. Runs start at multiples of ``align`` in the buffer
    and each piece lies in its run where it lies in the file (congruent modulo ``align``).

    Returns:
        ``(places, runs, total)``: the buffer offset of each piece (-1 for ``None``), the runs
        as ``(file, file_offset, file_end, buffer_offset)`` to read, and the buffer size needed
        (a multiple of ``align``).
    """
    places: list[int] = []
    runs: list[tuple[int, int, int, int]] = []
    pos = 0  # end of the staging used so far (a multiple of align)
    cur: list[int] | None = None  # [file, a0, end of the last piece, buffer offset of a0]
    for piece in pieces:
        if piece is None:
            places.append(-1)
            continue
        f, off, n = piece
        if cur is not None and cur[0] == f and off >= cur[2] and off // align <= -(-cur[2] // align):
            places.append(cur[3] + off - cur[1])
            cur[2] = off + n
            continue
        if cur is not None:
            runs.append((cur[0], cur[1], min(F.align_up(cur[2], align), int(file_sizes[cur[0]])), cur[3]))
            pos = cur[3] + F.align_up(cur[2], align) - cur[1]
        a0 = F.align_down(off, align)
        cur = [f, a0, off + n, pos]
        places.append(pos + off - a0)
    if cur is not None:
        runs.append((cur[0], cur[1], min(F.align_up(cur[2], align), int(file_sizes[cur[0]])), cur[3]))
        pos = cur[3] + F.align_up(cur[2], align) - cur[1]
    return places, runs, pos


class TokenDataset:
    """A token stream stored in one or more files, read through :class:`Reader`.

    Built by :func:`open_dataset` (``llmio.py``, ``compat.py``); not constructed directly. Attributes:

    * ``path`` (str): what was opened; ``format``: ``"llmio"``, ``"nanogpt"``, ``"llmc"``
      or ``"megatron"``.
    * ``paths`` (list[str]): the data files; ``chunks["file"]`` indexes into it.
    * ``num_tokens``, ``num_documents`` (int); ``dtype`` (numpy dtype of the tokens);
      ``codec`` (``"none"`` | ``"zstd"`` | ``"rans"``: the dataset's codec; a compressed
      dataset may hold chunks stored raw where compression did not help, see ``chunks["codec"]``).
    * ``document_ends`` (numpy uint64, global index one past each document's last token,
      or ``None`` where the format records no boundaries).
    * ``eot_token`` (int | None), ``tokenizer_path`` (str | None), ``metadata`` (dict).
    * ``chunks``: numpy structured array, one row per chunk in stream order, fields
      ``file`` (int32), ``offset``, ``stored_bytes``, ``first_token`` (global),
      ``token_count`` (uint64), ``codec`` (uint16), ``checksum`` (uint64), ``model`` (uint64:
      a rans chunk's model region offset, else 0). Compat formats
      expose pseudo-chunks of at most ``compat.BLOCK_TOKENS`` tokens, codec none.
    * ``has_checksums`` (bool): whether ``chunks["checksum"]`` is meaningful.

    Thread-safe for reads. Pickles without its native Reader (re-created lazily in the
    process that uses it), so it can go to DataLoader workers.
    """

    format: str = "?"

    def __init__(
        self,
        *,
        path: str,
        paths: Sequence[str],
        dtype: np.dtype,
        codec: str,
        chunks: np.ndarray,
        document_ends: np.ndarray | None,
        file_sizes: Sequence[int],
        region_ends: np.ndarray | None = None,
        local_index: np.ndarray | None = None,
        has_checksums: bool = True,
        eot_token: int | None = None,
        tokenizer_path: str | None = None,
        metadata: dict | None = None,
        reader_options: dict | None = None,
    ) -> None:
        self.path = path
        self.paths = list(paths)
        self.dtype = np.dtype(dtype)
        self.codec = codec
        self.chunks = chunks
        self.document_ends = document_ends
        self.num_documents = 0 if document_ends is None else int(len(document_ends))
        self.num_tokens = int(chunks["token_count"].sum()) if len(chunks) else 0
        self.has_checksums = has_checksums
        self.eot_token = eot_token
        self.tokenizer_path = tokenizer_path
        self.metadata = metadata or {}
        self._file_sizes = [int(s) for s in file_sizes]
        self._first = chunks["first_token"].astype(np.int64)
        # end of the byte region a chunk owns (its stored bytes plus zero padding)
        self._region_ends = (chunks["offset"] + chunks["stored_bytes"]) if region_ends is None else region_ends
        if local_index is None:
            local_index = np.zeros(len(chunks), dtype=np.int64)
            for f in range(len(self.paths)):
                sel = np.flatnonzero(chunks["file"] == f)
                local_index[sel] = np.arange(len(sel))
        self._local = local_index
        self._reader_options = dict(reader_options or {})
        self._reader_obj: Reader | None = None
        self._reader_pid = -1
        self._lock = threading.Lock()
        self._models: dict[tuple[int, int], Any] = {}  # (file, model offset) -> RansModel

    # -- pickling / native handles ----------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader_obj"] = None
        state["_reader_pid"] = -1
        state["_models"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def reader(self) -> Reader:
        """The :class:`Reader` over ``paths`` (created on first use in each process).

        Raises:
            FileNotFoundError, PermissionError: a data file can no longer be opened.
        """
        with self._lock:
            if self._reader_obj is None or self._reader_pid != os.getpid():
                self._reader_obj = Reader(self.paths, **self._reader_options)
                self._reader_pid = os.getpid()
            return self._reader_obj

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.path!r}, format={self.format}, dtype={self.dtype.name}, "
            f"codec={self.codec}, tokens={self.num_tokens}, documents={self.num_documents}, "
            f"files={len(self.paths)}, chunks={len(self.chunks)})"
        )

    @property
    def token_bytes(self) -> int:
        """Bytes per token."""
        return self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes of token data on disk (sum of the chunks' stored sizes)."""
        return int(self.chunks["stored_bytes"].sum()) if len(self.chunks) else 0

    def content_id(self) -> str:
        """A short digest that identifies the dataset's content, computed cheaply (cached).

        With checksums: XXH3 over the chunk table (every chunk's checksum, size and token
        count), so two datasets of equal size, dtype and codec but other tokens differ.
        Without (nanoGPT, llm.c, Megatron files): XXH3 over each data file's size and its
        first and last 64 KiB.

        Raises:
            OSError: a data file cannot be read (compat formats).
        """
        cid = self.__dict__.get("_content_id")
        if cid is None:
            h = xxhash.xxh3_64()
            h.update(str(np.dtype(self.dtype)).encode())
            if self.has_checksums:
                for f in ("checksum", "stored_bytes", "token_count"):
                    h.update(np.ascontiguousarray(self.chunks[f]).astype("<u8").tobytes())
            else:
                for path, size in zip(self.paths, self._file_sizes):
                    h.update(np.uint64(size).tobytes())
                    edge = 1 << 16
                    with open(path, "rb") as fh:
                        h.update(fh.read(edge))
                        if size > edge:
                            fh.seek(max(edge, size - edge))
                            h.update(fh.read(edge))
            cid = self.__dict__["_content_id"] = h.hexdigest()
        return cid

    @property
    def file_sizes(self) -> list[int]:
        """Size in bytes of each file of ``paths`` when the dataset was opened."""
        return list(self._file_sizes)

    @property
    def region_ends(self) -> np.ndarray:
        """End offset of the byte region each chunk owns in its file (stored bytes plus the
        zero padding up to the next chunk or model region), one per row of ``chunks``."""
        return self._region_ends

    @property
    def reader_options(self) -> dict:
        """The :class:`Reader` options the dataset was opened with (backend, direct, ...)."""
        return dict(self._reader_options)

    def describe_chunk(self, chunk_index: int) -> str:
        """``"<file> chunk <k> (dataset chunk <i>) @ offset <o>"``: how errors name a chunk."""
        return self._where(int(chunk_index))

    def chunk_origin(self, chunk_index: int) -> dict:
        """``{"path", "chunk", "offset"}`` of a chunk: its file, index in that file, byte offset
        (the attributes errors about the chunk carry)."""
        c = self.chunks[int(chunk_index)]
        return {"path": self.paths[int(c["file"])], "chunk": int(self._local[int(chunk_index)]),
                "offset": int(c["offset"])}

    # -- helpers -------------------------------------------------------------------------
    def _where(self, ci: int) -> str:
        c = self.chunks[ci]
        return (
            f"{self.paths[int(c['file'])]} chunk {int(self._local[ci])} (dataset chunk {ci}) "
            f"@ offset {int(c['offset'])}"
        )

    def _check_range(self, start: Any, count: Any) -> tuple[int, int]:
        start, count = int(start), int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if start < 0 or start + count > self.num_tokens:
            raise IndexError(
                f"token range [{start}, {start + count}) is outside [0, {self.num_tokens}) of {self.path}"
            )
        return start, count

    def _chunk_span(self, start: int, end: int) -> tuple[int, int]:
        """Chunk indices [i0, i1) overlapping tokens [start, end) (end > start)."""
        i0 = int(np.searchsorted(self._first, start, side="right")) - 1
        i1 = int(np.searchsorted(self._first, end, side="left"))
        return i0, i1

    def check_chunk(self, chunk_index: int, stored: np.ndarray) -> None:
        """Check the stored bytes of one chunk (as on disk) against its size and checksum.

        A no-op for the checksum where the format records none (``has_checksums``).

        Raises:
            FormatError: ``stored`` has another size than the chunk table says.
            ChecksumError: the checksum does not match (names the file, chunk and offset).
        """
        self._check_stored(int(chunk_index), stored)

    def _check_stored(self, ci: int, stored: np.ndarray) -> None:
        c = self.chunks[ci]
        if stored.nbytes != int(c["stored_bytes"]):
            raise FormatError(
                f"{self._where(ci)}: got {stored.nbytes} stored bytes, expected {int(c['stored_bytes'])}",
                path=self.paths[int(c["file"])], chunk=int(self._local[ci]), offset=int(c["offset"]),
            )
        if self.has_checksums:
            got = F.checksum(stored)
            if got != int(c["checksum"]):
                raise ChecksumError(
                    f"{self._where(ci)}: checksum mismatch over {stored.nbytes} stored bytes "
                    f"(recorded {int(c['checksum']):#018x}, computed {got:#018x}): the chunk is corrupt",
                    path=self.paths[int(c["file"])], chunk=int(self._local[ci]), offset=int(c["offset"]),
                )

    def _decode(self, ci: int, stored: np.ndarray, out: np.ndarray) -> None:
        c = self.chunks[ci]
        codec = int(c["codec"])
        try:
            model = self.model_of(ci) if codec in F.MODEL_CODECS else None
            F.decode_into(stored, codec, out, self._where(ci), model)
        except FormatError as exc:
            if exc.chunk is None or codec not in F.MODEL_CODECS:
                exc.path, exc.chunk, exc.offset = self.paths[int(c["file"])], int(self._local[ci]), int(c["offset"])
            raise

    def model_of(self, chunk_index: int) -> Any:
        """The ``RansModel`` (``Rans1Model``) a rans (rans1) chunk was coded with (read, checked
        and cached on first use).

        Raises:
            ValueError: the chunk is not a rans or rans1 chunk.
            ChecksumError, FormatError: the model region is damaged (names file and offset;
                the chunk is named too).
            OSError: reading it failed.
        """
        c = self.chunks[int(chunk_index)]
        if int(c["codec"]) not in F.MODEL_CODECS:
            raise ValueError(f"{self._where(int(chunk_index))} is not a rans or rans1 chunk")
        key = (int(c["file"]), int(c["model"]))
        model = self._models.get(key)
        if model is not None:
            return model
        f, off = key
        path = self.paths[f]
        try:
            head = self.reader.read(f, off, F.MODEL_HEADER_BYTES)
            n = F.model_region_size(head, path, off)
            model = F.parse_model_region(self.reader.read(f, off, n), path, off)
        except FormatError as exc:
            exc.args = (f"{exc} (model of {self._where(int(chunk_index))})",)
            exc.chunk = int(self._local[int(chunk_index)])
            raise
        with self._lock:
            self._models[key] = model
        return model

    # -- reads -----------------------------------------------------------------------------
    def read(self, start: int, count: int, *, verify: bool = True) -> np.ndarray:
        """Tokens ``[start, start + count)`` of the stream as a new array of ``dtype``.

        Reads whole chunks through the Reader and checks each chunk's checksum before
        decoding it (``verify=False`` skips the check and, for raw chunks, reads only the
        bytes needed). Batches of up to 64 MiB of stored bytes are read at once and
        decoded on a thread pool when large.

        Raises:
            IndexError: the range is not inside ``[0, num_tokens]``.
            ValueError: ``count < 0``.
            ChecksumError: a chunk's stored bytes do not match their checksum.
            FormatError: a chunk does not decode to its recorded size, or has an unknown codec.
            ShortReadError, OSError: the file shrank since it was opened, or the read failed.
        """
        start, count = self._check_range(start, count)
        out = self._alloc_out(start, count, verify)
        if count:
            self._read_into(start, out, verify)
            self.check_token_ids(out, start)
        return out

    def read_into(self, start: int, out: np.ndarray, *, verify: bool = True) -> np.ndarray:
        """Fill ``out`` (C-contiguous, writable, of ``dtype``) with tokens from ``start``.

        Raises:
            TypeError: ``out`` has another dtype, is not contiguous or is read-only.
            As :meth:`read` otherwise.
        """
        if not isinstance(out, np.ndarray) or out.dtype != self.dtype or out.ndim != 1:
            raise TypeError(f"out must be a 1-D numpy array of {self.dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise TypeError("out must be C-contiguous and writable")
        start, count = self._check_range(start, len(out))
        if count:
            self._read_into(start, out, verify)
            self.check_token_ids(out, start)
        return out

    def check_token_ids(self, tokens: np.ndarray, start: int) -> None:
        """Refuse negative token ids (signed Megatron files: int8/int16/int32/int64).

        The one rule on every path (``read`` and every ``TokenLoader`` path): a token id
        is never negative, so a negative stored value is corrupt data, not a large id.
        ``tokens`` holds the dataset's tokens from global index ``start``.

        Raises:
            FormatError: a negative value; names the file, byte offset and token index.
        """
        if self.dtype.kind != "i" or not len(tokens):
            return
        t = np.asarray(tokens).view(self.dtype) if tokens.dtype.kind == "u" else np.asarray(tokens)
        neg = np.flatnonzero(t < 0)
        if len(neg):
            i = int(start) + int(neg[0])
            f, off, _ = self.locate(i, 1)[0] if self.codec == "none" else (0, -1, 0)
            raise FormatError(
                f"{self.paths[f]} @ offset {off}: token {i} is {int(t[neg[0]])}, a negative token id "
                f"({len(neg)} negative value(s) in tokens [{start}, {start + len(t)})): the {self.dtype.name} "
                "file is corrupt or was not written with token ids", path=self.paths[f], offset=off)

    def _alloc_out(self, start: int, count: int, verify: bool) -> np.ndarray:
        """Output array for ``read``: large ones are page-aligned, shifted so that raw
        chunks can land in them with straight O_DIRECT reads (no bounce buffer)."""
        tb = self.token_bytes
        if count == 0 or count * tb < DIRECT_OUT_BYTES:
            return np.empty(count, dtype=self.dtype)
        check = verify and self.has_checksums
        pad = 0
        i0, i1 = self._chunk_span(start, start + count)
        for ci in range(i0, min(i1, i0 + 2)):
            c = self.chunks[ci]
            ft, tc = int(c["first_token"]), int(c["token_count"])
            lo, hi = max(start, ft), min(start + count, ft + tc)
            if int(c["codec"]) == F.CODEC_NONE and (not check or (lo == ft and hi == ft + tc)):
                pad = (int(c["offset"]) + (lo - ft) * tb - (lo - start) * tb) % F.ALIGN
                break
        base = empty_aligned(pad + count * tb, self.dtype)
        return base[pad // tb : pad // tb + count]

    def _read_into(self, start: int, out: np.ndarray, verify: bool) -> None:
        """Plan the reads of tokens ``[start, start + len(out))`` chunk by chunk.

        A raw piece whose destination in ``out`` is congruent to its file offset modulo
        4096 is read straight into ``out`` (:class:`DirectRaw`); every other piece
        (:class:`StagedChunk`: compressed chunks, raw chunks to checksum but only partly
        wanted; :class:`StagedRaw`: incongruent destinations) is read into a page-aligned
        staging buffer at a congruent offset, then checked and decoded or copied. Groups of
        at most ``GROUP_BYTES`` staged bytes are read as one batch.
        """
        check = verify and self.has_checksums
        group: list[ReadStep] = []
        staged = 0
        # a remote dataset pins a group's chunks in its cache: groups must fit in it
        remote = getattr(self, "remote", None)
        limit = GROUP_BYTES if remote is None else min(GROUP_BYTES, remote.read_group_bytes)
        for step in self._plan_read(start, out, check):
            group.append(step)
            staged += step.staged_bytes if remote is None else int(remote.unit_size[step.chunk])
            if staged >= limit or len(group) >= GROUP_STEPS:
                self._run_group(group)
                group, staged = [], 0
        if group:
            self._run_group(group)

    def _plan_read(self, start: int, out: np.ndarray, check: bool) -> Iterator[ReadStep]:
        """The steps that fill ``out`` with tokens from ``start``, in stream order."""
        end = start + len(out)
        tb = self.token_bytes
        i0, i1 = self._chunk_span(start, end)
        for ci in range(i0, i1):
            c = self.chunks[ci]
            f, off = int(c["file"]), int(c["offset"])
            ft, tc, codec = int(c["first_token"]), int(c["token_count"]), int(c["codec"])
            lo, hi = max(start, ft), min(end, ft + tc)
            dst = out[lo - start : hi - start]
            full = lo == ft and hi == ft + tc
            if codec == F.CODEC_NONE and (full or not check):
                # raw: either the whole chunk (checked) or unchecked bytes, so only the wanted ones
                foff = off + (lo - ft) * tb
                if (dst.ctypes.data - foff) % F.ALIGN == 0:
                    yield DirectRaw(ci, f, foff, dst, check)
                else:
                    yield StagedRaw(ci, f, foff, dst, check)
            else:
                yield StagedChunk(ci, f, off, int(c["stored_bytes"]), dst, lo - ft, hi - ft)

    def _run_group(self, group: list[ReadStep]) -> None:
        """Read a group of steps in one batch, then finish each (in parallel when large).

        A remote dataset (``self.remote``, :mod:`llmio_native.remote`) first makes the
        group's chunks present in its local cache and pins them while they are read."""
        remote = getattr(self, "remote", None)
        if remote is not None:
            with remote.pinned(remote.units_of_chunks([step.chunk for step in group])):
                return self._run_group_local(group)
        return self._run_group_local(group)

    def _run_group_local(self, group: list[ReadStep]) -> None:
        places, runs, total = plan_staging_runs(
            [(step.file, step.offset, step.nbytes) if not isinstance(step, DirectRaw) else None for step in group],
            self._file_sizes)
        staging = empty_aligned(total) if total else None
        reads: list[tuple[int, int, np.ndarray]] = []
        posts: list[tuple[ReadStep, np.ndarray | None]] = []
        for f, a0, a1, at in runs:
            assert staging is not None
            reads.append((f, a0, staging[at : at + a1 - a0]))
        for step, place in zip(group, places):
            if isinstance(step, DirectRaw):
                reads.append((step.file, step.offset, step.dst.view(np.uint8)))
                if step.check:
                    posts.append((step, None))
                continue
            assert staging is not None
            posts.append((step, staging[place : place + step.nbytes]))
        try:
            self.reader.read_batch_into(reads)
        except OSError:
            # a run holds several chunks: read each piece alone, so that an error names the
            # chunk's own offset and length (and a transient one costs no more than this)
            for step, place in zip(group, places):
                view = step.dst.view(np.uint8) if isinstance(step, DirectRaw) else staging[place:place + step.nbytes]
                try:
                    self.reader.read_into(step.file, step.offset, view)
                except OSError as exc:
                    raise name_chunk_in_error(exc, f"{view.nbytes} bytes of {self._where(step.chunk)}") from None
        if not posts:
            return
        work = sum(step.dst.nbytes for step, _ in posts)
        if len(posts) > 1 and work >= PARALLEL_DECODE_BYTES:
            for _ in decode_pool().map(lambda p: p[0].finish(self, p[1]), posts):
                pass
        else:
            for step, src in posts:
                step.finish(self, src)

    def locate(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Where tokens ``[start, start + count)`` lie in ``paths``, for uncompressed sources.

        Returns ``(file_index, byte_offset, nbytes)`` pieces in stream order; adjacent
        pieces of one file are merged (chunks whose size is a multiple of 4096 bytes lie
        back to back). Reading the pieces and concatenating them gives ``read(start, count)``
        without checksum verification.

        Raises:
            ValueError: the dataset is compressed (``codec != "none"``), or ``count < 0``.
            IndexError: the range is not inside ``[0, num_tokens]``.
        """
        if self.codec != "none":
            raise ValueError(
                f"locate() needs an uncompressed source; {self.path} uses codec {self.codec!r} "
                "(read whole chunks and decode_chunk() them instead)"
            )
        start, count = self._check_range(start, count)
        if count == 0:
            return []
        end = start + count
        tb = self.token_bytes
        pieces: list[tuple[int, int, int]] = []
        i0, i1 = self._chunk_span(start, end)
        for ci in range(i0, i1):
            c = self.chunks[ci]
            ft, tc = int(c["first_token"]), int(c["token_count"])
            lo, hi = max(start, ft), min(end, ft + tc)
            f, off, n = int(c["file"]), int(c["offset"]) + (lo - ft) * tb, (hi - lo) * tb
            if pieces and pieces[-1][0] == f and pieces[-1][1] + pieces[-1][2] == off:
                pieces[-1] = (f, pieces[-1][1], pieces[-1][2] + n)
            else:
                pieces.append((f, off, n))
        return pieces

    def decode_chunk(self, chunk_index: int, stored: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Check and decode the stored bytes of chunk ``chunk_index`` (a row of ``chunks``).

        ``stored`` is exactly ``chunks[chunk_index]["stored_bytes"]`` bytes (bytes,
        bytearray, memoryview, a numpy uint8 array or a ring slot view). Its length and
        checksum are checked, then it is decoded into ``out`` (a C-contiguous writable
        array of ``token_count`` tokens of ``dtype``) or a new array. The result never
        shares memory with ``stored``.

        Raises:
            IndexError: no such chunk.
            TypeError: ``out`` has the wrong dtype, shape or layout.
            ChecksumError: checksum mismatch (message names file, chunk and offset).
            FormatError: wrong length, unknown codec id, or bytes that do not decode to
                ``token_count`` tokens.
        """
        ci = int(chunk_index)
        if not 0 <= ci < len(self.chunks):
            raise IndexError(f"chunk {ci} out of range [0, {len(self.chunks)}) of {self.path}")
        tc = int(self.chunks[ci]["token_count"])
        if isinstance(stored, np.ndarray):
            arr = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
        else:
            arr = np.frombuffer(memoryview(stored).cast("B"), dtype=np.uint8)
        if out is None:
            out = np.empty(tc, dtype=self.dtype)
        elif (not isinstance(out, np.ndarray) or out.dtype != self.dtype or out.shape != (tc,)
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise TypeError(f"out must be a writable C-contiguous array of {tc} {self.dtype} tokens")
        self._check_stored(ci, arr)
        self._decode(ci, arr, out)
        return out

    # -- documents ---------------------------------------------------------------------------
    def _need_docs(self) -> np.ndarray:
        if self.document_ends is None:
            raise ValueError(
                f"{self.path}: the {self.format} format records no document boundaries "
                "(split on the end-of-text token instead)"
            )
        return self.document_ends

    def document_range(self, i: int) -> tuple[int, int]:
        """``(start, end)`` token indices of document ``i`` (negative ``i`` counts from the end).

        Raises:
            ValueError: the format records no document boundaries.
            IndexError: no such document.
        """
        ends = self._need_docs()
        n = len(ends)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.path}")
        start = int(ends[j - 1]) if j > 0 else 0
        return start, int(ends[j])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (negative ``i`` counts from the end).

        Raises:
            ValueError: the format records no document boundaries.
            IndexError: no such document.
            As :meth:`read` for the data.
        """
        s, e = self.document_range(i)
        return self.read(s, e - s)

    def documents(self, start: int = 0, stop: int | None = None,
                  batch_tokens: int = 1 << 22) -> Iterator[np.ndarray]:
        """Yield documents ``start .. stop-1`` in order, reading about ``batch_tokens`` at a time.

        Yielded arrays are views into a shared batch buffer (copy one to keep it alone).

        Raises:
            ValueError: the format records no document boundaries.
            As :meth:`read` for the data.
        """
        ends = self._need_docs()
        n = len(ends)
        stop = n if stop is None else min(int(stop), n)
        i = max(int(start), 0)
        while i < stop:
            s0 = int(ends[i - 1]) if i > 0 else 0
            limit = s0 + max(int(batch_tokens), 1)
            j = int(np.searchsorted(ends, limit, side="right"))
            j = min(max(j, i + 1), stop)
            e0 = int(ends[j - 1])
            batch = self.read(s0, e0 - s0)
            prev = s0
            for k in range(i, j):
                e = int(ends[k])
                yield batch[prev - s0 : e - s0]
                prev = e
            i = j

    # -- verification ------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> "VerifyReport":
        """Read back every chunk, re-check every checksum and every size, report problems.

        See :func:`llmio_native.dataset.verify.verify` (this method calls it).

        Args:
            progress: show a tqdm progress bar over the bytes.

        Raises:
            OSError: only if no data file can be read at all (e.g. the directory is gone).
        """
        from .verify import verify

        return verify(self, progress=progress)
