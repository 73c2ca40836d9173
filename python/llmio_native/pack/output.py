"""The output directory of a pack: lock it, refuse to clobber a dataset, clean up after a
failure, and write the encoded documents.

An object-store output (``s3://``, ``gs://``, ``az://``) goes through the same functions:
its state is the prefix's listing (:mod:`llmio_native.remote.upload`), it cannot be locked,
and a failed pack deletes the objects it uploaded."""
from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable, Iterable

import numpy as np

from ..dataset.manifest import TOKENIZER_NAME  # re-exported: the name the pack writes
from .errors import PackError
from .split import Piece



def write_documents(writer: Any, encoded: Iterable[tuple[list[Piece], list[np.ndarray]]],
                    eot: np.ndarray, progress: Callable[[int], Any] = lambda n: None) -> None:
    """Join the pieces' ids into documents, append ``eot`` (an array of 0 or 1 ids) to each
    and add them to ``writer`` in order; ``progress(nbytes)`` after every piece.

    Raises:
        As ``encoded`` and ``writer.add_document`` do.
    """
    parts: list[np.ndarray] = []
    for batch, ids in encoded:
        k = 0
        for piece in batch:
            if piece.text is not None:
                parts.append(ids[k])
                k += 1
                if piece.ends:
                    if eot.size:
                        parts.append(eot)
                    writer.add_document(parts[0] if len(parts) == 1 else np.concatenate(parts))
                    parts = []
            progress(piece.nbytes)


def is_remote(out: str) -> bool:
    """Whether the pack output ``out`` is an object-store URL (not a local directory)."""
    from ..remote.store import is_url

    return is_url(out)


def dataset_state(out: str, storage_options: dict | None = None) -> tuple[bool, list[str]]:
    """(has manifest.json, writer files of an unfinished dataset) in directory ``out``, or
    under URL ``out`` (``storage_options`` are its store's).

    Raises:
        OSError: ``out`` cannot be listed (a RemoteError for a URL, naming it).
        ValueError: an ``http(s)://`` URL (read-only).
    """
    from ..dataset import format as F
    from ..dataset.manifest import dataset_files

    if is_remote(out):
        from ..remote.upload import remote_state, writable_source

        return remote_state(writable_source(out, storage_options))
    if not os.path.isdir(out):
        return False, []
    files = dataset_files(out)  # the one rule of which files belong to a dataset
    return F.MANIFEST_NAME in files, [n for n in files if n != F.MANIFEST_NAME]


def check_output(out: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse an output that is a file, or holds a dataset (finished or not) unless ``overwrite``.

    Raises:
        PackError: as above (names ``out``); an ``http(s)://`` output (read-only).
        RemoteError: a URL's prefix cannot be listed.
    """
    if not is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
        raise PackError(f"{out}: exists and is not a directory")
    try:
        has_manifest, partial = dataset_state(out, storage_options)
    except ValueError as exc:
        raise PackError(str(exc)) from None
    if overwrite:
        return
    if has_manifest:
        raise PackError(f"{out} already holds a dataset (manifest.json); pass --overwrite to replace it")
    if partial:
        what = "object" if is_remote(out) else "file"
        raise PackError(f"{out} holds an incomplete dataset ({len(partial)} shard/temp {what}(s), no manifest.json: "
                        "an earlier pack did not finish); resuming is not supported: pass --overwrite to start over")


def remove_partial(out: str, created: bool, own_tokenizer: bool, storage_options: dict | None = None) -> None:
    """Remove what an aborted pack left in ``out`` (its own files only): shards and temp
    files when there is no manifest, ``tokenizer.json`` when ``own_tokenizer`` (the pack
    put it there), the directory itself when ``created`` and empty. For a URL: the same
    objects under the prefix (best effort: the store may be why the pack failed).

    Raises:
        Nothing (what cannot be removed stays).
    """
    if is_remote(out):
        from ..remote import upload

        try:
            src = upload.writable_source(out, storage_options)
        except (ValueError, ImportError):
            return
        upload.remove_partial(src, own_tokenizer)
        return
    try:
        has_manifest, partial = dataset_state(out)
        if has_manifest:
            return
        for n in partial:
            os.unlink(os.path.join(out, n))
        tok = os.path.join(out, TOKENIZER_NAME)
        if own_tokenizer and os.path.exists(tok):
            os.unlink(tok)
    except OSError:
        pass
    remove_if_empty(out, created)


def remove_if_empty(out: str, created: bool) -> None:
    """Remove directory ``out`` when ``created`` (by this pack) and empty.

    Raises:
        Nothing.
    """
    if created:
        try:
            if not os.listdir(out):
                os.rmdir(out)
        except OSError:
            pass


def lock_output(out: str) -> tuple[int | None, bool]:
    """Create directory ``out`` if needed and take an exclusive ``flock`` on it, so that
    two packs cannot write into one directory at once.

    Returns:
        ``(fd, created)``: the descriptor holding the lock (close it to release; None where
        the file system has no locks, after a note on stderr) and whether this call created
        the directory.

    Raises:
        PackError: ``out`` is a file, or another pack holds the lock.
        OSError: ``out`` cannot be created or opened (names the path).
    """
    import fcntl

    for _ in range(10):
        if os.path.exists(out) and not os.path.isdir(out):
            raise PackError(f"{out}: exists and is not a directory (--output must be a directory)")
        created = False
        try:
            os.makedirs(out)
            created = True
        except FileExistsError:
            pass
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PackError(f"{out}: another llmio pack is writing to this directory (it is locked); wait for it "
                            "to finish or choose another --output") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise
            os.close(fd)
            print(f"llmio: note: {out}: cannot lock this directory ({exc.strerror}); make sure no other pack "
                  "writes to it", file=sys.stderr)
            return None, created
        try:
            st, fst = os.stat(out), os.fstat(fd)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            return fd, created
        os.close(fd)  # removed (a failed pack cleaning up) between makedirs and flock: again
    raise PackError(f"{out}: the directory keeps disappearing while llmio pack tries to lock it")


def write_error(exc: BaseException, out: str) -> PackError | None:
    """A PackError naming ``out`` for a writing error that names no file (ENOSPC, EIO, ...
    raised by the writer, or its RuntimeError wrapping one); None for other errors.

    Raises:
        Nothing.
    """
    err = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, RuntimeError) else None
    if not isinstance(err, OSError) or err.filename or not err.errno:
        return None
    return PackError(f"{out}: writing the dataset failed: {err.strerror or os.strerror(err.errno)} "
                     f"[errno {err.errno}]")
