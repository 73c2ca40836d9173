"""index.lio: every shard's header and tables in one file (what a remote reader opens from).

The remote side (two requests at open whatever the shard count, a damaged or missing index
falling back to the shards) is in test_remote.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import llmio_native as lio
from llmio_native.dataset import format as F
from llmio_native.dataset import index as index_mod
from llmio_native.dataset import writer as writer_mod
from llmio_native.dataset.index import IndexWriter, check_index, load_index, parse_index, rebuild_index
from llmio_native.dataset.manifest import read_manifest


def _write(d: Path, codec: str = "none", docs: int = 60, doc_len: int = 700, **kw) -> str:
    rng = np.random.default_rng(5)
    with lio.DatasetWriter(d, codec=codec, chunk_tokens=1024, shard_tokens=9000, **kw) as w:
        for i in range(docs):
            w.add_document(rng.integers(0, 50000, doc_len + (i * 37) % 300, dtype=np.uint16))
    return str(d)


@pytest.mark.parametrize("codec", ["none", "zstd", "rans", "rans1"])
def test_index_holds_each_shard_header_and_tables_byte_for_byte(tmp_path, codec):
    d = _write(tmp_path / "d", codec)
    man = read_manifest(d)
    assert man.index is not None and man.index["name"] == "index.lio"
    data = Path(d, "index.lio").read_bytes()
    assert man.index["bytes"] == len(data)
    recs = load_index(data, man.index, man.shards, "index.lio")
    assert [r.name for r in recs] == [s.name for s in man.shards] and len(recs) >= 5
    for r in recs:
        shard = Path(d, r.name).read_bytes()
        assert r.bytes == len(shard)
        assert r.header == shard[:F.HEADER_BYTES]
        assert bytes(r.tables) == shard[len(shard) - len(r.tables):]
        assert F.unpack_header(r.header, r.name)["table_offset"] == len(shard) - len(r.tables)


def test_index_covers_spilled_document_index(tmp_path, monkeypatch):
    """A shard whose document ends spilled to a side file: the index holds them all."""
    monkeypatch.setattr(writer_mod, "DOC_SPILL_ENTRIES", 4)
    d = _write(tmp_path / "d", docs=40, doc_len=50)
    man = read_manifest(d)
    recs = load_index(Path(d, "index.lio").read_bytes(), man.index, man.shards, "index.lio")
    ds = lio.open_dataset(d)
    ends = np.concatenate([np.frombuffer(bytes(r.tables), dtype=np.uint64,
                                         offset=int(F.unpack_header(r.header, "")["num_chunks"]) * 48)
                           + np.uint64(sum(s.num_tokens for s in man.shards[:i])) for i, r in enumerate(recs)])
    assert ends.tolist() == ds.document_ends.tolist() and len(ends) == 40


def test_empty_dataset_has_an_empty_index(tmp_path):
    with lio.DatasetWriter(tmp_path / "e"):
        pass
    man = read_manifest(str(tmp_path / "e"))
    assert load_index(Path(tmp_path, "e", "index.lio").read_bytes(), man.index, [], "e") == []


def test_any_damage_to_the_index_is_refused(tmp_path):
    """Every truncation point and random byte flips: load_index raises FormatError naming
    the file; it never returns records."""
    d = _write(tmp_path / "d", docs=20)
    man = read_manifest(d)
    data = Path(d, "index.lio").read_bytes()
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(0, len(data), 60).tolist()) | {0, 1, len(data) - 1}):
        with pytest.raises(lio.FormatError, match="idx"):
            load_index(data[:cut], man.index, man.shards, "idx")
    for _ in range(200):
        b = bytearray(data)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        with pytest.raises(lio.FormatError, match="idx"):
            load_index(bytes(b), man.index, man.shards, "idx")
    # parse_index alone (no manifest) also catches a flip by its footer checksum
    b = bytearray(data)
    b[100] ^= 4
    with pytest.raises(lio.FormatError, match="index checksum mismatch"):
        parse_index(bytes(b), "idx")


def test_stale_index_of_another_version_is_refused(tmp_path):
    """An index intact in itself but written for another version of the dataset (same shard
    names and sizes): check_index names the record whose header checksum differs."""
    a = _write(tmp_path / "a")
    b = str(tmp_path / "b")
    rng = np.random.default_rng(9)  # same shape, other tokens
    with lio.DatasetWriter(b, chunk_tokens=1024, shard_tokens=9000) as w:
        for i in range(60):
            w.add_document(rng.integers(0, 50000, 700 + (i * 37) % 300, dtype=np.uint16))
    ma, mb = read_manifest(a), read_manifest(b)
    assert [s.bytes for s in ma.shards] == [s.bytes for s in mb.shards]
    recs = parse_index(Path(a, "index.lio").read_bytes(), "a/index.lio")
    with pytest.raises(lio.FormatError, match=r"record 0 \(shard-00000.lio\): header checksum"):
        check_index(recs, mb.shards, "a/index.lio")
    # and against the manifest's own entry: the XXH3 differs
    with pytest.raises(lio.FormatError, match="manifest.json says"):
        load_index(Path(a, "index.lio").read_bytes(), mb.index, mb.shards, "a/index.lio")


def test_verify_reports_a_damaged_or_missing_index_and_reads_stay_correct(tmp_path):
    d = _write(tmp_path / "d")
    want = lio.open_dataset(d).read(0, 20000)
    assert lio.open_dataset(d).verify().ok
    p = Path(d, "index.lio")
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))
    ds = lio.open_dataset(d)  # local reads never use the index
    np.testing.assert_array_equal(ds.read(0, 20000), want)
    rep = ds.verify()
    assert not rep.ok and [(x.path, x.chunk) for x in rep.bad_chunks] == [(str(p), -1)]
    assert "manifest.json says" in rep.bad_chunks[0].reason
    p.unlink()
    rep = lio.open_dataset(d).verify()
    assert not rep.ok and "cannot read the index" in rep.bad_chunks[0].reason


def test_index_writer_refuses_misuse(tmp_path):
    w = IndexWriter(str(tmp_path))
    w.begin("shard-00000.lio", 5000, 10)
    with pytest.raises(ValueError, match="11 bytes of tables given, 10 expected"):
        w.tables(b"x" * 11)
    w.tables(b"y" * 4)
    with pytest.raises(ValueError, match="missing 6 bytes"):
        w.end(bytes(F.HEADER_BYTES))
    with pytest.raises(ValueError, match="the previous record was not ended"):
        w.begin("shard-00001.lio", 5000, 10)
    w.close()
    assert os.path.exists(tmp_path / index_mod.INDEX_TMP_NAME) and not os.path.exists(tmp_path / "index.lio")


def test_aborted_writer_leaves_no_index_and_overwrite_cleans_the_temp(tmp_path):
    d = tmp_path / "d"
    w = lio.DatasetWriter(d, chunk_tokens=1024, shard_tokens=3000)
    for _ in range(3):  # two shards finished, the third open
        w.add_document(np.arange(3000, dtype=np.uint16))
    w.abort()
    names = sorted(os.listdir(d))
    assert "index.lio" not in names and ".index.lio.tmp" in names and "manifest.json" not in names
    _write(d, overwrite=True)
    assert ".index.lio.tmp" not in os.listdir(d) and read_manifest(str(d)).index is not None


def test_manifest_index_entry_is_checked(tmp_path):
    d = _write(tmp_path / "d", docs=10)
    mp = Path(d, "manifest.json")
    good = json.loads(mp.read_text())
    for bad, msg in [({"name": "../x", "bytes": 1, "checksum": 1}, "index: name must be a file name"),
                     ({"name": "index.lio", "bytes": -1, "checksum": 1}, "index: field 'bytes' is negative"),
                     ({"name": "index.lio", "checksum": 1}, "index: missing field 'bytes'")]:
        mp.write_text(json.dumps(dict(good, index=bad)))
        with pytest.raises(lio.FormatError, match=msg):
            lio.open_dataset(d)
    mp.write_text(json.dumps(dict(good, index=None)))  # a dataset written before the index: fine
    assert lio.open_dataset(d).verify().ok


def test_rebuild_index_for_a_dataset_without_one(tmp_path):
    """A dataset written before the index existed (no index.lio, "index" absent) gets one
    equal to what the writer writes; every other manifest field is kept as it was."""
    d = _write(tmp_path / "d", codec="zstd")
    want = Path(d, "index.lio").read_bytes()
    mp = Path(d, "manifest.json")
    old = json.loads(mp.read_text())
    del old["index"]
    old["extra_field"] = 1
    mp.write_text(json.dumps(old))
    os.unlink(Path(d, "index.lio"))
    entry = rebuild_index(d)
    assert Path(d, "index.lio").read_bytes() == want
    new = json.loads(mp.read_text())
    assert new["index"] == entry and {k: v for k, v in new.items() if k != "index"} == old
    assert lio.open_dataset(d).verify().ok
