"""Encoding pieces of text to token ids: ``encode_batch`` in this process, or worker processes.

This module imports neither torch nor tokenizers at import time: worker processes
(``spawn``) import it to run :func:`_worker_init` and :func:`_worker_encode`, and pay only
for numpy and tokenizers.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import PackError
from .split import Piece

#: Characters of text per ``encode_batch`` call in this process (tokenizers encodes a
#: batch on all cores; this process peaked 150 bytes per character of a batch higher).
BATCH_CHARS = 2 << 20
#: Characters of text per task when tokenizing in worker processes.
WORKER_BATCH_CHARS = 1 << 20
#: Below this much input, ``num_workers=0`` (auto) tokenizes in this process: starting
#: worker processes and shipping the text to them costs more than it saves.
AUTO_WORKERS_MIN_BYTES = 16 << 20
#: Below this many CPUs, ``num_workers=0`` (auto) tokenizes in this process. There,
#: tokenizing (about 300 ms of CPU per MB with a 4 Ki-id BPE, spread over all cores by
#: tokenizers) is the bound either way; what this process does per MB while holding the GIL
#: (reading, cutting, turning ids into arrays, writing: about 13 ms) caps the in-process
#: path near 75 MB/s, which more than about 24 cores reach. Workers take the id conversion
#: with them (this process then does about 8 ms per MB).
AUTO_WORKERS_MIN_CPUS = 24
#: Most worker processes ``num_workers=0`` (auto) starts.
AUTO_WORKERS_MAX = 32
#: Batches tokenized at once by ``encode_batch`` in this process (on background threads:
#: tokenizers releases the GIL), so that reading, splitting and writing overlap tokenizing.
THREAD_BATCHES_IN_FLIGHT = 2


def cpus() -> int:
    """CPUs this process may run on.

    Raises:
        Nothing.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(total_bytes: int) -> int:
    """What ``num_workers=0`` means for ``total_bytes`` of input: 1 (``encode_batch`` in
    this process) below ``AUTO_WORKERS_MIN_BYTES`` or ``AUTO_WORKERS_MIN_CPUS``, else one
    worker process per CPU but one (this process keeps a core), at most ``AUTO_WORKERS_MAX``.

    Raises:
        Nothing.
    """
    n = cpus()
    if total_bytes < AUTO_WORKERS_MIN_BYTES or n < AUTO_WORKERS_MIN_CPUS:
        return 1
    return max(2, min(n - 1, AUTO_WORKERS_MAX))


