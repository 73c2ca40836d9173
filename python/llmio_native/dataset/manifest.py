"""The dataset directory and its ``manifest.json`` (docs/format.md), in one place.

* :func:`dataset_files`: which files of a directory belong to an llmio dataset (the one
  rule the writer's overwrite, the reader's incomplete-dataset check and the CLI use).
* :class:`Manifest` / :class:`ShardEntry`: the manifest schema, written by
  :func:`write_manifest` (``DatasetWriter.close``) and parsed and checked by
  :func:`read_manifest` (``LioDataset.open``).

A committed dataset is ``manifest.json`` plus the shards it lists; the writer commits by
writing the manifest last, atomically (temp file, fsync, rename, fsync of the directory).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FormatError
from . import format as F
from .index import INDEX_NAME, INDEX_TMP_NAME

#: The tokenizer file name a dataset directory may carry (recorded in the manifest).
TOKENIZER_NAME = "tokenizer.json"


# -- which files belong to a dataset --------------------------------------------------------------
def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a shard file name (``shard-*.lio``)."""
    return name.startswith(F.SHARD_PREFIX) and name.endswith(F.SHARD_SUFFIX)


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` is a file a writer creates or leaves behind (see :func:`dataset_files`)."""
    if name.startswith(F.SHARD_PREFIX) and (name.endswith(F.SHARD_SUFFIX) or name.endswith(F.DOCS_SPILL_SUFFIX)):
        return True
    return name in (F.MANIFEST_NAME, F.MANIFEST_TMP_NAME, INDEX_NAME, INDEX_TMP_NAME)


def dataset_files(directory: str | os.PathLike[str]) -> list[str]:
    """Names of the files in ``directory`` that belong to an llmio dataset, committed or not.

    They are what a :class:`DatasetWriter` creates or leaves behind: ``manifest.json``, its
    temporary ``.manifest.json.tmp``, shards ``shard-*.lio`` and their document spill files
    ``shard-*.lio.docs.tmp``. Anything else (a ``tokenizer.json``, the user's own files) is
    not listed. ``manifest.json`` comes first, then the rest sorted: deleting in this order
    never leaves a manifest whose shards are gone (an interrupted cleanup reads as an
    incomplete dataset, never as a damaged one).

    Args:
        directory: the dataset directory.

    Returns:
        File names (not paths), ``[]`` where ``directory`` does not exist or is not a directory.

    Raises:
        PermissionError, OSError: ``directory`` cannot be listed.
    """
    d = os.fspath(directory)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((n for n in names if is_dataset_name(n)), key=lambda n: (n != F.MANIFEST_NAME, n))


def fsync_dir(directory: str) -> None:
    """fsync a directory (makes renames and unlinks in it durable).

    Raises:
        OSError: it cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """One entry of the manifest's ``shards`` list: a shard file and what its header says."""

    name: str
    bytes: int
    num_tokens: int
    num_chunks: int
    num_documents: int
    header_checksum: int

    #: The integer fields, in manifest order (each checked against the shard header on open).
    INT_FIELDS = ("bytes", "num_tokens", "num_chunks", "num_documents", "header_checksum")

    def to_json(self) -> dict:
        """The JSON object of this entry."""
        return {"name": self.name, "bytes": self.bytes, "num_tokens": self.num_tokens,
                "num_chunks": self.num_chunks, "num_documents": self.num_documents,
                "header_checksum": self.header_checksum}


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (format ``llmio-tokens``, version 1 or 2: the version of
    its shards).

    ``raw`` is the parsed JSON object as read (``LioDataset.manifest``); it is ``None`` for
    a manifest built by the writer.
    """

    dtype: str
    codec: str
    chunk_tokens: int
    num_tokens: int
    num_documents: int
    shards: list[ShardEntry]
    shard_tokens: int | None = None
    zstd_level: int | None = None
    rans_model_tokens: int | None = None
    tokenizer: str | None = None
    eot_token: int | None = None
    metadata: dict = field(default_factory=dict)
    created_by: str | None = None
    version: int = F.VERSION
    #: ``{"name": "index.lio", "bytes": N, "checksum": XXH3}`` (see :mod:`.index`), or None
    #: for a dataset written before the index existed
    index: dict | None = None
    raw: dict | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        """The JSON object written to ``manifest.json`` (keys in the documented order)."""
        return {
            "format": F.FORMAT_NAME,
            "version": self.version,
            "dtype": self.dtype,
            "codec": self.codec,
            "chunk_tokens": self.chunk_tokens,
            "shard_tokens": self.shard_tokens,
            "zstd_level": self.zstd_level,
            "rans_model_tokens": self.rans_model_tokens,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "shards": [s.to_json() for s in self.shards],
            "index": self.index,
            "tokenizer": self.tokenizer,
            "eot_token": self.eot_token,
            "metadata": self.metadata,
            "created_by": self.created_by,
        }


def write_manifest(directory: str, manifest: Manifest | dict) -> None:
    """Commit a dataset: write ``manifest.json`` atomically (temp file, fsync, rename, fsync
    of the directory). Call it after every shard was fsynced. ``manifest``: a
    :class:`Manifest`, or the JSON object itself (to rewrite one as read, unknown keys kept).

    Raises:
        OSError: writing, fsync or rename failed (the temp file may remain; it is one of
            :func:`dataset_files`).
    """
    tmp = os.path.join(directory, F.MANIFEST_TMP_NAME)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest.to_json() if isinstance(manifest, Manifest) else manifest, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, F.MANIFEST_NAME))
    fsync_dir(directory)


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name in the dataset directory (no path, not . or ..)."""
    return os.path.basename(name) == name and name not in ("", ".", "..")


def require(obj: Any, key: str, kind: type | tuple, where: str) -> Any:
    """``obj[key]`` checked to be of ``kind`` (never a bool for ``int``) and, if an int, >= 0.

    Raises:
        FormatError: ``obj`` is not a dict, the key is missing, the type is wrong or the
            integer is negative; the message starts with ``where``.
    """
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(f"{where}: missing field {key!r}", path=where)
    v = obj[key]
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        raise FormatError(f"{where}: field {key!r} has the wrong type ({type(v).__name__}: {v!r})", path=where)
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        raise FormatError(f"{where}: field {key!r} is negative ({v})", path=where)
    return v


def read_manifest(directory: str, dtype: np.dtype | None = None) -> Manifest:
    """Read and check ``directory/manifest.json`` against the schema.

    Checked here: valid JSON object, format name, known version, dtype and codec names,
    required fields with their types, ``eot_token`` fitting the dtype, ``tokenizer`` a plain
    file name, ``metadata`` an object, every shard entry (plain, unique names, integer
    fields). Whether the shards agree with it is the reader's to check.

    Args:
        directory: the dataset directory (absolute).
        dtype: the dtype the caller expects, or ``None``.

    Raises:
        FileNotFoundError: no manifest.json.
        FormatError: anything above; the message names ``manifest.json`` (and the shard
            entry); a dtype other than ``dtype``.
    """
    mpath = os.path.join(directory, F.MANIFEST_NAME)
    with open(mpath, "rb") as fh:
        data = fh.read()
    return parse_manifest(data, mpath, dtype, directory)


def parse_manifest(data: bytes, mpath: str, dtype: np.dtype | None = None, where: str | None = None) -> Manifest:
    """Parse and check the bytes of a ``manifest.json`` (see :func:`read_manifest`);
    ``mpath`` names it in messages, ``where`` (default ``mpath``) the dataset.

    Raises:
        FormatError: as :func:`read_manifest`.
    """
    d = where if where is not None else mpath
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{mpath}: not valid JSON ({exc})", path=mpath) from None
    if not isinstance(raw, dict):
        raise FormatError(f"{mpath}: expected a JSON object", path=mpath)
    fmt = raw.get("format")
    if fmt != F.FORMAT_NAME:
        raise FormatError(f"{mpath}: format is {fmt!r}, expected {F.FORMAT_NAME!r}", path=mpath)
    version = require(raw, "version", int, mpath)
    if version not in F.KNOWN_VERSIONS:
        raise FormatError(
            f"{mpath}: dataset format version {version} is not supported by this build "
            f"(it reads versions {list(F.KNOWN_VERSIONS)}); upgrade llmio_native", path=mpath)
    dname = require(raw, "dtype", str, mpath)
    if dname not in F.DTYPES:
        raise FormatError(f"{mpath}: dtype {dname!r} is not one of {sorted(F.DTYPES)}", path=mpath)
    ds_dtype = np.dtype(dname)
    if dtype is not None and dtype != ds_dtype:
        raise FormatError(
            f"{d}: the dataset holds {dname} tokens (manifest.json) but dtype={dtype.name!r} was requested",
            path=mpath)
    codec = require(raw, "codec", str, mpath)
    if codec not in F.CODEC_IDS:
        raise FormatError(f"{mpath}: unknown codec {codec!r} (known: {sorted(F.CODEC_IDS)})", path=mpath)
    chunk_tokens = require(raw, "chunk_tokens", int, mpath)
    total_tokens = require(raw, "num_tokens", int, mpath)
    total_docs = require(raw, "num_documents", int, mpath)
    shard_list = require(raw, "shards", list, mpath)
    eot = raw.get("eot_token")
    if eot is not None and (isinstance(eot, bool) or not isinstance(eot, int)
                            or not 0 <= eot <= np.iinfo(ds_dtype).max):
        raise FormatError(f"{mpath}: eot_token {eot!r} is not a {dname} token", path=mpath)
    tok = raw.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or not _plain_name(tok)):
        raise FormatError(f"{mpath}: tokenizer must be a file name in the directory, got {tok!r}", path=mpath)
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{mpath}: metadata must be an object", path=mpath)
    index = raw.get("index")
    if index is not None:
        iwhere = f"{mpath} index"
        iname = require(index, "name", str, iwhere)
        if not _plain_name(iname):
            raise FormatError(f"{iwhere}: name must be a file name in the directory, got {iname!r}", path=mpath)
        index = {"name": iname, "bytes": require(index, "bytes", int, iwhere),
                 "checksum": require(index, "checksum", int, iwhere)}
    shards: list[ShardEntry] = []
    seen: set[str] = set()
    for si, entry in enumerate(shard_list):
        where = f"{mpath} shards[{si}]"
        name = require(entry, "name", str, where)
        if not _plain_name(name) or name in seen:
            raise FormatError(f"{where}: bad or repeated shard name {name!r}", path=mpath)
        seen.add(name)
        ints = {k: require(entry, k, int, where) for k in ShardEntry.INT_FIELDS}
        shards.append(ShardEntry(name=name, **ints))
    return Manifest(
        dtype=dname, codec=codec, chunk_tokens=chunk_tokens, num_tokens=total_tokens, num_documents=total_docs,
        shards=shards, shard_tokens=raw.get("shard_tokens"), zstd_level=raw.get("zstd_level"),
        rans_model_tokens=raw.get("rans_model_tokens"), tokenizer=tok, eot_token=eot, metadata=meta,
        created_by=raw.get("created_by"), version=version, index=index, raw=raw,
    )


__all__ = ["dataset_files", "is_shard_name", "is_dataset_name", "fsync_dir", "Manifest", "ShardEntry",
           "write_manifest", "read_manifest", "parse_manifest", "require", "TOKENIZER_NAME"]
