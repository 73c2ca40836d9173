"""Token datasets: the llmio shard format (docs/format.md) and readers for nanoGPT, llm.c
and Megatron token files.

* :class:`DatasetWriter` streams documents into a directory of checksummed, 4 KiB-aligned
  token shards and commits it with an atomic ``manifest.json``.
* :func:`open_dataset` opens any supported source as a :class:`TokenDataset`: random
  access (``read``), documents, the chunk table the loader plans its I/O from
  (``chunks``, ``locate``, ``decode_chunk``) and ``verify``.

Modules: ``format`` (shard layout, codecs), ``manifest`` (manifest schema, which files
belong to a dataset), ``base`` (``TokenDataset``, the read planner), ``verify``, ``llmio``
(our format), ``compat`` (other tools' formats), ``open`` (``open_dataset``), ``writer``,
``rans`` (batched rans decoding).
"""
from __future__ import annotations

from .format import CHUNKS_DTYPE, CODEC_IDS
from .base import TokenDataset
from .llmio import LioDataset
from .open import open_dataset
from .verify import BadChunk, VerifyReport
from .writer import DatasetWriter

__all__ = [
    "DatasetWriter",
    "open_dataset",
    "TokenDataset",
    "LioDataset",
    "VerifyReport",
    "BadChunk",
    "CHUNKS_DTYPE",
    "CODEC_IDS",
]
