"""Writing datasets to object storage (issue 13, the writing half): ``DatasetWriter("s3://...")``,
``llmio pack -o s3://...`` and ``TokenLoader(cache_dir=...)`` for URL sources.

Against moto's S3 server on 127.0.0.1 (tests/remote_servers.py), with the fault proxy of
tests/remote_proxy.py in front where the order of requests or failures matter. Skips
where moto or obstore are absent.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import llmio_native as lio
from llmio_native.dataset.manifest import is_shard_name

sys.path.insert(0, os.path.dirname(__file__))
from remote_proxy import FaultProxy  # noqa: E402
from remote_servers import aws_env, make_bucket, s3_server  # noqa: E402,F401

obstore = pytest.importorskip("obstore", reason="obstore not installed (pip install obstore)")

from llmio_native.remote import RemoteError, RemoteNotFoundError, open_source  # noqa: E402
from llmio_native.remote import upload as upload_mod  # noqa: E402
from llmio_native.remote.dataset import cache_root  # noqa: E402
from llmio_native.remote.store import ObjectSource, UploadCancelled  # noqa: E402

BUCKET = "llmio-write"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def bucket(s3_server):
    make_bucket(s3_server.url, BUCKET)
    return BUCKET


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.url)
    yield p
    p.stop()


def so(endpoint, **kw):
    o = {"endpoint": endpoint, "timeout": 20.0, "retries": 3, "retry_base": 0.01, "retry_cap": 0.05}
    o.update(kw)
    return o


def make_docs(seed=3, n=300, vocab=60000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(0, 3000)), dtype=np.uint16) for _ in range(n)]


DOCS = make_docs()
SHARD_TOKENS = 90_000  # about 5 shards of the 450k tokens of DOCS


def write(out, docs=DOCS, codec="none", shard_tokens=SHARD_TOKENS, **kw):
    with lio.DatasetWriter(out, codec=codec, chunk_tokens=4096, shard_tokens=shard_tokens, eot_token=7,
                           metadata={"k": 1}, **kw) as w:
        for d in docs:
            w.add_document(d)
    return w


def keys(src):
    return sorted(k for k, _ in src.list())


# -- round trip ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "zstd", "rans", "rans1"])
def test_round_trip_is_bit_exact(bucket, s3_server, tmp_path, codec):
    url = f"s3://{bucket}/rt-{codec}"
    local = tmp_path / "local"
    write(local, codec=codec)
    w = write(url, codec=codec, storage_options=so(s3_server.url), staging_dir=tmp_path / "stage")
    assert w.url == url and not os.path.exists(w.path)  # the staging directory is gone
    assert os.listdir(tmp_path / "stage") == []
    src = open_source(url, so(s3_server.url))
    names = sorted(os.listdir(local))
    assert keys(src) == names and len([n for n in names if n.endswith(".lio")]) >= 4
    for n in names:  # every object byte for byte the local writer's file
        assert src.read(n) == (local / n).read_bytes(), n
    ds = lio.open_dataset(url, cache_dir=tmp_path / "cache", storage_options=so(s3_server.url))
    ref = lio.open_dataset(str(local))
    assert (ds.num_tokens, ds.num_documents, ds.codec, ds.eot_token) == (ref.num_tokens, ref.num_documents, codec, 7)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), np.concatenate(DOCS))
    for i in (0, 1, 150, len(DOCS) - 1):
        np.testing.assert_array_equal(ds.document(i), DOCS[i])
    a = lio.TokenLoader(str(local), batch_size=2, seq_len=200, seed=9, steps=20)
    b = lio.TokenLoader(ds, batch_size=2, seq_len=200, seed=9, steps=20, prefetch=2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_multipart_shard_and_tokenizer(bucket, proxy, tmp_path):
    """A shard above the 16 MiB multipart threshold (a failing part is retried alone, not the
    whole upload), and tokenizer.json uploaded with it."""
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, 65535, 3_000_000, dtype=np.uint16) for _ in range(3)]  # one 18 MB shard
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "not really"}')
    url = f"s3://{bucket}/multipart"
    proxy.inject("503", count=2, match="shard-00000.lio?partNumber=2&")
    write(url, docs=docs, shard_tokens=1 << 30, storage_options=so(proxy.url), tokenizer=tok)
    log = [(m, p) for m, p, _ in proxy.log if "shard-00000.lio" in p]
    assert proxy.faults == 2
    assert sum(m == "POST" and "?uploads" in p for m, p in log) == 1  # one multipart upload, not restarted
    assert sum(m == "PUT" and "partNumber=2&" in p for m, p in log) == 3  # that part: two 503s, then stored
    assert sum(m == "PUT" and "partNumber=" in p for m, p in log) == 4 + 2
    src = open_source(url, so(proxy.url))
    listing = dict(src.list())
    assert listing["shard-00000.lio"] > 16 << 20
    assert src.info("shard-00000.lio").etag.endswith('-4')  # a multipart ETag: 4 parts (quotes stripped)
    assert src.read("tokenizer.json") == tok.read_bytes()
    ds = lio.open_dataset(url, cache_dir=tmp_path / "c", storage_options=so(proxy.url))
    assert ds.manifest["tokenizer"] == "tokenizer.json"
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), np.concatenate(docs))


# -- ordering ------------------------------------------------------------------------------------------------
def test_manifest_is_uploaded_last_and_staging_is_bounded(bucket, proxy, tmp_path, monkeypatch):
    url = f"s3://{bucket}/order"
    seen = []  # (key about to be uploaded, the prefix's listing then, shard files staged then)
    real_put = upload_mod.ShardUploader._put

    def spy(self, name, path):
        staged = [n for n in os.listdir(self.staging) if is_shard_name(n)]
        seen.append((name, keys(self.src), staged))
        return real_put(self, name, path)

    monkeypatch.setattr(upload_mod.ShardUploader, "_put", spy)
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    write(url, storage_options=so(proxy.url), shard_tokens=40_000, tokenizer=tok)
    shards = [n for n, _, _ in seen if is_shard_name(n)]
    assert len(shards) >= 8
    tail = ["tokenizer.json", "index.lio", "manifest.json"]
    assert [n for n, _, _ in seen] == shards + tail
    for i, (name, listing, staged) in enumerate(seen[:-1]):
        assert "manifest.json" not in listing, f"manifest visible before {name} was uploaded"
        assert listing == sorted(shards[:i] if is_shard_name(name) else shards + tail[:tail.index(name)])
        assert len(staged) <= upload_mod.MAX_STAGED
    # every shard and the index there before the manifest
    assert seen[-1][1] == sorted(shards + ["tokenizer.json", "index.lio"])
    # on the wire: after the manifest's PUT, only its check (HEAD) and nothing else
    log = [(m, p) for m, p, _ in proxy.log]
    puts = [i for i, (m, p) in enumerate(log) if m == "PUT"]
    assert log[puts[-1]] == ("PUT", f"/{bucket}/order/manifest.json")
    assert [m for m, _ in log[puts[-1] + 1:]] == ["HEAD"]


def test_empty_dataset(bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/empty"
    w = lio.DatasetWriter(url, storage_options=so(s3_server.url))
    w.close()
    assert keys(open_source(url, so(s3_server.url))) == ["index.lio", "manifest.json"]
    ds = lio.open_dataset(url, cache_dir=tmp_path / "c", storage_options=so(s3_server.url))
    assert (ds.num_tokens, ds.num_documents) == (0, 0)


def test_http_output_is_refused(tmp_path):
    for url in ("http://127.0.0.1:9/ds", "https://example.com/ds"):
        with pytest.raises(ValueError, match="read-only"):
            lio.DatasetWriter(url)
    with pytest.raises(ValueError, match="for URL outputs"):
        lio.DatasetWriter(tmp_path / "d", storage_options={"endpoint": "x"})


# -- existing datasets ---------------------------------------------------------------------------------------
def test_existing_and_incomplete_datasets_are_refused(bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/exists"
    write(url, storage_options=so(s3_server.url))
    with pytest.raises(FileExistsError, match="already exists") as ei:
        lio.DatasetWriter(url, storage_options=so(s3_server.url))
    assert ei.value.filename == f"{url}/manifest.json"
    src = open_source(url, so(s3_server.url))
    src.delete(["manifest.json"])  # as a writer killed before its commit leaves it
    with pytest.raises(FileExistsError, match="incomplete dataset") as ei:
        lio.DatasetWriter(url, storage_options=so(s3_server.url))
    assert ei.value.filename == url
    # objects beside the dataset prefix are no dataset of it
    other = open_source(f"s3://{bucket}/exists-not", so(s3_server.url))
    assert other.list() == []
    lio.DatasetWriter(f"s3://{bucket}/exists-not", storage_options=so(s3_server.url)).abort()


def test_overwrite_deletes_the_old_manifest_first(bucket, proxy, tmp_path, monkeypatch):
    url = f"s3://{bucket}/over"
    write(url, storage_options=so(proxy.url))
    old = keys(open_source(url, so(proxy.url)))
    calls = []  # (keys deleted by one call, the prefix's listing just before it)
    real_delete = ObjectSource.delete

    def spy(self, ks):
        calls.append((list(ks), keys(self)))
        return real_delete(self, ks)

    monkeypatch.setattr(ObjectSource, "delete", spy)
    proxy.clear()
    small = DOCS[:20]
    w = lio.DatasetWriter(url, chunk_tokens=4096, overwrite=True, storage_options=so(proxy.url))
    shards = [k for k in old if k != "manifest.json"]
    assert len(shards) >= 4 and "manifest.json" in old
    assert calls == [(["manifest.json"], old), (shards, shards)]  # the manifest gone before any shard
    assert [m for m, _, _ in proxy.log if m in ("DELETE", "POST")] == ["POST"] * len(old)  # one request per key
    assert keys(open_source(url, so(proxy.url))) == []  # nothing old left before the first new shard
    for d in small:
        w.add_document(d)
    w.close()
    ds = lio.open_dataset(url, cache_dir=tmp_path / "c", storage_options=so(proxy.url))
    assert ds.num_documents == 20 and len(ds.paths) == 1
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), np.concatenate(small))


# -- failures -----------------------------------------------------------------------------------------------
def test_abort_and_exceptions_upload_no_manifest(bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/aborted"
    src = open_source(url, so(s3_server.url))
    stage = tmp_path / "stage"
    with pytest.raises(KeyError):
        with lio.DatasetWriter(url, chunk_tokens=4096, shard_tokens=SHARD_TOKENS, storage_options=so(s3_server.url),
                               staging_dir=stage) as w:
            for d in DOCS:
                w.add_document(d)
            raise KeyError("boom")
    assert os.listdir(stage) == []  # staged shards removed
    listing = keys(src)
    assert "manifest.json" not in listing and len(listing) >= 3  # finished shards stay: an incomplete dataset
    with pytest.raises(RemoteNotFoundError, match="no manifest.json"):
        lio.open_dataset(url, cache_dir=tmp_path / "c", storage_options=so(s3_server.url))
    w = lio.DatasetWriter(url, chunk_tokens=4096, shard_tokens=SHARD_TOKENS, overwrite=True,
                          storage_options=so(s3_server.url), staging_dir=stage)
    for d in DOCS[:100]:
        w.add_document(d)
    w.abort()
    w.abort()
    assert "manifest.json" not in keys(src) and os.listdir(stage) == []
    with pytest.raises(ValueError, match=f"DatasetWriter for {url} was aborted"):
        w.close()


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_upload_failure_names_the_url_and_commits_nothing(bucket, s3_server, tmp_path, fault):
    px = FaultProxy(s3_server.url)
    try:
        url = f"s3://{bucket}/fail-{fault}"
        px.inject(fault, count=10_000, match=f"PUT /{bucket}/fail-{fault}/shard-00002.lio")
        stage = tmp_path / "stage"
        with pytest.raises(RemoteError) as ei:
            write(url, storage_options=so(px.url, retries=2), staging_dir=stage)
        e = ei.value
        assert e.url == f"{url}/shard-00002.lio" and f"{url}/shard-00002.lio" in str(e)
        assert "failed after 3 tries" in str(e) and e.tries == 3
        assert px.faults == 3
        listing = keys(open_source(url, so(s3_server.url)))
        assert listing == ["shard-00000.lio", "shard-00001.lio"]  # no manifest, nothing after the failure
        assert os.listdir(stage) == []
    finally:
        px.stop()


class _SetAfter(threading.Event):
    """An event that reads as set from its ``n``-th ``is_set()`` on (a cancel mid-upload)."""

    def __init__(self, n):
        super().__init__()
        self.calls, self.n = 0, n

    def is_set(self):
        self.calls += 1
        return self.calls >= self.n


def test_cancelled_multipart_upload_leaves_no_object(bucket, s3_server, tmp_path):
    import boto3

    big = tmp_path / "big"
    big.write_bytes(os.urandom(40 << 20))  # 5 pieces of 8 MiB
    src = open_source(f"s3://{bucket}/cancel", so(s3_server.url))
    ev = _SetAfter(4)  # put() checks once, then before each piece: cancelled before the third
    with pytest.raises(UploadCancelled):
        src.put("big", str(big), ev)
    assert ev.calls == 4
    assert src.list() == []
    c = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    assert not c.list_multipart_uploads(Bucket=bucket).get("Uploads")  # the multipart upload was aborted
    info = src.put("big", str(big), threading.Event())
    assert info.size == 40 << 20 and src.info("big").etag == info.etag


_SIGINT_SCRIPT = r"""
import os, sys, numpy as np, llmio_native as lio
url, endpoint, stage = sys.argv[1:4]
rng = np.random.default_rng(1)
w = lio.DatasetWriter(url, chunk_tokens=4096, shard_tokens=50_000, staging_dir=stage,
                      storage_options={"endpoint": endpoint})
