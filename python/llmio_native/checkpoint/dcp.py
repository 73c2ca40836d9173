"""PyTorch Distributed Checkpoint (DCP) storage on the native engine.

``torch.distributed.checkpoint.save(sd, storage_writer=StorageWriter(path))``,
``torch.distributed.checkpoint.load(sd, storage_reader=StorageReader(path))`` and
``torch.distributed.checkpoint.async_save(sd, storage_writer=StorageWriter(path))`` work
unchanged, with or without a process group, including resharding on load (a tensor saved
with one sharding loads into another; only the byte ranges a rank needs are read).

What is on disk (``path`` is a directory)::

    path/.metadata.json     JSON (see dcp_metadata), written last, checksummed
    path/__R_K.distcp       data of rank R (K = 0.. thread_count-1, or one per item)

* Tensors are stored as their raw bytes (row-major, native byte order), not pickled; each
  tensor of 64 KiB or more starts 4 KiB-aligned in its file, so reads of it can be O_DIRECT.
* Non-tensor values (the ``BytesIO`` items of DCP: ints, strings, optimizer hyper-parameters)
  are the ``torch.save`` blobs torch's planner hands over, each in its own byte range, as
  torch's ``FileSystemWriter`` stores them. torch's ``DefaultLoadPlanner`` unpickles them
  with ``weights_only=False``; :class:`StorageReader` first checks each one with
  ``torch.load(weights_only=True)`` and refuses a blob that needs more (``trust_pickle=True``
  turns that check off for checkpoints you trust that hold arbitrary objects).
* The format is ours: torch's ``FileSystemReader`` cannot read these checkpoints (it looks
  for a pickled ``.metadata`` and torch.save'd tensors), and :class:`StorageReader` does not
  read ``FileSystemWriter`` checkpoints (it says so when pointed at one).

Crash safety (``llmio_native.checkpoint.commit``): every rank writes into one staging
directory beside ``path`` (``.NAME.tmp-TOKEN``, the token chosen by the coordinator in
``prepare_global_plan``), fdatasyncs its files; the coordinator writes the metadata last,
fsyncs it and publishes the directory with one rename (or an atomic exchange when ``path``
already holds a checkpoint) and fsyncs the parent. A process killed at any point leaves the
previous checkpoint loadable under ``path``. A directory at ``path`` that is not an llmio
DCP checkpoint is never replaced.

Not supported (each raises a clear error): ``use_collectives=False`` (rank-local metadata),
remote URLs as checkpoint ids, tensors with a non-strided layout.
"""
from __future__ import annotations

import concurrent.futures
import copy
import io
import math
import os
import re
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader as _TorchStorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _TorchStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..errors import UnsupportedError
from ..io import Reader, Writer, reuse_staging, staging_for
from . import commit as _commit
from .dcp_metadata import METADATA_FILE, CheckpointFormatError, ItemLocation, decode, encode

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - older torch
    _DTensor = None  # type: ignore[assignment,misc]

try:  # torch >= 2.4 names the protocol; dcp.async_save checks for it structurally anyway
    from torch.distributed.checkpoint.staging import AsyncStager as _AsyncStager
except ImportError:  # pragma: no cover - older torch
    _AsyncStager = object  # type: ignore[assignment,misc]

__all__ = ["StorageWriter", "StorageReader", "CheckpointFormatError"]

DATA_SUFFIX = ".distcp"
_ALIGN = 4096
_ALIGN_MIN_NBYTES = 64 << 10
_TORCH_METADATA = ".metadata"
# Staging directories of saves in flight in this process (coordinator side): any other staging
# directory of this process is left over from a failed save and removed by the next one.
_ACTIVE_STAGING: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _remove_own_failed_staging(target: Path, fresh: Path) -> None:
    """Remove staging directories of ``target`` named for this host and process (``fresh`` shows
    the host-pid prefix) that no save of this process is using: what a failed save left."""
    marker = ".tmp-"
    head, _, token = fresh.name.rpartition(marker)
    mine = head + marker + token.rsplit("-", 1)[0] + "-"
    with _ACTIVE_LOCK:
        active = set(_ACTIVE_STAGING)
    for p in target.parent.iterdir():
        if p.name.startswith(mine) and str(p) not in active:
            _commit.discard(p)


# -- the writer the data files go through ---------------------------------------------------
def _open_writer(path: str, backend: str, direct: bool, expected_nbytes: int) -> Writer:
    """A new data file (O_EXCL: a name is never reused) written through the native engine, its
    staging memory sized to the file (a small file does not get 64 MiB of staging)."""
    return Writer(path, backend=backend, direct=direct, exclusive=True, **staging_for(expected_nbytes))


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a CPU contiguous tensor as a 1-D uint8 tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return flat.view(torch.uint8)


def _item_nbytes(item: WriteItem) -> int:
    td = item.tensor_data
    if td is None:
        return 0
    return math.prod(td.size) * torch.empty((), dtype=td.properties.dtype).element_size()


def _buckets(items: Sequence[WriteItem], n: int) -> list[list[WriteItem]]:
    """Split items over n files: byte items round-robin, tensors largest first onto the
    lightest file (the same policy as torch's FileSystemWriter)."""
    if n <= 1:
        return [list(items)]
    out: list[list[WriteItem]] = [[] for _ in range(n)]
    load = [0] * n
    byte_items = [wi for wi in items if wi.type == WriteItemType.BYTE_IO]
    tensors = sorted((wi for wi in items if wi.type != WriteItemType.BYTE_IO), key=_item_nbytes, reverse=True)
    for i, wi in enumerate(byte_items):
        out[i % n].append(wi)
    for wi in tensors:
        j = load.index(min(load))
        out[j].append(wi)
        load[j] += _item_nbytes(wi)
    return [b for b in out if b]


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator tells every rank in prepare_global_plan: the staging directory
    (its name beside the target) and this rank's file prefix."""

    staging_name: str
    prefix: str


def _describe_key(idx: MetadataIndex) -> str:
    """The key, and the chunk's offsets when it is not the tensor's first (a shard)."""
    return idx.fqn if idx.offset is None or not any(idx.offset) else f"{idx.fqn} (chunk at {list(idx.offset)})"


