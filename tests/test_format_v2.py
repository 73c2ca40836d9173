"""Format v2 (issue 14, layout): encoded chunks and model regions packed back to back (each
at a multiple of 8 bytes), read with O_DIRECT as 4096-aligned supersets, neighbours coalesced.
v1 files (4 KiB-aligned chunks) stay readable, from a checked-in fixture of the old writer."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import llmio_native as lio
from llmio_native.dataset import base as base_mod
from llmio_native.dataset import format as F
from llmio_native.dataset import rans
from llmio_native.loader.staging import fill_staging, plan_group_staging
from llmio_native.remote.cache import unit_charge, unit_punch_range
from llmio_native.remote.dataset import _units

from shard_edit import reseal

DATA = Path(__file__).parent / "data"


def text_like(n: int, vocab: int, seed: int, dtype: str) -> np.ndarray:
    """Zipf-ish ids with some order-1 structure (so rans1 codes them and zstd compresses)."""
    rng = np.random.default_rng(seed)
    base = np.minimum(rng.zipf(1.3, n), vocab) - 1
    prev = np.roll(base, 1)
    mix = np.where(rng.random(n) < 0.3, (prev * 31 + 7) % vocab, base)
    return mix.astype(dtype)


def write(path, tokens, codec, dtype="uint16", version=None, **kw) -> list[np.ndarray]:
    cuts = [0, 1, 3000, 3001, 9000, 9000, len(tokens)]  # with an empty document
    docs = [tokens[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    kw.setdefault("chunk_tokens", 1000)
    with lio.DatasetWriter(path, dtype=dtype, codec=codec, _format_version=version, **kw) as w:
        w.add_documents(docs)
    return docs


def packed(ds) -> bool:
    """Whether consecutive chunks of each file lie back to back (gaps < 8 bytes, or a model region)."""
    ch = ds.chunks
    for f in range(len(ds.paths)):
        c = ch[ch["file"] == f]
        end = c["offset"][:-1] + c["stored_bytes"][:-1]
        gap = c["offset"][1:].astype(np.int64) - end.astype(np.int64)
        model_between = c["model"][1:] > c["offset"][:-1]
        if ((gap < 0) | ((gap >= 8) & ~model_between)).any():
            return False
    return True


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@pytest.mark.parametrize("codec", ["zstd", "rans", "rans1", "none"])
def test_v2_round_trip_bit_exact(tmp_path, codec, dtype):
    tokens = text_like(18_777, 3000 if dtype == "uint16" else 70_000, 1, dtype)  # 9 + 10 chunks: odd
    # rans groups of 5000 tokens: several model regions per shard, between chunks
    write(tmp_path / "d", tokens, codec, dtype, version=2, shard_tokens=9500, rans_model_tokens=5000)
    ds = lio.open_dataset(tmp_path / "d", direct=True)
    assert ds.format_version == 2 and json.loads((tmp_path / "d" / "manifest.json").read_text())["version"] == 2
    assert len(ds.paths) == 2 and len(ds.chunks) % 2 == 1
    assert (ds.chunks["offset"] % F.PACK_ALIGN == 0).all() and (ds.chunks["model"] % F.PACK_ALIGN == 0).all()
    if codec != "none" or dtype == "uint16":  # 2000-byte raw uint16 chunks are not 4096 multiples either
        assert (ds.chunks["offset"] % 4096 != 0).any()  # really packed, not padded
    assert packed(ds)
    np.testing.assert_array_equal(ds.read(0, len(tokens)), tokens)
    rng = np.random.default_rng(2)
    for _ in range(25):
        s = int(rng.integers(0, len(tokens)))
        n = int(rng.integers(0, min(4000, len(tokens) - s) + 1))
        np.testing.assert_array_equal(ds.read(s, n), tokens[s:s + n])
    for ci in range(len(ds.chunks)):
        c = ds.chunks[ci]
        stored = ds.reader.read(int(c["file"]), int(c["offset"]), int(c["stored_bytes"]))
        np.testing.assert_array_equal(ds.decode_chunk(ci, stored),
                                      tokens[int(c["first_token"]):int(c["first_token"]) + int(c["token_count"])])
    rep = ds.verify()
    assert rep.ok, rep.bad_chunks
    assert rep.chunks_checked == len(ds.chunks)


def test_encoded_codecs_write_v2_by_default_raw_writes_v1(tmp_path):
    tokens = text_like(5000, 2000, 3, "uint16")
    write(tmp_path / "z", tokens, "zstd")
    write(tmp_path / "n", tokens, "none")
    assert lio.open_dataset(tmp_path / "z").format_version == 2
    raw = lio.open_dataset(tmp_path / "n")
    assert raw.format_version == 1 and (raw.chunks["offset"] % 4096 == 0).all()
    with pytest.raises(ValueError, match="_format_version must be one of"):
        lio.DatasetWriter(tmp_path / "x", codec="zstd", _format_version=3)


def test_v2_is_smaller_than_v1(tmp_path):
    tokens = text_like(40_000, 3000, 4, "uint16")
    pads = {}
    for v in (1, 2):
        write(tmp_path / f"v{v}", tokens, "rans1", version=v, rans_model_tokens=10_000)
        ds = lio.open_dataset(tmp_path / f"v{v}")
        np.testing.assert_array_equal(ds.read(0, len(tokens)), tokens)
        size = sum(os.path.getsize(p) for p in ds.paths)
        models = 0
        for f, off in set(zip(ds.chunks["file"].tolist(), ds.chunks["model"].tolist())):
            head = ds.reader.read(f, off, F.MODEL_HEADER_BYTES)
            models += F.model_region_size(head, ds.paths[f], off)
        tables = 48 * len(ds.chunks) + 8 * ds.num_documents
        pads[v] = size - int(ds.chunks["stored_bytes"].sum()) - models - 4096 - tables
        nregions = len(ds.chunks) + len(set(ds.chunks["model"].tolist()))
    assert nregions == 40 + 4
    assert 0 <= pads[2] < 8 * nregions  # v2: under 8 zero bytes per chunk or model region
    assert pads[1] > 1024 * nregions  # v1: half a block each, on average


# -- O_DIRECT, coalescing ---------------------------------------------------------------------------
def test_v2_reads_are_direct_and_read_shared_blocks_once(tmp_path):
    tokens = text_like(60_000, 3000, 5, "uint16")
    write(tmp_path / "d", tokens, "zstd", version=2, chunk_tokens=2000)
    ds = lio.open_dataset(tmp_path / "d", direct=True)
    r = ds.reader
    before = r.stats()
    np.testing.assert_array_equal(ds.read(0, len(tokens)), tokens)
    after = r.stats()
    if after["bytes_direct"] == before["bytes_direct"]:
        pytest.skip(f"O_DIRECT not used on {tmp_path} (fallbacks: {after['direct_fallbacks']})")
    assert after["bytes_buffered"] == before["bytes_buffered"]  # every byte direct
    ch = ds.chunks
    first, last = int(ch["offset"][0]), int(ch["offset"][-1] + ch["stored_bytes"][-1])
    superset = F.align_up(last) - F.align_down(first)
    # one aligned read of the whole packed region: no block twice (per-chunk reads would read
    # each shared boundary block twice, bounced)
    assert after["bytes_direct"] - before["bytes_direct"] <= superset
    assert after["bounce_bytes"] - before["bounce_bytes"] <= 4096  # at most the block at EOF
    # verify() reads each chunk with the zeros after it: coalesced the same way
    before = r.stats()
    rep = ds.verify()
    after = r.stats()
    assert rep.ok and rep.chunks_checked == len(ch)
    assert after["bytes_buffered"] == before["bytes_buffered"]
    assert after["bytes_direct"] - before["bytes_direct"] <= F.align_up(int(ds.region_ends[-1])) - F.align_down(first)


def test_plan_staging_runs_coalesces_neighbours():
    pieces = [(0, 4096, 1000), (0, 5096, 3000), (0, 8100, 5000), (0, 40_000, 100), None, (1, 4100, 10)]
    places, runs, total = base_mod.plan_staging_runs(pieces, [100_000, 10_000])
    # the first three share or touch blocks: one run [4096, 16384); the fourth is alone
    assert runs == [(0, 4096, 16384, 0), (0, 36864, 40960, 12288), (1, 4096, 8192, 16384)]
    assert places == [0, 1000, 4004, 12288 + 40_000 - 36864, -1, 16384 + 4]
    assert total == 20480
    # a run is cut at the end of the file
    _, runs, _ = base_mod.plan_staging_runs([(0, 4096, 100)], [4200])
    assert runs == [(0, 4096, 4200, 0)]


@pytest.mark.parametrize("codec,dtype", [("rans", "uint16"), ("rans1", "uint16"), ("rans1", "uint32")])
def test_gpu_staging_v2_descriptors_and_emulation(tmp_path, codec, dtype):
    """The GPU decode path's staging of packed chunks: payloads decoded in place inside the
    aligned runs (emulated kernel), bit-exact; raw chunks copied from their place."""
    from llmio_native.dataset import rans1
    from llmio_native.loader.gpu_decode import place_plain_chunks

    tokens = text_like(45_000, 3000 if dtype == "uint16" else 90_000, 6, dtype)
    if dtype == "uint16":  # 20000 uniformly random ids: their chunks do not compress, stored raw
        tokens[9000:29_000] = np.random.default_rng(7).integers(0, 65536, 20_000).astype(dtype)
    # 600-token chunks: a random chunk's payload (with its 148-byte block tables) outgrows 1200 raw bytes
    write(tmp_path / "d", tokens, codec, dtype, version=2, chunk_tokens=600, rans_model_tokens=1 << 20)
    ds = lio.open_dataset(tmp_path / "d", direct=True)
    chunks = [2, 3, 4, 5, 14, 15, 16, 17, 40, 48, 49, 50, 60]
    st = plan_group_staging(ds, chunks)
    assert st.in_place.all() and len(st.runs) < len(chunks)  # neighbours coalesced
    assert st.gpu.any() and (dtype == "uint32" or not st.gpu.all())  # uint16: raw chunks in the group too
    offs = ds.chunks["offset"][st.chunks].astype(np.int64)
    assert ((st.src_offsets - offs) % 4096 == 0).all() and (st.src_offsets % 4 == 0).all()
    buf = lio.io.empty_aligned(st.staging_bytes)
    fill_staging(ds, st, buf, ds.reader.read_batch_into)
    tb = np.dtype(dtype).itemsize
    out = np.zeros(st.num_tokens, dtype=f"<u{tb}")
    status = (rans1 if codec == "rans1" else rans).emulate(buf, st.chunk_desc, st.block_desc, st.models, out)
    assert (np.asarray(status) == 0).all()
    place_plain_chunks(st, torch.from_numpy(buf), torch.from_numpy(out.view(f"<i{tb}")))
    expect = np.concatenate([tokens[int(ds.chunks["first_token"][c]):][:int(ds.chunks["token_count"][c])]
                             for c in st.chunks])
    np.testing.assert_array_equal(out, expect)


# -- v1 files stay readable ------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["zstd", "rans1"])
def test_v1_fixture_from_the_old_writer_reads(codec, tmp_path):
    """tests/data/format_v1_*: written by the v1 writer (commit 5948fa5), 3001 tokens."""
    i = np.arange(3001)
    tokens = ((i * 7919 + (i // 13) ** 2) % 997).astype(np.uint16)
    d = tmp_path / "d"
    shutil.copytree(DATA / f"format_v1_{codec}", d)
    ds = lio.open_dataset(d, direct=True)
    assert ds.format_version == 1 and (ds.chunks["offset"] % 4096 == 0).all()
    np.testing.assert_array_equal(ds.read(0, 3001), tokens)
    np.testing.assert_array_equal(ds.read(650, 800), tokens[650:1450])
    assert [len(ds.document(k)) for k in range(ds.num_documents)] == [400, 1300, 1, 799, 501]
    assert ds.verify().ok
    for m in ("zstd", "rans1"):
        assert m != codec or ds.codec == codec


def test_v1_writer_knob_still_writes_v1(tmp_path):
    tokens = text_like(9000, 3000, 7, "uint16")
    write(tmp_path / "d", tokens, "rans1", version=1)
    ds = lio.open_dataset(tmp_path / "d")
    assert ds.format_version == 1 and (ds.chunks["offset"] % 4096 == 0).all()
    np.testing.assert_array_equal(ds.read(0, len(tokens)), tokens)
    assert ds.verify().ok


def test_a_v1_only_reader_refuses_v2_clearly(tmp_path, monkeypatch):
    write(tmp_path / "d", text_like(3000, 500, 8, "uint16"), "zstd")
    monkeypatch.setattr(F, "KNOWN_VERSIONS", (1,))
    with pytest.raises(lio.FormatError, match=r"manifest.json: dataset format version 2 is not supported by this "
                                              r"build \(it reads versions \[1\]\); upgrade llmio_native"):
        lio.open_dataset(tmp_path / "d")
    shard = str(tmp_path / "d" / "shard-00000.lio")
    with open(shard, "rb") as fh:
        head = fh.read(4096)
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio: shard format version 2 is not supported"):
        F.unpack_header(head, shard)


def test_header_version_must_match_the_manifest(tmp_path):
    write(tmp_path / "d", text_like(3000, 500, 9, "uint16"), "zstd")
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["version"] = 1
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio: header version is 2, manifest.json says 1"):
        lio.open_dataset(tmp_path / "d")


# -- damage ------------------------------------------------------------------------------------------
def _v2(tmp_path, codec="rans1"):
    tokens = text_like(12_345, 3000, 10, "uint16")
    write(tmp_path / "d", tokens, codec, version=2, rans_model_tokens=6000)
    return lio.open_dataset(tmp_path / "d"), tokens, tmp_path / "d" / "shard-00000.lio"


def test_v2_corrupt_chunk_names_file_and_chunk(tmp_path):
    ds, tokens, shard = _v2(tmp_path)
    c = ds.chunks[5]
    off = int(c["offset"])
    raw = bytearray(shard.read_bytes())
    raw[off + 3] ^= 0x40
    shard.write_bytes(bytes(raw))
    ds = lio.open_dataset(tmp_path / "d")
    np.testing.assert_array_equal(ds.read(0, int(c["first_token"])), tokens[:int(c["first_token"])])
    with pytest.raises(lio.ChecksumError, match=rf"shard-00000.lio chunk 5 \(dataset chunk 5\) @ offset {off}: "
                                                r"checksum mismatch"):
        ds.read(int(c["first_token"]), 10)
    rep = ds.verify()
    assert [(Path(b.path).name, b.chunk, b.offset) for b in rep.bad_chunks] == [("shard-00000.lio", 5, off)]


def test_v2_damaged_alignment_zeros_are_reported(tmp_path):
    ds, tokens, shard = _v2(tmp_path, "zstd")
    ends = ds.chunks["offset"] + ds.chunks["stored_bytes"]
    k = int(np.flatnonzero(ends % 8 != 0)[0])  # a chunk followed by zeros to the next multiple of 8
    pos = int(ends[k])
    raw = bytearray(shard.read_bytes())
    assert raw[pos] == 0
    raw[pos] = 7
    shard.write_bytes(bytes(raw))
    ds = lio.open_dataset(tmp_path / "d")
    np.testing.assert_array_equal(ds.read(0, len(tokens)), tokens)  # the tokens are intact
    rep = ds.verify()
    assert [(b.chunk, b.offset) for b in rep.bad_chunks] == [(k, int(ds.chunks["offset"][k]))]
    assert f"nonzero padding byte @ offset {pos}" in rep.bad_chunks[0].reason


def test_v2_truncated_shard_is_refused(tmp_path):
    ds, tokens, shard = _v2(tmp_path)
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    with pytest.raises(lio.FormatError, match=rf"shard-00000.lio: file is {size - 100} bytes, manifest.json says "
                                              rf"{size} \(truncated\)"):
        lio.open_dataset(tmp_path / "d")


def test_v2_shard_shrunk_after_open_names_the_read(tmp_path):
    ds, tokens, shard = _v2(tmp_path)
    c = ds.chunks[len(ds.chunks) // 2]
    off, n = int(c["offset"]), int(c["stored_bytes"])
    os.truncate(shard, off + 10)
    # the aligned run fails; the error names the chunk's own range (read again alone) and the chunk
    with pytest.raises(lio.ShortReadError, match=rf"shard-00000.lio @ {off} \(\+{n}\): past end of file.*\(reading "
                                                 rf"{n} bytes of .*shard-00000.lio chunk \d+ \(dataset chunk \d+\) "
                                                 rf"@ offset {off}\)"):
        ds.read(int(c["first_token"]), 5)



def _edit_entry(shard: Path, k: int, field_offset: int, value: int) -> None:
    raw = bytearray(shard.read_bytes())
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    struct.pack_into("<Q", raw, hdr["table_offset"] + 48 * k + field_offset, value)
    reseal(shard, raw)


@pytest.mark.parametrize("case,edit,msg", [
    ("overlap", lambda c, n, t: (3, 0, int(c["offset"][2]) + 8), r"chunk 3 @ offset \d+: overlaps the previous chunk"),
    ("unaligned", lambda c, n, t: (3, 0, int(c["offset"][3]) + 4), r"chunk 3 @ offset \d+: offset is not 8-aligned"),
    ("past_table", lambda c, n, t: (n - 1, 8, t - int(c["offset"][n - 1]) + 1),
     r"chunk \d+ @ offset \d+: stored bytes run past the chunk table"),
    ("past_eof", lambda c, n, t: (n - 1, 0, 1 << 40), r"chunk \d+ @ offset \d+: stored bytes run past the chunk"),
    ("model_unaligned", lambda c, n, t: (2, 40, int(c["model"][2]) + 4),
     r"chunk 2 @ offset \d+: rans/rans1 chunk whose model_offset is not a 8-aligned offset"),
])
def test_v2_chunk_table_validation(tmp_path, case, edit, msg):
    ds, _, shard = _v2(tmp_path)
    sel = ds.chunks[ds.chunks["file"] == 0]
    hdr = F.unpack_header(shard.read_bytes()[:4096], str(shard))
    k, fo, value = edit(sel, len(sel), hdr["table_offset"])
    _edit_entry(shard, k, fo, value)
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio: " + msg):
        lio.open_dataset(tmp_path / "d")


def test_v2_table_offset_must_be_8_aligned(tmp_path):
    ds, _, shard = _v2(tmp_path)
    raw = bytearray(shard.read_bytes())
    hdr = F.unpack_header(bytes(raw[:4096]), str(shard))
    fields = {k: hdr[k] for k in ("token_bytes", "codec", "num_chunks", "num_tokens", "num_documents",
                                 "chunk_tokens", "tables_checksum")}
    raw[:4096] = F.pack_header(**fields, table_offset=hdr["table_offset"] + 4,
                               doc_index_offset=hdr["doc_index_offset"] + 4, version=2)
    shard.write_bytes(bytes(raw))
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    man["shards"][0]["header_checksum"] = int.from_bytes(bytes(raw[80:88]), "little")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(lio.FormatError, match=r"shard-00000.lio: table_offset \d+ / doc_index_offset"):
        lio.open_dataset(tmp_path / "d")


# -- remote cache: units that share blocks ----------------------------------------------------------
def test_remote_units_punch_only_blocks_no_live_unit_touches(tmp_path):
    tokens = text_like(40_000, 3000, 11, "uint16")
    write(tmp_path / "d", tokens, "rans1", version=2, chunk_tokens=1200, rans_model_tokens=15_000)
    ds = lio.open_dataset(tmp_path / "d")
    ufile, ustart, uend, deps = _units(ds)
    n = len(ustart)
    charge = unit_charge(ustart, uend)
    assert (charge >= uend - ustart).all() and (charge % 4096 == 0).all()
    table_off = {f: int(uend[ufile == f].max()) for f in set(ufile.tolist())}
    rng = np.random.default_rng(0)
    for _ in range(200):
        live = rng.random(n) < 0.5
        u = int(rng.integers(0, n))
        live[u] = False
        lo, hi = unit_punch_range(u, ufile, ustart, uend, lambda v: bool(live[v]))
        if lo >= hi:
            continue
        assert lo % 4096 == 0 and hi % 4096 == 0
        assert ustart[u] - 4096 < lo and hi < uend[u] + 4096  # inside the unit's aligned span
        f = ufile[u]
        same = (ufile == f) & live
        assert not ((ustart[same] < hi) & (uend[same] > lo)).any()  # no live unit's byte
        assert hi <= table_off[int(f)]  # never the tables
    # all absent: the punched ranges cover every data block that lies before the tables' block
    freed = set()
    live = np.ones(n, dtype=bool)
    for u in range(n):
        live[u] = False
        lo, hi = unit_punch_range(u, ufile, ustart, uend, lambda v: bool(live[v]))
        freed |= {(int(ufile[u]), b) for b in range(lo, hi, 4096)}
    for f, t in table_off.items():
        want = {(f, b) for b in range(4096, F.align_down(t), 4096)}
        assert want <= freed


# -- host decode pool: a group's chunks read as coalesced runs --------------------------------------
def test_loader_host_decode_reads_groups_as_aligned_runs(tmp_path, monkeypatch):
    from llmio_native.loader import pipeline

    tokens = text_like(40_000, 3000, 12, "uint16")
    write(tmp_path / "d", tokens, "rans1", version=2, chunk_tokens=1000, rans_model_tokens=20_000)
    ds = lio.open_dataset(tmp_path / "d")
    requests: list[tuple[int, int, int]] = []

    class SpyReader(pipeline.Reader):
        def read_batch_into(self, reqs):
            reqs = list(reqs)
            requests.extend((int(f), int(o), memoryview(b).nbytes) for f, o, b in reqs)
            return super().read_batch_into(reqs)

    monkeypatch.setattr(pipeline, "Reader", SpyReader)
    T = 64
    loader = lio.TokenLoader(str(tmp_path / "d"), batch_size=4, seq_len=T, device="cpu", seed=3, num_threads=2)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T)[::T]
    it = iter(loader)
    for _ in range(6):
        x, y = next(it)
        for row_x, row_y in zip(x.numpy(), y.numpy()):  # every row is a window of the stream
            s = int(np.flatnonzero(np.all(windows == row_x, axis=1))[0])
            np.testing.assert_array_equal(row_y, tokens[s * T + 1:s * T + T + 1])
    del it
    assert requests, "the host decode path read no group in one batch"
    # each request is an aligned run (the last may stop at EOF) holding several packed chunks
    assert all(o % 4096 == 0 for _, o, _ in requests)
    assert all(n % 4096 == 0 or o + n == os.path.getsize(ds.paths[f]) for f, o, n in requests)
    covered = sum(
        int(((ds.chunks["file"] == f) & (ds.chunks["offset"] >= o)
             & (ds.chunks["offset"] + ds.chunks["stored_bytes"] <= o + n)).sum()) for f, o, n in requests)
    assert covered > len(requests)


def test_gpu_staging_short_read_names_the_chunk(tmp_path):
    tokens = text_like(20_000, 3000, 13, "uint16")
    write(tmp_path / "d", tokens, "rans", version=2, chunk_tokens=1000)
    ds = lio.open_dataset(tmp_path / "d")
    c = ds.chunks[7]
    off, n = int(c["offset"]), int(c["stored_bytes"])
    st = plan_group_staging(ds, [5, 6, 7, 8])
    os.truncate(ds.paths[0], off + 10)
    buf = lio.io.empty_aligned(st.staging_bytes)
    # the reader was open before the cut: the engine names the block it read, we add the chunk
    with pytest.raises(lio.ShortReadError, match=rf"shard-00000.lio @ \d+ \(\+\d+\): unexpected end of file.* "
                                                 rf"\(reading .*shard-00000.lio chunk 7 \(dataset chunk 7\) @ offset {off}\)"):
        fill_staging(ds, st, buf, ds.reader.read_batch_into)
