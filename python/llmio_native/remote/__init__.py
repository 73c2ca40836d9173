"""Object-store sources and the local cache tier (DESIGN.md ``remote/``).

``open_dataset("s3://bucket/prefix", cache_dir=..., cache_bytes=...)`` and the same URLs in
``TokenLoader(sources=...)`` read a dataset of our format from ``s3://``, ``gs://``,
``az://`` or ``http(s)://`` through a bounded local cache (:mod:`.cache`); the sources
themselves are :mod:`.store`'s. Writing: ``DatasetWriter("s3://bucket/prefix")`` uploads each
shard as it is finished and ``manifest.json`` last (:mod:`.upload`).
"""
from __future__ import annotations

from .errors import DatasetChangedError, RemoteChecksumError, RemoteError, RemoteNotFoundError
from .store import ObjectSource, LocalSource, RetryPolicy, Source, is_url, open_source, parse_url

__all__ = ["DatasetChangedError", "RemoteChecksumError", "RemoteError", "RemoteNotFoundError", "ObjectSource",
           "LocalSource", "RetryPolicy", "Source", "is_url", "open_source", "parse_url"]
