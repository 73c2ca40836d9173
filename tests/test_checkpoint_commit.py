"""The crash-safe commit protocol (checkpoint/commit.py): publish, replace, discard, recover."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmio_native.checkpoint import commit as cm


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_file_commit_replaces_whole_and_leaves_no_staging(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with cm.atomic_path(target) as st:
        assert st.parent == tmp_path and cm.is_staging_name(st.name)
        st.write_bytes(b"new contents")
        assert target.read_bytes() == b"old"  # untouched until the commit
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_failed_save_keeps_previous_and_removes_staging(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a").write_bytes(b"1")
    with pytest.raises(RuntimeError, match="boom"):
        with cm.atomic_path(target, directory=True) as st:
            (st / "a").write_bytes(b"2")
            raise RuntimeError("boom")
    assert _tree(target) == {"a": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_directory_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("LLMIO_COMMIT_NO_EXCHANGE", "1")
    target = tmp_path / "ckpt"
    with cm.atomic_path(target, directory=True) as st:
        (st / "shard-1").write_bytes(b"x" * 10)
        (st / "sub").mkdir()
        (st / "sub" / "index.json").write_text("{}")
    assert _tree(target) == {"shard-1": b"x" * 10, "sub/index.json": b"{}"}
    with cm.atomic_path(target, directory=True) as st:
        (st / "shard-2").write_bytes(b"y")
    assert _tree(target) == {"shard-2": b"y"}  # nothing of the old one left inside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kind_mismatch_and_missing_staging_raise(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / ".d.tmp-x-1-2"
    f.write_bytes(b"1")
    with pytest.raises(IsADirectoryError, match="d"):
        cm.commit(f, d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cm.commit(tmp_path / ".nothing.tmp-a-1-1", tmp_path / "nothing")
    with pytest.raises(ValueError, match="target's directory"):
        other = tmp_path / "other"
        other.mkdir()
        cm.commit(f, other / "d2")


def test_recover_restores_a_set_aside_checkpoint(tmp_path):
    # what the no-exchange fallback leaves when killed between its two renames
    target = tmp_path / "ckpt"
    aside = tmp_path / ".ckpt.old-host-1-abcd"
    aside.mkdir()
    (aside / "w").write_bytes(b"prev")
    assert cm.recover(target) is True
    assert _tree(target) == {"w": b"prev"}
    assert cm.recover(target) is False  # nothing more to do


def test_remove_stale_only_touches_dead_processes_of_this_host(tmp_path):
    target = tmp_path / "ckpt"
    host = cm._token().split("-")[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt.tmp-{host}-{dead.pid}-0000"
    live = tmp_path / f".ckpt.tmp-{host}-{os.getpid()}-0000"
    foreign = tmp_path / f".ckpt.tmp-otherhost-{dead.pid}-0000"
    for p in (stale, live, foreign):
        p.mkdir()
    removed = cm.remove_stale(target)
    assert removed == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()


_KILLER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from llmio_native.checkpoint import commit as cm
    target = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        with cm.atomic_path(target, directory=True) as st:
            for k in range(3):
                (st / f"part{k}").write_bytes(bytes([i % 251]) * (4096 * (k + 1)))
            (st / "index").write_text(str(i))
        if i == 1:
            print("ready", flush=True)
""")


@pytest.mark.parametrize("exchange", [True, False])
def test_sigkill_at_random_points_never_tears_the_target(tmp_path, exchange):
    import random
    env = dict(os.environ)
    if not exchange:
        env["LLMIO_COMMIT_NO_EXCHANGE"] = "1"
    target = tmp_path / "ckpt"
    rng = random.Random(1234)
    for trial in range(12):
        p = subprocess.Popen([sys.executable, "-c", _KILLER, str(target)], stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline().strip() == b"ready"
        import time
        time.sleep(rng.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait()
        cm.recover(target)
        tree = _tree(target)
        n = int(tree["index"])
        assert tree == {"index": str(n).encode(), **{f"part{k}": bytes([n % 251]) * (4096 * (k + 1)) for k in range(3)}}, trial
    cm.remove_stale(target)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers == []
