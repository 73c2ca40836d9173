"""llmio: pack text corpora into llmio token shards, inspect and verify token datasets.

commands:
  llmio pack INPUT... -o OUT (--tokenizer tokenizer.json | --train-bpe VOCAB_SIZE) [options]
  llmio inspect PATH [--json] [--sample N]      counts, dtype, codec, ratio, token histogram
  llmio verify PATH [--json]                    re-check every checksum
  llmio info                                    what this build can do here (JSON)
  llmio bench [NAME] [ARGS...]                  run benchmarks/bench_NAME.py (default: read)
  llmio --version

`llmio COMMAND --help` lists a command's options.
exit status: 0 success; 1 failure (bad input, corrupt data: one line on stderr, or the list
of bad chunks for verify); 2 usage error; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM),
129 (SIGHUP).
"""
from __future__ import annotations

import argparse
import codecs
import collections
import concurrent.futures as cf
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

#: The special token a trained BPE gets and whose id ``pack`` appends to every document.
EOT = "<|endoftext|>"
#: Characters of text handed to the tokenizer in one piece; longer documents are cut into
#: pieces at whitespace (see :func:`split_text`; a run without a safe cut point is one
#: longer piece). tokenizers' time per character grows with
#: the length of the text (measured: 4 Ki-character pieces encode 2.3x faster than 64 Ki
#: ones and 3.4x faster than 1 Mi), and short pieces keep every core busy on one document.
PIECE_CHARS = 1 << 12
#: Piece size for tokenizers that cannot be cut without changing the ids
#: (:func:`cuts_are_exact` is false): only documents longer than this are cut.
LONG_PIECE_CHARS = 1 << 20
#: Bytes read from a text file at a time.
READ_BYTES = 1 << 20
#: Characters of text per ``encode_batch`` call in this process (tokenizers encodes a
#: batch on all cores; this process peaked 150 bytes per character of a batch higher).
BATCH_CHARS = 2 << 20
#: Characters of text per task when tokenizing in worker processes.
WORKER_BATCH_CHARS = 1 << 20
#: Below this much input, ``--num-workers 0`` (auto) tokenizes in this process: starting
#: worker processes and shipping the text to them costs more than it saves.
AUTO_WORKERS_MIN_BYTES = 16 << 20
#: Most worker processes ``--num-workers 0`` (auto) starts.
AUTO_WORKERS_MAX = 32
#: Tokens per read when computing the histogram (bounded memory).
HIST_BLOCK_TOKENS = 1 << 22
#: Window size when ``inspect --sample`` spreads its reads over the dataset.
SAMPLE_WINDOW_TOKENS = 1 << 16
#: A histogram of ids up to this bound is a dense ``np.bincount``; beyond it, ``np.unique``.
DENSE_HIST_MAX_ID = 1 << 24

INPUT_FORMATS = ("auto", "txt", "jsonl", "parquet")
DOC_SEPS = ("file", "blank", "line")
FORMAT_NAMES = {
    "llmio": "llmio (llmio_native token shards)",
    "nanogpt": "nanoGPT (raw token .bin)",
    "llmc": "llm.c (.bin with 1 KiB header)",
    "megatron": "Megatron (indexed dataset .bin/.idx)",
}


class CliError(Exception):
    """An expected failure (bad input, refused output): printed as one line, exit code 1."""


class UsageError(CliError):
    """A bad combination of arguments: printed with the usage hint, exit code 2."""


class Piece(NamedTuple):
    """A run of one document's text, in input order.

    ``text`` is None for a piece that only accounts for input bytes (skipped blank lines,
    file tails); ``ends`` marks the last piece of a document; ``nbytes`` is the input bytes
    it stands for (the progress bar's unit).
    """

    text: str | None
    ends: bool
    nbytes: int


# ----------------------------------------------------------------------------- splitting
def _is_ws(ch: str) -> bool:
    return ch.isspace()


def safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The last cut point in ``text[lo:hi]`` that leaves byte-level BPE pre-tokenization
    unchanged, or None when there is none.

    Preference: just after a lone ``\\n`` between two non-blank characters; then just
    before a lone space between two non-blank characters. At those points the GPT-2 and
    GPT-4/Llama-3 pre-tokenizer regexes split anyway (a lone newline is a pre-token of its
    own or ends a punctuation run; a space only ever prefixes the word after it), and a
    byte-level BPE never merges across pre-tokens, so tokenizing the pieces separately
    gives the ids of one call on the whole text. Anywhere else (inside a run without
    whitespace, e.g. a long URL or base64 blob) a cut can change the ids, so there is
    no fallback cut: see :func:`next_cut`.
    """
    n = len(text)
    hi = min(hi, n)
    lo = max(1, lo)
    for sep, cut_after in (("\n", 1), (" ", 0)):  # after a lone newline, else before a lone space
        i = hi
        while True:
            j = text.rfind(sep, lo, i)
            if j < 1:
                break
            if j + 1 < n and not _is_ws(text[j - 1]) and not _is_ws(text[j + 1]):
                return j + cut_after
            i = j
    return None


_CUT_RE = re.compile("[\n ]")


def next_cut(text: str, start: int) -> int | None:
    """The first :func:`safe_cut` point at or after ``start`` (a cut just after a lone
    newline at ``start - 1`` included), or None when ``text`` has none there (the
    character after a candidate must be in ``text`` to tell whether it is one)."""
    n = len(text)
    for m in _CUT_RE.finditer(text, max(1, start - 1)):
        j = m.start()
        if j < 1 or j + 1 >= n or _is_ws(text[j - 1]) or _is_ws(text[j + 1]):
            continue
        cut = j + 1 if text[j] == "\n" else j
        if cut >= start:
            return cut
    return None


def choose_cut(text: str, pos: int, limit: int) -> int | None:
    """Where the piece starting at ``pos`` ends (``len(text) - pos > limit``): the last
    safe cut in the second half of the ``limit`` window, else in its first half, else the
    first safe cut after the window (a run without one is kept whole); None when ``text``
    has no safe cut after ``pos``."""
    cut = safe_cut(text, pos + max(1, limit // 2), pos + limit)
    if cut is None or cut <= pos:
        cut = safe_cut(text, pos + 1, pos + limit)
    if cut is None or cut <= pos:
        cut = next_cut(text, pos + limit)
    return cut


def split_text(text: str, limit: int | None = None) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters (default ``PIECE_CHARS``)
    at :func:`safe_cut` points; ``"".join`` of the result is ``text``. A piece is longer
    than ``limit`` only where ``text`` has no safe cut point within ``limit`` characters
    (it then ends at the next one, or at the end of ``text``)."""
    limit = PIECE_CHARS if limit is None else limit
    if len(text) <= limit:
        return [text]
    out = []
    pos = 0
    while len(text) - pos > limit:
        cut = choose_cut(text, pos, limit)
        if cut is None:
            break
        out.append(text[pos:cut])
        pos = cut
    out.append(text[pos:])
    return out


