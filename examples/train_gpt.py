#!/usr/bin/env python3
"""End to end with every part of llmio_native: pack a text corpus into token shards, then train
a small GPT on it under DistributedDataParallel with

* ``TokenLoader`` (rank-aware, exact resume) feeding every rank,
* the INT8 comm hook (``--hook int8``; ``bf16`` is PyTorch's own hook, ``none`` a plain
  fp32 all-reduce),
* crash-safe checkpoints through ``llmio_native.checkpoint`` (PyTorch Distributed Checkpoint
  on the native engine): model, optimizer, loader position, the hook's residuals and a hash of
  every batch consumed so far.

    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --steps 200      # 2 ranks, CPU (gloo)
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py --steps 300 --resume
    python3 examples/train_gpt.py --steps 200                           # one process, no DDP
    torchrun --nproc_per_node=NGPU examples/train_gpt.py --device cuda  # one rank per GPU (nccl)

The corpus ships with the repository (tinyshakespeare, public domain, 1.1 MB), so the example
needs nothing beside the checkout; --text takes any other text file.

Every ``--log-every`` steps it prints the loss, tokens/s (all ranks), the data stall (share of
the step spent waiting for the loader), the bytes each rank put on the wire against an fp32
all-reduce, and ``batches``: a hash chained over every batch every rank consumed. Kill the run
at any moment (even SIGKILL) and start it again with --resume: it continues from the last
checkpoint with the same sample stream, so the hash at each step equals that of a run that was
never interrupted, and so does the loss, bit for bit (also with the INT8 hook: see
``settle_buckets``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import xxhash

import llmio_native as lio
from llmio_native.cli import main as llmio

HERE = os.path.dirname(os.path.abspath(__file__))


class GPT(nn.Module):
    """A small pre-norm decoder-only transformer (pure PyTorch)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, T: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device))
        h = self.blocks(h, mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(h))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(HERE, "data", "tinyshakespeare.txt"),
                    help="text corpus to pack (default: the tinyshakespeare copy in examples/data)")
    ap.add_argument("--data", default=None, help="dataset directory (packed on first run; default "
                    "out/tinyshakespeare-CODEC)")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--codec", default="zstd", choices=["none", "zstd", "rans"],
                    help="shard codec when packing (rans: decoded on the GPU with --device cuda)")
    ap.add_argument("--hook", default="int8", choices=["none", "bf16", "int8"],
                    help="DDP gradient exchange: fp32 all-reduce, torch's bf16_compress_hook, llmio INT8")
    ap.add_argument("--steps", type=int, default=200, help="train until this global step")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt (exact stream and state)")
    ap.add_argument("--ckpt", default="out/train_gpt.ckpt", help="checkpoint directory (replaced atomically)")
    ap.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    a.data = a.data or f"out/tinyshakespeare-{a.codec}"
    return a


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL of torchrun alone would
    leave the ranks training (and checkpointing) on their own. Ask Linux to SIGKILL this rank
    when its launcher dies, as a dying node would; elsewhere, do nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE: one process per rank (gloo on CPU, nccl on GPUs)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    die_with_launcher()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, torch.device("cpu")


def prepare_data(a: argparse.Namespace, rank: int, world: int) -> None:
    """Rank 0 packs the corpus on first run; the others wait for it."""
    if rank == 0 and not os.path.exists(os.path.join(a.data, "manifest.json")):
        print(f"packing {a.text} -> {a.data}", flush=True)
        rc = llmio(["pack", a.text, "-o", a.data, "--train-bpe", str(a.vocab), "--codec", a.codec, "-q",
                    "--overwrite"])
        if rc:
            raise SystemExit(rc)
    if world > 1:
        dist.barrier()


class BatchHash:
    """xxh3-128 chained over every batch of every rank: equal at a step iff the runs consumed
    the same tokens in the same order up to that step."""

    def __init__(self, hexdigest: str = "") -> None:
        self.digest = hexdigest

    def update(self, x: torch.Tensor, world: int) -> None:
        b = x.detach().to(torch.int64).contiguous()
        if world > 1:  # on the batch's device: nccl gathers GPU tensors, gloo CPU ones
            parts = [torch.empty_like(b) for _ in range(world)]
            dist.all_gather(parts, b)
            b = torch.cat(parts)
        b = b.cpu()
        self.digest = xxhash.xxh3_128(bytes.fromhex(self.digest) + b.numpy().tobytes()).hexdigest()


