"""``index.lio``: every shard's header and tables in one file (docs/format.md, "index.lio").

A reader needs each shard's header and tables (chunk table and document index) before it
can read a token. Locally that is two small reads per shard; from an object store it is two
requests per shard, each a round trip (20 ms or more), so a dataset of thousands of shards
would take seconds to open. The writer therefore also writes the same bytes, all shards
together, into ``index.lio``, and records it in the manifest (``"index"``: name, bytes,
XXH3); a remote reader fetches the manifest and this one object and opens in two round
trips whatever the shard count (:mod:`llmio_native.remote.dataset`).

The index is redundant: each record is checked against the manifest (name, size, header
checksum) and its own header (tables checksum), so a stale or damaged index is detected,
never trusted; a reader then falls back to the shards themselves.

Layout (little-endian), records in manifest order, then a footer::

    record: name_len u32 | name (UTF-8) | shard_bytes u64 | tables_len u64
            | tables (the shard's bytes [table_offset, EOF))
            | header (the first 88 bytes of the shard; the rest of its 4096 are zeros)
    footer: count u64 | XXH3-64 of every byte before it, the count included, u64 | b"LIOINDEX"

The header comes last because the writer knows it only after the tables: it holds their
checksum. The manifest's ``checksum`` is the footer's XXH3.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from ..errors import FormatError
from . import format as F

#: The index's file (object) name in a dataset directory (prefix).
INDEX_NAME = "index.lio"
#: Its temporary name while the writer appends to it.
INDEX_TMP_NAME = ".index.lio.tmp"
INDEX_MAGIC = b"LIOINDEX"
_REC = struct.Struct("<QQ")  # shard_bytes, tables_len (after name_len u32 and the name)
_NAME_LEN = struct.Struct("<I")
_FOOTER = struct.Struct("<QQ8s")


@dataclass(frozen=True)
class IndexRecord:
    """One shard's metadata as the index holds it: ``header`` is the full 4096-byte header,
    ``tables`` the bytes from ``table_offset`` to the end of the shard."""

    name: str
    bytes: int
    header: bytes
    tables: memoryview


class IndexWriter:
    """Appends one record per finished shard to ``directory/.index.lio.tmp``; :meth:`commit`
    renames it to ``index.lio``. Memory: one shard's tables at a time (the caller's).

    Raises:
        OSError: the file cannot be created or written.
    """

    def __init__(self, directory: str) -> None:
        self.tmp_path = os.path.join(directory, INDEX_TMP_NAME)
        self.path = os.path.join(directory, INDEX_NAME)
        self._fh = open(self.tmp_path, "wb", buffering=1 << 20)
        self._hash = xxhash.xxh3_64()
        self._count = 0
        self._tables_left = 0
        self._open = False
        self.bytes = 0

    def _write(self, b: Any) -> None:
        self._fh.write(b)
        self._hash.update(b)
        self.bytes += memoryview(b).nbytes

    def begin(self, name: str, shard_bytes: int, tables_len: int) -> None:
        """Start the record of shard ``name``: then its ``tables_len`` bytes of tables
        through :meth:`tables` (in pieces, in file order), then :meth:`end` with its header."""
        if self._open:
            raise ValueError(f"{self.tmp_path}: the previous record was not ended")
        nm = name.encode("utf-8")
        self._write(_NAME_LEN.pack(len(nm)) + nm + _REC.pack(int(shard_bytes), int(tables_len)))
        self._tables_left = int(tables_len)
        self._open = True

    def tables(self, piece: Any) -> None:
        """The next bytes of the current record's tables."""
        n = memoryview(piece).nbytes
        if not self._open or n > self._tables_left:
            raise ValueError(f"{self.tmp_path}: {n} bytes of tables given, {self._tables_left} expected")
        self._write(piece)
        self._tables_left -= n

    def end(self, header: bytes) -> None:
        """End the current record with the shard's header (4096 or at least 88 bytes)."""
        if not self._open or self._tables_left:
            raise ValueError(f"{self.tmp_path}: the record is missing {self._tables_left} bytes of tables")
        if len(header) < F.HEADER_USED:
            raise ValueError(f"{self.tmp_path}: a header of {len(header)} bytes, expected {F.HEADER_USED} or more")
        self._write(bytes(header[:F.HEADER_USED]))
        self._open = False
        self._count += 1

    def commit(self) -> dict:
        """Write the footer, fsync, rename to ``index.lio``; returns the manifest's
        ``"index"`` entry (``name``, ``bytes``, ``checksum``).

        Raises:
            ValueError: a record is missing tables. OSError: writing, fsync or rename failed.
        """
        if self._open:
            raise ValueError(f"{self.tmp_path}: the last record was not ended")
        self._write(struct.pack("<Q", self._count))  # the count is hashed with the records
        digest = self._hash.intdigest()
        self._fh.write(struct.pack("<Q8s", digest, INDEX_MAGIC))
        self.bytes += 16
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.path)
        return {"name": INDEX_NAME, "bytes": self.bytes, "checksum": digest}

    def close(self) -> None:
        """Close without committing (the temporary file stays; it is a dataset file, see
        :func:`~.manifest.dataset_files`). Never raises."""
        try:
            self._fh.close()
        except OSError:
            pass


