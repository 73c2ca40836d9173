"""JSON codec for the metadata of a DCP checkpoint written by :class:`~.dcp.StorageWriter`.

torch's ``FileSystemWriter`` pickles its ``Metadata`` object into ``.metadata`` and its
reader ``pickle.load``\\ s it back: opening a checkpoint runs whatever the file says. Ours is
plain JSON (``.metadata.json``), decoded field by field into torch's metadata dataclasses;
nothing in it is ever executed, and every value is checked (types, dtypes, shapes, byte
ranges) before a reader trusts it. The file::

    {"format": "llmio-dcp", "format_version": 1, "body_xxh64": "<16 hex>", "body": {
        "dcp_version": "1.0.0",
        "state_dict_metadata": {fqn: {"type": "tensor", "dtype": "bfloat16", "size": [..],
                                      "requires_grad": false, "layout": "strided",
                                      "memory_format": "contiguous", "pin_memory": false,
                                      "chunks": [{"offsets": [..], "sizes": [..]}, ..]}
                                | {"type": "bytes"}},
        "storage": [{"fqn": .., "offset": [..] | null, "index": int | null, "kind": "tensor" | "bytes",
                     "file": "__0_0.distcp", "file_offset": int, "nbytes": int,
                     "xxh3": "<16 hex>" | null}, ..],
        "files": {"__0_0.distcp": size_in_bytes, ..},
        "planner_data": <tagged JSON, see _enc>,
        "storage_meta": {"checkpoint_id": str | null, "save_id": str | null, "modules": [..]} | null}}

``xxh3`` is the xxh3-64 of the item's bytes. ``body_xxh64`` is the xxh64 of the body
serialised canonically (sorted keys, no spaces): a flipped bit, or a hand edit that does not
recompute it, is refused as corrupt.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import FormatError

FORMAT_NAME = "llmio-dcp"
FORMAT_VERSION = 1
METADATA_FILE = ".metadata.json"
#: Largest metadata file we parse (a guard against a huge or hostile file).
MAX_METADATA_BYTES = 1 << 30

_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve": torch.preserve_format,
}
_LAYOUTS = {"strided": torch.strided}


class CheckpointFormatError(FormatError):
    """A DCP checkpoint directory is malformed, incomplete or inconsistent with its metadata.

    Attributes (``None`` where they do not apply): ``path`` (the file), ``key`` (the state dict
    key, fully qualified), ``offset`` (byte offset in that file).
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message, path=path, offset=offset)
        self.key = key


@dataclass(frozen=True)
class ItemLocation:
    """Where one write item's bytes live: ``nbytes`` at ``file_offset`` of ``file`` (a name
    inside the checkpoint directory). ``kind`` is ``"tensor"`` (raw bytes, row-major, of the
    chunk) or ``"bytes"`` (a ``torch.save`` blob). ``xxh3``: the xxh3-64 of those bytes, or None."""

    file: str
    file_offset: int
    nbytes: int
    kind: str
    xxh3: str | None = None


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype is stored under (``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, *, where: str) -> torch.dtype:
    """The torch dtype called ``name``.

    Raises:
        CheckpointFormatError: ``name`` is not a torch dtype name (``where`` says whose).
    """
    if not isinstance(name, str) or name not in _DTYPES:
        raise CheckpointFormatError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


