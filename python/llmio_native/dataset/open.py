"""``open_dataset``: tell a path's format and open it with its reader.

Formats: ``llmio`` (``llmio.py``: our directories), ``nanogpt``, ``llmc`` and ``megatron``
(``compat.py``). Every reader returns a :class:`TokenDataset`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import FormatError
from . import compat
from . import format as F
from .base import TokenDataset
from .compat import LLMC_MAGICS, MEGATRON_MAGIC, _head, _megatron_prefix
from .llmio import LioDataset

#: Format names ``open_dataset(format=...)`` accepts.
FORMATS = ("llmio", "nanogpt", "llmc", "megatron")


def _as_dtype(dtype: Any) -> np.dtype | None:
    """``dtype`` as a numpy dtype (None stays None).

    Raises:
        ValueError: not a dtype.
    """
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be a numpy dtype or its name, got {dtype!r}") from exc


def open_dataset(
    path: str | os.PathLike[str],
    dtype: Any = None,
    *,
    format: str | None = None,
    backend: str = "auto",
    direct: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    storage_options: dict | None = None,
) -> TokenDataset:
    """Open a token dataset: our directory, a nanoGPT raw ``.bin``, an llm.c ``.bin`` or a
    Megatron ``.bin``/``.idx`` pair.

    Detection (``format=None``): a directory (or its ``manifest.json``) is ours; a path
    ``X`` with ``X.idx`` and ``X.bin`` beside it, or ``X.bin`` / ``X.idx`` of such a pair,
    is Megatron; a file starting with an llm.c magic (20240520 or 20240801 as int32) is
    llm.c; any other file is a nanoGPT raw token array and needs ``dtype``. Everything
    but the data path (headers, tables, manifest) is parsed at open and checked for
    consistency, so a damaged dataset fails here rather than mid-training.

    Args:
        path: directory, file or Megatron prefix.
        dtype: expected token dtype; required for nanoGPT raw files (``uint16`` or
            ``uint32``), checked against the file for the other formats.
        format: force ``"llmio"``, ``"nanogpt"``, ``"llmc"`` or ``"megatron"``.
        backend, direct: options of the :class:`Reader` used for the data.
        cache_dir, cache_bytes, storage_options: for a URL (``s3://``, ``gs://``, ``az://``,
            ``http(s)://``; our format only): the local cache directory (default
            ``$LLMIO_CACHE_DIR`` or ``~/.cache/llmio_native/remote``), its bound in bytes
            (default ``$LLMIO_CACHE_BYTES`` or half the free space there), and the store's
            options (endpoint, credentials, ``timeout``, ``retries``; default: the store's
            environment variables). See :mod:`llmio_native.remote`.

    Raises:
        FileNotFoundError: the path, or a shard the manifest lists, does not exist.
        IncompleteDatasetError: (a FormatError) a directory without ``manifest.json``.
        FormatError: wrong magic, unknown version, a size, count or checksum that does not
            match, a dtype other than ``dtype``; the message names the file and offset.
        ValueError: bad arguments (unknown format, missing dtype for a raw file).
        RemoteError: (an OSError) a URL's store failed after retries (names URL and range).
    """
    p = os.fspath(path)
    want = _as_dtype(dtype)
    opts = {"backend": backend, "direct": direct}
    from ..remote.store import is_url

    if is_url(p):
        if format not in (None, "llmio"):
            raise ValueError(f"open_dataset({p!r}, format={format!r}): URLs are read in the llmio format only")
        from ..remote.dataset import open_remote

        return open_remote(p, want, opts, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                           cache_bytes=cache_bytes, storage_options=storage_options)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format is None:
        format = detect_format(p, want)
    if format == "llmio":
        if os.path.isfile(p) and os.path.basename(p) == F.MANIFEST_NAME:
            p = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(p):
            if not os.path.exists(p):
                raise FileNotFoundError(2, "no such dataset directory", p)
            raise FormatError(f"{p}: an llmio dataset is a directory with manifest.json", path=p)
        return LioDataset.open(p, want, opts)
    if format == "nanogpt":
        return compat.open_nanogpt(p, want, opts)
    if format == "llmc":
        return compat.open_llmc(p, want, opts)
    return compat.open_megatron(p, want, opts)


def detect_format(p: str, dtype: np.dtype | None) -> str:
    """Which reader :func:`open_dataset` uses for ``p`` (see its docstring).

    Raises:
        FileNotFoundError: nothing at ``p`` (nor ``p.idx`` / ``p.bin``).
        FormatError: a file whose format cannot be told (no known magic and no ``dtype``
            for a raw file), or a single shard of our format.
    """
    if os.path.isdir(p):
        return "llmio"
    if os.path.basename(p) == F.MANIFEST_NAME and os.path.isfile(p):
        return "llmio"
    if _megatron_prefix(p) is not None:
        return "megatron"
    if not os.path.exists(p):
        raise FileNotFoundError(2, "no such file, dataset directory or Megatron prefix", p)
    head = _head(p, 16)
    if head.startswith(F.MAGIC):
        raise FormatError(f"{p}: this is one shard of an llmio dataset; open its directory", path=p)
    if head.startswith(MEGATRON_MAGIC):
        raise FormatError(f"{p}: a Megatron index; open it by its .idx name or its prefix", path=p)
    magic = int(np.frombuffer(head[:4], "<i4")[0]) if len(head) >= 4 else None
    if magic in LLMC_MAGICS:
        return "llmc"
    if dtype is None:
        hint = ""
        if magic is not None and 20240000 <= magic < 20300000:
            hint = (f" (its first int32 is {magic}, which looks like an llm.c header with an unknown "
                    f"magic; known: {sorted(LLMC_MAGICS)})")
        raise FormatError(
            f"{p}: cannot tell the format{hint}: not a dataset directory, no llm.c magic, no Megatron "
            ".idx beside it; a raw nanoGPT token file needs dtype='uint16' or 'uint32'", path=p)
    return "nanogpt"


__all__ = ["open_dataset", "detect_format", "FORMATS"]
