"""Readers for token files written by other tools (layouts in docs/format.md,
"Compatibility readers"): nanoGPT raw ``.bin``, llm.c ``.bin`` and Megatron ``.bin``/``.idx``.

Headers and indexes are parsed with plain file reads; the token data goes through the
:class:`Reader` like our own shards. These formats carry no checksums: each file is
exposed as pseudo-chunks of at most :data:`BLOCK_TOKENS` tokens, codec none, checksum 0.
"""
from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from ..errors import FormatError
from . import format as F
from .base import TokenDataset

#: Tokens per pseudo-chunk of a compat file.
BLOCK_TOKENS = 1 << 20

LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
#: llm.c magic -> (version it writes, token dtype), from llm.c dev/data/data_common.py.
LLMC_MAGICS = {20240520: (1, np.dtype("uint16")), 20240801: (7, np.dtype("uint32"))}

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
_MEGATRON_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
MEGATRON_HEADER_BYTES = _MEGATRON_HEAD.size  # 34
#: Megatron DType codes (megatron/core/datasets/indexed_dataset.py).
MEGATRON_DTYPES = {
    1: np.dtype("uint8"), 2: np.dtype("int8"), 3: np.dtype("int16"), 4: np.dtype("int32"),
    5: np.dtype("int64"), 6: np.dtype("float64"), 7: np.dtype("float32"), 8: np.dtype("uint16"),
}


class NanoGPTDataset(TokenDataset):
    """A nanoGPT raw token file: the tokens and nothing else (no header, no documents)."""

    format = "nanogpt"


class LlmcDataset(TokenDataset):
    """An llm.c token file: 256 int32 header (magic, version, token count), then tokens."""

    format = "llmc"


class MegatronDataset(TokenDataset):
    """A Megatron-LM indexed dataset: ``prefix.bin`` (tokens) and ``prefix.idx`` (index)."""

    format = "megatron"


def _blocks(ntok: int, tb: int, base: int) -> np.ndarray:
    n = (ntok + BLOCK_TOKENS - 1) // BLOCK_TOKENS
    chunks = np.zeros(n, dtype=F.CHUNKS_DTYPE)
    if n:
        first = np.arange(n, dtype=np.uint64) * np.uint64(BLOCK_TOKENS)
        count = np.minimum(np.uint64(ntok) - first, np.uint64(BLOCK_TOKENS))
        chunks["file"] = 0
        chunks["first_token"] = first
        chunks["token_count"] = count
        chunks["offset"] = np.uint64(base) + first * np.uint64(tb)
        chunks["stored_bytes"] = count * np.uint64(tb)
    return chunks


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", path) from None


