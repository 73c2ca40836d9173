"""TokenLoader: random windows of tokenized corpora, exact and resumable, for one GPU to many nodes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import UnsupportedError
from .pipeline import ChunkChecks, Pipeline, PipelineConfig, StreamPosition
from .plan import Batch, BatchPlanner, SourcePlan
from .progress import MAX_WORKERS, Progress, run_token
from .stats import LoaderStats

STATE_VERSION = 2  # 2: fingerprint is a dict with a content digest per source
#: Default compressed shuffle granularity: spans of 8 chunks, 8 spans per group.
DEFAULT_SPAN_CHUNKS = 8
DEFAULT_GROUP_SPANS = 8


def _open_source(src: Any, remote: dict[str, Any]) -> Any:
    if hasattr(src, "num_tokens") and hasattr(src, "read"):
        return src
    from ..dataset import open_dataset
    from ..remote.store import is_url

    p = os.fspath(src)
    # a URL opens through the remote cache: the loader's cache_dir / cache_bytes / storage_options,
    # each defaulting as open_dataset's ($LLMIO_CACHE_DIR, $LLMIO_CACHE_BYTES, the store's env vars)
    return open_dataset(p, **remote) if is_url(p) else open_dataset(p)


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
    cache and windows gathered there (see :mod:`.gpu_decode`); zstd stays a host decode.

    Memory: ``prefetch + 2`` ring slots of ``batch_size * (seq_len + 1)`` tokens; for
    compressed sources about two groups of ``group_spans * (span_chunks + 1)`` decoded
    chunks (144 chunks by default: 19 MB of uint16 at 65536-token chunks).

    Known costs: with W ranks on compressed data every rank decodes the groups its slices
    touch, i.e. every group, so a node decodes each group up to W times (likewise each
    DataLoader worker). A window that spans chunk boundaries of a compressed source costs
    the decode of the next chunk (counted in ``stats()``).

    Args:
        sources: a dataset path or URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``: read
            through the local cache of :mod:`llmio_native.remote`), an opened dataset
            (:func:`llmio_native.open_dataset`), or a list of them.
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
        cache_dir, cache_bytes, storage_options: for the URL sources (as
            :func:`llmio_native.open_dataset` takes them; ignored for local paths and
            opened datasets): the local cache directory (default ``$LLMIO_CACHE_DIR`` or
            ``~/.cache/llmio_native/remote``), its bound in bytes (default
            ``$LLMIO_CACHE_BYTES`` or half the free space there; each URL source gets a
            cache of this bound), and the store's options (``endpoint``, credentials,
            ``timeout``, ``retries``; default: the store's environment variables).

    Raises:
        TypeError: an argument of the wrong type (``batch_size="4"``, ``2.5``: never
            truncated), named with its value.
        ValueError: bad sizes, weights, rank/world size, shuffle granularity, backend, a
            device that is not ``cpu``/``cuda[:i]``, or a source without a full window.
        UnsupportedError: ``device`` is CUDA and torch has no usable CUDA device.
        FileNotFoundError, FormatError: a source path cannot be opened as a dataset.
        RemoteError: (an OSError) a URL source's store failed after the retries.
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
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
        storage_options: dict | None = None,
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
        if cache_bytes is not None:
            cache_bytes = _int_arg("cache_bytes", cache_bytes, 1)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"TokenLoader(storage_options=...) must be a dict or None, got "
                            f"{type(storage_options).__name__}")
        remote = {"cache_dir": cache_dir, "cache_bytes": cache_bytes, "storage_options": storage_options}
        self.datasets = [_open_source(s, remote) for s in sources]
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
        self._planner = BatchPlanner(self.plans, self.weights, batch_size, world_size, rank)
        self._pos = 0
        self._counts = np.zeros(len(self.datasets), dtype=np.int64)
        self._generation = 0  # bumped by load_state_dict: running iterators restart their pipeline
        self._stats = LoaderStats(self.plans)
        self._checks = ChunkChecks([len(ds.chunks) for ds in self.datasets])  # checked chunks (uncompressed)
        self._internal = _Internal()
        self._last: Batch | None = None  # the last batch handed out (for the test helpers)
        self._progress = Progress(len(self.datasets))  # positions reached in DataLoader workers
        self._iterations = 0  # iter() calls on this copy (a persistent worker counts its epochs)

    def _pipeline(self, stride: int, offset: int) -> Pipeline:
        """A pipeline starting at the current position (see :mod:`.pipeline`)."""
        cfg = PipelineConfig(
            datasets=tuple(self.datasets), plans=tuple(self.plans), batch_size=self.batch_size,
            seq_len=self.seq_len, world_size=self.world_size, device=self.device, prefetch=self.prefetch,
            backend=self.backend, direct=self.direct, queue_depth=self.queue_depth, num_threads=self.num_threads,
            pin=self.pin, emulate_gpu_decode=self._internal.emulate_gpu_decode)
        return Pipeline(cfg, self._planner, StreamPosition(self._pos, self._counts.copy()), self._stats,
                        self._checks, stride, offset)

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
        state["_last"] = None  # holds futures of the pipeline that made it
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stats = LoaderStats(self.plans)

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
        With remote sources (URLs): ``remote``, one dict per source (``None`` for local
        ones) of the cache's counters in this process (``ChunkCache.stats``: bytes fetched,
        hit rate, fetch latency percentiles, ``stall_s`` spent waiting for the network,
        ``offline``).
        """
        d = self._stats.as_dict()
        caches = [getattr(ds, "remote", None) for ds in self.datasets]
        if any(c is not None for c in caches):
            d["remote"] = [None if c is None else c.stats() for c in caches]
        return d

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
            pipe = self._pipeline(stride, offset)
            while self.steps is None or offset + n * stride < self.steps:
                if self._generation != gen:  # load_state_dict() while iterating: restart there
                    pipe.close()
                    gen = self._generation
                    pipe = self._pipeline(stride, offset)
                batch, x, y = pipe.next()
                self._pos, self._counts = batch.pos_after, batch.counts_after
                self._last = batch
                if info is not None:
                    self._progress.record(info.id, token, start_pos, start_counts, batch.pos_after,
                                          batch.counts_after)
                n += 1
                yield x, y
        finally:
            if pipe is not None:
                pipe.close()


