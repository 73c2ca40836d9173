"""Writing a dataset to an object store: ``DatasetWriter("s3://bucket/prefix")`` and
``llmio pack -o s3://...``.

The writer writes each shard into a local staging directory as usual; when a shard is
finished, :class:`ShardUploader` uploads it on a background thread (multipart above
16 MiB, with the source's retries) while the writer packs the next one, then deletes the
local copy. The staging directory holds at most ``max_staged`` shards (default 2: the one
uploading and the one being written); a writer that gets ahead of the upload waits in
:meth:`ShardUploader.submit`.

Commit (:meth:`ShardUploader.commit`): wait for the shards, upload ``tokenizer.json`` and
``index.lio`` (every shard's header and tables, :mod:`llmio_native.dataset.index`), check
that the store holds every shard at its size (and the ETag its upload returned, where the
store gives ETags) and nothing else of a dataset under the prefix, then upload
``manifest.json`` last. A reader (``open_dataset(url)``) looks for the manifest first, so
it never sees a half-written dataset.

Before writing: the prefix is checked like a local directory. A dataset there (a manifest)
or an incomplete one (shard objects, no manifest) raises ``FileExistsError`` unless
``overwrite``; ``overwrite`` deletes the old ``manifest.json`` first (so no reader ever
sees new shards under the old manifest), then the old shards and temporary files.

Abort (:meth:`ShardUploader.abort`): the upload in flight is cancelled between 8 MiB
pieces (its multipart upload is aborted, no object appears), the thread is joined, the
staging directory removed; no manifest is uploaded. Shards uploaded before stay (the
prefix reads as an incomplete dataset; ``overwrite=True`` or :func:`remove_partial`
cleans it).

Not detected: two writers on one prefix at once (object stores have no locks); the check
before the manifest catches a foreign shard only if it is there by then.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import deque

from ..dataset import format as F
from ..dataset.index import INDEX_NAME
from ..dataset.manifest import TOKENIZER_NAME, is_dataset_name
from .errors import RemoteError
from .store import READ_ONLY_SCHEMES, ObjectInfo, Source, UploadCancelled, open_source, parse_url

#: Shards kept in the staging directory at most: the one uploading and the one being written.
MAX_STAGED = 2
_WAIT_S = 0.2  # waits are sliced so that Ctrl-C reaches the main thread


def writable_source(url: str, storage_options: dict | None = None) -> Source:
    """The :class:`Source` to write a dataset to at ``url`` (``s3://``, ``gs://``, ``az://``).

    Raises:
        ValueError: an ``http(s)://`` URL (read-only) or a malformed URL or option.
        ImportError: obstore is not installed.
    """
    scheme = parse_url(url).scheme
    if scheme in READ_ONLY_SCHEMES:
        raise ValueError(f"{url}: cannot write a dataset to an {scheme}:// URL (HTTP sources are read-only); "
                         "write to s3://, gs:// or az://, or to a local directory")
    return open_source(url, storage_options)


def remote_state(src: Source) -> tuple[bool, list[str]]:
    """``(has manifest.json, keys of an unfinished dataset)`` directly under ``src``: the
    same rule as :func:`llmio_native.dataset.manifest.dataset_files` (shards, their spill
    files, the manifest and its temp name; not ``tokenizer.json`` or other objects).

    Raises:
        RemoteError: listing failed (names the URL).
    """
    keys = sorted(k for k, _ in src.list() if "/" not in k and is_dataset_name(k))
    return F.MANIFEST_NAME in keys, [k for k in keys if k != F.MANIFEST_NAME]


def check_remote_output(src: Source, overwrite: bool) -> None:
    """Refuse a prefix holding a dataset, finished or not, unless ``overwrite``; with
    ``overwrite``, delete it: ``manifest.json`` first (its own request, finished before any
    other), then the shards and temp files.

    Raises:
        FileExistsError: a dataset or an incomplete one is there (names the URL).
        RemoteError: listing or deleting failed.
    """
    has_manifest, partial = remote_state(src)
    if not has_manifest and not partial:
        return
    if not overwrite:
        if has_manifest:
            raise FileExistsError(17, "a dataset already exists here (manifest.json); pass overwrite=True to "
                                  "replace it", src.key_url(F.MANIFEST_NAME))
        raise FileExistsError(17, f"an incomplete dataset is here ({len(partial)} shard object(s), no manifest.json: "
                              "an interrupted writer); pass overwrite=True to clean it and start over", src.url)
    if has_manifest:
        src.delete([F.MANIFEST_NAME])
    src.delete(partial)


def remove_partial(src: Source, own_tokenizer: bool) -> None:
    """Delete what an aborted write left under ``src``: its shards and temp objects when
    there is no manifest, and ``tokenizer.json`` when ``own_tokenizer``. Never raises
    (what cannot be deleted stays)."""
    try:
        has_manifest, partial = remote_state(src)
        if has_manifest:
            return
        src.delete(partial + ([TOKENIZER_NAME] if own_tokenizer else []))
    except Exception:  # noqa: BLE001 - best effort: the store may be the reason we are here
        pass


class ShardUploader:
    """Uploads the shards of a :class:`~llmio_native.DatasetWriter` as they are finished
    (see the module doc).

    Args:
        url: the dataset's URL (``s3://bucket/prefix``, ``gs://``, ``az://``).
        storage_options: the store's options (:class:`~.store.ObjectSource`).
        staging_dir: where the staging directory is made (default ``$LLMIO_CACHE_DIR``
            when set, else the system temp directory); a fresh directory is made inside.
        max_staged: shards in the staging directory at most (>= 1), counting the one
            being written.

    Raises:
        ValueError: an ``http(s)://`` URL, a malformed URL or option, ``max_staged < 1``.
        ImportError: obstore is not installed.
        OSError: the staging directory cannot be made.
    """

    def __init__(self, url: str, storage_options: dict | None = None, staging_dir: str | None = None,
                 max_staged: int = MAX_STAGED) -> None:
        if int(max_staged) < 1:
            raise ValueError(f"max_staged must be >= 1, got {max_staged}")
        self.src = writable_source(url, storage_options)
        self.url = self.src.url
        self.max_staged = int(max_staged)
        parent = staging_dir if staging_dir is not None else (os.environ.get("LLMIO_CACHE_DIR") or None)
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        self.staging = tempfile.mkdtemp(prefix="llmio-upload-", dir=parent)
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, str]] = deque()  # submitted, not yet uploaded (the head is uploading)
        self._uploaded: dict[str, ObjectInfo] = {}
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False

    # -- before writing ------------------------------------------------------------------
    def prepare(self, overwrite: bool) -> None:
        """Check the prefix (and clean it with ``overwrite``): :func:`check_remote_output`.

        Raises:
            FileExistsError, RemoteError: as :func:`check_remote_output`.
        """
        check_remote_output(self.src, overwrite)

    # -- shards --------------------------------------------------------------------------
    def submit(self, name: str, path: str) -> None:
        """Queue the finished local file ``path`` for upload as ``name`` (deleted locally once
        uploaded); returns when fewer than ``max_staged`` shards are staged, so that the
        writer may start the next one.

        Raises:
            RemoteError: an earlier upload failed (names its URL); also raised when
                waiting for this one.
            ValueError: the uploader was committed or aborted.
        """
        with self._cond:
            self._raise_if_failed()
            if self._done:
                raise ValueError(f"uploader for {self.url} is closed")
            self._queue.append((name, path))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmio-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            # the next shard will be written here too: wait until it fits
            while len(self._queue) > self.max_staged - 1 and self._error is None:
                self._cond.wait(_WAIT_S)
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._cancel.is_set():
                    self._cond.wait()
                if self._cancel.is_set():
                    return
                name, path = self._queue[0]
            try:
                info = self._put(name, path)
                os.unlink(path)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
                with self._cond:
                    if not isinstance(exc, UploadCancelled):
                        self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._uploaded[name] = info
                self._queue.popleft()
                self._cond.notify_all()

    def _put(self, name: str, path: str) -> ObjectInfo:
        """Upload one file and check what the store says of it (size, ETag)."""
        url = self.src.key_url(name)
        try:
            put = self.src.put(name, path, self._cancel)
            got = self.src.info(name)
        except RemoteError as exc:
            raise type(exc)(f"upload of {name}: {exc}", url=exc.url,
                            start=exc.start, end=exc.end, tries=exc.tries, transient=exc.transient) from exc
        if got.size != put.size or (put.etag and got.etag and put.etag != got.etag):
            raise RemoteError(f"{url}: after upload the store holds {got.size} bytes (ETag {got.etag}), the upload "
                              f"sent {put.size} (ETag {put.etag}): another writer on this prefix?", url=url)
        return got

    # -- commit --------------------------------------------------------------------------
    def commit(self, tokenizer: str | None) -> None:
        """Wait for the shards, upload ``tokenizer`` (a file name in the staging directory,
        or None) and the index, check the store, then upload ``manifest.json`` from the staging directory
        last and remove the staging directory.

        Raises:
            RemoteError: an upload failed, or the store does not hold what was uploaded
                (names the URL and the object).
            ValueError: already committed or aborted.
        """
        with self._cond:
            if self._done:
                raise ValueError(f"uploader for {self.url} is closed")
            while self._queue and self._error is None:
                self._cond.wait(_WAIT_S)
            self._raise_if_failed()
        if tokenizer is not None:
            self._put(tokenizer, os.path.join(self.staging, tokenizer))
        index = os.path.join(self.staging, INDEX_NAME)
        if os.path.exists(index):  # every shard's metadata in one object: a reader opens in two requests
            self._uploaded[INDEX_NAME] = self._put(INDEX_NAME, index)
        listed = dict(self.src.list())
        for name, info in self._uploaded.items():
            if listed.get(name) != info.size:
                raise RemoteError(f"{self.src.key_url(name)}: uploaded ({info.size} bytes) but the store lists "
                                  f"{'no such object' if name not in listed else f'{listed[name]} bytes'}",
                                  url=self.src.key_url(name))
        foreign = sorted(k for k in listed if "/" not in k and is_dataset_name(k) and k not in self._uploaded)
        if foreign:
            raise RemoteError(f"{self.url}: objects this writer did not upload appeared under the prefix "
                              f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): another writer "
                              "on this prefix? No manifest was uploaded", url=self.url)
        self._put(F.MANIFEST_NAME, os.path.join(self.staging, F.MANIFEST_NAME))
        self._finish()

    def abort(self) -> None:
        """Cancel the upload in flight, drop the queued shards and remove the staging
        directory; no manifest is uploaded. Idempotent; never raises."""
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        shutil.rmtree(self.staging, ignore_errors=True)

    @property
    def uploaded(self) -> list[str]:
        """Keys uploaded so far, in order."""
        return list(self._uploaded)


__all__ = ["ShardUploader", "writable_source", "remote_state", "check_remote_output", "remove_partial",
           "MAX_STAGED", "READ_ONLY_SCHEMES"]