def _head(path: str, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _megatron_prefix(p: str) -> str | None:
    """The Megatron prefix ``p`` names (``X`` of ``X.idx`` + ``X.bin``), or None."""
    if p.endswith(".idx"):
        return p[:-4]
    if p.endswith(".bin") and os.path.exists(p[:-4] + ".idx"):
        return p[:-4]
    if not os.path.exists(p) and (os.path.exists(p + ".idx") or os.path.exists(p + ".bin")):
        return p
    return None


def open_nanogpt(p: str, dtype: np.dtype | None, opts: dict) -> TokenDataset:
    """A raw array of tokens (nanoGPT ``train.bin``).

    Raises:
        ValueError: ``dtype`` missing or not uint16/uint32.
        FileNotFoundError: no such file.
        FormatError: the size is not a whole number of tokens.
    """
    if dtype is None or dtype not in (np.dtype("uint16"), np.dtype("uint32")):
        raise ValueError(f"{p}: a raw nanoGPT token file needs dtype='uint16' or 'uint32', got {dtype!r}")
    size = _size(p)
    if os.path.isdir(p):
        raise FormatError(f"{p}: a directory, not a raw token file", path=p)
    tb = dtype.itemsize
    if size % tb:
        raise FormatError(
            f"{p}: {size} bytes is not a whole number of {dtype.name} tokens (truncated?)", path=p,
            offset=size - size % tb)
    ntok = size // tb
    return NanoGPTDataset(
        path=os.path.abspath(p), paths=[os.path.abspath(p)], dtype=dtype, codec="none",
        chunks=_blocks(ntok, tb, 0), document_ends=None, file_sizes=[size], has_checksums=False,
        reader_options=opts, metadata={"source_format": "nanogpt"},
    )


def open_llmc(p: str, dtype: np.dtype | None, opts: dict) -> TokenDataset:
    """An llm.c ``.bin``: int32[256] header ``[magic, version, num_tokens, 0...]`` then tokens.

    Raises:
        FileNotFoundError: no such file.
        FormatError: short header, unknown magic, unknown version, negative count, a file
            size other than ``1024 + num_tokens * token_bytes``, dtype other than ``dtype``.
    """
    size = _size(p)
    if size < LLMC_HEADER_BYTES:
        raise FormatError(f"{p}: truncated llm.c header ({size} of {LLMC_HEADER_BYTES} bytes)", path=p, offset=0)
    header = np.frombuffer(_head(p, LLMC_HEADER_BYTES), dtype="<i4")
    magic, version, ntok = int(header[0]), int(header[1]), int(header[2])
    if magic not in LLMC_MAGICS:
        raise FormatError(f"{p}: bad llm.c magic {magic} @ offset 0 (known: {sorted(LLMC_MAGICS)})",
                          path=p, offset=0)
    want_version, tdtype = LLMC_MAGICS[magic]
    if version != want_version:
        raise FormatError(
            f"{p}: llm.c version {version} @ offset 4 is not supported for magic {magic} (expected {want_version})",
            path=p, offset=4)
    if ntok < 0:
        raise FormatError(f"{p}: negative token count {ntok} @ offset 8", path=p, offset=8)
    expect = LLMC_HEADER_BYTES + ntok * tdtype.itemsize
    if size != expect:
        raise FormatError(
            f"{p}: file is {size} bytes but its header promises {ntok} {tdtype.name} tokens "
            f"({expect} bytes): {'truncated' if size < expect else 'extra bytes at the end'}",
            path=p, offset=min(size, expect))
    if dtype is not None and dtype != tdtype:
        raise FormatError(f"{p}: llm.c magic {magic} means {tdtype.name} tokens but dtype={dtype.name!r} "
                          "was requested", path=p, offset=0)
    return LlmcDataset(
        path=os.path.abspath(p), paths=[os.path.abspath(p)], dtype=tdtype, codec="none",
        chunks=_blocks(ntok, tdtype.itemsize, LLMC_HEADER_BYTES), document_ends=None, file_sizes=[size],
        has_checksums=False, reader_options=opts,
        metadata={"source_format": "llmc", "magic": magic, "version": version},
    )


def open_megatron(p: str, dtype: np.dtype | None, opts: dict) -> TokenDataset:
    """A Megatron-LM ``MMapIndexedDataset`` pair ``prefix.idx`` + ``prefix.bin``.

    Raises:
        FileNotFoundError: ``prefix.idx`` or ``prefix.bin`` is missing.
        FormatError: wrong magic, version other than 1, float or unknown dtype code, an
            ``.idx`` whose size does not match its counts, negative lengths, non-contiguous
            sequence pointers, bad document indices, a ``.bin`` whose size is not the sum
            of the sequence lengths, dtype other than ``dtype``.
    """
    prefix = _megatron_prefix(p) or p
    idx, binp = os.path.abspath(prefix + ".idx"), os.path.abspath(prefix + ".bin")
    isize = _size(idx)
    bsize = _size(binp)
    head = _head(idx, MEGATRON_HEADER_BYTES)
    if len(head) < MEGATRON_HEADER_BYTES:
        raise FormatError(f"{idx}: truncated Megatron index header ({len(head)} of {MEGATRON_HEADER_BYTES} bytes)",
                          path=idx, offset=0)
    magic, version, code, n, d = _MEGATRON_HEAD.unpack(head)
    if magic != MEGATRON_MAGIC:
        raise FormatError(f"{idx}: bad Megatron index magic {magic!r} @ offset 0 (expected {MEGATRON_MAGIC!r})",
                          path=idx, offset=0)
    if version != MEGATRON_VERSION:
        raise FormatError(f"{idx}: Megatron index version {version} @ offset 9 is not supported (expected 1)",
                          path=idx, offset=9)
    if code not in MEGATRON_DTYPES:
        raise FormatError(f"{idx}: unknown Megatron dtype code {code} @ offset 17", path=idx, offset=17)
    tdtype = MEGATRON_DTYPES[code]
    if tdtype.kind == "f":
        raise FormatError(f"{idx}: dtype code {code} ({tdtype.name}) holds floats, not token ids", path=idx, offset=17)
    if dtype is not None and dtype != tdtype:
        raise FormatError(f"{idx}: the dataset holds {tdtype.name} tokens but dtype={dtype.name!r} was requested",
                          path=idx, offset=17)
    base = MEGATRON_HEADER_BYTES
    expect = base + 12 * n + 8 * d
    if isize not in (expect, expect + n):  # + n: the int8 sequence modes of multimodal datasets
        raise FormatError(
            f"{idx}: index is {isize} bytes, but {n} sequences and {d} document indices need {expect} "
            f"(or {expect + n} with sequence modes): {'truncated' if isize < expect else 'inconsistent'}",
            path=idx, offset=min(isize, expect))
    docs = np.fromfile(idx, dtype="<i8", count=d, offset=base + 12 * n) if d else np.zeros(0, np.int64)
    if d == 0 or docs[0] != 0 or docs[-1] != n or (np.diff(docs) < 0).any():
        raise FormatError(
            f"{idx}: document indices @ offset {base + 12 * n} must rise from 0 to the sequence count {n}",
            path=idx, offset=base + 12 * n)
    need = docs[1:]  # a document ends where sequence need[j] starts
    ends = np.zeros(len(need), dtype=np.uint64)
    tb = tdtype.itemsize
    total = 0
    block = 1 << 22
    for b0 in range(0, n, block):
        cnt = min(block, n - b0)
        lengths = np.fromfile(idx, dtype="<i4", count=cnt, offset=base + 4 * b0)
        if (lengths < 0).any():
            i = b0 + int(np.flatnonzero(lengths < 0)[0])
            raise FormatError(f"{idx}: sequence {i} has negative length", path=idx, offset=base + 4 * i)
        cum = np.empty(cnt + 1, dtype=np.int64)
        cum[0] = total
        np.cumsum(lengths, dtype=np.int64, out=cum[1:])
        cum[1:] += total
        ptrs = np.fromfile(idx, dtype="<i8", count=cnt, offset=base + 4 * n + 8 * b0)
        off = ptrs != cum[:-1] * tb
        if off.any():
            i = b0 + int(np.flatnonzero(off)[0])
            raise FormatError(
                f"{idx}: sequence {i} starts at byte {int(ptrs[i - b0])} of the .bin, expected "
                f"{int(cum[i - b0]) * tb} (only contiguous sequences are supported)",
                path=idx, offset=base + 4 * n + 8 * i)
        j0 = int(np.searchsorted(need, b0, side="right"))
        j1 = int(np.searchsorted(need, b0 + cnt, side="right"))
        ends[j0:j1] = cum[need[j0:j1] - b0]
        total = int(cum[-1])
    if bsize != total * tb:
        raise FormatError(
            f"{binp}: file is {bsize} bytes, but {idx} describes {total} {tdtype.name} tokens ({total * tb} "
            f"bytes): {'truncated' if bsize < total * tb else 'extra bytes'}", path=binp, offset=min(bsize, total * tb))
    return MegatronDataset(
        path=os.path.abspath(prefix), paths=[binp], dtype=tdtype, codec="none", chunks=_blocks(total, tb, 0),
        document_ends=ends, file_sizes=[bsize], has_checksums=False, reader_options=opts,
        metadata={"source_format": "megatron", "idx_path": idx, "num_sequences": n,
                  "sequence_modes": isize == expect + n and n > 0},
    )


__all__: list[Any] = ["open_nanogpt", "open_llmc", "open_megatron", "BLOCK_TOKENS"]
