"""``DatasetWriter``: stream documents into a directory of token shards (format v2 for encoded
codecs, v1 for ``none``; docs/format.md)."""
from __future__ import annotations

import array
import collections
import concurrent.futures as cf
import json
import os
import shutil
import sys
import warnings
from typing import Any, BinaryIO

import numpy as np

from .._native import _core
from ..remote.store import is_url
from ..remote.upload import ShardUploader
from . import format as F
from .index import IndexWriter
from .manifest import (TOKENIZER_NAME, Manifest, ShardEntry, dataset_files, fsync_dir, is_shard_name,
                       write_manifest)

#: Default tokens per chunk: 128 KiB of uint16, a multiple of 4096 bytes so raw chunks
#: lie back to back with no padding.
DEFAULT_CHUNK_TOKENS = 65536
#: Default shard size target: 2^30 tokens (2 GiB of uint16, 4 GiB of uint32).
DEFAULT_SHARD_TOKENS = 1 << 30
#: Bytes of chunks (raw + encoded) allowed in flight on the compression pool.
IN_FLIGHT_BYTES = 16 << 20
#: Document ends kept in memory per shard before they spill to a side file.
DOC_SPILL_ENTRIES = 1 << 20
_ZEROS = bytes(F.ALIGN)


def _to_numpy(tokens: Any, doc: int) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it here
    if torch is not None and isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        if isinstance(tokens, (str, bytes, bytearray)):
            raise ValueError(f"document {doc}: tokens must be integers, got {type(tokens).__name__}")
        arr = np.asarray(tokens)
        if arr.size == 0 and arr.ndim == 1:
            arr = arr.astype(np.int64)
    return arr


