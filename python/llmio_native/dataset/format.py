"""On-disk layout of the llmio token dataset, format versions 1 and 2 (see docs/format.md).

Shard file, version 1 (all integers little-endian)::

     0      4096                                               table_offset  doc_index_offset   EOF
     +------+------------------+--------+------------------+-----+-------------+----------------+
     |header| chunk 0 (stored) | zeros  | chunk 1 (stored) | ... | chunk table | document index |
     |4 KiB |                  | to 4Ki |                  |     | 48 B/chunk  | 8 B/document   |
     +------+------------------+--------+------------------+-----+-------------+----------------+
            ^ 4096-aligned              ^ 4096-aligned           ^ 4096-aligned

Version 2 (the default): chunks and model regions packed back to back, each at a multiple of
``PACK_ALIGN`` (8) bytes, zeros only to reach it; readers read the 4096-aligned superset of a
chunk with O_DIRECT and find the chunk inside::

     0      4096                                       table_offset  doc_index_offset   EOF
     +------+---------+-+---------+-+---------+-----+-+-------------+----------------+
     |header| model 0 |z| chunk 0 |z| chunk 1 | ... |z| chunk table | document index |
     +------+---------+-+---------+-+---------+-----+-+-------------+----------------+
            ^ 4096    ^ 8-aligned ^ 8-aligned         ^ 8-aligned     (z: < 8 zero bytes)

Header, bytes [0, 88); bytes [88, 4096) are zero::

     0        8      12           16          20     24          32         40            48
     +--------+------+------------+-----------+------+-----------+----------+-------------+
     | magic  | ver  |header_bytes|token_bytes| codec| num_chunks|num_tokens|num_documents|
     +--------+------+------------+-----------+------+-----------+----------+-------------+
     48             56             64                 72                80               88
     +--------------+--------------+------------------+-----------------+----------------+
     | chunk_tokens | table_offset | doc_index_offset | tables_checksum | header_checksum|
     +--------------+--------------+------------------+-----------------+----------------+

Chunk table entry (48 bytes)::

     0        8              16            24           28     30     32         40             48
     +--------+--------------+-------------+------------+------+------+----------+--------------+
     | offset | stored_bytes | first_token | token_count| codec| flags| checksum | model_offset |
     +--------+--------------+-------------+------------+------+------+----------+--------------+

``model_offset`` is 0 except for ``rans`` and ``rans1`` chunks, where it is the offset (v1:
4096-aligned, v2: 8-aligned) of the model region the chunk was coded with. A model region lies before the first chunk
that uses it (the writer builds one model per group of chunks)::

     0           8             16            24          32
     +-----------+-------------+-------------+-----------+--------------------------+
     | "LIORANSM"| stored_bytes| checksum    | raw_bytes | zstd(model), stored_bytes|
     +-----------+-------------+-------------+-----------+--------------------------+

The checksum (XXH3-64) covers the zstd frame; the model inside is parsed and checked by
``RansModel.parse`` (csrc/codec/rans.hpp, docs/format.md). A ``rans1`` model region is the
same with the magic ``"LIORAN1M"`` and a ``Rans1Model`` inside (csrc/codec/rans1.hpp).
"""
from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np
import xxhash
import zstandard

from .._native import _core
from ..errors import FormatError

MAGIC = b"LIOTOKS\0"
#: Version the writer writes by default for the encoded codecs: 2 (chunks and model regions
#: packed back to back, each at a multiple of :data:`PACK_ALIGN`). Version 1 (what it writes
#: for ``none``) pads each to :data:`ALIGN`.
VERSION = 2
KNOWN_VERSIONS = (1, 2)
HEADER_BYTES = 4096
#: O_DIRECT block: v1 chunks and model regions start at multiples of it; the header and the
#: chunk table offset of v1 are multiples of it; readers read the aligned superset of a v2 chunk.
ALIGN = 4096
#: v2: every chunk, model region and the chunk table start at a multiple of 8 bytes (a rans
#: payload's address must be a multiple of RANS_PAYLOAD_ALIGN for the GPU decoder to read it in
#: place; 8 also keeps the chunk table's u64 fields aligned).
PACK_ALIGN = 8
assert PACK_ALIGN % _core.RANS_PAYLOAD_ALIGN == 0


def chunk_align(version: int) -> int:
    """Alignment of chunk, model region and chunk table offsets in a shard of ``version``."""
    return ALIGN if version == 1 else PACK_ALIGN
FORMAT_NAME = "llmio-tokens"
MANIFEST_NAME = "manifest.json"
MANIFEST_TMP_NAME = ".manifest.json.tmp"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".lio"
DOCS_SPILL_SUFFIX = ".docs.tmp"

