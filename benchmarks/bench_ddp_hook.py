#!/usr/bin/env python3
"""INT8 gradient hook benchmark.

1. CPU kernels, GB/s of fp32 input (N values): memcpy of the input (the memory limit, measured in
   the same run), the C++ oracle, and the fast path (csrc/quant/int8_fast.cpp) at every dispatch
   level this CPU has, 1 and 2 threads: quantize+pack (residual add, absmax, quantize, pack,
   residual write), the owner's dequantize-sum-requantize (W = 2 copies) and the final
   unpack-dequantize; each as a ratio to memcpy.
2. CUDA rows (only with a GPU and llmio_native._cuda; a line says why otherwise): the fused
   kernel (a) (residual add + absmax + quantize + pack + residual write) and kernel (c)
   against the torch-composed blockwise quantizer on the device and a device-to-device copy
   (the HBM limit), in GB/s of bytes actually moved (kernel (a): read x 4N + residual 4N,
   write residual 4N + codes N + scales 4N/256; the copy: read + write 4N).
3. Bytes on the wire per rank per step for an N-element bucket: fp32 ring all-reduce,
   bf16_compress_hook, PyTorch's quantization_pertensor_hook (an all_gather of int8 values
   plus scales) and ours, flat, ``deterministic=True`` (+ the all-reduce MAX of the block
   absmax, codes-only phase 1) and hierarchical (the inter-node INT8 bytes with 8 ranks per
   node), for W = 2..64 (formulas), and ours counted by the hook's stats on gloo for W = 2
   (measured).
4. Step time on a bandwidth-limited link: W = 2 on gloo (CPU), both ranks in a network namespace
   the benchmark creates (``ip netns add``; needs root), its loopback shaped with ``tc`` (tbf) to
   1, 2 and 10 Gbit/s and unshaped (the shaping is shared by both directions). A small GPT
   (4.2M parameters, 16.8 MB of fp32 gradients) with: plain all-reduce, ``bf16_compress_hook``
   (n/a with its error where gloo refuses it), PowerSGD ranks 1/4/16, ours (default and
   ``deterministic=True``, and with each bucket exchanged whole instead of in pipelined pieces: the
   A/B of the pipelining), and the step without any communication (a hook that returns the
   bucket: the lower bound, measured in the same run) and the step without gradient traffic whose
   ranks wait for each other once per step (``sync_only``: the bound of any synchronous hook; the
   slower rank's backward sets the step), each at several DDP bucket sizes
   (``--bucket-cap-mb``, default 25 (DDP's default), 4 and 1 MB); the ratio of each step time to the
   plain all-reduce's at the first bucket size in the same round, median over rounds, and each
   hook at its own best bucket size. Without namespaces or tc: only the
   unshaped rows, in the default namespace, with the
   reason printed. ``--trace``: where one rank's step goes (forward, backward compute until the
   last bucket's hook call, the exposed tail after it split into our kernels' CPU time, waiting for
   the collectives and DDP's finish, the optimizer; per bucket the hook call and the exchange).
5. Convergence: a smaller GPT trained on the shipped corpus (examples/data/tinyshakespeare.txt,
   character level) with each hook for a few hundred steps (AdamW), for several seeds (``--seeds``:
   a seed fixes the initialisation and the data order, the same for every hook); each hook's final
   held-out loss relative to the plain all-reduce of the same seed, mean and spread over seeds.

``--quick``: small sizes and few steps (a smoke test of every section).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

from llmio_native import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

BLOCK = _core.QUANT_BLOCK


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def torch_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.view(-1, BLOCK)
    scale = b.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(b / scale.clamp_min(1e-30)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def wire_table(n: int, local: int = 8) -> list[dict]:
    print(f"\n## bytes sent per rank per step, bucket of N = {n:,} fp32 gradients")
    print(f"| {'W':>3} | {'fp32 allreduce':>14} | {'bf16 hook':>10} | {'pertensor int8':>14} | {'llmio int8':>11} | "
          f"{'vs fp32':>7} | {'vs bf16':>7} | {'deterministic':>13} | {f'hier. L={local} inter':>17} |")
    print(f"|{'-' * 5}|{'-' * 16}|{'-' * 12}|{'-' * 16}|{'-' * 13}|{'-' * 9}|{'-' * 9}|{'-' * 15}|{'-' * 19}|")
    rows: list[dict] = []
    for w in (2, 4, 8, 16, 32, 64):
        fp32 = 2 * (w - 1) / w * 4 * n
        bf16 = 2 * (w - 1) / w * 2 * n
        pertensor = (w - 1) * (n + 4)  # all_gather of every rank's int8 tensor and its scale
        ours = 2 * (w - 1) / w * n * (1 + 4 / BLOCK)
        # deterministic: codes-only phase 1 + packed phase 2 + ring all-reduce of N/256 fp32 absmax
        det = (w - 1) / w * n + (w - 1) / w * n * (1 + 4 / BLOCK) + 2 * (w - 1) / w * 4 * n / BLOCK
        m = w // local
        hier = f"{2 * (m - 1) / m * (n / local) * (1 + 4 / BLOCK) / 1e6:>15.2f}MB" if m > 1 else f"{'one node':>17}"
        print(f"| {w:>3} | {fp32 / 1e6:>12.2f}MB | {bf16 / 1e6:>8.2f}MB | {pertensor / 1e6:>12.2f}MB | "
              f"{ours / 1e6:>9.2f}MB | {ours / fp32:>7.3f} | {ours / bf16:>7.3f} | {det / 1e6:>11.2f}MB | {hier} |")
        rows.append({"world": w, "fp32_bytes": fp32, "bf16_bytes": bf16, "pertensor_bytes": pertensor,
                     "int8_bytes": ours, "vs_fp32": ours / fp32, "vs_bf16": ours / bf16, "deterministic_bytes": det})
    print("deterministic: + (W-1)/W * 4N/256 over flat; hierarchical: inter-node INT8 bytes 2 (M-1)/M * (N/L) "
          "* (1 + 4/256) with M = W/L nodes, plus intra-node (L-1)/L * N * (4 + bucket bytes) over NVLink/PCIe")
    return rows


def cuda_rows(n: int, reps: int) -> None:
    from llmio_native.ddp import cuda_kernels_usable
    from llmio_native._native import _cuda

    ok, why = cuda_kernels_usable()
    if not ok or not torch.cuda.is_available():
        print(f"\n## CUDA kernels: not measured ({why or 'torch.cuda is not available'})")
        return
    dev = torch.device("cuda")
    x = torch.randn(n, device=dev)
    res = torch.zeros(n, device=dev)
    send = torch.empty(n + 4 * (n // BLOCK), dtype=torch.uint8, device=dev)
    out = torch.empty_like(x)
    dst = torch.empty_like(x)
    s = torch.cuda.current_stream().cuda_stream

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(10):
                fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 10 / 1e3)
        return best

    def torch_composed() -> None:
        v = x + res
        q, scale = torch_quantize(v)
        res.copy_(v - (q.float() * scale).view(-1))

    t_a = timed(lambda: _cuda.int8_quantize_pack(x.data_ptr(), 0, n, n, 1, res.data_ptr(), send.data_ptr(), s))
    t_c = timed(lambda: _cuda.int8_unpack_dequantize(send.data_ptr(), 1, n, out.data_ptr(), 0, n, s))
    t_t = timed(torch_composed)
    t_copy = timed(lambda: dst.copy_(x))
    bytes_a = 12 * n + n + 4 * n // BLOCK
    bytes_c = n + 4 * n // BLOCK + 4 * n
    print(f"\n## CUDA kernels on {torch.cuda.get_device_name()}, N = {n:,} fp32 (GB/s of bytes actually moved)")
    print(f"| {'implementation':<52} | {'time us':>8} | {'GB/s':>7} | {'vs D2D copy':>11} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 9}|{'-' * 13}|")
    copy_bw = 8 * n / t_copy
    for name, t, nbytes in (("device-to-device copy (HBM limit)", t_copy, 8 * n),
                            ("llmio fused (a) residual+quantize+pack", t_a, bytes_a),
                            ("torch-composed blockwise quantizer + residual", t_t, bytes_a),
                            ("llmio (c) unpack + dequantize (fp32 out)", t_c, bytes_c)):
        print(f"| {name:<52} | {t * 1e6:8.1f} | {nbytes / t / 1e9:7.1f} | {nbytes / t / copy_bw:11.2f} |")
    print(f"fused (a) / torch-composed = {t_t / t_a:.2f}x (the torch row is credited with the fused kernel's bytes)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_worker(rank: int, world: int, port: int, out: str, n: int) -> None:
    import pickle

    import torch.distributed as dist

    from llmio_native.ddp import Int8CompressState, int8_compress_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(n // 64, 64, bias=False), bucket_cap_mb=1000)
    state = Int8CompressState(warmup_steps=0, min_numel=0)
    model.register_comm_hook(state, int8_compress_hook)
    t0 = time.perf_counter()
    for _ in range(5):
        model(torch.randn(4, n // 64)).sum().backward()
    dt = (time.perf_counter() - t0) / 5
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({**state.stats(), "step_s": dt}, f)
    import gc

    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


class _TinyGPT(torch.nn.Module):
    """A small pre-norm GPT (the kind of model whose step time the hooks change)."""

    def __init__(self, vocab: int = 2048, d: int = 256, layers: int = 4, heads: int = 4, T: int = 128) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(T, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.T = T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(self.tok(x) + self.pos[: x.shape[1]], mask=mask, is_causal=True))


# ---------------------------------------------------------------- 1. CPU kernels

def cpu_kernel_table(n: int, reps: int) -> list[dict]:
    """GB/s of fp32 input of the oracle and the fast path (every level, 1 and 2 threads) against
    memcpy of the same input, measured here and now."""
    world = 2
    n = n // (BLOCK * world) * BLOCK * world
    shard = n // world
    stride = shard + 4 * (shard // BLOCK)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    res = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    dst = np.empty_like(x)
    codes = np.empty(n, np.int8)
    scales = np.empty(n // BLOCK, np.float32)
    send = np.empty(world * stride, np.uint8)
    own = np.empty(stride, np.uint8)
    res_s = np.zeros(shard, np.float32)
    out = np.empty(n, np.float32)
    _core.int8_quantize_pack_fast(x, 0, n, n, world, res.copy(), send)
    # the owner's step on W = 2 copies of one shard: 2 * shard codes in, as fp32 input bytes of n values
    recv = np.concatenate([send[:stride], send[:stride]])
    codes_w = np.stack([send[:shard], send[:shard]]).view(np.int8)
    scales_w = np.stack([send[shard:stride], send[shard:stride]]).view(np.float32)
    c_own = np.empty(shard, np.int8)
    s_own = np.empty(shard // BLOCK, np.float32)
    gathered = np.concatenate([send[:stride], send[:stride]])
    gb = n * 4 / 1e9
    # every candidate timed once per round, rounds interleaved (a shared machine's load changes hit
    # all of them alike); the best round of each
    cands = [("memcpy of the input (limit)", "-", 1), ("C++ oracle", "scalar", 1)]
    cands += [("fast (int8_fast.cpp)", isa, th) for isa in _core.int8_fast_isas() for th in (1, 2)]
    ops = {
        "memcpy of the input (limit)": (lambda: np.copyto(dst, x), lambda: np.copyto(dst, x),
                                        lambda: np.copyto(dst, x)),
        "C++ oracle": (lambda: _core.quantize_blocks_ref(x, res, codes, scales),
                       lambda: _core.dequant_sum_requant_ref(codes_w, scales_w, res_s, c_own, s_own),
                       lambda: _core.dequantize_blocks_ref(codes, scales, out)),
        "fast (int8_fast.cpp)": (lambda: _core.int8_quantize_pack_fast(x, 0, n, n, world, res, send),
                                 lambda: _core.int8_dequant_sum_requant_fast(recv, world, shard, res_s, own),
                                 lambda: _core.int8_unpack_dequantize_fast(gathered, world, shard, out, 0, n)),
    }
    best = {c: [float("inf")] * 3 for c in cands}
    prev_isa, prev_t = _core.int8_fast_isa(), _core.int8_fast_threads()
    try:
        for _ in range(reps):
            for c in cands:
                if c[0].startswith("fast"):
                    _core.int8_fast_set_isa(c[1])
                    _core.int8_fast_set_threads(c[2])
                for k, fn in enumerate(ops[c[0]]):
                    t0 = time.perf_counter()
                    fn()
                    best[c][k] = min(best[c][k], time.perf_counter() - t0)
    finally:
        _core.int8_fast_set_isa(prev_isa)
        _core.int8_fast_set_threads(prev_t)
    rows = [{"impl": c[0], "isa": c[1], "threads": c[2], "quantize": gb / t[0], "dsr": gb / 2 / t[1],
             "unpack": gb / t[2]} for c, t in best.items()]
    rows[0]["dsr"] = rows[0]["unpack"] = rows[0]["quantize"]
    mc = rows[0]["quantize"]
    print(f"\n## CPU kernels, N = {n:,} fp32 ({gb * 1e3:.1f} MB), GB/s of fp32 input (dequant-sum-requant: of the "
          f"shard it owns, W = 2), best of {reps} interleaved rounds; x memcpy = ratio to memcpy of the input, 1 "
          f"thread; load average {os.getloadavg()[0]:.1f}")
    print(f"| {'implementation':<22} | {'level':<6} | {'thr':>3} | {'quantize+pack':>13} | {'x memcpy':>8} | "
          f"{'deq-sum-requant':>15} | {'x memcpy':>8} | {'unpack-deq':>10} | {'x memcpy':>8} |")
    print(f"|{'-' * 24}|{'-' * 8}|{'-' * 5}|{'-' * 15}|{'-' * 10}|{'-' * 17}|{'-' * 10}|{'-' * 12}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['impl']:<22} | {r['isa']:<6} | {r['threads']:>3} | {r['quantize']:13.2f} | "
              f"{r['quantize'] / mc:8.2f} | {r['dsr']:15.2f} | {r['dsr'] / mc:8.2f} | {r['unpack']:10.2f} | "
              f"{r['unpack'] / mc:8.2f} |")
        r["quantize_vs_memcpy"], r["dsr_vs_memcpy"], r["unpack_vs_memcpy"] = (r["quantize"] / mc, r["dsr"] / mc,
                                                                              r["unpack"] / mc)
    return rows


# ---------------------------------------------------------------- 4./5. DDP runs in subprocesses

HOOKS = ["allreduce", "no_comm", "sync_only", "bf16_compress_hook", "powersgd_r1", "powersgd_r4", "powersgd_r16",
         "llmio_int8", "llmio_int8_deterministic", "llmio_int8_whole"]
HOOK_LABEL = {"allreduce": "plain all-reduce", "no_comm": "no communication (lower bound)",
              "sync_only": "sync only (no gradient bytes; floor of a synchronous hook)",
              "bf16_compress_hook": "bf16_compress_hook",
              "powersgd_r1": "PowerSGD rank 1", "powersgd_r4": "PowerSGD rank 4", "powersgd_r16": "PowerSGD rank 16",
              "llmio_int8": "llmio INT8 (default)", "llmio_int8_deterministic": "llmio INT8 deterministic=True",
              "llmio_int8_whole": "llmio INT8, buckets not cut in pieces"}
WARM = 3  # untimed steps: DDP's bucket rebuild, our warmup_steps=2, PowerSGD start_powerSGD_iter=2


def _on_comm_thread(hook_fn):
    """A hook run on our communication thread, one bucket after another. PowerSGD issues its
    later collectives from future callbacks; on gloo those run when the previous collective
    completes and race with the next bucket's collectives issued by the autograd thread, so the
    ranks can issue them in different orders (a collective mismatch crashed a run). Queued on the
    FIFO thread (each bucket's chain waited for before the next starts) the order is fixed and
    the hook still returns at once, overlapping backward as ours does."""
    from llmio_native.ddp import exchange

    def hook(state, bucket):
        fut = exchange._COMM.submit(lambda: hook_fn(state, bucket).wait())
        if bucket.is_last():
            exchange._COMM.drain()
        return fut

    return hook


def _hook_stats(st: object) -> dict | None:
    """Ours: state.stats(); PowerSGD: the share of numel it all-reduces (P and Q against the
    gradients), from its compression_stats()."""
    if hasattr(st, "stats"):
        return st.stats()
    if hasattr(st, "compression_stats"):
        _, before, after = st.compression_stats()
        return {"ratio_vs_fp32": after / before if before else None}
    return None


def _register(model: torch.nn.Module, hook: str, net: torch.nn.Module) -> object:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from llmio_native.ddp import Int8CompressState, int8_compress_hook

    if hook == "no_comm":  # the step without any communication: the floor every hook's step time is above
        def local(state, bucket):  # no annotations: DDP checks them, and this module's are strings
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, local)
    elif hook == "sync_only":  # no gradient traffic; the ranks wait for each other once per step, as with
        # every synchronous hook (the slower rank's backward sets the step time)
        def synced(state, bucket):
            if bucket.is_last():
                dist.all_reduce(torch.zeros(1))
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, synced)
    elif hook == "bf16_compress_hook":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif hook.startswith("powersgd_r"):
        st = psgd.PowerSGDState(process_group=dist.group.WORLD, matrix_approximation_rank=int(hook[len("powersgd_r"):]),
                                start_powerSGD_iter=2, min_compression_rate=2)
        model.register_comm_hook(st, _on_comm_thread(psgd.powerSGD_hook))
        return st
    elif hook == "llmio_int8_whole":  # the A/B of the pipelined pieces: each bucket exchanged whole
        st = Int8CompressState(warmup_steps=2, model=net, piece_numel=0)
        model.register_comm_hook(st, int8_compress_hook)
        return st
    elif hook.startswith("llmio_int8"):
        st = Int8CompressState(warmup_steps=2, deterministic=hook.endswith("deterministic"), model=net)
        model.register_comm_hook(st, int8_compress_hook)
        return st
    return None


def _run_key(hook: str, cap: float, caps: list) -> str:
    """The result key of ``hook`` at DDP bucket size ``cap`` MB: the hook's name at the first size
    of ``caps`` (the reference), ``hook@<cap>MB`` at the others."""
    return hook if cap == caps[0] else f"{hook}@{cap:g}MB"


def _steps_worker(cfg: dict) -> None:
    """One rank: a DDP model per hook of cfg["hooks"] and bucket size of cfg["bucket_caps"], stepped
    in rounds (one step of each in turn, so load changes on a shared machine hit all alike); WARM
    untimed steps first. Ratios are to the first run (plain all-reduce at the first bucket size)."""
    import datetime
    import json

    import torch.distributed as dist

    rank = cfg["rank"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
    torch.set_num_threads(1)
    _core.int8_fast_set_threads(cfg["int8_threads"])
    dist.init_process_group("gloo", rank=rank, world_size=cfg["world"], timeout=datetime.timedelta(seconds=120))
    runs = {}
    caps = cfg["bucket_caps"]
    for cap in caps:
        for hook in cfg["hooks"]:
            torch.manual_seed(0)
            net = _TinyGPT()
            model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=cap)
            run = {"model": model, "net": net, "opt": torch.optim.SGD(model.parameters(), lr=1e-3),
                   "g": torch.Generator().manual_seed(rank), "times": [], "error": None, "state": None}
            try:
                run["state"] = _register(model, hook, net)
            except Exception as exc:
                run["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            runs[_run_key(hook, cap, caps)] = run
    from llmio_native.ddp import exchange

    for i in range(cfg["steps"] + WARM):
        for hook, run in runs.items():
            if run["error"]:
                continue
            x = torch.randint(0, 2048, (4, 128), generator=run["g"])
            trace = [] if cfg.get("trace") and i >= WARM else None
            exchange.TRACE = trace
            try:
                t0 = time.perf_counter()
                exchange._mark("fwd")
                loss = torch.nn.functional.cross_entropy(run["model"](x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
                run["opt"].zero_grad()
                exchange._mark("bwd")
                loss.backward()
                exchange._mark("bwd_end")
                run["opt"].step()
                exchange._mark("opt_end")
                if i >= WARM:
                    run["times"].append(time.perf_counter() - t0)
                    if trace is not None:
                        run.setdefault("traces", []).append(trace)
            except Exception as exc:  # a hook that does not run on CPU/gloo: reported, not fatal
                run["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                dist.barrier()
    base = runs[cfg["hooks"][0]]["times"]
    out = {h: {"step_s": float(np.median(r["times"])) if r["times"] and not r["error"] else None,
               # the ratio to the first hook (plain all-reduce) within each round, then the median: steps
               # seconds apart see the same load, so this is steadier than a ratio of medians
               "ratio": float(np.median(np.array(r["times"]) / np.array(base)))
               if r["times"] and not r["error"] and len(r["times"]) == len(base) else None,
               "error": r["error"], "params": sum(p.numel() for p in r["net"].parameters()),
               "stats": _hook_stats(r["state"]),
               "trace": _trace_summary(r["traces"]) if r.get("traces") and not r["error"] else None,
               "trace_raw": [[(round((ts - next(u for u, e, _, _ in tr if e == "bwd")) * 1e3, 3), e, i, k)
                              for ts, e, i, k in tr] for tr in r.get("traces", [])] if not r["error"] else None}
           for h, r in runs.items()}
    exchange.TRACE = None
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(out, f)
    runs.clear()
    import gc

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


_KERNEL = (("quant", "quant_end"), ("a2a_done", "requant_end"), ("ag_done", "unpack_end"))  # pipelined pieces


def _trace_summary(traces: list) -> dict:
    """Medians over steps of one rank's step timeline (``exchange.TRACE`` events, ms): forward,
    backward compute (until the last bucket's hook call: every gradient is ready), the time from
    there until ``backward()`` returns (the exposed tail) split into our kernels' CPU time on the
    communication thread, waiting for the wire, and DDP's finish after the last future; kernel
    CPU time of the whole step; optimizer; and per bucket the hook call, the exchange's start and
    end (ms after backward starts)."""
    rows: dict = {}
    per_bucket: dict = {}
    for ev in traces:
        t = {}
        for ts, name, idx, k in ev:
            t.setdefault((name, idx, k), ts)
        bwd, bwd_end = t[("bwd", -1, -1)], t[("bwd_end", -1, -1)]
        hooks = sorted(ts for ts, name, _, _ in ev if name == "hook")
        last_hook = hooks[-1] if hooks else bwd_end
        busy = []  # intervals of kernel work on the communication thread
        for ts, name, idx, k in ev:
            for a, b in _KERNEL:
                if name == a and (b, idx, k) in t:
                    busy.append((ts, t[(b, idx, k)]))
            if name == "stage_end":  # a bucket exchanged whole: stage k ran since the previous wait (or the job start)
                start = t.get(("wait_done", idx, k - 1), t.get(("job", idx, -1)))
                if k == 0 and any(e[1] == "quant" and e[2] == idx for e in ev):
                    continue  # a pipelined bucket: its pieces are counted above
                if start is not None:
                    busy.append((start, ts))
        kern = sum(b - a for a, b in busy)
        kern_tail = sum(max(0.0, min(b, bwd_end) - max(a, last_hook)) for a, b in busy)
        futs = [ts for ts, name, _, _ in ev if name == "future"]
        last_fut = max(futs) if futs else last_hook
        tail = bwd_end - last_hook
        vals = {"forward": bwd - t[("fwd", -1, -1)], "backward_compute": last_hook - bwd, "exposed_tail": tail,
                "tail_kernel_cpu": kern_tail, "tail_wire_wait": max(0.0, last_fut - last_hook - kern_tail),
                "tail_ddp_finish": bwd_end - max(last_fut, last_hook), "kernel_cpu_step": kern,
                "optimizer": t[("opt_end", -1, -1)] - bwd_end, "step": t[("opt_end", -1, -1)] - t[("fwd", -1, -1)]}
        for key, v in vals.items():
            rows.setdefault(key, []).append(v * 1e3)
        for ts, name, idx, k in ev:
            if name in ("hook", "job", "job_end") and k == -1:
                per_bucket.setdefault((idx, name), []).append((ts - bwd) * 1e3)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out["buckets"] = {f"{idx}:{name}": float(np.median(v)) for (idx, name), v in sorted(per_bucket.items())}
    return out


def _corpus(path: str) -> tuple[torch.Tensor, int]:
    text = open(path, "rb").read()
    vocab = sorted(set(text))
    lut = np.zeros(256, np.int64)
    lut[vocab] = np.arange(len(vocab))
    return torch.from_numpy(lut[np.frombuffer(text, np.uint8)]), len(vocab)


def _converge_worker(cfg: dict) -> None:
    """One rank: the convergence run of every hook for one seed (cfg["seed"]: the model's
    initialisation and the data order, the same for every hook), final held-out loss."""
    import datetime
    import json

    import torch.distributed as dist

    rank = cfg["rank"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
    torch.set_num_threads(1)
    _core.int8_fast_set_threads(cfg["int8_threads"])
    dist.init_process_group("gloo", rank=rank, world_size=cfg["world"], timeout=datetime.timedelta(seconds=120))
    data, vocab = _corpus(cfg["corpus"])
    split = int(len(data) * 0.9)
    T, B = cfg["T"], cfg["B"]
    ev = torch.Generator().manual_seed(12345)
    ev_starts = torch.randint(split, len(data) - T - 1, (64,), generator=ev)
    ev_x = torch.stack([data[s:s + T + 1] for s in ev_starts.tolist()])
    out = {}
    for hook in cfg["hooks"]:
        seed = cfg.get("seed", 0)
        torch.manual_seed(seed)
        net = _TinyGPT(vocab=vocab, d=cfg["d"], layers=cfg["layers"], heads=4, T=T)
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        g = torch.Generator().manual_seed(1000 + rank + 7919 * seed)  # seed 0: the single-seed runs' order
        tail, err, st = [], "", None
        try:
            st = _register(model, hook, net)
            for i in range(cfg["steps"]):
                starts = torch.randint(0, split - T - 1, (B,), generator=g)
                x = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
                loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= cfg["steps"] - 20:
                    tail.append(loss.item())
            with torch.no_grad():
                ev_loss = float(torch.nn.functional.cross_entropy(net(ev_x[:, :-1]).flatten(0, 1),
                                                                  ev_x[:, 1:].flatten()))
        except Exception as exc:
            err, ev_loss = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}", None
        out[hook] = {"eval_loss": ev_loss, "train_loss_tail": float(np.mean(tail)) if tail else None,
                     "error": err or None, "params": sum(p.numel() for p in net.parameters()),
                     "stats": _hook_stats(st)}
        del model, opt
        import gc

        gc.collect()
        dist.barrier()
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _launch(worker: str, cfg: dict, netns: str | None, timeout: float) -> dict:
    """Runs ``worker`` on W ranks as subprocesses of this script (inside ``netns`` when given);
    returns rank 0's JSON. Raises RuntimeError (with the ranks' stderr) if one fails."""
    import json
    import subprocess

    cfg = dict(cfg, port=_free_port())
    with tempfile.TemporaryDirectory() as tmp:
        cfg["out"] = os.path.join(tmp, "out.json")
        procs = []
        for r in range(cfg["world"]):
            cmd = [sys.executable, os.path.abspath(__file__), "--_worker", worker, json.dumps(dict(cfg, rank=r))]
            if netns:
                cmd = ["ip", "netns", "exec", netns] + cmd
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errs = []
        for p in procs:
            try:
                _, e = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"{worker}: ranks did not finish in {timeout:.0f} s")
            errs.append((p.returncode, e))
        if any(rc != 0 for rc, _ in errs):
            raise RuntimeError(f"{worker} failed: " + " | ".join(e[-1500:] for rc, e in errs if rc != 0))
        with open(cfg["out"]) as f:
            return json.load(f)


class _Netns:
    """A network namespace with its loopback up, shaped by tc tbf; removed on exit."""

    def __init__(self) -> None:
        self.name = f"llmio_bench_{os.getpid()}"

    @staticmethod
    def unavailable() -> str | None:
        import shutil

        if os.geteuid() != 0:
            return "not root (ip netns add needs CAP_SYS_ADMIN)"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return f"`{tool}` not found"
        return None

    def _run(self, *cmd: str) -> None:
        import subprocess

        p = subprocess.run(list(cmd), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")

    @staticmethod
    def remove_stale() -> list[str]:
        """Deletes the namespaces a killed run of this benchmark left behind (named after a pid
        that no longer exists); returns their names."""
        import subprocess

        p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        gone = []
        for line in p.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            pid = name[len("llmio_bench_"):]
            if name.startswith("llmio_bench_") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                gone.append(name)
        return gone

    def __enter__(self) -> "_Netns":
        self.remove_stale()
        self._run("ip", "netns", "add", self.name)
        try:
            self._run("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def shape(self, gbit: float | None) -> str:
        """Shapes lo to ``gbit`` Gbit/s (None: unshaped); returns the qdisc line."""
        import subprocess

        ex = ["ip", "netns", "exec", self.name]
        subprocess.run(ex + ["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        if gbit is not None:
            burst = max(int(gbit * 1e9 / 8 * 0.004), 1 << 20)  # >= one 4 ms tick at the rate, >= 1 MiB (64 KiB MTU)
            self._run(*ex, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{gbit}gbit", "burst",
                      str(burst), "latency", "100ms")
        p = subprocess.run(ex + ["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
        return p.stdout.strip()

    def __exit__(self, *exc: object) -> None:
        import subprocess

        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def step_time_table(steps: int, links: list, int8_threads: int, hooks: list, bucket_caps: list,
                    trace: bool = False) -> dict:
    load0 = f"{os.getloadavg()[0]:.1f}"
    why = _Netns.unavailable()
    rows: dict = {}
    cfg = {"world": 2, "hooks": hooks, "steps": steps, "int8_threads": int8_threads, "bucket_caps": bucket_caps,
           "trace": trace}
    if why is not None:
        print(f"\n## step time on shaped links: network namespaces unavailable ({why}); unshaped only, default "
              f"namespace")
        rows["unshaped"] = _launch("steps", cfg, None, 3600)
        links = [None]
    else:
        try:
            with _Netns() as ns:
                for gbit in links:
                    qd = ns.shape(gbit)
                    label = "unshaped" if gbit is None else f"{gbit:g} Gbit/s"
                    print(f"  [{label}] {qd or 'no qdisc'} (load average {os.getloadavg()[0]:.1f})", flush=True)
                    rows[label] = _launch("steps", cfg, ns.name, 3600)
        except RuntimeError as exc:
            print(f"\n## step time on shaped links: namespace setup failed ({exc}); unshaped only")
            rows = {"unshaped": _launch("steps", cfg, None, 3600)}
    labels = list(rows)
    params = next(iter(rows.values()))["allreduce"]["params"]
    caps_txt = ", ".join(f"{c:g}" for c in bucket_caps)
    print(f"\n## step time, W = 2 on gloo, both ranks in one network namespace, loopback shaped by tc tbf (shared by "
          f"both directions); GPT {params / 1e6:.1f}M params ({params * 4 / 1e6:.1f} MB fp32 gradients), B=4, T=127, "
          f"SGD, DDP bucket_cap_mb {caps_txt}, 1 torch thread + {int8_threads} INT8 thread(s) per rank; every hook "
          f"and bucket size stepped in rounds, {steps} timed rounds; median over rounds of the step time / the plain "
          f"all-reduce's at bucket_cap_mb={bucket_caps[0]:g} in the same round (median ms/step in brackets); load "
          f"average before: {load0}, after: {os.getloadavg()[0]:.1f}")
    for cap in bucket_caps:
        print(f"\n### bucket_cap_mb = {cap:g}")
        print("| hook | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for h in hooks:
            cells = []
            for lab in labels:
                r = rows[lab][_run_key(h, cap, bucket_caps)]
                cells.append(f"n/a ({r['error'][:50]})" if r["error"]
                             else f"{r['ratio']:.2f} x ({r['step_s'] * 1e3:.0f} ms)")
            print(f"| {HOOK_LABEL[h]} | " + " | ".join(cells) + " |")
    if len(bucket_caps) > 1:
        print("\n### each hook at its own best bucket size (the lowest median ratio; ratio to the plain all-reduce "
              "at ITS best size in brackets)")
        print("| hook | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        best: dict = {}
        for lab in labels:
            for h in hooks:
                ok = [(rows[lab][_run_key(h, c, bucket_caps)]["ratio"], c) for c in bucket_caps
                      if not rows[lab][_run_key(h, c, bucket_caps)]["error"]]
                best[(lab, h)] = min(ok) if ok else None
        for h in hooks:
            cells = []
            for lab in labels:
                b, ar = best[(lab, h)], best[(lab, "allreduce")]
                cells.append("n/a" if b is None or ar is None
                             else f"{b[0]:.2f} x @ {b[1]:g} MB ({b[0] / ar[0]:.2f} x)")
            print(f"| {HOOK_LABEL[h]} | " + " | ".join(cells) + " |")
        for lab in labels:
            rows[lab]["best"] = {h: None if best[(lab, h)] is None else {"ratio": best[(lab, h)][0],
                                                                          "bucket_cap_mb": best[(lab, h)][1]}
                                 for h in hooks}
    if trace:
        _print_traces(rows, labels)
    return rows


def _print_traces(rows: dict, labels: list) -> None:
    """The step timelines of ``--trace`` (rank 0, median ms over the timed steps)."""
    keys = ["forward", "backward_compute", "exposed_tail", "tail_kernel_cpu", "tail_wire_wait", "tail_ddp_finish",
            "kernel_cpu_step", "optimizer", "step"]
    print("\n### step timeline (--trace; rank 0, median ms over the timed steps): backward_compute ends at the last "
          "bucket's hook call (every gradient ready); exposed_tail = from there to backward() returning = "
          "tail_kernel_cpu (our kernels on the communication thread) + tail_wire_wait (waiting for collectives) + "
          "tail_ddp_finish (DDP after the last future); kernel_cpu_step: all our kernel time in the step")
    for lab in labels:
        runs = {h: r for h, r in rows[lab].items() if isinstance(r, dict) and r.get("trace")}
        if not runs:
            continue
        print(f"\n#### {lab}")
        print("| run | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for h, r in runs.items():
            print(f"| {h} | " + " | ".join(f"{r['trace'][k]:.1f}" for k in keys) + " |")
        for h, r in runs.items():
            b = r["trace"]["buckets"]
            if b:
                print(f"  {h} per bucket (ms after backward starts; index:event): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in b.items()))


def compression_error_table(n: int = 1 << 16, steps: int = 40, world: int = 2) -> dict:
    """Per-step relative error (L2) of the averaged gradient through the two-phase exchange, default
    and ``deterministic=True``, against the exact mean, on synthetic gradients (per-block scales
    varying over e^N(0,1), a shared signal plus per-rank noise, a few 20x outliers), with error
    feedback over ``steps`` steps (the C++ oracles, which the kernels match bit for bit); and the
    error of the sum over all steps (what error feedback bounds)."""
    sh = n // world
    nb = n // BLOCK
    out = {}
    for det in (False, True):
        rng = np.random.default_rng(0)
        rw = [np.zeros(n, np.float32) for _ in range(world)]
        rs = [np.zeros(sh, np.float32) for _ in range(world)]
        errs, cum_q, cum_t = [], np.zeros(n), np.zeros(n)
        for _ in range(steps):
            base = rng.standard_normal(n) * np.repeat(np.exp(rng.standard_normal(nb)), BLOCK)
            xs = [((base + 0.5 * rng.standard_normal(n)) * 1e-3).astype(np.float32) for _ in range(world)]
            for x in xs:
                x[rng.integers(0, n, 50)] *= 20
            true = sum(x.astype(np.float64) for x in xs) / world
            codes = [np.empty(n, np.int8) for _ in range(world)]
            scales = [np.empty(nb, np.float32) for _ in range(world)]
            if det:
                am = [np.empty(nb, np.float32) for _ in range(world)]
                for r in range(world):
                    _core.block_absmax_ref(xs[r], rw[r], am[r])
                shared = np.max(np.stack(am), axis=0)
                for r in range(world):
                    _core.quantize_blocks_shared_ref(xs[r], rw[r], shared, codes[r], scales[r])
            else:
                for r in range(world):
                    _core.quantize_blocks_ref(xs[r], rw[r], codes[r], scales[r])
            avg = np.empty(n, np.float32)
            for o in range(world):
                cw = np.stack([c[o * sh:(o + 1) * sh] for c in codes])
                c, sc, d = np.empty(sh, np.int8), np.empty(sh // BLOCK, np.float32), np.empty(sh, np.float32)
                if det:
                    _core.dequant_sum_requant_shared_ref(cw, scales[0][o * sh // BLOCK:(o + 1) * sh // BLOCK], rs[o],
                                                         c, sc)
                else:
                    sw = np.stack([s_[o * sh // BLOCK:(o + 1) * sh // BLOCK] for s_ in scales])
                    _core.dequant_sum_requant_ref(cw, sw, rs[o], c, sc)
                _core.dequantize_blocks_ref(c, sc, d)
                avg[o * sh:(o + 1) * sh] = d
            errs.append(np.linalg.norm(avg - true) / np.linalg.norm(true))
            cum_q += avg
            cum_t += true
        out["deterministic" if det else "default"] = {
            "step_error": float(np.mean(errs)), "sum_error": float(np.linalg.norm(cum_q - cum_t) / np.linalg.norm(cum_t))}
    print(f"\n## compression error per step, W = {world}, N = {n:,} synthetic gradients, {steps} steps with error "
          f"feedback (C++ oracles): relative L2 error of the averaged gradient (mean over steps) and of its sum over "
          f"the steps")
    print("| mode | per step | sum over steps |")
    print("|---|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v['step_error']:.4f} | {v['sum_error']:.5f} |")
    print("default quantizes each rank's values with its own block scale, deterministic with the largest over the "
          "ranks (coarser): default's per-step error is the smaller one")
    return out


def convergence_table(cfg: dict, hooks: list, seeds: list) -> dict:
    """Every hook trained once per seed (a seed fixes the initialisation and the data order of all
    hooks alike); each hook's held-out loss relative to the plain all-reduce OF THE SAME SEED,
    then the mean and the spread (min .. max, sample std) of those ratios over the seeds."""
    hooks = [h for h in hooks if h != "no_comm"]
    if "allreduce" not in hooks:
        hooks = ["allreduce"] + hooks
    per_seed: dict = {}
    for seed in seeds:
        per_seed[seed] = _launch("converge", dict(cfg, world=2, hooks=hooks, seed=seed), None, 3600)
        print(f"  [convergence seed {seed}] " + ", ".join(
            f"{h} {r['eval_loss']:.4f}" if r["eval_loss"] is not None else f"{h} n/a"
            for h, r in per_seed[seed].items()), flush=True)
    first = per_seed[seeds[0]]
    print(f"\n## convergence, W = 2 on gloo: GPT {first['allreduce']['params'] / 1e6:.2f}M params (d={cfg['d']}, "
          f"{cfg['layers']} layers, T={cfg['T']}, B={cfg['B']} per rank), character-level "
          f"{os.path.basename(cfg['corpus'])}, AdamW lr {cfg['lr']}, {cfg['steps']} steps; {len(seeds)} seed(s) "
          f"{seeds} (a seed: initialisation and data order, the same for every hook); held-out loss (64 windows) at "
          f"the end relative to the plain all-reduce of the same seed: mean, min .. max and sample std over seeds; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| {'hook':<30} | {'held-out loss':>13} | {'vs all-reduce (mean)':>20} | {'min .. max':>17} | "
          f"{'std':>6} | {'train loss (last 20)':>20} | {'wire vs fp32':>12} |")
    print(f"|{'-' * 32}|{'-' * 15}|{'-' * 22}|{'-' * 19}|{'-' * 8}|{'-' * 22}|{'-' * 14}|")
    summary: dict = {}
    for h in hooks:
        runs = [per_seed[s][h] for s in seeds]
        errs = [r["error"] for r in runs if r["error"]]
        if errs:
            print(f"| {HOOK_LABEL[h]:<30} | n/a: {errs[0][:60]} |")
            summary[h] = {"error": errs[0]}
            continue
        rel = np.array([per_seed[s][h]["eval_loss"] / per_seed[s]["allreduce"]["eval_loss"] - 1 for s in seeds])
        ev = float(np.mean([r["eval_loss"] for r in runs]))
        tr = float(np.mean([r["train_loss_tail"] for r in runs]))
        std = float(np.std(rel, ddof=1)) if len(rel) > 1 else 0.0
        st = runs[0].get("stats") or {}
        wire = f"{st['ratio_vs_fp32']:.3f}" if st.get("ratio_vs_fp32") else "-"
        print(f"| {HOOK_LABEL[h]:<30} | {ev:13.4f} | {rel.mean():+19.2%} | {rel.min():+7.2%} .. {rel.max():+7.2%} "
              f"| {std:6.2%} | {tr:20.4f} | {wire:>12} |")
        summary[h] = {"eval_loss": ev, "train_loss_tail": tr, "rel_mean": float(rel.mean()),
                      "rel_min": float(rel.min()), "rel_max": float(rel.max()), "rel_std": std,
                      "rel_per_seed": rel.tolist(), "error": None, "params": runs[0]["params"], "stats": st}
    print("wire vs fp32: ours from its byte counters; PowerSGD: P + Q values over the values of the matrices it "
          "compresses (its 1-D tensors, all-reduced uncompressed, are not in its count)")
    return {"seeds": seeds, "per_seed": {str(s): r for s, r in per_seed.items()}, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:  # a rank of section 4 or 5 (subprocess)
        import json

        {"steps": _steps_worker, "converge": _converge_worker}[argv[1]](json.loads(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=4_200_000, help="bucket elements for the kernel timing (16.8 MB)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--wire-numel", type=int, default=25 * (1 << 20) // 4, help="bucket for the byte table (25 MB)")
    ap.add_argument("--measure-numel", type=int, default=1 << 18)
    ap.add_argument("--gpt-steps", type=int, default=15, help="timed steps per hook and link (0: skip section 4)")
    ap.add_argument("--bucket-cap-mb", default="25,4,1", help="DDP bucket sizes (MB, comma-separated) of the "
                    "step-time runs, every hook at each; the first is the reference of the ratios (25: DDP's "
                    "default; smaller buckets let communication overlap backward)")
    ap.add_argument("--step-hooks", default=",".join(HOOKS), help="hooks of the step-time table (comma-separated; "
                    "the plain all-reduce is always run)")
    ap.add_argument("--links", default="none,10,2,1", help="Gbit/s of the shaped loopback; none = unshaped")
    ap.add_argument("--int8-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="threads of our CPU kernels per rank (default: cores / 2 ranks)")
    ap.add_argument("--conv-steps", type=int, default=300, help="training steps per hook (0: skip section 5)")
    ap.add_argument("--seeds", type=int, default=3, help="convergence runs per hook, seeds 0..N-1 (mean and spread "
                    "of each hook's loss relative to the plain all-reduce of the same seed)")
    ap.add_argument("--conv-hooks",
                    default=",".join(h for h in HOOKS if h not in ("no_comm", "sync_only", "llmio_int8_whole")),
                    help="hooks of the convergence table (the plain all-reduce is always run)")
    ap.add_argument("--corpus", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                                     "data", "tinyshakespeare.txt"))
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps: a smoke test")
    ap.add_argument("--trace", action="store_true", help="record one rank's step timeline in the step-time runs "
                    "(llmio_native.ddp.exchange.TRACE) and print where the step goes: backward compute, the "
                    "exposed tail after it (our kernels, waiting for the wire, DDP's finish), optimizer")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.numel, a.reps, a.measure_numel = min(a.numel, 1 << 18), 2, 1 << 14
        a.gpt_steps, a.conv_steps, a.links = min(a.gpt_steps, 2), min(a.conv_steps, 6), "none,1"
        a.seeds = min(a.seeds, 2)
        a.bucket_cap_mb = ",".join(a.bucket_cap_mb.split(",")[:2])
    n = a.numel // BLOCK * BLOCK
    print(f"# bench_ddp_hook: {machine()}, torch {torch.__version__}, N = {n:,} fp32, best of {a.reps}")
    result: dict = {"machine": machine(), "numel": n, "cpu_kernels": cpu_kernel_table(n, a.reps)}
    cuda_rows(n, a.reps)
    result["wire"] = wire_table(a.wire_numel)

    import pickle

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.pkl")
        mp.spawn(_measure_worker, args=(2, _free_port(), out, a.measure_numel), nprocs=2, join=True)
        with open(out, "rb") as f:
            m = pickle.load(f)
    print(f"\nmeasured on gloo, W=2, N={a.measure_numel:,}: bytes sent {m['bytes_sent']:,} vs fp32 "
          f"{m['bytes_fp32_allreduce']:,} = {m['ratio_vs_fp32']:.3f} (formula {(1 + 4 / BLOCK) / 4:.3f}); "
          f"step {m['step_s'] * 1e3:.1f} ms")
    result["measured"] = {k: m[k] for k in ("bytes_sent", "bytes_fp32_allreduce", "ratio_vs_fp32", "step_s")}
    result["formula_vs_fp32"] = (1 + 4 / BLOCK) / 4
    if a.gpt_steps > 0:
        links = [None if x.strip() == "none" else float(x) for x in a.links.split(",")]
        try:
            caps = [float(c) for c in a.bucket_cap_mb.split(",") if c.strip()]
        except ValueError:
            ap.error(f"--bucket-cap-mb: expected comma-separated numbers, got {a.bucket_cap_mb!r}")
        if not caps or any(c <= 0 for c in caps):
            ap.error(f"--bucket-cap-mb: expected positive sizes, got {a.bucket_cap_mb!r}")
        step_hooks = [h.strip() for h in a.step_hooks.split(",") if h.strip()]
        if [h for h in step_hooks if h not in HOOKS]:
            ap.error(f"--step-hooks: unknown hook(s) {[h for h in step_hooks if h not in HOOKS]}; known: {HOOKS}")
        step_hooks = ["allreduce"] + [h for h in step_hooks if h != "allreduce"]
        result["step_time"] = step_time_table(a.gpt_steps, links, a.int8_threads, step_hooks, caps, a.trace)
    if a.conv_steps > 0:
        if not os.path.exists(a.corpus):
            print(f"\n## convergence: skipped, corpus {a.corpus} not found")
        else:
            cfg = {"corpus": os.path.abspath(a.corpus), "steps": a.conv_steps, "d": 128, "layers": 2, "T": 64,
                   "B": 16, "lr": 3e-3, "int8_threads": a.int8_threads}
            if a.quick:
                cfg.update(d=64, layers=1, B=4)
            conv_hooks = [h.strip() for h in a.conv_hooks.split(",") if h.strip()]
            bad = [h for h in conv_hooks if h not in HOOKS]
            if bad:
                ap.error(f"--conv-hooks: unknown hook(s) {bad}; known: {HOOKS}")
            if a.seeds < 1:
                ap.error(f"--seeds must be >= 1, got {a.seeds}")
            result["compression_error"] = compression_error_table(steps=5 if a.quick else 40)
            result["convergence"] = convergence_table(cfg, conv_hooks, list(range(a.seeds)))
    chart = step_time_chart(result.get("step_time"))
    if chart:
        result["chart"] = chart
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


def step_time_chart(step_time: dict | None) -> dict | None:
    """The bars ``llmio bench hook`` draws: for every link, each hook's step time relative to
    the plain fp32 all-reduce at DDP's default bucket size, each hook at its own best bucket
    size (so the all-reduce's own bar can sit below 1). None without a step-time table.

    Raises:
        Nothing.
    """
    if not step_time:
        return None
    bars = []
    for link, rows in step_time.items():
        best = rows.get("best") or {}
        for h in HOOKS:
            b = best.get(h)
            if not b or b.get("ratio") is None:
                continue
            kind = "limit" if h == "no_comm" else ("ours" if h.startswith("llmio") else "baseline")
            bars.append({"label": f"{link}: {HOOK_LABEL[h]} @ {b['bucket_cap_mb']:g} MB", "value": float(b["ratio"]),
                         "kind": kind})
    if not bars:
        return None
    return {"title": "llmio bench hook: DDP step time, W = 2 on gloo, shaped loopback (lower is better)",
            "unit": "x the fp32 all-reduce step at 25 MB buckets", "bars": bars}


if __name__ == "__main__":
    sys.exit(main())