with w:
    for i in range(10_000):
        w.add_document(rng.integers(0, 60000, 1000, dtype=np.uint16))
        if w.num_shards == 4 and not os.path.exists(stage + "/ready"):
            open(stage + "/ready", "w").close()
            print("ready", flush=True)
            sys.stdin.readline()  # the parent sends SIGINT now
print("finished", flush=True)
"""


def test_sigint_uploads_no_manifest_and_removes_staging(bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/sigint"
    stage = tmp_path / "stage"
    stage.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(lio.__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-c", _SIGINT_SCRIPT, url, s3_server.url, str(stage)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "KeyboardInterrupt" in err and "finished" not in out
    assert os.listdir(stage) == ["ready"]  # the writer's staging directory is gone
    listing = keys(open_source(url, so(s3_server.url)))
    assert "manifest.json" not in listing and listing[:3] == ["shard-00000.lio", "shard-00001.lio", "shard-00002.lio"]


# -- llmio pack -o s3:// ------------------------------------------------------------------------------------
def _corpus_text(tmp_path, nchars):
    """The first ``nchars`` characters of the shared corpus as ``tmp_path/in.txt``, for ``llmio
    pack`` (skips where the tokenizers package is absent)."""
    pytest.importorskip("tokenizers", reason="llmio pack needs the tokenizers package")
    text = tmp_path / "in.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:nchars], encoding="utf-8")
    return text


def _pack(args, endpoint, tmp):
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, LLMIO_CACHE_DIR=str(tmp / "llmio-cache"), TMPDIR=str(tmp))
    env["PYTHONPATH"] = str(Path(lio.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "llmio_native.cli", "pack", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(not CORPUS.exists(), reason=f"the corpus {CORPUS} is absent")
def test_pack_to_s3_end_to_end(bucket, s3_server, tmp_path):
    text = _corpus_text(tmp_path, 300_000)
    url = f"s3://{bucket}/packed"
    common = [str(text), "--train-bpe", "400", "--doc-sep", "blank", "--codec", "zstd", "--shard-tokens", "30000",
              "--chunk-tokens", "4096", "--num-workers", "1"]
    r = _pack([*common, "-o", str(tmp_path / "local"), "-q"], s3_server.url, tmp_path)
    assert r.returncode == 0, r.stderr
    r = _pack([*common, "-o", url], s3_server.url, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"into {url} in" in r.stdout and "shard(s)" in r.stdout
    assert os.listdir(tmp_path / "llmio-cache") == []  # staged there, nothing left
    src = open_source(url, so(s3_server.url))
    local = tmp_path / "local"
    assert keys(src) == sorted(os.listdir(local)) and "tokenizer.json" in keys(src)
    for n in os.listdir(local):  # shards, tokenizer and manifest byte for byte those of the local pack
        assert src.read(n) == (local / n).read_bytes(), n
    # an existing dataset is refused, --overwrite replaces it
    r = _pack([*common, "-o", url, "-q"], s3_server.url, tmp_path)
    assert r.returncode == 1 and f"{url} already holds a dataset" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    src.delete(["manifest.json"])
    r = _pack([*common, "-o", url, "-q"], s3_server.url, tmp_path)
    assert r.returncode == 1 and "incomplete dataset" in r.stderr and "shard/temp object(s)" in r.stderr
    r = _pack([*common, "-o", url, "-q", "--overwrite"], s3_server.url, tmp_path)
    assert r.returncode == 0, r.stderr
    ds = lio.open_dataset(url, cache_dir=tmp_path / "c", storage_options=so(s3_server.url))
    assert ds.num_tokens == lio.open_dataset(str(local)).num_tokens
    r = _pack([*common, "-o", "https://example.com/x", "-q"], s3_server.url, tmp_path)
    assert r.returncode == 1 and "read-only" in r.stderr


@pytest.mark.skipif(not CORPUS.exists(), reason=f"the corpus {CORPUS} is absent")
def test_pack_upload_failure_is_one_line_naming_the_object(bucket, s3_server, tmp_path):
    text = _corpus_text(tmp_path, 200_000)
    url = f"s3://{bucket}/cli-fail"
    px = FaultProxy(s3_server.url)
    try:
        px.inject("503", count=10_000, match=f"PUT /{bucket}/cli-fail/shard-00001.lio")
        r = _pack([str(text), "--train-bpe", "300", "--doc-sep", "blank", "--shard-tokens", "20000", "--num-workers",
                   "1", "-o", url, "-q"], px.url, tmp_path)
    finally:
        px.stop()
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{url}/shard-00001.lio" in err and "failed after 6 tries" in err  # the default: 5 retries
    assert keys(open_source(url, so(s3_server.url))) == []  # shard-00000 was uploaded, then deleted
    assert os.listdir(tmp_path / "llmio-cache") == []


def test_failed_pack_to_s3_deletes_its_uploads(bucket, s3_server, tmp_path, monkeypatch):
    pytest.importorskip("tokenizers", reason="llmio pack needs the tokenizers package")
    from llmio_native import pack as pack_lib
    from llmio_native.pack import PackError, pack

    tok = str(tmp_path / "tokenizer.json")
    pack_lib.train_bpe(["some words of the text, line after line"] * 10, 300, tok)
    good = tmp_path / "a.jsonl"  # more than one encoding batch: shards are uploaded before the bad line
    good.write_text("".join(json.dumps({"text": f"line {i} of the text " * 60}) + "\n" for i in range(7000)))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    url = f"s3://{bucket}/failed-pack"
    uploaded = []
    real_put = upload_mod.ShardUploader._put
    monkeypatch.setattr(upload_mod.ShardUploader, "_put", lambda self, n, p: uploaded.append(n) or real_put(self, n, p))
    with pytest.raises(PackError, match="b.jsonl:2"):
        pack([str(good), str(bad)], url, tokenizer=tok, shard_tokens=20_000, chunk_tokens=1024, num_workers=1,
             storage_options=so(s3_server.url))
    assert len(uploaded) >= 3 and "manifest.json" not in uploaded
    assert keys(open_source(url, so(s3_server.url))) == []  # the pack deleted what it had uploaded


# -- TokenLoader(cache_dir=...) -----------------------------------------------------------------------------
def test_token_loader_cache_dir_and_storage_options(bucket, s3_server, tmp_path, monkeypatch):
    url = f"s3://{bucket}/loader"
    write(url, codec="zstd", storage_options=so(s3_server.url))
    env_cache = tmp_path / "env-cache"
    env_cache.mkdir()
    monkeypatch.setenv("LLMIO_CACHE_DIR", str(env_cache))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint comes from storage_options only
    local = tmp_path / "local"
    write(local, codec="zstd")
    cdir = tmp_path / "mine"
    a = lio.TokenLoader(str(local), batch_size=2, seq_len=256, seed=2, steps=30)
    b = lio.TokenLoader(url, batch_size=2, seq_len=256, seed=2, steps=30, prefetch=2, cache_dir=cdir,
                        cache_bytes=1 << 22, storage_options=so(s3_server.url))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    root = cache_root(str(cdir), url)
    assert os.path.isfile(os.path.join(root, "manifest.json")) and os.listdir(env_cache) == []
    assert b.datasets[0].remote.cache_bytes == 1 << 22
    with pytest.raises(ValueError, match="cache_bytes"):
        lio.TokenLoader(url, cache_dir=cdir, cache_bytes=0, storage_options=so(s3_server.url))