# magic, version, header_bytes, token_bytes, codec, num_chunks, num_tokens, num_documents,
# chunk_tokens, table_offset, doc_index_offset, tables_checksum  (bytes [0, 80))
_HEADER_BODY = struct.Struct("<8sIIIIQQQQQQQ")
_HEADER_CHECKSUM = struct.Struct("<Q")
HEADER_USED = _HEADER_BODY.size + _HEADER_CHECKSUM.size  # 88
assert _HEADER_BODY.size == 80

CHUNK_ENTRY = np.dtype(
    [
        ("offset", "<u8"),
        ("stored_bytes", "<u8"),
        ("first_token", "<u8"),
        ("token_count", "<u4"),
        ("codec", "<u2"),
        ("flags", "<u2"),
        ("checksum", "<u8"),
        ("model_offset", "<u8"),
    ]
)
assert CHUNK_ENTRY.itemsize == 48
DOC_END = np.dtype("<u8")

#: Row type of ``TokenDataset.chunks``: one row per chunk of the whole dataset.
CHUNKS_DTYPE = np.dtype(
    [
        ("file", "<i4"),
        ("offset", "<u8"),
        ("stored_bytes", "<u8"),
        ("first_token", "<u8"),
        ("token_count", "<u8"),
        ("codec", "<u2"),
        ("checksum", "<u8"),
        ("model", "<u8"),  # rans: file offset of the chunk's model region; else 0
    ]
)

CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_RANS = 2
CODEC_RANS1 = 3
CODEC_IDS = {"none": CODEC_NONE, "zstd": CODEC_ZSTD, "rans": CODEC_RANS, "rans1": CODEC_RANS1}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
#: Codecs this build can write and read.
IMPLEMENTED_CODECS = (CODEC_NONE, CODEC_ZSTD, CODEC_RANS, CODEC_RANS1)
#: Codecs whose chunks name a model region (``model_offset``) and decode on the GPU.
MODEL_CODECS = (CODEC_RANS, CODEC_RANS1)

MODEL_MAGIC = b"LIORANSM"
MODEL1_MAGIC = b"LIORAN1M"  # a model region holding a rans1 model
_MODEL_MAGICS = {MODEL_MAGIC: CODEC_RANS, MODEL1_MAGIC: CODEC_RANS1}
_MODEL_HEADER = struct.Struct("<8sQQQ")  # magic, stored_bytes, checksum, raw_bytes
MODEL_HEADER_BYTES = _MODEL_HEADER.size  # 32
MODEL_MAX_BYTES = 1 << 30
#: rans defaults: bucket frequencies quantised to 2^14, one model per 2^24 tokens.
RANS_SCALE_BITS: int = _core.RANS_SCALE_BITS_DEFAULT
RANS_MODEL_TOKENS = 1 << 24
#: rans1 defaults (csrc/codec/rans1.hpp): order-0 model at 2^12, context tables of at most 2^11.
RANS1_SCALE_BITS: int = _core.RANS1_SCALE_BITS_DEFAULT
RANS1_CTX_BITS: int = _core.RANS1_CTX_BITS_DEFAULT

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
TOKEN_BYTES_TO_DTYPE = {2: "uint16", 4: "uint32"}


def checksum(data: Any) -> int:
    """XXH3-64 (seed 0) of a bytes-like object or contiguous array."""
    return xxhash.xxh3_64_intdigest(data)


def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def align_down(n: int, a: int = ALIGN) -> int:
    """``n`` rounded down to a multiple of ``a``."""
    return n // a * a


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.lio`` (more digits past 99999)."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def pack_header(
    *,
    token_bytes: int,
    codec: int,
    num_chunks: int,
    num_tokens: int,
    num_documents: int,
    chunk_tokens: int,
    table_offset: int,
    doc_index_offset: int,
    tables_checksum: int,
    version: int = VERSION,
) -> bytes:
    """The 4096-byte shard header (format ``version``) with its checksum filled in."""
    if version not in KNOWN_VERSIONS:
        raise ValueError(f"format version must be one of {list(KNOWN_VERSIONS)}, got {version!r}")
    body = _HEADER_BODY.pack(
        MAGIC, version, HEADER_BYTES, token_bytes, codec, num_chunks, num_tokens, num_documents,
        chunk_tokens, table_offset, doc_index_offset, tables_checksum,
    )
    head = body + _HEADER_CHECKSUM.pack(checksum(body))
    return head + bytes(HEADER_BYTES - len(head))


