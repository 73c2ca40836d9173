"""Token datasets: the llmio shard format (docs/format.md) and readers for nanoGPT, llm.c
and Megatron token files.

* :class:`DatasetWriter` streams documents into a directory of checksummed, 4 KiB-aligned
  token shards and commits it with an atomic ``manifest.json``.
* :func:`open_dataset` opens any supported source as a :class:`TokenDataset`: random
  access (``read``), documents, the chunk table the loader plans its I/O from
  (``chunks``, ``locate``, ``decode_chunk``) and ``verify``.
"""
from __future__ import annotations

from .format import CHUNKS_DTYPE, CODEC_IDS
from .tokens import BadChunk, LioDataset, TokenDataset, VerifyReport, open_dataset
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
