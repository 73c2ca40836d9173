"""The local cache tier: chunk-granular, bounded, shared by the processes of a node, and
told the future by the loader.

Layout (one directory per dataset URL under ``cache_dir``)::

    cache_dir/<digest of the URL>/
        manifest.json          the remote manifest (bytes as fetched)
        shard-*.lio            sparse copies of the shards: header and tables always
                               present, each chunk present or a hole
        state                  shared state: bytes used, and per chunk its state
                               (absent / present / being fetched), fetcher pid, pins
        identity               URL + digest of the manifest and the shards' ETags

Because the local shards have the remote files' exact layout, the dataset opened on them
is an ordinary :class:`~llmio_native.dataset.llmio.LioDataset`: reads go through the
:class:`Reader` engine (io_uring) on the cache files. Before a read, the chunks it touches
are *acquired* (fetched if absent, pinned so that no process evicts them mid-read) and
released after.

A *unit* is the byte region chunk ``i`` owns in its shard: from the end of the previous
chunk's region (the header's end for a shard's first chunk) to the end of its own, so a
rans model region travels with the chunk it precedes; a rans chunk also needs the unit
holding its model. In format v1 units are 4096-aligned, so a hole punched for an evicted
unit frees exactly its blocks. In format v2 (chunks packed back to back) neighbouring units
share boundary blocks: a unit is charged its 4096-aligned span (``unit_charge``: at least the
blocks it occupies), and evicting it punches its blocks except those another live (present or
being fetched) unit, or the shard's tables, still touch (``unit_punch_range``), so the blocks
on disk never exceed the bytes counted.

Fetching: the absent units of a request are coalesced into runs of neighbours (at most
``request_bytes`` each) fetched in parallel; every chunk's stored bytes are checked against
the chunk table's XXH3 before they are written to the cache. A chunk found in the cache
(fetched by another process or an earlier run) is checked once per process on first use;
a failure refetches it once, a second failure raises :class:`RemoteChecksumError` naming
the URL and the range.

Bound: ``cache_bytes`` covers everything in the directory (metadata, a slack for the file
system's extent blocks, every present or in-flight unit); a unit is reserved before it is
fetched, evicting others first, so the bound holds at every instant, across processes
(all changes of the state are made under ``flock`` of the state file). A unit being fetched
by one process is waited for by the others: each chunk is fetched once per node.

Eviction: with the loader's future (:meth:`ChunkCache.follow`), the unpinned unit whose
next use is farthest in the future goes first (Belady; units not in the known horizon
first, least recently used first among them); without it (random access through
``open_dataset``), the least recently used. A prefetch thread fetches the units of the
next steps within ``prefetch_bytes``, and only where it can evict a unit needed later than
the one it fetches.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import fcntl
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..dataset import format as F
from .errors import DatasetChangedError, RemoteChecksumError, RemoteError
from .store import ObjectInfo, Source

ABSENT, PRESENT, FETCHING = 0, 1, 2
_HDR = 8  # int64 header words of the state file: magic, units, used bytes, base bytes
_MAGIC = 0x4C494F4341434831  # "LIOCACH1"
_INF = np.int64(1 << 62)
#: Bytes the prefetcher claims per round (fetched as parallel coalesced requests).
PREFETCH_ROUND_BYTES = 4 << 20
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset + length)`` (the file keeps its size).

    Raises:
        OSError: the file system cannot punch holes (the cache needs ext4, xfs, btrfs, tmpfs...).
    """
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(PUNCH_HOLE) @ {offset} (+{length}): {os.strerror(e)} (the cache directory's "
                         "file system must support hole punching: ext4, xfs, btrfs, tmpfs)")


def allocated_bytes(directory: str) -> int:
    """Bytes the files under ``directory`` occupy on disk (``st_blocks * 512``, what ``du`` counts)."""
    total = 0
    for dirpath, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


_BLOCK = 4096


