"""Test helper: write back a deliberately edited llmio shard so that every checksum passes."""
from __future__ import annotations

import json
from pathlib import Path

from llmio_native.dataset import format as F
from llmio_native.dataset.index import rebuild_index


def reseal(shard: Path, raw: bytearray) -> None:
    """Write ``raw`` to ``shard`` with its tables checksum, header, manifest entry and
    index.lio recomputed (a deliberate rewrite that passes every checksum; shard 0 of its dataset)."""
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    tsum = F.checksum(bytes(raw[hdr["table_offset"]:]))
    fields = {k: hdr[k] for k in ("token_bytes", "codec", "num_chunks", "num_tokens", "num_documents",
                                 "chunk_tokens", "table_offset", "doc_index_offset")}
    raw[:4096] = F.pack_header(**fields, tables_checksum=tsum, version=hdr["version"])
    shard.write_bytes(bytes(raw))
    mpath = shard.parent / "manifest.json"
    man = json.loads(mpath.read_text())
    man["shards"][0]["header_checksum"] = int.from_bytes(bytes(raw[80:88]), "little")
    mpath.write_text(json.dumps(man))
    rebuild_index(str(shard.parent))  # index.lio describes the rewritten shard
