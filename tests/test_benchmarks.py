"""Every benchmark script runs at a tiny size, so none of them rots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmio_native import _core

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_read_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_read.py"), "--size-mib", "8", "--random-ops", "300",
         "--seconds", "0.5", "--path", str(tmp_path / "b.bin"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["section"], r["name"]): r for r in res["rows"]}
    want = [("sequential 1 MiB, cold", "llmio threads x16 1MiB"), ("sequential 1 MiB, cold", "python readinto 1MiB (buffered)"),
            ("random 4 KiB, cold", "np.memmap 4KiB slices"), ("random 4 KiB, cold", "llmio threads x16 batch 256")]
    for key in want:
        r = rows.get(key)
        assert r is not None, (key, sorted(rows))
        assert r["nbytes"] > 0 and r["seconds"] > 0 and r["gbps"] > 0, r
    assert res["file_bytes"] == 8 << 20 and res["machine"]["cores"] >= 1
    assert res["direct_used"] and all(isinstance(v, bool) for v in res["direct_used"].values())
    assert not (tmp_path / "b.bin").exists()  # removed without --keep
    if res["limit_unavailable"]:
        pytest.skip("liburing limit not buildable here")
    assert ("sequential 1 MiB, cold", "limit: liburing qd32 1MiB O_DIRECT") in rows


def test_bench_ddp_hook_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_ddp_hook.py"), "--quick", "--links", "none",
         "--step-hooks", "allreduce,no_comm,powersgd_r4,llmio_int8", "--json", str(tmp_path / "d.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "d.json").read_text())
    kern = {(r["impl"], r["isa"], r["threads"]): r for r in res["cpu_kernels"]}
    assert all(r["quantize"] > 0 and r["dsr"] > 0 and r["unpack"] > 0 for r in kern.values())
    assert any(k[0].startswith("memcpy") for k in kern) and any(k[0].startswith("fast") for k in kern)
    assert [r["world"] for r in res["wire"]] == [2, 4, 8, 16, 32, 64]
    assert all(abs(r["vs_fp32"] - res["formula_vs_fp32"]) < 1e-9 for r in res["wire"])
    # bytes counted by the hook on gloo match the formula (1 + 4/256) / 4 = 0.254
    assert abs(res["measured"]["ratio_vs_fp32"] - res["formula_vs_fp32"]) < 2e-3, res["measured"]
    st = res["step_time"]["unshaped"]
    assert st["allreduce"]["ratio"] == 1.0 and st["llmio_int8"]["step_s"] > 0 and st["llmio_int8"]["error"] is None
    assert st["powersgd_r4"]["step_s"] > 0
    # --quick: the first two default bucket sizes, each hook at each, ratios to the all-reduce at 25 MB
    assert st["llmio_int8@4MB"]["step_s"] > 0 and st["allreduce@4MB"]["ratio"] > 0
    assert st["best"]["llmio_int8"]["bucket_cap_mb"] in (25, 4)
    assert st["best"]["llmio_int8"]["ratio"] == min(st["llmio_int8"]["ratio"], st["llmio_int8@4MB"]["ratio"])
    # the chart `llmio bench hook` draws: each measured hook at its best bucket size, per link
    bars = {b["label"]: b for b in res["chart"]["bars"]}
    ours = bars["unshaped: llmio INT8 (default) @ %g MB" % st["best"]["llmio_int8"]["bucket_cap_mb"]]
    assert ours["value"] == st["best"]["llmio_int8"]["ratio"] and ours["kind"] == "ours"
    assert {b["kind"] for b in bars.values()} == {"ours", "baseline", "limit"} and len(bars) == 4 * len(res["step_time"])
    ce = res["compression_error"]  # per-step error: own block scales (default) beat shared ones
    assert 0 < ce["default"]["step_error"] < ce["deterministic"]["step_error"] < 0.1
    conv = res["convergence"]
    assert conv["seeds"] == [0, 1]  # --quick: two seeds, each hook relative to the same seed's all-reduce
    for seed in ("0", "1"):
        ar, q = conv["per_seed"][seed]["allreduce"]["eval_loss"], conv["per_seed"][seed]["llmio_int8"]["eval_loss"]
        assert ar > 0 and q > 0
        # a few steps in, INT8 with error feedback stays within a few percent of the exact all-reduce
        assert abs(q / ar - 1) < 0.05
    s = conv["summary"]["llmio_int8"]
    assert s["rel_min"] <= s["rel_mean"] <= s["rel_max"] and len(s["rel_per_seed"]) == 2
    # the two seeds train different models (initialisation and data order differ)
    assert conv["per_seed"]["0"]["allreduce"]["eval_loss"] != conv["per_seed"]["1"]["allreduce"]["eval_loss"]


def test_bench_codec_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_codec.py"), "--quick", "--tokens", "200000",
         "--json", str(tmp_path / "c.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for needle in ["## zipf-50257", "## zipf-128256", "rans CPU (1 thread)", "zstd -3 (CPU, 1 thread)",
                   "Zipf exponent s = ", "## targets", "rans ratio / order-0 bound", "nvCOMP",
                   "emulation == CPU on", "round trips: every decode above was checked"]:
        assert needle in text, needle
    assert "## shakespeare" in text or "shakespeare: skipped (" in text
    res = json.loads((tmp_path / "c.json").read_text())
    rans = [r for r in res["rows"] if r["codec"] == "rans CPU (1 thread)"]
    assert rans and all(r["of_bound"] > 0.8 and r["decode_gbps"] > 0 for r in rans)
    # layout overhead, v1 (4 KiB-padded chunks) against v2 (packed): v2 pads < 8 bytes per region
    assert "## layout overhead" in text and "layout overhead % (rans1, v2)" in text
    lay = {(r["corpus"], r["codec"], r["version"]): r for r in res["layout"]}
    for (corpus, codec, version), r in lay.items():
        if version == 2:
            assert r["padding"] < lay[(corpus, codec, 1)]["padding"] and r["padding"] < 8 * 64, r
    levels = _core.rans_simd_levels()["cpu"]  # rans1 decode timed at every SIMD level the CPU runs
    by_level = [d["rans1_decode_gbps_by_level"] for d in res["datasets"].values()]
    assert by_level and all(sorted(b) == sorted(levels) and min(b.values()) > 0 for b in by_level)
    assert "decode GB/s by SIMD level (interleaved): scalar " in text


def test_bench_loader_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_loader.py"), "--quick", "--size-gib", "0.02", "--batches", "20",
         "--dir", str(tmp_path / "d"), "--json", str(tmp_path / "l.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "l.json").read_text())
    names = {r["name"]: r for r in res["rows"]}
    for want in ("TokenLoader (our format, none)", "TokenLoader (raw .bin)", "nanoGPT np.memmap get_batch"):
        assert names[want]["tokens_s"] > 0 and names[want]["vs_limit"] > 0, want
    assert res["batches"] == 20 and res["machine"]["cores"] >= 1
    bars = res["chart"]["bars"]
    assert [b["label"] for b in bars] == [r["name"] for r in res["rows"]]
    assert {b["kind"] for b in bars} >= {"ours", "baseline", "limit"}
    assert not (tmp_path / "d").exists()  # removed without --keep


def test_bench_write_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_write.py"), "--size", "8M", "--piece", "3M", "--repeat", "1",
         "--dir", str(tmp_path), "--json", str(tmp_path / "w.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "w.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    for name in ["llmio threads O_DIRECT", "llmio threads buffered", "python f.write + fdatasync (buffered)"]:
        r = rows.get(name)
        assert r is not None, (name, sorted(rows))
        assert r["nbytes"] == 8 << 20 and r["seconds"] > 0 and r["gbps"] > 0, r
    assert rows["llmio threads buffered"]["direct_used"] is False
    assert isinstance(rows["llmio threads O_DIRECT"]["direct_used"], bool)
    assert res["file_bytes"] == 8 << 20 and res["piece_bytes"] == 3 << 20 and res["machine"]["cores"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # every written file removed
    bars = res["chart"]["bars"]
    assert [b["label"] for b in bars] == [r["name"] for r in res["rows"]]
    assert {b["kind"] for b in bars} >= {"ours", "baseline"}
    if res["limit_unavailable"]:
        pytest.skip("liburing write limit not buildable here: " + res["limit_reason"])
    assert "limit: liburing qd32 1MiB O_DIRECT" in rows and res["best_vs_limit"] > 0
    assert all(r["vs_limit"] > 0 for r in res["rows"])


def test_bench_ddp_hook_removes_namespaces_left_by_a_killed_run():
    import os
    import shutil
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and `ip` (network namespaces)")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_ddp_hook as b
    finally:
        sys.path.remove(str(BENCH))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"llmio_bench_{dead.pid}", f"llmio_bench_{os.getpid()}"
    for name in (stale, live):
        if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
            pytest.skip("ip netns add refused here")
    try:
        removed = b._Netns.remove_stale()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale in removed and stale not in names  # its pid is gone: deleted
        assert live not in removed and live in names  # a running benchmark's namespace stays
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