def unit_charge(unit_start: np.ndarray, unit_end: np.ndarray) -> np.ndarray:
    """Bytes of the bound each unit counts: its 4096-aligned span (the blocks a fetch of it
    may allocate). Equal to ``unit_end - unit_start`` for the aligned units of format v1."""
    s = np.asarray(unit_start, dtype=np.int64)
    e = np.asarray(unit_end, dtype=np.int64)
    return -(-e // _BLOCK) * _BLOCK - s // _BLOCK * _BLOCK


def unit_punch_range(u: int, unit_file: np.ndarray, unit_start: np.ndarray, unit_end: np.ndarray,
                     live: Any) -> tuple[int, int]:
    """``[lo, hi)``: the blocks to punch when unit ``u`` leaves the cache: its aligned span
    without a boundary block that another unit with ``live(v)`` true, or the shard's tables
    (after the file's last unit), still touch. ``lo >= hi`` when there is nothing to punch."""
    f = int(unit_file[u])
    s, e = int(unit_start[u]), int(unit_end[u])
    lo, hi = s // _BLOCK * _BLOCK, -(-e // _BLOCK) * _BLOCK
    n = len(unit_start)

    def touched(b: int) -> bool:  # another live unit of file f, or the tables, in block [b, b + 4096)
        v = u - 1
        while v >= 0 and int(unit_file[v]) == f and int(unit_end[v]) > b:
            if live(v):
                return True
            v -= 1
        v = u + 1
        while v < n and int(unit_file[v]) == f and int(unit_start[v]) < b + _BLOCK:
            if live(v):
                return True
            v += 1
        if v < n and int(unit_file[v]) == f:
            return False
        return int(unit_end[v - 1]) < b + _BLOCK  # the file's last unit ends inside: the tables follow

    if lo < hi and s % _BLOCK and touched(lo):
        lo += _BLOCK
    if lo < hi and e % _BLOCK and touched(hi - _BLOCK):
        hi -= _BLOCK
    return lo, hi


class CacheFullError(ValueError):
    """``cache_bytes`` cannot hold the chunks one read needs at once (pinned by reads in flight)."""


class _Future:
    """The loader's known future: which units each coming step uses, and each unit's next use."""

    def __init__(self, steps: Iterator[tuple[int, np.ndarray]], n_units: int, horizon: int) -> None:
        self.steps = steps
        self.entries: deque[tuple[int, np.ndarray]] = deque()
        self.occ: dict[int, deque[int]] = {}
        self.next_use = np.full(n_units, _INF, dtype=np.int64)
        self.cursor = -1
        self.horizon = horizon  # unit occurrences to know ahead
        self.known = 0
        self.done = False
        # the entries' units and steps flattened (for vectorised scans): [_head:] of the
        # arrays, then the pending parts appended since
        self._flat_u = np.zeros(0, dtype=np.int64)
        self._flat_s = np.zeros(0, dtype=np.int64)
        self._head = 0
        self._pending: list[tuple[int, np.ndarray]] = []

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """``(units, steps)``: every unit occurrence of the known future, in order."""
        if self._pending:
            us = [self._flat_u[self._head:]] + [u for _, u in self._pending]
            ss = [self._flat_s[self._head:]] + [np.full(len(u), st, dtype=np.int64) for st, u in self._pending]
            self._flat_u = np.concatenate(us).astype(np.int64, copy=False)
            self._flat_s = np.concatenate(ss)
            self._head = 0
            self._pending = []
        return self._flat_u[self._head:], self._flat_s[self._head:]

    def extend(self, max_steps: int) -> int:
        """Pull up to ``max_steps`` more steps (while under the horizon); how many were pulled."""
        n = 0
        while n < max_steps and self.known < self.horizon and not self.done:
            try:
                step, units = next(self.steps)
            except StopIteration:
                self.done = True
                break
            self.entries.append((step, units))
            self._pending.append((step, units))
            for u in units.tolist():
                q = self.occ.get(u)
                if q is None:
                    q = self.occ[u] = deque()
                if not q:
                    self.next_use[u] = step
                q.append(step)
            self.known += len(units)
            n += 1
        return n

    def _drop_flat(self, n: int) -> None:
        """The oldest entry, of ``n`` occurrences, is consumed (from the flat arrays, or the
        pending parts when not flattened yet: entries are consumed whole)."""
        if self._head < len(self._flat_u):
            self._head += n
        else:
            self._pending.pop(0)

    def advance(self, step: int) -> None:
        """Steps before ``step`` are consumed."""
        self.cursor = max(self.cursor, step)
        while self.entries and self.entries[0][0] < step:
            _, units = self.entries.popleft()
            self.known -= len(units)
            self._drop_flat(len(units))
            for u in units.tolist():
                q = self.occ[u]
                q.popleft()
                self.next_use[u] = q[0] if q else _INF


class ChunkCache:
    """The cache of one remote dataset (see the module doc). Built by
    :func:`llmio_native.remote.dataset.open_remote`; pickles without its threads and file
    handles (re-opened in the process that uses it).

    Args:
        source: where the shards are. root: the dataset's cache directory.
        keys: shard keys in the source, one per local file. local_paths: the local files.
        expect: size and ETag of each shard seen at open (a change raises).
        unit_file, unit_start, unit_end: the units (one per chunk).
        chunk_offset, chunk_bytes, chunk_checksum: each chunk's stored range and XXH3.
        deps: extra unit a chunk needs (its rans model's unit), -1 for none.
        cache_bytes: the bound. base_bytes: what the metadata (and slack) take of it.
        prefetch_bytes: how far ahead the prefetcher fetches. request_bytes: largest coalesced GET.
        threads: parallel requests.
    """

    def __init__(self, *, source: Source, root: str, keys: Sequence[str], local_paths: Sequence[str],
                 expect: Sequence[ObjectInfo], unit_file: np.ndarray, unit_start: np.ndarray,
                 unit_end: np.ndarray, chunk_offset: np.ndarray, chunk_bytes: np.ndarray,
                 chunk_checksum: np.ndarray, deps: np.ndarray, cache_bytes: int, base_bytes: int,
                 prefetch_bytes: int, request_bytes: int = 8 << 20, threads: int = 16) -> None:
        self.source = source
        self.root = root
        self.keys = list(keys)
        self.local_paths = list(local_paths)
        self.expect = list(expect)
        self.unit_file = unit_file.astype(np.int64)
        self.unit_start = unit_start.astype(np.int64)
        self.unit_end = unit_end.astype(np.int64)
        self.unit_size = unit_charge(self.unit_start, self.unit_end)  # bytes counted in the bound
        self.chunk_offset = chunk_offset.astype(np.int64)
        self.chunk_bytes = chunk_bytes.astype(np.int64)
        self.chunk_checksum = chunk_checksum.astype(np.uint64)
        self.deps = deps.astype(np.int64)
        self.n = len(self.unit_start)
        self.cache_bytes = int(cache_bytes)
        self.base_bytes = int(base_bytes)
        self.prefetch_bytes = int(prefetch_bytes)
        self.request_bytes = int(request_bytes)
        self.threads = int(threads)
        self.policy = "lru"
        #: "future": follow the loader's future when it gives one; "lru": ignore it (a baseline)
        self.eviction = "future"
        self.offline = False
        self._init_process()

    # -- per-process state -------------------------------------------------------------------
    def _init_process(self) -> None:
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        self._sfd = os.open(os.path.join(self.root, "state"), os.O_RDWR)
        # every process using the cache holds a shared lock on "users" (see reset_if_alone)
        self._ufd = os.open(os.path.join(self.root, "users"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._ufd, fcntl.LOCK_SH)
        self._state = np.memmap(os.path.join(self.root, "state"), dtype=np.int64, mode="r+")
        self._fds: dict[int, int] = {}
        self._inflight: dict[int, threading.Event] = {}
        self._verified = np.zeros(self.n, dtype=bool)
        self._last_use = np.zeros(self.n, dtype=np.int64)
        self._clock = 0
        self._future: _Future | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pf_pool: cf.ThreadPoolExecutor | None = None
        self._pf_queued = 0  # prefetch runs handed to the prefetch pool and not finished
        self._pf_tasks: dict[cf.Future, list[int]] = {}  # those runs, to cancel the queued ones
        self._pf_backoff_until = 0.0
        self._peak_in_flight = 0
        self._prefetcher: threading.Thread | None = None
        self._stop = False
        self._prefetch_error: BaseException | None = None
        self._stats = {"bytes_fetched": 0, "requests": 0, "units_fetched": 0, "hits": 0, "misses": 0,
                       "stall_s": 0.0, "evictions": 0, "bytes_evicted": 0, "retries": 0,
                       "verify_failures": 0, "prefetched_units": 0, "network_busy_s": 0.0}
        self._active = 0
        self._active_since = 0.0
        self._latency: list[float] = []

    def __getstate__(self) -> dict:
        keep = ("source", "root", "keys", "local_paths", "expect", "unit_file", "unit_start", "unit_end",
                "unit_size", "chunk_offset", "chunk_bytes", "chunk_checksum", "deps", "n", "cache_bytes",
                "base_bytes", "prefetch_bytes", "request_bytes", "threads", "policy", "eviction", "offline")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        self._init_process()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: threads and locks of the parent are not ours
            self.__setstate__(self.__getstate__())

    @property
    def _units_state(self) -> np.ndarray:
        return self._state[_HDR::3]

    @property
    def _owner(self) -> np.ndarray:
        return self._state[_HDR + 1::3]

    @property
    def _pins(self) -> np.ndarray:
        return self._state[_HDR + 2::3]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The in-process mutex, then the node-wide flock of the state file."""
        with self._mutex:
            fcntl.flock(self._sfd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._sfd, fcntl.LOCK_UN)

    def _fd(self, f: int) -> int:
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(self.local_paths[f], os.O_RDWR)
        return fd

    # -- public -------------------------------------------------------------------------------
    def units_of_chunks(self, chunks: Iterable[int]) -> np.ndarray:
        """The units chunk indices ``chunks`` need (each chunk's own, plus its rans model's)."""
        c = np.unique(np.asarray(list(chunks) if not isinstance(chunks, np.ndarray) else chunks, dtype=np.int64))
        d = self.deps[c]
        return np.unique(np.concatenate([c, d[d >= 0]]))

    @property
    def read_group_bytes(self) -> int:
        """Bytes of chunks one ``read()`` pins at a time (a quarter of the room for chunks,
        at least the largest chunk with its model)."""
        biggest = int(self.unit_size.max()) * 2 if self.n else 0
        return max(biggest, (self.cache_bytes - self.base_bytes) // 4)

    def used_bytes(self) -> int:
        """Bytes of the bound in use now (metadata, slack, present and in-flight units)."""
        return int(self._state[2])

    def present(self) -> np.ndarray:
        """Whether each unit is in the cache now (a snapshot)."""
        return np.asarray(self._units_state) == PRESENT

    def stats(self) -> dict:
        """Counters of this process: ``bytes_fetched``, ``requests``, ``units_fetched``,
        ``hits``/``misses`` (units present / not present when a read needed them) and
        ``hit_rate``, ``fetch_p50_ms``/``fetch_p90_ms``/``fetch_p99_ms`` (request latency),
        ``stall_s`` (time reads waited for the network), ``evictions``, ``bytes_evicted``,
        ``retries``, ``verify_failures``, ``prefetched_units``, ``network_busy_s`` (wall time
        with a request in flight), ``peak_in_flight`` (most requests in flight at once since the
        last :meth:`reset_stats`) and ``fetch_mbs_busy`` (MB fetched per busy second: the rate
        the link gave while used), ``used_bytes``, ``cache_bytes``, ``policy`` and ``offline``
        (opened from the cache alone)."""
        with self._mutex:
            s = dict(self._stats)
            if self._active:  # the busy period under way counts up to now
                s["network_busy_s"] += time.perf_counter() - self._active_since
            lat = np.array(self._latency) if self._latency else np.zeros(1)
        n = s["hits"] + s["misses"]
        s["hit_rate"] = s["hits"] / n if n else 0.0
        s["fetch_mbs_busy"] = s["bytes_fetched"] / s["network_busy_s"] / 1e6 if s["network_busy_s"] else 0.0
        for q in (50, 90, 99):
            s[f"fetch_p{q}_ms"] = float(np.percentile(lat, q) * 1e3)
        s["peak_in_flight"] = self._peak_in_flight
        s["used_bytes"] = self.used_bytes()
        s["cache_bytes"] = self.cache_bytes
        s["policy"] = self.policy
        s["offline"] = self.offline
        return s

    def reset_stats(self) -> None:
        """Zero this process's counters (benchmarks: measure one epoch)."""
        with self._mutex:
            for k in self._stats:
                self._stats[k] = 0.0 if isinstance(self._stats[k], float) else 0
            self._latency = []
            self._peak_in_flight = self._active
            if self._active:  # a busy period under way counts from now
                self._active_since = time.perf_counter()

    def acquire(self, units: np.ndarray, step: int | None = None) -> np.ndarray:
        """Make ``units`` present and pin them (no process evicts a pinned unit); the caller
        reads them through the cache files, then calls :meth:`release` with the result.

        ``step``: the loader step this read is for (advances the known future).

        Raises:
            RemoteError: a fetch failed after its retries (names URL and byte range).
            RemoteChecksumError: a chunk failed its checksum when fetched and refetched.
            DatasetChangedError: a shard changed in the store since open.
            CacheFullError: ``cache_bytes`` cannot hold these units besides the pinned ones.
        """
        self._check_pid()
        units = np.unique(np.asarray(units, dtype=np.int64))
        if step is not None:
            self.advance(step)
        if self._prefetch_error is not None:  # DatasetChangedError, RemoteChecksumError, ...
            err, self._prefetch_error = self._prefetch_error, None
            raise err
        t0 = time.perf_counter()
        pinned: list[int] = []
        missed = False
        try:
            todo = units.tolist()
            first = True
            while todo:
                fetch, wait = self._claim(todo, pin=True, pinned=pinned, count=first, protect=units)
                first = False
                missed = missed or bool(fetch) or bool(wait)
                if fetch:
                    self._fetch(fetch, pinned_after=True, pinned=pinned)
                    with self._mutex:
                        self._stats["units_fetched"] += len(fetch)
                todo = self._wait_for(wait)
            self._verify_present(units)
        except BaseException:
            self.release(np.array(pinned, dtype=np.int64))
            raise
        finally:
            if missed:
                with self._mutex:
                    self._stats["stall_s"] += time.perf_counter() - t0
        return units

    def advance(self, step: int) -> None:
        """The loader is at ``step`` of the future given to :meth:`follow` (earlier steps
        are consumed: their uses no longer count for eviction)."""
        if self._future is not None:
            with self._cond:
                if self._future is not None:
                    self._future.advance(step)
                self._cond.notify_all()

    def release(self, units: np.ndarray) -> None:
        """Unpin units returned by :meth:`acquire`."""
        if len(units) == 0:
            return
        with self._locked():
            p = self._pins
            for u in np.asarray(units, dtype=np.int64).tolist():
                if p[u] > 0:
                    p[u] -= 1

    @contextmanager
    def pinned(self, units: np.ndarray, step: int | None = None) -> Iterator[np.ndarray]:
        """``with cache.pinned(units): read`` (acquire, then release)."""
        got = self.acquire(units, step)
        try:
            yield got
        finally:
            self.release(got)

    def follow(self, steps: Iterator[tuple[int, np.ndarray]], horizon: int | None = None,
               pinned_units: int = 0, what: str = "") -> None:
        """Switch to farthest-in-future eviction and prefetch along ``steps``: the loader's
        coming steps as ``(step index, units)``, in order, from its current position.
        Replaces any earlier future (a resumed loader gives its new one).

        ``pinned_units``: how many units the caller may hold pinned at once (``what`` says
        why, for the error).

        Raises:
            CacheFullError: ``cache_bytes`` cannot hold ``pinned_units`` of the largest units.
        """
        self._check_pid()
        room = self.cache_bytes - self.base_bytes
        need = int(pinned_units) * (int(self.unit_size.max()) if self.n else 0)
        if need > room:
            raise CacheFullError(
                f"{self.source.url}: cache_bytes={self.cache_bytes} leaves {room} bytes for chunks after "
                f"{self.base_bytes} bytes of metadata, but {what or 'the reader'} may pin {pinned_units} chunks "
                f"({need} bytes) at once: raise cache_bytes, or lower prefetch / batch_size")
        self.stop_follow()
        if self.eviction == "lru":
            return  # the baseline: no future, no prefetch
        h = horizon if horizon is not None else max(1 << 16, 8 * self.n)
        with self._cond:
            self._future = _Future(steps, self.n, h)
            self._future.extend(64)
            self._follow_t0 = time.monotonic()
            self.policy = "future"
            self._stop = False
        self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True, name="llmio-remote-prefetch")
        self._prefetcher.start()

    def stop_follow(self) -> None:
        """Stop the prefetcher and forget the future (back to LRU)."""
        t = self._prefetcher
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if t is not None:
            t.join()
        self._prefetcher = None
        with self._cond:  # prefetches of that future not started yet: given back, not fetched
            dropped = [run for f, run in self._pf_tasks.items() if f.cancel()]
            self._pf_tasks = {f: r for f, r in self._pf_tasks.items() if not f.cancelled()}
            self._pf_queued -= len(dropped)
        if dropped:
            with self._locked():
                for run in dropped:
                    self._unclaim(run)
        with self._cond:
            self._future = None
            self.policy = "lru"

    def close(self) -> None:
        """Stop the prefetcher and the request pool, close the files."""
        self.stop_follow()
        for pool in (self._pf_pool, self._pool):  # prefetches in flight finish (or fail) first
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._pf_pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._ufd >= 0:
            os.close(self._ufd)
            self._ufd = -1
        if self._sfd >= 0:
            os.close(self._sfd)
            self._sfd = -1

    # -- claiming, reserving, evicting --------------------------------------------------------------
    def _claim(self, todo: list[int], *, pin: bool, pinned: list[int], count: bool, protect: np.ndarray,
               admit_before: int | None = None) -> tuple[list[int], list[int]]:
        """Under the lock: pin the present units, claim the absent ones (reserving their
        bytes) for this process to fetch; return ``(to fetch, to wait for)``."""
        fetch: list[int] = []
        wait: list[int] = []
        with self._locked():
            st, own, pins = self._units_state, self._owner, self._pins
            for u in todo:
                s = int(st[u])
                if s == PRESENT:
                    if pin:
                        pins[u] += 1
                        pinned.append(u)
                    if count:
                        self._stats["hits"] += 1
                    self._touch(u)
                    continue
                if count:
                    self._stats["misses"] += 1
                o = int(own[u])
                if s == FETCHING and (u in self._inflight or (o != self._pid and _alive(o, self._pid))):
                    wait.append(u)
                    continue
                if s == FETCHING:  # its fetcher died: take over (its bytes are still reserved)
                    own[u] = self._pid
                    self._punch(u)
                else:
                    if not self._reserve(int(self.unit_size[u]), protect, admit_before):
                        if admit_before is not None:
                            break  # prefetch: nothing worth evicting for it
                        raise CacheFullError(
                            f"{self.source.url}: cache_bytes={self.cache_bytes} cannot hold chunk {u} "
                            f"({int(self.unit_size[u])} bytes) besides the {int((pins > 0).sum())} chunks pinned by "
                            f"reads in flight and {self.base_bytes} bytes of metadata; raise cache_bytes")
                    st[u] = FETCHING
                    own[u] = self._pid
                self._inflight[u] = threading.Event()
                fetch.append(u)
        return fetch, wait

    def _punch(self, u: int) -> None:
        """Under the lock: free the blocks of unit ``u`` that no other live unit touches."""
        st = self._units_state
        lo, hi = unit_punch_range(u, self.unit_file, self.unit_start, self.unit_end,
                                  lambda v: int(st[v]) != ABSENT)
        if lo < hi:
            punch_hole(self._fd(int(self.unit_file[u])), lo, hi - lo)

    def _touch(self, u: int) -> None:
        self._clock += 1
        self._last_use[u] = self._clock

    def _reserve(self, nbytes: int, protect: np.ndarray, admit_before: int | None) -> bool:
        """Under the lock: make ``nbytes`` free in the bound (evicting), then count them used.
        ``admit_before``: evict only units whose next use is later than this (prefetch)."""
        used = int(self._state[2])
        need = used + nbytes - self.cache_bytes
        if need > 0:
            st, pins = np.asarray(self._units_state), np.asarray(self._pins)
            cand = (st == PRESENT) & (pins == 0)
            if len(protect):
                cand[protect] = False
            idx = np.flatnonzero(cand)
            if self._future is not None:
                nu = self._future.next_use[idx]
                if admit_before is not None:
                    keep = nu > admit_before
                    idx, nu = idx[keep], nu[keep]
                order = np.lexsort((self._last_use[idx], -nu))  # farthest next use first, then LRU
            else:
                if admit_before is not None:
                    return False
                order = np.argsort(self._last_use[idx], kind="stable")
            victims = []
            freed = 0
            for j in order.tolist():
                if freed >= need:
                    break
                v = int(idx[j])
                victims.append(v)
                freed += int(self.unit_size[v])
            if freed < need:
                return False
            for v in victims:
                self._units_state[v] = ABSENT
                self._punch(v)
                self._verified[v] = False
            self._stats["evictions"] += len(victims)
            self._stats["bytes_evicted"] += freed
            used -= freed
        self._state[2] = used + nbytes
        return True

    def _unclaim(self, units: list[int]) -> None:
        """Under the lock: give back units this process claimed but did not fill."""
        st = self._units_state
        for u in units:
            if int(st[u]) == FETCHING and int(self._owner[u]) == self._pid:
                st[u] = ABSENT
                self._punch(u)
                self._state[2] = int(self._state[2]) - int(self.unit_size[u])
            ev = self._inflight.pop(u, None)
            if ev is not None:
                ev.set()

    def _wait_for(self, units: list[int]) -> list[int]:
        """Wait until units being fetched (by this or another process) are no longer being
        fetched; return those to try again (claiming pins them if present)."""
        if not units:
            return []
        deadline = time.monotonic() + self._wait_limit()
        for u in units:
            while True:
                ev = self._inflight.get(u)
                if ev is not None:
                    ev.wait(0.05)
                elif int(self._units_state[u]) != FETCHING or not _alive(int(self._owner[u]), self._pid):
                    break
                else:
                    time.sleep(0.002)
                if ev is not None and ev.is_set():
                    break
                if time.monotonic() > deadline:
                    raise RemoteError(
                        f"{self.source.key_url(self.keys[int(self.unit_file[u])])} bytes "
                        f"[{int(self.unit_start[u])}, {int(self.unit_end[u])}): still being fetched by process "
                        f"{int(self._owner[u])} after {self._wait_limit():.0f} s", url=self.source.url,
                        start=int(self.unit_start[u]), end=int(self.unit_end[u]))
        return units

    def _wait_limit(self) -> float:
        p = self.source.policy
        return (p.timeout + p.cap) * (p.retries + 1) * 2 + 10.0

    # -- fetching -----------------------------------------------------------------------------
    def _runs(self, units: list[int]) -> list[list[int]]:
        """Coalesce units into runs of neighbours (same file, adjacent bytes), each at most
        ``request_bytes`` (a unit larger than that is a run alone)."""
        runs: list[list[int]] = []
        for u in sorted(units, key=lambda u: (int(self.unit_file[u]), int(self.unit_start[u]))):
            if runs:
                last = runs[-1][-1]
                if (self.unit_file[last] == self.unit_file[u] and self.unit_end[last] == self.unit_start[u]
                        and self.unit_end[u] - self.unit_start[runs[-1][0]] <= self.request_bytes):
                    runs[-1].append(u)
                    continue
            runs.append([u])
        return runs

    def _request_pool(self) -> cf.ThreadPoolExecutor:
        with self._mutex:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="llmio-remote")
            return self._pool

    def _fetch(self, units: list[int], *, pinned_after: bool, pinned: list[int]) -> None:
        """Fetch claimed units (coalesced, in parallel), verify, write, mark present."""
        runs = self._runs(units)
        if len(runs) == 1:
            results = [self._fetch_run_safe(runs[0])]
        else:
            results = list(self._request_pool().map(self._fetch_run_safe, runs))
        err: BaseException | None = None
        with self._locked():
            for run, exc in zip(runs, results):
                err = err or exc
                self._finish_run(run, exc, pinned_after=pinned_after, pinned=pinned)
        if err is not None:
            raise err

    def _finish_run(self, run: list[int], exc: BaseException | None, *, pinned_after: bool,
                    pinned: list[int]) -> None:
        """Under the lock: a fetched run's units become present (pinned if asked), or, if its
        fetch failed (``exc``), go back to absent; waiters on them are woken either way."""
        if exc is not None:
            self._unclaim(run)
            return
        for u in run:
            self._units_state[u] = PRESENT
            self._owner[u] = 0
            self._verified[u] = True
            if pinned_after:
                self._pins[u] += 1
                pinned.append(u)
            self._touch(u)
            ev = self._inflight.pop(u, None)
            if ev is not None:
                ev.set()

    def _fetch_run_safe(self, run: list[int]) -> BaseException | None:
        try:
            self._fetch_run(run)
            return None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            return exc

    def _fetch_run(self, run: list[int]) -> None:
        f = int(self.unit_file[run[0]])
        key = self.keys[f]
        lo, hi = int(self.unit_start[run[0]]), int(self.unit_end[run[-1]])
        data = self._get(key, f, lo, hi)
        bad = [u for u in run if not self._check(u, data, lo)]
        if bad:  # refetch the failing chunks once, each alone
            with self._mutex:
                self._stats["verify_failures"] += len(bad)
            data = bytearray(data)
            for u in bad:
                s, e = int(self.unit_start[u]), int(self.unit_end[u])
                again = self._get(key, f, s, e)
                if not self._check(u, again, s):
                    self._raise_if_rewritten(key, f)
                    cs, cn = int(self.chunk_offset[u]), int(self.chunk_bytes[u])
                    raise RemoteChecksumError(
                        f"{self.source.key_url(key)} bytes [{cs}, {cs + cn}): chunk {u} fails its checksum "
                        f"(recorded {int(self.chunk_checksum[u]):#018x}) in two fetches; the stored object is "
                        "damaged or was rewritten", path=self.source.key_url(key), offset=cs)
                data[s - lo : e - lo] = again
        view = memoryview(data)
        fd = self._fd(f)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], lo + pos)

    def _learn(self, f: int, info: ObjectInfo) -> None:
        """Keep the ETag of shard ``f``'s first response where the open did not learn it (a
        source that cannot list: ``http(s)://``): later responses must carry the same."""
        with self._mutex:
            if self.expect[f].etag is None and info.etag is not None:
                self.expect[f] = ObjectInfo(self.expect[f].size, info.etag)

    def _raise_if_rewritten(self, key: str, f: int) -> None:
        """After a chunk failed its checksum twice: whether the shard itself is another one
        than the metadata describes (rewritten in place under an unchanged manifest; the
        metadata came from ``index.lio``, so open could not see it). Compares the shard's
        header in the store with the cached one.

        Raises:
            DatasetChangedError: they differ (names the URL).
        """
        mine = os.pread(self._fd(f), F.HEADER_BYTES, 0)
        theirs = self._get(key, f, 0, min(F.HEADER_BYTES, self.expect[f].size))
        if theirs != mine:
            url = self.source.key_url(key)
            raise DatasetChangedError(
                f"{url}: the object's header differs from the one in the dataset's manifest.json and index.lio: the "
                "shard was rewritten in place (the dataset is being rewritten, or was changed); its chunks fail their "
                "checksums", path=url, offset=0)

    def _get(self, key: str, f: int, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of shard ``f`` from the store (retried; counted in stats)."""
        def retried(exc: BaseException) -> None:
            with self._mutex:
                self._stats["retries"] += 1

        t0 = time.perf_counter()
        with self._mutex:  # network-busy time: wall time with at least one request in flight
            if self._active == 0:
                self._active_since = t0
            self._active += 1
            self._peak_in_flight = max(self._peak_in_flight, self._active)
        expect = self.expect[f]
        try:
            data = self.source.read_range(key, lo, hi, expect, on_retry=retried,
                                          seen=None if expect.etag is not None else lambda i: self._learn(f, i))
        finally:
            with self._mutex:
                self._active -= 1
                if self._active == 0:
                    self._stats["network_busy_s"] += time.perf_counter() - self._active_since
        dt = time.perf_counter() - t0
        with self._mutex:
            self._stats["bytes_fetched"] += len(data)
            self._stats["requests"] += 1
            self._latency.append(dt)
            if len(self._latency) > 100000:
                self._latency = self._latency[-50000:]
        return data

    def _check(self, u: int, data: bytes | bytearray | memoryview, base: int) -> bool:
        """Whether chunk ``u``'s stored bytes inside ``data`` (which starts at file offset
        ``base``) match the chunk table's checksum."""
        import xxhash

        s = int(self.chunk_offset[u]) - base
        return xxhash.xxh3_64_intdigest(memoryview(data)[s : s + int(self.chunk_bytes[u])]) == \
            int(self.chunk_checksum[u])

    def _verify_present(self, units: np.ndarray) -> None:
        """Check once per process the pinned units this process did not fetch; refetch a
        damaged one once (then raise)."""
        todo = units[~self._verified[units]]
        for u in todo.tolist():
            s, e = int(self.unit_start[u]), int(self.unit_end[u])
            f = int(self.unit_file[u])
            data = os.pread(self._fd(f), e - s, s)
            if len(data) == e - s and self._check(u, data, s):
                self._verified[u] = True
                continue
            with self._mutex:
                self._stats["verify_failures"] += 1
            self._fetch_run([u])  # pinned by us: nobody evicts it meanwhile; raises if bad twice
            self._verified[u] = True

    # -- prefetch -------------------------------------------------------------------------------
    def _prefetch_loop(self) -> None:
        """Claim the coming units a round at a time and hand each coalesced run to the
        prefetch pool without waiting for it: the next round is claimed while the last one's
        requests are still in flight, so the link never idles between rounds (a round that
        waited for its slowest request left the link idle for a latency and a tail each
        time: 0.8 x the cap instead of the ceiling)."""
        try:
            while True:
                with self._cond:
                    if self._stop or self._prefetch_error is not None:
                        return
                    fut = self._future
                    assert fut is not None
                    if fut.cursor < 0 and time.monotonic() < self._follow_t0 + 0.5:
                        # the first batch's own fetches get the link first (time to first batch)
                        self._cond.wait(0.01)
                        continue
                    if self._pf_queued >= self.threads or time.monotonic() < self._pf_backoff_until:
                        # every request slot has work queued: claim more only when one frees
                        self._cond.wait(0.05)
                        continue
                    fut.extend(256)
                    want = self._prefetch_candidates(fut)
                    if not want:
                        self._cond.wait(0.05)
                        continue
                    # claim within the lock (admission: only by evicting units needed later)
                    fetch, _ = self._claim(want[0], pin=False, pinned=[], count=False,
                                           protect=np.array(want[0], dtype=np.int64), admit_before=want[1])
                    if not fetch:
                        self._cond.wait(0.02)
                        continue
                    order = {u: i for i, u in enumerate(want[0])}
                    runs = sorted(self._runs(fetch), key=lambda r: min(order[u] for u in r))  # soonest first
                    self._pf_queued += len(runs)
                pool = self._prefetch_pool()
                with self._cond:
                    for run in runs:
                        self._pf_tasks[pool.submit(self._prefetch_run, run)] = run
        except BaseException as exc:  # noqa: BLE001 - surfaced by the next acquire
            self._prefetch_error = exc

    def _prefetch_run(self, run: list[int]) -> None:
        """One prefetch request (on the prefetch pool): fetch, verify, write, mark present."""
        try:
            exc = self._fetch_run_safe(run)
            with self._locked():
                self._finish_run(run, exc, pinned_after=False, pinned=[])
        except BaseException as e:  # noqa: BLE001 - the state update itself failed
            exc = e
        with self._cond:
            self._pf_queued -= 1
            self._pf_tasks = {f: r for f, r in self._pf_tasks.items() if not f.done() and r is not run}
            if exc is None:
                self._stats["prefetched_units"] += len(run)
                self._stats["units_fetched"] += len(run)
            elif isinstance(exc, (RemoteError, CacheFullError)):
                # a transient failure of a prefetch is not the reader's: its own acquire
                # retries (and raises) if the chunk is still needed
                self._pf_backoff_until = time.monotonic() + 0.1
            elif self._prefetch_error is None:  # DatasetChangedError, RemoteChecksumError, ...
                self._prefetch_error = exc
            self._cond.notify_all()

    def _prefetch_pool(self) -> cf.ThreadPoolExecutor:
        with self._mutex:
            if self._pf_pool is None:
                self._pf_pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="llmio-prefetch")
            return self._pf_pool

    def _prefetch_candidates(self, fut: _Future) -> tuple[list[int], int] | None:
        """Absent units of the coming steps within ``prefetch_bytes`` (up to one request's
        worth), and the step of the last one (admission bound).

        Vectorised over the known future (a Python loop over it held the lock, and the GIL,
        for about 10 ms a round at a 1 GiB budget: a third of the loader's time)."""
        u, s = fut.flat()
        if not len(u):
            return None
        first = u[fut.next_use[u] == s]  # each unit once, at its first coming use, in order
        span = np.cumsum(self.unit_size[first])
        k = int(np.searchsorted(span, self.prefetch_bytes, side="right"))
        st = np.asarray(self._units_state)
        cand = first[:k]
        absent = cand[st[cand] == ABSENT]
        if not len(absent):
            return None
        # small rounds in future order: the next steps' units are never queued behind a long
        # prefetch (and demand fetches get their share of the link)
        got = np.cumsum(self.unit_size[absent])
        m = min(len(absent), int(np.searchsorted(got, PREFETCH_ROUND_BYTES, side="left")) + 1)
        out = absent[:m]
        return out.tolist(), int(fut.next_use[out[-1]])


