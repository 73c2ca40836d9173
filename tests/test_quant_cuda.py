"""INT8 hook CUDA kernels (csrc/cuda/int8_quant.cu) against the CPU oracle, bit for bit.

Everything here needs a GPU and llmio_native._cuda, except the argument checks at the
bottom (they run wherever _cuda is built: they fail before any launch).
"""
from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch

from llmio_native import _core
from llmio_native._native import _cuda
from test_ddp_hook import FakeBucket  # tests/ is on sys.path
from test_quant import dequantize_packed, oracle_packed

pytestmark = pytest.mark.cuda

BLOCK = _core.QUANT_BLOCK
HAVE_GPU = _cuda is not None and hasattr(_cuda, "int8_quantize_pack") and _cuda.device_count() > 0 \
    and torch.cuda.is_available()
SKIP_REASON = ("needs a CUDA GPU and llmio_native._cuda with the INT8 kernels (_cuda: "
               f"{'missing' if _cuda is None else 'built, ' + str(_cuda.device_count()) + ' device(s)'}, "
               f"torch.cuda.is_available(): {torch.cuda.is_available()})")
gpu = pytest.mark.skipif(not HAVE_GPU, reason=SKIP_REASON)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@pytest.fixture(params=["default_stream", "side_stream"])
def on_stream(request):
    """Runs the test with torch's default stream (cuda_stream == 0) or a side stream current."""
    s = torch.cuda.default_stream() if request.param == "default_stream" else torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert (stream() == 0) == (request.param == "default_stream")
        yield s
    torch.cuda.synchronize()


def special(n: int, seed: int, nonfinite: bool = True) -> np.ndarray:
    """Random values with a zero block, denormals, exact .5 quotients, inf and NaN."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.uniform(0.01, 100)).astype(np.float32)
    if n > 3 * BLOCK:
        x[:BLOCK] = 0
        x[BLOCK:2 * BLOCK] = 0
        x[BLOCK + 3] = np.float32(1e-44)  # denormal absmax: the scale underflows to 0
        x[2 * BLOCK:3 * BLOCK] = np.float32(1e-39) * rng.standard_normal(BLOCK).astype(np.float32)  # denormals
    if n > 6 * BLOCK:
        blk = np.float32(127) * np.float32(0.25) * np.arange(-3, 5, dtype=np.float32)  # quotients k/... with halves
        x[3 * BLOCK:3 * BLOCK + blk.size] = blk
        x[3 * BLOCK + BLOCK - 1] = np.float32(127)
    if nonfinite and n > 6 * BLOCK:
        x[4 * BLOCK + 9] = np.inf
        x[5 * BLOCK + 17] = np.nan
    return x


def as_input(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(x).to(dtype)


def oracle_pack(xt: torch.Tensor, res: np.ndarray, n_pad: int, world: int) -> np.ndarray:
    """The CPU oracle's packed bytes of a (CPU) bucket tensor: test_quant.oracle_packed of its fp32 values."""
    return oracle_packed(xt.float().numpy().reshape(-1), res, n_pad, world)


def bits(t) -> np.ndarray:
    a = t.cpu().numpy() if isinstance(t, torch.Tensor) else t
    return a.view(np.uint8)


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,world", [(2048, 1), (2000, 2), (5 * 256 * 3 + 17, 3), (7, 4), (100_003, 8)])
def test_quantize_pack_bit_identical(dtype, n, world, on_stream):
    td = DTYPES[dtype]
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    xt = as_input(special(n, n + world), td)
    res = (np.random.default_rng(1).standard_normal(n_pad) * 0.01).astype(np.float32)
    res[n:] = 0
    exp_res = res.copy()
    expected = oracle_pack(xt, exp_res, n_pad, world)
    d_res = torch.from_numpy(res).cuda()
    send = torch.full((expected.size,), 0xAB, dtype=torch.uint8, device="cuda")
    d_x = xt.cuda()  # kept alive (named) until the kernel has run: a temporary's memory is reused at once
    _cuda.int8_quantize_pack(d_x.data_ptr(), CODE[td], n, n_pad, world, d_res.data_ptr(), send.data_ptr(),
                             stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(send), expected)
    np.testing.assert_array_equal(bits(d_res), bits(exp_res))