def unpack_header(buf: bytes, path: str) -> dict[str, int]:
    """Parse and check a shard header (magic, version, checksum, zero padding).

    Raises:
        FormatError: short file, wrong magic, unknown version, bad header checksum, nonzero
            reserved bytes; the message names ``path``.
    """
    if len(buf) < HEADER_BYTES:
        raise FormatError(
            f"{path}: truncated shard header ({len(buf)} of {HEADER_BYTES} bytes)", path=path, offset=0
        )
    if buf[:8] != MAGIC:
        raise FormatError(
            f"{path}: not an llmio token shard (magic {bytes(buf[:8])!r} @ offset 0, expected {MAGIC!r})",
            path=path, offset=0,
        )
    fields = _HEADER_BODY.unpack_from(buf, 0)
    version = fields[1]
    if version not in KNOWN_VERSIONS:
        raise FormatError(
            f"{path}: shard format version {version} is not supported by this build "
            f"(it reads versions {list(KNOWN_VERSIONS)}); upgrade llmio_native",
            path=path, offset=8,
        )
    (stored_sum,) = _HEADER_CHECKSUM.unpack_from(buf, _HEADER_BODY.size)
    actual = checksum(bytes(buf[: _HEADER_BODY.size]))
    if stored_sum != actual:
        raise FormatError(
            f"{path}: header checksum mismatch @ offset 0 (recorded {stored_sum:#018x}, "
            f"computed {actual:#018x}): the header is corrupt",
            path=path, offset=0,
        )
    pad = np.frombuffer(buf, dtype=np.uint8, count=HEADER_BYTES - HEADER_USED, offset=HEADER_USED)
    if pad.any():
        bad = int(np.flatnonzero(pad)[0]) + HEADER_USED
        raise FormatError(
            f"{path}: reserved header byte @ offset {bad} is {int(buf[bad])}, expected 0 "
            "(corrupt header, or written by a newer version)",
            path=path, offset=bad,
        )
    names = (
        "magic", "version", "header_bytes", "token_bytes", "codec", "num_chunks", "num_tokens",
        "num_documents", "chunk_tokens", "table_offset", "doc_index_offset", "tables_checksum",
    )
    out = dict(zip(names, fields))
    out["header_checksum"] = stored_sum
    if out["header_bytes"] != HEADER_BYTES:
        raise FormatError(
            f"{path}: header_bytes is {out['header_bytes']}, expected {HEADER_BYTES}", path=path, offset=12
        )
    return out


# -- codecs --------------------------------------------------------------------------------

_tls = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def pack_model_region(model: Any, level: int = 19) -> bytes:
    """The bytes of a model region (header + zstd frame of ``model.serialize()``); the magic
    says which codec's model it is (``RansModel`` or ``Rans1Model``)."""
    raw = model.serialize()
    stored = _cctx(level).compress(raw)
    magic = MODEL1_MAGIC if isinstance(model, _core.Rans1Model) else MODEL_MAGIC
    return _MODEL_HEADER.pack(magic, len(stored), checksum(stored), len(raw)) + stored


def _model_header(head: Any, path: str, offset: int) -> tuple[int, int, int]:
    """``(stored_bytes, checksum, raw_bytes)`` of a model region header, checked."""
    if len(head) < MODEL_HEADER_BYTES:
        raise FormatError(f"{path}: truncated rans model region @ offset {offset}", path=path, offset=offset)
    magic, stored, csum, raw = _MODEL_HEADER.unpack_from(bytes(head[:MODEL_HEADER_BYTES]))
    if magic not in _MODEL_MAGICS:
        raise FormatError(f"{path}: no rans model region @ offset {offset} (magic {magic!r}, expected "
                          f"{MODEL_MAGIC!r} or {MODEL1_MAGIC!r})", path=path, offset=offset)
    if not 0 < stored <= MODEL_MAX_BYTES or not 0 < raw <= MODEL_MAX_BYTES:
        raise FormatError(f"{path}: rans model region @ offset {offset} has impossible sizes "
                          f"({stored} stored, {raw} raw)", path=path, offset=offset)
    return stored, csum, raw


def model_region_size(head: Any, path: str, offset: int) -> int:
    """Total bytes of the model region whose first ``MODEL_HEADER_BYTES`` are ``head``.

    Raises:
        FormatError: wrong magic or an impossible size; the message names ``path`` and ``offset``.
    """
    return MODEL_HEADER_BYTES + _model_header(head, path, offset)[0]


