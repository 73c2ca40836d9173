"""The ``llmio`` command: pack corpora into token shards, inspect and verify datasets.

    llmio pack INPUT... -o OUT (--tokenizer tokenizer.json | --train-bpe VOCAB) [options]
    llmio inspect PATH [--json] [--sample N]
    llmio verify PATH
    llmio info
    llmio bench [bench_read.py options]

Exit codes: 0 success, 1 failure (bad input, corrupt data; one line on stderr), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

EOT = "<|endoftext|>"
PIECE_BYTES = 1 << 20  # text handed to the tokenizer at once when a document is long
BATCH_BYTES = 8 << 20  # text per encode_batch call (tokenizers runs a batch on all cores)


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


# ----------------------------------------------------------------------------- inputs
def _txt_docs(path: str, mode: str) -> Iterator[tuple[str, bool, int]]:
    """(text, ends_document, bytes consumed) pieces of a text file."""
    with open(path, "r", encoding="utf-8", errors="strict", newline="") as f:
        if mode == "line":
            for line in f:
                text = line.rstrip("\n")
                if text:
                    yield text, True, len(line.encode())
            return
        if mode == "blank":
            para: list[str] = []
            for line in f:
                if line.strip() == "":
                    if para:
                        text = "".join(para)
                        yield text.rstrip("\n"), True, len(text.encode()) + len(line.encode())
                        para = []
                    continue
                para.append(line)
            if para:
                text = "".join(para)
                yield text.rstrip("\n"), True, len(text.encode())
            return
        # mode == "file": the whole file is one document, tokenized in line-aligned pieces.
        buf: list[str] = []
        size = 0
        pending: str | None = None
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= PIECE_BYTES:
                if pending is not None:
                    yield pending, False, len(pending.encode())
                pending = "".join(buf)
                buf, size = [], 0
        tail = "".join(buf)
        if pending is not None:
            yield pending, False, len(pending.encode())
        yield tail, True, len(tail.encode())


def _jsonl_docs(path: str, field: str) -> Iterator[tuple[str, bool, int]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CliError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise CliError(f"{path}:{lineno}: no field {field!r} (use --field)")
            text = obj[field]
            if not isinstance(text, str):
                raise CliError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            yield text, True, len(raw)


def _parquet_docs(path: str, field: str) -> Iterator[tuple[str, bool, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CliError("reading .parquet needs pyarrow: pip install 'llmio-native[pack]'") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise CliError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for rg in range(pf.num_row_groups):  # one row group in memory at a time
        col = pf.read_row_group(rg, columns=[field]).column(0)
        nbytes = pf.metadata.row_group(rg).total_byte_size
        texts = col.to_pylist()
        for k, text in enumerate(texts):
            if text is None:
                continue
            yield str(text), True, nbytes // max(1, len(texts))


def iter_documents(inputs: Sequence[str], field: str, doc_sep: str) -> Iterator[tuple[str, bool, int]]:
    """Pieces of documents of every input, in order: (text, ends_document, input bytes)."""
    for path in inputs:
        if not os.path.exists(path):
            raise CliError(f"{path}: no such file")
        low = path.lower()
        if low.endswith(".jsonl") or low.endswith(".json"):
            yield from _jsonl_docs(path, field)
        elif low.endswith(".parquet"):
            yield from _parquet_docs(path, field)
        else:
            try:
                yield from _txt_docs(path, doc_sep)
            except UnicodeDecodeError as exc:
                raise CliError(f"{path}: not UTF-8 text at byte {exc.start}") from None


# ----------------------------------------------------------------------------- tokenizers
def train_bpe(inputs: Sequence[str], vocab_size: int, field: str, doc_sep: str, out_path: str, quiet: bool) -> Any:
    """Train a byte-level BPE (GPT-2 style, with ``<|endoftext|>``) on the inputs; save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=not quiet,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for t, _, _ in iter_documents(inputs, field, doc_sep)), trainer=trainer)
    tok.save(out_path)
    return tok


def _input_bytes(inputs: Sequence[str]) -> int:
    return sum(os.path.getsize(p) for p in inputs if os.path.exists(p))