def parse_index(data: bytes | bytearray | memoryview, where: str, expect: int | None = None) -> list[IndexRecord]:
    """The records of an index file's bytes, checked for structure and footer checksum
    (and, where ``expect`` is given, that the bytes' XXH3 is the manifest's).

    Raises:
        FormatError: truncated, bad magic, checksum mismatch, a record running past the end;
            the message names ``where`` and the offset.
    """
    buf = memoryview(data).cast("B")
    n = len(buf)
    body = max(0, n - 16)  # the count is hashed with the records
    got = xxhash.xxh3_64_intdigest(buf[:body])
    if expect is not None and got != expect:
        raise FormatError(f"{where}: XXH3 {got:#018x}, manifest.json says {expect:#018x} (damaged, or "
                          "the index of another version of the dataset)", path=where)
    if n < _FOOTER.size or bytes(buf[n - 8:]) != INDEX_MAGIC:
        raise FormatError(f"{where}: not an llmio index (no {INDEX_MAGIC!r} footer in {n} bytes)", path=where,
                          offset=max(0, n - 8))
    count, digest, _ = _FOOTER.unpack_from(buf, n - _FOOTER.size)
    if got != digest:
        raise FormatError(f"{where}: index checksum mismatch (recorded {digest:#018x}, computed {got:#018x})",
                          path=where, offset=body)
    out: list[IndexRecord] = []
    pos = 0
    end = n - _FOOTER.size
    while pos < end:
        at = pos
        if pos + _NAME_LEN.size > end:
            raise FormatError(f"{where}: record {len(out)} truncated @ offset {at}", path=where, offset=at)
        (nl,) = _NAME_LEN.unpack_from(buf, pos)
        pos += _NAME_LEN.size
        if pos + nl + _REC.size > end:
            raise FormatError(f"{where}: record {len(out)} truncated @ offset {at}", path=where, offset=at)
        try:
            name = bytes(buf[pos:pos + nl]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{where}: record {len(out)} has a name that is not UTF-8 @ offset {pos}",
                              path=where, offset=pos) from None
        pos += nl
        size, tlen = _REC.unpack_from(buf, pos)
        pos += _REC.size
        if pos + tlen + F.HEADER_USED > end:
            raise FormatError(f"{where}: record {len(out)} ({name}) runs past the end @ offset {at}",
                              path=where, offset=at)
        tables = buf[pos:pos + tlen]
        pos += tlen
        header = bytes(buf[pos:pos + F.HEADER_USED]) + bytes(F.HEADER_BYTES - F.HEADER_USED)
        pos += F.HEADER_USED
        out.append(IndexRecord(name, int(size), header, tables))
    if len(out) != count:
        raise FormatError(f"{where}: {len(out)} records, the footer says {count}", path=where, offset=end)
    return out


