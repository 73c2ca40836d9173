"""Reading token datasets: :class:`TokenDataset` and :func:`open_dataset`.

Every source (our shard directories and the compatibility formats of ``compat.py``) is
described the same way: a list of files (``paths``) and a table of chunks in stream order
(``chunks``), each chunk a byte range of one file holding ``token_count`` tokens stored with
``codec``. Reads, ``locate``, ``decode_chunk`` and ``verify`` are written once against that
description; the formats differ only in how they build it.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import xxhash

from ..errors import ChecksumError, FormatError, IncompleteDatasetError
from ..memory import empty_aligned
from ..reader import Reader
from . import format as F

#: Stored bytes gathered per batch of reads (bounds the temporary memory of read/verify).
GROUP_BYTES = 64 << 20
#: Decoded bytes above which a batch decodes on the thread pool instead of inline.
PARALLEL_DECODE_BYTES = 1 << 20
#: ``read`` results at least this large are page-aligned (O_DIRECT lands in them directly).
DIRECT_OUT_BYTES = 256 << 10

_pool_lock = threading.Lock()
_pool: tuple[int, cf.ThreadPoolExecutor] | None = None


def _decode_pool() -> cf.ThreadPoolExecutor:
    """One decode pool per process (recreated after fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4,
                                                         thread_name_prefix="llmio-decode"))
        return _pool[1]


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


def _as_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be a numpy dtype or its name, got {dtype!r}") from exc