# ----------------------------------------------------------------------------- commands
def cmd_pack(a: argparse.Namespace) -> int:
    import llmio_native as lio
    from tokenizers import Tokenizer
    from tqdm import tqdm

    if (a.tokenizer is None) == (a.train_bpe is None):
        raise CliError("give exactly one of --tokenizer FILE or --train-bpe VOCAB_SIZE")
    out = os.path.abspath(a.output)
    if os.path.exists(os.path.join(out, "manifest.json")) and not a.overwrite:
        raise CliError(f"{out} already holds a dataset; use --overwrite to replace it")
    for p in a.inputs:
        if not os.path.isfile(p):
            raise CliError(f"{p}: no such file")
    quiet = a.quiet or not sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="llmio_pack_") as tmp:
        if a.train_bpe is not None:
            if a.train_bpe < 257:
                raise CliError("--train-bpe needs a vocabulary of at least 257 (256 bytes + <|endoftext|>)")
            tok_path = os.path.join(tmp, "tokenizer.json")
            tok = train_bpe(a.inputs, a.train_bpe, a.field, a.doc_sep, tok_path, quiet)
        else:
            tok_path = a.tokenizer
            if not os.path.isfile(tok_path):
                raise CliError(f"{tok_path}: no such tokenizer file")
            tok = Tokenizer.from_file(tok_path)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = a.dtype if a.dtype != "auto" else ("uint16" if vocab <= 65536 else "uint32")
        eot = a.eot_id if a.eot_id is not None else tok.token_to_id(EOT)
        if eot is None and not a.no_eot:
            raise CliError(f"the tokenizer has no {EOT!r} token: pass --eot-id ID or --no-eot")
        if a.no_eot:
            eot = None
        bar = tqdm(total=_input_bytes(a.inputs), unit="B", unit_scale=True, desc="pack", disable=quiet)
        with lio.DatasetWriter(out, dtype=dtype, codec=a.codec, chunk_tokens=a.chunk_tokens,
                               eot_token=eot, overwrite=a.overwrite, tokenizer=tok_path,
                               metadata={"inputs": [os.path.basename(p) for p in a.inputs],
                                         "vocab_size": vocab}) as w:
            pieces: list[tuple[str, bool, int]] = []
            size = 0
            doc: list[np.ndarray] = []

            def flush() -> None:
                nonlocal pieces, size
                if not pieces:
                    return
                encs = tok.encode_batch([t for t, _, _ in pieces], add_special_tokens=False)
                for (_, ends, nbytes), enc in zip(pieces, encs):
                    doc.append(np.asarray(enc.ids, dtype=np.int64))
                    if ends:
                        if eot is not None:
                            doc.append(np.array([eot], dtype=np.int64))
                        w.add_document(np.concatenate(doc) if doc else np.zeros(0, np.int64))
                        doc.clear()
                    bar.update(nbytes)
                pieces, size = [], 0

            for piece in iter_documents(a.inputs, a.field, a.doc_sep):
                pieces.append(piece)
                size += len(piece[0])
                if size >= BATCH_BYTES:
                    flush()
            flush()
        bar.close()
    ds = lio.open_dataset(out)
    print(f"packed {ds.num_documents} documents, {ds.num_tokens} tokens ({ds.dtype}, {ds.codec}, "
          f"{len(ds.paths)} shards) into {out}")
    return 0


def _histogram(ds: Any, sample: int | None) -> tuple[np.ndarray, int]:
    n = ds.num_tokens if sample is None else min(sample, ds.num_tokens)
    counts = np.zeros(1, dtype=np.int64)
    step = 1 << 22
    for start in range(0, n, step):  # bounded memory: one block of tokens at a time
        block = ds.read(start, min(step, n - start)).astype(np.int64, copy=False)
        if block.size:
            bc = np.bincount(block)
            if bc.size > counts.size:
                bc[: counts.size] += counts
                counts = bc
            else:
                counts[: bc.size] += bc
    return counts, n


