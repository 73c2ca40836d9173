"""``llmio bench [NAME] [ARGS...]``: run ``benchmarks/bench_NAME.py`` from a source checkout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from ._common import UsageError


def bench_dir() -> Path:
    """The benchmarks folder of a checkout: ``$LLMIO_BENCH_DIR``, else the source tree this
    package runs from (an editable install), else ``./benchmarks`` (run from a checkout with
    the wheel installed).

    Raises:
        Nothing.
    """
    cands = [Path(os.environ["LLMIO_BENCH_DIR"])] if os.environ.get("LLMIO_BENCH_DIR") else []
    # this file is <root>/python/llmio_native/cli/bench.py
    cands += [Path(__file__).resolve().parents[3] / "benchmarks", Path.cwd() / "benchmarks"]
    for d in cands:
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d
    return cands[0]


def add_parser(sub: Any) -> None:
    """Add the ``bench`` subcommand to ``sub`` for ``llmio --help`` (``main`` hands
    ``llmio bench ...`` to :func:`run` before argparse sees it: its arguments are the script's).

    Raises:
        Nothing.
    """
    sub.add_parser("bench", help="run benchmarks/bench_NAME.py from a source checkout (llmio bench --help)",
                   add_help=False)


def run(args: Sequence[str]) -> int:
    """``llmio bench [NAME] [ARGS...]``: run ``benchmarks/bench_NAME.py ARGS`` from the source
    tree (NAME defaults to ``read``); its exit status is ours.

    Raises:
        UsageError: no benchmark NAME.
    """
    d = bench_dir()
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