def parse_model_region(region: Any, path: str, offset: int) -> Any:
    """Check and parse a whole model region into a ``RansModel`` (or a ``Rans1Model``: the
    region's magic says which).

    Raises:
        ChecksumError: the stored frame does not match its checksum.
        FormatError: bad magic, sizes, zstd frame or model contents; names ``path`` and ``offset``.
    """
    from ..errors import ChecksumError

    stored_n, want, raw_n = _model_header(region, path, offset)
    n = MODEL_HEADER_BYTES + stored_n
    if len(region) < n:
        raise FormatError(f"{path}: truncated rans model region @ offset {offset} ({len(region)} of {n} bytes)",
                          path=path, offset=offset)
    stored = bytes(region[MODEL_HEADER_BYTES:n])
    got = checksum(stored)
    if got != want:
        raise ChecksumError(f"{path}: rans model region @ offset {offset}: checksum mismatch (recorded "
                            f"{want:#018x}, computed {got:#018x}): the model is corrupt", path=path, offset=offset)
    try:
        raw = _dctx().decompress(stored, max_output_size=raw_n)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{path}: rans model region @ offset {offset}: bad zstd frame ({exc})",
                          path=path, offset=offset) from None
    if len(raw) != raw_n:
        raise FormatError(f"{path}: rans model region @ offset {offset}: {len(raw)} bytes, expected {raw_n}",
                          path=path, offset=offset)
    kind = _core.Rans1Model if bytes(region[:8]) == MODEL1_MAGIC else _core.RansModel
    try:
        return kind.parse(raw)
    except _core.CodecError as exc:
        raise FormatError(f"{path}: rans model region @ offset {offset}: {exc}", path=path, offset=offset) from None


def encode_chunk(tokens: np.ndarray, codec: int, level: int, model: Any = None) -> tuple[Any, int, int]:
    """Encode one chunk: returns ``(stored bytes-like, codec id used, checksum of stored)``.

    A zstd or rans chunk that would not get smaller is stored raw (codec ``none``): every
    chunk names its own codec, so readers handle the mix. Runs on writer worker threads
    (zstd, the rans encoders and xxhash release the GIL). ``model`` is the ``RansModel``
    for ``codec == CODEC_RANS``, the ``Rans1Model`` for ``CODEC_RANS1``.
    """
    raw = memoryview(np.ascontiguousarray(tokens)).cast("B")
    if codec == CODEC_ZSTD:
        comp = _cctx(level).compress(raw)
        if len(comp) < raw.nbytes:
            return comp, CODEC_ZSTD, checksum(comp)
    elif codec in MODEL_CODECS:
        comp = model.encode(np.ascontiguousarray(tokens))
        if len(comp) < raw.nbytes:
            return comp, codec, checksum(comp)
    return raw, CODEC_NONE, checksum(raw)


def decode_into(stored: Any, codec: int, out: np.ndarray, where: str, model: Any = None) -> None:
    """Decode checked ``stored`` bytes of one chunk into ``out`` (exact size).

    ``model`` is the chunk's ``RansModel`` / ``Rans1Model`` (rans / rans1 chunks only).

    Raises:
        FormatError: unknown codec id, or the stored bytes do not decode to exactly
            ``out.nbytes`` bytes; the message starts with ``where`` (shard, chunk, offset).
    """
    dst = memoryview(out).cast("B")
    if codec == CODEC_NONE:
        src = memoryview(stored).cast("B")
        if src.nbytes != dst.nbytes:
            raise FormatError(f"{where}: raw chunk has {src.nbytes} bytes, expected {dst.nbytes}")
        dst[:] = src
        return
    if codec == CODEC_ZSTD:
        try:
            size = zstandard.frame_content_size(stored)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: not a zstd frame ({exc})") from None
        if size != dst.nbytes:
            raise FormatError(f"{where}: zstd frame holds {size} bytes, expected {dst.nbytes}")
        try:
            reader = _dctx().stream_reader(stored, read_across_frames=False)
            got = 0
            while got < dst.nbytes:
                n = reader.readinto(dst[got:])
                if not n:
                    break
                got += n
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: zstd decode failed ({exc})") from None
        if got != dst.nbytes:
            raise FormatError(f"{where}: zstd frame decoded to {got} bytes, expected {dst.nbytes}")
        return
    if codec in MODEL_CODECS:
        name = CODEC_NAMES[codec]
        if model is None:
            raise FormatError(f"{where}: {name} chunk without a model")
        want = _core.Rans1Model if codec == CODEC_RANS1 else _core.RansModel
        if not isinstance(model, want):
            raise FormatError(f"{where}: {name} chunk whose model region holds a "
                              f"{'rans1' if isinstance(model, _core.Rans1Model) else 'rans'} model")
        try:
            model.decode(stored, out)
        except _core.CodecError as exc:
            raise FormatError(f"{where}: {exc}") from None
        return
    raise FormatError(
        f"{where}: unknown codec id {codec} (this build knows "
        + ", ".join(f"{n}={i}" for n, i in CODEC_IDS.items())
        + "); written by a newer version?"
    )