def cmd_inspect(a: argparse.Namespace) -> int:
    import llmio_native as lio

    ds = lio.open_dataset(a.path, dtype=a.dtype)
    itemsize = np.dtype(ds.dtype).itemsize
    stored = int(ds.stored_bytes)
    decoded = int(ds.num_tokens) * itemsize
    counts, scanned = _histogram(ds, a.sample)
    top = np.argsort(counts)[::-1][:10]
    info = {
        "path": os.path.abspath(a.path),
        "format": getattr(ds, "format", "?"),
        "num_tokens": int(ds.num_tokens),
        "num_documents": int(ds.num_documents),
        "dtype": str(np.dtype(ds.dtype)),
        "codec": ds.codec,
        "files": len(ds.paths),
        "chunks": int(len(ds.chunks)),
        "stored_bytes": stored,
        "decoded_bytes": decoded,
        "ratio": decoded / stored if stored else 0.0,
        "eot_token": getattr(ds, "eot_token", None),
        "tokens_scanned": scanned,
        "distinct_tokens": int((counts > 0).sum()),
        "top_tokens": [[int(t), int(counts[t]), float(counts[t] / max(1, scanned))] for t in top if counts[t] > 0],
    }
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    for k in ("path", "format", "num_tokens", "num_documents", "dtype", "codec", "files", "chunks",
              "stored_bytes", "decoded_bytes", "eot_token", "tokens_scanned", "distinct_tokens"):
        print(f"{k:>16}: {info[k]}")
    print(f"{'ratio':>16}: {info['ratio']:.3f} (decoded / stored)")
    print(f"{'top tokens':>16}: id count share")
    for t, c, s in info["top_tokens"]:
        print(f"{'':>16}  {t} {c} {s:.4f}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    import llmio_native as lio

    ds = lio.open_dataset(a.path, dtype=a.dtype)
    rep = ds.verify(progress=not a.quiet and sys.stderr.isatty())
    if rep.ok:
        print(f"ok: {rep.chunks_checked} chunks verified in {a.path}")
        return 0
    print(f"FAILED: {len(rep.bad_chunks)} bad chunk(s) of {rep.chunks_checked} in {a.path}", file=sys.stderr)
    for b in rep.bad_chunks:
        print(f"  {b.path} chunk {b.chunk} @ {b.offset}: {b.reason}", file=sys.stderr)
    return 1


def cmd_info(a: argparse.Namespace) -> int:
    import llmio_native as lio

    print(json.dumps(lio.info(), indent=1))
    return 0


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_read.py"
    if not script.exists():
        raise CliError("benchmarks/bench_read.py is part of the source tree, not the wheel; "
                       "run it from a checkout: python benchmarks/bench_read.py")
    return subprocess.call([sys.executable, str(script), *rest])


def build_parser() -> argparse.ArgumentParser:
    import llmio_native as lio

    ap = argparse.ArgumentParser(prog="llmio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"llmio_native {lio.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pack", help="tokenize text/JSONL/Parquet into token shards")
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl or .parquet files, in order")
    p.add_argument("-o", "--output", required=True, help="dataset directory to create")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", help="a Hugging Face tokenizers tokenizer.json")
    g.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE", help="train a byte-level BPE on the inputs first")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument("--doc-sep", choices=["file", "blank", "line"], default="file",
                   help="documents in .txt inputs: the whole file (default), blank-line separated paragraphs, or lines")
    p.add_argument("--codec", choices=["none", "zstd"], default="zstd", help="chunk codec (default: zstd)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token dtype (auto: uint16 when the vocabulary fits)")
    p.add_argument("--chunk-tokens", type=int, default=65536)
    p.add_argument("--eot-id", type=int, help="end-of-text id appended to each document (default: <|endoftext|>)")
    p.add_argument("--no-eot", action="store_true", help="append no end-of-text token")
    p.add_argument("--overwrite", action="store_true", help="replace an existing or incomplete OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    for name, hlp in (("inspect", "counts, dtype, codec, ratio, token histogram"), ("verify", "check every checksum")):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("path", help="dataset directory, nanoGPT/llm.c .bin, or Megatron prefix")
        q.add_argument("--dtype", help="token dtype of a raw nanoGPT .bin")
        q.add_argument("-q", "--quiet", action="store_true")
        if name == "inspect":
            q.add_argument("--json", action="store_true", help="machine-readable output")
            q.add_argument("--sample", type=int, help="scan only the first N tokens for the histogram")
    sub.add_parser("info", help="what this build can do here (JSON)")
    sub.add_parser("bench", help="run benchmarks/bench_read.py (from a source checkout)", add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmio`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(argparse.Namespace(), argv[1:])
        except CliError as exc:
            print(f"llmio: error: {exc}", file=sys.stderr)
            return 1
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return {"pack": cmd_pack, "inspect": cmd_inspect, "verify": cmd_verify, "info": cmd_info}[a.cmd](a)
    except CliError as exc:
        print(f"llmio: error: {exc}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # FormatError, ChecksumError, FileExistsError, ... name the file
        print(f"llmio: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("llmio: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
