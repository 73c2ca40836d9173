"""Our format: :class:`LioDataset`, a directory of shards listed by ``manifest.json``
(docs/format.md). The manifest schema is ``manifest.py``'s; the shard layout is ``format.py``'s.
Opening parses and cross-checks every header, chunk table and document index, so a
damaged dataset fails at open rather than mid-training.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import FormatError, IncompleteDatasetError
from . import format as F
from .base import TokenDataset
from .index import load_index
from .manifest import Manifest, dataset_files, is_shard_name, read_manifest


def _read_file(path: str, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(nbytes)


def _incomplete_or_missing(d: str) -> None:
    """Raise the error for a directory without ``manifest.json``."""
    if not os.path.exists(d):
        raise FileNotFoundError(2, "no such dataset directory", d)
    files = dataset_files(d)
    shards = [n for n in files if is_shard_name(n)]
    if shards or F.MANIFEST_TMP_NAME in files:
        raise IncompleteDatasetError(
            f"{d}: incomplete dataset (no manifest.json; the writer did not finish): "
            f"{len(shards)} shard file(s) but no manifest. Rewrite it (DatasetWriter(..., overwrite=True))",
            path=d,
        )
    raise IncompleteDatasetError(
        f"{d}: not a dataset, or an incomplete one (no manifest.json; the writer did not finish "
        "or never started)", path=d,
    )


class LioDataset(TokenDataset):
    """A dataset directory in the llmio token format, version 1 or 2 (docs/format.md).

    Adds ``chunk_tokens`` (int), ``format_version`` (1 or 2: the layout of its shards) and
    ``manifest`` (the parsed manifest.json) to the attributes of :class:`TokenDataset`.
    """

    format = "llmio"
    format_version: int
    chunk_tokens: int
    manifest: dict

    @classmethod
    def open(cls, directory: str, dtype: np.dtype | None, reader_options: dict) -> "LioDataset":
        """Open the dataset in ``directory`` (see :func:`open_dataset`).

        Raises:
            FileNotFoundError: no such directory, or a shard the manifest lists is missing.
            IncompleteDatasetError: no ``manifest.json``.
            FormatError: the manifest, a header, a chunk table or a document index is
                inconsistent or damaged; a dtype other than ``dtype``.
        """
        d = os.path.abspath(directory)
        mpath = os.path.join(d, F.MANIFEST_NAME)
        if not os.path.exists(mpath):
            _incomplete_or_missing(d)
        man: Manifest = read_manifest(d, dtype)
        ds_dtype = np.dtype(man.dtype)
        codec, chunk_tokens = man.codec, man.chunk_tokens
        total_tokens, total_docs = man.num_tokens, man.num_documents
        tokenizer_path = os.path.join(d, man.tokenizer) if man.tokenizer is not None else None

        tb = ds_dtype.itemsize
        paths: list[str] = []
        sizes: list[int] = []
        tables = []
        doc_parts = []
        region_parts = []
        local_parts = []
        first = 0
        for si, entry in enumerate(man.shards):
            path = os.path.join(d, entry.name)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise FileNotFoundError(2, f"shard {si} listed in {mpath} is missing", path) from None
            if size != entry.bytes:
                raise FormatError(
                    f"{path}: file is {size} bytes, manifest.json says {entry.bytes} "
                    f"({'truncated' if size < entry.bytes else 'extra bytes'})", path=path, offset=min(size, entry.bytes))
            hdr = F.unpack_header(_read_file(path, 0, F.HEADER_BYTES), path)
            checks = [
                ("header_checksum", hdr["header_checksum"], entry.header_checksum),
                ("token_bytes", hdr["token_bytes"], tb),
                ("codec", hdr["codec"], F.CODEC_IDS[codec]),
                ("num_chunks", hdr["num_chunks"], entry.num_chunks),
                ("num_tokens", hdr["num_tokens"], entry.num_tokens),
                ("num_documents", hdr["num_documents"], entry.num_documents),
                ("chunk_tokens", hdr["chunk_tokens"], chunk_tokens),
                ("version", hdr["version"], man.version),
            ]
            for fname, got, want in checks:
                if got != want:
                    raise FormatError(f"{path}: header {fname} is {got}, manifest.json says {want}",
                                      path=path, offset=0)
            nch, ntok, ndoc = hdr["num_chunks"], hdr["num_tokens"], hdr["num_documents"]
            t_off, d_off = hdr["table_offset"], hdr["doc_index_offset"]
            if (t_off < F.HEADER_BYTES or t_off % F.chunk_align(hdr["version"]) or d_off != t_off + nch * F.CHUNK_ENTRY.itemsize
                    or size != d_off + ndoc * F.DOC_END.itemsize):
                raise FormatError(
                    f"{path}: table_offset {t_off} / doc_index_offset {d_off} do not fit {nch} chunks, "
                    f"{ndoc} documents and a file of {size} bytes", path=path, offset=56)
            raw = _read_file(path, t_off, size - t_off)
            if len(raw) != size - t_off:
                raise FormatError(f"{path}: truncated while reading tables @ offset {t_off}", path=path, offset=t_off)
            got = F.checksum(raw)
            if got != hdr["tables_checksum"]:
                raise FormatError(
                    f"{path}: chunk table / document index checksum mismatch @ offset {t_off} "
                    f"(recorded {hdr['tables_checksum']:#018x}, computed {got:#018x})", path=path, offset=t_off)
            table = np.frombuffer(raw, dtype=F.CHUNK_ENTRY, count=nch)
            docs = np.frombuffer(raw, dtype=F.DOC_END, count=ndoc, offset=nch * F.CHUNK_ENTRY.itemsize)
            cls._check_table(path, table, docs, hdr, tb, t_off)
            tables.append((len(paths), table, first))
            doc_parts.append(docs.astype(np.uint64) + np.uint64(first))
            nxt = np.empty(nch, dtype=np.uint64)
            if nch:
                nxt[:-1] = table["offset"][1:]
                nxt[-1] = t_off
                # a model region written between two chunks ends the first one's region
                mo = table["model_offset"][1:]
                between = (mo > table["offset"][:-1]) & np.isin(table["codec"][1:], F.MODEL_CODECS)
                nxt[:-1] = np.where(between, mo, nxt[:-1])
            region_parts.append(nxt)
            local_parts.append(np.arange(nch, dtype=np.int64))
            paths.append(path)
            sizes.append(size)
            first += ntok
        if first != total_tokens or sum(len(x) for x in doc_parts) != total_docs:
            raise FormatError(
                f"{mpath}: num_tokens {total_tokens} / num_documents {total_docs} disagree with the "
                f"shards ({first} tokens, {sum(len(x) for x in doc_parts)} documents)", path=mpath)
        nchunks = sum(len(t[1]) for t in tables)
        chunks = np.empty(nchunks, dtype=F.CHUNKS_DTYPE)
        k = 0
        for fi, table, base in tables:
            n = len(table)
            sl = chunks[k : k + n]
            sl["file"] = fi
            for name in ("offset", "stored_bytes", "codec", "checksum", "token_count"):
                sl[name] = table[name]
            sl["model"] = table["model_offset"]
            sl["first_token"] = table["first_token"] + np.uint64(base)
            k += n
        ends = np.concatenate(doc_parts) if doc_parts else np.zeros(0, dtype=np.uint64)
        regions = np.concatenate(region_parts) if region_parts else np.zeros(0, dtype=np.uint64)
        local = np.concatenate(local_parts) if local_parts else np.zeros(0, dtype=np.int64)
        ds = cls(path=d, paths=paths, dtype=ds_dtype, codec=codec, chunks=chunks, document_ends=ends,
                 file_sizes=sizes, region_ends=regions, local_index=local, has_checksums=True,
                 eot_token=man.eot_token, tokenizer_path=tokenizer_path, metadata=man.metadata, reader_options=reader_options)
        ds.chunk_tokens = chunk_tokens
        ds.format_version = man.version
        ds.manifest = man.raw if man.raw is not None else man.to_json()
        ds._shard_entries = man.shards
        return ds

    def _metadata_problems(self) -> list[tuple[str, int, str]]:
        """``(path, offset, reason)`` of each problem with the dataset's ``index.lio`` (for
        :meth:`verify`): missing, unreadable, damaged, or not describing the shards. The
        index is redundant for local reads, but a remote reader opens from it."""
        ent = self.manifest.get("index")
        if not ent:
            return []
        path = os.path.join(self.path, str(ent["name"]))
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            load_index(data, ent, self._shard_entries, path)
        except OSError as exc:
            return [(path, 0, f"cannot read the index: {exc}")]
        except FormatError as exc:
            return [(path, int(getattr(exc, "offset", None) or 0), str(exc))]
        return []

    @staticmethod
    def _check_table(path: str, table: np.ndarray, docs: np.ndarray, hdr: dict, tb: int, t_off: int) -> None:
        nch, ntok, ct = hdr["num_chunks"], hdr["num_tokens"], hdr["chunk_tokens"]
        align = F.chunk_align(hdr["version"])  # v1: 4096, v2: 8 (chunks packed back to back)

        def bad(mask: np.ndarray, what: str) -> None:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                raise FormatError(f"{path}: chunk {i} @ offset {int(table['offset'][i])}: {what}",
                                  path=path, chunk=i, offset=int(table["offset"][i]))

        if nch:
            off = table["offset"].astype(np.int64)
            stored = table["stored_bytes"].astype(np.int64)
            count = table["token_count"].astype(np.int64)
            bad(off % align != 0, f"offset is not {align}-aligned (format v{hdr['version']})")
            bad(off < F.HEADER_BYTES, "offset inside the header")
            bad(off + stored > t_off, f"stored bytes run past the chunk table @ {t_off}")
            bad(np.r_[False, off[1:] < off[:-1] + stored[:-1]], "overlaps the previous chunk")
            bad(count == 0, "holds no tokens")
            bad(count > ct, f"holds more than chunk_tokens={ct} tokens")
            bad(np.r_[count[:-1] != ct, False], f"is not the last chunk but holds fewer than {ct} tokens")
            cum = np.r_[0, np.cumsum(count)[:-1]]
            bad(table["first_token"].astype(np.int64) != cum, "first_token is not the sum of earlier token counts")
            bad((table["codec"] == F.CODEC_NONE) & (stored != count * tb), "raw chunk size != token_count x token_bytes")
            bad(table["flags"] != 0, "nonzero flags (written by a newer version?)")
            mo = table["model_offset"].astype(np.int64)
            rans = np.isin(table["codec"], F.MODEL_CODECS)
            bad(~rans & (mo != 0), "nonzero model_offset on a chunk that is not rans/rans1 (written by a newer "
                "version?)")
            bad(rans & ((mo % align != 0) | (mo < F.HEADER_BYTES) | (mo + F.MODEL_HEADER_BYTES > off)),
                f"rans/rans1 chunk whose model_offset is not a {align}-aligned offset before the chunk")
            total = int(count.sum())
        else:
            total = 0
        if total != ntok:
            raise FormatError(f"{path}: chunks hold {total} tokens, header says {ntok}", path=path)
        if len(docs):
            e = docs.astype(np.uint64)
            if (e[1:] < e[:-1]).any():
                i = int(np.flatnonzero(e[1:] < e[:-1])[0]) + 1
                raise FormatError(f"{path}: document index not ascending at document {i}", path=path)
            if int(e[-1]) != ntok:
                raise FormatError(f"{path}: last document ends at {int(e[-1])}, shard holds {ntok} tokens",
                                  path=path)
        elif ntok:
            raise FormatError(f"{path}: {ntok} tokens but no documents", path=path)


__all__ = ["LioDataset"]
