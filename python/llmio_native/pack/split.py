"""BPE-safe splitting: cut documents into pieces that tokenize to the ids of the whole.

A byte-level BPE never merges across pre-tokens, and the GPT-2 and GPT-4/Llama-3
pre-tokenizer regexes always split just after a lone newline between two non-blank
characters and just before a lone space between two non-blank characters. Cutting only
there and tokenizing the pieces separately gives the ids of one call on the whole text,
while short pieces are much faster to tokenize and keep every core busy on one document.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, NamedTuple

#: Characters of text handed to the tokenizer in one piece; longer documents are cut into
#: pieces at whitespace (see :func:`split_text`; a run without a safe cut point is one
#: longer piece). tokenizers' time per character grows with the length of the text
#: (measured: 4 Ki-character pieces encode 2.3x faster than 64 Ki ones and 3.4x faster
#: than 1 Mi), and short pieces keep every core busy on one document.
PIECE_CHARS = 1 << 12
#: Piece size for tokenizers that cannot be cut without changing the ids
#: (:func:`llmio_native.pack.tokenizer.cuts_are_exact` is false): only documents longer
#: than this are cut.
LONG_PIECE_CHARS = 1 << 20

_CUT_RE = re.compile("[\n ]")


class Piece(NamedTuple):
    """A run of one document's text, in input order.

    ``text`` is None for a piece that only accounts for input bytes (skipped blank lines,
    file tails); ``ends`` marks the last piece of a document; ``nbytes`` is the input bytes
    it stands for (the progress bar's unit).
    """

    text: str | None
    ends: bool
    nbytes: int


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

    Raises:
        Nothing.
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


def next_cut(text: str, start: int) -> int | None:
    """The first :func:`safe_cut` point at or after ``start`` (a cut just after a lone
    newline at ``start - 1`` included), or None when ``text`` has none there (the
    character after a candidate must be in ``text`` to tell whether it is one).

    Raises:
        Nothing.
    """
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
    has no safe cut after ``pos``.

    Raises:
        Nothing.
    """
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
    (it then ends at the next one, or at the end of ``text``).

    Raises:
        Nothing.
    """
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


def doc_pieces(text: str, nbytes: int, limit: int) -> Iterator[Piece]:
    """One document as :class:`Piece` runs cut by :func:`split_text`; the last piece
    carries all ``nbytes`` input bytes of the document.

    Raises:
        Nothing.
    """
    parts = split_text(text, limit)
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        yield Piece(part, last, nbytes if last else 0)


def batches(pieces: Iterable[Piece], batch_chars: int) -> Iterator[list[Piece]]:
    """Group ``pieces`` in order into lists holding at least ``batch_chars`` characters of
    text each (the last one fewer).

    Raises:
        As ``pieces`` does.
    """
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
