"""Crash safety of safetensors saves: a forked child saves round after round over the same
target (``save_file``, ``save_sharded``); it is SIGKILLed at random instants; after every kill
the target loads bit-exactly as the last checkpoint the child reported finished or the one it
was writing, never a torn mixture, and staging leftovers are never taken for checkpoints.

Kills per mode: ``LLMIO_CRASH_KILLS`` (default 150), bounded by ``LLMIO_CRASH_SECONDS`` per mode
(default 25 s). The child is forked (torch already imported) so a kill cycle costs milliseconds.
"""
from __future__ import annotations

import os
import random
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmio_native import checkpoint as ck
from llmio_native.checkpoint import commit

KILLS = int(os.environ.get("LLMIO_CRASH_KILLS", "150"))
SECONDS = float(os.environ.get("LLMIO_CRASH_SECONDS", "25"))


def make_sd(r: int) -> dict[str, torch.Tensor]:
    """Round ``r``'s state dict: contents and sizes depend on r (1 to 3 shards at 48 KiB), built
    with numpy only (no torch kernels in a forked child)."""
    rng = np.random.default_rng(r)
    n = 2 + r % 5
    sd = {"round": torch.from_numpy(np.array([r], dtype=np.int64))}
    for i in range(n):
        rows = 16 + (r * 7 + i * 13) % 48
        sd[f"layer.{i}.weight"] = torch.from_numpy(rng.standard_normal((rows, 256), dtype=np.float32))
        sd[f"layer.{i}.bias"] = torch.from_numpy(rng.integers(-1000, 1000, rows, dtype=np.int16))
    return sd


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def save(mode: str, target: Path, r: int) -> None:
    sd = make_sd(r)
    if mode == "file":
        ck.save_file(sd, target, metadata={"round": str(r)})
    else:
        ck.save_sharded(sd, target, max_shard_size=48 * 1024, metadata={"round": str(r)})


def child(mode: str, target: Path, first: int, wfd: int, no_exchange: bool) -> None:
    if no_exchange:
        os.environ["LLMIO_COMMIT_NO_EXCHANGE"] = "1"
    else:
        os.environ.pop("LLMIO_COMMIT_NO_EXCHANGE", None)
    r = first
    while True:
        save(mode, target, r)
        os.write(wfd, struct.pack("<q", r))
        r += 1


def drain(rfd: int) -> list[int]:
    buf = b""
    while True:
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        buf += chunk
    return [struct.unpack_from("<q", buf, i)[0] for i in range(0, len(buf) - len(buf) % 8, 8)]


@pytest.mark.parametrize("mode", ["file", "sharded"])
def test_sigkill_during_saves_leaves_previous_or_new_checkpoint(tmp_path, mode):
    target = tmp_path / ("model.safetensors" if mode == "file" else "ckpt")
    save(mode, target, 0)
    t0 = time.perf_counter()
    for r in (1, 2, 3):
        save(mode, target, r)
    per_save = max((time.perf_counter() - t0) / 3, 1e-3)
    done, rng = 3, random.Random(7 if mode == "file" else 8)
    kills = old_seen = new_seen = 0
    deadline = time.monotonic() + SECONDS
    while kills < KILLS and time.monotonic() < deadline:
        no_exchange = mode == "sharded" and kills % 2 == 1
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            code = 0
            try:
                os.close(rfd)
                child(mode, target, done + 1, wfd, no_exchange)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        time.sleep(rng.uniform(0, 2.5 * per_save))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"child exited by itself (status {status}): it failed to save"
        finished = drain(rfd)
        os.close(rfd)
        kills += 1
        if finished:
            assert finished == list(range(done + 1, finished[-1] + 1))
            done = finished[-1]
        got = ck.load_file(target)  # recovers a set-aside directory if the kill fell between renames
        r = int(got["round"][0])
        assert r in (done, done + 1), f"kill {kills}: found round {r}, last finished {done}"
        assert same(got, make_sd(r)), f"kill {kills}: round {r} is torn"
        with ck.safe_open(target if mode == "file" else next(target.glob("model*.safetensors")), "pt") as f:
            assert f.metadata() == {"round": str(r)}
        old_seen += r == done
        new_seen += r == done + 1
        done = r
        # staging leftovers are the only other names beside the target, and never load as it
        others = [p.name for p in tmp_path.iterdir() if p.name != target.name]
        assert all(commit.is_staging_name(n) for n in others), others
    print(f"{mode}: {kills} kills, {old_seen} left the previous checkpoint, {new_seen} the new one; "
          f"{done} saves finished")
    assert kills >= min(KILLS, 30), f"only {kills} kills in {SECONDS} s"
    # kills landed both before and after the commit point of some save
    assert old_seen > 0 and new_seen + old_seen == kills
    if mode == "file":
        got = ck.load_file(tmp_path)  # the directory: staging files are not checkpoints
        assert set(got) == set(make_sd(done))
    save(mode, target, done + 1)  # a later save sweeps the dead processes' staging
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert same(ck.load_file(target), make_sd(done + 1))