# -- planner_data: arbitrary JSON-able values, tuples tagged so they come back as tuples ----
def _enc(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return {"__float__": repr(v)}
        return v
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x, where) for x in v]}
    if isinstance(v, list):
        return [_enc(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            # keys of another type: a list of pairs
            return {"__items__": [[_enc(k, where), _enc(x, where)] for k, x in v.items()]}
        return {"__dict__": {k: _enc(x, where) for k, x in v.items()}}
    raise TypeError(
        f"{where}: a value of type {type(v).__name__} cannot be stored in the JSON metadata of an "
        "llmio DCP checkpoint (supported: None, bool, int, float, str, and tuples, lists and dicts of them)"
    )


def _dec(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_dec(x, where) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "__tuple__" and isinstance(x, list):
            return tuple(_dec(y, where) for y in x)
        if tag == "__dict__" and isinstance(x, dict):
            return {k: _dec(y, where) for k, y in x.items()}
        if tag == "__items__" and isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x):
            return {_dec(k, where): _dec(y, where) for k, y in x}
        if tag == "__float__" and x in ("inf", "-inf", "nan"):
            return float(x)
    raise CheckpointFormatError(f"{where}: malformed value {str(v)[:80]!r}")


# -- encode ---------------------------------------------------------------------------------
def _tensor_md(md: TensorStorageMetadata) -> dict:
    p = md.properties
    mf = next((k for k, v in _MEMORY_FORMATS.items() if v == p.memory_format), None)
    if mf is None or p.layout not in _LAYOUTS.values():
        raise TypeError(f"unsupported tensor layout/memory format {p.layout}/{p.memory_format}")
    return {
        "type": "tensor",
        "dtype": dtype_name(p.dtype),
        "size": [int(s) for s in md.size],
        "requires_grad": bool(p.requires_grad),
        "layout": "strided",
        "memory_format": mf,
        "pin_memory": bool(p.pin_memory),
        "chunks": [{"offsets": [int(x) for x in c.offsets], "sizes": [int(x) for x in c.sizes]} for c in md.chunks],
    }


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode(metadata: Metadata, storage: dict[MetadataIndex, ItemLocation], files: dict[str, int]) -> bytes:
    """Serialise ``metadata`` (with ``storage`` as its storage data and ``files``, the data
    files and their sizes) as the JSON document described in the module docstring.

    Raises:
        TypeError: a value (planner data, a layout) that this format cannot hold; nothing is written.
    """
    sdm: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            sdm[fqn] = _tensor_md(md)
        elif isinstance(md, BytesStorageMetadata):
            sdm[fqn] = {"type": "bytes"}
        else:
            raise TypeError(f"state dict entry {fqn!r}: unsupported storage metadata {type(md).__name__}")
    items = []
    for idx, loc in storage.items():
        items.append({
            "fqn": idx.fqn,
            "offset": None if idx.offset is None else [int(x) for x in idx.offset],
            "index": idx.index,
            "kind": loc.kind,
            "file": loc.file,
            "file_offset": int(loc.file_offset),
            "nbytes": int(loc.nbytes),
            "xxh3": loc.xxh3,
        })
    sm = metadata.storage_meta
    body = {
        "dcp_version": metadata.version,
        "state_dict_metadata": sdm,
        "storage": items,
        "files": {k: int(v) for k, v in sorted(files.items())},
        "planner_data": _enc(metadata.planner_data, "planner_data"),
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id,
            "modules": list(sm.modules),
        },
    }
    body_bytes = _canonical(body)
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "body_xxh64": xxhash.xxh64(body_bytes).hexdigest(), "body": body}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


# -- decode ---------------------------------------------------------------------------------
def _int_list(v: Any, where: str, *, nonneg: bool = True) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise CheckpointFormatError(f"{where}: expected a list of integers, got {str(v)[:80]!r}")
    if nonneg and any(x < 0 for x in v):
        raise CheckpointFormatError(f"{where}: negative value in {v}")
    return v


def _nonneg_int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointFormatError(f"{where}: expected a non-negative integer, got {v!r}")
    return v