def _stage_copy(obj: Any, pin: bool, cache: Any = None) -> Any:
    """Deep copy of a state dict: containers rebuilt, every tensor (DTensor: its local shard)
    copied to (pinned) CPU memory, other mutable leaves deep-copied where they allow it. Where
    ``cache`` (an earlier result) has a tensor of the same shape and dtype at the same place,
    the copy goes into it instead of new memory."""
    if _DTensor is not None and isinstance(obj, _DTensor):
        prev = cache.to_local() if _DTensor is not None and isinstance(cache, _DTensor) else None
        local = _stage_copy(obj.to_local(), pin, prev)
        return _DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                   shape=obj.size(), stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        reuse = (isinstance(cache, torch.Tensor) and cache.shape == obj.shape and cache.dtype == obj.dtype
                 and cache.device.type == "cpu" and cache.is_contiguous())
        out = cache if reuse else torch.empty(obj.size(), dtype=obj.dtype, device="cpu", pin_memory=pin)
        if obj.numel():
            with torch.no_grad():
                out.copy_(obj.detach(), non_blocking=pin and obj.device.type == "cuda")
        out.requires_grad_(obj.requires_grad)
        return out
    if isinstance(obj, dict):
        c = cache if isinstance(cache, dict) else {}
        return type(obj)((k, _stage_copy(v, pin, c.get(k))) for k, v in obj.items())  # dict, OrderedDict
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        c = cache if isinstance(cache, (list, tuple)) and len(cache) == len(obj) else [None] * len(obj)
        return type(obj)(_stage_copy(v, pin, cv) for v, cv in zip(obj, c))
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    try:
        return copy.deepcopy(obj)
    except Exception:  # an object that cannot be copied is saved as it is when written
        return obj