@gpu
def test_quantize_pack_unaligned_bucket_uses_scalar_loads(on_stream):
    n, world = 3000, 2
    n_pad = 3072
    base = torch.from_numpy(special(n + 1, 3)).cuda()
    x = base[1:]  # 4-byte offset: no 16-byte vector loads
    res = np.zeros(n_pad, np.float32)
    expected = oracle_pack(x.cpu(), res, n_pad, world)
    d_res = torch.zeros(n_pad, device="cuda")
    send = torch.empty(expected.size, dtype=torch.uint8, device="cuda")
    _cuda.int8_quantize_pack(x.data_ptr(), 0, n, n_pad, world, d_res.data_ptr(), send.data_ptr(), stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(send), expected)
    np.testing.assert_array_equal(bits(d_res), bits(res))


def quantized_copies(world: int, shard: int, seed: int, nan_block: bool = True):
    """world packed slots of one shard, as ranks would send them."""
    rng = np.random.default_rng(seed)
    slots = []
    for r in range(world):
        x = (rng.standard_normal(shard) * (r + 1)).astype(np.float32)
        x[:BLOCK] = 0
        if nan_block and r == world - 1 and shard >= 3 * BLOCK:
            x[2 * BLOCK + 1] = np.nan
        slots.append(oracle_pack(torch.from_numpy(x), np.zeros(shard, np.float32), shard, 1))
    return np.concatenate(slots)


@gpu
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_dequant_sum_requant_bit_identical(world, on_stream):
    shard = 256 * 11
    sb = shard // BLOCK
    recv = quantized_copies(world, shard, world)
    rv = recv.reshape(world, -1)
    codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
    scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
    res = (np.random.default_rng(2).standard_normal(shard) * 0.01).astype(np.float32)
    exp_res = res.copy()
    c = np.empty(shard, np.int8)
    s = np.empty(sb, np.float32)
    _core.dequant_sum_requant_ref(codes_w, scales_w, exp_res, c, s)
    d_res = torch.from_numpy(res).cuda()
    own = torch.empty(shard + 4 * sb, dtype=torch.uint8, device="cuda")
    d_recv = torch.from_numpy(recv).cuda()
    _cuda.int8_dequant_sum_requant(d_recv.data_ptr(), world, shard, d_res.data_ptr(), own.data_ptr(), stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(own), np.concatenate([c.view(np.uint8), s.view(np.uint8)]))
    np.testing.assert_array_equal(bits(d_res), bits(exp_res))
    assert np.isnan(s[2]) == (world >= 1 and shard >= 3 * BLOCK)