def _decode_tensor_md(fqn: str, d: Any, path: str) -> TensorStorageMetadata:
    where = f"{path}: tensor {fqn!r}"
    try:
        dtype = dtype_from_name(d["dtype"], where=where)
        size = _int_list(d["size"], f"{where} size")
        mf = _MEMORY_FORMATS.get(d["memory_format"])
        layout = _LAYOUTS.get(d["layout"])
        if mf is None or layout is None:
            raise CheckpointFormatError(f"{where}: unknown layout {d['layout']!r} / memory format {d['memory_format']!r}")
        chunks = []
        for j, c in enumerate(d["chunks"]):
            offs = _int_list(c["offsets"], f"{where} chunk {j} offsets")
            sizes = _int_list(c["sizes"], f"{where} chunk {j} sizes")
            if len(offs) != len(size) or len(sizes) != len(size):
                raise CheckpointFormatError(f"{where}: chunk {j} has rank {len(offs)}/{len(sizes)}, the tensor {len(size)}")
            if any(o + s > n for o, s, n in zip(offs, sizes, size)):
                raise CheckpointFormatError(f"{where}: chunk {j} (offsets {offs}, sizes {sizes}) lies outside the tensor {size}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes)))
        props = TensorProperties(dtype=dtype, layout=layout, requires_grad=bool(d["requires_grad"]),
                                 memory_format=mf, pin_memory=bool(d["pin_memory"]))
    except (KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{where}: malformed metadata entry ({type(e).__name__}: {e})", path=path, key=fqn) from None
    except CheckpointFormatError as e:
        raise CheckpointFormatError(str(e), path=path, key=fqn) from None
    return TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)


def decode(raw: bytes, path: str) -> tuple[Metadata, dict[MetadataIndex, ItemLocation], dict[str, int]]:
    """Parse and check a metadata file's bytes (``path`` names it in errors). Returns torch's
    ``Metadata`` (its ``storage_data`` is the same dict as the second value), the location of
    every stored item, and the data files with their sizes.

    Checks: JSON, format name and version, body checksum, every field's type, dtypes known,
    chunks inside their tensor, each storage entry naming a known key and chunk, its byte
    count equal to the chunk's (tensors), its range inside its file's recorded size, and no
    two ranges of a file overlapping.

    Raises:
        CheckpointFormatError: any of those checks failed; the message names ``path`` and,
            where one is involved, the state dict key.
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{path}: metadata file of {len(raw)} bytes is larger than {MAX_METADATA_BYTES}", path=path)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: metadata is not valid JSON ({e})", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{path}: not an llmio DCP metadata file (format {doc.get('format') if isinstance(doc, dict) else None!r})", path=path)
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: unsupported format_version {doc.get('format_version')!r} (this reader knows {FORMAT_VERSION})", path=path)
    body = doc.get("body")
    if not isinstance(body, dict):
        raise CheckpointFormatError(f"{path}: metadata has no body", path=path)
    try:
        digest = xxhash.xxh64(_canonical(body)).hexdigest()
    except ValueError as e:  # NaN/inf smuggled into the body
        raise CheckpointFormatError(f"{path}: metadata body is not canonical JSON ({e})", path=path) from None
    if digest != doc.get("body_xxh64"):
        raise CheckpointFormatError(
            f"{path}: metadata checksum mismatch (stored {doc.get('body_xxh64')!r}, computed {digest!r}): "
            "the file was modified or corrupted after it was written", path=path)
    try:
        sdm_raw = body["state_dict_metadata"]
        files_raw = body["files"]
        items_raw = body["storage"]
        if not isinstance(sdm_raw, dict) or not isinstance(files_raw, dict) or not isinstance(items_raw, list):
            raise TypeError("state_dict_metadata/files/storage have the wrong JSON types")
    except (KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{path}: malformed metadata ({type(e).__name__}: {e})", path=path) from None

    sdm: dict[str, Any] = {}
    for fqn, d in sdm_raw.items():
        if isinstance(d, dict) and d.get("type") == "bytes":
            sdm[fqn] = BytesStorageMetadata()
        elif isinstance(d, dict) and d.get("type") == "tensor":
            sdm[fqn] = _decode_tensor_md(fqn, d, path)
        else:
            raise CheckpointFormatError(f"{path}: entry {fqn!r} has no valid type", path=path, key=fqn)
    files: dict[str, int] = {}
    for name, size in files_raw.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", "..") or "\0" in name:
            raise CheckpointFormatError(f"{path}: invalid data file name {name!r}", path=path)
        files[name] = _nonneg_int(size, f"{path}: size of {name!r}")

    storage: dict[MetadataIndex, ItemLocation] = {}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for j, it in enumerate(items_raw):
        if not isinstance(it, dict) or not isinstance(it.get("fqn"), str):
            raise CheckpointFormatError(f"{path}: storage entry {j} is malformed", path=path)
        fqn = it["fqn"]
        where = f"{path}: {fqn!r}"
        try:
            kind = it["kind"]
            fname = it["file"]
            off = _nonneg_int(it["file_offset"], f"{where} file_offset")
            nbytes = _nonneg_int(it["nbytes"], f"{where} nbytes")
            chunk_off = None if it["offset"] is None else _int_list(it["offset"], f"{where} offset")
            index = it.get("index")
            digest_i = it.get("xxh3")
            if index is not None:
                _nonneg_int(index, f"{where} index")
            if digest_i is not None and not (isinstance(digest_i, str) and len(digest_i) == 16):
                raise CheckpointFormatError(f"{where}: malformed xxh3 {digest_i!r}")
        except KeyError as e:
            raise CheckpointFormatError(f"{where}: storage entry lacks {e}", path=path, key=fqn) from None
        except CheckpointFormatError as e:
            raise CheckpointFormatError(str(e), path=path, key=fqn) from None
        md = sdm.get(fqn)
        if md is None:
            raise CheckpointFormatError(f"{where}: storage entry for a key the checkpoint does not list", path=path, key=fqn)
        if fname not in files:
            raise CheckpointFormatError(f"{where}: data file {fname!r} is not listed in the metadata", path=path, key=fqn)
        if kind == "tensor":
            if not isinstance(md, TensorStorageMetadata) or chunk_off is None:
                raise CheckpointFormatError(f"{where}: tensor data stored for a non-tensor entry", path=path, key=fqn)
            chunk = next((c for c in md.chunks if list(c.offsets) == chunk_off), None)
            if chunk is None:
                raise CheckpointFormatError(f"{where}: no chunk at offsets {chunk_off}", path=path, key=fqn)
            want = math.prod(chunk.sizes) * torch.empty((), dtype=md.properties.dtype).element_size()
            if nbytes != want:
                raise CheckpointFormatError(
                    f"{where}: chunk at {chunk_off} stores {nbytes} bytes, its shape {list(chunk.sizes)} of "
                    f"{dtype_name(md.properties.dtype)} needs {want}", path=path, key=fqn)
        elif kind == "bytes":
            if not isinstance(md, BytesStorageMetadata):
                raise CheckpointFormatError(f"{where}: bytes stored for a tensor entry", path=path, key=fqn)
        else:
            raise CheckpointFormatError(f"{where}: unknown kind {kind!r}", path=path, key=fqn)
        if off + nbytes > files[fname]:
            raise CheckpointFormatError(
                f"{where}: bytes [{off}, {off + nbytes}) lie past the end of {fname} ({files[fname]} bytes)",
                path=path, key=fqn, offset=off)
        idx = MetadataIndex(fqn, chunk_off, index)
        if idx in storage:
            raise CheckpointFormatError(f"{where}: stored twice (chunk {chunk_off})", path=path, key=fqn)
        storage[idx] = ItemLocation(fname, off, nbytes, kind, digest_i)
        ranges.setdefault(fname, []).append((off, off + nbytes, fqn))
    for fname, rs in ranges.items():
        rs.sort()
        for (a0, a1, ka), (b0, b1, kb) in zip(rs, rs[1:]):
            if b0 < a1:
                raise CheckpointFormatError(
                    f"{path}: {ka!r} [{a0}, {a1}) and {kb!r} [{b0}, {b1}) overlap in {fname}", path=path, key=kb, offset=b0)
    for fqn, md in sdm.items():
        if isinstance(md, BytesStorageMetadata):
            if MetadataIndex(fqn) not in storage:
                raise CheckpointFormatError(f"{path}: {fqn!r} has no stored bytes", path=path, key=fqn)
        else:
            for c in md.chunks:
                if MetadataIndex(fqn, list(c.offsets)) not in storage:
                    raise CheckpointFormatError(f"{path}: {fqn!r} chunk at {list(c.offsets)} has no stored bytes", path=path, key=fqn)

    sm_raw = body.get("storage_meta")
    sm = None
    if isinstance(sm_raw, dict):
        mods = sm_raw.get("modules") or []
        sm = StorageMeta(checkpoint_id=sm_raw.get("checkpoint_id") if isinstance(sm_raw.get("checkpoint_id"), str) else None,
                         save_id=sm_raw.get("save_id") if isinstance(sm_raw.get("save_id"), str) else None,
                         modules=[m for m in mods if isinstance(m, str)] if isinstance(mods, list) else [])
    version = body.get("dcp_version")
    md_obj = Metadata(
        state_dict_metadata=sdm,
        planner_data=_dec(body.get("planner_data"), f"{path}: planner_data"),
        storage_data=storage,
        storage_meta=sm,
        version=version if isinstance(version, str) else None,
    )
    return md_obj, storage, files