def _doc_pieces(text: str, nbytes: int, limit: int) -> Iterator[Piece]:
    parts = split_text(text, limit)
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        yield Piece(part, last, nbytes if last else 0)


# ----------------------------------------------------------------------------- inputs
def _not_utf8(where: str, exc: UnicodeDecodeError, base: int = 0) -> CliError:
    return CliError(f"{where}: not UTF-8 text (byte {base + exc.start}: {exc.reason}); "
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
                yield from _doc_pieces(line.rstrip("\r\n"), pending + len(raw), limit)
                pending = 0
                continue
            if blank:
                if para:
                    yield from _doc_pieces("".join(para).rstrip("\r\n"), para_bytes, limit)
                    para, para_bytes = [], 0
                pending += len(raw)
                continue
            para.append(line)
            para_bytes += len(raw) + pending
            pending = 0
    if para:
        yield from _doc_pieces("".join(para).rstrip("\r\n"), para_bytes, limit)
    if pending:
        yield Piece(None, False, pending)


def _record_text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CliError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
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
                raise CliError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                depth = max(raw.count(b"["), raw.count(b"{"))
                raise CliError(f"{where}: JSON nested too deeply (up to {depth} brackets; Python's json reads "
                               f"about {sys.getrecursionlimit()} levels): llmio pack needs one object per line "
                               "with a string field") from None
            if not isinstance(obj, dict):
                raise CliError(f"{where}: a JSON {type(obj).__name__}, not an object")
            if field not in obj:
                keys = ", ".join(list(obj)[:8])
                raise CliError(f"{where}: no field {field!r} (fields: {keys}; choose one with --field)")
            text = _record_text(obj[field], where, field)
            if b"\\u" in raw:  # a \ud800-style escape decodes to a lone surrogate, which is not text
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise CliError(f"{where}: field {field!r} has a lone surrogate {text[exc.start]!r} at "
                                   f"character {exc.start} (a broken \\u escape)") from None
            yield from _doc_pieces(text, pending + len(raw), limit)
            pending = 0
    if pending:
        yield Piece(None, False, pending)


def _parquet_pieces(path: str, field: str, limit: int) -> Iterator[Piece]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CliError("reading .parquet needs pyarrow: pip install 'llmio-native[pack]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CliError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise CliError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}; choose one with --field)")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))):
        raise CliError(f"{path}: column {field!r} has type {typ}, not string")
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
            yield from _doc_pieces(value or "", nb, limit)
    if size > reported:
        yield Piece(None, False, size - reported)


def input_format(path: str, forced: str = "auto") -> str:
    """The reader for ``path``: ``forced`` unless "auto"; else by suffix: ``.jsonl``,
    ``.ndjson``, ``.json`` → jsonl; ``.parquet``, ``.pq`` → parquet; anything else → txt."""
    if forced != "auto":
        return forced
    low = path.lower()
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    return "txt"


def iter_pieces(inputs: Sequence[str], field: str = "text", doc_sep: str = "file",
                forced_format: str = "auto", piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """Every document of every input, in input order, as :class:`Piece` runs of at most
    ``piece_chars`` characters (cut by :func:`safe_cut`).

    Raises:
        CliError: an input is missing, not UTF-8, a bad JSONL line (named ``file:line``),
            a Parquet file without the column.
    """
    for path in inputs:
        if not os.path.isfile(path):
            raise CliError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
        fmt = input_format(path, forced_format)
        if fmt == "jsonl":
            yield from _jsonl_pieces(path, field, piece_chars)
        elif fmt == "parquet":
            yield from _parquet_pieces(path, field, piece_chars)
        elif doc_sep == "file":
            yield from _txt_file_pieces(path, piece_chars)
        else:
            yield from _txt_line_pieces(path, doc_sep, piece_chars)


def _batches(pieces: Iterable[Piece], batch_chars: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for p in pieces:
        batch.append(p)
        size += len(p.text) if p.text else 0
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- tokenizers
def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CliError("llmio pack needs the tokenizers package: pip install 'llmio-native[pack]'") from None
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such tokenizer file" if not os.path.exists(path) else
                       f"{path}: not a file (--tokenizer wants a tokenizer.json file)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise CliError(f"{path}: not a Hugging Face tokenizers file ({str(exc).splitlines()[0]})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str, show_progress: bool = False) -> Any:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, the 256
    byte symbols, special token ``<|endoftext|>``) on ``texts`` and save it to ``out_path``.

    Args:
        texts: training text, e.g. the ``text`` of :func:`iter_pieces`.
        vocab_size: final vocabulary size, special token and byte alphabet included (>= 257).
        out_path: where to write the ``tokenizer.json``.
        show_progress: the tokenizers trainer's own progress bar.

    Returns:
        The trained ``tokenizers.Tokenizer``.

    Raises:
        CliError: tokenizers is not installed; ``out_path`` cannot be written (names it).
        CliError: (from ``texts``) a bad input, as :func:`iter_pieces` raises.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise CliError("--train-bpe needs the tokenizers package: pip install 'llmio-native[pack]'") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    try:
        tok.save(out_path)
    except Exception as exc:  # tokenizers raises a bare Exception for I/O errors
        raise CliError(f"{out_path}: cannot save the trained tokenizer ({str(exc).splitlines()[0]}); "
                       "a temp directory is on a full or read-only disk? set TMPDIR") from None
    return tok


_EXACT_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Replace", "BertNormalizer",
                      "Nmt", "Sequence"}
_CUT_PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
              "It's 2024; we've 3.14 reasons -- don't we? Ça va, 東京!\tTabs\r\nand  two  spaces.\n" * 8)


def _kinds(node: Any) -> list[str]:
    if node is None:
        return []
    if isinstance(node, dict):
        out = [str(node.get("type"))] if "type" in node else []
        for v in node.values():
            out += _kinds(v)
        return out
    if isinstance(node, list):
        return [k for v in node for k in _kinds(v)]
    return []


def cuts_are_exact(tok: Any) -> bool:
    """Whether tokenizing a document in pieces cut by :func:`safe_cut` gives the ids of one
    call on the whole document, for this tokenizer.

    True for byte-level BPE tokenizers (GPT-2, GPT-4 style, Llama 3, the ``--train-bpe``
    ones): a ByteLevel pre-tokenizer without prefix space, no Metaspace, only local
    normalizers; and checked on a probe text. False for SentencePiece-style tokenizers
    (Metaspace, a prepended "▁"), which mark the start of every call.
    """
    spec = json.loads(tok.to_str())
    norm = _kinds(spec.get("normalizer"))
    pre_node = spec.get("pre_tokenizer")
    pre = _kinds(pre_node)
    if any(k not in _EXACT_NORMALIZERS for k in norm) or "ByteLevel" not in pre or "Metaspace" in pre:
        return False
    if '"add_prefix_space": true' in json.dumps(pre_node):
        return False
    whole = tok.encode(_CUT_PROBE, add_special_tokens=False).ids
    parts = split_text(_CUT_PROBE, 40)
    cut = [i for e in tok.encode_batch(parts, add_special_tokens=False) for i in e.ids]
    return cut == whole


