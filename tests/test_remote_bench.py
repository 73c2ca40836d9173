"""benchmarks/bench_remote.py runs at a tiny size (so it does not rot) and its JSON holds
what it printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("obstore", reason="obstore not installed")
pytest.importorskip("moto", reason="moto not installed")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_remote.py"


def test_bench_remote_smoke(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--tokens", "400000", "--chunk-tokens", "4096", "--shard-tokens", "150000",
         "--batch-size", "2", "--seq-len", "64", "--latency", "0.001", "--cap-mbs", "400", "--epochs", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "half, future, ep2" in r.stdout and "half, LRU, ep2" in r.stdout
    res = json.loads(out.read_text())
    cold = res["cold"]["epochs"][0]
    # a cache larger than the data fetches each chunk once: read amplification 1
    assert cold["fetched_bytes"] == res["data_bytes"] and res["read_amplification"] == 1.0
    fut, lru = res["half_future"]["epochs"][-1], res["half_lru"]["epochs"][-1]
    for run in (fut, lru):
        assert run["max_used"] <= run["bound"] and 0 < run["hit_rate"] < 1
    assert fut["hit_rate"] > lru["hit_rate"]
    assert res["hit_rate_ratio"] == pytest.approx(fut["hit_rate"] / lru["hit_rate"])
    # the ceiling: raw GETs through the same proxy, as many in flight and as large as the cold run's
    ceil = res["ceiling"]
    assert ceil["threads"] == cold["peak_in_flight"] >= 1 and ceil["mbs"] > 0
    assert abs(ceil["get_bytes"] - cold["fetched_bytes"] / cold["requests"]) <= 2048
    assert "ceiling through the proxy" in r.stdout and "vs ceil" in r.stdout


def test_bench_remote_open_smoke(tmp_path):
    """bench_remote_open.py at a tiny size: the index row opens in 3 requests (manifest,
    listing, index.lio), the per-shard row in 2 + 2 per shard; the JSON holds both rows."""
    out = tmp_path / "o.json"
    script = BENCH.parent / "bench_remote_open.py"
    r = subprocess.run(
        [sys.executable, str(script), "--tokens", "300000", "--shapes", "4096x30000", "--reps", "1",
         "--latency", "0.001", "--cap-mbs", "400", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["row"] for x in rows] == ["index", "no index"]
    idx, old = rows
    assert idx["shards"] == old["shards"] >= 4 and idx["index_bytes"] > 0
    assert idx["open_requests"] == 3 and old["open_requests"] == 2 + 2 * old["shards"]
