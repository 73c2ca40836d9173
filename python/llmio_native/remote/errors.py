"""Errors of the remote tier (each names the URL, and the byte range where there is one)."""
from __future__ import annotations

from ..errors import ChecksumError, FormatError


class RemoteError(OSError):
    """A request to an object store or HTTP server failed for good (after the retries, or at
    once for errors no retry can fix: not found, permission denied, bad credentials).

    Attributes: ``url`` (the object), ``start``/``end`` (the byte range, ``None`` for a
    whole-object request), ``tries`` (requests made), ``transient`` (whether the last
    failure was of the retried kind).
    """

    def __init__(self, message: str, *, url: str, start: int | None = None, end: int | None = None,
                 tries: int = 1, transient: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.start = start
        self.end = end
        self.tries = tries
        self.transient = transient


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """The object (or the dataset's ``manifest.json``) does not exist in the store."""


class DatasetChangedError(FormatError):
    """The remote dataset changed while it was being read (an object's size or ETag is not
    the one seen at open, or a manifest other than the cached one): the cache cannot mix
    versions. Reopen the dataset."""


class RemoteChecksumError(ChecksumError):
    """A chunk's bytes from the store failed their checksum twice (fetched, then refetched)."""


__all__ = ["RemoteError", "RemoteNotFoundError", "DatasetChangedError", "RemoteChecksumError"]