def _alive(pid: int, me: int) -> bool:
    """Whether process ``pid`` exists (``me`` counts as alive)."""
    if pid <= 0:
        return False
    if pid == me:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reset_if_alone(root: str, unit_size: np.ndarray, unit_file: np.ndarray, unit_start: np.ndarray,
                   local_paths: Sequence[str], base_bytes: int, cache_bytes: int,
                   unit_end: np.ndarray | None = None) -> bool:
    """When no other process uses the cache of ``root``: clear what crashed processes left
    (pins, units half fetched), recount the bytes used, and evict units until the bound
    holds (``cache_bytes`` may be smaller than last time). Returns whether it ran.

    Raises:
        OSError: the state or a cache file cannot be opened, or holes cannot be punched.
    """
    ufd = os.open(os.path.join(root, "users"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(ufd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        sfd = os.open(os.path.join(root, "state"), os.O_RDWR)
        fds: dict[int, int] = {}
        try:
            fcntl.flock(sfd, fcntl.LOCK_EX)
            arr = np.memmap(os.path.join(root, "state"), dtype=np.int64, mode="r+")
            st, own, pins = arr[_HDR::3], arr[_HDR + 1::3], arr[_HDR + 2::3]
            pins[:] = 0
            own[:] = 0
            bad = np.flatnonzero(st != PRESENT)
            used = base_bytes + int(unit_size[st == PRESENT].sum())
            over = np.flatnonzero(st == PRESENT)[::-1]
            k = 0
            while used > cache_bytes and k < len(over):
                u = int(over[k])
                st[u] = ABSENT
                used -= int(unit_size[u])
                bad = np.append(bad, u)
                k += 1
            st[bad] = ABSENT
            uend = unit_start + unit_size if unit_end is None else unit_end
            for u in bad.tolist():
                f = int(unit_file[u])
                if f not in fds:
                    fds[f] = os.open(local_paths[f], os.O_RDWR)
                lo, hi = unit_punch_range(u, unit_file, unit_start, uend, lambda v: int(st[v]) != ABSENT)
                if lo < hi:
                    punch_hole(fds[f], lo, hi - lo)
            arr[2], arr[3] = used, base_bytes
            arr.flush()
            fcntl.flock(sfd, fcntl.LOCK_UN)
        finally:
            for fd in fds.values():
                os.close(fd)
            os.close(sfd)
        return True
    finally:
        os.close(ufd)  # releases the exclusive lock


def create_state(path: str, n_units: int) -> None:
    """Write a fresh state file for ``n_units`` units (all absent)."""
    arr = np.zeros(_HDR + 3 * n_units, dtype=np.int64)
    arr[0], arr[1] = _MAGIC, n_units
    tmp = path + ".tmp"
    arr.tofile(tmp)
    os.replace(tmp, path)


def state_ok(path: str, n_units: int) -> bool:
    """Whether ``path`` is a state file for ``n_units`` units."""
    try:
        arr = np.fromfile(path, dtype=np.int64, count=_HDR)
    except (OSError, ValueError):
        return False
    return len(arr) == _HDR and int(arr[0]) == _MAGIC and int(arr[1]) == n_units and \
        os.path.getsize(path) == 8 * (_HDR + 3 * n_units)


__all__ = ["ChunkCache", "CacheFullError", "punch_hole", "unit_charge", "unit_punch_range", "reset_if_alone", "allocated_bytes", "create_state", "state_ok",
           "ABSENT", "PRESENT", "FETCHING"]
