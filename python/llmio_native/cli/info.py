"""``llmio info``: what this build can do here, as JSON."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Add the ``info`` subcommand to ``sub`` (an argparse subparsers action).

    Raises:
        Nothing.
    """
    sub.add_parser("info", help="what this build can do here (JSON)", description="llmio_native.info() as JSON")


def run(a: argparse.Namespace) -> int:
    """``llmio info``: ``llmio_native.info()`` as JSON.

    Raises:
        Nothing (``info()`` reports what it cannot probe).
    """
    import llmio_native as lio

    print(json.dumps(lio.info(), indent=1, default=str))
    return 0