def _vocab_bound(tok: Any) -> int:
    """One past the largest id the tokenizer can produce."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(max(ids, default=-1) + 1, tok.get_vocab_size(with_added_tokens=True))


def _cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# A tokenizer worker: a plain `python -c` child that imports only numpy and tokenizers
# (importing llmio_native would import torch: 150 MB and 1.5 s per process) and runs no
# code of the parent's __main__ (multiprocessing's spawn and forkserver do both).
# Protocol on its stdin/stdout, little-endian: the parent sends u64 n + the tokenizer
# JSON once; then per task u64 count, count x u64 byte lengths, the UTF-8 texts back to
# back. The worker answers count x u64 id counts, then the ids as u32, back to back.
_WORKER_SOURCE = r"""
import signal, sys
if sys.path and sys.path[0] == "":
    del sys.path[0]  # no module of the working directory shadows numpy or tokenizers
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, kill of the process group: the
    signal.signal(sig, signal.SIG_IGN)  # parent's to handle (it kills us; EOF on stdin ends us too)
import numpy as np
from tokenizers import Tokenizer
inp, out = sys.stdin.buffer, sys.stdout.buffer
def read(n):
    b = inp.read(n)
    if len(b) != n:
        sys.exit(0)
    return b
tok = Tokenizer.from_str(read(int.from_bytes(read(8), "little")).decode("utf-8"))
while True:
    count = int.from_bytes(read(8), "little")
    lens = np.frombuffer(read(8 * count), dtype="<u8").tolist()
    blob = read(sum(lens))
    texts, pos = [], 0
    for n in lens:
        texts.append(blob[pos:pos + n].decode("utf-8"))
        pos += n
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    counts = np.array([len(x) for x in ids], dtype="<u8")
    flat = np.fromiter((i for x in ids for i in x), dtype="<u4", count=int(counts.sum()))
    out.write(counts.tobytes())
    out.write(flat.tobytes())
    out.flush()
"""


class _Worker:
    """One tokenizer worker process; :meth:`encode` is one request and its answer."""

    def __init__(self, threads: int) -> None:
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        if threads == 1:
            env["TOKENIZERS_PARALLELISM"] = "false"
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_SOURCE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)

    def start(self, tokenizer_json: bytes) -> None:
        """Hand the worker its tokenizer (waits while the worker still imports)."""
        self._send(len(tokenizer_json).to_bytes(8, "little") + tokenizer_json)

    def _send(self, data: bytes) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _recv(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        b = self.proc.stdout.read(n)
        if len(b) != n:
            self._died()
        return b

    def _died(self) -> None:
        code = self.proc.wait()
        raise CliError(f"a tokenizer worker process exited with status {code} "
                       "(its error is above; out of memory? try fewer --num-workers)")

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        blobs = [t.encode("utf-8") for t in texts]
        lens = np.array([len(b) for b in blobs], dtype="<u8")
        self._send(len(blobs).to_bytes(8, "little") + lens.tobytes() + b"".join(blobs))
        counts = np.frombuffer(self._recv(8 * len(blobs)), dtype="<u8").astype(np.int64)
        flat = np.frombuffer(self._recv(4 * int(counts.sum())), dtype="<u4")
        return np.split(flat, np.cumsum(counts)[:-1])

    def close(self, kill: bool = False) -> None:
        """End the worker: EOF on its stdin when idle, SIGKILL when ``kill`` (mid-request)."""
        if kill:
            self.proc.kill()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def release(self) -> None:
        """Close the parent's end of the answer pipe (after no thread reads it any more)."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _fit(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if ids.size and int(ids.max()) > np.iinfo(dtype).max:
        raise CliError(f"token id {int(ids.max())} does not fit {dtype.name}: use --dtype uint32")
    return ids.astype(dtype)


def encode_batches(tok: Any, batches: Iterable[list[Piece]], dtype: np.dtype,
                   num_workers: int) -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
    """Tokenize batches of pieces, yielding ``(batch, ids per piece with text)`` in input order.

    ``num_workers == 1`` runs ``encode_batch`` in this process (parallel over the batch
    in Rust, on all cores); more starts that many worker processes (``python -c``, each
    with ``cpus // num_workers`` tokenizer threads), at most ``2 * num_workers`` batches in
    flight. The ids are the same either way: each piece is tokenized on its own.

    Raises:
        CliError: an id does not fit ``dtype``; a worker process died.
    """
    if num_workers <= 1:
        for batch in batches:
            texts = [p.text for p in batch if p.text is not None]
            encs = tok.encode_batch(texts, add_special_tokens=False) if texts else []
            yield batch, [_fit(np.array(e.ids, dtype=np.int64), dtype) for e in encs]
        return
    threads = max(1, _cpus() // num_workers)
    spec = tok.to_str().encode("utf-8")
    workers: list[_Worker] = []
    idle: queue.SimpleQueue = queue.SimpleQueue()

    def run(texts: list[str]) -> list[np.ndarray]:
        wk = idle.get()
        try:
            return wk.encode(texts)
        finally:
            idle.put(wk)

    pool = cf.ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="llmio-tokenize")
    inflight: collections.deque = collections.deque()
    busy = True

    def oldest() -> tuple[list[Piece], list[np.ndarray]]:
        batch, fut = inflight.popleft()
        return batch, [] if fut is None else [_fit(ids, dtype) for ids in fut.result()]

    try:
        for _ in range(num_workers):  # all start importing at once
            workers.append(_Worker(threads))
        for wk in workers:
            wk.start(spec)
            idle.put(wk)
        for batch in batches:
            texts = [p.text for p in batch if p.text is not None]
            inflight.append((batch, pool.submit(run, texts) if texts else None))
            while len(inflight) >= 2 * num_workers:
                yield oldest()
        while inflight:
            yield oldest()
        busy = False
    finally:
        # stopped early (an error, Ctrl-C): the answers are not wanted, the workers are killed
        for _, fut in inflight:
            if fut is not None:
                fut.cancel()
        for wk in workers:  # a thread waiting on a killed worker's answer sees EOF and ends
            wk.close(kill=busy)
        pool.shutdown(wait=True)
        for wk in workers:
            wk.release()