class StorageWriter(_TorchStorageWriter, _AsyncStager):  # type: ignore[misc]
    """DCP ``StorageWriter`` (and ``AsyncStager``) writing through the native engine.

    Use it where torch's ``FileSystemWriter`` goes::

        dcp.save(state_dict, storage_writer=StorageWriter("ckpt/step_100"))
        fut = dcp.async_save(state_dict, storage_writer=StorageWriter("ckpt/step_200"))

    Every rank must pass the same ``path``; all ranks write into one staging directory beside
    it, the coordinator publishes it atomically in ``finish`` (see the module docstring). An
    existing checkpoint at ``path`` is replaced whole, never written into, and only when
    ``overwrite`` is true. As an ``AsyncStager`` (``dcp.async_save``), :meth:`stage` copies the
    state dict into pinned host memory when CUDA is available and into ordinary host memory
    otherwise (``staging_pinned`` says which was used).

    Args:
        path: the checkpoint directory.
        single_file_per_rank: one file per rank and thread (True) or one file per item.
        sync_files: each rank fdatasyncs its data files before the commit (the commit itself
            always fsyncs the metadata and the directories). False skips that: faster, but
            after a power loss the published checkpoint may hold lost data (caught by the
            checksums on load when ``checksums`` is on).
        thread_count: files written in parallel per rank.
        overwrite: replace an existing checkpoint at ``path`` (atomically); False raises.
        checksums: store the xxh3-64 of each item; :class:`StorageReader` verifies whole-item reads.
        backend, direct: passed to the native writer (``"auto"`` | ``"io_uring"`` | ``"threads"``;
            O_DIRECT on or off).
        cache_staged_state_dict: :meth:`stage` copies into the tensors of its previous copy
            where shapes and dtypes match (no new pinned memory per save). The previous
            ``async_save`` must have completed before the next one stages.

    Raises:
        ValueError: ``thread_count`` < 1 or ``path`` is a URL.
    """

    _synchronize_after_execute: bool = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        overwrite: bool = True,
        checksums: bool = True,
        backend: str = "auto",
        direct: bool = True,
        cache_staged_state_dict: bool = False,
    ) -> None:
        super().__init__()
        if int(thread_count) < 1:
            raise ValueError(f"thread_count must be >= 1, got {thread_count}")
        if "://" in os.fspath(path):
            raise ValueError(f"StorageWriter writes local paths only, got {os.fspath(path)!r}")
        self.path = Path(os.fspath(path))
        self.single_file_per_rank = bool(single_file_per_rank)
        self.sync_files = bool(sync_files)
        self.thread_count = int(thread_count)
        self.overwrite = bool(overwrite)
        self.checksums = bool(checksums)
        self.backend = backend
        self.direct = bool(direct)
        self.cache_staged_state_dict = bool(cache_staged_state_dict)
        self.staging_pinned: bool | None = None
        self._staged_cache: Any = None
        self.save_id = str(uuid.uuid4())
        self.rank: int = 0
        self.is_coordinator = True
        self._staging: Path | None = None

    # -- torch StorageWriter ----------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save, to ``checkpoint_id`` when given (else to the same path).

        Raises:
            ValueError: ``checkpoint_id`` is a URL.
        """
        if checkpoint_id:
            if "://" in os.fspath(checkpoint_id):
                raise ValueError(f"StorageWriter writes local paths only, got {os.fspath(checkpoint_id)!r}")
            self.path = Path(os.fspath(checkpoint_id))
        self.save_id = str(uuid.uuid4())
        if self._staging is not None:  # an earlier save through this writer failed: drop its staging
            self._release_staging(discard=True)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Record this rank's role.

        Raises:
            UnsupportedError: ``use_collectives=False`` (rank-local metadata) was asked for.
        """
        self.is_coordinator = bool(is_coordinator)
        self.rank = int(kwargs.get("rank") or 0)
        if kwargs.get("use_collectives", True) is False:
            raise UnsupportedError(
                "llmio StorageWriter needs use_collectives=True: the coordinator publishes one "
                "checkpoint for all ranks (rank-local metadata is not supported)")

    def _check_target(self) -> None:
        p = self.path
        if p.exists():
            if not p.is_dir():
                raise FileExistsError(f"checkpoint path {p} exists and is not a directory")
            names = [n.name for n in p.iterdir()]
            if names and METADATA_FILE not in names:
                raise FileExistsError(
                    f"checkpoint path {p} is a non-empty directory that is not an llmio DCP checkpoint "
                    f"(no {METADATA_FILE}); refusing to replace it")
            if names and not self.overwrite:
                raise FileExistsError(f"checkpoint {p} exists and overwrite=False")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Check that ``path`` may receive a checkpoint (on every rank, before anything is written).

        Raises:
            FileExistsError: ``path`` is a file, a directory that is not an llmio DCP checkpoint,
                or a checkpoint while ``overwrite=False``.
        """
        self._check_target()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: choose the staging directory all ranks write into, create it, and give
        each rank its file prefix. Staging directories of dead saves of this host are removed.

        Raises:
            OSError: the staging directory cannot be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _commit.remove_stale(self.path)
        staging = _commit.staging_path(self.path)
        _remove_own_failed_staging(self.path, staging)
        staging.mkdir()
        with _ACTIVE_LOCK:
            _ACTIVE_STAGING.add(str(staging))
        self._staging = staging
        return [replace(p, storage_data=_PlanData(staging.name, f"__{i}_")) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items into the staging directory, ``thread_count`` files in
        parallel, each fdatasynced (``sync_files``). Returns a completed future.

        Raises:
            OSError: a write or sync failed; the message names the file and the item's key.
                Nothing is published (the staging directory is left for cleanup).
        """
        pd: _PlanData = plan.storage_data
        if not isinstance(pd, _PlanData):
            raise TypeError("llmio StorageWriter.write_data got a plan not prepared by its prepare_global_plan")
        staging = self.path.parent / pd.staging_name
        staging.mkdir(exist_ok=True)  # created by the coordinator; a no-op on a shared FS
        if self.single_file_per_rank:
            groups = _buckets(plan.items, self.thread_count)
        else:
            groups = [[wi] for wi in plan.items]
        jobs = [(f"{pd.prefix}{k}{DATA_SUFFIX}", g) for k, g in enumerate(groups)]
        results: list[WriteResult] = []
        try:
            with reuse_staging():  # many files (one per item, or per thread): staging mapped once
                if len(jobs) <= 1 or self.thread_count == 1:
                    for name, g in jobs:
                        results += self._write_file(staging, name, g, planner)
                else:
                    with concurrent.futures.ThreadPoolExecutor(self.thread_count,
                                                               thread_name_prefix="llmio-dcp-write") as ex:
                        for r in ex.map(lambda j: self._write_file(staging, j[0], j[1], planner), jobs):
                            results += r
        except BaseException:
            # This save is over: its staging directory is no longer in use by this process, and
            # the next save to the same target removes it (other ranks may still be writing).
            self._release_staging(discard=False)
            raise
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, staging: Path, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        path = str(staging / name)
        expected = sum(_item_nbytes(wi) + _ALIGN for wi in items)
        w = _open_writer(path, self.backend, self.direct, expected)
        out: list[WriteResult] = []
        key = "?"
        try:
            for wi in items:
                key = _describe_key(wi.index)
                data = planner.resolve_data(wi)
                if wi.type == WriteItemType.BYTE_IO:
                    if not isinstance(data, io.BytesIO):
                        raise TypeError(f"item {key}: expected BytesIO for a byte item, got {type(data).__name__}")
                    buf = data.getbuffer()
                    nbytes = buf.nbytes
                    digest = xxhash.xxh3_64(buf).hexdigest() if self.checksums else None
                    off = w.write(buf) if nbytes else w.tell()
                    del buf
                    kind = "bytes"
                else:
                    if not isinstance(data, torch.Tensor):
                        raise TypeError(f"item {key}: expected a tensor, got {type(data).__name__}")
                    t = data.detach()
                    if t.layout != torch.strided:
                        raise UnsupportedError(f"item {key}: tensors of layout {t.layout} cannot be saved")
                    if t.device.type != "cpu":
                        t = t.cpu()
                    t = t.contiguous()
                    raw = _raw_bytes(t)
                    nbytes = raw.numel()
                    pos = w.tell()
                    if nbytes >= _ALIGN_MIN_NBYTES and pos % _ALIGN:
                        w.write(np.zeros(_ALIGN - pos % _ALIGN, dtype=np.uint8))
                    digest = xxhash.xxh3_64(raw.numpy()).hexdigest() if self.checksums else None
                    off = w.write(raw) if nbytes else w.tell()
                    kind = "tensor"
                out.append(WriteResult(index=wi.index, size_in_bytes=nbytes,
                                       storage_data=ItemLocation(name, int(off), int(nbytes), kind, digest)))
            key = "(closing)"
            w.close(sync="data" if self.sync_files else "none")
        except BaseException as e:
            try:
                w.abort()
            except Exception:  # pragma: no cover - best effort
                pass
            if isinstance(e, OSError):
                # The engine writes asynchronously: a failure may surface at a later call or at
                # close. Its message names the file range ("@ OFFSET (+LEN)"): find the items in it.
                m = re.search(r"@ (\d+) \(\+(\d+)\)", str(e))
                if m:
                    lo, hi = int(m.group(1)), int(m.group(1)) + int(m.group(2))
                    hit = [_describe_key(wr.index) for wr in out
                           if wr.storage_data.file_offset < hi and wr.storage_data.file_offset + wr.storage_data.nbytes > lo]
                    if hit:
                        key = ", ".join(hit[:5]) + (f" and {len(hit) - 5} more" if len(hit) > 5 else "")
                raise type(e)(e.errno, f"DCP save: writing {key} to {path}: {e.strerror or e}") from e
            raise
        return out

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: write the metadata (JSON, checksummed) last into the staging directory,
        fsync it, and publish the checkpoint (atomic rename or exchange, parent fsynced).

        Raises:
            CheckpointFormatError: a data file is shorter than the results say (a rank's write
                was lost); nothing is published.
            TypeError: the planner data holds a value JSON cannot store.
            OSError: the metadata write, a sync or the rename failed; the previous checkpoint
                at ``path`` is untouched.
        """
        staging = self._staging
        if staging is None:
            raise RuntimeError("finish() called without prepare_global_plan() on this writer")
        storage: dict[MetadataIndex, ItemLocation] = {}
        ends: dict[str, int] = {}
        for per_rank in results:
            for wr in per_rank:
                loc: ItemLocation = wr.storage_data
                storage[wr.index] = loc
                ends[loc.file] = max(ends.get(loc.file, 0), loc.file_offset + loc.nbytes)
        files: dict[str, int] = {}
        for name in sorted(os.listdir(staging)):
            if name.endswith(DATA_SUFFIX):
                files[name] = os.stat(staging / name).st_size
        for name, end in ends.items():
            if files.get(name, -1) < end:
                raise CheckpointFormatError(
                    f"DCP save: data file {staging / name} has {files.get(name, 'no')} bytes, its items end at {end}",
                    path=str(staging / name))
        metadata.version = metadata.version or "1.0.0"
        metadata.storage_meta = self.storage_meta()
        blob = encode(metadata, storage, files)
        md_path = staging / METADATA_FILE
        fd = os.open(md_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        # Data files were fdatasynced by the rank that wrote them (or, with sync_files=False,
        # deliberately not): the commit syncs only the directories.
        synced = [str(md_path)] + [str(staging / n) for n in files]
        try:
            _commit.commit(staging, self.path, synced=synced)
        except BaseException:
            self._release_staging(discard=True)
            raise
        self._release_staging(discard=False)

    def _release_staging(self, *, discard: bool) -> None:
        if self._staging is None:
            return
        with _ACTIVE_LOCK:
            _ACTIVE_STAGING.discard(str(self._staging))
        if discard:
            _commit.discard(self._staging)
        self._staging = None

    def storage_meta(self) -> StorageMeta | None:
        """``StorageMeta(checkpoint_id=path, save_id=...)`` for the planner and the metadata."""
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory this writer saves to."""
        return str(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True for a local path whose nearest existing ancestor is a writable directory."""
        s = os.fspath(checkpoint_id)
        if "://" in s:
            return False
        for p in Path(s).absolute().parents:
            if p.exists():
                return p.is_dir() and os.access(p, os.W_OK)
        return False

    # -- AsyncStager ------------------------------------------------------------------------
    @property
    def should_synchronize_after_execute(self) -> bool:
        """False: :meth:`stage` blocks until the copy is complete."""
        return self._synchronize_after_execute

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy ``state_dict`` (nested dicts, lists, tuples; tensors and DTensors on any device)
        into host memory so training may go on while the copy is saved. Host memory is pinned
        when CUDA is available (fast device-to-host copies), ordinary otherwise
        (``torch.empty(pin_memory=True)`` needs CUDA); ``staging_pinned`` records which.
        Blocks until the copy is complete.

        Raises:
            RuntimeError: a device-to-host copy failed.
        """
        pin = torch.cuda.is_available()
        self.staging_pinned = pin
        staged = _stage_copy(state_dict, pin, self._staged_cache if self.cache_staged_state_dict else None)
        if pin:
            torch.cuda.synchronize()
        if self.cache_staged_state_dict:
            self._staged_cache = staged
        return staged

    def synchronize_staging(self) -> None:
        """A no-op: :meth:`stage` is synchronous."""

    def close(self) -> None:
        """Drop the cached staging copy."""
        self._staged_cache = None

    def __getstate__(self) -> dict[str, Any]:
        """The writer's settings, without the cached staging copy (a whole state dict) nor the
        staging directory of a save in progress: ``dcp.async_save`` with
        ``AsyncCheckpointerType.PROCESS`` pickles the writer to its background process on every
        save, next to the staged state dict it already sends."""
        st = self.__dict__.copy()
        st["_staged_cache"] = None
        st["_staging"] = None
        return st

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# -- reader ---------------------------------------------------------------------------------
def _runs(sizes: Sequence[int], offs: Sequence[int], lens: Sequence[int], itemsize: int) -> tuple[np.ndarray, int]:
    """Byte offsets (within a row-major chunk of shape ``sizes``) of the contiguous runs that
    make up the box ``[offs, offs + lens)``, in the box's row-major order, and the run length
    in bytes. The innermost dimensions the box covers whole are merged into each run."""
    nd = len(sizes)
    if nd == 0:
        return np.zeros(1, dtype=np.int64), itemsize
    strides = [1] * nd
    for d in range(nd - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    k = nd - 1
    while k > 0 and offs[k] == 0 and lens[k] == sizes[k]:
        k -= 1
    run = lens[k] * strides[k] * itemsize
    base = np.zeros(1, dtype=np.int64)
    for d in range(k):
        idx = (offs[d] + np.arange(lens[d], dtype=np.int64)) * strides[d]
        base = (base[:, None] + idx[None, :]).reshape(-1)
    return (base + offs[k] * strides[k]) * itemsize, run


@dataclass
class _Staged:
    job: _Job
    start: int  # byte offset of the item's runs in the batch's bounce buffer (4 KiB-aligned)
    nbytes: int  # bytes read for it (its runs back to back)
    dest: torch.Tensor | None  # destination tensor; None for a non-tensor value


@dataclass
class _Batch:
    items: list[_Staged]
    buf: torch.Tensor  # uint8, 4 KiB-aligned

    def view(self, s: _Staged) -> torch.Tensor:
        return self.buf[s.start:s.start + s.nbytes]


@dataclass
class _Job:
    req: ReadItem
    loc: ItemLocation
    file_index: int
    dtype: torch.dtype | None
    offsets: np.ndarray  # absolute file offsets of the runs
    run: int  # bytes per run
    whole: bool  # the request covers the stored item entirely


class StorageReader(_TorchStorageReader):
    """DCP ``StorageReader`` for checkpoints written by :class:`StorageWriter`.

    ``dcp.load(state_dict, storage_reader=StorageReader(path))`` reads, per rank, only the
    byte ranges its plan asks for (a box of a stored chunk becomes a list of contiguous runs),
    in batches, each one vectorised submission to :class:`llmio_native.io.Reader` (io_uring or
    a pread pool, O_DIRECT where the file system allows) into a 4 KiB-aligned bounce buffer.
    Each item is verified there (its length; the stored xxh3-64 of a whole-item read) before
    any byte of it reaches its destination; then ``copy_`` puts it in place (dtype conversion,
    strided views and CUDA destinations alike; the bounce buffers are pinned when a destination
    is on the GPU). One batch is read while the previous one is verified and copied out.

    What a failed load leaves in the state dict:

    * Before anything is read, the metadata is verified (JSON, checksum, shapes, ranges) and so
      is every file the plan needs (present, size as recorded): a missing or truncated file or
      a tampered metadata raises :class:`CheckpointFormatError` naming the file, the offset and
      the key, and no destination is touched. Non-tensor values are all read and checked
      before any tensor.
    * A checksum mismatch or a failed read (EIO, a short read) raises naming the file, the
      byte range and the key; no destination of the failing batch is written (the failing
      item's included) nor of any later batch. Items of earlier batches (``batch_bytes`` each,
      in plan order) were already written: the load is not all-or-nothing.
    * ``verify="first"`` makes it all-or-nothing for corruption: a first pass streams every
      stored item the plan touches (whole, even where only part of it is asked for, as in a
      resharded load) through one buffer of ``min(batch_bytes, 64 MiB)`` and checks its
      xxh3-64 before any destination is written. It reads the bytes twice, both times from
      storage where reads are O_DIRECT (they do not fill the page cache): a cold load takes
      about twice as long (measured: 0.46-0.55 GB/s against 0.90 GB/s on the dev VM). An
      I/O error in the second pass behaves as above.

    Memory: two bounce buffers of ``max(batch_bytes, largest item read)`` each at most (plus
    4 KiB per item for alignment), released when the load ends. Destination memory is not
    doubled, but a checkpoint whose largest tensor is large (an embedding) costs up to twice
    that tensor's size in temporaries while it loads.

    Args:
        path: the checkpoint directory.
        backend, direct, queue_depth, num_threads: passed to :class:`llmio_native.io.Reader`.
        trust_pickle: hand non-tensor values to torch's planner (which unpickles them with
            ``weights_only=False``) without first checking them with ``weights_only=True``.
        verify: ``True``: check whole-item reads against their stored xxh3-64 before they are
            copied out; ``"first"``: also check every stored item the plan touches in a first
            pass before any destination is written (see above); ``False``: no checksums.
        batch_bytes: bytes per read batch (an item larger than this is a batch of its own).

    Raises:
        ValueError: ``path`` is a URL, or ``verify`` is not True, False or "first".
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 64,
        num_threads: int = 16,
        trust_pickle: bool = False,
        verify: bool | str = True,
        batch_bytes: int = 64 << 20,
    ) -> None:
        super().__init__()
        if "://" in os.fspath(path):
            raise ValueError(f"StorageReader reads local paths only, got {os.fspath(path)!r}")
        self.path = Path(os.fspath(path))
        self.backend = backend
        self.direct = bool(direct)
        self.queue_depth = int(queue_depth)
        self.num_threads = int(num_threads)
        self.trust_pickle = bool(trust_pickle)
        if verify not in (True, False, "first"):
            raise ValueError(f"verify must be True, False or 'first', got {verify!r}")
        self.verify: bool | str = verify
        self.batch_bytes = int(batch_bytes)
        self.load_id = str(uuid.uuid4())
        self._storage: dict[MetadataIndex, ItemLocation] = {}
        self._files: dict[str, int] = {}
        self._metadata: Metadata | None = None
        self._last_stats: dict | None = None
        self._bounce: list[tuple[torch.Tensor, int, bool] | None] = [None, None]

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` when given.

        Raises:
            ValueError: ``checkpoint_id`` is a URL.
        """
        if checkpoint_id:
            if "://" in os.fspath(checkpoint_id):
                raise ValueError(f"StorageReader reads local paths only, got {os.fspath(checkpoint_id)!r}")
            self.path = Path(os.fspath(checkpoint_id))
        self.load_id = str(uuid.uuid4())
        self._storage, self._files, self._metadata = {}, {}, None

    @property
    def metadata_path(self) -> Path:
        """``path/.metadata.json``."""
        return self.path / METADATA_FILE

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read and verify ``.metadata.json`` (see :mod:`.dcp_metadata`). A directory replaced
        by an interrupted no-exchange commit is first restored (``commit.recover``).

        Raises:
            FileNotFoundError: no checkpoint at ``path`` (the message says whether a save into it
                was interrupted, or whether it is a torch ``FileSystemWriter`` checkpoint).
            CheckpointFormatError: the metadata is malformed, inconsistent or was modified.
        """
        if kwargs.get("rank") is not None:
            raise FileNotFoundError(f"{self.path}: llmio DCP checkpoints have no rank-local metadata")
        _commit.recover(self.path)
        mp = self.metadata_path
        try:
            with open(mp, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            why = ""
            if (self.path / _TORCH_METADATA).exists():
                why = " (it has a pickled .metadata: a torch FileSystemWriter checkpoint; load it with FileSystemReader)"
            elif not self.path.exists():
                why = " (the directory does not exist)"
            raise FileNotFoundError(f"DCP checkpoint {self.path} has no {METADATA_FILE}{why}") from None
        md, storage, files = decode(raw, str(mp))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        self._metadata, self._storage, self._files = md, storage, files
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Take the item locations from ``metadata`` (as returned by :meth:`read_metadata`).

        Raises:
            CheckpointFormatError: ``metadata`` did not come from an llmio DCP checkpoint.
        """
        sd = metadata.storage_data
        if not isinstance(sd, dict) or not all(isinstance(v, ItemLocation) for v in sd.values()):
            raise CheckpointFormatError(f"{self.path}: metadata without llmio storage data")
        self._storage = sd
        if self._metadata is not metadata or not self._files:
            # metadata read by another instance (the coordinator's): recompute the file sizes
            files: dict[str, int] = dict(self._files)
            for loc in sd.values():
                files[loc.file] = max(files.get(loc.file, 0), loc.file_offset + loc.nbytes)
            self._files = files
        self._metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Unchanged plan."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged plans."""
        return plans

    def stats(self) -> dict | None:
        """The :meth:`llmio_native.io.Reader.stats` of the last :meth:`read_data` (bytes read,
        direct/buffered split...), plus ``bytes_requested`` (what the plan asked for); None
        before any read."""
        return self._last_stats

    # -- planning the reads ---------------------------------------------------------------------
    def _plan_jobs(self, plan: LoadPlan) -> tuple[list[str], list[_Job]]:
        md = self._metadata
        if md is None:
            raise RuntimeError("read_data() before read_metadata()/set_up_storage_reader()")
        names: list[str] = []
        index: dict[str, int] = {}
        jobs: list[_Job] = []
        for req in plan.items:
            loc = self._storage.get(req.storage_index)
            key = _describe_key(req.storage_index)
            if loc is None:
                raise CheckpointFormatError(f"{self.metadata_path}: no stored data for {key}",
                                            path=str(self.metadata_path), key=req.storage_index.fqn)
            if loc.file not in index:
                index[loc.file] = len(names)
                names.append(loc.file)
            fi = index[loc.file]
            if req.type == LoadItemType.BYTE_IO:
                if loc.kind != "bytes":
                    raise CheckpointFormatError(f"{self.metadata_path}: {key} is stored as a tensor, asked for as bytes",
                                                path=str(self.metadata_path), key=req.storage_index.fqn)
                jobs.append(_Job(req, loc, fi, None, np.array([loc.file_offset], dtype=np.int64), loc.nbytes, True))
                continue
            tmd = md.state_dict_metadata.get(req.storage_index.fqn)
            if loc.kind != "tensor" or not isinstance(tmd, TensorStorageMetadata):
                raise CheckpointFormatError(f"{self.metadata_path}: {key} is not stored as a tensor",
                                            path=str(self.metadata_path), key=req.storage_index.fqn)
            chunk_off = list(req.storage_index.offset or [])
            chunk = next((c for c in tmd.chunks if list(c.offsets) == chunk_off), None)
            if chunk is None:
                raise CheckpointFormatError(f"{self.metadata_path}: {key}: no such chunk",
                                            path=str(self.metadata_path), key=req.storage_index.fqn)
            sizes, offs, lens = list(chunk.sizes), list(req.storage_offsets), list(req.lengths)
            if len(offs) != len(sizes) or len(lens) != len(sizes) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(offs, lens, sizes)):
                raise CheckpointFormatError(
                    f"{self.metadata_path}: {key}: request offsets {offs} lengths {lens} outside the stored chunk {sizes}",
                    path=str(self.metadata_path), key=req.storage_index.fqn)
            dtype = tmd.properties.dtype
            itemsize = torch.empty((), dtype=dtype).element_size()
            if math.prod(lens) == 0:
                rel, run = np.zeros(0, dtype=np.int64), 0
            else:
                rel, run = _runs(sizes, offs, lens, itemsize)
            whole = offs == [0] * len(offs) and lens == sizes
            jobs.append(_Job(req, loc, fi, dtype, rel + loc.file_offset, run, whole))
        return names, jobs

    def _check_files(self, names: list[str], jobs: list[_Job]) -> None:
        keys_of: dict[str, list[str]] = {}
        for j in jobs:
            keys_of.setdefault(j.loc.file, []).append(j.req.storage_index.fqn)
        for name in names:
            p = self.path / name
            keys = sorted(set(keys_of.get(name, [])))
            shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise CheckpointFormatError(f"DCP checkpoint data file {p} is missing (holds {shown})",
                                            path=str(p), key=keys[0] if keys else None) from None
            want = self._files.get(name)
            if want is not None and st.st_size != want:
                what = "truncated" if st.st_size < want else "longer than recorded"
                bad = sorted({(j.loc.file_offset, j.loc.nbytes, j.req.storage_index.fqn) for j in jobs
                              if j.loc.file == name and j.loc.file_offset + j.loc.nbytes > st.st_size})
                detail = ""
                if bad:
                    detail = "; " + ", ".join(f"{k!r} at bytes [{o}, {o + n})" for o, n, k in bad[:5]) + (
                        f" and {len(bad) - 5} more" if len(bad) > 5 else "") + " lie past its end"
                raise CheckpointFormatError(
                    f"DCP checkpoint data file {p} is {what}: {st.st_size} bytes, the metadata says {want} "
                    f"(holds {shown}){detail}; nothing was read", path=str(p),
                    key=bad[0][2] if bad else (keys or [None])[0], offset=bad[0][0] if bad else st.st_size)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``: verify the files, then read the requested runs in
        batches through :class:`llmio_native.io.Reader` into a 4 KiB-aligned bounce buffer,
        verify each item there (length; xxh3-64 of whole-item reads), and only then copy the
        items into their destinations and hand them to the planner (``commit_tensor`` /
        ``load_bytes``). Returns a completed future.

        A failure leaves the destinations of the failing batch (the failing item included) and
        of every later batch untouched; items of earlier batches were written (see the class
        docstring; ``verify="first"`` finds corruption before any destination is touched).

        Raises:
            CheckpointFormatError: a data file is missing, truncated or longer than recorded, a
                requested key or chunk is not stored, an item does not match its xxh3-64, or a
                non-tensor value needs unpickling beyond ``weights_only``
                (``trust_pickle=False``); the message names the file, the byte offset and the key.
            OSError: a read failed (names the file, the offset and length, and the keys read).
        """
        names, jobs = self._plan_jobs(plan)
        self._check_files(names, jobs)
        requested = sum(len(j.offsets) * j.run for j in jobs)
        if not jobs:
            self._last_stats = {"bytes": 0, "bytes_requested": 0}
            fut: Future[None] = Future()
            fut.set_result(None)
            return fut
        reader = Reader([str(self.path / n) for n in names], backend=self.backend, direct=self.direct,
                        queue_depth=self.queue_depth, num_threads=self.num_threads)
        if self.verify == "first":
            self._verify_first(reader, names, jobs)
        # Non-tensor values first, all of them, checked (checksum, weights_only) before any
        # tensor byte lands in a destination: a refused pickle leaves the state dict untouched.
        byte_jobs = [j for j in jobs if j.dtype is None]
        tensor_jobs = [j for j in jobs if j.dtype is not None]
        if byte_jobs:
            staged_bytes = self._prepare_batch(byte_jobs, planner, slot=None)
            self._read_batch(reader, names, staged_bytes)
            self._verify_batch(staged_bytes)
        batches: list[list[_Job]] = [[]]
        acc = 0
        for j in tensor_jobs:
            n = len(j.offsets) * j.run
            # an item larger than batch_bytes is a batch of its own (its bounce buffer is its size)
            if batches[-1] and (acc >= self.batch_bytes or acc + n > self.batch_bytes):
                batches.append([])
                acc = 0
            batches[-1].append(j)
            acc += n
        # One batch ahead: batch k+1 is read (GIL released) into the other bounce buffer while
        # batch k is verified, copied out and handed to the planner.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmio-dcp-read") as ex:
            pending = None
            for k, batch in enumerate(batches):
                staged = self._prepare_batch(batch, planner, slot=k % 2)
                nxt = (staged, ex.submit(self._read_batch, reader, names, staged))
                if pending is not None:
                    try:
                        pending[1].result()
                        self._finish_batch(pending[0], planner)
                    except BaseException:
                        concurrent.futures.wait([nxt[1]])  # the other buffer is in use until then
                        raise
                pending = nxt
            if pending is not None:
                pending[1].result()
                self._finish_batch(pending[0], planner)
        if byte_jobs:
            for s in staged_bytes.items:
                planner.load_bytes(s.job.req, io.BytesIO(staged_bytes.view(s).numpy().tobytes()))
        st = dict(reader.stats())
        st["bytes_requested"] = requested
        self._last_stats = st
        self._bounce = [None, None]  # not kept between loads
        fut = Future()
        fut.set_result(None)
        return fut

    def _bounce_buffer(self, slot: int, nbytes: int, pin: bool) -> torch.Tensor:
        """A 4 KiB-aligned uint8 tensor of at least ``nbytes`` (pinned when ``pin``), reused
        across the batches of a load (two slots: one read while the other is copied out)."""
        cur = self._bounce[slot]
        if cur is not None and cur[1] >= nbytes and (cur[2] or not pin):
            return cur[0]
        self._bounce[slot] = None
        cap = max(nbytes, 1)
        base = None
        if pin:  # page-aligned already (cudaHostAlloc): no slack, which the caching host
            base = torch.empty(cap, dtype=torch.uint8, pin_memory=True)  # allocator would round up
            if base.data_ptr() % _ALIGN:
                base = None
        if base is None:
            base = torch.empty(cap + _ALIGN, dtype=torch.uint8, pin_memory=pin)
        skip = (-base.data_ptr()) % _ALIGN
        buf = base[skip:skip + cap]
        self._bounce[slot] = (buf, cap, pin)
        return buf

    def _prepare_batch(self, batch: list[_Job], planner: LoadPlanner, *, slot: int | None) -> _Batch:
        """Lay the jobs of a batch out in a bounce buffer (each at a 4 KiB-aligned start, so
        aligned file ranges read O_DIRECT) and resolve each tensor job's destination, checking
        its shape before anything is read. The buffer is pinned when a destination of the batch
        is on the GPU (the copy to it is then asynchronous)."""
        items: list[_Staged] = []
        acc = 0
        for j in batch:
            dest = None
            if j.dtype is not None:
                dest = planner.resolve_tensor(j.req).detach()
                lens = tuple(j.req.lengths)
                if tuple(dest.shape) != lens:
                    raise CheckpointFormatError(
                        f"{self.path}: {_describe_key(j.req.storage_index)}: destination of shape "
                        f"{tuple(dest.shape)} for a request of {list(lens)}", key=j.req.storage_index.fqn)
            start = -(-acc // _ALIGN) * _ALIGN
            n = len(j.offsets) * j.run
            items.append(_Staged(j, start, n, dest))
            acc = start + n
        if slot is None:  # byte items: their own buffer, kept until they are handed over
            base = torch.empty(acc + _ALIGN, dtype=torch.uint8)
            skip = (-base.data_ptr()) % _ALIGN
            return _Batch(items, base[skip:skip + max(acc, 1)])
        pin = torch.cuda.is_available() and any(s.dest is not None and s.dest.is_cuda for s in items)
        return _Batch(items, self._bounce_buffer(slot, acc, pin))

    def _read_batch(self, reader: Reader, names: list[str], batch: _Batch) -> None:
        """Every run of every item of the batch, in one vectorised submission into the bounce
        buffer. A failed read names the file, the offset and the keys whose bytes it held."""
        runs = [(s, len(s.job.offsets)) for s in batch.items if s.nbytes]
        if not runs:
            return
        files = np.concatenate([np.full(n, s.job.file_index, dtype=np.int64) for s, n in runs])
        offs = np.concatenate([s.job.offsets for s, _ in runs]).astype(np.int64, copy=False)
        nb = np.concatenate([np.full(n, s.job.run, dtype=np.int64) for s, n in runs])
        oo = np.concatenate([s.start + np.arange(n, dtype=np.int64) * s.job.run for s, n in runs])
        try:
            reader.read_many(files, offs, nb, batch.buf, oo)
        except OSError as e:
            raise type(e)(e.errno, self._describe_read_error(e, names, batch)) from e

    def _describe_read_error(self, e: OSError, names: list[str], batch: _Batch) -> str:
        """The engine's message (``read FILE @ OFFSET (+LEN): ...``) with the keys of the
        batch whose stored bytes overlap that range."""
        msg = e.strerror or str(e)
        m = re.search(r"read (.+?) @ (\d+) \(\+(\d+)\)", msg)
        hit: list[str] = []
        if m:
            fname = os.path.basename(m.group(1))
            lo, hi = int(m.group(2)), int(m.group(2)) + int(m.group(3))
            hit = [_describe_key(s.job.req.storage_index) for s in batch.items
                   if names[s.job.file_index] == fname and s.job.loc.file_offset < hi
                   and s.job.loc.file_offset + s.job.loc.nbytes > lo]
        if not hit:
            hit = [_describe_key(s.job.req.storage_index) for s in batch.items]
        keys = ", ".join(repr(k) for k in hit[:5]) + (f" and {len(hit) - 5} more" if len(hit) > 5 else "")
        return (f"DCP load from {self.path}: reading {keys}: {msg} "
                "(the destinations of this batch were not written)")

    def _item_error(self, j: _Job, what: str) -> CheckpointFormatError:
        p = self.path / j.loc.file
        return CheckpointFormatError(
            f"DCP checkpoint data file {p}: {_describe_key(j.req.storage_index)!r} at bytes "
            f"[{j.loc.file_offset}, {j.loc.file_offset + j.loc.nbytes}) {what}",
            path=str(p), key=j.req.storage_index.fqn, offset=j.loc.file_offset)

    def _verify_batch(self, batch: _Batch) -> None:
        """Checksum of each whole-item read (``verify``); for a non-tensor value also the
        ``weights_only`` load unless ``trust_pickle``. Runs on the bounce buffer, before any
        byte of the batch reaches a destination."""
        for s in batch.items:
            j = s.job
            if self.verify and j.whole and j.loc.xxh3 is not None:
                if xxhash.xxh3_64(batch.view(s).numpy()).hexdigest() != j.loc.xxh3:
                    raise self._item_error(j, "does not match its checksum (corrupted); no destination "
                                              "of its read batch was written")
            if j.dtype is None and not self.trust_pickle:
                try:
                    torch.load(io.BytesIO(batch.view(s).numpy().tobytes()), weights_only=True)
                except Exception as e:
                    key = _describe_key(j.req.storage_index)
                    raise CheckpointFormatError(
                        f"DCP checkpoint {self.path / j.loc.file}: non-tensor value {key!r} cannot be loaded "
                        f"with weights_only=True ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass "
                        "trust_pickle=True to StorageReader if you trust this checkpoint",
                        path=str(self.path / j.loc.file), key=j.req.storage_index.fqn) from None

    def _finish_batch(self, batch: _Batch, planner: LoadPlanner) -> None:
        """Verify every item of the batch in the bounce buffer, then copy them into their
        destinations (dtype conversion, strided and CUDA destinations alike) and hand the
        tensors to the planner."""
        self._verify_batch(batch)
        to_device = False
        for s in batch.items:
            if not s.nbytes:
                continue
            d = s.dest
            if d.device.type == "cpu" and d.dtype == s.job.dtype and d.is_contiguous() and not d.is_conj() \
                    and not d.is_neg():
                # A plain memcpy (numpy, GIL released, one thread): torch's copy_ splits it over its
                # intra-op threads, which on a loaded machine waits on a descheduled thread.
                np.copyto(_raw_bytes(d).numpy(), batch.view(s).numpy())
                continue
            src = batch.view(s).view(s.job.dtype).reshape(tuple(s.job.req.lengths))
            with torch.no_grad():
                d.copy_(src, non_blocking=d.is_cuda)
            to_device |= d.is_cuda
        if to_device:  # the planner may read the destinations at once, and the buffer is reused
            torch.cuda.current_stream().synchronize()
        for s in batch.items:
            planner.commit_tensor(s.job.req, s.dest)

    def _verify_first(self, reader: Reader, names: list[str], jobs: list[_Job]) -> None:
        """``verify="first"``: stream every stored item the plan touches (whole, even where the
        plan asks for a part of it) through one bounded buffer and check its xxh3-64, before
        any destination is written."""
        seen: set[tuple[int, int]] = set()
        items: list[_Job] = []
        for j in jobs:
            if j.loc.xxh3 is not None and (j.file_index, j.loc.file_offset) not in seen:
                seen.add((j.file_index, j.loc.file_offset))
                items.append(j)
        if not items:
            return
        cap = max(_ALIGN, min(self.batch_bytes, 64 << 20) // _ALIGN * _ALIGN)
        piece = min(cap, 4 << 20)
        buf = self._bounce_buffer(0, cap, False)
        hashers = [xxhash.xxh3_64() for _ in items]
        pieces: list[tuple[int, int, int]] = []  # (item, file offset, nbytes)
        for k, j in enumerate(items):
            for off in range(0, j.loc.nbytes, piece):
                pieces.append((k, j.loc.file_offset + off, min(piece, j.loc.nbytes - off)))
        g = 0
        while g < len(pieces):
            group, used, starts = [], 0, []
            while g < len(pieces) and used + pieces[g][2] <= cap:
                starts.append(used)
                group.append(pieces[g])
                used = -(-(used + pieces[g][2]) // _ALIGN) * _ALIGN
                g += 1
            files = np.array([items[k].file_index for k, _, _ in group], dtype=np.int64)
            offs = np.array([o for _, o, _ in group], dtype=np.int64)
            nb = np.array([n for _, _, n in group], dtype=np.int64)
            try:
                reader.read_many(files, offs, nb, buf, np.array(starts, dtype=np.int64))
            except OSError as e:
                fake = _Batch([_Staged(items[k], 0, 0, None) for k, _, _ in group], buf)
                raise type(e)(e.errno, self._describe_read_error(e, names, fake)) from e
            for (k, _, n), st in zip(group, starts):
                hashers[k].update(buf[st:st + n].numpy())
        for j, h in zip(items, hashers):
            if h.hexdigest() != j.loc.xxh3:
                raise self._item_error(j, "does not match its checksum (corrupted; found by verify='first', "
                                          "before any destination was written)")

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory this reader loads."""
        return str(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True for a local directory holding an llmio DCP checkpoint."""
        s = os.fspath(checkpoint_id)
        return "://" not in s and (Path(s) / METADATA_FILE).is_file()
