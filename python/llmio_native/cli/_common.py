"""What the ``llmio`` commands share: the error types and argparse value checks."""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

from ..pack.errors import PackError

#: An expected failure (bad input, refused output): printed as one line, exit code 1.
CliError = PackError


class UsageError(CliError):
    """A bad combination of arguments: printed with the usage hint, exit code 2."""


def int_in(lo: int, hi: int | None = None, hi_text: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (``hi`` None: no upper bound);
    ``hi_text`` spells ``hi`` in the message (e.g. "2^24").

    Raises:
        Nothing (the returned parser raises ``argparse.ArgumentTypeError``).
    """

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


#: An argparse type: an integer >= 1.
positive = int_in(1)


@contextlib.contextmanager
def cli_dtype_hint() -> Iterator[None]:
    """Errors of ``open_dataset`` that name its ``dtype=`` argument name ``--dtype`` instead.

    Raises:
        CliError: such an error, reworded; other errors pass through unchanged.
    """
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        if "dtype='uint16' or 'uint32'" not in msg:
            raise
        raise CliError(msg.replace("dtype='uint16' or 'uint32'", "--dtype uint16 or --dtype uint32")) from None


def add_dataset_args(q: argparse.ArgumentParser) -> None:
    """The arguments every command that opens a dataset takes: ``path``, ``--dtype``, ``--json``.

    Raises:
        Nothing.
    """
    q.add_argument("path", help="dataset directory, nanoGPT or llm.c .bin, or Megatron prefix/.bin/.idx")
    q.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype of a raw nanoGPT .bin")
    q.add_argument("--json", action="store_true", help="machine-readable output")
