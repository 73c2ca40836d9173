"""Opening a dataset of our format from a URL: metadata into the cache, then an ordinary
:class:`~llmio_native.dataset.llmio.LioDataset` on the cache files with a
:class:`~.cache.ChunkCache` attached (``ds.remote``).

At open: ``manifest.json`` is fetched; then, in parallel, the shards' sizes and ETags (one
listing; where the source cannot list, the manifest's sizes, and each shard's ETag is learned
from its first response) and ``index.lio`` (every shard's header and tables in one object,
checked against the manifest, :mod:`llmio_native.dataset.index`): two round trips whatever
the shard count. Each shard's header and tables go into a sparse local file of the shard's
size (the chunks are holes until needed). A dataset without a usable index has each shard's
header and tables fetched from the shard (two requests per shard, 64 in flight). The local
directory is then opened and checked like a local dataset. A cache left by an earlier run is
reused when the manifest and the shards' sizes and ETags are unchanged, and wiped otherwise.

Offline: when the store cannot be reached and the cache holds the dataset's metadata, the
dataset opens from the cache with a warning, ``ds.remote.offline`` (and ``stats()``) say
so, and reads of chunks not in the cache raise :class:`RemoteError`.
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import numpy as np

from ..dataset import format as F
from ..dataset.index import IndexRecord, load_index
from ..dataset.manifest import Manifest, parse_manifest
from ..errors import FormatError, IncompleteDatasetError
from .cache import ChunkCache, allocated_bytes, create_state, reset_if_alone, state_ok, unit_charge
from .errors import DatasetChangedError, RemoteError, RemoteNotFoundError
from .store import ObjectInfo, Source, open_source

#: Default cache directory (``LLMIO_CACHE_DIR`` overrides it).
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "llmio_native", "remote")
_IDENTITY = "identity.json"


def default_cache_dir() -> str:
    """``$LLMIO_CACHE_DIR`` or ``~/.cache/llmio_native/remote``."""
    return os.environ.get("LLMIO_CACHE_DIR") or DEFAULT_CACHE_DIR


def default_cache_bytes(cache_dir: str) -> int:
    """``$LLMIO_CACHE_BYTES``, else half the free space of ``cache_dir``'s file system.

    Raises:
        ValueError: ``LLMIO_CACHE_BYTES`` is not a positive integer.
    """
    env = os.environ.get("LLMIO_CACHE_BYTES")
    if env:
        try:
            v = int(env)
        except ValueError:
            raise ValueError(f"LLMIO_CACHE_BYTES={env!r} is not an integer number of bytes") from None
        if v <= 0:
            raise ValueError(f"LLMIO_CACHE_BYTES={env!r} must be positive")
        return v
    st = os.statvfs(cache_dir)
    return st.f_bavail * st.f_frsize // 2


def cache_root(cache_dir: str, url: str) -> str:
    """The cache directory of dataset ``url`` under ``cache_dir``."""
    return os.path.join(os.path.abspath(cache_dir), hashlib.blake2b(url.encode(), digest_size=10).hexdigest())


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], offset + pos)


#: Requests in flight at open for a dataset without ``index.lio`` (header, then tables, of
#: each shard): each costs a round trip (20 ms or more to an object store), so such a dataset
#: opens in ceil(shards / this) x 2 round trips. With the index it is two whatever the count.
_META_THREADS = 64


def _write_meta(path: str, size: int, header: Any, t_off: int, tables: Any) -> None:
    """A sparse local file of ``size`` bytes holding a shard's header and tables (the chunks
    are holes until fetched); written as ``path.tmp`` and renamed."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        _pwrite_all(fd, header, 0)
        _pwrite_all(fd, tables, t_off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fetch_meta(src: Source, name: str, info: ObjectInfo, path: str) -> None:
    """Header and tables of one shard, fetched from the shard itself (two requests)."""
    size = info.size
    head = src.read_range(name, 0, min(F.HEADER_BYTES, size), info)
    hdr = F.unpack_header(head, src.key_url(name))
    t_off = int(hdr["table_offset"])
    if not F.HEADER_BYTES <= t_off <= size:
        raise FormatError(f"{src.key_url(name)}: table_offset {t_off} outside a file of {size} bytes",
                          path=src.key_url(name), offset=56)
    tables = src.read_range(name, t_off, size, info) if t_off < size else b""
    _write_meta(path, size, head, t_off, tables)


def _index_records(src: Source, man: Manifest, data: bytes | BaseException | None) -> list[IndexRecord] | None:
    """The checked records of the dataset's ``index.lio`` (``data``: its bytes, the error
    fetching it raised, or None to fetch it now), or None, with a warning, where it cannot
    be used (missing, damaged, stale): the caller then reads each shard's metadata from the
    shard.

    Raises:
        Exception: an error fetching it other than a :class:`RemoteError`.
    """
    ent = man.index
    if ent is None:
        return None
    url = src.key_url(ent["name"])
    try:
        if data is None:
            data = src.read(ent["name"])
        if isinstance(data, BaseException):
            raise data
        return load_index(data, ent, man.shards, url)
    except (FormatError, RemoteError) as exc:
        warnings.warn(f"{src.url}: the dataset's index cannot be used ({exc}); reading each shard's metadata "
                      "from the shard instead (slower to open)", RuntimeWarning, stacklevel=4)
        return None


def _units(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Units of the chunks (see cache.py): file, start, end, and the model unit of rans / rans1 chunks."""
    ch = ds.chunks
    n = len(ch)
    ufile = ch["file"].astype(np.int64)
    uend = np.asarray(ds._region_ends, dtype=np.int64)
    ustart = np.empty(n, dtype=np.int64)
    if n:
        ustart[1:] = uend[:-1]
        first = np.r_[True, ufile[1:] != ufile[:-1]]
        ustart[first] = F.HEADER_BYTES
    deps = np.full(n, -1, dtype=np.int64)
    rans = np.flatnonzero(np.isin(ch["codec"], getattr(F, "MODEL_CODECS", (F.CODEC_RANS,))))
    for c in rans.tolist():
        f, mo = int(ufile[c]), int(ch["model"][c])
        same = np.flatnonzero(ufile == f)
        u = int(same[np.searchsorted(ustart[same], mo, side="right") - 1])
        if u != c:
            deps[c] = u
    return ufile, ustart, uend, deps


def open_remote(url: str, dtype: np.dtype | None, reader_options: dict, *, cache_dir: str | None = None,
                cache_bytes: int | None = None, storage_options: dict | None = None,
                prefetch_bytes: int | None = None) -> Any:
    """Open the llmio dataset at ``url`` through a local cache (see the module doc and
    :func:`llmio_native.open_dataset`).

    Raises:
        ImportError: obstore is not installed.
        RemoteNotFoundError: (a FileNotFoundError) no ``manifest.json`` at ``url``, or a
            listed shard is missing.
        RemoteError: the store cannot be reached and the cache does not hold the dataset.
        FormatError: the manifest or a shard's metadata is damaged or inconsistent.
        DatasetChangedError: a shard's size differs from the manifest's.
        ValueError: ``cache_bytes`` too small for the metadata plus one chunk, or not positive.
        OSError: the cache directory cannot be written, or does not support hole punching.
    """
    src = open_source(url, storage_options)
    cdir = cache_dir if cache_dir is not None else default_cache_dir()
    os.makedirs(cdir, exist_ok=True)
    cb = default_cache_bytes(cdir) if cache_bytes is None else int(cache_bytes)
    if cb <= 0:
        raise ValueError(f"open_dataset({url!r}): cache_bytes must be positive, got {cache_bytes!r}")
    root = cache_root(cdir, src.url)
    os.makedirs(root, exist_ok=True)
    lock = os.open(os.path.join(root, "setup.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process sets up the metadata, the others reuse it
        offline, identity, infos = _setup(src, root)
    finally:
        os.close(lock)
    from ..dataset.llmio import LioDataset

    try:
        ds = LioDataset.open(root, dtype, reader_options)
    except FormatError as exc:
        exc.args = (f"{src.url}: {exc} (metadata fetched into {root})",)
        raise
    ufile, ustart, uend, deps = _units(ds)
    usize = unit_charge(ustart, uend)  # v2: the aligned span (units share boundary blocks)
    n = len(ustart)
    spath = os.path.join(root, "state")
    if not state_ok(spath, n):
        create_state(spath, n)
    # the bound covers the metadata, the state, and a slack for extent blocks of sparse files
    slack = 4096 * (2 * len(ds.paths) + n // 64 + 4)
    base = allocated_bytes(root) - _present_bytes(spath, usize) + slack
    biggest = int(usize.max()) if n else 0
    if base + biggest > cb:
        raise ValueError(
            f"open_dataset({url!r}): cache_bytes={cb} cannot hold the dataset's metadata ({base} bytes with slack) "
            f"plus one chunk ({biggest} bytes)")
    reset_if_alone(root, usize, ufile, ustart, ds.paths, base, cb, uend)
    if prefetch_bytes is None:
        prefetch_bytes = max(min(cb // 4, 1 << 30), biggest)
    cache = ChunkCache(
        source=src, root=root, keys=[os.path.basename(p) for p in ds.paths], local_paths=ds.paths,
        expect=infos, unit_file=ufile, unit_start=ustart, unit_end=uend,
        chunk_offset=ds.chunks["offset"], chunk_bytes=ds.chunks["stored_bytes"], chunk_checksum=ds.chunks["checksum"],
        deps=deps, cache_bytes=cb, base_bytes=base, prefetch_bytes=int(prefetch_bytes))
    cache.offline = offline
    ds.remote = cache
    ds.url = src.url
    return ds


def _present_bytes(spath: str, usize: np.ndarray) -> int:
    """Bytes of the units a state file marks present (0 for a fresh one)."""
    arr = np.fromfile(spath, dtype=np.int64)
    st = arr[8::3]
    return int(usize[st == 1].sum()) if len(st) == len(usize) else 0


def _read_or_error(src: Source, key: str) -> bytes | BaseException:
    """``src.read(key)``, or the error it raised (handed to the caller's thread)."""
    try:
        return src.read(key)
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller when it needs the bytes
        return exc


def _shard_infos(src: Source, names: list[str], sizes: list[int]) -> list[ObjectInfo]:
    """Size and ETag of each shard: one listing where the source can list (S3: a request
    per 1000 objects). Where it cannot (``http(s)://``, or a store that refuses to list),
    no request: the manifest's sizes, the ETags unknown (each shard's first response
    gives it, :meth:`ChunkCache._learn`; every response's size is checked).

    Raises:
        RemoteNotFoundError: a shard is missing from the listing. RemoteError: the listing
            failed other than by refusal.
    """
    try:
        listed = src.infos()
    except RemoteNotFoundError:
        raise
    except RemoteError as exc:
        if exc.transient:
            raise
        listed = None  # e.g. no permission to list
    if listed is None:
        return [ObjectInfo(int(s), None) for s in sizes]
    missing = [n for n in names if n not in listed]
    if missing:
        raise RemoteNotFoundError(f"{src.key_url(missing[0])}: listed in manifest.json but not in the store "
                                  f"({len(missing)} shard(s) missing)", url=src.key_url(missing[0]))
    return [listed[n] for n in names]


def _setup(src: Source, root: str) -> tuple[bool, dict, list[ObjectInfo]]:
    """Fetch (or reuse) the metadata in ``root``; returns ``(offline, identity, shard infos)``."""
    ident_path = os.path.join(root, _IDENTITY)
    cached = None
    if os.path.exists(ident_path):
        try:
            with open(ident_path) as fh:
                cached = json.load(fh)
        except (OSError, ValueError):
            cached = None
    try:
        manifest = src.read(F.MANIFEST_NAME)
    except RemoteNotFoundError:
        raise RemoteNotFoundError(
            f"{src.key_url(F.MANIFEST_NAME)}: no manifest.json: not a dataset, or an incomplete one (the writer "
            "did not finish)", url=src.key_url(F.MANIFEST_NAME)) from None
    except RemoteError as exc:
        if cached is None:
            raise
        warnings.warn(f"{src.url}: the store is unreachable ({exc}); reading the dataset from the cache in {root} "
                      "only (chunks not cached will fail)", RuntimeWarning, stacklevel=3)
        return True, cached, [ObjectInfo(int(s), e) for _, s, e in cached["shards"]]
    digest = hashlib.blake2b(manifest, digest_size=16).hexdigest()
    man = parse_manifest(manifest, src.key_url(F.MANIFEST_NAME))
    names = [s.name for s in man.shards]
    sizes = [s.bytes for s in man.shards]
    # Two round trips whatever the shard count: the listing (sizes and ETags) and, when the
    # cache does not hold this manifest's metadata, index.lio, in parallel.
    want_index = man.index is not None and (cached is None or cached.get("manifest") != digest)
    with cf.ThreadPoolExecutor(2) as ex:
        f_idx = ex.submit(_read_or_error, src, man.index["name"]) if want_index else None
        infos = _shard_infos(src, names, sizes)
        index_data = f_idx.result() if f_idx is not None else None
    for nm, size, info in zip(names, sizes, infos):
        if info.size != size:
            raise DatasetChangedError(
                f"{src.key_url(nm)}: the object is {info.size} bytes, manifest.json says {size} (the dataset is being "
                "rewritten, or is damaged)", path=src.key_url(nm))
    identity = {"url": src.url, "manifest": digest, "shards": [[n, i.size, i.etag] for n, i in zip(names, infos)]}
    if cached != identity:
        # new dataset, or another version of it: start from an empty cache
        for name in os.listdir(root):
            if name not in ("setup.lock", "users"):
                p = os.path.join(root, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        recs = _index_records(src, man, index_data)
        with cf.ThreadPoolExecutor(_META_THREADS) as ex:
            if recs is not None:
                jobs = [ex.submit(_write_meta, os.path.join(root, r.name), r.bytes, r.header,
                                  r.bytes - len(r.tables), r.tables) for r in recs]
            else:
                jobs = [ex.submit(_fetch_meta, src, n, i, os.path.join(root, n)) for n, i in zip(names, infos)]
            for j in jobs:
                j.result()
        tok = man.tokenizer
        if tok is not None:
            with open(os.path.join(root, tok), "wb") as fh:
                fh.write(src.read(tok))
        tmp = os.path.join(root, F.MANIFEST_NAME + ".part")
        with open(tmp, "wb") as fh:
            fh.write(manifest)
        os.replace(tmp, os.path.join(root, F.MANIFEST_NAME))
        with open(ident_path + ".tmp", "w") as fh:
            json.dump(identity, fh)
        os.replace(ident_path + ".tmp", ident_path)  # written last: the metadata is complete
    return False, identity, infos


__all__ = ["open_remote", "cache_root", "default_cache_dir", "default_cache_bytes", "IncompleteDatasetError"]