class TokenDataset:
    """A token stream stored in one or more files, read through :class:`Reader`.

    Built by :func:`open_dataset`; not constructed directly. Attributes:

    * ``path`` (str): what was opened; ``format``: ``"llmio"``, ``"nanogpt"``, ``"llmc"``
      or ``"megatron"``.
    * ``paths`` (list[str]): the data files; ``chunks["file"]`` indexes into it.
    * ``num_tokens``, ``num_documents`` (int); ``dtype`` (numpy dtype of the tokens);
      ``codec`` (``"none"`` | ``"zstd"``: the dataset's codec; a zstd dataset may hold
      chunks stored raw where compression did not help, see ``chunks["codec"]``).
    * ``document_ends`` (numpy uint64, global index one past each document's last token,
      or ``None`` where the format records no boundaries).
    * ``eot_token`` (int | None), ``tokenizer_path`` (str | None), ``metadata`` (dict).
    * ``chunks``: numpy structured array, one row per chunk in stream order, fields
      ``file`` (int32), ``offset``, ``stored_bytes``, ``first_token`` (global),
      ``token_count`` (uint64), ``codec`` (uint16), ``checksum`` (uint64). Compat formats
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
            model = self.model_of(ci) if codec == F.CODEC_RANS else None
            F.decode_into(stored, codec, out, self._where(ci), model)
        except FormatError as exc:
            if exc.chunk is None or codec != F.CODEC_RANS:
                exc.path, exc.chunk, exc.offset = self.paths[int(c["file"])], int(self._local[ci]), int(c["offset"])
            raise

    def model_of(self, chunk_index: int) -> Any:
        """The ``RansModel`` a rans chunk was coded with (read, checked and cached on first use).

        Raises:
            ValueError: the chunk is not a rans chunk.
            ChecksumError, FormatError: the model region is damaged (names file and offset;
                the chunk is named too).
            OSError: reading it failed.
        """
        c = self.chunks[int(chunk_index)]
        if int(c["codec"]) != F.CODEC_RANS:
            raise ValueError(f"{self._where(int(chunk_index))} is not a rans chunk")
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
        4096 is read straight into ``out``; every other piece (compressed chunks, raw
        chunks to checksum but only partly wanted, incongruent destinations) is read into
        a page-aligned staging buffer at a congruent offset, then checked and decoded or
        copied. Groups of at most ``GROUP_BYTES`` staged bytes are read as one batch.
        """
        end = start + len(out)
        tb = self.token_bytes
        check = verify and self.has_checksums
        i0, i1 = self._chunk_span(start, end)
        group: list[tuple] = []
        staged = 0
        for ci in range(i0, i1):
            c = self.chunks[ci]
            f, off = int(c["file"]), int(c["offset"])
            ft, tc, codec = int(c["first_token"]), int(c["token_count"]), int(c["codec"])
            lo, hi = max(start, ft), min(end, ft + tc)
            dst = out[lo - start : hi - start]
            full = lo == ft and hi == ft + tc
            if codec == F.CODEC_NONE and (full or not check):
                foff = off + (lo - ft) * tb
                if (dst.ctypes.data - foff) % F.ALIGN == 0:
                    group.append(("direct", ci, f, foff, dst.nbytes, dst))
                else:
                    group.append(("copy" if check else "copy_unchecked", ci, f, foff, dst.nbytes, dst))
                    staged += dst.nbytes + F.ALIGN
            else:
                n = int(c["stored_bytes"])
                group.append(("chunk", ci, f, off, n, (dst, lo - ft, hi - ft)))
                staged += n + F.ALIGN
            if staged >= GROUP_BYTES or len(group) >= 4096:
                self._run_group(group, check)
                group, staged = [], 0
        if group:
            self._run_group(group, check)

    def _run_group(self, group: list[tuple], check: bool) -> None:
        pos = 0
        places = []
        for kind, _, _, foff, n, _ in group:
            if kind == "direct":
                places.append(-1)
                continue
            pos = F.align_up(pos) + foff % F.ALIGN
            places.append(pos)
            pos += n
        staging = empty_aligned(F.align_up(pos)) if pos else None
        reads = []
        posts = []
        for (kind, ci, f, foff, n, arg), place in zip(group, places):
            if kind == "direct":
                reads.append((f, foff, arg.view(np.uint8)))
                if check:
                    posts.append((ci, None, arg, 0, 0))
                continue
            src = staging[place : place + n]
            reads.append((f, foff, src))
            if kind == "copy":  # a whole raw chunk: checksum it on the way
                posts.append((ci, src, arg, -1, -1))
            elif kind == "copy_unchecked":
                posts.append((ci, src, arg, -2, -2))
            else:
                dst, lo, hi = arg
                posts.append((ci, src, dst, lo, hi))
        self.reader.read_batch_into(reads)
        if not posts:
            return
        work = sum(p[2].nbytes for p in posts)
        if len(posts) > 1 and work >= PARALLEL_DECODE_BYTES:
            for _ in _decode_pool().map(self._post, posts):
                pass
        else:
            for p in posts:
                self._post(p)

    def _post(self, p: tuple) -> None:
        ci, src, dst, lo, hi = p
        if src is None:  # a whole raw chunk read straight into the output: check it there
            self._check_stored(ci, dst.view(np.uint8))
            return
        if lo < 0:  # raw bytes staged for an incongruent destination
            if lo == -1:
                self._check_stored(ci, src)
            dst.view(np.uint8)[:] = src
            return
        self._check_stored(ci, src)
        tc = int(self.chunks[ci]["token_count"])
        if lo == 0 and hi == tc:
            self._decode(ci, src, dst)
        elif int(self.chunks[ci]["codec"]) == F.CODEC_NONE:
            dst[:] = src.view(self.dtype)[lo:hi]
        else:
            tmp = np.empty(tc, dtype=self.dtype)
            self._decode(ci, src, tmp)
            dst[:] = tmp[lo:hi]

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
    def verify(self, progress: bool = False) -> VerifyReport:
        """Read back every chunk, re-check every checksum and every size, report problems.

        For each chunk: the stored bytes are read (with the zero padding after them in
        our format), the checksum compared, the chunk decoded to its recorded size and
        the padding checked for zeros. A file whose size changed since open, a read error
        or a short read is reported too. Bad chunks never raise.

        Args:
            progress: show a tqdm progress bar over the bytes.

        Raises:
            OSError: only if no data file can be read at all (e.g. the directory is gone).
        """
        t0 = time.perf_counter()
        report = VerifyReport(ok=True, checksums=self.has_checksums)
        bad = report.bad_chunks
        readable = []
        for f, p in enumerate(self.paths):
            try:
                size = os.stat(p).st_size
            except OSError as exc:
                bad.append(BadChunk(p, -1, 0, f"cannot stat: {exc}"))
                continue
            if size != self._file_sizes[f]:
                bad.append(BadChunk(p, -1, min(size, self._file_sizes[f]),
                                    f"file size is {size} bytes, expected {self._file_sizes[f]}"))
            readable.append(f)
        if self.paths and not readable:
            raise FileNotFoundError(f"{self.path}: none of its {len(self.paths)} data files can be read")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=int((self._region_ends - self.chunks["offset"]).sum()), unit="B",
                       unit_scale=True, desc=f"verify {os.path.basename(self.path)}")
        try:
            reader: Any = self.reader
            fmap = {f: f for f in range(len(self.paths))}
        except OSError:
            reader = Reader([self.paths[f] for f in readable], **self._reader_options)
            fmap = {f: k for k, f in enumerate(readable)}
        group: list[int] = []
        gbytes = 0
        skip = {f for f in range(len(self.paths)) if f not in fmap}
        for ci in range(len(self.chunks)):
            if int(self.chunks[ci]["file"]) in skip:
                continue
            group.append(ci)
            gbytes += int(self._region_ends[ci] - self.chunks[ci]["offset"])
            if gbytes >= GROUP_BYTES:
                self._verify_group(reader, fmap, group, report, bar)
                group, gbytes = [], 0
        if group:
            self._verify_group(reader, fmap, group, report, bar)
        if bar is not None:
            bar.close()
        self._verify_model_padding(reader, fmap, bad)
        bad.sort(key=lambda b: (self.paths.index(b.path) if b.path in self.paths else -1, b.chunk))
        report.ok = not bad
        report.seconds = time.perf_counter() - t0
        return report

    def _verify_model_padding(self, reader: Any, fmap: dict, bad: list) -> None:
        """rans: the zero padding after each model region (its contents are checked when
        the chunks that use it decode); a problem is reported with chunk -1."""
        rans = self.chunks["codec"] == F.CODEC_RANS
        if not rans.any():
            return
        for f, off in sorted(set(zip(self.chunks["file"][rans].tolist(), self.chunks["model"][rans].tolist()))):
            if f not in fmap:
                continue
            path = self.paths[f]
            try:
                head = reader.read(fmap[f], off, F.MODEL_HEADER_BYTES)
                end = off + F.model_region_size(head, path, off)
                pad = reader.read(fmap[f], end, F.align_up(end) - end)
            except (OSError, FormatError) as exc:
                bad.append(BadChunk(path, -1, off, f"rans model region: {exc}"))
                continue
            if pad.any():
                k = int(np.flatnonzero(pad)[0])
                bad.append(BadChunk(path, -1, end + k, f"nonzero padding byte @ offset {end + k} after the rans "
                                                       f"model region @ offset {off} (the file is damaged)"))

    def _verify_group(self, reader: Any, fmap: dict, group: list[int], report: VerifyReport, bar: Any) -> None:
        reqs = []
        for ci in group:
            c = self.chunks[ci]
            reqs.append((fmap[int(c["file"])], int(c["offset"]), int(self._region_ends[ci] - c["offset"])))
        try:
            bufs: list[Any] = reader.read_batch(reqs)
        except OSError:
            bufs = []
            for (f, off, n), ci in zip(reqs, group):
                try:
                    bufs.append(reader.read(f, off, n))
                except OSError as exc:
                    bufs.append(exc)
        results = list(_decode_pool().map(self._verify_one, group, bufs))
        for ci, buf, reason in zip(group, bufs, results):
            report.chunks_checked += 1
            if not isinstance(buf, BaseException):
                report.bytes_checked += int(buf.nbytes)
            if reason is not None:
                c = self.chunks[ci]
                report.bad_chunks.append(
                    BadChunk(self.paths[int(c["file"])], int(self._local[ci]), int(c["offset"]), reason))
        if bar is not None:
            bar.update(sum(r[2] for r in reqs))

    def _verify_one(self, ci: int, buf: Any) -> str | None:
        if isinstance(buf, BaseException):
            return f"read failed: {buf}"
        c = self.chunks[ci]
        n = int(c["stored_bytes"])
        stored = buf[:n]
        try:
            self._check_stored(ci, stored)
            out = np.empty(int(c["token_count"]), dtype=self.dtype)
            self._decode(ci, stored, out)
        except (FormatError, NotImplementedError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        pad = buf[n:]
        if pad.any():
            k = int(np.flatnonzero(pad)[0])
            return (f"nonzero padding byte @ offset {int(c['offset']) + n + k} after the chunk "
                    "(the tokens are intact; the file is damaged)")
        return None


# ---------------------------------------------------------------------------------------------
# our format


def _req(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(f"{where}: missing field {key!r}", path=where)
    v = obj[key]
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        raise FormatError(f"{where}: field {key!r} has the wrong type ({type(v).__name__}: {v!r})", path=where)
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        raise FormatError(f"{where}: field {key!r} is negative ({v})", path=where)
    return v


def _read_file(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(nbytes)


def _incomplete_or_missing(d: str) -> None:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such dataset directory", d) from None
    shards = [n for n in names if n.startswith(F.SHARD_PREFIX) and n.endswith(F.SHARD_SUFFIX)]
    if shards or F.MANIFEST_TMP_NAME in names:
        raise IncompleteDatasetError(
            f"{d}: incomplete dataset (no manifest.json; the writer did not finish): "
            f"{len(shards)} shard file(s) but no manifest. Rewrite it (DatasetWriter(..., overwrite=True))",
            path=d,
        )
    raise IncompleteDatasetError(
        f"{d}: not a dataset, or an incomplete one (no manifest.json; the writer did not finish "
        "or never started)", path=d,
    )


class LioDataset(TokenDataset):
    """A dataset directory in the llmio token format v1 (docs/format.md).

    Adds ``chunk_tokens`` (int) and ``manifest`` (the parsed manifest.json) to the
    attributes of :class:`TokenDataset`.
    """

    format = "llmio"

    @classmethod
    def open(cls, directory: str, dtype: np.dtype | None, reader_options: dict) -> "LioDataset":
        d = os.path.abspath(directory)
        mpath = os.path.join(d, F.MANIFEST_NAME)
        if not os.path.exists(mpath):
            _incomplete_or_missing(d)
        try:
            with open(mpath, "rb") as fh:
                manifest = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{mpath}: not valid JSON ({exc})", path=mpath) from None
        if not isinstance(manifest, dict):
            raise FormatError(f"{mpath}: expected a JSON object", path=mpath)
        fmt = manifest.get("format")
        if fmt != F.FORMAT_NAME:
            raise FormatError(f"{mpath}: format is {fmt!r}, expected {F.FORMAT_NAME!r}", path=mpath)
        version = _req(manifest, "version", int, mpath)
        if version not in F.KNOWN_VERSIONS:
            raise FormatError(
                f"{mpath}: dataset format version {version} is not supported by this build "
                f"(it reads versions {list(F.KNOWN_VERSIONS)}); upgrade llmio_native", path=mpath)
        dname = _req(manifest, "dtype", str, mpath)
        if dname not in F.DTYPES:
            raise FormatError(f"{mpath}: dtype {dname!r} is not one of {sorted(F.DTYPES)}", path=mpath)
        ds_dtype = np.dtype(dname)
        if dtype is not None and dtype != ds_dtype:
            raise FormatError(
                f"{d}: the dataset holds {dname} tokens (manifest.json) but dtype={dtype.name!r} was requested",
                path=mpath)
        codec = _req(manifest, "codec", str, mpath)
        if codec not in F.CODEC_IDS:
            raise FormatError(f"{mpath}: unknown codec {codec!r} (known: {sorted(F.CODEC_IDS)})", path=mpath)
        chunk_tokens = _req(manifest, "chunk_tokens", int, mpath)
        total_tokens = _req(manifest, "num_tokens", int, mpath)
        total_docs = _req(manifest, "num_documents", int, mpath)
        shards = _req(manifest, "shards", list, mpath)
        eot = manifest.get("eot_token")
        if eot is not None and (isinstance(eot, bool) or not isinstance(eot, int)
                                or not 0 <= eot <= np.iinfo(ds_dtype).max):
            raise FormatError(f"{mpath}: eot_token {eot!r} is not a {dname} token", path=mpath)
        tok = manifest.get("tokenizer")
        tokenizer_path = None
        if tok is not None:
            if not isinstance(tok, str) or os.path.basename(tok) != tok or tok in ("", ".", ".."):
                raise FormatError(f"{mpath}: tokenizer must be a file name in the directory, got {tok!r}",
                                  path=mpath)
            tokenizer_path = os.path.join(d, tok)
        meta = manifest.get("metadata") or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{mpath}: metadata must be an object", path=mpath)

        tb = ds_dtype.itemsize
        paths: list[str] = []
        sizes: list[int] = []
        tables = []
        doc_parts = []
        region_parts = []
        local_parts = []
        seen: set[str] = set()
        first = 0
        for si, entry in enumerate(shards):
            where = f"{mpath} shards[{si}]"
            name = _req(entry, "name", str, where)
            if os.path.basename(name) != name or name in ("", ".", "..") or name in seen:
                raise FormatError(f"{where}: bad or repeated shard name {name!r}", path=mpath)
            seen.add(name)
            path = os.path.join(d, name)
            m = {k: _req(entry, k, int, where) for k in
                 ("bytes", "num_tokens", "num_chunks", "num_documents", "header_checksum")}
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise FileNotFoundError(2, f"shard {si} listed in {mpath} is missing", path) from None
            if size != m["bytes"]:
                raise FormatError(
                    f"{path}: file is {size} bytes, manifest.json says {m['bytes']} "
                    f"({'truncated' if size < m['bytes'] else 'extra bytes'})", path=path, offset=min(size, m["bytes"]))
            hdr = F.unpack_header(_read_file(path, 0, F.HEADER_BYTES), path)
            checks = [
                ("header_checksum", hdr["header_checksum"], m["header_checksum"]),
                ("token_bytes", hdr["token_bytes"], tb),
                ("codec", hdr["codec"], F.CODEC_IDS[codec]),
                ("num_chunks", hdr["num_chunks"], m["num_chunks"]),
                ("num_tokens", hdr["num_tokens"], m["num_tokens"]),
                ("num_documents", hdr["num_documents"], m["num_documents"]),
                ("chunk_tokens", hdr["chunk_tokens"], chunk_tokens),
            ]
            for fname, got, want in checks:
                if got != want:
                    raise FormatError(f"{path}: header {fname} is {got}, manifest.json says {want}",
                                      path=path, offset=0)
            nch, ntok, ndoc = hdr["num_chunks"], hdr["num_tokens"], hdr["num_documents"]
            t_off, d_off = hdr["table_offset"], hdr["doc_index_offset"]
            if (t_off < F.HEADER_BYTES or t_off % F.ALIGN or d_off != t_off + nch * F.CHUNK_ENTRY.itemsize
                    or size != d_off + ndoc * F.DOC_END.itemsize):
                raise FormatError(
                    f"{path}: table_offset {t_off} / doc_index_offset {d_off} do not fit {nch} chunks, "
                    f"{ndoc} documents and a file of {size} bytes", path=path, offset=56)
            raw = _read_file(path, t_off, size - t_off)
            if len(raw) != size - t_off:
                raise FormatError(f"{path}: truncated while reading tables @ offset {t_off}", path=path, offset=t_off)
            got = F.checksum(raw)
            if got != hdr["tables_checksum"]:
                raise FormatError(
                    f"{path}: chunk table / document index checksum mismatch @ offset {t_off} "
                    f"(recorded {hdr['tables_checksum']:#018x}, computed {got:#018x})", path=path, offset=t_off)
            table = np.frombuffer(raw, dtype=F.CHUNK_ENTRY, count=nch)
            docs = np.frombuffer(raw, dtype=F.DOC_END, count=ndoc, offset=nch * F.CHUNK_ENTRY.itemsize)
            cls._check_table(path, table, docs, hdr, tb, t_off)
            tables.append((len(paths), table, first))
            doc_parts.append(docs.astype(np.uint64) + np.uint64(first))
            nxt = np.empty(nch, dtype=np.uint64)
            if nch:
                nxt[:-1] = table["offset"][1:]
                nxt[-1] = t_off
                # a model region written between two chunks ends the first one's region
                mo = table["model_offset"][1:]
                between = (mo > table["offset"][:-1]) & (table["codec"][1:] == F.CODEC_RANS)
                nxt[:-1] = np.where(between, mo, nxt[:-1])
            region_parts.append(nxt)
            local_parts.append(np.arange(nch, dtype=np.int64))
            paths.append(path)
            sizes.append(size)
            first += ntok
        if first != total_tokens or sum(len(x) for x in doc_parts) != total_docs:
            raise FormatError(
                f"{mpath}: num_tokens {total_tokens} / num_documents {total_docs} disagree with the "
                f"shards ({first} tokens, {sum(len(x) for x in doc_parts)} documents)", path=mpath)
        nchunks = sum(len(t[1]) for t in tables)
        chunks = np.empty(nchunks, dtype=F.CHUNKS_DTYPE)
        k = 0
        for fi, table, base in tables:
            n = len(table)
            sl = chunks[k : k + n]
            sl["file"] = fi
            for name in ("offset", "stored_bytes", "codec", "checksum", "token_count"):
                sl[name] = table[name]
            sl["model"] = table["model_offset"]
            sl["first_token"] = table["first_token"] + np.uint64(base)
            k += n
        ends = np.concatenate(doc_parts) if doc_parts else np.zeros(0, dtype=np.uint64)
        regions = np.concatenate(region_parts) if region_parts else np.zeros(0, dtype=np.uint64)
        local = np.concatenate(local_parts) if local_parts else np.zeros(0, dtype=np.int64)
        ds = cls(path=d, paths=paths, dtype=ds_dtype, codec=codec, chunks=chunks, document_ends=ends,
                 file_sizes=sizes, region_ends=regions, local_index=local, has_checksums=True,
                 eot_token=eot, tokenizer_path=tokenizer_path, metadata=meta, reader_options=reader_options)
        ds.chunk_tokens = chunk_tokens
        ds.manifest = manifest
        return ds

    @staticmethod
    def _check_table(path: str, table: np.ndarray, docs: np.ndarray, hdr: dict, tb: int, t_off: int) -> None:
        nch, ntok, ct = hdr["num_chunks"], hdr["num_tokens"], hdr["chunk_tokens"]

        def bad(mask: np.ndarray, what: str) -> None:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                raise FormatError(f"{path}: chunk {i} @ offset {int(table['offset'][i])}: {what}",
                                  path=path, chunk=i, offset=int(table["offset"][i]))

        if nch:
            off = table["offset"].astype(np.int64)
            stored = table["stored_bytes"].astype(np.int64)
            count = table["token_count"].astype(np.int64)
            bad(off % F.ALIGN != 0, "offset is not 4096-aligned")
            bad(off < F.HEADER_BYTES, "offset inside the header")
            bad(off + stored > t_off, f"stored bytes run past the chunk table @ {t_off}")
            bad(np.r_[False, off[1:] < off[:-1] + stored[:-1]], "overlaps the previous chunk")
            bad(count == 0, "holds no tokens")
            bad(count > ct, f"holds more than chunk_tokens={ct} tokens")
            bad(np.r_[count[:-1] != ct, False], f"is not the last chunk but holds fewer than {ct} tokens")
            cum = np.r_[0, np.cumsum(count)[:-1]]
            bad(table["first_token"].astype(np.int64) != cum, "first_token is not the sum of earlier token counts")
            bad((table["codec"] == F.CODEC_NONE) & (stored != count * tb), "raw chunk size != token_count x token_bytes")
            bad(table["flags"] != 0, "nonzero flags (written by a newer version?)")
            mo = table["model_offset"].astype(np.int64)
            rans = table["codec"] == F.CODEC_RANS
            bad(~rans & (mo != 0), "nonzero model_offset on a chunk that is not rans (written by a newer version?)")
            bad(rans & ((mo % F.ALIGN != 0) | (mo < F.HEADER_BYTES) | (mo + F.MODEL_HEADER_BYTES > off)),
                "rans chunk whose model_offset is not a 4096-aligned offset before the chunk")
            total = int(count.sum())
        else:
            total = 0
        if total != ntok:
            raise FormatError(f"{path}: chunks hold {total} tokens, header says {ntok}", path=path)
        if len(docs):
            e = docs.astype(np.uint64)
            if (e[1:] < e[:-1]).any():
                i = int(np.flatnonzero(e[1:] < e[:-1])[0]) + 1
                raise FormatError(f"{path}: document index not ascending at document {i}", path=path)
            if int(e[-1]) != ntok:
                raise FormatError(f"{path}: last document ends at {int(e[-1])}, shard holds {ntok} tokens",
                                  path=path)
        elif ntok:
            raise FormatError(f"{path}: {ntok} tokens but no documents", path=path)


# ---------------------------------------------------------------------------------------------


FORMATS = ("llmio", "nanogpt", "llmc", "megatron")


def open_dataset(
    path: str | os.PathLike[str],
    dtype: Any = None,
    *,
    format: str | None = None,
    backend: str = "auto",
    direct: bool = True,
) -> TokenDataset:
    """Open a token dataset: our directory, a nanoGPT raw ``.bin``, an llm.c ``.bin`` or a
    Megatron ``.bin``/``.idx`` pair.

    Detection (``format=None``): a directory (or its ``manifest.json``) is ours; a path
    ``X`` with ``X.idx`` and ``X.bin`` beside it, or ``X.bin`` / ``X.idx`` of such a pair,
    is Megatron; a file starting with an llm.c magic (20240520 or 20240801 as int32) is
    llm.c; any other file is a nanoGPT raw token array and needs ``dtype``. Everything
    but the data path (headers, tables, manifest) is parsed at open and checked for
    consistency, so a damaged dataset fails here rather than mid-training.

    Args:
        path: directory, file or Megatron prefix.
        dtype: expected token dtype; required for nanoGPT raw files (``uint16`` or
            ``uint32``), checked against the file for the other formats.
        format: force ``"llmio"``, ``"nanogpt"``, ``"llmc"`` or ``"megatron"``.
        backend, direct: options of the :class:`Reader` used for the data.

    Raises:
        FileNotFoundError: the path, or a shard the manifest lists, does not exist.
        IncompleteDatasetError: (a FormatError) a directory without ``manifest.json``.
        FormatError: wrong magic, unknown version, a size, count or checksum that does not
            match, a dtype other than ``dtype``; the message names the file and offset.
        ValueError: bad arguments (unknown format, missing dtype for a raw file).
    """
    from . import compat

    p = os.fspath(path)
    want = _as_dtype(dtype)
    opts = {"backend": backend, "direct": direct}
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format is None:
        format = compat.detect_format(p, want)
    if format == "llmio":
        if os.path.isfile(p) and os.path.basename(p) == F.MANIFEST_NAME:
            p = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(p):
            if not os.path.exists(p):
                raise FileNotFoundError(2, "no such dataset directory", p)
            raise FormatError(f"{p}: an llmio dataset is a directory with manifest.json", path=p)
        return LioDataset.open(p, want, opts)
    if format == "nanogpt":
        return compat.open_nanogpt(p, want, opts)
    if format == "llmc":
        return compat.open_llmc(p, want, opts)
    return compat.open_megatron(p, want, opts)
