"""Counters of a TokenLoader: bytes, seconds and batches of its pipelines."""
from __future__ import annotations

import threading
import time

import numpy as np

from .plan import SourcePlan


class LoaderStats:
    """Counters shared by a loader's pipelines (decode threads update them under ``lock``).

    ``TokenLoader.stats()`` documents the keys of :meth:`as_dict`."""

    def __init__(self, plans: list[SourcePlan]) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.stall_s = 0.0
        self.ring_bytes = 0
        self.ring_read_s = 0.0
        self.read_s = 0.0
        self.compressed_bytes_read = 0
        self.decoded_bytes = 0
        self.decode_s = 0.0
        self.h2d_bytes = 0
        self.h2d_s = 0.0
        self.gpu_decode_bytes = 0
        self.gpu_decode_s = 0.0
        self.verify_bytes = 0
        self.verify_s = 0.0
        self.active_s = 0.0
        self.open: dict[int, float] = {}  # pipeline id -> start time
        self.consumed = np.zeros(len(plans), dtype=np.int64)  # global samples per source
        self.n = np.array([p.n for p in plans], dtype=np.float64)
        self.stored = np.array([p.ds.stored_bytes if p.compressed else 0 for p in plans], dtype=np.float64)

    def begin(self, key: int) -> None:
        """A pipeline ``key`` opened: its wall time counts in ``active_s`` from now."""
        self.open[key] = time.perf_counter()

    def end(self, key: int) -> None:
        """Pipeline ``key`` closed."""
        t0 = self.open.pop(key, None)
        if t0 is not None:
            self.active_s += time.perf_counter() - t0

    def add_timed(self, kind: str, nbytes: int, seconds: float) -> None:
        """Count a GPU-timed transfer (``kind`` ``"h2d"``) or decode (``"decode"``)."""
        if kind == "h2d":
            self.h2d_bytes += nbytes
            self.h2d_s += seconds
        else:
            self.gpu_decode_bytes += nbytes
            self.gpu_decode_s += seconds

    def as_dict(self) -> dict:
        """The counters and the rates derived from them."""
        now = time.perf_counter()
        active = self.active_s + sum(now - t0 for t0 in self.open.values())
        bytes_read = self.ring_bytes + self.compressed_bytes_read + self.verify_bytes
        busy = self.read_s + self.ring_read_s + self.verify_s
        cmask = self.stored > 0
        epochs = self.consumed[cmask] / self.n[cmask]
        consumed_stored = float((epochs * self.stored[cmask]).sum())
        return {
            "batches": self.batches,
            "bytes_read": bytes_read,
            "active_s": active,
            "read_gbps": bytes_read / active / 1e9 if active else 0.0,
            "read_busy_s": busy,
            "read_gbps_busy": bytes_read / busy / 1e9 if busy else 0.0,
            "compressed_bytes_read": self.compressed_bytes_read,
            "decoded_bytes": self.decoded_bytes,
            "decode_s": self.decode_s,
            "decode_gbps": self.decoded_bytes / active / 1e9 if active else 0.0,
            "decode_gbps_per_thread": self.decoded_bytes / self.decode_s / 1e9 if self.decode_s else 0.0,
            "compressed_epochs": consumed_stored / float(self.stored[cmask].sum()) if cmask.any() else 0.0,
            "compressed_read_ratio": self.compressed_bytes_read / consumed_stored if consumed_stored else 0.0,
            "h2d_bytes": self.h2d_bytes,
            "h2d_s": self.h2d_s,
            "h2d_gbps": self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s else 0.0,
            "gpu_decode_bytes": self.gpu_decode_bytes,
            "gpu_decode_s": self.gpu_decode_s,
            "gpu_decode_gbps": self.gpu_decode_bytes / self.gpu_decode_s / 1e9 if self.gpu_decode_s else 0.0,
            "verify_bytes": self.verify_bytes,
            "verify_s": self.verify_s,
            "stall_s": self.stall_s,
            "stall_per_batch_s": self.stall_s / self.batches if self.batches else 0.0,
        }
