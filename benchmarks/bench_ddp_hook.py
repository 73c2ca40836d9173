#!/usr/bin/env python3
"""INT8 gradient hook benchmark.

1. Quantize+pack throughput of the C++ oracle against a torch-composed blockwise quantizer
   and a plain memcpy of the same fp32 input (the memory limit), GB/s of fp32 input.
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
4. Step time on gloo (W = 2, CPU) of a small GPT with the default all-reduce, PyTorch's
   bf16_compress_hook and quantization_pertensor_hook (both reported n/a where they refuse
   CPU/gloo, with their reason) and ours. Loopback gloo has no wire to save, so this is the
   hook's CPU cost; the network saving is table 3.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time

import numpy as np
import torch

from llmio_native import _core

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
    print(f"deterministic: + (W-1)/W * 4N/256 over flat; hierarchical: inter-node INT8 bytes 2 (M-1)/M * (N/L) "
          f"* (1 + 4/256) with M = W/L nodes, plus intra-node (L-1)/L * N * (4 + bucket bytes) over NVLink/PCIe")
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


def _gpt_worker(rank: int, world: int, port: int, out: str, hook_name: str, steps: int) -> None:
    import pickle

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, quantization_hooks

    from llmio_native.ddp import Int8CompressState, int8_compress_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_TinyGPT())
    state = None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    err = ""
    times = []
    try:
        if hook_name == "bf16_compress_hook":
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif hook_name == "quantization_pertensor_hook":
            model.register_comm_hook(None, quantization_hooks.quantization_pertensor_hook)
        elif hook_name == "llmio int8_compress_hook":
            state = Int8CompressState(warmup_steps=2)
            model.register_comm_hook(state, int8_compress_hook)
        for i in range(steps + 3):
            x = torch.randint(0, 2048, (4, 128), generator=g)
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 3:  # after DDP rebuilt its buckets and the hook's warm-up
                times.append(time.perf_counter() - t0)
    except Exception as exc:  # a hook that does not run on CPU/gloo: reported, not fatal
        err = f"{type(exc).__name__}: {str(exc)[:120]}"
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        with open(out, "wb") as f:
            pickle.dump({"step_s": float(np.median(times)) if times else float("nan"), "error": err,
                         "params": params, "stats": state.stats() if state is not None else None}, f)
    import gc

    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def gpt_step_table(steps: int) -> list[dict]:
    import pickle

    import torch.multiprocessing as mp

    hooks = ["allreduce (no hook)", "bf16_compress_hook", "quantization_pertensor_hook", "llmio int8_compress_hook"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for h in hooks:
            out = os.path.join(tmp, "g.pkl")
            mp.spawn(_gpt_worker, args=(2, _free_port(), out, h, steps), nprocs=2, join=True)
            with open(out, "rb") as f:
                rows.append((h, pickle.load(f)))
    params = rows[0][1]["params"]
    print(f"\n## step time on gloo, W=2, small GPT ({params / 1e6:.1f}M params, B=4, T=127, SGD), "
          f"median of {steps} steps, 1 thread per rank")
    print(f"| {'hook':<30} | {'ms/step':>8} | {'vs allreduce':>12} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 14}|")
    base = rows[0][1]["step_s"]
    for h, r in rows:
        if r["error"]:
            print(f"| {h:<30} | {'n/a':>8} | {r['error'][:60]} |")
        else:
            print(f"| {h:<30} | {r['step_s'] * 1e3:8.1f} | {r['step_s'] / base:12.2f} |")
    st = rows[-1][1]["stats"]
    if st:
        print(f"llmio hook: {st['buckets_compressed']} buckets compressed, {st['buckets_bypassed']} bypassed, "
              f"bytes vs fp32 all-reduce {st['ratio_vs_fp32']:.3f}. On loopback gloo the wire is not the "
              "bottleneck, so this shows the hook's CPU cost, not its network saving.")
    return [{"hook": h, "step_s": r["step_s"] if not r["error"] else None, "error": r["error"] or None,
             "vs_allreduce": r["step_s"] / base if not r["error"] else None, "stats": r["stats"] or None}
            for h, r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 24, help="bucket elements for the kernel timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--wire-numel", type=int, default=25 * (1 << 20) // 4, help="bucket for the byte table (25 MB)")
    ap.add_argument("--measure-numel", type=int, default=1 << 18)
    ap.add_argument("--gpt-steps", type=int, default=20, help="timed steps per hook on the small GPT (0: skip)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    n = a.numel // BLOCK * BLOCK
    print(f"# bench_ddp_hook: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"N = {n:,} fp32, best of {a.reps}")
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    res = np.zeros(n, np.float32)
    codes = np.empty(n, np.int8)
    scales = np.empty(n // BLOCK, np.float32)
    dst = np.empty_like(x)
    xt = torch.from_numpy(x)
    t_ours = best_of(lambda: _core.quantize_blocks_ref(x, res, codes, scales), a.reps)
    t_torch = best_of(lambda: torch_quantize(xt), a.reps)
    t_copy = best_of(lambda: np.copyto(dst, x), a.reps)
    gb = n * 4 / 1e9
    print("\n## quantize + pack (+ residual), GB/s of fp32 input, CPU")
    print(f"| {'implementation':<40} | {'GB/s':>6} | {'vs memcpy':>9} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 11}|")
    for name, t in (("memcpy of the input (limit)", t_copy), ("llmio C++ oracle (with error feedback)", t_ours),
                    ("torch-composed blockwise quantizer", t_torch)):
        print(f"| {name:<40} | {gb / t:6.2f} | {t_copy / t:9.2f} |")
    print(f"llmio / torch-composed = {t_torch / t_ours:.2f}x (the issue's GPU target is >= 6x with fused CUDA kernels)")
    result: dict = {"numel": n, "cpu_quantize_gbps": {"memcpy": gb / t_copy, "llmio_oracle": gb / t_ours,
                                                      "torch_composed": gb / t_torch}}
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
        result["gpt"] = gpt_step_table(a.gpt_steps)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