class DatasetWriter:
    """Writes documents of tokens into ``out_dir`` as an llmio token dataset (docs/format.md).

    Streaming: memory stays bounded however large the corpus: one chunk being filled, up to
    ``IN_FLIGHT_BYTES`` (16 MiB) of chunks queued on the compression pool (at least two),
    the current shard's chunk table (48 B per chunk) and at most 2^20 document ends (8 MiB;
    more spill to a side file). With ``chunk_tokens=65536`` that is about 24 MiB peak on top
    of the caller's own document arrays, whatever the number of tokens written (the test
    suite checks 50M tokens under 64 MiB). Chunks are encoded on ``num_threads`` threads
    (zstd releases the GIL) and written strictly in order. Layout (docs/format.md): with an
    encoded codec (zstd, rans, rans1) the shards are format v2: chunks and model regions back
    to back, each at a multiple of 8 bytes (readers read the 4096-aligned superset with
    O_DIRECT); with ``none`` they are format v1: each chunk at a 4096-aligned offset (raw
    chunks of ``2048·k`` uint16 tokens lie back to back either way).

    Shards: a shard is closed before a document that would take it past ``shard_tokens``,
    so no shard exceeds ``shard_tokens`` unless a single document does (that document gets
    a shard of its own). Documents never span shards; they span chunks freely.

    Commit: ``close()`` writes ``manifest.json`` last, atomically (temp file, fsync,
    rename, fsync of the directory), after every shard was fsynced. Until then the
    directory reads as an incomplete dataset. Leaving a ``with`` block by an exception,
    :meth:`abort`, or dropping an unclosed writer writes no manifest.

    Object stores: with ``out_dir="s3://bucket/prefix"`` (or ``gs://``, ``az://``) shards
    are written to a local staging directory (``path``) and each is uploaded as soon as
    it is finished, on a background thread, while the next one is packed (multipart above
    16 MiB; at most 2 shards staged: the writer waits when the upload falls behind; each
    local copy is deleted once uploaded). ``close()`` waits for them, uploads
    ``tokenizer.json``, checks that the store holds every shard at its size (and ETag),
    then uploads ``manifest.json`` last: ``open_dataset(url)`` never sees a half-written
    dataset. :meth:`abort` (and an exception or Ctrl-C in a ``with`` block) cancels the
    upload in flight, removes the staging directory and uploads no manifest; shards
    already uploaded stay (the prefix reads as incomplete). See
    :mod:`llmio_native.remote.upload`.

    Args:
        out_dir: directory to write (created with its parents if missing), or an
            ``s3://``, ``gs://`` or ``az://`` URL (not ``http(s)://``: read-only).
        dtype: ``"uint16"`` or ``"uint32"``.
        codec: ``"none"``, ``"zstd"``, ``"rans"`` (the order-0 token entropy codec decoded on
            the GPU, docs/format.md) or ``"rans1"`` (its context-modelled successor: each token
            coded given the previous one; smaller on real text, also decoded on the GPU). A
            chunk that would not get smaller is stored raw.
        chunk_tokens: tokens per chunk (every chunk of a shard but its last holds exactly
            this many); a multiple of 2048 keeps raw uint16 chunks free of padding.
        shard_tokens: target tokens per shard (default 2^30).
        eot_token: the end-of-text token id, recorded in the manifest only (callers
            append it to documents themselves); ``ds.eot_token`` reads it back.
        zstd_level: zstd compression level (1..22, negative for fast modes).
        rans_model_tokens: rans, rans1: tokens per model group. The writer holds a group's chunks
            until it has this many (or the shard ends), builds their frequency model, writes
            it once into the shard and encodes the chunks with it. Memory: one group of
            tokens (default 2^24: 32 MiB of uint16, 64 MiB of uint32) on top of the above;
            rans1's model build needs 8 bytes per token of the group more while it runs.
        num_threads: compression threads (default ``os.cpu_count()``).
        overwrite: replace an existing dataset or clean an incomplete one in ``out_dir``
            (only our files are removed: shards, manifest, temp files).
        tokenizer: a tokenizer file to copy into the dataset as ``tokenizer.json``
            (recorded in the manifest), or ``"tokenizer.json"`` when it is already there.
        metadata: JSON-serialisable dict stored in the manifest (``ds.metadata``).
        storage_options: a URL ``out_dir``'s store options (endpoint, credentials,
            ``timeout``, ``retries``: see :class:`llmio_native.remote.ObjectSource`;
            default: the store's environment variables).
        staging_dir: a URL ``out_dir``: where the local staging directory is made (a
            fresh one inside; default ``$LLMIO_CACHE_DIR``, else the system temp directory).
        _format_version: private: the shard layout to write (``1`` or ``2``; default 2 for
            zstd, rans and rans1, 1 for none). Tests use it to write v1 files.

    Attributes:
        path: the directory the shards are written to (for a URL: the staging directory,
            removed by ``close()``/``abort()``). url: the URL, or None for a local directory.

    Raises:
        ValueError: bad dtype, codec name, sizes, eot_token, metadata or ``_format_version``;
            an ``http(s)://`` ``out_dir``; ``storage_options``/``staging_dir`` with a local
            ``out_dir``.
        FileExistsError: ``out_dir`` holds a dataset (manifest.json) or an incomplete one
            (shard files or objects, no manifest) and ``overwrite`` is false; or is a file.
            With ``overwrite`` a URL's old manifest is deleted first, then its shards.
        FileNotFoundError: ``tokenizer`` does not exist.
        ImportError: a URL ``out_dir`` without obstore installed.
        RemoteError: (an OSError) listing or cleaning the URL's prefix failed; from
            ``add_document``/``close``: an upload failed after the retries (names the
            URL of the shard); no manifest is uploaded then.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        dtype: str = "uint16",
        codec: str = "none",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        eot_token: int | None = None,
        zstd_level: int = 3,
        rans_model_tokens: int = F.RANS_MODEL_TOKENS,
        num_threads: int | None = None,
        overwrite: bool = False,
        tokenizer: str | os.PathLike[str] | None = None,
        metadata: dict | None = None,
        storage_options: dict | None = None,
        staging_dir: str | os.PathLike[str] | None = None,
        _format_version: int | None = None,
    ) -> None:
        self._closed = True  # until fully constructed (so __del__ does nothing)
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
        if name not in F.DTYPES:
            raise ValueError(f"dtype must be 'uint16' or 'uint32', got {dtype!r}")
        if codec not in F.CODEC_IDS:
            raise ValueError(f"codec must be 'none', 'zstd', 'rans' or 'rans1', got {codec!r}")
        rans_model_tokens = int(rans_model_tokens)
        if rans_model_tokens < 1:
            raise ValueError(f"rans_model_tokens must be >= 1, got {rans_model_tokens}")
        chunk_tokens, shard_tokens = int(chunk_tokens), int(shard_tokens)
        tb = F.DTYPES[name].itemsize
        if not 1 <= chunk_tokens or chunk_tokens * tb > (1 << 30):
            raise ValueError(f"chunk_tokens must be in [1, {(1 << 30) // tb}], got {chunk_tokens}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        maxval = int(np.iinfo(F.DTYPES[name]).max)
        if eot_token is not None:
            if isinstance(eot_token, bool) or not isinstance(eot_token, (int, np.integer)) \
                    or not 0 <= int(eot_token) <= maxval:
                raise ValueError(f"eot_token must be an integer in [0, {maxval}] for {name}, got {eot_token!r}")
            eot_token = int(eot_token)
        if not isinstance(zstd_level, (int, np.integer)) or not -(1 << 17) <= int(zstd_level) <= 22:
            raise ValueError(f"zstd_level must be an integer <= 22, got {zstd_level!r}")
        threads = (os.cpu_count() or 1) if num_threads is None else int(num_threads)
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ValueError("metadata must be a dict")
            try:
                json.dumps(metadata)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata is not JSON-serialisable: {exc}") from None
        if _format_version is None:
            _format_version = 1 if codec == "none" else F.VERSION
        if _format_version not in F.KNOWN_VERSIONS:
            raise ValueError(f"_format_version must be one of {list(F.KNOWN_VERSIONS)}, got {_format_version!r}")
        tok_src = None
        if tokenizer is not None:
            tok_src = os.fspath(tokenizer)

        out = os.fspath(out_dir)
        self.url: str | None = None
        self._uploader: Any = None
        if is_url(out):
            self._uploader = ShardUploader(out, storage_options,
                                           None if staging_dir is None else os.fspath(staging_dir))
            self.url = self._uploader.url
            self.path = self._uploader.staging
        else:
            if storage_options is not None or staging_dir is not None:
                raise ValueError(f"storage_options and staging_dir are for URL outputs (s3://, gs://, az://), "
                                 f"not the directory {out!r}")
            self.path = os.path.abspath(out)
        self.dtype = np.dtype(name)
        self.codec = codec
        self.chunk_tokens = chunk_tokens
        self.shard_tokens = shard_tokens
        self.eot_token = eot_token
        self.zstd_level = int(zstd_level)
        self.rans_model_tokens = rans_model_tokens
        self.num_threads = threads
        self.metadata = dict(metadata) if metadata else {}
        self._maxval = maxval
        self._codec_id = F.CODEC_IDS[codec]
        #: shard format version written (private knob ``_format_version``: tests write v1 files)
        self.format_version = int(_format_version)
        self._align = F.chunk_align(self.format_version)

        try:
            # checked before _prepare_dir, whose overwrite deletes (for a URL, remotely)
            if tok_src is not None and not os.path.isfile(tok_src):
                raise FileNotFoundError(2, "tokenizer file not found", tok_src)
            self._prepare_dir(bool(overwrite))
        except BaseException:
            if self._uploader is not None:
                self._uploader.abort()
            raise
        self._tokenizer_src = tok_src

        cbytes = chunk_tokens * tb
        self._max_in_flight = max(2, min(2 * threads, IN_FLIGHT_BYTES // max(1, 2 * cbytes)))
        self._pool: cf.ThreadPoolExecutor | None = None
        self._inflight: collections.deque = collections.deque()
        self._group: list[np.ndarray] = []  # rans: chunks waiting for their group's model
        self._group_tokens = 0
        self._model_offset = 0
        self._buf = np.empty(chunk_tokens, dtype=F.DTYPES[name])
        self._fill = 0
        self._shards: list[ShardEntry] = []
        self._shard_fh: BinaryIO | None = None
        self._index: IndexWriter | None = None  # index.lio, a record per finished shard
        self._error: BaseException | None = None
        self.num_tokens = 0
        self.num_documents = 0
        self.stored_bytes = 0
        self.model_bytes = 0
        self._closed = False
        self._aborted = False

    # -- directory -----------------------------------------------------------------------------
    def _prepare_dir(self, overwrite: bool) -> None:
        if self._uploader is not None:  # a fresh staging directory; the checks are on the prefix
            self._uploader.prepare(overwrite)
            return
        d = self.path
        if os.path.exists(d) and not os.path.isdir(d):
            raise FileExistsError(17, "output path exists and is not a directory", d)
        os.makedirs(d, exist_ok=True)
        mine = dataset_files(d)  # manifest.json first: see the deletion below
        if not mine:
            return
        manifest = os.path.join(d, F.MANIFEST_NAME)
        if not overwrite:
            if os.path.exists(manifest):
                raise FileExistsError(
                    17, "a dataset already exists here (manifest.json); pass overwrite=True to replace it",
                    manifest)
            raise FileExistsError(
                17, f"an incomplete dataset is here ({sum(map(is_shard_name, mine))} shard file(s), no manifest.json: "
                "an interrupted writer); pass overwrite=True to clean it and start over", d)
        # the manifest goes first, so that a crash part-way leaves an incomplete dataset
        for n in mine:
            os.unlink(os.path.join(d, n))
        fsync_dir(d)

    # -- documents ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"DatasetWriter for {self.url or self.path} is closed")
        if self._error is not None:
            raise RuntimeError(f"DatasetWriter for {self.url or self.path} failed earlier: "
                               f"{self._error!r}") from self._error

    def add_document(self, tokens: Any) -> None:
        """Append one document (a 1-D integer array-like: numpy array, list, torch tensor).

        Its boundary is kept: ``ds.document(i)`` returns exactly these tokens. Empty
        documents are allowed. A rejected document leaves the writer unchanged.

        Raises:
            ValueError: a rejected document: 2-D (or 0-D) input, a non-integer array
                (float, bool, object, strings), or a token that does not fit ``dtype``
                (negative or above its maximum); the message names the document number
                (0-based) and, for a bad token, its position and value. Also raised when
                the writer is closed.
            RuntimeError: a previous write failed.
            OSError: writing the shard failed (the writer is then unusable).
        """
        self._check_open()
        doc = self.num_documents
        arr = _to_numpy(tokens, doc)
        if arr.ndim != 1:
            raise ValueError(f"document {doc}: tokens must be a 1-D array, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"document {doc}: tokens must be integers, got dtype {arr.dtype}")
        if arr.size and not (arr.dtype.kind == "u" and arr.dtype.itemsize <= self.dtype.itemsize):
            lo, hi = arr.min(), arr.max()
            if lo < 0 or hi > self._maxval:
                pos = int(np.flatnonzero((arr < 0) | (arr > self._maxval))[0])
                raise ValueError(
                    f"document {doc}: token {int(arr[pos])} at position {pos} does not fit "
                    f"{self.dtype.name} (0..{self._maxval})")
        n = int(arr.size)
        try:
            if self._shard_fh is not None and self._shard_ntok > 0 and self._shard_ntok + n > self.shard_tokens:
                self._finish_shard()
            if self._shard_fh is None:
                self._open_shard()
            pos = 0
            while pos < n:
                take = min(n - pos, self.chunk_tokens - self._fill)
                self._buf[self._fill : self._fill + take] = arr[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == self.chunk_tokens:
                    self._submit_chunk()
            self._shard_ntok += n
            self._doc_ends.append(self._shard_ntok)
            self._shard_ndoc += 1
            if len(self._doc_ends) >= DOC_SPILL_ENTRIES:
                self._spill_docs()
        except BaseException as exc:
            self._error = exc
            raise
        self.num_tokens += n
        self.num_documents += 1

    def add_documents(self, docs: Any) -> None:
        """``add_document`` for each item of an iterable.

        Raises:
            As :meth:`add_document`.
        """
        for d in docs:
            self.add_document(d)

    # -- shards and chunks -----------------------------------------------------------------------
    def _open_shard(self) -> None:
        idx = len(self._shards)
        self._shard_name = F.shard_name(idx)
        self._shard_path = os.path.join(self.path, self._shard_name)
        self._shard_fh = open(self._shard_path, "wb", buffering=1 << 20)
        self._shard_fh.write(bytes(F.HEADER_BYTES))  # the real header is written at the end
        self._pos = F.HEADER_BYTES
        self._shard_ntok = 0
        self._shard_ndoc = 0
        self._shard_chunks = np.zeros(64, dtype=F.CHUNK_ENTRY)
        self._shard_nchunks = 0
        self._shard_first = 0
        self._doc_ends = array.array("Q")
        self._spill_path = self._shard_path + F.DOCS_SPILL_SUFFIX
        self._spill_count = 0

    def _spill_docs(self) -> None:
        with open(self._spill_path, "ab") as fh:
            fh.write(self._doc_ends.tobytes())
        self._spill_count += len(self._doc_ends)
        self._doc_ends = array.array("Q")

    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="llmio-write")
        return self._pool

    def _submit_chunk(self) -> None:
        chunk = self._buf[: self._fill]
        self._buf = np.empty(self.chunk_tokens, dtype=self._buf.dtype)
        self._fill = 0
        if self._codec_id in F.MODEL_CODECS:
            self._group.append(chunk)
            self._group_tokens += len(chunk)
            if self._group_tokens >= self.rans_model_tokens:
                self._flush_group()
            return
        self._encode(chunk, None)

    def _encode(self, chunk: np.ndarray, model: Any) -> None:
        fut = self._executor().submit(F.encode_chunk, chunk, self._codec_id, self.zstd_level, model)
        self._inflight.append((fut, len(chunk)))
        while len(self._inflight) >= self._max_in_flight:
            self._write_oldest()

    def _flush_group(self) -> None:
        """rans, rans1: build the model of the buffered chunks, write its region, then encode them."""
        if not self._group:
            return
        if self._codec_id == F.CODEC_RANS1:
            model = _core.Rans1Model.build(self._group, self.dtype.itemsize, F.RANS1_SCALE_BITS, F.RANS1_CTX_BITS)
        else:
            model = _core.RansModel.build(self._group, self.dtype.itemsize, F.RANS_SCALE_BITS)
        self._drain()  # the region goes after every chunk of the previous group
        region = F.pack_model_region(model)
        fh = self._shard_fh
        assert fh is not None
        self._model_offset = self._pos
        fh.write(region)
        pad = (-len(region)) % self._align
        fh.write(_ZEROS[:pad])
        self._pos += len(region) + pad
        self.model_bytes += len(region)
        group, self._group, self._group_tokens = self._group, [], 0
        for chunk in group:
            self._encode(chunk, model)

    def _write_oldest(self) -> None:
        fut, count = self._inflight.popleft()
        stored, codec, csum = fut.result()
        fh = self._shard_fh
        assert fh is not None
        offset = self._pos
        nbytes = memoryview(stored).nbytes
        fh.write(stored)
        pad = (-nbytes) % self._align
        if pad:
            fh.write(_ZEROS[:pad])
        self._pos += nbytes + pad
        if self._shard_nchunks == len(self._shard_chunks):
            grown = np.zeros(2 * len(self._shard_chunks), dtype=F.CHUNK_ENTRY)
            grown[: self._shard_nchunks] = self._shard_chunks
            self._shard_chunks = grown
        model_offset = self._model_offset if codec in F.MODEL_CODECS else 0
        self._shard_chunks[self._shard_nchunks] = (offset, nbytes, self._shard_first, count, codec, 0, csum,
                                                   model_offset)
        self._shard_nchunks += 1
        self._shard_first += count
        self.stored_bytes += nbytes

    def _drain(self) -> None:
        while self._inflight:
            self._write_oldest()

    def _finish_shard(self) -> None:
        if self._fill:
            self._submit_chunk()
        self._flush_group()  # groups never span shards
        self._drain()
        fh = self._shard_fh
        assert fh is not None
        table = self._shard_chunks[: self._shard_nchunks]
        table_offset = self._pos
        doc_index_offset = table_offset + table.nbytes
        import xxhash

        h = xxhash.xxh3_64()
        ndoc = self._spill_count + len(self._doc_ends)
        assert ndoc == self._shard_ndoc
        size = doc_index_offset + ndoc * 8
        if self._index is None:
            self._index = IndexWriter(self.path)
        self._index.begin(self._shard_name, size, size - table_offset)

        def put(piece: bytes) -> None:  # the tables go to the shard, its checksum and the index
            fh.write(piece)
            h.update(piece)
            self._index.tables(piece)

        put(table.tobytes())
        if self._spill_count:
            with open(self._spill_path, "rb") as sp:
                while True:
                    piece = sp.read(8 << 20)
                    if not piece:
                        break
                    put(piece)
        put(self._doc_ends.tobytes())
        header = F.pack_header(
            token_bytes=self.dtype.itemsize, codec=self._codec_id, num_chunks=len(table),
            num_tokens=self._shard_ntok, num_documents=ndoc, chunk_tokens=self.chunk_tokens,
            table_offset=table_offset, doc_index_offset=doc_index_offset, tables_checksum=h.intdigest(),
            version=self.format_version,
        )
        fh.seek(0)
        fh.write(header)
        fh.flush()
        self._index.end(header)
        if self._uploader is None:  # a staged shard needs no durability: it is read back for the upload
            os.fsync(fh.fileno())
        fh.close()
        self._shard_fh = None
        if self._spill_count:
            os.unlink(self._spill_path)
        self._shards.append(ShardEntry(
            name=self._shard_name, bytes=size, num_tokens=self._shard_ntok, num_chunks=len(table),
            num_documents=ndoc, header_checksum=int.from_bytes(header[80:88], "little"),
        ))
        if self._uploader is not None:
            self._uploader.submit(self._shard_name, self._shard_path)  # waits while 2 shards are staged

    # -- commit ------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the last shard and commit the dataset by writing ``manifest.json``.

        Idempotent. On failure the writer aborts (no manifest) and the error propagates.

        Raises:
            RuntimeError: an earlier write failed (the dataset cannot be committed).
            OSError: writing, fsync or rename failed.
        """
        if self._closed:
            if self._aborted:
                raise ValueError(f"DatasetWriter for {self.url or self.path} was aborted; nothing to close")
            return
        if self._error is not None:
            self.abort()
            raise RuntimeError(f"DatasetWriter for {self.url or self.path} failed earlier: "
                               f"{self._error!r}") from self._error
        try:
            if self._shard_fh is not None:
                self._finish_shard()
            tok_name = None
            if self._tokenizer_src is not None:
                tok_name = TOKENIZER_NAME
                dst = os.path.join(self.path, tok_name)
                if os.path.abspath(self._tokenizer_src) != dst:
                    shutil.copyfile(self._tokenizer_src, dst)
                with open(dst, "rb") as fh:
                    os.fsync(fh.fileno())
            from .. import __version__

            if self._index is None:  # no shard: an empty index
                self._index = IndexWriter(self.path)
            index = self._index.commit()
            manifest = Manifest(
                dtype=self.dtype.name,
                codec=self.codec,
                chunk_tokens=self.chunk_tokens,
                shard_tokens=self.shard_tokens,
                zstd_level=self.zstd_level if self.codec == "zstd" else None,
                rans_model_tokens=self.rans_model_tokens if self.codec in ("rans", "rans1") else None,
                num_tokens=self.num_tokens,
                num_documents=self.num_documents,
                shards=list(self._shards),
                tokenizer=tok_name,
                eot_token=self.eot_token,
                metadata=self.metadata,
                created_by=f"llmio_native {__version__}",
                version=self.format_version,
                index=index,
            )
            write_manifest(self.path, manifest)
            if self._uploader is not None:
                self._uploader.commit(tok_name)  # shards, tokenizer, index, checks, then manifest.json
        except BaseException:
            self.abort()
            raise
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def abort(self) -> None:
        """Stop without committing: no manifest is written, open files are closed, queued
        chunks are dropped. The shards written so far stay (the directory reads as an
        incomplete dataset; ``overwrite=True`` cleans it). For a URL output: the upload
        in flight is cancelled and the staging directory removed; the shards uploaded
        so far stay under the prefix. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._aborted = True
        for fut, _ in self._inflight:
            fut.cancel()
        self._inflight.clear()
        self._group = []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._shard_fh is not None:
            try:
                self._shard_fh.close()
            except OSError:
                pass
            self._shard_fh = None
            try:
                os.unlink(self._spill_path)
            except OSError:
                pass
        if self._index is not None:
            self._index.close()
        if self._uploader is not None:
            self._uploader.abort()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                warnings.warn(f"DatasetWriter for {self.url or self.path} was never closed; no manifest written "
                              "(the dataset is incomplete)", ResourceWarning, stacklevel=2)
            except Exception:  # interpreter shutdown
                pass
            self.abort()

    @property
    def num_shards(self) -> int:
        """Shards finished so far (plus the one being written, if any)."""
        return len(self._shards) + (self._shard_fh is not None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"DatasetWriter({self.url or self.path!r}, dtype={self.dtype.name}, codec={self.codec}, "
                f"{self.num_tokens} tokens, {self.num_documents} documents, {state})")
