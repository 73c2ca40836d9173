"""Where the stream stands when batches are made in DataLoader worker processes.

The rule (every mode): an ``iter()`` continues the stream where the previous one stopped.
In the main process that is the loader's own position. With ``DataLoader(num_workers=n)``
the batches are made in worker processes that hold copies of the loader, so the copies
record their progress in a small shared-memory table (a torch tensor in shared memory:
inherited by fork, passed as a handle to spawn/forkserver workers, copied by value by a
plain ``pickle``/``deepcopy``, which gives an independent loader).

One row per worker id: ``[seq, token, pid, start_pos, pos_after, start_counts...,
counts_after...]`` (a non-zero pid marks a used row). ``token`` identifies one DataLoader iteration (the DataLoader's base
seed, drawn from torch's RNG (or the DataLoader's ``generator``) for every DataLoader
iterator and the same for all its workers, and the worker's count of ``iter()`` calls, the
same for all workers of a persistent pool). A worker starting an iteration takes the start
of a sibling of the same iteration if one already wrote (the sibling may have finished and
exited: DataLoader stops a worker as soon as its share is done), else the furthest position any
earlier iteration reached (the rows are final then: non-persistent workers have exited,
persistent ones have acknowledged the DataLoader's reset). Rows are written under a
sequence counter (odd while a write is in progress, a seqlock): a reader copies the table
and retries until no row changed or was being written during the copy, so it never uses a
half-written row.

What this records is the batches the workers *handed to the DataLoader*. When an
iteration runs to its end (``steps``), that is exactly what the loop consumed; a loop that
breaks early loses the batches the workers had made ahead (at most ``prefetch_factor *
num_workers``), which the next iteration does not repeat. One case this cannot tell apart: resetting
torch's global RNG to the same state before every iteration of a non-persistent DataLoader
(``torch.manual_seed(0)`` each epoch) draws the same base seed, so the iterations look like
one and the stream restarts; pass the DataLoader a ``generator`` or seed once.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

#: Worker ids a table can hold (DataLoader's num_workers above this raises).
MAX_WORKERS = 1024
_SEQ, _TOKEN, _PID, _START, _POS = range(5)
_F = 5  # first count column


def run_token(base_seed: int, iteration: int) -> int:
    """A positive int64 naming one DataLoader iteration (see the module docstring)."""
    h = (int(base_seed) * 0x9E3779B97F4A7C15 + int(iteration) * 0xC2B2AE3D27D4EB4F) & ((1 << 63) - 1)
    return h or 1


class Progress:
    """The shared table of one loader and its copies (see the module docstring)."""

    def __init__(self, num_sources: int) -> None:
        self.n = int(num_sources)
        self.table = torch.zeros((MAX_WORKERS, _F + 2 * self.n), dtype=torch.int64)
        self.table.share_memory_()

    def __getstate__(self) -> dict:
        return {"n": self.n, "table": self.table}

    def __setstate__(self, state: dict) -> None:
        self.n = state["n"]
        self.table = state["table"]
        if not self.table.is_shared():  # a plain pickle copied it: this copy shares with its own workers
            self.table.share_memory_()

    def _rows(self) -> np.ndarray:
        t = self.table.numpy()
        for _ in range(20000):  # a sibling is writing its row: a few microseconds
            s1 = t[:, _SEQ].copy()
            rows = t.copy()
            s2 = t[:, _SEQ].copy()
            if np.array_equal(s1, s2) and not (s1 & 1).any():
                return rows
            time.sleep(0.0001)
        raise RuntimeError("TokenLoader: the DataLoader workers' progress table stayed busy for 2 s")

    def clear(self) -> None:
        """Forget every recorded position (``load_state_dict`` sets a new one)."""
        self.table.zero_()

    def furthest(self, rows: np.ndarray | None = None) -> tuple[int, np.ndarray] | None:
        """``(position, counts)`` after the furthest batch any worker handed out, or None
        (from ``rows``, a snapshot of the table, or a fresh one)."""
        t = self._rows() if rows is None else rows
        used = t[t[:, _PID] != 0]
        if not len(used):
            return None
        r = used[int(np.argmax(used[:, _POS]))]
        return int(r[_POS]), r[_F + self.n:].astype(np.int64)

    def start(self, token: int, pos: int, counts: np.ndarray) -> tuple[int, np.ndarray]:
        """Where the iteration ``token`` starts, for a worker whose copy stands at ``pos``."""
        t = self._rows()
        same = t[(t[:, _TOKEN] == token) & (t[:, _PID] != 0)]
        if len(same):  # a sibling of this iteration wrote first (it may have finished already)
            r = same[0]
            return int(r[_START]), r[_F:_F + self.n].astype(np.int64)
        far = self.furthest(t)  # the rows of earlier iterations are final
        if far is not None and far[0] > pos:
            return far
        return int(pos), np.asarray(counts, dtype=np.int64).copy()

    def record(self, worker: int, token: int, start_pos: int, start_counts: np.ndarray,
               pos_after: int, counts_after: np.ndarray) -> None:
        """Worker ``worker`` of iteration ``token`` handed out a batch, after which the stream
        stands at ``pos_after`` / ``counts_after``."""
        row = self.table.numpy()[worker]
        row[_SEQ] += 1  # odd: being written
        row[_TOKEN] = token
        row[_PID] = os.getpid()
        row[_START] = start_pos
        row[_POS] = pos_after
        row[_F:_F + self.n] = start_counts
        row[_F + self.n:] = counts_after
        row[_SEQ] += 1  # even: complete
