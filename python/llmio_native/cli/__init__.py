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
import os
import signal
import sys
from typing import Any, Sequence

from . import bench, info, inspect, pack, verify
from ._common import CliError, UsageError
from ..pack.signals import Terminated

__all__ = ["main", "build_parser", "CliError", "UsageError"]

_COMMANDS = {"pack": pack, "inspect": inspect, "verify": verify, "info": info, "bench": bench}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (with a pointer to
    ``--help``) instead of the usage block; exit status 2 as usual."""

    def error(self, message: str) -> Any:  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llmio`` (subcommands pack, inspect, verify, info, bench).

    Raises:
        Nothing.
    """
    import llmio_native as lio

    ap = _Parser(prog="llmio", description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"llmio_native {lio.__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    for mod in _COMMANDS.values():
        mod.add_parser(sub)
    return ap


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror and str(exc.filename) not in exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmio`` console script (and ``python -m llmio_native.cli``).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 failure (one line on stderr), 2 usage error, 130 interrupted,
        143 / 129 terminated by SIGTERM / SIGHUP (pack cleans up first).
        Usage errors, ``--help`` and ``--version`` return too (no ``SystemExit``).

    Raises:
        Only unexpected errors (bugs); expected failures become the exit status above.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return bench.run(argv[1:])
        ap = build_parser()
        try:
            a = ap.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return int(_COMMANDS[a.cmd].run(a))
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
        from ..errors import UnsupportedError

        if isinstance(exc, UnsupportedError):
            print(f"llmio: error: {_error_line(exc)}", file=sys.stderr)
            return 1
        raise