def fit(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``ids`` as ``dtype``.

    Raises:
        PackError: an id does not fit ``dtype`` (names it).
    """
    if ids.size and int(ids.max()) > np.iinfo(dtype).max:
        raise PackError(f"token id {int(ids.max())} does not fit {dtype.name}: use --dtype uint32")
    return ids.astype(dtype)


# ----------------------------------------------------------------------------- worker side
_TOKENIZER: Any = None


def _worker_init(spec: str, threads: int) -> None:
    """Worker process start: ignore stop signals (the parent handles them and kills its
    workers; they are blocked until here), size tokenizers' thread pool, load the tokenizer."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when tokenizers first runs in parallel
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _TOKENIZER
    _TOKENIZER = Tokenizer.from_str(spec)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One task in a worker: ``(ids per text, all ids back to back as uint32)``."""
    ids = [e.ids for e in _TOKENIZER.encode_batch(texts, add_special_tokens=False)]
    counts = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for x in ids for i in x), dtype=np.uint32, count=int(counts.sum()))
    return counts, flat


# ----------------------------------------------------------------------------- parent side
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _children_deaf() -> Iterator[None]:
    """Processes started inside (workers, multiprocessing's resource tracker) begin with
    SIGINT, SIGTERM and SIGHUP blocked: a Ctrl-C or a signal to the process group neither
    kills them half-started nor prints their tracebacks; this process handles it (and kills
    its workers). Here the signals are only held back until the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _texts(batch: list[Piece]) -> list[str]:
    return [p.text for p in batch if p.text is not None]


def _encode_here(tok: Any, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    encs = tok.encode_batch(texts, add_special_tokens=False) if texts else []
    return [fit(np.array(e.ids, dtype=np.int64), dtype) for e in encs]


def _in_order(pool: cf.Executor, batches: Iterable[list[Piece]], submit: Any, limit: int,
              done: Any) -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
    """Submit a task per batch (at most ``limit`` in flight) and yield the answers in order;
    unfinished tasks are cancelled when the consumer stops early."""
    inflight: collections.deque = collections.deque()
    try:
        for batch in batches:
            texts = _texts(batch)
            inflight.append((batch, submit(texts) if texts else None))
            while len(inflight) >= limit:
                batch0, fut = inflight.popleft()
                yield batch0, [] if fut is None else done(fut)
        while inflight:
            batch0, fut = inflight.popleft()
            yield batch0, [] if fut is None else done(fut)
    finally:
        for _, fut in inflight:
            if fut is not None:
                fut.cancel()


def _exit_codes(pool: cf.ProcessPoolExecutor) -> list[int]:
    procs = list((getattr(pool, "_processes", None) or {}).values())  # CPython keeps them here
    codes = []
    for p in procs:
        p.join(timeout=5)
        if p.exitcode:
            codes.append(p.exitcode)
    return codes


def _kill_workers(pool: cf.ProcessPoolExecutor) -> None:
    kill = getattr(pool, "kill_workers", None)  # Python 3.14
    if kill is not None:
        kill()
        return
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            p.kill()
        except (OSError, ValueError):
            pass


def encode_batches(tok: Any, batches: Iterable[list[Piece]], dtype: np.dtype,
                   num_workers: int) -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
    """Tokenize batches of pieces, yielding ``(batch, ids per piece with text)`` in input order.

    ``num_workers <= 1`` runs ``encode_batch`` in this process (parallel over the batch in
    Rust, on all cores), ``THREAD_BATCHES_IN_FLIGHT`` batches at once on background threads
    so that this thread reads and writes meanwhile. More starts that many worker processes
    (``concurrent.futures.ProcessPoolExecutor``, ``spawn``; each with ``cpus() // num_workers``
    tokenizer threads), at most ``2 * num_workers`` batches in flight; workers are killed
    when the consumer stops early. The ids are the same either way: each piece is
    tokenized on its own.

    Raises:
        PackError: an id does not fit ``dtype``; a worker process died.
    """
    if num_workers <= 1:
        with cf.ThreadPoolExecutor(THREAD_BATCHES_IN_FLIGHT, thread_name_prefix="llmio-tokenize") as tpool:
            yield from _in_order(tpool, batches, lambda texts: tpool.submit(_encode_here, tok, texts, dtype),
                                 THREAD_BATCHES_IN_FLIGHT + 1, lambda fut: fut.result())
        return
    import multiprocessing as mp

    threads = max(1, cpus() // num_workers)
    with _children_deaf():  # the pool starts the resource tracker
        pool = cf.ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"),
                                      initializer=_worker_init, initargs=(tok.to_str(), threads))

    def submit(texts: list[str]) -> cf.Future:
        with _children_deaf():  # submit starts a worker while fewer than num_workers run
            return pool.submit(_worker_encode, texts)

    def done(fut: cf.Future) -> list[np.ndarray]:
        try:
            counts, flat = fut.result()
        except BrokenProcessPool:
            codes = _exit_codes(pool)
            status = f"with status {codes[0]}" if codes else "abruptly"
            raise PackError(f"a tokenizer worker process exited {status} "
                            "(its error is above; out of memory? try fewer --num-workers)") from None
        return [fit(ids, dtype) for ids in np.split(flat, np.cumsum(counts)[:-1])]

    finished = False
    try:
        yield from _in_order(pool, batches, submit, 2 * num_workers, done)
        finished = True
    finally:
        if not finished:  # an error or Ctrl-C: the answers are not wanted
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
