"""``PinnedRing``: page-locked host slots filled by C++ producer threads.

The producer side lives in C++ (csrc/ring/slot_ring.hpp): it takes jobs (lists of
``(file, offset, nbytes)`` reads) in submission order, waits for a free slot
(back-pressure), reads through the Reader's engine and marks the slot filled. The
consumer takes filled slots in order as zero-copy views and gives them back.

When CUDA is available the whole arena is page-locked once with ``cudaHostRegister``
(through ``torch.cuda.cudart()``, so the core needs no CUDA) and unregistered on
``close()``; host-to-device copies from slots are then true async DMA.
"""
from __future__ import annotations

import os

from typing import Any, Iterable, Sequence

from ._native import _core
from .reader import Reader


def _cuda_runtime() -> Any:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.cudart()
    except Exception:  # pragma: no cover - torch without CUDA support
        return None
    return None


class PinnedRing:
    """A ring of ``num_slots`` host slots of ``slot_bytes`` each, fed from ``reader``.

    Memory: ``num_slots * slot_bytes`` (rounded up to 4 KiB per slot), mapped at
    construction and released by :meth:`close` (or when the last slot view dies).

    Args:
        reader: the :class:`Reader` whose files the jobs name.
        num_slots: slots in the ring (also the most jobs read ahead).
        slot_bytes: capacity of one slot.
        num_producers: C++ threads filling slots (each runs one job at a time).
        pin: page-lock for CUDA: ``None`` = when CUDA is available, ``True`` = require it.

    Raises:
        ValueError: bad sizes. UnsupportedError: ``pin=True`` without CUDA.
        CudaError: cudaHostRegister failed.
    """

    def __init__(
        self,
        reader: Reader,
        num_slots: int,
        slot_bytes: int,
        num_producers: int = 1,
        pin: bool | None = None,
    ) -> None:
        from .errors import CudaError, UnsupportedError

        self.reader = reader
        self._pid = os.getpid()
        self._ring = _core.SlotRing(reader._handle(), num_slots, slot_bytes, num_producers)
        self._pending_release: list[tuple[Any, Any]] = []
        self._cudart = None
        if pin is not False:
            rt = _cuda_runtime()
            if rt is None and pin:
                self._ring.close()
                raise UnsupportedError("PinnedRing(pin=True) needs CUDA, and torch.cuda is not available")
            if rt is not None:
                err = rt.cudaHostRegister(self._ring.arena_ptr, self._ring.arena_bytes, 0)
                if int(err) != 0:
                    self._ring.close()
                    raise CudaError(f"cudaHostRegister of {self._ring.arena_bytes} bytes failed: {err}")
                self._cudart = rt

    # -- producer side -------------------------------------------------------------
    def required_bytes(self, requests: Sequence[tuple[int, int, int]], packed: bool = False) -> int:
        """Slot bytes a job of ``requests`` needs (aligned layout unless ``packed``)."""
        return self._ring.required_bytes(list(requests), packed)

    def submit(self, requests: Sequence[tuple[int, int, int]], tag: int = 0, packed: bool = False) -> int:
        """Queue a job reading ``(file, offset, nbytes)`` requests into one slot; return its sequence number.

        Raises:
            ValueError: the job does not fit a slot. RuntimeError: the ring is closed.
        """
        self._poll_releases()
        return self._ring.submit(int(tag), [tuple(map(int, r)) for r in requests], packed)

    # -- consumer side -------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Any:
        """Next filled slot, in submission order (a ``RingSlot``: buffer protocol,
        ``.array(k)``, ``.offsets``, ``.nbytes``, ``.tag``, ``.release()``); ``None`` on timeout.

        Waits with the GIL released; Ctrl-C interrupts the wait.

        Raises:
            OSError, ShortReadError: a producer's read failed (message names the job,
                file, offset). RuntimeError: nothing was submitted, every slot is held
                by the consumer, or the ring is closed.
        """
        self._poll_releases()
        return self._ring.get(timeout)

    def release(self, slot: Any, event: Any = None) -> None:
        """Give ``slot`` back; with a ``torch.cuda.Event``, only once the event has completed
        (the copy out of the slot is done)."""
        if event is None:
            slot.release()
        else:
            self._pending_release.append((slot, event))
            self._poll_releases()

    def _poll_releases(self) -> None:
        keep = []
        for slot, event in self._pending_release:
            if event.query():
                slot.release()
            else:
                keep.append((slot, event))
        self._pending_release = keep

    @staticmethod
    def tensor(slot: Any) -> Any:
        """A ``torch.uint8`` CPU tensor viewing the slot's bytes (no copy)."""
        import torch

        return torch.frombuffer(slot, dtype=torch.uint8)

    def close(self) -> None:
        """Stop and join the producers, wait for pending copy events, unpin the arena. Idempotent.

        In a forked child that inherited the ring (its producers do not exist there, and
        CUDA must not be touched) it only drops this process's references."""
        if os.getpid() != self._pid:
            self._pending_release = []
            self._cudart = None
            return
        for slot, event in self._pending_release:
            event.synchronize()
            slot.release()
        self._pending_release = []
        self._ring.close()
        if self._cudart is not None:
            self._cudart.cudaHostUnregister(self._ring.arena_ptr)
            self._cudart = None

    def __enter__(self) -> "PinnedRing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- facts ---------------------------------------------------------------------
    @property
    def pinned(self) -> bool:
        return self._cudart is not None

    @property
    def num_slots(self) -> int:
        return self._ring.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._ring.slot_bytes

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet delivered."""
        return self._ring.pending

    def stats(self) -> dict:
        """submitted, delivered, released, bytes, producer_busy_s, consumer_wait_s (the stall)."""
        return self._ring.stats()


def read_all(ring: PinnedRing, jobs: Iterable[Sequence[tuple[int, int, int]]]) -> Iterable[Any]:
    """Yield the filled slots of ``jobs`` in order, keeping the ring full; the caller releases each."""
    it = iter(jobs)
    inflight = 0
    exhausted = False
    while True:
        while not exhausted and inflight < ring.num_slots:
            try:
                ring.submit(next(it))
                inflight += 1
            except StopIteration:
                exhausted = True
        if inflight == 0:
            return
        slot = ring.get()
        inflight -= 1
        yield slot