def hook_state_tensors(hook_state: Any, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The INT8 hook's residuals of this rank as fixed-shape tensors (one worker and one shard
    residual per parameter, zeros where none), so every checkpoint has the same keys."""
    sd = hook_state.state_dict(model) if hook_state is not None else {"residuals": {}, "shard_residuals": {}}
    out = {"iteration": torch.tensor(sd.get("iteration", 0) if hook_state is not None else 0)}
    for kind in ("residuals", "shard_residuals"):
        got = sd[kind]
        for n, p in model.named_parameters():
            r = got.get(n)
            out[f"{kind}.{n}"] = (torch.as_tensor(r, dtype=torch.float32).reshape(-1).clone() if r is not None
                                  else torch.zeros(p.numel(), dtype=torch.float32))
    return out


def load_hook_state(hook_state: Any, model: nn.Module, t: Dict[str, torch.Tensor]) -> None:
    if hook_state is None:
        return
    sd: Dict[str, Any] = {"version": 2, "iteration": int(t["iteration"]), "residuals": {}, "shard_residuals": {}}
    for n, _ in model.named_parameters():
        sd["residuals"][n] = t[f"residuals.{n}"].numpy()
        sr = t[f"shard_residuals.{n}"]
        if bool(sr.any()):
            sd["shard_residuals"][n] = sr.numpy()
    hook_state.load_state_dict(sd, model)


def settle_buckets(model: nn.Module, net: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> None:
    """One backward on a fixed batch before training, with the plain all-reduce, its gradients
    dropped.

    DDP lays its gradient buckets out in parameter order, then rebuilds them once, after the
    first backward of a process, in the order the gradients became ready. The INT8 hook
    quantizes in blocks of the bucket it is given, so without this the first step of every
    process (a resumed one included) would see a different layout from all later steps, and a
    resumed run would drift from an uninterrupted one by about 1e-5 of the loss. With the
    layout settled here, every training step of every process sees the rebuilt layout, and a
    resumed run repeats the uninterrupted one bit for bit. Consumes no random numbers and no
    loader batches; the hook is registered afterwards.
    """
    x = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
    net.zero_grad(set_to_none=True)


def main() -> None:
    a = parse_args()
    rank, world, device = setup_distributed(a.device)
    log = (lambda *s: print(*s, flush=True)) if rank == 0 else (lambda *s: None)
    prepare_data(a, rank, world)
    ds = lio.open_dataset(a.data)
    log(f"dataset: {ds.num_tokens:,} tokens, {ds.dtype}, codec {ds.codec}; read backend {lio.info()['backend']}; "
        f"{world} rank(s) on {device.type}, hook {a.hook if world > 1 else 'n/a (one process)'}")

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp
    from llmio_native import checkpoint as ck

    torch.manual_seed(0)
    net = GPT(a.vocab, a.d_model, a.layers, 4, a.seq_len).to(device)
    nparams = sum(p.numel() for p in net.parameters())
    model: nn.Module = net
    hook_state = None
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        settle_buckets(model, net, a.batch_size, a.seq_len, device)
        if a.hook == "int8":
            from llmio_native.ddp import Int8CompressState, int8_compress_hook
            hook_state = Int8CompressState(model=net)
            model.register_comm_hook(hook_state, int8_compress_hook)
        elif a.hook == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = lio.TokenLoader(ds, batch_size=a.batch_size, seq_len=a.seq_len, device=device, seed=0,
                             rank=rank, world_size=world)
    log(f"model: {nparams / 1e6:.2f}M parameters; {a.batch_size} x {a.seq_len} tokens per rank per step")

    batches = BatchHash()
    step = 0
    if a.resume and os.path.exists(a.ckpt):
        msd, osd = get_state_dict(net, opt)
        state = {"model": msd, "optim": osd, "meta": "", f"hook.rank{rank}": hook_state_tensors(hook_state, net)}
        dcp.load(state, storage_reader=ck.StorageReader(a.ckpt))
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = json.loads(state["meta"])
        if meta["world"] != world or meta["hook"] != a.hook:
            log(f"note: checkpoint written by {meta['world']} rank(s) with hook {meta['hook']}; continuing "
                f"with {world} and {a.hook} (the stream continues exactly; the loss curve will differ)")
        load_hook_state(hook_state, net, state[f"hook.rank{rank}"])
        loader.load_state_dict(meta["loader"])
        step, batches = meta["step"], BatchHash(meta["batches"])
        log(f"resumed from {a.ckpt} at step {step}; batches {batches.digest[:16]}")
    elif a.resume:
        log(f"--resume: no checkpoint at {a.ckpt}; starting at step 0")

    def save() -> float:
        t = time.perf_counter()
        msd, osd = get_state_dict(net, opt)
        meta = {"step": step, "loader": loader.state_dict(), "batches": batches.digest, "world": world,
                "hook": a.hook}
        state = {"model": msd, "optim": osd, "meta": json.dumps(meta),
                 f"hook.rank{rank}": hook_state_tensors(hook_state, net)}
        os.makedirs(os.path.dirname(os.path.abspath(a.ckpt)), exist_ok=True)
        dcp.save(state, storage_writer=ck.StorageWriter(a.ckpt))
        return time.perf_counter() - t

    fp32_bytes_per_step = 2 * (world - 1) / world * 4 * nparams if world > 1 else 0
    wire_factor = {"none": 1.0, "bf16": 0.5}.get(a.hook, None)
    t0 = time.perf_counter()
    wait = compute = 0.0
    steps_run = tokens = 0
    ckpt_s: list[float] = []
    first_loss = last_loss = float("nan")
    it = iter(loader)
    while step < a.steps:
        t = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        batches.update(x, world)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        steps_run += 1
        tokens += x.numel() * world
        lv = loss.detach()
        if world > 1:
            dist.all_reduce(lv)
            lv /= world
        last_loss = lv.item()
        first_loss = last_loss if steps_run == 1 else first_loss
        wait += t1 - t
        compute += time.perf_counter() - t1
        if step % a.log_every == 0 or step == a.steps:
            dt = time.perf_counter() - t0
            if hook_state is not None:
                s = hook_state.stats()
                wire = f"wire {s['ratio_vs_fp32']:.3f} x fp32" if s["bytes_fp32_allreduce"] else "wire 1.000 x fp32 (warmup)"
            elif world > 1:
                wire = f"wire {wire_factor:.3f} x fp32"
            else:
                wire = "wire n/a"
            log(f"step {step:4d}  loss {last_loss:.6f}  {tokens / dt:,.0f} tok/s  "
                f"stall {100 * wait / max(wait + compute, 1e-9):.1f}%  {wire}  batches {batches.digest[:16]}")
        if step % a.ckpt_every == 0 or step == a.steps:
            ckpt_s.append(save())
    it.close()

    dt = time.perf_counter() - t0
    st = loader.stats()
    log("\n== summary")
    log(f"steps {step - steps_run} -> {step} ({steps_run} run here) on {world} rank(s), {device.type}; "
        f"{nparams / 1e6:.2f}M parameters")
    log(f"loss {first_loss:.4f} -> {last_loss:.4f} (uniform {math.log(a.vocab):.2f})")
    log(f"throughput {tokens / dt:,.0f} tok/s; data stall {100 * wait / max(wait + compute, 1e-9):.1f}% of step time "
        f"(loader: {st['batches']} batches, stall {st['stall_s'] * 1e3:.1f} ms)")
    if world > 1:
        if hook_state is not None:
            s = hook_state.stats()
            log(f"gradient exchange: llmio INT8 hook, {s['bytes_sent'] / 1e6:.1f} MB sent by this rank vs "
                f"{s['bytes_fp32_allreduce'] / 1e6:.1f} MB for an fp32 all-reduce ({s['ratio_vs_fp32']:.3f} x; "
                f"{s['buckets_compressed']} buckets compressed, {s['buckets_bypassed']} bypassed)")
        else:
            log(f"gradient exchange: {a.hook}, about {wire_factor * fp32_bytes_per_step * steps_run / 1e6:.1f} MB "
                f"sent by this rank ({wire_factor:.3f} x fp32)")
    if ckpt_s:
        log(f"checkpoints: {len(ckpt_s)} saved to {a.ckpt} through llmio_native.checkpoint, "
            f"{1e3 * sum(ckpt_s) / len(ckpt_s):.0f} ms each on average")
    log(f"batches consumed (hash over all ranks, from step 0): {batches.digest}")
    log(f"run again with --resume and a larger --steps to continue the same stream")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
