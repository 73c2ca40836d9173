"""The peer rows of benchmarks/bench_remote.py (``--peers``): optional, skipped with a reason when a
peer is missing, never hanging on a stuck peer, and (where litdata / MosaicML Streaming are
installed) converting and streaming the same tokens through the proxy that counts their bytes."""
from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmio_native

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import remote_peers  # noqa: E402

# subprocesses import the installed package, not the source tree
ENV = {**os.environ, "PYTHONPATH": str(Path(llmio_native.__file__).parents[1])}


def test_unknown_peer_is_refused_by_name():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_remote.py"), "--peers", "litdata,webdataset"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2
    assert "unknown peer 'webdataset'" in r.stderr and "litdata, streaming" in r.stderr


def test_missing_peer_gives_the_import_error(tmp_path):
    # a python without the peer: a stand-in that fails to import it as a bare interpreter would
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named '$4'\" >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    why = remote_peers.available("litdata", str(fake))
    assert why == "ModuleNotFoundError: No module named 'litdata'"
    why = remote_peers.available("streaming", str(tmp_path / "no-such-python"))
    assert why.startswith(f"cannot run {tmp_path / 'no-such-python'}: ") and "No such file" in why
    with pytest.raises(ValueError, match="unknown peer 'ffcv'"):
        remote_peers.available("ffcv")


def test_failed_peer_keeps_its_epochs_and_error(tmp_path):
    """A peer child that finishes an epoch and then dies: the epoch and its exception line are kept."""

    class Proxy:
        url = "http://127.0.0.1:9"
        body_bytes, requests = 4096, 3

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    "echo 'PEER {\"event\": \"first_batch\", \"s\": 0.5}'\n"
                    "echo 'PEER {\"event\": \"epoch_end\", \"epoch\": 1, \"s\": 2.0, \"batches\": 7}'\n"
                    "read ack\n"
                    "echo 'Traceback (most recent call last):' >&2\necho 'KeyError: 6' >&2\n"
                    "echo '  warnings.warn(leaked semaphore)' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(remote_peers.PeerError, match="exited with status 1") as ei:
        remote_peers.run_peer("litdata", str(fake), Proxy(), "s3://b/x", str(tmp_path / "c"), 1 << 20, 2, 8, 1, 2,
                              timeout=60.0)
    assert ei.value.summary == "KeyError: 6"
    (ep,) = ei.value.partial["epochs"]
    assert ep["epoch"] == 1 and ep["batches"] == 7 and ep["proxy_bytes"] == 0 and ep["requests"] == 0
    assert ei.value.partial["first_batch_s"] == 0.5


def test_stuck_peer_is_killed_and_named(tmp_path):
    """A peer child that never reports is killed (its whole process group) after the timeout."""

    class Proxy:
        url = "http://127.0.0.1:9"
        body_bytes = requests = 0

    fake = tmp_path / "python"
    pidfile = tmp_path / "grandchild.pid"
    # the child starts a grandchild (as DataLoader workers are)
    fake.write_text(f"#!/bin/sh\nsleep 600 >/dev/null &\necho $! > {pidfile}\nsleep 600\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(remote_peers.PeerError, match=r"(?s)litdata stream run .*killed: ran past 1 s") as ei:
        remote_peers.run_peer("litdata", str(fake), Proxy(), "s3://b/x", str(tmp_path / "c"), 1 << 20, 2, 8, 1, 1,
                              timeout=1.0)
    assert ei.value.summary == "killed: ran past 1 s" and ei.value.partial["epochs"] == []
    pid = int(pidfile.read_text())
    # the grandchild went with the group (a zombie at most, until init reaps it)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        state = "gone"
    if state not in ("gone", "Z"):
        os.kill(pid, 9)
    assert state in ("gone", "Z"), state


@pytest.mark.parametrize("peer", remote_peers.PEERS)
def test_peer_streams_through_the_proxy(tmp_path, peer):
    if importlib.util.find_spec(peer if peer == "litdata" else "streaming") is None:
        pytest.skip(f"{peer} not installed (give it a venv of its own, see bench_remote.py)")
    pytest.importorskip("moto")
    sys.path.insert(0, str(ROOT / "tests"))
    from remote_proxy import FaultProxy
    from remote_servers import S3_ENV, Missing, make_bucket, start_moto

    os.environ.update(S3_ENV)
    n, T, B = 40_000, 64, 4
    raw = tmp_path / "t.u16"
    np.random.default_rng(0).integers(0, 50257, n, dtype=np.uint16).tofile(raw)
    try:
        srv = start_moto()
    except Missing as exc:
        pytest.skip(str(exc))
    px = FaultProxy(srv.url)
    try:
        make_bucket(srv.url, "bench")
        conv = remote_peers.convert_upload(peer, sys.executable, str(raw), str(tmp_path / "src"), T, 8192, srv.url,
                                           "bench", peer)
        assert px.body_bytes == 0  # the upload went straight to the server
        # the converted data holds every token once (Streaming: each window's boundary token twice)
        assert conv["bytes"] >= 2 * n and conv["files"] >= 2
        res = remote_peers.run_peer(peer, sys.executable, px, f"s3://bench/{peer}", str(tmp_path / "cache"),
                                    8 * conv["bytes"], B, T, 1, 2, timeout=600)
    finally:
        px.stop()
        srv.stop()
    windows = n // (T + 1) if peer == "litdata" else (n - 1) // T
    e1, e2 = res["epochs"]
    assert e1["batches"] == e2["batches"] == windows // B
    # cold, cache >= data: each byte of the converted data crosses the proxy once (index included;
    # a few hundred bytes of listings or error bodies on top); epoch 2 is served by the cache
    assert conv["bytes"] <= e1["proxy_bytes"] <= conv["bytes"] + 4096
    assert e2["proxy_bytes"] == 0
    assert res["first_batch_s"] > 0 and 0 < res["first_batch_bytes"] <= e1["proxy_bytes"]
