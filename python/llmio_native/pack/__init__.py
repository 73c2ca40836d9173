"""Pack text corpora (UTF-8 text, JSONL, Parquet) into an llmio token dataset.

:func:`pack` is what ``llmio pack`` runs. The pieces, in the order data flows:

* :mod:`.inputs` reads the files as documents, cut by :mod:`.split` into BPE-safe pieces;
* :mod:`.tokenizer` loads a ``tokenizer.json`` or trains a byte-level BPE on the inputs;
* :mod:`.encode` tokenizes batches of pieces (in this process or in worker processes);
* :mod:`.output` locks the output directory, joins the pieces' ids into documents for the
  :class:`~llmio_native.DatasetWriter` and removes what a failed pack wrote.

Importing this package imports neither torch nor tokenizers.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import encode as _encode
from . import inputs as _inputs
from . import tokenizer as _tokenizer
from .encode import auto_workers, encode_batches
from .errors import PackError
from .inputs import DOC_SEPS, INPUT_FORMATS, check_input_file, input_format, iter_pieces, require_pyarrow
from .output import (TOKENIZER_NAME, check_output, is_remote, lock_output, remove_if_empty, remove_partial,
                     write_documents, write_error)
from .signals import Terminated, signals_held, stop_signals_unwind
from .split import LONG_PIECE_CHARS, PIECE_CHARS, Piece, batches, safe_cut, split_text
from .tokenizer import EOT, cuts_are_exact, load_tokenizer, train_bpe, vocab_bound

__all__ = [
    "pack", "PackResult", "PackError", "Terminated", "stop_signals_unwind",
    "iter_pieces", "input_format", "split_text", "safe_cut", "Piece",
    "load_tokenizer", "train_bpe", "cuts_are_exact", "encode_batches",
    "EOT", "PIECE_CHARS", "LONG_PIECE_CHARS", "INPUT_FORMATS", "DOC_SEPS", "CODECS", "DTYPES",
]

CODECS = ("zstd", "rans", "rans1", "none")
DTYPES = ("auto", "uint16", "uint32")


class PackResult(NamedTuple):
    """What :func:`pack` did: ``out`` (absolute path of the dataset directory, or its URL),
    ``input_bytes``, ``seconds`` (wall time), ``num_workers`` (as resolved from 0 = auto)
    and ``notes`` (lines worth telling the user, e.g. inexact cuts)."""

    out: str
    input_bytes: int
    seconds: float
    num_workers: int
    notes: list[str]


def pack(inputs: Sequence[str], out_dir: str, *, tokenizer: str | None = None, train_bpe: int | None = None,
         field: str = "text", doc_sep: str = "file", input_format: str = "auto", codec: str = "zstd",
         zstd_level: int = 3, rans_model_tokens: int = 1 << 24, dtype: str = "auto", chunk_tokens: int = 65536,
         shard_tokens: int = 1 << 30, eot_id: int | None = None, append_eot: bool = True, num_workers: int = 0,
         overwrite: bool = False, progress: bool = False, storage_options: dict | None = None) -> PackResult:
    """Tokenize ``inputs`` and write them as a token dataset to directory ``out_dir``, or
    to an object store (``out_dir="s3://bucket/prefix"``, ``gs://``, ``az://``).

    Documents are written in input order, each followed by the end-of-text id (``eot_id``,
    default the tokenizer's ``<|endoftext|>``; none when not ``append_eot``). The
    tokenizer is saved beside the shards as ``tokenizer.json``. ``out_dir`` is locked
    (``flock``) while the pack writes it; a failed or interrupted pack (any exception,
    ``KeyboardInterrupt``, :class:`Terminated` under :func:`stop_signals_unwind`) removes
    the shards and temp files it wrote.

    Args:
        inputs: text, JSONL or Parquet files (see :func:`iter_pieces`).
        out_dir: the dataset directory (created when missing), or a URL: shards are staged
            locally (``$LLMIO_CACHE_DIR`` or the temp directory) and uploaded as each is
            finished, ``manifest.json`` last (:class:`~llmio_native.DatasetWriter`). A URL
            is not locked: two packs into one prefix at once are not detected.
        tokenizer: a Hugging Face ``tokenizer.json``; exactly one of this and ``train_bpe``.
        train_bpe: train a byte-level BPE of this many ids (>= 257) on the inputs first.
        field, doc_sep, input_format: how inputs are read (see :func:`iter_pieces`).
        codec, zstd_level, rans_model_tokens, chunk_tokens, shard_tokens: the writer's options.
        dtype: "auto" (uint16 when every id fits), "uint16" or "uint32".
        eot_id, append_eot: the end-of-text id appended to every document.
        num_workers: 1 = ``encode_batch`` in this process; N > 1 = N worker processes;
            0 = auto (:func:`~llmio_native.pack.encode.auto_workers`). Workers are started
            with ``spawn``, which imports the caller's ``__main__`` module again: a script
            calling ``pack`` must do so under ``if __name__ == "__main__":``.
        overwrite: replace a dataset (or an unfinished one) in ``out_dir``.
        progress: a progress bar on stderr (and the BPE trainer's).
        storage_options: a URL's store options (default: the store's environment variables).

    Returns:
        A :class:`PackResult`.

    Raises:
        ValueError: not exactly one of ``tokenizer`` and ``train_bpe``; an empty ``out_dir``.
        PackError: a missing or unreadable input, an output that is a file or locked by
            another pack or holds a dataset (without ``overwrite``), an ``http(s)://``
            output (read-only), a bad input line, an id that does not fit the dtype, a
            worker that died, a write error (naming the output).
        OSError: the output directory cannot be created (names it).
        RemoteError: (an OSError) a URL output's store failed after the retries (names the
            object); the objects this pack uploaded are deleted (best effort).
    """
    if (tokenizer is None) == (train_bpe is None):
        raise ValueError("pass exactly one of tokenizer= and train_bpe=")
    if not str(out_dir).strip():
        raise ValueError(f"out_dir is {out_dir!r}: name the dataset directory to write")
    remote = is_remote(str(out_dir))
    out = str(out_dir).rstrip("/") if remote else os.path.abspath(out_dir)
    for p in inputs:
        check_input_file(p)
        if os.path.abspath(p) == out:
            raise PackError(f"{p}: an input cannot be the --output")
    if any(_inputs.input_format(p, input_format) == "parquet" for p in inputs):
        require_pyarrow()
    if not remote and os.path.exists(out) and not os.path.isdir(out):
        raise PackError(f"{out}: exists and is not a directory (--output must be a directory)")
    total = sum(os.path.getsize(p) for p in inputs)
    opts = dict(tokenizer=tokenizer, train_bpe=train_bpe, field=field, doc_sep=doc_sep,
                input_format=input_format, codec=codec, zstd_level=zstd_level, rans_model_tokens=rans_model_tokens,
                dtype=dtype, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens, eot_id=eot_id,
                append_eot=append_eot, overwrite=overwrite, progress=progress, storage_options=storage_options)
    if remote:
        check_output(out, overwrite, storage_options)  # before tokenizing: a refused output fails at once
        own_tokenizer = TOKENIZER_NAME not in {k for k, _ in _remote_list(out, storage_options)}
        return _pack_locked(list(inputs), out, total, False, own_tokenizer, num_workers or auto_workers(total),
                            **opts)
    fd, created = lock_output(out)
    own_tokenizer = not os.path.exists(os.path.join(out, TOKENIZER_NAME))
    try:
        check_output(out, overwrite)
        return _pack_locked(list(inputs), out, total, created, own_tokenizer,
                            num_workers or auto_workers(total), **opts)
    finally:
        with signals_held():
            remove_if_empty(out, created)
            if fd is not None:
                os.close(fd)


def _remote_list(out: str, storage_options: dict | None) -> list[tuple[str, int]]:
    from ..remote.upload import writable_source

    return writable_source(out, storage_options).list()


def _pack_locked(inputs: list[str], out: str, total: int, created: bool, own_tokenizer: bool, workers: int, *,
                 tokenizer: str | None, train_bpe: int | None, field: str, doc_sep: str, input_format: str,
                 codec: str, zstd_level: int, rans_model_tokens: int, dtype: str, chunk_tokens: int,
                 shard_tokens: int, eot_id: int | None, append_eot: bool, overwrite: bool,
                 progress: bool, storage_options: dict | None) -> PackResult:
    from ..dataset import DatasetWriter

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmio_pack_") as tmp:
        if train_bpe is not None:
            tok_path = os.path.join(tmp, TOKENIZER_NAME)
            texts = (p.text for p in iter_pieces(inputs, field, doc_sep, input_format) if p.text)
            tok = _tokenizer.train_bpe(texts, train_bpe, tok_path, show_progress=progress)
        else:
            assert tokenizer is not None
            tok_path = tokenizer
            tok = load_tokenizer(tok_path)
        vocab = vocab_bound(tok)
        np_dtype = np.dtype(dtype if dtype != "auto" else ("uint16" if vocab <= 65536 else "uint32"))
        eot: int | None = None
        if append_eot:
            eot = eot_id if eot_id is not None else tok.token_to_id(EOT)
            if eot is None:
                raise PackError(f"the tokenizer has no {EOT!r} token: pass --eot-id ID (or --no-eot)")
            if eot > np.iinfo(np_dtype).max:
                raise PackError(f"end-of-text id {eot} does not fit {np_dtype.name} (0..{np.iinfo(np_dtype).max})"
                                + (": use --dtype uint32" if np_dtype != np.uint32 else ""))
        eot_arr = np.array([eot] if eot is not None else [], dtype=np_dtype)
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pack",
                   disable=not progress, dynamic_ncols=True)
        meta = {"inputs": [os.path.basename(p) for p in inputs], "vocab_size": vocab,
                "tokenizer_source": "trained BPE" if train_bpe is not None else os.path.basename(tok_path),
                "doc_sep": doc_sep, "field": field}
        w = None
        try:
            w = DatasetWriter(out, dtype=np_dtype.name, codec=codec, chunk_tokens=chunk_tokens,
                              shard_tokens=shard_tokens, eot_token=eot, zstd_level=zstd_level,
                              rans_model_tokens=rans_model_tokens, overwrite=overwrite,
                              tokenizer=tok_path, metadata=meta,
                              **({"storage_options": storage_options} if is_remote(out) else {}))
            exact = cuts_are_exact(tok)
            cuts = [0]

            def counted(it: Iterator[Piece]) -> Iterator[Piece]:
                for piece in it:
                    cuts[0] += piece.text is not None and not piece.ends
                    yield piece

            pieces = counted(iter_pieces(inputs, field, doc_sep, input_format,
                                         PIECE_CHARS if exact else LONG_PIECE_CHARS))
            bsize = _encode.BATCH_CHARS if workers <= 1 else _encode.WORKER_BATCH_CHARS
            with contextlib.closing(encode_batches(tok, batches(pieces, bsize), np_dtype, workers)) as stream:
                write_documents(w, stream, eot_arr, bar.update)
            w.close()
        except BaseException as exc:
            if w is not None:
                with signals_held():
                    w.abort()
                    remove_partial(out, created, own_tokenizer, storage_options)
            named = write_error(exc, out) if w is not None else None
            if named is not None:
                raise named from None
            raise
        finally:
            bar.close()
    notes = []
    if not exact and cuts[0]:
        notes.append(f"{cuts[0]} cut(s) in documents longer than {LONG_PIECE_CHARS >> 20} Mi characters: "
                     "this tokenizer marks the start of every call (Metaspace / prefix space), so its ids near "
                     "those cuts can differ from tokenizing the whole document")
    return PackResult(out, total, time.perf_counter() - t0, workers, notes)
