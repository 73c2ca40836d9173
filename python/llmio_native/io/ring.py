"""``PinnedRing``: page-locked host slots filled by C++ producer threads.

The producer side lives in C++ (csrc/ring/slot_ring.hpp): it takes jobs (lists of
``(file, offset, nbytes)`` reads) in submission order, waits for a free slot
(back-pressure), reads through the Reader's engine and marks the slot filled. The
consumer takes filled slots in order as zero-copy views and gives them back, at once or
behind a fence (a CUDA event): the whole slot lifecycle (free, filling, ready, held,
releasing behind a fence) is the C++ ring's.

When CUDA is available the whole arena is page-locked once with ``cudaHostRegister``
(through ``torch.cuda.cudart()``, so the core needs no CUDA) and unregistered on
``close()``; host-to-device copies from slots are then true async DMA.
"""
from __future__ import annotations

import os

from typing import Any, Iterable, Sequence

from .._native import _core
from .reader import Reader


def _cuda_runtime() -> Any:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.cudart()
    except Exception:  # pragma: no cover - torch without CUDA support
        return None
    return None


# cudaHostRegisterPortable: the pages count as pinned for every CUDA context, not
# only the one current at registration.
CUDA_HOST_REGISTER_PORTABLE = 1


def _clear_cuda_error() -> bool:
    """Reset the CUDA runtime's per-thread "last error" after a failed call.

    torch's ``cudart()`` returns the error of ``cudaHostRegister`` but leaves it set
    as the runtime's last error; the next torch kernel launch check
    (``cudaGetLastError``) would then raise it, attributed to an unrelated op. torch
    does not expose ``cudaGetLastError``, so this calls it in the libcudart that is
    already loaded in the process (the one torch uses; never loads another).
    Returns True when it was cleared."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
    except OSError:  # pragma: no cover - no procfs
        return False
    cleared = False
    for lib in sorted(libs):
        try:
            rt = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
            rt.cudaGetLastError()
            cleared = True
        except (OSError, AttributeError):
            continue
    return cleared


def _cuda_error_text(rt: Any, err: Any) -> str:
    """``cudaErrorName (code): runtime's own description`` for a cudaError returned by
    torch's cudart (whose enum only names ``success``, so ``str(err)`` is ``cudaError.???``)."""
    code = int(err)
    try:
        text = rt.cudaGetErrorString(err)
    except Exception:  # pragma: no cover - a runtime without the call
        text = ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return f"CUDA error {code}: {text}" if text else f"CUDA error {code}"


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True
    import torch

    return torch.device(device).type == "cuda"


def _device_index(device: Any) -> int | None:
    """The CUDA device index of ``device`` (None, int, "cuda", "cuda:1", torch.device);
    None for a non-CUDA device. None means the current device."""
    if device is None:
        return None
    import torch

    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        return None
    return dev.index


class _on_device:
    """Make CUDA device ``index`` current for the block (the host registration then creates
    or uses that device's context, never device 0's). ``None``: leave the current device."""

    def __init__(self, index: int | None) -> None:
        self.index = index
        self._guard: Any = None

    def __enter__(self) -> None:
        if self.index is not None:
            import torch

            self._guard = torch.cuda.device(self.index)
            self._guard.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._guard is not None:
            self._guard.__exit__(*exc)
            self._guard = None