# ----------------------------------------------------------------------------- pack
def write_documents(writer: Any, encoded: Iterable[tuple[list[Piece], list[np.ndarray]]],
                    eot: np.ndarray, progress: Callable[[int], Any] = lambda n: None) -> None:
    """Join the pieces' ids into documents, append ``eot`` (an array of 0 or 1 ids) to each
    and add them to ``writer`` in order; ``progress(nbytes)`` after every piece."""
    parts: list[np.ndarray] = []
    for batch, ids in encoded:
        k = 0
        for piece in batch:
            if piece.text is not None:
                parts.append(ids[k])
                k += 1
                if piece.ends:
                    if eot.size:
                        parts.append(eot)
                    writer.add_document(parts[0] if len(parts) == 1 else np.concatenate(parts))
                    parts = []
            progress(piece.nbytes)


def _dataset_state(out: str) -> tuple[bool, list[str]]:
    """(has manifest.json, writer files of an unfinished dataset) in directory ``out``."""
    from .dataset import format as F

    if not os.path.isdir(out):
        return False, []
    names = os.listdir(out)
    partial = [n for n in names if (n.startswith(F.SHARD_PREFIX) and
                                    (n.endswith(F.SHARD_SUFFIX) or n.endswith(F.DOCS_SPILL_SUFFIX)))
               or n == F.MANIFEST_TMP_NAME]
    return F.MANIFEST_NAME in names, partial


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"{out}: exists and is not a directory")
    has_manifest, partial = _dataset_state(out)
    if overwrite:
        return
    if has_manifest:
        raise CliError(f"{out} already holds a dataset (manifest.json); pass --overwrite to replace it")
    if partial:
        raise CliError(f"{out} holds an incomplete dataset ({len(partial)} shard/temp file(s), no manifest.json: "
                       "an earlier pack did not finish); resuming is not supported: pass --overwrite to start over")


def _remove_partial(out: str, created: bool, own_tokenizer: bool) -> None:
    """Remove what an aborted pack left in ``out`` (its own files only): shards and temp
    files when there is no manifest, ``tokenizer.json`` when ``own_tokenizer`` (the pack
    put it there), the directory itself when ``created`` and empty."""
    try:
        has_manifest, partial = _dataset_state(out)
        if has_manifest:
            return
        for n in partial:
            os.unlink(os.path.join(out, n))
        tok = os.path.join(out, "tokenizer.json")
        if own_tokenizer and os.path.exists(tok):
            os.unlink(tok)
    except OSError:
        pass
    _remove_if_empty(out, created)


def _remove_if_empty(out: str, created: bool) -> None:
    if created:
        try:
            if not os.listdir(out):
                os.rmdir(out)
        except OSError:
            pass


def _lock_output(out: str) -> tuple[int | None, bool]:
    """Create directory ``out`` if needed and take an exclusive ``flock`` on it, so that
    two packs cannot write into one directory at once.

    Returns:
        ``(fd, created)``: the descriptor holding the lock (close it to release; None where
        the file system has no locks, after a note on stderr) and whether this call created
        the directory.

    Raises:
        CliError: ``out`` is a file, or another pack holds the lock.
        OSError: ``out`` cannot be created or opened (names the path).
    """
    import errno
    import fcntl

    for _ in range(10):
        if os.path.exists(out) and not os.path.isdir(out):
            raise CliError(f"{out}: exists and is not a directory (--output must be a directory)")
        created = False
        try:
            os.makedirs(out)
            created = True
        except FileExistsError:
            pass
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CliError(f"{out}: another llmio pack is writing to this directory (it is locked); wait for it "
                           "to finish or choose another --output") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise
            os.close(fd)
            print(f"llmio: note: {out}: cannot lock this directory ({exc.strerror}); make sure no other pack "
                  "writes to it", file=sys.stderr)
            return None, created
        try:
            st, fst = os.stat(out), os.fstat(fd)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            return fd, created
        os.close(fd)  # removed (a failed pack cleaning up) between makedirs and flock: again
    raise CliError(f"{out}: the directory keeps disappearing while llmio pack tries to lock it")


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived during ``llmio pack``: unwinds like ``KeyboardInterrupt``
    so that the pack removes its partial output and temp files; ``main`` returns
    128 + ``signum`` (143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: While > 0, a stop signal is only recorded (in ``_STOP_PENDING``), not raised: see :func:`_signals_held`.
_STOP_HELD = [0]
_STOP_PENDING: list[int] = []


@contextlib.contextmanager
def _stop_signals_unwind() -> Iterator[None]:
    """While active (main thread only), the first SIGTERM or SIGHUP raises
    :class:`Terminated`; later ones are ignored so that the cleanup it starts is not cut
    short. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if _STOP_HELD[0]:
            _STOP_PENDING.append(signum)
            return
        raise Terminated(signum)

    old = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    _STOP_PENDING.clear()
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Cleanup that a stop signal must not cut short: one arriving inside is raised as
    :class:`Terminated` when the block ends (unless the block raises)."""
    _STOP_HELD[0] += 1
    try:
        yield
    finally:
        _STOP_HELD[0] -= 1
    if not _STOP_HELD[0] and _STOP_PENDING:
        raise Terminated(_STOP_PENDING.pop())


def _write_error(exc: BaseException, out: str) -> CliError | None:
    """A CliError naming ``out`` for a writing error that names no file (ENOSPC, EIO, ...
    raised by the writer, or its RuntimeError wrapping one); None for other errors."""
    err = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, RuntimeError) else None
    if not isinstance(err, OSError) or err.filename or not err.errno:
        return None
    return CliError(f"{out}: writing the dataset failed: {err.strerror or os.strerror(err.errno)} "
                    f"[errno {err.errno}]")


def _auto_workers(total_bytes: int) -> int:
    # Workers overlap tokenizing with this process's reading and writing and take the
    # ids' conversion off it (on 2 shared cores: 1.05-1.15x faster than encode_batch in
    # this process on 22 MB; not measured on many cores). This process keeps a core.
    cpus = _cpus()
    if total_bytes < AUTO_WORKERS_MIN_BYTES or cpus < 2:
        return 1
    return max(2, min(cpus - 1, AUTO_WORKERS_MAX))


def cmd_pack(a: argparse.Namespace) -> int:
    """``llmio pack``: tokenize the inputs and write a token dataset to ``a.output``.

    The output directory is locked (``flock``) before anything is written; SIGTERM and
    SIGHUP, like Ctrl-C, stop the pack and remove what it wrote.

    Raises:
        CliError: a missing or unreadable input, an output that is a file or locked by
            another pack or holds a dataset (without ``--overwrite``), a bad input line,
            an id that does not fit the dtype, a write error (naming the output).
        UsageError: an empty ``--output``.
        Terminated: SIGTERM or SIGHUP.
    """
    if not a.output.strip():
        raise UsageError(f"-o/--output is {a.output!r}: name the dataset directory to write")
    out = os.path.abspath(a.output)
    for p in a.inputs:
        if not os.path.isfile(p):
            raise CliError(f"{p}: no such file" if not os.path.exists(p) else f"{p}: not a file")
        if os.path.abspath(p) == out:
            raise CliError(f"{p}: an input cannot be the --output")
    for p in a.inputs:
        if input_format(p, a.input_format) == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise CliError("reading .parquet needs pyarrow: pip install 'llmio-native[pack]'") from None
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"{out}: exists and is not a directory (--output must be a directory)")
    total = sum(os.path.getsize(p) for p in a.inputs)
    with _stop_signals_unwind():
        fd, created = _lock_output(out)
        own_tokenizer = not os.path.exists(os.path.join(out, "tokenizer.json"))
        try:
            _check_output(out, a.overwrite)
            return _pack_locked(a, out, total, created, own_tokenizer)
        finally:
            with _signals_held():
                _remove_if_empty(out, created)
                if fd is not None:
                    os.close(fd)


