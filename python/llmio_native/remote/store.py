"""Where a dataset lives: URL parsing and the :class:`Source` abstraction.

A source is a directory-like place holding the dataset's files, addressed by keys relative
to it: ``size(key)``, ``read_range(key, start, end)`` (with a timeout on every request),
``list(prefix)``, ``put(key, path)`` (multipart for large files) and ``delete(keys)``. Two kinds:

* :class:`ObjectSource`: ``s3://``, ``gs://``, ``az://`` (also ``abfs://``, ``adl://``),
  ``http://`` / ``https://`` (range requests), through `obstore`_.
* :class:`LocalSource`: a local directory (``file://`` or a plain path).

Client choice (measured here, 2-core dev VM, shared; ``/tmp/clients*.py`` in the report):
range GETs of 1 MiB from a 64 MiB object on moto's S3 server ran at 24-26 MB/s with obstore,
16-22 MB/s with s3fs and 18-20 MB/s with boto3 (moto's per-request cost dominates all three);
one obstore ``get_ranges`` call over the same ranges ran at 560 MB/s. Against nginx (256 MiB,
1 MiB ranges, 8 threads) obstore did 0.5-0.6 GB/s per-range and 0.7-1.4 GB/s with
``get_ranges``, fsspec-http 1.1 GB/s, urllib3 0.9-1.4 GB/s: all far above a node's share of
an object store. obstore wins on what matters here: one small dependency (no transitive
ones, no aiobotocore/botocore pins) covering S3, GCS, Azure and HTTP with signing, each
store's standard environment variables (``AWS_ENDPOINT_URL``, ``GOOGLE_*``, ``AZURE_*``),
per-request timeouts, metadata (size, ETag) returned with every ranged GET (how a change
of the object is caught) and the GIL released during requests. Its own retries are turned
off: :func:`with_retries` retries (so that tests count tries and errors name the range).

.. _obstore: https://developmentseed.org/obstore/

Retries: 5xx, throttling (503 SlowDown, 429), timeouts, connection resets and truncated
bodies are retried ``retries`` times with exponential backoff and full jitter; then a
:class:`RemoteError` names the URL and the byte range. Not-found and permission errors
are not retried.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from .errors import DatasetChangedError, RemoteError, RemoteNotFoundError

#: URL schemes served by :class:`ObjectSource`.
OBJECT_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "adl", "azure", "http", "https")

#: URL schemes that are read-only and cannot be listed (range requests only).
READ_ONLY_SCHEMES = ("http", "https")

#: Files above this size are uploaded in parts (multipart upload).
MULTIPART_BYTES = 16 << 20
#: Bytes read from the local file per piece of a cancellable multipart upload.
PUT_PIECE_BYTES = 8 << 20

T = TypeVar("T")


def is_url(path: Any) -> bool:
    """Whether ``path`` is an object-store or HTTP URL (not a local path or ``file://``)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in OBJECT_SCHEMES


@dataclass(frozen=True)
class StoreURL:
    """A parsed dataset URL: ``scheme``, ``netloc`` (bucket, container or host) and ``path``
    (the prefix inside it, no leading or trailing slash)."""

    scheme: str
    netloc: str
    path: str

    @property
    def url(self) -> str:
        """The normalised URL (no trailing slash)."""
        return f"{self.scheme}://{self.netloc}" + (f"/{self.path}" if self.path else "")

    def join(self, key: str) -> str:
        """The URL of ``key`` under this one."""
        return f"{self.url}/{key}"


def parse_url(url: str) -> StoreURL:
    """Split a dataset URL into scheme, bucket/host and prefix.

    Raises:
        ValueError: not a supported URL (names the supported schemes), or no bucket/host.
    """
    if not is_url(url):
        raise ValueError(f"{url!r}: not a supported URL (schemes: {', '.join(OBJECT_SCHEMES)})")
    u = urlsplit(url)
    if not u.netloc:
        raise ValueError(f"{url!r}: no bucket, container or host after {u.scheme}://")
    if u.query or u.fragment:
        raise ValueError(f"{url!r}: query strings and fragments are not supported in dataset URLs")
    return StoreURL(u.scheme.lower(), u.netloc, u.path.strip("/"))


@dataclass
class RetryPolicy:
    """How requests are retried: ``retries`` further tries after the first, sleeping
    ``uniform(0, min(cap, base * 2**k))`` before try ``k+1`` (full jitter); ``timeout``
    seconds per request (connect included), ``connect_timeout`` for the connection."""

    retries: int = 5
    base: float = 0.05
    cap: float = 2.0
    timeout: float = 30.0
    connect_timeout: float = 5.0

    def delay(self, k: int) -> float:
        """The sleep before retry ``k`` (0-based)."""
        return random.uniform(0.0, min(self.cap, self.base * (2 ** k)))


class TruncatedBody(IOError):
    """A response body shorter than the range asked for (retried)."""


class UploadCancelled(Exception):
    """An upload stopped by its ``cancel`` event (:meth:`Source.put`); never retried."""


def _permanent(exc: BaseException) -> bool:
    """Errors no retry can fix: missing object, permissions, bad configuration."""
    if isinstance(exc, (FileNotFoundError, PermissionError, DatasetChangedError, ValueError, TypeError)):
        return True
    name = type(exc).__name__
    if name == "GenericError" and any(m in str(exc) for m in _BAD_CREDENTIALS):
        return True
    return name in ("NotFoundError", "PermissionDeniedError", "UnauthenticatedError", "InvalidPathError",
                    "NotSupportedError", "UnknownConfigurationKeyError")


#: obstore's messages for credentials that cannot be read at all (a service-account key that
#: is not JSON, a private key that is not PEM): raised before any request, so never retried.
_BAD_CREDENTIALS = ("Unable to decode service account", "Error reading pem file")


def with_retries(fn: Callable[[], T], policy: RetryPolicy, url: str, start: int | None = None,
                 end: int | None = None, on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Run ``fn`` with the retry policy; ``url``/``start``/``end`` name the request in errors.

    Raises:
        RemoteNotFoundError: the object does not exist (not retried).
        RemoteError: a permanent error, or the last transient one after ``retries`` retries;
            the message names the URL, the byte range and the number of tries.
        DatasetChangedError: raised by ``fn`` (passed through).
    """
    rng = f" bytes [{start}, {end})" if start is not None else ""
    k = 0
    while True:
        try:
            return fn()
        except (DatasetChangedError, UploadCancelled):
            raise
        except BaseException as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if _permanent(exc):
                cls = RemoteNotFoundError if isinstance(exc, FileNotFoundError) or \
                    type(exc).__name__ == "NotFoundError" else RemoteError
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise cls(f"{url}{rng}: {msg}", url=url, start=start, end=end, tries=k + 1) from exc
            if k >= policy.retries:
                msg = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise RemoteError(f"{url}{rng}: failed after {k + 1} tries ({type(exc).__name__}: {msg})",
                                  url=url, start=start, end=end, tries=k + 1, transient=True) from exc
            if on_retry is not None:
                on_retry(exc)
            time.sleep(policy.delay(k))
            k += 1


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says of an object: ``size`` and ``etag`` (``None`` where it gives none;
    normalised by :func:`normalize_etag`)."""

    size: int
    etag: str | None


class Source:
    """A place holding a dataset's files, addressed by keys relative to it (see module doc)."""

    url: str
    policy: RetryPolicy

    def key_url(self, key: str) -> str:
        """The URL (or path) of ``key``, for messages."""
        return f"{self.url}/{key}"

    def info(self, key: str) -> ObjectInfo:
        """Size and ETag of ``key``.

        Raises:
            RemoteNotFoundError: no such object. RemoteError: the request failed.
        """
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        """The whole object ``key``.

        Raises:
            RemoteNotFoundError: no such object. RemoteError: the request failed.
        """
        raise NotImplementedError

    def read_range(self, key: str, start: int, end: int, expect: ObjectInfo | None = None,
                   on_retry: Callable[[BaseException], None] | None = None,
                   seen: Callable[[ObjectInfo], None] | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key``; exactly ``end - start`` bytes or an error.

        ``expect``: the object's size and ETag seen at open (its ETag may be None: not known
        yet); a response for another version raises :class:`DatasetChangedError`.
        ``on_retry`` is called with each retried error, ``seen`` with the size and ETag of
        the response that was accepted (how an ETag not known at open is learned).

        Raises:
            RemoteError: after the retries (names URL and range). DatasetChangedError: see above.
        """
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """``(key, size)`` of the objects under ``prefix``.

        Raises:
            RemoteError: the request failed.
        """
        raise NotImplementedError

    def infos(self) -> dict[str, ObjectInfo] | None:
        """Size and ETag of every object directly under the source (not in sub-prefixes),
        in as few requests as the store allows (S3: one per 1000 objects); ``None`` where
        the source cannot list (``http(s)://``: ask :meth:`info` per object instead).

        Raises:
            RemoteError: the listing failed (after the retries; a store that refuses to
                list, for lack of permission, too).
        """
        raise NotImplementedError

    def put(self, key: str, path: str, cancel: threading.Event | None = None) -> ObjectInfo:
        """Upload the local file ``path`` as ``key`` (multipart above 16 MiB for object stores).

        ``cancel``: an event that stops the upload between pieces of 8 MiB (an unfinished
        multipart upload is aborted, so no object appears). Object stores retry each
        part of a multipart upload (obstore's retries, ``retries`` times), and the whole
        upload after a part failed for good.

        Returns:
            The size and, where the store gives one, the ETag of the new object.

        Raises:
            RemoteError: the upload failed (after the retries; names the URL).
            UploadCancelled: ``cancel`` was set. FileNotFoundError: no such local file.
        """
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Delete the objects ``keys`` (in the order given, one request each: a caller that
        needs one deleted before the others calls this twice). Missing keys are not an error.

        Raises:
            RemoteError: a request failed (after the retries; names the URL).
        """
        raise NotImplementedError


def normalize_etag(tag: Any) -> str | None:
    """An ETag as compared here: without the quotes and the weak ``W/`` prefix, ``None`` for
    none. A store may quote it in one answer and not in another: Azure's listing (and
    fake-gcs-server's) gives ``0x8D...`` where the same object's GET and HEAD headers give
    ``"0x8D..."``; compared raw, every read after an open from a listing would look like a
    changed object."""
    if tag is None:
        return None
    t = str(tag).strip()
    if t.startswith("W/"):
        t = t[2:]
    return t.strip('"') or None


def _check_changed(url: str, expect: ObjectInfo | None, size: int, etag: str | None) -> None:
    etag = normalize_etag(etag)
    if expect is None:
        return
    if size != expect.size or (expect.etag is not None and etag is not None and etag != expect.etag):
        raise DatasetChangedError(
            f"{url}: the object changed while the dataset was open (size {expect.size} -> {size}, "
            f"ETag {expect.etag} -> {etag}); reopen the dataset", path=url)


def _gcs_base_url(scheme: str, opts: dict) -> str:
    """Where a ``gs://`` store is asked (``""``: Google's): ``base_url`` or ``$GOOGLE_BASE_URL``,
    else the ``gcs_base_url`` of a service-account key given as a string (how object_store
    is pointed at an emulator). A plain ``http://`` one turns ``allow_http`` on, as an
    ``http://`` S3 endpoint does; without it every request fails with an opaque "builder error"."""
    if scheme != "gs":
        return ""
    base = opts.get("base_url") or os.environ.get("GOOGLE_BASE_URL")
    key = opts.get("service_account_key") or os.environ.get("GOOGLE_SERVICE_ACCOUNT_KEY")
    if not base and key:
        try:
            base = json.loads(key).get("gcs_base_url")
        except (ValueError, AttributeError):
            base = None  # not JSON: obstore says so when it builds the store
    return str(base or "")


class ObjectSource(Source):
    """An object store or HTTP prefix through obstore.

    Args:
        url: ``s3://bucket/prefix`` and the like (see :data:`OBJECT_SCHEMES`).
        storage_options: obstore store configuration (``endpoint``, ``region``,
            ``access_key_id``, ...; default: the store's environment variables), plus
            ``timeout`` / ``connect_timeout`` (seconds), ``retries``, ``retry_base``,
            ``retry_cap`` (our retry policy) and ``allow_http`` (default: on for ``http://``
            URLs and for a plain ``http://`` endpoint: an S3 ``endpoint``, a GCS ``base_url``
            or service-account ``gcs_base_url``).

    Raises:
        ImportError: obstore is not installed (``pip install 'llmio-native[remote]'``).
        ValueError: a bad URL or option.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        try:
            import obstore  # noqa: F401  (installed? the store itself is made lazily, per process)
        except ImportError as exc:
            raise ImportError(f"reading {url} needs obstore: pip install 'llmio-native[remote]' "
                              f"(or pip install obstore) ({exc})") from None
        self.parsed = parse_url(url)
        self.url = self.parsed.url
        opts = dict(storage_options or {})
        self.policy = RetryPolicy(
            retries=int(opts.pop("retries", 5)), base=float(opts.pop("retry_base", 0.05)),
            cap=float(opts.pop("retry_cap", 2.0)), timeout=float(opts.pop("timeout", 30.0)),
            connect_timeout=float(opts.pop("connect_timeout", 5.0)))
        endpoint = str(opts.get("endpoint") or opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL", ""))
        plain = endpoint.startswith("http://") or _gcs_base_url(self.parsed.scheme, opts).startswith("http://")
        allow_http = bool(opts.pop("allow_http", self.parsed.scheme == "http" or plain))
        client = {"timeout": f"{self.policy.timeout}s", "connect_timeout": f"{self.policy.connect_timeout}s",
                  "allow_http": allow_http}
        if "endpoint_url" in opts:
            opts["endpoint"] = opts.pop("endpoint_url")
        self._args = (self.url, opts, client)
        self._store: Any = None
        self._part_store: Any = None  # multipart uploads: retries per part (see put)
        self._pid = -1

    def __getstate__(self) -> dict:
        st = self.__dict__.copy()
        st["_store"], st["_part_store"], st["_pid"] = None, None, -1
        return st

    @property
    def store(self) -> Any:
        """The obstore store (created in each process on first use)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._part_store = self._make_store(0), None
            self._pid = os.getpid()
        return self._store

    def _make_store(self, retries: int) -> Any:
        from datetime import timedelta

        from obstore.store import from_url

        url, opts, client = self._args
        retry: dict = {"max_retries": retries}
        if retries:
            retry["backoff"] = {"init_backoff": timedelta(seconds=self.policy.base),
                                "max_backoff": timedelta(seconds=self.policy.cap), "base": 2}
        kw: dict = {"client_options": client, "retry_config": retry}
        if opts:
            kw["config"] = opts
        return from_url(url, **kw)

    @property
    def part_store(self) -> Any:
        """The store for multipart uploads: obstore retries each part request (5xx, resets)
        ``retries`` times itself, so that one bad part does not restart the whole upload."""
        self.store  # noqa: B018 - (re)made in this process first, which resets this one
        if self._part_store is None:
            self._part_store = self._make_store(self.policy.retries)
        return self._part_store

    def info(self, key: str) -> ObjectInfo:
        import obstore

        m = with_retries(lambda: obstore.head(self.store, key), self.policy, self.key_url(key))
        return ObjectInfo(int(m["size"]), normalize_etag(m.get("e_tag")))

    def read(self, key: str) -> bytes:
        import obstore

        def get() -> bytes:
            r = obstore.get(self.store, key)
            data = bytes(r.bytes())
            if len(data) != int(r.meta["size"]):
                raise TruncatedBody(f"body of {len(data)} bytes, object is {r.meta['size']}")
            return data

        return with_retries(get, self.policy, self.key_url(key))

    def read_range(self, key: str, start: int, end: int, expect: ObjectInfo | None = None,
                   on_retry: Callable[[BaseException], None] | None = None,
                   seen: Callable[[ObjectInfo], None] | None = None) -> bytes:
        import obstore

        url = self.key_url(key)

        def get() -> bytes:
            r = obstore.get(self.store, key, options={"range": (int(start), int(end))})
            size, etag = int(r.meta["size"]), normalize_etag(r.meta.get("e_tag"))
            _check_changed(url, expect, size, etag)
            data = bytes(r.bytes())
            if len(data) != end - start:
                raise TruncatedBody(f"body of {len(data)} bytes for a range of {end - start}")
            if seen is not None:
                seen(ObjectInfo(size, etag))
            return data

        return with_retries(get, self.policy, url, start, end, on_retry)

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        import obstore

        def ls() -> list[tuple[str, int]]:
            return [(m["path"], int(m["size"])) for batch in obstore.list(self.store, prefix=prefix or None)
                    for m in batch]

        return with_retries(ls, self.policy, self.key_url(prefix))

    def infos(self) -> dict[str, ObjectInfo] | None:
        import obstore

        if self.parsed.scheme in READ_ONLY_SCHEMES:
            return None

        def ls() -> dict[str, ObjectInfo]:
            res = obstore.list_with_delimiter(self.store)
            return {m["path"]: ObjectInfo(int(m["size"]), normalize_etag(m.get("e_tag"))) for m in res["objects"]}

        return with_retries(ls, self.policy, self.url + "/")

    def put(self, key: str, path: str, cancel: threading.Event | None = None) -> ObjectInfo:
        import obstore

        size = os.path.getsize(path)
        multipart = size > MULTIPART_BYTES

        def pieces() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise UploadCancelled(f"upload of {self.key_url(key)} cancelled")
                    piece = fh.read(PUT_PIECE_BYTES)
                    if not piece:
                        return
                    yield piece

        def put() -> Any:
            if cancel is not None and cancel.is_set():
                raise UploadCancelled(f"upload of {self.key_url(key)} cancelled")
            if not size:
                body: Any = b""
            elif multipart and cancel is not None:
                body = pieces()
            else:
                body = pathlib.Path(path)
            return obstore.put(self.part_store if multipart else self.store, key, body, use_multipart=multipart)

        res = with_retries(put, self.policy, self.key_url(key))
        return ObjectInfo(size, normalize_etag((res or {}).get("e_tag")))

    def delete(self, keys: list[str]) -> None:
        import obstore

        for key in keys:
            with_retries(lambda: obstore.delete(self.store, key), self.policy, self.key_url(key))


class LocalSource(Source):
    """A local directory seen as a source (tests, and a uniform code path for writers)."""

    def __init__(self, directory: str) -> None:
        d = directory[len("file://"):] if directory.startswith("file://") else directory
        self.root = os.path.abspath(d)
        self.url = self.root
        self.policy = RetryPolicy(retries=0)

    def key_url(self, key: str) -> str:
        return os.path.join(self.root, key)

    def info(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self.key_url(key))
        except FileNotFoundError:
            raise RemoteNotFoundError(f"{self.key_url(key)}: no such file", url=self.key_url(key)) from None
        return ObjectInfo(st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def read(self, key: str) -> bytes:
        try:
            with open(self.key_url(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise RemoteNotFoundError(f"{self.key_url(key)}: no such file", url=self.key_url(key)) from None

    def read_range(self, key: str, start: int, end: int, expect: ObjectInfo | None = None,
                   on_retry: Callable[[BaseException], None] | None = None,
                   seen: Callable[[ObjectInfo], None] | None = None) -> bytes:
        p = self.key_url(key)
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            _check_changed(p, expect, size, None)
            data = os.pread(fh.fileno(), end - start, start)
        if len(data) != end - start:
            raise RemoteError(f"{p} bytes [{start}, {end}): file ends at {size}", url=p, start=start, end=end)
        return data

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        out = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), self.root)
                if rel.startswith(prefix):
                    out.append((rel, os.path.getsize(os.path.join(dirpath, f))))
        return sorted(out)

    def infos(self) -> dict[str, ObjectInfo] | None:
        out = {}
        with os.scandir(self.root) as it:
            for e in it:
                if e.is_file():
                    st = e.stat()
                    out[e.name] = ObjectInfo(st.st_size, f"{st.st_mtime_ns}-{st.st_size}")
        return out

    def put(self, key: str, path: str, cancel: threading.Event | None = None) -> ObjectInfo:
        import shutil

        if cancel is not None and cancel.is_set():
            raise UploadCancelled(f"copy to {self.key_url(key)} cancelled")
        dst = self.key_url(key)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(path, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        return self.info(key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                os.unlink(self.key_url(key))
            except FileNotFoundError:
                pass


def open_source(url: str, storage_options: dict | None = None) -> Source:
    """The :class:`Source` for ``url`` (an object-store/HTTP URL, ``file://`` or a local path).

    Raises:
        ImportError: an object-store URL without obstore installed.
        ValueError: a malformed URL or option.
    """
    if is_url(url):
        return ObjectSource(url, storage_options)
    return LocalSource(url)


__all__ = ["OBJECT_SCHEMES", "StoreURL", "parse_url", "is_url", "RetryPolicy", "with_retries", "ObjectInfo",
           "Source", "ObjectSource", "LocalSource", "open_source", "TruncatedBody", "UploadCancelled",
           "MULTIPART_BYTES", "READ_ONLY_SCHEMES", "normalize_etag"]
