"""Shared fixtures: data files, a clean I/O environment, fault injection, backends.

Generic on purpose (every test file may use them); component-specific fixtures
live in their test file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from llmio_native import _core

# Probed once, before any test injects faults (the probe is cached per process
# and _set_faults resets it).
IO_URING_USABLE: bool = bool(_core.probe_io_uring()["usable"])
IO_URING_SKIP_REASON = "io_uring unusable here: " + (_core.probe_io_uring()["reason"] or "?")

BACKENDS = (
    pytest.param("io_uring", marks=pytest.mark.skipif(not IO_URING_USABLE, reason=IO_URING_SKIP_REASON)),
    "threads",
)
"""Both engines; io_uring skipped (with the probe's reason) where it is unusable."""


@dataclass(frozen=True)
class DataFile:
    """A file written by ``make_file``: its path and exact contents."""

    path: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def py_read(path: str, offset: int, nbytes: int) -> bytes:
    """The oracle: a plain Python read of ``[offset, offset + nbytes)``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


@pytest.fixture
def make_file(tmp_path) -> Callable[..., DataFile]:
    """Factory ``make_file(size, name=None, seed=0, directory=None) -> DataFile``.

    Writes ``size`` random bytes (seeded by ``seed`` and ``size``, so equal arguments
    give equal contents) to ``directory`` (default: the test's ``tmp_path``, ext4 here).
    Files written outside ``tmp_path`` are removed when the test ends.
    """
    created: list[str] = []

    def make(size: int, name: str | None = None, seed: int = 0, directory: str | os.PathLike | None = None) -> DataFile:
        data = np.random.default_rng([seed, size]).integers(0, 256, size, dtype=np.uint8).tobytes()
        d = os.fspath(directory) if directory is not None else os.fspath(tmp_path)
        path = os.path.join(d, name or f"data-{size}-{seed}.bin")
        with open(path, "wb") as f:
            f.write(data)
        if directory is not None:
            created.append(path)
        return DataFile(path, data)

    yield make
    for p in created:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


@pytest.fixture
def clean_io_env(monkeypatch):
    """No ``LLMIO_BACKEND`` / ``LLMIO_FAULTS`` in the environment and no injected
    faults, before the test and after it (whatever the test did)."""
    monkeypatch.delenv("LLMIO_BACKEND", raising=False)
    monkeypatch.delenv("LLMIO_FAULTS", raising=False)
    _core._set_faults("")
    yield
    _core._set_faults("")


@pytest.fixture
def faults(clean_io_env) -> Callable[[str], None]:
    """``faults(spec)`` injects test faults (``_core._set_faults``: ``eio:<substring>``,
    ``uring_eperm``, ``uring_enosys``, ``direct_open_einval``, ``direct_read_einval``);
    they are always reset when the test ends."""
    return _core._set_faults


@pytest.fixture(params=BACKENDS)
def backend(request, clean_io_env) -> str:
    """Each read engine in turn: ``"io_uring"`` (skipped where unusable) and ``"threads"``."""
    return request.param
