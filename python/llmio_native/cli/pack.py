"""``llmio pack``: tokenize text / JSONL / Parquet files into an llmio token dataset."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import pack as _pack
from ..pack import DOC_SEPS, EOT, INPUT_FORMATS, LONG_PIECE_CHARS, PIECE_CHARS
from ._common import UsageError, int_in, positive

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
    v = int_in(1)(text)
    if v < 257:
        raise argparse.ArgumentTypeError(f"needs at least 257 (256 byte symbols + {EOT}), got {v}")
    if v > MAX_TRAIN_VOCAB:
        raise argparse.ArgumentTypeError(f"must be <= 2^24 = {MAX_TRAIN_VOCAB} ids, got {v}")
    return v


EPILOG = f"""\
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
  OUT may be s3://bucket/prefix (or gs://, az://; credentials and endpoint from the
  store's environment variables, e.g. AWS_ENDPOINT_URL): shards are staged in
  $LLMIO_CACHE_DIR (or the temp directory), at most 2 at a time, each uploaded as soon as
  it is finished, manifest.json last, so readers never see a half-written dataset. The
  same refusals apply (judged from the prefix's listing); a failed pack deletes the objects
  it uploaded. A URL cannot be locked: do not run two packs into one prefix.
"""


def add_parser(sub: Any) -> None:
    """Add the ``pack`` subcommand to ``sub`` (an argparse subparsers action).

    Raises:
        Nothing.
    """
    p = sub.add_parser("pack", help="tokenize text / JSONL / Parquet into token shards",
                       description="Tokenize text, JSONL or Parquet files into an llmio token dataset.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files, in order")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="dataset directory to write, or s3://bucket/prefix, gs://..., az://... (shards are "
                        "uploaded as they are finished, manifest.json last)")
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
    p.add_argument("--codec", choices=["zstd", "rans", "rans1", "none"], default="zstd",
                   help="chunk codec (default: zstd, about 2x smaller for BPE ids; rans: a token entropy "
                        "coder, within a few %% of the order-0 entropy and decodable on the GPU; rans1: rans "
                        "with the previous token as context, smaller than zstd -19 on text, also GPU-decodable; none: raw "
                        "tokens, for the fastest reads and the loader's global shuffle)")
    p.add_argument("--zstd-level", type=int_in(*_ZSTD_LEVELS), default=3,
                   help="zstd level, -131072 .. 22, negative for the fast modes (default: 3)")
    p.add_argument("--rans-model-tokens", type=positive, default=1 << 24, metavar="N",
                   help="rans: tokens per frequency model (one model per group of chunks; default: 2^24)")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token dtype (default: auto, uint16 when the vocabulary fits)")
    p.add_argument("--chunk-tokens", type=int_in(1, MAX_CHUNK_TOKENS, "2^28"), default=65536,
                   help="tokens per chunk, 1 .. 2^28 (default: 65536)")
    p.add_argument("--shard-tokens", type=positive, default=1 << 30,
                   help="tokens per shard, at most; shards end at document boundaries (default: 2^30)")
    e = p.add_mutually_exclusive_group()
    e.add_argument("--eot-id", type=int_in(0, (1 << 32) - 1, "2^32 - 1 (the uint32 range)"), metavar="ID",
                   help=f"end-of-text id appended to each document, 0 .. 2^32 - 1 (default: the tokenizer's {EOT})")
    e.add_argument("--no-eot", action="store_true", help="append no end-of-text token")
    p.add_argument("--num-workers", type=int_in(0, MAX_WORKERS), default=0, metavar="N",
                   help="tokenizer processes: 1 = encode_batch in this process (on all cores), "
                        "N > 1 = N worker processes (at most 256), 0 = auto (1 below 16 MiB of input or 24 cores, "
                        "else cores - 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset or an unfinished one in OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")


def _summary(out: str) -> tuple[int, int, str, str, float, int]:
    """(documents, tokens, dtype, codec, compression ratio, shards) of the dataset just
    packed; a URL is opened through a throwaway cache (its metadata only: the user's cache
    is left alone).

    Raises:
        As :func:`llmio_native.open_dataset`.
    """
    import contextlib
    import tempfile

    from ..dataset import open_dataset
    from ..remote.store import is_url

    with contextlib.ExitStack() as stack:
        kw = {}
        if is_url(out):
            kw["cache_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="llmio-pack-summary-"))
        ds = open_dataset(out, **kw)
        ratio = ds.num_tokens * ds.token_bytes / max(1, ds.stored_bytes)
        res = (ds.num_documents, ds.num_tokens, ds.dtype.name, ds.codec, ratio, len(ds.paths))
        del ds  # before its cache directory goes
        return res


def run(a: argparse.Namespace) -> int:
    """``llmio pack``: tokenize the inputs and write a token dataset to ``a.output``
    (:func:`llmio_native.pack.pack`); print its notes and, unless ``-q``, a summary line.

    SIGTERM and SIGHUP, like Ctrl-C, stop the pack and remove what it wrote.

    Raises:
        CliError: as :func:`llmio_native.pack.pack` raises ``PackError``.
        UsageError: an empty ``--output``.
        Terminated: SIGTERM or SIGHUP.
    """
    if not a.output.strip():
        raise UsageError(f"-o/--output is {a.output!r}: name the dataset directory to write")
    with _pack.stop_signals_unwind():
        res = _pack.pack(a.inputs, a.output, tokenizer=a.tokenizer, train_bpe=a.train_bpe, field=a.field,
                         doc_sep=a.doc_sep, input_format=a.input_format, codec=a.codec, zstd_level=a.zstd_level,
                         rans_model_tokens=a.rans_model_tokens, dtype=a.dtype, chunk_tokens=a.chunk_tokens,
                         shard_tokens=a.shard_tokens, eot_id=a.eot_id, append_eot=not a.no_eot,
                         num_workers=a.num_workers, overwrite=a.overwrite,
                         progress=not a.quiet and sys.stderr.isatty())
    for note in res.notes:
        print(f"llmio: note: {note}", file=sys.stderr)
    if not a.quiet:
        ndoc, ntok, dtype, codec, ratio, nshards = _summary(res.out)
        print(f"packed {ndoc} documents, {ntok} tokens ({dtype}, {codec}, "
              f"ratio {ratio:.2f}, {nshards} shard(s)) into {res.out} in {res.seconds:.1f} s "
              f"({res.input_bytes / max(res.seconds, 1e-9) / 1e6:.1f} MB/s of input)")
    return 0
