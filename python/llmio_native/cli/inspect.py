"""``llmio inspect``: counts, dtype, codec, ratio and a token histogram of a dataset."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import numpy as np

from ._common import add_dataset_args, cli_dtype_hint, positive

#: Tokens per read when computing the histogram (bounded memory).
HIST_BLOCK_TOKENS = 1 << 22
#: Window size when ``inspect --sample`` spreads its reads over the dataset.
SAMPLE_WINDOW_TOKENS = 1 << 16
#: A histogram of ids up to this bound is a dense ``np.bincount``; beyond it, ``np.unique``.
DENSE_HIST_MAX_ID = 1 << 24

FORMAT_NAMES = {
    "llmio": "llmio (llmio_native token shards)",
    "nanogpt": "nanoGPT (raw token .bin)",
    "llmc": "llm.c (.bin with 1 KiB header)",
    "megatron": "Megatron (indexed dataset .bin/.idx)",
}


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

    Raises:
        As ``ds.read`` (ChecksumError, FormatError, OSError).
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
        files += [os.path.join(ds.path, "manifest.json"), os.path.join(ds.path, "index.lio")]
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
    from ..dataset import format as F

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

    Keys: path, format, format_name, format_version (llmio: 1 or 2, the shard layout; else
    None), num_tokens, num_documents (None where the format
    records no boundaries), dtype, codec, chunk_codecs (chunks per codec id name), rans
    (None, or the rans models as :func:`rans_models` sums them up), files,
    chunks, bytes_on_disk (data files and manifest or index), stored_bytes (token data as
    stored), decoded_bytes, ratio (decoded / stored), eot_token, tokenizer, tokens_scanned,
    distinct_ids (in the scan), top_tokens (``top`` rows of id, count, share of the scan,
    token string where the dataset has a tokenizer).

    Raises:
        As :func:`llmio_native.open_dataset` and ``read`` (FormatError, ChecksumError, OSError).
    """
    from ..dataset import CODEC_IDS, open_dataset

    ds = open_dataset(path, dtype=dtype)
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
        "format_version": getattr(ds, "format_version", None),
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


def add_parser(sub: Any) -> None:
    """Add the ``inspect`` subcommand to ``sub`` (an argparse subparsers action).

    Raises:
        Nothing.
    """
    hlp = "counts, dtype, codec, ratio, token histogram"
    q = sub.add_parser("inspect", help=hlp, description=hlp)
    add_dataset_args(q)
    q.add_argument("--sample", type=positive, metavar="N",
                   help="histogram of N tokens read in 64Ki-token windows spread over the data "
                        "(default: all tokens)")


def run(a: argparse.Namespace) -> int:
    """``llmio inspect``: print what :func:`inspect_dataset` finds.

    Raises:
        As :func:`inspect_dataset`; CliError for a raw token file without ``--dtype``.
    """
    with cli_dtype_hint():
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
        ("format", r["format_name"] + ("" if r["format_version"] is None else
                                       f", version {r['format_version']}"
                                       + (" (chunks packed)" if r["format_version"] == 2 else " (4 KiB-aligned chunks)"))),
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
