"""Input readers: UTF-8 text, JSONL and Parquet files as streams of document pieces.

Every reader yields :class:`~llmio_native.pack.split.Piece` runs in input order, each
document cut at BPE-safe points (:mod:`llmio_native.pack.split`), and accounts for every
input byte (``Piece.nbytes``) so that a progress bar reaches the input size exactly.
"""
from __future__ import annotations

import codecs
import json
import os
import sys
from typing import Any, Iterator, Sequence

from .errors import PackError
from .split import PIECE_CHARS, Piece, doc_pieces, next_cut, safe_cut

#: Bytes read from a text file at a time.
READ_BYTES = 1 << 20
#: Values of ``input_format`` (``auto``: by file suffix, see :func:`input_format`).
INPUT_FORMATS = ("auto", "txt", "jsonl", "parquet")
#: Where documents end in text files: the whole file, blank lines, every line.
DOC_SEPS = ("file", "blank", "line")


def _not_utf8(where: str, exc: UnicodeDecodeError, base: int = 0) -> PackError:
    return PackError(f"{where}: not UTF-8 text (byte {base + exc.start}: {exc.reason}); "
                     "llmio pack reads UTF-8 only")


def _txt_file_pieces(path: str, limit: int) -> Iterator[Piece]:
    """The whole file as one document, streamed in pieces cut at safe points."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    buf = ""
    consumed = 0  # bytes read from the file so far
    reported = 0
    scan = 0  # buf has no safe cut before this index (past the piece limit)
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            base = consumed - len(dec.getstate()[0])  # file offset of the decoder's input
            try:
                buf += dec.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc, base) from None
            consumed += len(block)
            pos = 0
            while len(buf) - pos > limit:
                cut = safe_cut(buf, pos + max(1, limit // 2), pos + limit)
                if cut is None:
                    cut = safe_cut(buf, pos + 1, pos + limit)
                if cut is None:  # a run without whitespace: it ends at the next safe cut
                    cut = next_cut(buf, max(pos + limit, scan))
                    if cut is None:  # not in this text yet: read on (at the end, one piece)
                        scan = len(buf) - 1
                        break
                piece = buf[pos:cut]
                pos = cut
                nb = len(piece.encode("utf-8"))
                reported += nb
                yield Piece(piece, False, nb)
            buf = buf[pos:]
            scan = max(0, scan - pos)
            if not block:
                break
    yield Piece(buf, True, consumed - reported)


def _txt_line_pieces(path: str, mode: str, limit: int) -> Iterator[Piece]:
    """Documents of ``mode`` "line" (one per non-blank line) or "blank" (paragraphs)."""
    pending = 0  # bytes of skipped lines, reported with the next piece
    para: list[str] = []
    para_bytes = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(f"{path}:{lineno}", exc) from None
            blank = line.strip() == ""
            if mode == "line":
                if blank:
                    pending += len(raw)
                    continue
                yield from doc_pieces(line.rstrip("\r\n"), pending + len(raw), limit)
                pending = 0
                continue
            if blank:
                if para:
                    yield from doc_pieces("".join(para).rstrip("\r\n"), para_bytes, limit)
                    para, para_bytes = [], 0
                pending += len(raw)
                continue
            para.append(line)
            para_bytes += len(raw) + pending
            pending = 0
    if para:
        yield from doc_pieces("".join(para).rstrip("\r\n"), para_bytes, limit)
    if pending:
        yield Piece(None, False, pending)


def _record_text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PackError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _jsonl_pieces(path: str, field: str, limit: int) -> Iterator[Piece]:
    pending = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                pending += len(raw)
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as exc:
                raise _not_utf8(where, exc) from None
            except json.JSONDecodeError as exc:
                raise PackError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                depth = max(raw.count(b"["), raw.count(b"{"))
                raise PackError(f"{where}: JSON nested too deeply (up to {depth} brackets; Python's json reads "
                                f"about {sys.getrecursionlimit()} levels): llmio pack needs one object per line "
                                "with a string field") from None
            if not isinstance(obj, dict):
                raise PackError(f"{where}: a JSON {type(obj).__name__}, not an object")
            if field not in obj:
                keys = ", ".join(list(obj)[:8])
                raise PackError(f"{where}: no field {field!r} (fields: {keys}; choose one with --field)")
            text = _record_text(obj[field], where, field)
            if b"\\u" in raw:  # a \ud800-style escape decodes to a lone surrogate, which is not text
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise PackError(f"{where}: field {field!r} has a lone surrogate {text[exc.start]!r} at "
                                    f"character {exc.start} (a broken \\u escape)") from None
            yield from doc_pieces(text, pending + len(raw), limit)
            pending = 0
    if pending:
        yield Piece(None, False, pending)


def require_pyarrow() -> None:
    """Check that Parquet inputs can be read.

    Raises:
        PackError: pyarrow is not installed (names the extra to install).
    """
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PackError("reading .parquet needs pyarrow: pip install 'llmio-native[pack]'") from None


def _parquet_pieces(path: str, field: str, limit: int) -> Iterator[Piece]:
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise PackError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise PackError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}; "
                        "choose one with --field)")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))):
        raise PackError(f"{path}: column {field!r} has type {typ}, not string")
    size = os.path.getsize(path)
    rows = max(1, pf.metadata.num_rows)
    row = 0
    reported = 0
    # one record batch of one row group in memory at a time
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            nb = size * row // rows - reported
            reported += nb
            yield from doc_pieces(value or "", nb, limit)
    if size > reported:
        yield Piece(None, False, size - reported)


def input_format(path: str, forced: str = "auto") -> str:
    """The reader for ``path``: ``forced`` unless "auto"; else by suffix: ``.jsonl``,
    ``.ndjson``, ``.json`` → jsonl; ``.parquet``, ``.pq`` → parquet; anything else → txt.

    Raises:
        Nothing.
    """
    if forced != "auto":
        return forced
    low = path.lower()
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    return "txt"


def check_input_file(path: str) -> None:
    """Check that ``path`` is an existing regular file (or a link to one).

    Raises:
        PackError: ``path`` is missing or not a file.
    """
    if not os.path.isfile(path):
        raise PackError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")


def iter_pieces(inputs: Sequence[str], field: str = "text", doc_sep: str = "file",
                forced_format: str = "auto", piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """Every document of every input, in input order, as :class:`Piece` runs of at most
    ``piece_chars`` characters (cut by :func:`~llmio_native.pack.split.safe_cut`).

    Args:
        inputs: file paths, read in this order.
        field: the JSONL field / Parquet column holding the text.
        doc_sep: where documents end in text files (one of ``DOC_SEPS``).
        forced_format: one of ``INPUT_FORMATS``; "auto" chooses by suffix.
        piece_chars: the piece size limit.

    Raises:
        PackError: an input is missing, not UTF-8, a bad JSONL line (named ``file:line``),
            a Parquet file without the column.
    """
    for path in inputs:
        check_input_file(path)
        fmt = input_format(path, forced_format)
        if fmt == "jsonl":
            yield from _jsonl_pieces(path, field, piece_chars)
        elif fmt == "parquet":
            yield from _parquet_pieces(path, field, piece_chars)
        elif doc_sep == "file":
            yield from _txt_file_pieces(path, piece_chars)
        else:
            yield from _txt_line_pieces(path, doc_sep, piece_chars)