# ---------------------------------------------------------------------------------------
# Internal options and test helpers: not attributes of the public class.


@dataclass
class _Internal:
    """Options of a loader that are not user settings (set through the functions below)."""

    emulate_gpu_decode: bool = False


def emulate_gpu_decode(loader: TokenLoader, on: bool = True) -> TokenLoader:
    """Run the GPU decode path of rans sources on the host for ``loader`` (a CPU loader):
    the kernel's host emulation instead of the kernel, CPU tensors instead of device ones.
    A test hook; takes effect at the next ``iter()``. Returns ``loader``.

    Raises:
        TypeError: ``loader`` is not a TokenLoader.
    """
    if not isinstance(loader, TokenLoader):
        raise TypeError(f"emulate_gpu_decode expects a TokenLoader, got {type(loader).__name__}")
    loader._internal.emulate_gpu_decode = bool(on)
    return loader


def last_windows(loader: TokenLoader) -> list[tuple[int, int]]:
    """``(source, window id)`` of each row of the last batch ``loader`` handed out in this
    process (empty before the first), for tests and debugging.

    Raises:
        TypeError: ``loader`` is not a TokenLoader.
    """
    if not isinstance(loader, TokenLoader):
        raise TypeError(f"last_windows expects a TokenLoader, got {type(loader).__name__}")
    b = loader._last
    return [] if b is None else list(zip(b.sources.tolist(), b.windows.tolist()))


def planned_batches(loader: TokenLoader, position: int, counts: Sequence[int]) -> Iterator[Batch]:
    """This rank's planned batches from a stream ``position`` with per-source ``counts``
    (as in ``state_dict()``): which (source, window) each row holds. For tests.

    Raises:
        TypeError: ``loader`` is not a TokenLoader.
    """
    if not isinstance(loader, TokenLoader):
        raise TypeError(f"planned_batches expects a TokenLoader, got {type(loader).__name__}")
    gb = loader.batch_size * loader.world_size
    return loader._planner.batches(int(position), np.asarray(counts, dtype=np.int64), int(position) // gb)