def _pack_locked(a: argparse.Namespace, out: str, total: int, created: bool, own_tokenizer: bool) -> int:
    import llmio_native as lio

    show = not a.quiet and sys.stderr.isatty()
    workers = a.num_workers or _auto_workers(total)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmio_pack_") as tmp:
        if a.train_bpe is not None:
            tok_path = os.path.join(tmp, "tokenizer.json")
            texts = (p.text for p in iter_pieces(a.inputs, a.field, a.doc_sep, a.input_format) if p.text)
            tok = train_bpe(texts, a.train_bpe, tok_path, show_progress=show)
        else:
            tok_path = a.tokenizer
            tok = _load_tokenizer(tok_path)
        vocab = _vocab_bound(tok)
        dtype = np.dtype(a.dtype if a.dtype != "auto" else ("uint16" if vocab <= 65536 else "uint32"))
        eot: int | None = None
        if not a.no_eot:
            eot = a.eot_id if a.eot_id is not None else tok.token_to_id(EOT)
            if eot is None:
                raise CliError(f"the tokenizer has no {EOT!r} token: pass --eot-id ID (or --no-eot)")
            if eot > np.iinfo(dtype).max:
                raise CliError(f"end-of-text id {eot} does not fit {dtype.name} (0..{np.iinfo(dtype).max})"
                               + (": use --dtype uint32" if dtype != np.uint32 else ""))
        eot_arr = np.array([eot] if eot is not None else [], dtype=dtype)
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pack",
                   disable=not show, dynamic_ncols=True)
        meta = {"inputs": [os.path.basename(p) for p in a.inputs], "vocab_size": vocab,
                "tokenizer_source": "trained BPE" if a.train_bpe is not None else os.path.basename(tok_path),
                "doc_sep": a.doc_sep, "field": a.field}
        w = None
        try:
            w = lio.DatasetWriter(out, dtype=dtype.name, codec=a.codec, chunk_tokens=a.chunk_tokens,
                                  shard_tokens=a.shard_tokens, eot_token=eot, zstd_level=a.zstd_level,
                                  rans_model_tokens=a.rans_model_tokens, overwrite=a.overwrite,
                                  tokenizer=tok_path, metadata=meta)
            exact = cuts_are_exact(tok)
            cuts = [0]

            def counted(it: Iterator[Piece]) -> Iterator[Piece]:
                for piece in it:
                    cuts[0] += piece.text is not None and not piece.ends
                    yield piece

            pieces = counted(iter_pieces(a.inputs, a.field, a.doc_sep, a.input_format,
                                         PIECE_CHARS if exact else LONG_PIECE_CHARS))
            bsize = BATCH_CHARS if workers <= 1 else WORKER_BATCH_CHARS
            with contextlib.closing(encode_batches(tok, _batches(pieces, bsize), dtype, workers)) as stream:
                write_documents(w, stream, eot_arr, bar.update)
            w.close()
        except BaseException as exc:
            if w is not None:
                with _signals_held():
                    w.abort()
                    _remove_partial(out, created, own_tokenizer)
            named = _write_error(exc, out) if w is not None else None
            if named is not None:
                raise named from None
            raise
        finally:
            bar.close()
    secs = time.perf_counter() - t0
    if not exact and cuts[0]:
        print(f"llmio: note: {cuts[0]} cut(s) in documents longer than {LONG_PIECE_CHARS >> 20} Mi characters: "
              "this tokenizer marks the start of every call (Metaspace / prefix space), so its ids near "
              "those cuts can differ from tokenizing the whole document", file=sys.stderr)
    if not a.quiet:
        ds = lio.open_dataset(out)
        ratio = ds.num_tokens * ds.token_bytes / max(1, ds.stored_bytes)
        print(f"packed {ds.num_documents} documents, {ds.num_tokens} tokens ({ds.dtype.name}, {ds.codec}, "
              f"ratio {ratio:.2f}, {len(ds.paths)} shard(s)) into {out} in {secs:.1f} s "
              f"({total / max(secs, 1e-9) / 1e6:.1f} MB/s of input)")
    return 0


# ----------------------------------------------------------------------------- inspect
def _add_counts(counts: np.ndarray, block: np.ndarray) -> np.ndarray:
    bc = np.bincount(block)
    if bc.size > counts.size:
        bc[: counts.size] += counts
        return bc
    counts[: bc.size] += bc
    return counts


def token_histogram(ds: Any, sample: int | None = None) -> tuple[dict[int, int] | np.ndarray, int]:
    """Count token ids of ``ds`` with bounded memory (``HIST_BLOCK_TOKENS`` at a time).

    Args:
        ds: a dataset from :func:`llmio_native.open_dataset`.
        sample: scan at most this many tokens, in ``SAMPLE_WINDOW_TOKENS`` windows spread
            evenly over the dataset; None scans everything.

    Returns:
        ``(counts, tokens_scanned)``: ``counts`` is a dense array indexed by id, or a dict
        when ids exceed ``DENSE_HIST_MAX_ID``.
    """
    n = int(ds.num_tokens)
    if sample is None or sample >= n:
        spans = [(s, min(HIST_BLOCK_TOKENS, n - s)) for s in range(0, n, HIST_BLOCK_TOKENS)]
    else:
        w = min(SAMPLE_WINDOW_TOKENS, sample)
        k = -(-sample // w)
        starts = [i * (n - w) // max(1, k - 1) for i in range(k)] if k > 1 else [0]
        spans = [(s, min(w, sample - i * w)) for i, s in enumerate(starts)]
    counts: Any = np.zeros(1, dtype=np.int64)
    sparse: dict[int, int] | None = None
    scanned = 0
    for start, count in spans:
        block = ds.read(start, count)
        scanned += int(block.size)
        if not block.size:
            continue
        if sparse is None and int(block.max()) > DENSE_HIST_MAX_ID:
            sparse = {int(i): int(c) for i, c in enumerate(counts) if c}
        if sparse is None:
            counts = _add_counts(counts, block)
        else:
            ids, cs = np.unique(block, return_counts=True)
            for i, c in zip(ids.tolist(), cs.tolist()):
                sparse[i] = sparse.get(i, 0) + c
    return (sparse if sparse is not None else counts), scanned


def _top(counts: dict[int, int] | np.ndarray, k: int) -> list[tuple[int, int]]:
    if isinstance(counts, dict):
        return sorted(counts.items(), key=lambda t: (-t[1], t[0]))[:k]
    order = np.lexsort((np.arange(counts.size), -counts))[:k]  # count desc, id asc
    return [(int(i), int(counts[i])) for i in order if counts[i] > 0]


def _disk_bytes(ds: Any) -> int:
    files = list(ds.paths)
    if ds.format == "llmio":
        files.append(os.path.join(ds.path, "manifest.json"))
    elif ds.format == "megatron":
        files += [p[: -len(".bin")] + ".idx" for p in ds.paths if p.endswith(".bin")]
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))


