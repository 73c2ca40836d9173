"""``llmio verify``: re-check every checksum of a dataset; exit 1 listing the bad chunks."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._common import add_dataset_args, cli_dtype_hint


def add_parser(sub: Any) -> None:
    """Add the ``verify`` subcommand to ``sub`` (an argparse subparsers action).

    Raises:
        Nothing.
    """
    hlp = "re-check every checksum; exit 1 listing bad chunks"
    q = sub.add_parser("verify", help=hlp, description=hlp)
    add_dataset_args(q)
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar, nothing printed when ok")


def run(a: argparse.Namespace) -> int:
    """``llmio verify``: 0 when every chunk checks out, 1 with the bad chunks listed.

    Raises:
        As :func:`llmio_native.open_dataset`; CliError for a raw token file without ``--dtype``.
    """
    from ..dataset import open_dataset

    with cli_dtype_hint():
        ds = open_dataset(a.path, dtype=a.dtype)
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
