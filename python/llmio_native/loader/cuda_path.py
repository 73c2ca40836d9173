"""The CUDA path of a TokenLoader pipeline: host-to-device copies on a side stream.

Raw tokens (a ring slot) or host-assembled batches go host-to-device on a side stream;
windows are cut on the GPU by our kernel when it can run; the current (training) stream
waits on an event, never the host. Tensors allocated on the side stream are handed to the
current one with ``record_stream``. Copy and decode times are measured with CUDA timing
events and counted once the events have completed (:meth:`CudaPath.poll_timings`).
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from .._native import _cuda, cuda_usable, warn_cuda_fallback
from ..io import PinnedRing
from .stats import LoaderStats


class CudaPath:
    """Side stream, timing events and the GPU window cut of one pipeline on ``device``."""

    def __init__(self, device: torch.device, batch_size: int, seq_len: int) -> None:
        self.device = device
        self.batch_size, self.seq_len = batch_size, seq_len
        # Our kernels need our CUDA module to see the device (torch seeing it is not enough:
        # _cuda may be built for a newer driver). Without them: host cut/decode + H2D.
        self.kernels = bool(cuda_usable()[0])
        if not self.kernels:
            warn_cuda_fallback("TokenLoader(device='cuda')", "host window cutting and decoding with "
                               "host-to-device copies")
        self.side = torch.cuda.Stream(device=device)
        starts = np.arange(batch_size, dtype=np.int64) * (seq_len + 1)
        with torch.cuda.stream(self.side):  # copied and used on the side stream only
            self.starts_dev = torch.from_numpy(starts).to(device)
        self.timings: deque[tuple[Any, Any, str, int]] = deque()  # (start, end, kind, bytes) CUDA events

    # ---------------------------------------------------------------- timing
    def time(self, start: Any, end: Any, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` and the GPU time between two timing events once ``end`` completed
        (``kind``: ``"h2d"`` or ``"decode"``)."""
        self.timings.append((start, end, kind, nbytes))

    def poll_timings(self, stats: LoaderStats) -> None:
        """Add the completed timings to ``stats`` (never waits)."""
        while self.timings and self.timings[0][1].query():
            a, e, kind, n = self.timings.popleft()
            stats.add_timed(kind, n, a.elapsed_time(e) / 1e3)

    # ---------------------------------------------------------------- batches
    def cut(self, slot: Any, ring: PinnedRing, token_dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """H2D of the slot's raw tokens on the side stream, cut there, current stream waits.

        The slot goes back to ``ring`` once the copy is done."""
        B, T = self.batch_size, self.seq_len
        isz = token_dtype.itemsize
        nbytes = B * (T + 1) * isz
        host = PinnedRing.tensor(slot)[:nbytes]
        dev = self.device
        cur = torch.cuda.current_stream(dev)
        with torch.cuda.stream(self.side):
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(self.side)
            # Async DMA when the arena is page-locked (pin=True, the CUDA default); with
            # pin=False CUDA stages pageable memory and this copy holds the host until done.
            raw = host.to(dev, non_blocking=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(self.side)
            self.time(t0, t1, "h2d", nbytes)
            x = torch.empty((B, T), dtype=torch.int64, device=dev)
            y = torch.empty((B, T), dtype=torch.int64, device=dev)
            _cuda.cut_windows(raw.data_ptr(), isz, B * (T + 1), self.starts_dev.data_ptr(), B, T,
                              x.data_ptr(), y.data_ptr(), self.side.cuda_stream)
            ev = torch.cuda.Event()
            ev.record(self.side)
        # Back to the ring only once the copy is done: the ring reuses the slot when the
        # event completed (its get() synchronizes the oldest one when nothing else is free).
        ring.release(slot, ev)
        cur.wait_event(ev)
        x.record_stream(cur)  # allocated on the side stream, used on the current one
        y.record_stream(cur)
        return x, y

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy a host batch to the device on the side stream; the current stream waits."""
        dev = self.device
        cur = torch.cuda.current_stream(dev)
        with torch.cuda.stream(self.side):
            xp, yp = x.pin_memory(), y.pin_memory()
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(self.side)
            xd = xp.to(dev, non_blocking=True)
            yd = yp.to(dev, non_blocking=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(self.side)
            self.time(t0, t1, "h2d", x.nbytes + y.nbytes)
            ev = torch.cuda.Event()
            ev.record(self.side)
        cur.wait_event(ev)
        xd.record_stream(cur)
        yd.record_stream(cur)
        return xd, yd

    def close(self) -> None:
        """Forget pending timings (the ring, closed by the pipeline, waits for its events)."""
        self.timings.clear()