@gpu
@pytest.mark.parametrize("world", [2, 3])
def test_owner_kernels_near_fp32_max_bit_identical_and_finite(world, on_stream):
    """Issue 9: every rank holds ~3e38 in block 1: the owner's sums (fp32 per-copy / W, and the
    deterministic mean code * scale) stay finite, bit-identical to the CPU oracle."""
    shard = 256 * 3
    sb = shard // BLOCK
    xs = [(np.random.default_rng(r).standard_normal(shard)).astype(np.float32) for r in range(world)]
    for x in xs:
        x[BLOCK:2 * BLOCK] = np.float32(3e38)
        x[BLOCK + 9] = np.float32(-3e38)
    recv = np.concatenate([oracle_pack(torch.from_numpy(x), np.zeros(shard, np.float32), shard, 1) for x in xs])
    rv = recv.reshape(world, -1)
    codes_w = np.ascontiguousarray(rv[:, :shard]).view(np.int8)
    scales_w = np.ascontiguousarray(rv[:, shard:]).view(np.float32)
    er = np.zeros(shard, np.float32)
    c = np.empty(shard, np.int8)
    sc = np.empty(sb, np.float32)
    _core.dequant_sum_requant_ref(codes_w, scales_w, er, c, sc)
    assert np.isfinite(sc).all()
    d_recv, d_res = torch.from_numpy(recv).cuda(), torch.zeros(shard, device="cuda")
    own = torch.empty(shard + 4 * sb, dtype=torch.uint8, device="cuda")
    _cuda.int8_dequant_sum_requant(d_recv.data_ptr(), world, shard, d_res.data_ptr(), own.data_ptr(), stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(own), np.concatenate([c.view(np.uint8), sc.view(np.uint8)]))
    np.testing.assert_array_equal(bits(d_res), bits(er))
    # deterministic: shared scales, integer sum
    g = np.max([np.abs(x).reshape(-1, BLOCK).max(1) for x in xs], axis=0).astype(np.float32)
    shared_codes, shared_sc = [], np.empty(sb, np.float32)
    for x in xs:
        cc = np.empty(shard, np.int8)
        _core.quantize_blocks_shared_ref(x, None, g, cc, shared_sc)
        shared_codes.append(cc)
    cw = np.stack(shared_codes)
    er2 = np.zeros(shard, np.float32)
    c2 = np.empty(shard, np.int8)
    s2 = np.empty(sb, np.float32)
    _core.dequant_sum_requant_shared_ref(cw, shared_sc, er2, c2, s2)
    assert np.isfinite(s2).all()
    d_codes = torch.from_numpy(cw.reshape(-1).view(np.uint8)).cuda()
    d_sc, d_res2 = torch.from_numpy(shared_sc).cuda(), torch.zeros(shard, device="cuda")
    own2 = torch.empty(shard + 4 * sb, dtype=torch.uint8, device="cuda")
    _cuda.int8_dequant_sum_requant_shared(d_codes.data_ptr(), world, shard, d_sc.data_ptr(), d_res2.data_ptr(),
                                          own2.data_ptr(), stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(own2), np.concatenate([c2.view(np.uint8), s2.view(np.uint8)]))
    np.testing.assert_array_equal(bits(d_res2), bits(er2))