def rans_models(ds: Any) -> dict[str, Any] | None:
    """The frequency models of a dataset's rans chunks, summed up; None without rans chunks.

    Keys: models (distinct model regions), model_bytes (their bytes in the shards: header +
    zstd frame, padding not counted), rans_chunks, rans_tokens, max_symbols (the most ids a
    model ranks), bits_per_token (stored bits of the rans chunks per token they hold, models
    not counted). Every model is read, checked and parsed.

    Raises:
        FormatError, ChecksumError: a damaged model region; OSError.
    """
    from .dataset import format as F

    ch = ds.chunks
    if not len(ch) or "model" not in (ch.dtype.names or ()):
        return None
    sel = np.flatnonzero(ch["codec"] == F.CODEC_RANS)
    if not len(sel):
        return None
    keys = np.stack([ch["file"][sel].astype(np.int64), ch["model"][sel].astype(np.int64)], axis=1)
    uniq, first = np.unique(keys, axis=0, return_index=True)
    nbytes = max_symbols = 0
    for k, (f, off) in enumerate(uniq.tolist()):
        model = ds.model_of(int(sel[first[k]]))
        head = ds.reader.read(int(f), int(off), F.MODEL_HEADER_BYTES)
        nbytes += F.model_region_size(head, ds.paths[int(f)], int(off))
        max_symbols = max(max_symbols, int(model.num_symbols))
    ntok = int(ch["token_count"][sel].sum())
    return {"models": int(len(uniq)), "model_bytes": int(nbytes), "rans_chunks": int(len(sel)), "rans_tokens": ntok,
            "max_symbols": max_symbols, "bits_per_token": 8 * int(ch["stored_bytes"][sel].sum()) / max(1, ntok)}


def inspect_dataset(path: str, dtype: str | None = None, sample: int | None = None, top: int = 10) -> dict[str, Any]:
    """What ``llmio inspect`` reports about ``path``, as a JSON-serialisable dict.

    Keys: path, format, format_name, num_tokens, num_documents (None where the format
    records no boundaries), dtype, codec, chunk_codecs (chunks per codec id name), rans
    (None, or the rans models as :func:`rans_models` sums them up), files,
    chunks, bytes_on_disk (data files and manifest or index), stored_bytes (token data as
    stored), decoded_bytes, ratio (decoded / stored), eot_token, tokenizer, tokens_scanned,
    distinct_ids (in the scan), top_tokens (``top`` rows of id, count, share of the scan,
    token string where the dataset has a tokenizer).

    Raises:
        As :func:`llmio_native.open_dataset` and ``read`` (FormatError, ChecksumError, OSError).
    """
    import llmio_native as lio
    from .dataset import CODEC_IDS

    ds = lio.open_dataset(path, dtype=dtype)
    names = {v: k for k, v in CODEC_IDS.items()}
    chunk_codecs: dict[str, int] = {}
    if len(ds.chunks):
        ids, cs = np.unique(ds.chunks["codec"], return_counts=True)
        chunk_codecs = {names.get(int(i), str(int(i))): int(c) for i, c in zip(ids, cs)}
    stored = int(ds.stored_bytes)
    decoded = int(ds.num_tokens) * ds.token_bytes
    rans = rans_models(ds)
    counts, scanned = token_histogram(ds, sample)
    rows = _top(counts, top)
    decode: Callable[[int], str | None] = lambda i: None
    if getattr(ds, "tokenizer_path", None):
        try:
            from tokenizers import Tokenizer

            tk = Tokenizer.from_file(ds.tokenizer_path)
            decode = tk.id_to_token
        except Exception:  # the histogram does not need token strings
            pass
    distinct = len(counts) if isinstance(counts, dict) else int(np.count_nonzero(counts))
    return {
        "path": os.path.abspath(path),
        "format": ds.format,
        "format_name": FORMAT_NAMES.get(ds.format, ds.format),
        "num_tokens": int(ds.num_tokens),
        "num_documents": int(ds.num_documents) if ds.document_ends is not None else None,
        "dtype": ds.dtype.name,
        "codec": ds.codec,
        "chunk_codecs": chunk_codecs,
        "rans": rans,
        "files": len(ds.paths),
        "chunks": int(len(ds.chunks)),
        "bytes_on_disk": _disk_bytes(ds),
        "stored_bytes": stored,
        "decoded_bytes": decoded,
        "ratio": decoded / stored if stored else None,
        "has_checksums": bool(ds.has_checksums),
        "eot_token": ds.eot_token,
        "tokenizer": ds.tokenizer_path,
        "tokens_scanned": scanned,
        "sampled": scanned < int(ds.num_tokens),
        "distinct_ids": distinct,
        "top_tokens": [{"id": i, "count": c, "share": c / max(1, scanned), "token": decode(i)} for i, c in rows],
    }