def _cuda_host_call(rt: Any, device: int | None, what: str, fn: str, *args: Any) -> None:
    """Run ``rt.<fn>(*args)`` with ``device`` current. On failure clear the runtime's
    last error (so it is not re-raised by an unrelated torch call) and raise CudaError
    with the runtime's own error string."""
    from ..errors import CudaError

    with _on_device(device):
        err = getattr(rt, fn)(*args)
    if int(err) != 0:
        _clear_cuda_error()
        where = "current device" if device is None else f"cuda:{device}"
        raise CudaError(f"{what} on {where} failed: {_cuda_error_text(rt, err)}")


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
        device: the CUDA device the slots are copied to (``"cuda:1"``, an index, a
            ``torch.device``); the arena is registered there (portable, so copies to
            any device are async), so no context is created on another GPU.
            ``None``: the current device. A CPU device means no page-locking
            (``pin=True`` with a CPU device is a ValueError).

    Raises:
        ValueError: bad sizes or thread counts. UnsupportedError: ``pin=True`` without CUDA.
        ResourceError (an OSError, errno EAGAIN): the OS refused a producer thread.
        CudaError: cudaHostRegister failed (the message carries the runtime's error).
    """

    def __init__(
        self,
        reader: Reader,
        num_slots: int,
        slot_bytes: int,
        num_producers: int = 1,
        pin: bool | None = None,
        *,
        device: Any = None,
    ) -> None:
        from ..errors import UnsupportedError

        self.reader = reader
        self._pid = os.getpid()
        self._cudart = None
        self._device: int | None = None
        cpu_device = False
        if device is not None and pin is not False:
            self._device = _device_index(device)
            cpu_device = self._device is None and not _is_cuda_device(device)
            if cpu_device and pin:
                raise ValueError(f"PinnedRing(pin=True) pins for a CUDA device, got device={device!r}")
        self._ring = _core.SlotRing(reader.native(), num_slots, slot_bytes, num_producers)
        if pin is not False and not cpu_device:
            rt = _cuda_runtime()
            if rt is None and pin:
                self._drop_ring()
                raise UnsupportedError("PinnedRing(pin=True) needs CUDA, and torch.cuda is not available")
            if rt is not None:
                try:
                    if self._device is not None:
                        import torch

                        if not 0 <= self._device < torch.cuda.device_count():
                            raise ValueError(f"device={device!r}: this process sees "
                                             f"{torch.cuda.device_count()} CUDA devices")
                    _cuda_host_call(rt, self._device, f"cudaHostRegister of {self._ring.arena_bytes} bytes",
                                    "cudaHostRegister", self._ring.arena_ptr, self._ring.arena_bytes,
                                    CUDA_HOST_REGISTER_PORTABLE)
                except BaseException:
                    self._drop_ring()
                    raise
                self._cudart = rt

    def _drop_ring(self) -> None:
        """Close the native ring and drop it, so that the arena is unmapped now rather
        than when the constructor's exception (whose traceback holds ``self``) dies."""
        self._ring.close()
        del self._ring

    # -- producer side -------------------------------------------------------------
    def required_bytes(self, requests: Sequence[tuple[int, int, int]], packed: bool = False) -> int:
        """Slot bytes a job of ``requests`` needs (aligned layout unless ``packed``)."""
        return self._ring.required_bytes(list(requests), packed)

    def submit(self, requests: Sequence[tuple[int, int, int]], tag: int = 0, packed: bool = False) -> int:
        """Queue a job reading ``(file, offset, nbytes)`` requests into one slot; return its sequence number.

        Raises:
            ValueError: the job does not fit a slot. RuntimeError: the ring is closed.
        """
        return self._ring.submit(int(tag), [tuple(map(int, r)) for r in requests], packed)

    # -- consumer side -------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Any:
        """Next filled slot, in submission order (a ``RingSlot``: buffer protocol,
        ``.array(k)``, ``.offsets``, ``.nbytes``, ``.tag``, ``.release()``); ``None`` on timeout.

        Waits with the GIL released; Ctrl-C interrupts the wait.

        Raises:
            OSError, ShortReadError: a producer's read failed (message names the job,
                file, offset). RuntimeError: nothing was submitted, every slot is held
                by the consumer, or the ring is closed. Whatever a release fence's
                ``query()``/``synchronize()`` raised.

        When no slot is free or being filled and some wait only on release fences, it
        synchronizes the oldest fence and goes on (it raises only when the consumer
        itself holds every slot).
        """
        return self._ring.get(timeout)

    def release(self, slot: Any, event: Any = None) -> None:
        """Give ``slot`` back; with a ``torch.cuda.Event`` (any fence: ``query() -> bool``,
        ``synchronize()``), only once the event has completed (the copy out of the slot is
        done). The ring queries the fence from ``submit``/``get``/``release``/``poll``/
        ``close`` only. If the fence raises, the exception reaches that call and the slot
        stays releasing (never reused); a later call asks the fence again."""
        slot.release(event)

    def poll(self) -> int:
        """Free the slots released behind fences that have completed; returns how many."""
        return self._ring.poll()

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
            self._cudart = None
            return
        if getattr(self, "_ring", None) is None:  # the constructor failed
            return
        self._ring.close()  # synchronizes the release fences: no copy reads the arena after
        if self._cudart is not None:
            rt, self._cudart = self._cudart, None
            _cuda_host_call(rt, self._device, "cudaHostUnregister of the ring arena",
                            "cudaHostUnregister", self._ring.arena_ptr)

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
    def device(self) -> int | None:
        """CUDA device index the arena is registered on (None: the device current at
        construction, or not pinned)."""
        return self._device

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

    @property
    def held(self) -> int:
        """Slots the consumer holds (delivered, not released)."""
        return self._ring.held

    @property
    def releasing(self) -> int:
        """Slots released behind a fence that has not completed yet."""
        return self._ring.releasing

    def stats(self) -> dict:
        """submitted, delivered, released (free again), releasing (now behind a fence),
        fence_waits (get() synchronized a fence to go on), bytes, producer_busy_s,
        consumer_wait_s (the stall), consumer_waits."""
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