@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("world,n", [(1, 700), (2, 2048), (3, 256 * 3 * 4 - 5)])
def test_unpack_dequantize_bit_identical(dtype, world, n, on_stream):
    td = DTYPES[dtype]
    unit = BLOCK * world
    shard = -(-n // unit) * unit // world
    gathered = quantized_copies(world, shard, 7)
    full = dequantize_packed(gathered, world, shard)
    expected = torch.from_numpy(full[:n]).to(td)
    out = torch.full((n + 1,), 7.0, dtype=td, device="cuda")  # one guard element past n
    d_gathered = torch.from_numpy(gathered).cuda()
    _cuda.int8_unpack_dequantize(d_gathered.data_ptr(), world, shard, out.data_ptr(), CODE[td], n, stream())
    got = out.cpu()
    fin = torch.isfinite(expected)
    assert torch.equal(got[:n][fin], expected[fin])  # bitwise for finite values (equal incl. -0 signs below)
    assert torch.equal(got[:n].view(torch.int16 if td != torch.float32 else torch.int32)[fin],
                       expected.view(torch.int16 if td != torch.float32 else torch.int32)[fin])
    assert torch.equal(torch.isnan(got[:n]), torch.isnan(expected)) and bool(torch.isnan(expected).any())
    assert float(got[n]) == 7.0  # nothing written past n


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("world", [2, 3])
def test_deterministic_kernels_bit_identical(dtype, world, on_stream):
    td = DTYPES[dtype]
    n = 256 * 7 * world - 33
    unit = BLOCK * world
    n_pad = -(-n // unit) * unit
    nb = n_pad // BLOCK
    shard = n_pad // world
    xs = [as_input(special(n, 40 + r, nonfinite=(r == 1)), td) for r in range(world)]
    ress = [np.zeros(n_pad, np.float32) for _ in range(world)]
    for r in range(world):
        ress[r][:n] = (np.random.default_rng(r).standard_normal(n) * 0.001).astype(np.float32)
        ress[r][:3 * BLOCK] = 0
    xfs = []
    for r in range(world):
        xf = np.zeros(n_pad, np.float32)
        xf[:n] = xs[r].float().numpy()
        xfs.append(xf)
    # absmax
    ams = []
    for r in range(world):
        am = np.empty(nb, np.float32)
        _core.block_absmax_ref(xfs[r], ress[r], am)
        d_am = torch.empty(nb, device="cuda")
        d_x, d_r = xs[r].cuda(), torch.from_numpy(ress[r]).cuda()  # both alive until the kernel ran
        _cuda.int8_block_absmax(d_x.data_ptr(), CODE[td], n, n_pad, d_r.data_ptr(), d_am.data_ptr(), stream())
        torch.cuda.synchronize()
        np.testing.assert_array_equal(bits(d_am), bits(am))
        ams.append(am)
    g = np.max(ams, axis=0)
    assert np.isinf(g).any()
    # shared quantize + pack (codes only)
    sends = []
    for r in range(world):
        codes = np.empty(n_pad, np.int8)
        scales = np.empty(nb, np.float32)
        er = ress[r].copy()
        _core.quantize_blocks_shared_ref(xfs[r], er, g, codes, scales)
        d_res = torch.from_numpy(ress[r]).cuda()
        send = torch.empty(n_pad, dtype=torch.uint8, device="cuda")
        d_sc = torch.empty(nb, device="cuda")
        d_x, d_g = xs[r].cuda(), torch.from_numpy(g).cuda()
        _cuda.int8_quantize_pack_shared(d_x.data_ptr(), CODE[td], n, n_pad, world, d_res.data_ptr(),
                                        d_g.data_ptr(), send.data_ptr(), d_sc.data_ptr(), stream())
        torch.cuda.synchronize()
        np.testing.assert_array_equal(bits(send), codes.view(np.uint8))
        np.testing.assert_array_equal(bits(d_sc), bits(scales))
        np.testing.assert_array_equal(bits(d_res), bits(er))
        sends.append(codes)
    # owner 0: integer sum with shared scales
    sb = shard // BLOCK
    codes_w = np.stack([c[:shard] for c in sends])
    res_o = (np.random.default_rng(9).standard_normal(shard) * 0.01).astype(np.float32)
    er = res_o.copy()
    c2 = np.empty(shard, np.int8)
    s2 = np.empty(sb, np.float32)
    _core.dequant_sum_requant_shared_ref(codes_w, scales[:sb], er, c2, s2)
    d_res = torch.from_numpy(res_o).cuda()
    own = torch.empty(shard + 4 * sb, dtype=torch.uint8, device="cuda")
    d_codes = torch.from_numpy(codes_w.reshape(-1).view(np.uint8)).cuda()
    d_scales = torch.from_numpy(scales[:sb].copy()).cuda()
    _cuda.int8_dequant_sum_requant_shared(d_codes.data_ptr(), world, shard, d_scales.data_ptr(),
                                          d_res.data_ptr(), own.data_ptr(), stream())
    torch.cuda.synchronize()
    np.testing.assert_array_equal(bits(own), np.concatenate([c2.view(np.uint8), s2.view(np.uint8)]))
    np.testing.assert_array_equal(bits(d_res), bits(er))


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_three_kernels_end_to_end_equal_host_ops(dtype, deterministic, on_stream):
    """W simulated ranks in one process: the device kernels and the host oracle (ddp._HostOps)
    through the same exchange (the collectives done by hand) give identical bits."""
    from llmio_native.ddp import _DeviceOps, _HostOps

    td = DTYPES[dtype]
    world, n = 3, 256 * 3 * 5 + 101
    n_pad = -(-n // (BLOCK * world)) * (BLOCK * world)
    shard = n_pad // world
    sb = shard // BLOCK
    packed = shard + 4 * sb
    results = {}
    for name, ops, dev in (("host", _HostOps(), "cpu"), ("cuda", _DeviceOps(torch.device("cuda")), "cuda")):
        xs = [as_input(special(n, 60 + r, nonfinite=(r == 2)), td).to(dev) for r in range(world)]
        res_w = [torch.zeros(n_pad, device=dev) for _ in range(world)]
        res_s = [torch.zeros(shard, device=dev) for _ in range(world)]
        outs = []
        for step in range(3):
            phase1 = shard if deterministic else packed
            sends = [torch.empty(world * phase1, dtype=torch.uint8, device=dev) for _ in range(world)]
            scales = torch.empty(n_pad // BLOCK, device=dev)
            if deterministic:
                ams = []
                for r in range(world):
                    am = torch.empty(n_pad // BLOCK, device=dev)
                    ops.block_absmax(xs[r], n, n_pad, res_w[r], am)
                    ams.append(am)
                g = torch.stack(ams).amax(0)
                for r in range(world):
                    ops.quantize_pack_shared(xs[r], n, n_pad, world, res_w[r], g, sends[r], scales)
            else:
                for r in range(world):
                    ops.quantize_pack(xs[r], n, n_pad, world, res_w[r], sends[r])
            owns = []
            for o in range(world):  # all_to_all by hand
                recv = torch.cat([sends[r][o * phase1:(o + 1) * phase1] for r in range(world)])
                own = torch.empty(packed, dtype=torch.uint8, device=dev)
                if deterministic:
                    ops.dequant_sum_requant_shared(recv, world, shard, scales[o * sb:(o + 1) * sb].contiguous(),
                                                   res_s[o], own)
                else:
                    ops.dequant_sum_requant(recv, world, shard, res_s[o], own)
                owns.append(own)
            gathered = torch.cat(owns)
            out = torch.empty(n, dtype=td, device=dev)
            ops.unpack_dequantize(gathered, world, shard, out, n)
            if dev == "cuda":
                torch.cuda.synchronize()
            outs.append((out.cpu().view(torch.int16 if td != torch.float32 else torch.int32).clone(),
                         gathered.cpu().clone(), [r.cpu().clone() for r in res_w + res_s]))
        results[name] = outs
    for (oh, gh, rh), (oc, gc, rc) in zip(results["host"], results["cuda"]):
        assert torch.equal(gh, gc)  # packed codes and scales, bit for bit
        for a, b in zip(rh, rc):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        fin = ~torch.isnan(oh.view(td))
        assert torch.equal(oh[fin], oc[fin]) and torch.equal(torch.isnan(oh.view(td)), torch.isnan(oc.view(td)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_device_chain_one_process_nccl(deterministic, on_stream):
    """The hook's device path (_two_phase + _drive on the current stream) through a real
    1-rank NCCL group, against the host oracle on the same input."""
    import torch.distributed as dist

    from llmio_native.ddp import _DeviceOps, _HostOps, _drive, _two_phase

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        n, n_pad = 5000, 5120
        x = torch.from_numpy(special(n, 77)).to(torch.bfloat16)
        got = {}
        for name, ops, dev in (("host", _HostOps(), "cpu"), ("cuda", _DeviceOps(torch.device("cuda", 0)), "cuda")):
            group = dist.new_group([0], backend="gloo") if dev == "cpu" else dist.group.WORLD
            buf = x.clone().to(dev)
            res_w, res_s = torch.zeros(n_pad, device=dev), torch.zeros(n_pad, device=dev)
            temps: list = []
            stages = _two_phase(ops, group, 1, 0, buf, n, n_pad, res_w, res_s, buf, n, deterministic, temps)
            fut = _drive(stages, torch.device(dev, 0) if dev == "cuda" else torch.device("cpu"), temps, lambda: buf)
            got[name] = (fut.wait().cpu().view(torch.int16), res_w.cpu().view(torch.int32))
        fin = ~torch.isnan(got["host"][0].view(torch.bfloat16))
        assert torch.equal(got["host"][0][fin], got["cuda"][0][fin])
        assert torch.equal(got["host"][1], got["cuda"][1])
    finally:
        dist.destroy_process_group()


def _nccl_worker(rank: int, world: int, port: int, out: str, on: str = "default_stream") -> None:
    import torch.distributed as dist

    from llmio_native.ddp import Int8CompressState, int8_compress_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")

    s_gpu = Int8CompressState(warmup_steps=0, min_numel=0)
    s_cpu = Int8CompressState(process_group=gloo, warmup_steps=0, min_numel=0)
    same = True
    side = torch.cuda.Stream() if on == "side_stream" else torch.cuda.default_stream()
    for step in range(4):
        x = torch.from_numpy(special(70_001, 1000 * step + rank, nonfinite=(step == 1)))
        with torch.cuda.stream(side):  # the hook on the default stream (cuda_stream 0) or a side stream
            a = int8_compress_hook(s_gpu, FakeBucket(x.cuda())).wait().cpu()
        b = int8_compress_hook(s_cpu, FakeBucket(x.clone())).wait()
        same &= torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
    allg = [torch.empty(70_001, device="cuda") for _ in range(world)]
    dist.all_gather(allg, a.cuda())
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({"same_as_cpu": same, "replicas": all(torch.equal(allg[0].nan_to_num(), t.nan_to_num())
                                                              for t in allg[1:]),
                         "stats": s_gpu.stats()}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not HAVE_GPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL) and _cuda")
@pytest.mark.parametrize("on", ["default_stream", "side_stream"])
def test_hook_on_nccl_equals_gloo_cpu_path(tmp_path, on):
    import torch.multiprocessing as mp

    out = str(tmp_path / "nccl.pkl")
    mp.spawn(_nccl_worker, args=(2, _free_port(), out, on), nprocs=2, join=True)
    with open(out, "rb") as f:
        res = pickle.load(f)
    assert res["same_as_cpu"] and res["replicas"] and res["stats"]["buckets_compressed"] == 4


# ---------------------------------------------------------------- argument checks (no GPU needed)

needs_build = pytest.mark.skipif(_cuda is None or not hasattr(_cuda, "int8_quantize_pack"),
                                 reason="llmio_native._cuda with the INT8 kernels was not built")


@needs_build
def test_bindings_refuse_bad_arguments_before_launching():
    with pytest.raises(ValueError, match="n_pad=500"):
        _cuda.int8_quantize_pack(0, 0, 10, 500, 2, 0, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        _cuda.int8_quantize_pack(0, 5, 10, 512, 2, 0, 0, 1)
    with pytest.raises(ValueError, match="shard"):
        _cuda.int8_dequant_sum_requant(0, 2, 100, 0, 0, 1)
    with pytest.raises(ValueError, match="exceeds"):
        _cuda.int8_unpack_dequantize(0, 2, 256, 0, 0, 513, 1)
    with pytest.raises(ValueError, match="world"):
        _cuda.int8_quantize_pack_shared(0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    assert _cuda.INT8_DTYPES == {"float32": 0, "bfloat16": 1, "float16": 2}


@needs_build
@pytest.mark.skipif(_cuda is not None and _cuda.device_count() > 0,
                    reason="checks that a launch on stream 0 fails only for want of a device")
def test_bindings_accept_stream_zero():
    """torch's default stream is cuda_stream 0: every INT8 binding lets it through argument
    validation, and the call fails only on the missing device (CudaError, not ValueError)."""
    from llmio_native._core import CudaError

    calls = {
        "int8_quantize_pack": lambda: _cuda.int8_quantize_pack(0, 0, 10, 512, 2, 0, 0, 0),
        "int8_dequant_sum_requant": lambda: _cuda.int8_dequant_sum_requant(0, 2, 256, 0, 0, 0),
        "int8_unpack_dequantize": lambda: _cuda.int8_unpack_dequantize(0, 2, 256, 0, 0, 500, 0),
        "int8_block_absmax": lambda: _cuda.int8_block_absmax(0, 1, 10, 256, 0, 0, 0),
        "int8_quantize_pack_shared": lambda: _cuda.int8_quantize_pack_shared(0, 2, 10, 512, 2, 0, 0, 0, 0, 0),
        "int8_dequant_sum_requant_shared": lambda: _cuda.int8_dequant_sum_requant_shared(0, 2, 256, 0, 0, 0, 0),
    }
    for name, call in calls.items():
        with pytest.raises(CudaError) as ei:
            call()
        assert not isinstance(ei.value, ValueError), name
        assert name in str(ei.value) and "stream" not in str(ei.value), (name, str(ei.value))
