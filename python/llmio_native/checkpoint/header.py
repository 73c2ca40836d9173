"""The safetensors header: parse, validate, serialise; the dtype table.

A safetensors file is::

    +----------------+----------------------------------+-----------------------------+
    | N: u64 LE (8B) | header: N bytes of UTF-8 JSON     | data region (tensors packed) |
    +----------------+----------------------------------+-----------------------------+
    0                8                                  8 + N                      file end

The JSON object maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data region) plus an optional ``"__metadata__"`` map of strings to
strings. The format allows trailing spaces after the JSON object; :func:`serialise` pads with
them so the data region starts at a multiple of :data:`DATA_ALIGN` (4 KiB), which lets
O_DIRECT read every tensor without a bounce copy of the header block.

:func:`parse` accepts exactly what the ``safetensors`` library accepts, and refuses with a
:class:`SafetensorsError` naming the file and the tensor: headers over the size limit, past the
end of the file, malformed or non-UTF-8 JSON, duplicate keys, unknown dtypes, shapes that do
not match their byte ranges, offsets that overlap or leave gaps, and a data region that is
longer (trailing bytes) or shorter (truncated file) than the tensors it holds.

No torch here: the torch dtype for each name is a string resolved by the caller.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import FormatError

DATA_ALIGN = 4096
"""The data region of files we write starts at a multiple of this (bytes)."""

MAX_HEADER_BYTES = 100_000_000
"""Default limit on the header length N (the ``safetensors`` library's own limit)."""

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in the header, its width in bits, the torch dtype
    attribute that holds it (``None`` where torch has none) and whether torch packs two
    elements per byte (``F4``: the header counts 4-bit elements, torch counts bytes)."""

    name: str
    bits: int
    torch_name: str | None
    packed_x2: bool = False


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, "bool"),
        DType("U8", 8, "uint8"),
        DType("I8", 8, "int8"),
        DType("U16", 16, "uint16"),
        DType("I16", 16, "int16"),
        DType("U32", 32, "uint32"),
        DType("I32", 32, "int32"),
        DType("U64", 64, "uint64"),
        DType("I64", 64, "int64"),
        DType("F16", 16, "float16"),
        DType("BF16", 16, "bfloat16"),
        DType("F32", 32, "float32"),
        DType("F64", 64, "float64"),
        DType("C64", 64, "complex64"),
        DType("F8_E4M3", 8, "float8_e4m3fn"),
        DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
        DType("F8_E5M2", 8, "float8_e5m2"),
        DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
        DType("F8_E8M0", 8, "float8_e8m0fnu"),
        DType("F4", 4, "float4_e2m1fn_x2", packed_x2=True),
        # The format defines these; torch has no dtype for them (parse fine, load refuses).
        DType("F6_E2M3", 6, None),
        DType("F6_E3M2", 6, None),
    )
}
"""Every dtype the ``safetensors`` format defines, by header name."""

TORCH_TO_DTYPE: dict[str, str] = {d.torch_name: d.name for d in DTYPES.values() if d.torch_name}
"""torch dtype attribute name (``"bfloat16"``) -> header name (``"BF16"``)."""


class SafetensorsError(FormatError):
    """A safetensors file, directory or index is malformed, or does not hold what was asked.

    The message names the file and, where one is involved, the tensor. Attributes (``None``
    where they do not apply): ``path``, ``tensor``, ``offset`` (byte offset in the file).
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message, path=path, offset=offset)
        self.tensor = tensor


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: header dtype name, shape as the header states it, and its byte
    range ``[begin, end)`` relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header of the file at ``path``.

    ``tensors`` is ordered by offset (the order the bytes lie in the file);
    ``data_start`` = 8 + N is the file offset of the data region.
    """

    path: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict[str, str] | None = None

    @property
    def data_start(self) -> int:
        """File offset of the data region (8 + N)."""
        return 8 + self.header_len

    def tensor(self, name: str) -> TensorInfo:
        """The entry for ``name``.

        Raises:
            SafetensorsError: no tensor of that name in this file (names the file and tensor).
        """
        info = self.tensors.get(name)
        if info is None:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r} (the file holds {len(self.tensors)})",
                                   path=self.path, tensor=name)
        return info


def _fail(path: str, what: str, tensor: str | None = None, offset: int | None = None) -> SafetensorsError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return SafetensorsError(where + what, path=path, tensor=tensor, offset=offset)


def _no_duplicates(path: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise _fail(path, f"duplicate key {k!r} in the header JSON", tensor=k)
            out[k] = v
        return out
    return hook


def _reject_constant(path: str):
    def hook(name: str) -> Any:
        raise _fail(path, f"header JSON holds the non-standard constant {name}")
    return hook


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse(json_bytes: bytes, *, path: str, file_size: int) -> Header:
    """Validate the ``N`` header bytes of a file of ``file_size`` bytes and return its layout.

    ``json_bytes`` is the header itself (without the 8-byte length); trailing spaces allowed.

    Raises:
        SafetensorsError: anything the format does not allow (see the module docstring); the
            message names ``path`` and, where one is at fault, the tensor.
    """
    n = len(json_bytes)
    data_len = file_size - 8 - n
    if data_len < 0:
        raise _fail(path, f"header length {n} runs past the end of the file ({file_size} bytes)", offset=8)
    try:
        text = json_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not valid UTF-8 at byte {8 + e.start}", offset=8 + e.start) from None
    if not text.startswith("{"):
        raise _fail(path, "header does not start with '{' (not a safetensors file?)", offset=8)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(path), parse_constant=_reject_constant(path))
    except SafetensorsError:
        raise
    except json.JSONDecodeError as e:
        raise _fail(path, f"malformed header JSON: {e.msg} at byte {8 + e.pos}", offset=8 + e.pos) from None
    except (ValueError, RecursionError) as e:  # too deep, int too long
        raise _fail(path, f"malformed header JSON: {type(e).__name__}: {e}"[:300], offset=8) from None
    if not isinstance(obj, dict):
        raise _fail(path, f"header JSON is a {type(obj).__name__}, not an object", offset=8)

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _fail(path, f"{METADATA_KEY} must map strings to strings, got {json.dumps(metadata)[:200]}")

    infos: list[TensorInfo] = []
    for name, ent in obj.items():
        if not isinstance(ent, dict):
            raise _fail(path, f"entry is a {type(ent).__name__}, not an object", tensor=name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in ent:
                raise _fail(path, f"entry lacks {key!r}", tensor=name)
        dt, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise _fail(path, f"unknown dtype {dt!r} (known: {', '.join(DTYPES)})", tensor=name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"shape must be a list of non-negative integers, got {json.dumps(shape)[:200]}",
                        tensor=name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs)
                or offs[0] > offs[1]):
            raise _fail(path, f"data_offsets must be [begin, end] with 0 <= begin <= end, got "
                              f"{json.dumps(offs)[:200]}", tensor=name)
        bits = math.prod(shape) * DTYPES[dt].bits
        if bits % 8:
            raise _fail(path, f"{dt} shape {shape} holds {bits} bits, not a whole number of bytes", tensor=name)
        if bits // 8 != offs[1] - offs[0]:
            raise _fail(path, f"shape/size mismatch: {dt} {shape} needs {bits // 8} bytes, data_offsets "
                              f"{offs} span {offs[1] - offs[0]}", tensor=name, offset=8 + n + offs[0])
        infos.append(TensorInfo(name, dt, tuple(shape), offs[0], offs[1]))

    infos.sort(key=lambda t: (t.begin, t.end))
    expected, prev = 0, None
    for t in infos:
        if t.begin != expected:
            kind = "overlaps" if t.begin < expected else "leaves a gap after"
            other = f"tensor {prev!r} (ends at {expected})" if prev is not None else "the start of the data region"
            raise _fail(path, f"non-contiguous offsets: data_offsets [{t.begin}, {t.end}] {kind} {other}",
                        tensor=t.name, offset=8 + n + t.begin)
        expected, prev = t.end, t.name
    if expected < data_len:
        raise _fail(path, f"trailing bytes: the data region holds {data_len} bytes but the tensors cover "
                          f"{expected}", offset=8 + n + expected)
    if expected > data_len:
        last = infos[-1].name if infos else None
        raise _fail(path, f"truncated file: tensors need {expected} data bytes, the file holds {data_len} "
                          f"(size {file_size})", tensor=last, offset=file_size)
    return Header(path=path, header_len=n, file_size=file_size, tensors={t.name: t for t in infos},
                  metadata=dict(metadata) if metadata is not None else None)


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the file at ``path`` (two small preads).

    Raises:
        SafetensorsError: the header is malformed, over ``max_header_bytes``, or past EOF.
        FileNotFoundError, PermissionError, IsADirectoryError, OSError: the file cannot be read.
    """
    p = os.fsdecode(os.fspath(path))
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise _fail(p, f"file is {size} bytes, too short for the 8-byte header length (truncated?)", offset=0)
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > max_header_bytes:
            raise _fail(p, f"header length {n} exceeds the limit of {max_header_bytes} bytes "
                           f"(max_header_bytes)", offset=0)
        if n > size - 8:
            raise _fail(p, f"header length {n} runs past the end of the file ({size} bytes; truncated?)", offset=0)
        raw = b""
        while len(raw) < n:
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                raise _fail(p, f"file shrank while reading its header ({len(raw)} of {n} bytes)", offset=8 + len(raw))
            raw += chunk
    finally:
        os.close(fd)
    return parse(raw, path=p, file_size=size)


