"""SIGTERM and SIGHUP unwind a pack like Ctrl-C does, so that it removes what it wrote."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: While > 0, a stop signal is only recorded (in ``_STOP_PENDING``), not raised: see :func:`signals_held`.
_STOP_HELD = [0]
_STOP_PENDING: list[int] = []


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived during a pack: unwinds like ``KeyboardInterrupt`` so that
    the pack removes its partial output and temp files; ``llmio`` exits with 128 +
    ``signum`` (143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """While active (main thread only), the first SIGTERM or SIGHUP raises
    :class:`Terminated`; later ones are ignored so that the cleanup it starts is not cut
    short. The previous handlers are restored on exit.

    Raises:
        Terminated: (inside the block) a stop signal arrived.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if _STOP_HELD[0]:
            _STOP_PENDING.append(signum)
            return
        raise Terminated(signum)

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    _STOP_PENDING.clear()
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Cleanup that a stop signal must not cut short: one arriving inside is raised as
    :class:`Terminated` when the block ends (unless the block raises).

    Raises:
        Terminated: a stop signal arrived inside the block.
    """
    _STOP_HELD[0] += 1
    try:
        yield
    finally:
        _STOP_HELD[0] -= 1
    if not _STOP_HELD[0] and _STOP_PENDING:
        raise Terminated(_STOP_PENDING.pop())