def _fmt_int(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


@contextlib.contextmanager
def _cli_dtype_hint() -> Iterator[None]:
    """Errors of ``open_dataset`` that name its ``dtype=`` argument name ``--dtype`` instead."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        if "dtype='uint16' or 'uint32'" not in msg:
            raise
        raise CliError(msg.replace("dtype='uint16' or 'uint32'", "--dtype uint16 or --dtype uint32")) from None


def cmd_inspect(a: argparse.Namespace) -> int:
    """``llmio inspect``: print what :func:`inspect_dataset` finds."""
    with _cli_dtype_hint():
        r = inspect_dataset(a.path, a.dtype, a.sample)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    docs = _fmt_int(r["num_documents"]) if r["num_documents"] is not None else "n/a (format records no boundaries)"
    codec = r["codec"] + (" (" + ", ".join(f"{c} {k}" for k, c in r["chunk_codecs"].items()) + " chunks)"
                          if r["chunk_codecs"] else "")
    ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f} (decoded / stored bytes)"
    rows = [
        ("path", r["path"]),
        ("format", r["format_name"]),
        ("tokens", _fmt_int(r["num_tokens"])),
        ("documents", docs),
        ("dtype", r["dtype"]),
        ("codec", codec),
        *([("rans models", f"{r['rans']['models']} ({_fmt_int(r['rans']['model_bytes'])} bytes, up to "
                           f"{_fmt_int(r['rans']['max_symbols'])} ranked ids, "
                           f"rans chunks {r['rans']['bits_per_token']:.3f} bits/token)")]
          if r["rans"] else []),
        ("shards" if r["format"] == "llmio" else "files", str(r["files"])),
        ("chunks", _fmt_int(r["chunks"])),
        ("bytes on disk", _fmt_int(r["bytes_on_disk"])),
        ("stored bytes", _fmt_int(r["stored_bytes"])),
        ("decoded bytes", _fmt_int(r["decoded_bytes"])),
        ("ratio", ratio),
        ("checksums", "yes" if r["has_checksums"] else "no (format has none)"),
        ("eot token", "none" if r["eot_token"] is None else str(r["eot_token"])),
        ("tokenizer", r["tokenizer"] or "none"),
        ("scanned", f"{_fmt_int(r['tokens_scanned'])} tokens{' (sample)' if r['sampled'] else ''}, "
                    f"{_fmt_int(r['distinct_ids'])} distinct ids"),
    ]
    for k, v in rows:
        print(f"{k:<14} {v}")
    print(f"top {len(r['top_tokens'])} ids:")
    print(f"  {'id':>10} {'count':>14} {'share':>8}  token")
    for t in r["top_tokens"]:
        tokstr = "" if t["token"] is None else repr(t["token"])
        print(f"  {t['id']:>10} {t['count']:>14,} {100 * t['share']:>7.3f}%  {tokstr}")
    return 0


# ----------------------------------------------------------------------------- verify, info, bench
def cmd_verify(a: argparse.Namespace) -> int:
    """``llmio verify``: 0 when every chunk checks out, 1 with the bad chunks listed."""
    import llmio_native as lio

    with _cli_dtype_hint():
        ds = lio.open_dataset(a.path, dtype=a.dtype)
    rep = ds.verify(progress=not a.quiet and not a.json and sys.stderr.isatty())
    if a.json:
        print(json.dumps({"path": os.path.abspath(a.path), "ok": rep.ok, "chunks_checked": rep.chunks_checked,
                          "bytes_checked": rep.bytes_checked, "checksums": rep.checksums,
                          "seconds": rep.seconds, "bad_chunks": [b._asdict() for b in rep.bad_chunks]}, indent=1))
        return 0 if rep.ok else 1
    note = "" if rep.checksums else " (format has no checksums: readability and sizes only)"
    if rep.ok:
        if not a.quiet:
            print(f"ok: {rep.chunks_checked} chunks, {rep.bytes_checked:,} bytes verified in "
                  f"{rep.seconds:.2f} s: {a.path}{note}")
        return 0
    print(f"FAILED: {len(rep.bad_chunks)} problem(s) in {rep.chunks_checked} chunks of {a.path}{note}",
          file=sys.stderr)
    for b in rep.bad_chunks:
        where = "whole file" if b.chunk < 0 else f"chunk {b.chunk}"
        print(f"  {b.path}: {where} @ byte {b.offset}: {b.reason}", file=sys.stderr)
    return 1


def cmd_info(a: argparse.Namespace) -> int:
    """``llmio info``: ``llmio_native.info()`` as JSON."""
    import llmio_native as lio

    print(json.dumps(lio.info(), indent=1, default=str))
    return 0


def _bench_dir() -> Path:
    """The benchmarks folder of a checkout: ``$LLMIO_BENCH_DIR``, else the source tree this
    package runs from (an editable install), else ``./benchmarks`` (run from a checkout with
    the wheel installed)."""
    cands = [Path(os.environ["LLMIO_BENCH_DIR"])] if os.environ.get("LLMIO_BENCH_DIR") else []
    cands += [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    for d in cands:
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d
    return cands[0]


def cmd_bench(args: Sequence[str]) -> int:
    """``llmio bench [NAME] [ARGS...]``: run ``benchmarks/bench_NAME.py ARGS`` from the source
    tree (NAME defaults to ``read``); its exit status is ours."""
    d = _bench_dir()
    names = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py")) if d.is_dir() else []
    args = list(args)
    if args[:1] in (["-h"], ["--help"]) or not names:
        where = (f"benchmarks in {d}: {', '.join(names)}" if names else
                 "the benchmarks are part of the source tree, not the wheel: run llmio bench from "
                 "a checkout (or set LLMIO_BENCH_DIR to its benchmarks folder)")
        print(f"usage: llmio bench [NAME] [ARGS...]  (NAME defaults to read; ARGS go to the script, "
              f"e.g. llmio bench read --help)\n{where}")
        return 0 if names else 1
    name = "read"
    if args and not args[0].startswith("-"):
        name = args.pop(0)
    if name not in names:
        raise UsageError(f"no benchmark {name!r} (have: {', '.join(names)})")
    return subprocess.call([sys.executable, str(d / f"bench_{name}.py"), *args])


# ----------------------------------------------------------------------------- arguments
def _int_in(lo: int, hi: int | None = None, hi_text: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (``hi`` None: no upper bound);
    ``hi_text`` spells ``hi`` in the message (e.g. "2^24")."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi_text or hi}, got {v}")
        return v

    return parse


def _int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""
    return _int_in(lo)


_positive = _int_at_least(1)
#: Most ids ``--train-bpe`` may ask for. Real vocabularies stay below 2^18; the tokenizers
#: trainer allocates per requested id up front (2^24 ids: 0.3 GB peak on a small corpus;
#: 10^9 aborted it in its allocator).
MAX_TRAIN_VOCAB = 1 << 24
#: Most ``--chunk-tokens`` (the writer's limit for 4-byte tokens: a chunk is at most 1 GiB).
MAX_CHUNK_TOKENS = 1 << 28
#: Most ``--num-workers`` (each is a process with its own copy of the tokenizer).
MAX_WORKERS = 256
_ZSTD_LEVELS = (-(1 << 17), 22)


def _vocab(text: str) -> int:
    v = _int_in(1)(text)
    if v < 257:
        raise argparse.ArgumentTypeError(f"needs at least 257 (256 byte symbols + {EOT}), got {v}")
    if v > MAX_TRAIN_VOCAB:
        raise argparse.ArgumentTypeError(f"must be <= 2^24 = {MAX_TRAIN_VOCAB} ids, got {v}")
    return v


PACK_EPILOG = f"""\
inputs (read in the order given; documents are written in that order):
  *.txt and anything else   UTF-8 text; --doc-sep says where documents are:
                              file   the whole file is one document (default)
                              blank  paragraphs separated by blank lines
                              line   every non-blank line
  *.jsonl, *.ndjson, *.json one JSON object per line, text in --field (default "text");
                            a bad line fails the run naming file:line; null is an empty document
  *.parquet, *.pq           string column --field, streamed by row group; null is an empty document
  (--input-format forces one reader for every input)

tokenizer: --tokenizer FILE loads a Hugging Face tokenizers tokenizer.json; --train-bpe N
  trains a byte-level BPE of N ids (ByteLevel pre-tokenizer and decoder, special token
  {EOT}) on the inputs first; N is 257 (256 bytes + the special token) .. 2^24 (the
  trainer allocates per requested id; real vocabularies stay below 2^18), and a corpus
  with fewer pairs to merge yields fewer ids. Either way the tokenizer is saved as OUT/tokenizer.json.
  Special tokens of the tokenizer's post-processor (BOS etc.) are not added. Text is
  tokenized in pieces of {PIECE_CHARS >> 10} Ki characters (tokenizers is fastest on short texts), cut
  after a lone newline (else before a lone space) between non-blank characters, never
  inside a run without whitespace (a longer run is one piece): for byte-level BPE
  tokenizers (GPT-2, GPT-4 style, Llama 3, --train-bpe; checked at start) the ids equal
  those of one call on the whole document. Other tokenizers (SentencePiece
  style, Metaspace) get whole documents, cut only beyond {LONG_PIECE_CHARS >> 20} Mi characters (with a note).

output: every document gets the end-of-text id appended ({EOT}'s id, or --eot-id;
  --no-eot for none), recorded in the manifest as eot_token. dtype: uint16 when every id
  fits (vocabulary <= 65536), else uint32. Text spelling a special token (e.g. the
  literal string {EOT}) is encoded as that token, as tokenizers does. Tokenizing runs
  on all cores: encode_batch in this process, or --num-workers processes; the output is
  the same byte for byte either way.
  OUT holding a dataset, or an unfinished one (no manifest.json), is refused unless
  --overwrite (no resume); a failed or interrupted pack (Ctrl-C, SIGTERM, SIGHUP) removes
  the shards and temp files it wrote. OUT is locked (flock) while a pack writes it: a
  second pack into the same OUT fails at once.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (with a pointer to
    ``--help``) instead of the usage block; exit status 2 as usual."""

    def error(self, message: str) -> Any:  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llmio`` (subcommands pack, inspect, verify, info, bench)."""
    import llmio_native as lio

    ap = _Parser(prog="llmio", description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"llmio_native {lio.__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("pack", help="tokenize text / JSONL / Parquet into token shards",
                       description="Tokenize text, JSONL or Parquet files into an llmio token dataset.",
                       epilog=PACK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files, in order")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="dataset directory to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", metavar="FILE", help="a Hugging Face tokenizers tokenizer.json")
    g.add_argument("--train-bpe", type=_vocab, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE with this many ids (257 .. 2^24) on the inputs first; "
                        "a corpus with fewer distinct pairs to merge gives fewer")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column with the text (default: text)")
    p.add_argument("--doc-sep", choices=DOC_SEPS, default="file",
                   help="documents in text files: file (default), blank (blank-line separated), line")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="reader for every input (default: auto, by file suffix)")
    p.add_argument("--codec", choices=["zstd", "rans", "none"], default="zstd",
                   help="chunk codec (default: zstd, about 2x smaller for BPE ids; rans: a token entropy "
                        "coder, within a few %% of the order-0 entropy and decodable on the GPU; none: raw "
                        "tokens, for the fastest reads and the loader's global shuffle)")
    p.add_argument("--zstd-level", type=_int_in(*_ZSTD_LEVELS), default=3,
                   help="zstd level, -131072 .. 22, negative for the fast modes (default: 3)")
    p.add_argument("--rans-model-tokens", type=_positive, default=1 << 24, metavar="N",
                   help="rans: tokens per frequency model (one model per group of chunks; default: 2^24)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token dtype (default: auto, uint16 when the vocabulary fits)")
    p.add_argument("--chunk-tokens", type=_int_in(1, MAX_CHUNK_TOKENS, "2^28"), default=65536,
                   help="tokens per chunk, 1 .. 2^28 (default: 65536)")
    p.add_argument("--shard-tokens", type=_positive, default=1 << 30,
                   help="tokens per shard, at most; shards end at document boundaries (default: 2^30)")
    e = p.add_mutually_exclusive_group()
    e.add_argument("--eot-id", type=_int_in(0, (1 << 32) - 1, "2^32 - 1 (the uint32 range)"), metavar="ID",
                   help=f"end-of-text id appended to each document, 0 .. 2^32 - 1 (default: the tokenizer's {EOT})")
    e.add_argument("--no-eot", action="store_true", help="append no end-of-text token")
    p.add_argument("--num-workers", type=_int_in(0, MAX_WORKERS), default=0, metavar="N",
                   help="tokenizer processes: 1 = encode_batch in this process (on all cores), "
                        "N > 1 = N worker processes (at most 256), 0 = auto (1 below 16 MiB of input, else cores - 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset or an unfinished one in OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")

    for name, hlp in (("inspect", "counts, dtype, codec, ratio, token histogram"),
                      ("verify", "re-check every checksum; exit 1 listing bad chunks")):
        q = sub.add_parser(name, help=hlp, description=hlp)
        q.add_argument("path", help="dataset directory, nanoGPT or llm.c .bin, or Megatron prefix/.bin/.idx")
        q.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype of a raw nanoGPT .bin")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "inspect":
            q.add_argument("--sample", type=_positive, metavar="N",
                           help="histogram of N tokens read in 64Ki-token windows spread over the data "
                                "(default: all tokens)")
        else:
            q.add_argument("-q", "--quiet", action="store_true", help="no progress bar, nothing printed when ok")
    sub.add_parser("info", help="what this build can do here (JSON)", description="llmio_native.info() as JSON")
    sub.add_parser("bench", help="run benchmarks/bench_NAME.py from a source checkout (llmio bench --help)",
                   add_help=False)
    return ap


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror and str(exc.filename) not in exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmio`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 failure (one line on stderr), 2 usage error, 130 interrupted,
        143 / 129 terminated by SIGTERM / SIGHUP (pack cleans up first).
        Usage errors, ``--help`` and ``--version`` return too (no ``SystemExit``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        ap = build_parser()
        try:
            a = ap.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return {"pack": cmd_pack, "inspect": cmd_inspect, "verify": cmd_verify, "info": cmd_info}[a.cmd](a)
    except UsageError as exc:
        print(f"llmio: error: {exc}", file=sys.stderr)
        return 2
    except (CliError, OSError, ValueError, ImportError) as exc:  # FormatError, ChecksumError, ... name the file
        if isinstance(exc, BrokenPipeError):  # `llmio inspect ... | head`
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return 1
        print(f"llmio: error: {_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmio: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"llmio: terminated ({name})", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        from .errors import UnsupportedError

        if isinstance(exc, UnsupportedError):
            print(f"llmio: error: {_error_line(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