def serialise(entries: Iterable[tuple[str, str, Iterable[int], int]], metadata: Mapping[str, str] | None = None,
              *, align: int = DATA_ALIGN) -> tuple[bytes, list[tuple[int, int]]]:
    """Lay ``entries`` (name, header dtype, shape, nbytes) out back to back in the given order.

    Returns ``(prefix, offsets)``: ``prefix`` is the 8-byte length plus the JSON header padded
    with spaces so ``len(prefix)`` is a multiple of ``align``; ``offsets[k]`` is the
    ``(begin, end)`` of entry k relative to the data region.

    Raises:
        ValueError: an unknown dtype, a name used twice or equal to ``__metadata__``, metadata
            that is not str -> str, or an nbytes that does not match dtype and shape.
    """
    obj: dict[str, Any] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata must map str to str; offending keys: {bad[:5]}")
        obj[METADATA_KEY] = dict(metadata)
    offsets: list[tuple[int, int]] = []
    pos = 0
    for name, dt, shape, nbytes in entries:
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be str, got {name!r}")
        if name == METADATA_KEY or name in obj:
            raise ValueError(f"tensor name {name!r} is reserved or used twice")
        if dt not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dt!r}")
        shape = [int(d) for d in shape]
        want_bits = math.prod(shape) * DTYPES[dt].bits
        if want_bits % 8 or want_bits // 8 != nbytes:
            raise ValueError(f"tensor {name!r}: {dt} {shape} needs {want_bits / 8:g} bytes, got {nbytes}")
        obj[name] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    total = -(-(8 + len(text)) // align) * align
    n = total - 8
    return struct.pack("<Q", n) + text + b" " * (n - len(text)), offsets


__all__ = ["DATA_ALIGN", "MAX_HEADER_BYTES", "METADATA_KEY", "DType", "DTYPES", "TORCH_TO_DTYPE",
           "SafetensorsError", "TensorInfo", "Header", "parse", "read_header", "serialise"]
