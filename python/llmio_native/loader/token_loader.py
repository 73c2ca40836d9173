"""TokenLoader: random windows of tokenized corpora, exact and resumable, for one GPU to many nodes."""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .._native import _core, _cuda, cuda_usable, warn_cuda_fallback
from ..errors import UnsupportedError
from ..reader import Reader
from ..ring import PinnedRing
from .order import stride_schedule
from .progress import MAX_WORKERS, Progress, run_token
from .plan import GroupStaging, SourcePlan, fill_staging, gather_parts, plan_group_staging, window_starts

STATE_VERSION = 2  # 2: fingerprint is a dict with a content digest per source
#: Default compressed shuffle granularity: spans of 8 chunks, 8 spans per group.
DEFAULT_SPAN_CHUNKS = 8
DEFAULT_GROUP_SPANS = 8


def _open_source(src: Any) -> Any:
    if hasattr(src, "num_tokens") and hasattr(src, "read"):
        return src
    from ..dataset import open_dataset

    return open_dataset(os.fspath(src))


_MAX_POSITION = 1 << 62
_BACKENDS = ("auto", "io_uring", "threads")


def _int_arg(name: str, v: Any, lo: int | None, hi: int | None = None) -> int:
    """``v`` as an int, refusing bools, floats and strings (no silent truncation)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"TokenLoader({name}=...) must be an int, got {v!r} ({type(v).__name__})")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"TokenLoader({name}={v}): must be {rng}")
    return v


def _check_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"TokenLoader(device={device!r}): not a device ({exc}); use 'cpu' or 'cuda[:i]'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"TokenLoader(device={device!r}): batches can go to 'cpu' or 'cuda[:i]', "
                         f"not {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError(f"TokenLoader(device={str(dev)!r}): torch.cuda is not available here "
                                   "(no GPU or driver); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < n:
            raise ValueError(f"TokenLoader(device={str(dev)!r}): this machine has {n} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _state_int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"TokenLoader state key {key!r} must be an int, got {v!r} ({type(v).__name__})")
    if not 0 <= int(v) < _MAX_POSITION:
        raise ValueError(f"TokenLoader state key {key!r} = {int(v)} is outside [0, 2**62)")
    return int(v)


def _first_difference(saved: Any, here: Any, path: str) -> str | None:
    """Where two fingerprints differ, in words, or None."""
    if isinstance(here, dict):
        if not isinstance(saved, dict):
            return f"{path}: saved {saved!r}, here {here!r}"
        for k in here:
            if k not in saved:
                return f"{path}.{k}: missing from the saved state (here {here[k]!r})"
            d = _first_difference(saved[k], here[k], f"{path}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(here, list):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(here):
            return f"{path}: saved {saved!r}, here {here!r}"
        for i, (a, b) in enumerate(zip(saved, here)):
            d = _first_difference(a, b, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if saved == here else f"{path}: saved {saved!r}, here {here!r}"


def _content_id(ds: Any) -> str | None:
    f = getattr(ds, "content_id", None)
    return f() if callable(f) else None


class _Batch:
    """One planned batch of this rank: (source, window id) per row, and the state after it."""

    __slots__ = ("index", "sources", "windows", "local", "pos_after", "counts_after", "ring_rows", "cache_rows",
                 "gpu_rows", "verify")

    def __init__(self, index: int, sources: np.ndarray, windows: np.ndarray, local: np.ndarray, pos_after: int,
                 counts_after: np.ndarray) -> None:
        self.index = index
        self.sources = sources
        self.windows = windows
        self.local = local
        self.pos_after = pos_after
        self.counts_after = counts_after
        self.ring_rows: list[int] = []
        self.cache_rows: list[int] = []  # compressed rows assembled from the host cache
        self.gpu_rows: list[int] = []  # rans rows gathered from the device token cache
        self.verify: list[tuple[tuple[int, int], cf.Future]] = []  # chunk checks the ring rows wait for


class TokenLoader(torch.utils.data.IterableDataset):
    """Batches of random token windows ``(x, y)``, ``[batch_size, seq_len]`` int64 on ``device``.

    Windows and the drop policy: window ``i`` of a source is tokens
    ``[i*seq_len, i*seq_len + seq_len + 1)``; ``y`` is ``x`` shifted by one. A source has
    ``(num_tokens - 1) // seq_len`` windows; the tail tokens that do not complete a window
    are dropped (the only drop: no window is dropped at an epoch's end, batches run on into
    the next epoch instead).

    Order: the global sample stream is a function of ``(seed, epoch)`` only, never of the
    world size or batch size. Global step ``t`` takes stream positions ``[t*B*W, (t+1)*B*W)``
    and rank ``r`` the slice ``[r*B, (r+1)*B)`` of them, so over an epoch every window is
    produced exactly once across all ranks, and the stream continues into the next epoch
    without a gap (a batch may straddle the boundary). Uncompressed sources are shuffled
    globally by a seeded bijection of window ids per epoch (a Feistel network keyed by
    BLAKE2b of (seed, epoch, source); no index to build, O(1) memory and startup).
    Compressed sources use a chunk-level shuffle with a bounded buffer: spans of
    ``span_chunks`` consecutive chunks are permuted per epoch, ``group_spans`` consecutive
    spans of that order form a group (``shuffle_chunks`` = ``span_chunks * group_spans``
    chunks), and the windows that start in a group are permuted within it (see
    :mod:`llmio_native.loader.plan`). Several sources mix by ``weights`` with deterministic
    stride scheduling (every prefix of the stream within one sample of the ideal counts);
    each source keeps its own position and epoch. Iteration is endless (training loops
    stop by step count) unless ``steps`` is given.

    State: :meth:`state_dict` is a few hundred bytes (stream position, per-source counts, a
    fingerprint of the sources and settings); :meth:`load_state_dict` is O(1), works before
    and during iteration, and resuming reproduces the uninterrupted stream exactly. A batch
    counts as consumed by all ranks, so any rank's state is the global state, and a run may
    resume with another world size or batch size: ranks slice the same stream differently,
    nothing is lost or repeated.

    Pipeline: uncompressed windows are read through the io_uring/thread engine into a ring
    of page-aligned slots (one job per batch, ``prefetch`` batches ahead, each window's bytes
    contiguous) and cut into ``(x, y)`` in C++. Compressed chunks are read and decoded on a
    thread pool, a group at a time, the next group decoded ahead. With ``device="cuda"``
    the slots are pinned, the raw tokens go host-to-device on a side stream, windows are cut
    on the GPU, and the current stream waits on an event (never the host). rans sources on
    CUDA are decoded by the GPU: a group's compressed chunks are staged in pinned memory
    (checksums checked on the host), copied on the side stream, decoded into a device token
    cache and windows gathered there (see ``_GpuDecodePath``); zstd stays a host decode.

    Memory: ``prefetch + 2`` ring slots of ``batch_size * (seq_len + 1)`` tokens; for
    compressed sources about two groups of ``group_spans * (span_chunks + 1)`` decoded
    chunks (144 chunks by default: 19 MB of uint16 at 65536-token chunks).

    Known costs: with W ranks on compressed data every rank decodes the groups its slices
    touch, i.e. every group, so a node decodes each group up to W times (likewise each
    DataLoader worker). A window that spans chunk boundaries of a compressed source costs
    the decode of the next chunk (counted in ``stats()``).

    Args:
        sources: a dataset path, an opened dataset (:func:`llmio_native.open_dataset`), or a
            list of them.
        batch_size: rows per batch on this rank (B).
        seq_len: tokens per row (T).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        weights: sampling proportions of the sources (normalised); default equal.
        seed: the order's seed.
        shuffle: ``False`` walks the windows in order (every source, every epoch).
        rank, world_size: default from ``torch.distributed`` when initialised, else 0 and 1.
        steps: stop an iteration after this many batches (None: endless). Inside a
            ``DataLoader`` with workers, ``steps`` counts the DataLoader's batches.
        prefetch: batches read ahead. backend, direct, queue_depth: read engine options
            (see :class:`llmio_native.Reader`).
        num_threads: decode threads for compressed sources (default: cores).
        span_chunks, group_spans: compressed shuffle granularity (defaults 8 and 8).
        shuffle_chunks: the compressed shuffle buffer in chunks (an alternative to
            ``group_spans``: ``group_spans = ceil(shuffle_chunks / span_chunks)``, and
            ``span_chunks`` is capped at ``shuffle_chunks``).
        pin: page-lock ring slots (default: when ``device`` is CUDA). With ``pin=False`` on
            CUDA the host-to-device copies are synchronous for the host (pageable memory).

    Raises:
        TypeError: an argument of the wrong type (``batch_size="4"``, ``2.5``: never
            truncated), named with its value.
        ValueError: bad sizes, weights, rank/world size, shuffle granularity, backend, a
            device that is not ``cpu``/``cuda[:i]``, or a source without a full window.
        UnsupportedError: ``device`` is CUDA and torch has no usable CUDA device.
        FileNotFoundError, FormatError: a source path cannot be opened as a dataset.
    """

    def __init__(
        self,
        sources: Any,
        batch_size: int = 8,
        seq_len: int = 1024,
        device: str | torch.device = "cpu",
        weights: Sequence[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        steps: int | None = None,
        prefetch: int = 8,
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 64,
        num_threads: int | None = None,
        span_chunks: int = DEFAULT_SPAN_CHUNKS,
        group_spans: int | None = None,
        shuffle_chunks: int | None = None,
        pin: bool | None = None,
    ) -> None:
        super().__init__()
        batch_size = _int_arg("batch_size", batch_size, 1)
        seq_len = _int_arg("seq_len", seq_len, 1)
        seed = _int_arg("seed", seed, None)
        prefetch = _int_arg("prefetch", prefetch, 1, 4096)
        queue_depth = _int_arg("queue_depth", queue_depth, 1, 4096)
        span_chunks = _int_arg("span_chunks", span_chunks, 1)
        if steps is not None:
            steps = _int_arg("steps", steps, 0)
        if num_threads is not None:
            num_threads = _int_arg("num_threads", num_threads, 1, 1024)
        if group_spans is not None:
            group_spans = _int_arg("group_spans", group_spans, 1)
        if shuffle_chunks is not None:
            shuffle_chunks = _int_arg("shuffle_chunks", shuffle_chunks, 1)
        for name, v in (("shuffle", shuffle), ("direct", direct)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"TokenLoader({name}=...) must be a bool, got {v!r}")
        if pin is not None and not isinstance(pin, (bool, np.bool_)):
            raise TypeError(f"TokenLoader(pin=...) must be a bool or None, got {pin!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"TokenLoader(backend={backend!r}): expected one of {', '.join(_BACKENDS)}")
        self.device = _check_device(device)
        if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "num_tokens"):
            sources = [sources]
        if not isinstance(sources, (list, tuple)):
            raise TypeError(f"TokenLoader(sources=...) must be a path, a dataset or a list of them, "
                            f"got {type(sources).__name__}")
        self.datasets = [_open_source(s) for s in sources]
        if not self.datasets:
            raise ValueError("TokenLoader needs at least one source")
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world_size = dist.get_world_size() if world_size is None else world_size
            else:
                rank = 0 if rank is None else rank
                world_size = 1 if world_size is None else world_size
        rank = _int_arg("rank", rank, 0)
        world_size = _int_arg("world_size", world_size, 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        try:
            w = np.ones(len(self.datasets)) if weights is None else np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"weights must be {len(self.datasets)} positive numbers, got {weights!r}") from None
        if w.shape != (len(self.datasets),) or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise ValueError(f"weights must be {len(self.datasets)} positive numbers, got {weights!r}")
        if shuffle_chunks is not None:
            span_chunks = min(span_chunks, shuffle_chunks)
            derived = -(-shuffle_chunks // span_chunks)
            if group_spans is not None and group_spans != derived:
                raise ValueError(f"shuffle_chunks={shuffle_chunks} means group_spans={derived} with span_chunks="
                                 f"{span_chunks}, but group_spans={group_spans} was given: pass one of them")
            group_spans = derived
        group_spans = DEFAULT_GROUP_SPANS if group_spans is None else group_spans
        self.weights = w / w.sum()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, bool(shuffle)
        self.steps = steps
        self.prefetch = prefetch
        self.backend, self.direct, self.queue_depth = backend, bool(direct), queue_depth
        self.num_threads = num_threads or os.cpu_count() or 2
        self.pin = (self.device.type == "cuda") if pin is None else bool(pin)
        self.span_chunks, self.group_spans = span_chunks, group_spans
        self.plans = [SourcePlan(ds, i, self.seq_len, self.seed, self.shuffle, span_chunks, group_spans)
                      for i, ds in enumerate(self.datasets)]
        self._pos = 0
        self._counts = np.zeros(len(self.datasets), dtype=np.int64)
        self._generation = 0  # bumped by load_state_dict: running iterators restart their pipeline
        self._stats = _Stats(self.plans)
        self.last_windows: list[tuple[int, int]] = []
        self._verified: dict[int, np.ndarray] = {}  # source -> chunks of uncompressed sources checked
        self._progress = Progress(len(self.datasets))  # positions reached in DataLoader workers
        self._iterations = 0  # iter() calls on this copy (a persistent worker counts its epochs)

    def _verified_chunks(self, s: int) -> np.ndarray:
        """Bitmap of the chunks of source ``s`` whose checksum passed in this process."""
        v = self._verified.get(s)
        if v is None:
            v = self._verified[s] = np.zeros(len(self.datasets[s].chunks), dtype=bool)
        return v

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        """Batches per epoch on this rank: ``ceil(num_windows / (batch_size * world_size))``.

        Raises:
            TypeError: several sources (a mixture has no common epoch).
        """
        if len(self.plans) != 1:
            raise TypeError("len() is defined for a single source; a mixture has no common epoch")
        gb = self.batch_size * self.world_size
        return -(-self.plans[0].n // gb)

    @property
    def num_windows(self) -> list[int]:
        """Windows per epoch of each source."""
        return [p.n for p in self.plans]

    @property
    def epoch(self) -> int:
        """Current epoch of the first source (completed passes over its windows)."""
        self._catch_up()
        return int(self._counts[0] // self.plans[0].n)

    @property
    def position(self) -> int:
        """Global samples consumed (all ranks): the next step starts at this stream position."""
        self._catch_up()
        return int(self._pos)

    def __getstate__(self) -> dict:
        # Native handles (reader, ring, threads) live only in an iterator's pipeline, never on
        # the loader, so a copy (DataLoader worker, pickle, deepcopy) builds its own lazily.
        # The counters hold a lock and restart in the copy; the progress table is shared with
        # workers (torch's multiprocessing pickler) and copied by a plain pickle.
        state = self.__dict__.copy()
        del state["_stats"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stats = _Stats(self.plans)

    def _catch_up(self) -> None:
        """Take the position DataLoader workers reached if it is ahead of this copy's."""
        far = self._progress.furthest()
        if far is not None and far[0] > self._pos:
            self._pos, self._counts = far

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        return {
            "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
            "weights": [round(float(x), 12) for x in self.weights],
            "sources": [{"num_tokens": int(ds.num_tokens), "dtype": str(np.dtype(ds.dtype)), "codec": ds.codec,
                         "windows": p.n, "content": _content_id(ds),
                         # the shuffle granularity shapes the order of compressed sources only
                         "granularity": [p.span_chunks, p.group_spans] if p.compressed else None}
                        for ds, p in zip(self.datasets, self.plans)],
        }

    def state_dict(self) -> dict:
        """The stream position after the last batch handed out, as a small dict.

        Keys: ``version``, ``position`` (global samples consumed), ``counts`` (samples drawn
        per source), ``fingerprint`` (seq_len, seed, shuffle, weights, and per source
        num_tokens, dtype, codec, windows, shuffle granularity and a digest of the content:
        see ``TokenDataset.content_id``). Every rank's state is the global state (a batch
        counts as consumed by all ranks). The batch size and world size are not part of it.
        With DataLoader workers it is the position after the batches the workers handed out
        (see :mod:`llmio_native.loader.progress`).
        """
        self._catch_up()
        return {"version": STATE_VERSION, "position": int(self._pos), "counts": self._counts.tolist(),
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict`; the next batch continues the stream exactly.

        Works before iteration and during it: a running iterator drops what it read ahead
        and continues from the loaded position at its next batch.

        Raises:
            TypeError: ``sd`` is not a dict, or a value has the wrong type (names the key).
            ValueError: another version, a missing key, a state saved for other sources,
                seq_len, seed, shuffle, weights or shuffle granularity (names what differs),
                or an inconsistent or out-of-range position.
        """
        if not isinstance(sd, dict):
            raise TypeError(f"TokenLoader.load_state_dict expects the dict of state_dict(), got {type(sd).__name__}")
        missing = [k for k in ("version", "position", "counts", "fingerprint") if k not in sd]
        if missing:
            raise ValueError(f"TokenLoader state lacks the key(s) {missing}; keys present: {sorted(map(str, sd))}")
        if sd["version"] != STATE_VERSION:
            raise ValueError(f"TokenLoader state version {sd['version']!r}; this build reads {STATE_VERSION}")
        here = self._fingerprint()
        diff = _first_difference(sd["fingerprint"], here, "fingerprint")
        if diff is not None:
            raise ValueError(f"TokenLoader state was saved for other sources or settings: {diff}")
        pos = _state_int(sd["position"], "position")
        if not isinstance(sd["counts"], (list, tuple, np.ndarray)):
            raise TypeError(f"TokenLoader state key 'counts' must be a list of ints, got {type(sd['counts']).__name__}")
        counts = np.array([_state_int(c, f"counts[{i}]") for i, c in enumerate(sd["counts"])], dtype=np.int64)
        if counts.shape != self._counts.shape:
            raise ValueError(f"TokenLoader state key 'counts' has {len(counts)} entries, the loader has "
                             f"{len(self._counts)} sources")
        if int(counts.sum()) != pos:
            raise ValueError(f"TokenLoader state is inconsistent: counts {counts.tolist()} add up to "
                             f"{int(counts.sum())}, position is {pos}")
        self._pos = pos
        self._counts = counts
        self._progress.clear()
        self._generation += 1

    def stats(self) -> dict:
        """Counters of this loader's iterations so far (all iterators together).

        Keys: ``batches``; ``bytes_read`` (bytes from storage: ring reads and compressed
        chunks); ``active_s`` (wall time iterators were open); ``read_gbps`` (bytes_read /
        active_s: the rate achieved); ``read_busy_s`` (thread-seconds spent reading) and
        ``read_gbps_busy`` (bytes per busy thread-second); ``compressed_bytes_read``,
        ``decoded_bytes``, ``decode_s`` (thread-seconds), ``decode_gbps`` (decoded bytes /
        active_s), ``decode_gbps_per_thread`` (decoded bytes per decode thread-second: the
        per-core decode speed); ``compressed_epochs`` (global epochs of compressed sources
        consumed, weighted by their size) and ``compressed_read_ratio`` (compressed bytes
        read / the compressed size of what was consumed: about 1 + 1/span_chunks per rank);
        ``verify_bytes`` and ``verify_s`` (uncompressed sources: whole chunks read and
        checksummed once per process, the first time a window touches them; included in
        ``bytes_read``/``read_busy_s``); ``stall_s`` and ``stall_per_batch_s`` (time ``next()`` waited for data: reads,
        host decodes, and with the GPU decode path the completion of a group's decode).
        With ``device="cuda"``: ``h2d_bytes`` and ``h2d_s`` (bytes copied host-to-device
        and the GPU-timed seconds of those copies; ``h2d_gbps`` their ratio), and for rans
        sources decoded on the GPU ``gpu_decode_bytes`` (decoded token bytes),
        ``gpu_decode_s`` (GPU-timed seconds of the decode launches) and
        ``gpu_decode_gbps``; the GPU decode does not count in ``decoded_bytes``/``decode_s``
        (host decode only). Bytes and seconds are both added once the work's CUDA events
        have completed, so the rates are exact and the counts trail the work in flight.
        """
        return self._stats.as_dict()

    # ------------------------------------------------------------------ planning
    def _plan_batches(self, pos: int, counts: np.ndarray, first_index: int) -> Iterator[_Batch]:
        B, W, r = self.batch_size, self.world_size, self.rank
        gb = B * W
        counts = counts.copy()
        t = first_index
        mine = slice(r * B, (r + 1) * B)
        while True:
            if len(self.plans) == 1:
                src_r = np.zeros(B, dtype=np.int64)
                local_r = counts[0] + np.arange(r * B, (r + 1) * B, dtype=np.int64)
                new_counts = counts + gb
            else:
                src, new_counts = stride_schedule(counts, self.weights, gb)
                local = np.empty(gb, dtype=np.int64)
                for s in range(len(self.plans)):
                    m = src == s
                    local[m] = counts[s] + np.arange(int(m.sum()), dtype=np.int64)
                src_r, local_r = src[mine], local[mine]
            wins = np.empty(B, dtype=np.int64)
            for s in np.unique(src_r):
                m = src_r == s
                wins[m] = self.plans[int(s)].window_ids(local_r[m])
            yield _Batch(t, src_r, wins, local_r, pos + gb, new_counts)
            pos, counts, t = pos + gb, new_counts, t + 1

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches; see the class docstring.

        Raises:
            ChecksumError, FormatError: a chunk is corrupt (names the file and chunk).
            OSError, ShortReadError: a read failed or a file shrank (names file and offset).
            RuntimeError: ``device`` is CUDA inside a DataLoader worker.
        """
        info = torch.utils.data.get_worker_info()
        stride, offset = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None and self.device.type == "cuda":
            raise RuntimeError("TokenLoader(device='cuda') cannot run inside DataLoader workers (CUDA in "
                               "forked processes); iterate it directly, or use device='cpu' there")
        self._iterations += 1
        token = 0
        if info is None:
            self._catch_up()  # batches made by DataLoader workers count: the stream continues
        else:
            if info.id >= MAX_WORKERS:
                raise ValueError(f"TokenLoader supports DataLoader num_workers <= {MAX_WORKERS}, "
                                 f"got {info.num_workers}")
            # The stream continues across iter() calls here too: every worker of this
            # DataLoader iteration starts at the same position (see loader/progress.py).
            token = run_token(info.seed - info.id, self._iterations)
            self._pos, self._counts = self._progress.start(token, self._pos, self._counts)
        start_pos, start_counts = self._pos, self._counts.copy()
        pipe = None
        try:
            n = 0  # batches of the whole (DataLoader) iteration this worker has passed
            gen = self._generation
            pipe = _Pipeline(self, stride, offset)
            while self.steps is None or offset + n * stride < self.steps:
                if self._generation != gen:  # load_state_dict() while iterating: restart there
                    pipe.close()
                    gen = self._generation
                    pipe = _Pipeline(self, stride, offset)
                batch, x, y = pipe.next()
                self._pos, self._counts = batch.pos_after, batch.counts_after
                self.last_windows = list(zip(batch.sources.tolist(), batch.windows.tolist()))
                if info is not None:
                    self._progress.record(info.id, token, start_pos, start_counts, batch.index,
                                          batch.pos_after, batch.counts_after)
                n += 1
                yield x, y
        finally:
            if pipe is not None:
                pipe.close()


class _Stats:
    """Counters shared by a loader's pipelines (decode threads update them under a lock)."""

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
        self.open[key] = time.perf_counter()

    def end(self, key: int) -> None:
        t0 = self.open.pop(key, None)
        if t0 is not None:
            self.active_s += time.perf_counter() - t0

    def as_dict(self) -> dict:
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


class _Pipeline:
    """The native side of one iteration: a reader, a ring, a decode pool; closed when done."""

    def __init__(self, loader: TokenLoader, stride: int, offset: int) -> None:
        self.L = loader
        self.stats = loader._stats
        self.closed = False
        self.ring: PinnedRing | None = None
        self.pool: cf.ThreadPoolExecutor | None = None
        self.vpool: cf.ThreadPoolExecutor | None = None
        self.vfut: dict[tuple[int, int], cf.Future] = {}
        self.gpu: _GpuDecodePath | None = None
        self.timings: deque[tuple[Any, Any, str, int]] = deque()  # (start, end, kind, bytes) CUDA events
        self.stats.begin(id(self))
        try:
            self._open(loader, stride, offset)
        except BaseException:
            self.close()
            raise

    def _open(self, loader: TokenLoader, stride: int, offset: int) -> None:
        paths: list[str] = []
        self.file_base: list[int] = []
        for ds in loader.datasets:
            self.file_base.append(len(paths))
            paths.extend(ds.paths)
        self.reader = Reader(paths, backend=loader.backend, direct=loader.direct, queue_depth=loader.queue_depth)
        T, B = loader.seq_len, loader.batch_size
        self.raw = [p for p in loader.plans if not p.compressed]
        itemsizes = {np.dtype(ds.dtype).itemsize for ds in loader.datasets}
        slot_bytes = B * (T + 1) * max(itemsizes) + 8192
        self._ring_seen = (0, 0.0)
        if self.raw:
            self.ring = PinnedRing(self.reader, num_slots=loader.prefetch + 2, slot_bytes=slot_bytes,
                                   num_producers=min(4, loader.prefetch), pin=loader.pin,
                                   device=loader.device if loader.device.type == "cuda" else None)
        if any(p.compressed for p in loader.plans):
            self.pool = cf.ThreadPoolExecutor(loader.num_threads, thread_name_prefix="llmio-decode")
        # Uncompressed sources: the ring reads only each window's bytes, so every chunk a
        # window touches is read whole and checked once (per loader and process) on this
        # pool, ahead, before the first batch holding its tokens is handed out.
        if any(not p.compressed and p.ds.has_checksums for p in loader.plans):
            self.vpool = cf.ThreadPoolExecutor(min(4, loader.num_threads), thread_name_prefix="llmio-verify")
        self.cache: dict[tuple[int, int], tuple[cf.Future, int]] = {}  # (source, chunk) -> (future, expires)
        self.opened_groups: set[tuple[int, int, int]] = set()  # (source, epoch, group)
        gb = B * loader.world_size
        self.first = loader._pos // gb
        self.batches = loader._plan_batches(loader._pos, loader._counts, self.first)
        self.last_counts = loader._counts.copy()
        self.stride, self.offset = stride, offset
        self.ahead: deque[_Batch] = deque()
        dt = {np.dtype(ds.dtype) for ds in loader.datasets}
        # One token type of 2 or 4 bytes in the ring and nothing compressed: cut in one call.
        self.uniform = len(dt) == 1 and next(iter(dt)).itemsize in (2, 4) and not any(
            p.compressed for p in loader.plans)
        self.token_dtype = next(iter(dt))
        # Signed token files (Megatron int16/int32): a negative value is refused, never read
        # as a large unsigned id (the same rule as TokenDataset.read).
        self.signed = any(d.kind == "i" for d in dt)
        self.starts_host = np.arange(B, dtype=np.int64) * (T + 1)
        self.cuda = loader.device.type == "cuda"
        # Our kernels need our CUDA module to see the device (torch seeing it is not enough:
        # _cuda may be built for a newer driver). Without them: host cut/decode + H2D.
        self.kernels = self.cuda and cuda_usable()[0]
        if self.cuda and not self.kernels:
            warn_cuda_fallback("TokenLoader(device='cuda')", "host window cutting and decoding with "
                               "host-to-device copies")
        if self.cuda:
            self.side = torch.cuda.Stream(device=loader.device)
            with torch.cuda.stream(self.side):  # copied and used on the side stream only
                self.starts_dev = torch.from_numpy(self.starts_host).to(loader.device)
            self.release_events: deque[Any] = deque()
        # rans sources: GPU decode (device cache) when our CUDA kernels can run; the host
        # emulation of the same path on a CPU loader is a test hook (_emulate_gpu_decode).
        rans_src = [ds.codec == "rans" for ds in loader.datasets]
        self.gpu_src = [False] * len(rans_src)
        if any(rans_src) and (self.kernels or getattr(loader, "_emulate_gpu_decode", False)):
            self.gpu_src = rans_src
            self.gpu = _GpuDecodePath(self, emulate=not self.cuda)
        self._fill()

    # ---------------------------------------------------------------- planning ahead
    def _next_plan(self) -> _Batch:
        while True:
            b = next(self.batches)
            if (b.index - self.first - self.offset) % self.stride == 0:
                return b

    def _fill(self) -> None:
        while len(self.ahead) < self.L.prefetch:
            b = self._next_plan()
            self._submit(b)
            self.ahead.append(b)

    def _submit(self, b: _Batch) -> None:
        L = self.L
        reqs: list[tuple[int, int, int]] = []
        if len(L.plans) == 1 and not L.plans[0].compressed:
            b.ring_rows = list(range(len(b.windows)))
            reqs = L.plans[0].raw_requests(b.windows, self.file_base[0])
        else:
            for row, (s, w) in enumerate(zip(b.sources.tolist(), b.windows.tolist())):
                plan = L.plans[s]
                if not plan.compressed:
                    b.ring_rows.append(row)
                    reqs.extend(plan.raw_requests(np.array([w]), self.file_base[s]))
                elif self.gpu_src[s]:
                    b.gpu_rows.append(row)
                else:
                    b.cache_rows.append(row)
            # GPU path: the batch's groups, then the groups after them, are staged and decoded
            # a whole group at a time (read and checked on the pool, decoded on the device).
            for row in b.gpu_rows:
                key = self._group_key(int(b.sources[row]), int(b.local[row]))
                if key not in self.gpu.jobs:
                    self.gpu.open(key)
                    s, e, g = key
                    self.gpu.open((s, *L.plans[s].next_group(e, g)))
            # Chunks this batch needs go to the decode queue first, then the rest of their
            # groups, then the groups after them (decoded while these are consumed).
            opened = []
            for row in b.cache_rows:
                s, w = int(b.sources[row]), int(b.windows[row])
                key = self._group_key(s, int(b.local[row]))
                if key in self.opened_groups:
                    continue
                expires = L.plans[s].group_end_position(key[1], key[2])
                c0, c1 = L.plans[s].chunks_of_window(w)
                for c in range(c0, c1 + 1):
                    self._want(s, c, expires)
                opened.append(key)
            for key in opened:
                self._open_group(key)
            for s, e, g in opened:
                ne, ng = L.plans[s].next_group(e, g)
                self._open_group((s, ne, ng))
        if reqs:
            if self.vpool is not None:
                self._verify_ahead(b)
            self.ring.submit(reqs, tag=b.index, packed=True)

    def _verify_ahead(self, b: _Batch) -> None:
        """Queue the checks of the not yet verified chunks the ring rows of ``b`` read."""
        L = self.L
        rows = np.asarray(b.ring_rows, dtype=np.int64)
        srcs, wins = b.sources[rows], b.windows[rows]
        for s in np.unique(srcs).tolist():
            plan = L.plans[s]
            if not plan.ds.has_checksums:
                continue
            done = L._verified_chunks(s)
            cs = plan.raw_chunks(wins[srcs == s])
            for c in cs[~done[cs]].tolist():
                f = self.vfut.get((s, c))
                if f is None:
                    f = self.vfut[(s, c)] = self.vpool.submit(self._verify_chunk, s, c)
                b.verify.append(((s, c), f))

    def _verify_chunk(self, s: int, c: int) -> None:
        ds = self.L.datasets[s]
        row = ds.chunks[c]
        t0 = time.perf_counter()
        raw = self.reader.read(self.file_base[s] + int(row["file"]), int(row["offset"]), int(row["stored_bytes"]))
        ds.check_chunk(c, raw)
        with self.stats.lock:
            self.stats.verify_bytes += raw.nbytes
            self.stats.verify_s += time.perf_counter() - t0

    def _wait_verified(self, b: _Batch) -> None:
        """Every chunk the ring rows of ``b`` read has passed its checksum (or this raises)."""
        for key, f in b.verify:
            if not f.done():
                t0 = time.perf_counter()
                cf.wait([f])
                self.stats.stall_s += time.perf_counter() - t0
            f.result()  # ChecksumError / FormatError / OSError naming the chunk
            self.L._verified_chunks(key[0])[key[1]] = True
            self.vfut.pop(key, None)

    def _group_key(self, s: int, local_pos: int) -> tuple[int, int, int]:
        plan = self.L.plans[s]
        epoch, j = divmod(local_pos, plan.n)
        return (s, epoch, plan.group_of(epoch, j))

    def _want(self, s: int, c: int, expires: int) -> None:
        old = self.cache.get((s, c))
        if old is not None:
            if expires > old[1]:
                self.cache[(s, c)] = (old[0], expires)
        else:
            self.cache[(s, c)] = (self.pool.submit(self._decode, s, c), expires)

    def _open_group(self, key: tuple[int, int, int]) -> None:
        if key in self.opened_groups:
            return
        self.opened_groups.add(key)
        s, epoch, g = key
        plan = self.L.plans[s]
        expires = plan.group_end_position(epoch, g)
        for c in plan.group_chunks(epoch, g):
            self._want(s, c, expires)

    def _decode(self, s: int, c: int) -> np.ndarray:
        ds = self.L.datasets[s]
        row = ds.chunks[c]
        t0 = time.perf_counter()
        raw = self.reader.read(self.file_base[s] + int(row["file"]), int(row["offset"]), int(row["stored_bytes"]))
        t1 = time.perf_counter()
        tokens = ds.decode_chunk(c, raw)
        t2 = time.perf_counter()
        st = self.stats
        with st.lock:
            st.compressed_bytes_read += raw.nbytes
            st.read_s += t1 - t0
            st.decoded_bytes += tokens.nbytes
            st.decode_s += t2 - t1
        return tokens

    def _chunk(self, s: int, c: int) -> np.ndarray:
        ent = self.cache.get((s, c))
        if ent is None:  # outside every open group's set (cannot happen by construction): decode now
            ent = (self.pool.submit(self._decode, s, c), 0)
            self.cache[(s, c)] = ent
        fut = ent[0]
        if not fut.done():
            t0 = time.perf_counter()
            arr = fut.result()
            self.stats.stall_s += time.perf_counter() - t0
            return arr
        return fut.result()

    def _evict(self, consumed: np.ndarray) -> None:
        for key in [k for k, (_, exp) in self.cache.items() if exp <= consumed[k[0]]]:
            del self.cache[key]
        self.opened_groups = {k for k in self.opened_groups
                              if self.L.plans[k[0]].group_end_position(k[1], k[2]) > consumed[k[0]]}

    # ---------------------------------------------------------------- assembly
    def next(self) -> tuple[_Batch, torch.Tensor, torch.Tensor]:
        L = self.L
        b = self.ahead.popleft()
        B, T = L.batch_size, L.seq_len
        slot = None
        if b.ring_rows:
            t0 = time.perf_counter()
            slot = self.ring.get()
            self.stats.stall_s += time.perf_counter() - t0
            if slot.tag != b.index:  # pragma: no cover - the ring delivers in order
                raise RuntimeError(f"ring delivered batch {slot.tag}, expected {b.index}")
            if b.verify:
                self._wait_verified(b)
            if self.signed:
                self._check_token_ids(b, slot)
        if self.gpu is not None:
            self.gpu.pump()
        self._poll_timings()
        if b.gpu_rows:
            xt, yt = self.gpu.assemble(b, slot)
        elif self.uniform and not self.cuda:
            tokens = np.frombuffer(slot, dtype=self.token_dtype, count=B * (T + 1))
            x, y = _core.cut_windows_ref(tokens, self.starts_host, T)
            slot.release()
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        elif self.uniform and self.kernels:
            xt, yt = self._cut_on_gpu(slot)
        else:
            stage = self._host_rows(b, slot, list(range(B)))
            xt = torch.from_numpy(np.ascontiguousarray(stage[:, :-1]))
            yt = torch.from_numpy(np.ascontiguousarray(stage[:, 1:]))
            if self.cuda:
                xt, yt = self._to_device(xt, yt)
        st = self.stats
        if self.ring is not None:  # ring counters restart per iterator: add their deltas
            rs = self.ring.stats()
            st.ring_bytes += rs["bytes"] - self._ring_seen[0]
            st.ring_read_s += rs["producer_busy_s"] - self._ring_seen[1]
            self._ring_seen = (rs["bytes"], rs["producer_busy_s"])
        st.batches += 1
        st.consumed += b.counts_after - self.last_counts
        self.last_counts = b.counts_after
        if b.cache_rows or self.cache:
            self._evict(b.counts_after)
        if self.gpu is not None:
            self.gpu.evict(b.counts_after)
        self._fill()
        return b, xt, yt

    def _check_token_ids(self, b: _Batch, slot: Any) -> None:
        """Raise FormatError (naming file and offset) if a ring row of ``b`` holds a negative id."""
        L = self.L
        n = L.seq_len + 1
        off = 0
        for row in b.ring_rows:
            s = int(b.sources[row])
            ds = L.datasets[s]
            dt = np.dtype(ds.dtype)
            if dt.kind == "i":
                ds.check_token_ids(np.frombuffer(slot, dtype=dt, count=n, offset=off), int(b.windows[row]) * L.seq_len)
            off += n * dt.itemsize

    def _host_rows(self, b: _Batch, slot: Any, rows: list[int]) -> np.ndarray:
        """``[len(rows), T + 1]`` int64 windows of the host rows (ring and host cache) of
        ``b``, ``rows`` being all of them in batch order; releases ``slot``."""
        L = self.L
        T = L.seq_len
        stage = np.empty((len(rows), T + 1), dtype=np.int64)
        at = {row: i for i, row in enumerate(rows)}
        if slot is not None:
            off = 0
            for row in b.ring_rows:
                dt = np.dtype(L.datasets[int(b.sources[row])].dtype)
                stage[at[row]] = np.frombuffer(slot, dtype=dt, count=T + 1, offset=off)
                off += (T + 1) * dt.itemsize
            slot.release()
        for row in b.cache_rows:
            stage[at[row]] = self._window_from_cache(int(b.sources[row]), int(b.windows[row]))
        return stage

    def _time(self, start: Any, end: Any, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` and the GPU time between two timing events once ``end`` completed."""
        self.timings.append((start, end, kind, nbytes))

    def _poll_timings(self) -> None:
        st = self.stats
        while self.timings and self.timings[0][1].query():
            a, e, kind, n = self.timings.popleft()
            sec = a.elapsed_time(e) / 1e3
            if kind == "h2d":
                st.h2d_bytes += n
                st.h2d_s += sec
            else:
                st.gpu_decode_bytes += n
                st.gpu_decode_s += sec

    def _window_from_cache(self, s: int, w: int) -> np.ndarray:
        plan = self.L.plans[s]
        T = self.L.seq_len
        a, e = w * T, w * T + T + 1
        c0, c1 = plan.chunks_of_window(w)
        parts = []
        for c in range(c0, c1 + 1):
            tok = self._chunk(s, c)
            f = int(plan.chunk_first[c])
            parts.append(tok[max(a, f) - f: min(e, f + len(tok)) - f])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _cut_on_gpu(self, slot: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """H2D of the slot's raw tokens on the side stream, cut there, current stream waits."""
        L = self.L
        B, T = L.batch_size, L.seq_len
        isz = self.token_dtype.itemsize
        nbytes = B * (T + 1) * isz
        host = PinnedRing.tensor(slot)[:nbytes]
        dev = L.device
        cur = torch.cuda.current_stream(dev)
        with torch.cuda.stream(self.side):
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(self.side)
            # Async DMA when the arena is page-locked (pin=True, the CUDA default); with
            # pin=False CUDA stages pageable memory and this copy holds the host until done.
            raw = host.to(dev, non_blocking=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(self.side)
            self._time(t0, t1, "h2d", nbytes)
            x = torch.empty((B, T), dtype=torch.int64, device=dev)
            y = torch.empty((B, T), dtype=torch.int64, device=dev)
            _cuda.cut_windows(raw.data_ptr(), isz, B * (T + 1), self.starts_dev.data_ptr(), B, T,
                              x.data_ptr(), y.data_ptr(), self.side.cuda_stream)
            ev = torch.cuda.Event()
            ev.record(self.side)
        self.ring.release(slot, ev)  # back to the ring only once the copy is done
        # The ring's get() refuses to wait when the consumer holds every slot; slots whose
        # release waits on an event count as held, so never let those pile up.
        self.release_events.append(ev)
        while len(self.release_events) > max(1, self.ring.num_slots - 2):
            self.release_events.popleft().synchronize()
        cur.wait_event(ev)
        x.record_stream(cur)  # allocated on the side stream, used on the current one
        y.record_stream(cur)
        return x, y

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.L.device
        cur = torch.cuda.current_stream(dev)
        with torch.cuda.stream(self.side):
            xp, yp = x.pin_memory(), y.pin_memory()
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(self.side)
            xd = xp.to(dev, non_blocking=True)
            yd = yp.to(dev, non_blocking=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(self.side)
            self._time(t0, t1, "h2d", x.nbytes + y.nbytes)
            ev = torch.cuda.Event()
            ev.record(self.side)
        cur.wait_event(ev)
        xd.record_stream(cur)
        yd.record_stream(cur)
        return xd, yd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.end(id(self))
        try:
            for pool in (self.pool, self.vpool):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.vfut = {}
            self.cache = {}
            if self.gpu is not None:
                self.gpu.close()
            self.timings.clear()
            if self.ring is not None:
                self.ring.close()  # waits for pending copy events, joins the producers
                self.ring = None
            self.reader = None


# ---------------------------------------------------------------------------------------
# GPU decode path of rans sources. Per decode group (the chunks of one shuffle group of a
# source, ``SourcePlan.group_chunks``): a pool thread reads the compressed chunks into one
# pinned staging buffer (payloads 4-byte aligned, see plan.plan_group_staging) and checks
# their checksums; the consumer thread then copies the buffer to the device on the side
# stream and launches the rans kernel there, writing the group's tokens into one device
# buffer (the device token cache, one buffer per group, dropped like the host cache once
# the stream has passed the group). A batch's rans windows are gathered from those buffers
# on the side stream (one advanced-indexing op per buffer: start + arange(T + 1)), and the
# current stream waits on an event. The host never touches a token.
#
# Decode errors: the kernel writes a status per chunk; it is copied to pinned host memory
# on the side stream behind an event, and checked when the first batch that gathers from
# the group is assembled: by then the event has normally completed (the group was launched
# while the previous one was consumed) and the check costs nothing; otherwise the host
# waits for that side-stream event (counted in stall_s; the training stream is never
# synchronised). A bad status raises FormatError naming the shard and chunk before any
# batch holding tokens of that group is handed out, so wrong tokens never come out.

_SIGNED = {2: torch.int16, 4: torch.int32}
_UNSIGNED_NP = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_SIGNED_NP = {2: np.dtype("<i2"), 4: np.dtype("<i4")}
_MASK = {2: 0xFFFF, 4: 0xFFFFFFFF}


def place_plain_chunks(staging: GroupStaging, src: torch.Tensor, out: torch.Tensor) -> None:
    """Copy the staged tokens of the chunks the kernel does not decode (raw chunks, host
    decoded ones) from ``src`` (the staging bytes, uint8) into ``out`` (token buffer of
    int16/int32 standing for uint16/uint32). Runs on any device; consecutive chunks are
    merged into one copy when they are adjacent in both buffers."""
    tb = staging.token_bytes
    ks = np.flatnonzero(~staging.gpu).tolist()
    i = 0
    while i < len(ks):
        k = ks[i]
        so, oo = int(staging.src_offsets[k]), int(staging.out_offsets[k])
        n = int(staging.token_counts[k])
        while (i + 1 < len(ks) and ks[i + 1] == ks[i] + 1
               and int(staging.src_offsets[ks[i + 1]]) == so + n * tb
               and int(staging.out_offsets[ks[i + 1]]) == oo + n):
            i += 1
            n += int(staging.token_counts[ks[i]])
        out[oo:oo + n].copy_(src[so:so + n * tb].view(out.dtype))
        i += 1


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Windows ``tokens[start : start + T + 1]`` for each start, as ``[n, T + 1]`` int64.

    ``tokens`` is a token buffer (int16/int32 standing for uint16/uint32), ``starts`` an
    int64 tensor of first tokens and ``offsets`` ``arange(T + 1)``, all on one device: one
    gather, one widening, one mask, whatever the device."""
    w = tokens[starts[:, None] + offsets[None, :]].to(torch.int64)
    return w.bitwise_and_(_MASK[tokens.element_size()])


class _GroupJob:
    """One decode group of the GPU path: staged on the pool, decoded on the device."""

    __slots__ = ("key", "expires", "future", "staging", "tokens", "status", "event", "checked")

    def __init__(self, key: tuple[int, int, int], expires: int, future: cf.Future) -> None:
        self.key = key
        self.expires = expires
        self.future: cf.Future | None = future  # -> (GroupStaging, pinned host buffer)
        self.staging: GroupStaging | None = None
        self.tokens: Any = None  # device token buffer once launched
        self.status: Any = None  # per GPU chunk status (pinned host tensor or numpy)
        self.event: Any = None  # completes when ``status`` is valid (None: already valid)
        self.checked = False


class _GpuDecodePath:
    """The device token cache of rans sources (see the comment above).

    With ``emulate=True`` (a CPU loader, for tests) the same planning, staging, checks,
    gathers and error reporting run on the host: the kernel is replaced by its host
    emulation (``dataset.rans.emulate``) and device tensors by CPU tensors.
    """

    def __init__(self, pipe: "_Pipeline", emulate: bool) -> None:
        from ..dataset import rans

        self.pipe, self.L, self.emulate = pipe, pipe.L, emulate
        self.stats = pipe.stats
        self.rans = rans
        self.jobs: dict[tuple[int, int, int], _GroupJob] = {}
        T = self.L.seq_len
        if emulate:
            self.dev = torch.device("cpu")
            self.offsets = torch.arange(T + 1, dtype=torch.int64)
        else:
            self.dev = self.L.device
            self.side = pipe.side
            self.decoder = rans.GpuDecoder(self.dev)
            with torch.cuda.stream(self.side):
                self.offsets = torch.arange(T + 1, dtype=torch.int64, device=self.dev)

    # ---------------------------------------------------------------- staging (pool)
    def open(self, key: tuple[int, int, int]) -> None:
        if key in self.jobs:
            return
        s, epoch, g = key
        plan = self.L.plans[s]
        chunks = plan.group_chunks(epoch, g)
        fut = self.pipe.pool.submit(self._stage, s, chunks)
        self.jobs[key] = _GroupJob(key, plan.group_end_position(epoch, g), fut)

    def _stage(self, s: int, chunks: list[int]) -> tuple[GroupStaging, Any]:
        ds = self.L.datasets[s]
        t0 = time.perf_counter()
        st = plan_group_staging(ds, chunks)
        if self.emulate:
            host = np.empty(st.staging_bytes, dtype=np.uint8)
            view = host
        else:
            host = torch.empty(st.staging_bytes, dtype=torch.uint8, pin_memory=True)
            view = host.numpy()
        fb = self.pipe.file_base[s]
        reader = self.pipe.reader
        fill_staging(ds, st, view, lambda reqs: reader.read_batch_into([(fb + f, o, b) for f, o, b in reqs]))
        t1 = time.perf_counter()
        with self.stats.lock:
            self.stats.compressed_bytes_read += int(st.stored_bytes.sum())
            self.stats.read_s += t1 - t0
        return st, host

    # ---------------------------------------------------------------- decode (consumer thread)
    def pump(self) -> None:
        """Launch every group whose staging is done (a staging that failed raises later, when
        a batch needs that group, like the host path)."""
        for job in list(self.jobs.values()):
            if (job.tokens is None and job.future is not None and job.future.done()
                    and job.future.exception() is None):
                self._launch(job)

    def _launch(self, job: _GroupJob) -> None:
        fut = job.future
        if not fut.done():
            t0 = time.perf_counter()
            fut.result()
            self.stats.stall_s += time.perf_counter() - t0
        st, host = fut.result()  # raises the pool's ChecksumError / OSError here
        job.future = None
        job.staging = st
        tb = st.token_bytes
        ngpu = len(st.chunk_desc)
        if self.emulate:
            out = np.zeros(st.num_tokens, dtype=_UNSIGNED_NP[tb])
            src = torch.from_numpy(host)
            tokens = torch.from_numpy(out.view(_SIGNED_NP[tb]))
            place_plain_chunks(st, src, tokens)
            if ngpu:
                job.status = self.rans.emulate(host, st.chunk_desc, st.block_desc, st.models, out)
            else:
                job.status = np.zeros(0, dtype=np.int32)
            job.tokens = tokens
            self.stats.h2d_bytes += st.staging_bytes
            self.stats.gpu_decode_bytes += st.decoded_bytes
            return
        side = self.side
        with torch.cuda.stream(side):
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record(side)
            src = host.to(self.dev, non_blocking=True)  # pinned: async DMA on the side stream
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record(side)
            tokens = torch.empty(st.num_tokens, dtype=_SIGNED[tb], device=self.dev)
            place_plain_chunks(st, src, tokens)
            if ngpu:
                status = self.decoder.decode(src, st.chunk_desc, st.block_desc, st.models, tokens, side)
                e2 = torch.cuda.Event(enable_timing=True)
                e2.record(side)
                sh = torch.empty(ngpu, dtype=torch.int32, pin_memory=True)
                sh.copy_(status, non_blocking=True)
            else:
                e2 = None
                sh = torch.zeros(0, dtype=torch.int32)
            ev = torch.cuda.Event()
            ev.record(side)
        # host and src are freed here; the caching allocators keep both until the side
        # stream is past the copy and the kernel (stream-ordered / recorded events).
        self.pipe._time(e0, e1, "h2d", st.staging_bytes)
        if e2 is not None:
            self.pipe._time(e1, e2, "decode", st.decoded_bytes)
        job.tokens, job.status, job.event = tokens, sh, ev

    def _check(self, job: _GroupJob, wait: bool) -> bool:
        """True once ``job``'s statuses are known good; raises FormatError on a bad chunk."""
        if job.checked:
            return True
        if job.event is not None and not job.event.query():
            if not wait:
                return False
            t0 = time.perf_counter()
            job.event.synchronize()  # a side-stream event: the training stream is not touched
            self.stats.stall_s += time.perf_counter() - t0
        status = job.status.numpy() if isinstance(job.status, torch.Tensor) else job.status
        ds = self.L.datasets[job.key[0]]
        gpu_chunks = job.staging.chunks[job.staging.gpu]  # status i belongs to the i-th GPU chunk

        self.rans.check_status(status, lambda i: ds.describe_chunk(int(gpu_chunks[i])),
                               lambda i: ds.chunk_origin(int(gpu_chunks[i])))
        job.checked = True
        job.status = job.event = None
        return True

    def _ready(self, key: tuple[int, int, int]) -> _GroupJob:
        job = self.jobs.get(key)
        if job is None:  # not opened by _submit (cannot happen by construction): open now
            self.open(key)
            job = self.jobs[key]
        if job.tokens is None:
            self._launch(job)
        self._check(job, wait=True)
        return job

    # ---------------------------------------------------------------- batches
    def assemble(self, b: _Batch, slot: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of batch ``b``: rans rows gathered on the device, the others (ring
        rows, host-decoded sources of a mixture) assembled on the host and copied."""
        pipe, L = self.pipe, self.L
        B, T = L.batch_size, L.seq_len
        rows = np.asarray(b.gpu_rows, dtype=np.int64)
        keys = [pipe._group_key(int(b.sources[r]), int(b.local[r])) for r in b.gpu_rows]
        starts = np.empty(len(rows), dtype=np.int64)
        jobs = {}
        for key in dict.fromkeys(keys):
            jobs[key] = job = self._ready(key)
            m = np.array([k == key for k in keys])
            starts[m] = window_starts(L.plans[key[0]], job.staging, b.windows[rows[m]])
        parts = [(jobs[k], rows[r], st) for k, r, st in gather_parts(keys, starts)]
        host_rows = sorted(set(range(B)) - set(b.gpu_rows))
        hstage = pipe._host_rows(b, slot, host_rows) if host_rows else None
        whole = len(parts) == 1 and not host_rows and np.array_equal(parts[0][1], np.arange(B))
        if self.emulate:
            return self._cut(parts, [torch.from_numpy(p[1]) for p in parts], [torch.from_numpy(p[2]) for p in parts],
                             host_rows, None if hstage is None else torch.from_numpy(hstage), whole)
        # One small H2D of every index (rows, starts, host rows) and, in mixtures, the host rows.
        meta = np.concatenate([p[1] for p in parts] + [p[2] for p in parts]
                              + [np.asarray(host_rows, dtype=np.int64)]).astype(np.int64)
        cur = torch.cuda.current_stream(self.dev)
        with torch.cuda.stream(self.side):
            md = torch.from_numpy(meta).pin_memory().to(self.dev, non_blocking=True)
            hd = None
            if hstage is not None:
                hp = torch.from_numpy(hstage).pin_memory()
                t0 = torch.cuda.Event(enable_timing=True)
                t0.record(self.side)
                hd = hp.to(self.dev, non_blocking=True)
                t1 = torch.cuda.Event(enable_timing=True)
                t1.record(self.side)
                pipe._time(t0, t1, "h2d", hstage.nbytes)
            sizes = [len(p[1]) for p in parts]
            cuts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            n = cuts[-1]
            rows_d = [md[cuts[i]:cuts[i + 1]] for i in range(len(parts))]
            starts_d = [md[n + cuts[i]:n + cuts[i + 1]] for i in range(len(parts))]
            x, y = self._cut(parts, rows_d, starts_d, host_rows, hd, whole, host_rows_d=md[2 * n:])
            ev = torch.cuda.Event()
            ev.record(self.side)
        cur.wait_event(ev)  # the training stream waits for this batch only
        x.record_stream(cur)  # allocated on the side stream, used on the current one
        y.record_stream(cur)
        return x, y

    def _cut(self, parts: list, rows: list, starts: list, host_rows: list[int], hstage: Any, whole: bool,
             host_rows_d: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.L.batch_size, self.L.seq_len
        if whole:
            stage = gather_windows(parts[0][0].tokens, starts[0], self.offsets)
        else:
            stage = torch.empty((B, T + 1), dtype=torch.int64, device=self.dev)
            for (job, _, _), r, st in zip(parts, rows, starts):
                stage.index_copy_(0, r, gather_windows(job.tokens, st, self.offsets))
            if hstage is not None:
                hr = torch.tensor(host_rows, dtype=torch.int64) if host_rows_d is None else host_rows_d
                stage.index_copy_(0, hr, hstage)
        return stage[:, :-1].contiguous(), stage[:, 1:].contiguous()

    # ---------------------------------------------------------------- lifetime
    def evict(self, consumed: np.ndarray) -> None:
        for key in [k for k, j in self.jobs.items() if j.expires <= consumed[k[0]]]:
            del self.jobs[key]

    def close(self) -> None:
        self.jobs = {}