def check_index(records: list[IndexRecord], shards: list[Any], where: str) -> None:
    """Check index records against the manifest's shard entries (name, bytes, header
    checksum) and each record's header (tables length and checksum).

    Raises:
        FormatError: the first mismatch, naming ``where``, the record and the field.
    """
    if len(records) != len(shards):
        raise FormatError(f"{where}: {len(records)} records, manifest.json lists {len(shards)} shards", path=where)
    for i, (rec, ent) in enumerate(zip(records, shards)):
        w = f"{where} record {i} ({rec.name})"
        if rec.name != ent.name or rec.bytes != ent.bytes:
            raise FormatError(f"{w}: is {rec.name} of {rec.bytes} bytes, manifest.json says {ent.name} of "
                              f"{ent.bytes} bytes", path=where)
        hdr = F.unpack_header(rec.header, w)
        if hdr["header_checksum"] != ent.header_checksum:
            raise FormatError(f"{w}: header checksum {hdr['header_checksum']:#018x}, manifest.json says "
                              f"{ent.header_checksum:#018x}", path=where)
        t_off = int(hdr["table_offset"])
        if t_off + len(rec.tables) != rec.bytes:
            raise FormatError(f"{w}: {len(rec.tables)} bytes of tables from offset {t_off} do not end the shard "
                              f"({rec.bytes} bytes)", path=where)
        got = F.checksum(rec.tables)
        if got != hdr["tables_checksum"]:
            raise FormatError(f"{w}: tables checksum mismatch (recorded {hdr['tables_checksum']:#018x}, computed "
                              f"{got:#018x})", path=where)


def load_index(data: bytes | bytearray | memoryview, entry: dict, shards: list[Any], where: str) -> list[IndexRecord]:
    """The records of an index file, checked against the manifest's ``"index"`` entry (size
    and XXH3) and its shard entries (:func:`check_index`).

    Raises:
        FormatError: any mismatch or damage (names ``where``).
    """
    n = memoryview(data).nbytes
    if n != entry["bytes"]:
        raise FormatError(f"{where}: {n} bytes, manifest.json says {entry['bytes']}", path=where,
                          offset=min(n, entry["bytes"]))
    recs = parse_index(data, where, entry["checksum"])
    check_index(recs, shards, where)
    return recs


def rebuild_index(directory: str) -> dict:
    """Write ``index.lio`` for the dataset in ``directory`` from its shards and record it in
    ``manifest.json`` (for a dataset written before the index existed, or whose shards were
    rewritten): each shard's header and tables are read (two small reads per shard), the
    index committed, then the manifest rewritten atomically.

    Returns:
        The manifest's new ``"index"`` entry.

    Raises:
        FileNotFoundError: no manifest.json, or a shard is missing.
        FormatError: a shard's header does not parse. OSError: reading or writing failed.
    """
    from .manifest import read_manifest, write_manifest

    d = os.path.abspath(directory)
    man = read_manifest(d)
    w = IndexWriter(d)
    try:
        for ent in man.shards:
            path = os.path.join(d, ent.name)
            with open(path, "rb") as fh:
                header = fh.read(F.HEADER_BYTES)
                t_off = int(F.unpack_header(header, path)["table_offset"])
                fh.seek(t_off)
                tables = fh.read()
            w.begin(ent.name, t_off + len(tables), len(tables))
            w.tables(tables)
            w.end(header)
        entry = w.commit()
    except BaseException:
        w.close()
        raise
    write_manifest(d, dict(man.raw or man.to_json(), index=entry))  # every field as read, the index replaced
    return entry


__all__ = ["INDEX_NAME", "INDEX_TMP_NAME", "IndexWriter", "IndexRecord", "parse_index", "check_index", "load_index",
           "rebuild_index"]
