"""INT8 comm hook with real processes on gloo: replicas identical, close to the exact average."""
from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmio_native.ddp import Int8CompressState, int8_compress_hook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown() -> None:
    """DDP objects must die before their process group, and no rank may tear gloo down while
    another is still in a collective (a late DDP destructor aborted a worker once)."""
    import gc

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).to(dtype)


def worker(rank: int, world: int, port: int, dtype_name: str, out_dir: str, static: bool = False,
           state_kw: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, dtype_name)
    model = torch.nn.parallel.DistributedDataParallel(make_model(dtype), bucket_cap_mb=0.05, static_graph=static)
    ref = torch.nn.parallel.DistributedDataParallel(make_model(dtype), bucket_cap_mb=0.05, static_graph=static)
    state = Int8CompressState(warmup_steps=1, min_numel=256, **(state_kw or {}))
    model.register_comm_hook(state, int8_compress_hook)
    g = torch.Generator().manual_seed(100 + rank)
    errs, sums_hook, sums_ref = [], None, None
    for step in range(6):
        x = torch.randn(32, 64, generator=g).to(dtype)
        for m in (model, ref):
            m.zero_grad()
            m(x).float().pow(2).mean().backward()
        gh = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        gr = torch.cat([p.grad.flatten().float() for p in ref.parameters()])
        sums_hook = gh.clone() if sums_hook is None else sums_hook + gh
        sums_ref = gr.clone() if sums_ref is None else sums_ref + gr
        errs.append(float((gh - gr).abs().max() / gr.abs().max()))
    # Gather every rank's final gradient to compare replicas bit for bit.
    allg = [torch.empty_like(gh) for _ in range(world)]
    dist.all_gather(allg, gh)
    if rank == 0:
        same = all(torch.equal(allg[0], t) for t in allg[1:])
        with open(os.path.join(out_dir, "result.pkl"), "wb") as f:
            pickle.dump({"same": same, "errs": errs, "stats": state.stats(),
                         "sum_err": float((sums_hook - sums_ref).abs().max() / sums_ref.abs().max()),
                         "state_pickles": pickle.loads(pickle.dumps(state)).process_group is None}, f)
    del model, ref
    teardown()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hook_on_gloo(tmp_path, world, dtype):
    mp.spawn(worker, args=(world, free_port(), dtype, str(tmp_path)), nprocs=world, join=True)
    with open(tmp_path / "result.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["same"], "replicas diverged"
    assert res["stats"]["buckets_compressed"] > 0 and res["stats"]["buckets_bypassed"] > 0
    assert res["stats"]["ratio_vs_fp32"] < 0.3
    tol = 0.05 if dtype == "float32" else 0.08
    assert max(res["errs"][1:]) < tol, res["errs"]  # per-step error: a few quantization steps
    assert res["sum_err"] < max(res["errs"][1:]) + 1e-6  # error feedback: the sum does not drift
    assert res["state_pickles"]


def train_worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    losses = {}
    for mode in ("allreduce", "int8"):
        torch.manual_seed(0)
        teacher = torch.nn.Linear(32, 8)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)), bucket_cap_mb=0.01)
        state = Int8CompressState(min_numel=256)
        if mode == "int8":
            model.register_comm_hook(state, int8_compress_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1000 + rank)
        tail = []
        for step in range(steps):
            x = torch.randn(64, 32, generator=g)
            with torch.no_grad():
                y = torch.tanh(teacher(x))
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= steps - 20:
                tail.append(loss.item())
        losses[mode] = float(np.mean(tail))
        losses[mode + "_compressed"] = state.stats()["buckets_compressed"]
    del model, opt
    if rank == 0:
        with open(os.path.join(out_dir, "conv.pkl"), "wb") as f:
            pickle.dump(losses, f)
    teardown()


def test_convergence_matches_allreduce(tmp_path):
    mp.spawn(train_worker, args=(2, free_port(), str(tmp_path), 300), nprocs=2, join=True)
    with open(tmp_path / "conv.pkl", "rb") as f:
        losses = pickle.load(f)
    assert losses["int8_compressed"] >= 290 and losses["allreduce_compressed"] == 0  # really compressed
    rel = abs(losses["int8"] - losses["allreduce"]) / losses["allreduce"]
    print("convergence", losses, rel)
    assert rel < 0.01, losses


def ckpt_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = make_model(torch.float32)
    model = torch.nn.parallel.DistributedDataParallel(base, bucket_cap_mb=0.02)
    state = Int8CompressState(warmup_steps=1, min_numel=256)
    model.register_comm_hook(state, int8_compress_hook)
    g = torch.Generator().manual_seed(7 + rank)
    for _ in range(4):  # accumulate twice with no_sync, then sync: the hook sees the summed grads
        model.zero_grad()
        with model.no_sync():
            model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
    sd = state.state_dict(base)
    buckets_before = len(state._residuals)
    saved = sum(float((r.astype(np.float64) ** 2).sum()) for r in sd["residuals"].values())
    # A new DDP wrapper with another bucket layout picks the residuals up per parameter.
    model2 = torch.nn.parallel.DistributedDataParallel(base, bucket_cap_mb=0.005)
    state2 = Int8CompressState(warmup_steps=0, min_numel=256)
    state2.load_state_dict(pickle.loads(pickle.dumps(sd)), base)
    model2.register_comm_hook(state2, int8_compress_hook)
    model2.zero_grad()
    model2(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
    restored_all = not state2._pending  # every saved residual was placed into a new bucket
    allg = [torch.empty(sum(p.numel() for p in base.parameters())) for _ in range(world)]
    dist.all_gather(allg, torch.cat([p.grad.flatten() for p in base.parameters()]))
    if rank == 0:
        with open(os.path.join(out_dir, "ckpt.pkl"), "wb") as f:
            pickle.dump({"saved": saved, "names": sorted(sd["residuals"]), "restored_all": restored_all,
                         "buckets": (buckets_before, len(state2._residuals)), "same": all(torch.equal(allg[0], t) for t in allg[1:])}, f)
    del model, model2
    teardown()


def test_state_dict_survives_a_new_bucket_layout(tmp_path):
    mp.spawn(ckpt_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    with open(tmp_path / "ckpt.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["saved"] > 0 and res["names"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    before, after = res["buckets"]
    assert before >= 2 and after >= 1 and before != after  # saved from one layout, loaded into another
    assert res["restored_all"] and res["same"]


@pytest.mark.parametrize("world", [4])
def test_hook_on_gloo_four_ranks(tmp_path, world):
    mp.spawn(worker, args=(world, free_port(), "float32", str(tmp_path)), nprocs=world, join=True)
    with open(tmp_path / "result.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["same"] and max(res["errs"][1:]) < 0.05 and res["stats"]["ratio_vs_fp32"] < 0.3


def test_hook_with_static_graph(tmp_path):
    mp.spawn(worker, args=(2, free_port(), "float32", str(tmp_path), True), nprocs=2, join=True)
    with open(tmp_path / "result.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["same"] and res["stats"]["buckets_compressed"] > 0 and max(res["errs"][1:]) < 0.05


# ---------------------------------------------------------------- deterministic and hierarchical modes


class FakeBucket:
    """What the hook uses of dist.GradBucket, around a given flat tensor."""

    def __init__(self, buf: torch.Tensor, index: int = 0) -> None:
        self._buf, self._index, self._param = buf, index, torch.empty(buf.numel())

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return True

    def parameters(self) -> list:
        return [self._param]


def det_inputs(rank: int, step: int, n: int) -> np.ndarray:
    x = (np.random.default_rng([rank, step]).standard_normal(n) * 2).astype(np.float32)
    x[:256] = 0  # a zero block
    x[300] = np.float32(1e-44) if rank == 0 else 0.0  # a denormal block (scale underflows)
    x[257:300] = 0
    x[301:512] = 0
    if step == 2 and rank == 1:
        x[700] = np.nan  # one rank's NaN: that block is NaN everywhere this step
    return x


def np_quantize_one(v: np.ndarray):
    """numpy model of quantize_one on whole blocks: codes, scales, residual."""
    nb = v.size // 256
    codes = np.zeros(v.size, np.int8)
    scales = np.empty(nb, np.float32)
    res = np.empty_like(v)
    for b in range(nb):
        sl = slice(b * 256, (b + 1) * 256)
        blk = v[sl]
        if not np.isfinite(blk).all():
            scales[b], res[sl] = np.nan, 0
            continue
        s = np.float32(np.abs(blk).max() / np.float32(127))
        scales[b] = s
        if s == 0:
            res[sl] = blk
            continue
        q = np.clip(np.rint(blk / s), -127, 127).astype(np.int8)
        codes[sl], res[sl] = q, blk - q.astype(np.float32) * s
    return codes, scales, res


def np_det_model(world: int, n: int, steps: int, dtype: torch.dtype) -> list:
    """numpy model of the deterministic two-phase exchange (the result every rank must hold)."""
    unit = 256 * world
    n_pad = -(-n // unit) * unit
    shard = n_pad // world
    res_w = [np.zeros(n_pad, np.float32) for _ in range(world)]
    res_s = [np.zeros(shard, np.float32) for _ in range(world)]
    outs = []
    for step in range(steps):
        vs = []
        for r in range(world):
            x = np.zeros(n_pad, np.float32)
            x[:n] = torch.from_numpy(det_inputs(r, step, n)).to(dtype).float().numpy()
            vs.append(x + res_w[r])
        am = []
        for v in vs:
            b = v.reshape(-1, 256)
            am.append(np.where(np.isfinite(b).all(1), np.abs(np.nan_to_num(b)).max(1), np.inf).astype(np.float32))
        g = np.max(am, axis=0)
        sc = np.where(np.isfinite(g), g / np.float32(127), np.nan).astype(np.float32)
        scale_e = np.repeat(sc, 256)
        codes = []
        for r, v in enumerate(vs):
            ok = np.isfinite(scale_e) & (scale_e > 0)
            q = np.zeros(n_pad, np.int8)
            q[ok] = np.clip(np.rint(v[ok] / scale_e[ok]), -127, 127).astype(np.int8)
            res_w[r] = np.where(~np.isfinite(scale_e), np.float32(0),
                                np.where(scale_e == 0, v, v - q.astype(np.float32) * scale_e)).astype(np.float32)
            codes.append(q)
        out = np.empty(n_pad, np.float32)
        for o in range(world):
            sl = slice(o * shard, (o + 1) * shard)
            s_int = np.sum([c[sl].astype(np.int32) for c in codes], axis=0)
            v2 = (s_int.astype(np.float32) / np.float32(world)) * scale_e[sl] + res_s[o]  # mean code * scale
            c2, s2, res_s[o] = np_quantize_one(v2.astype(np.float32))
            out[sl] = c2.astype(np.float32) * np.repeat(s2, 256)
        outs.append(torch.from_numpy(out[:n]).to(dtype).float().numpy())
    return outs


def det_worker(rank: int, world: int, port: int, out_dir: str, n: int, dtype_name: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, dtype_name)
    state = Int8CompressState(warmup_steps=0, min_numel=0, deterministic=True)
    outs = []
    for step in range(steps):
        buf = torch.from_numpy(det_inputs(rank, step, n)).to(dtype)
        fut = int8_compress_hook(state, FakeBucket(buf))
        outs.append(fut.wait().float().clone())
    allo = [[torch.empty(n) for _ in range(world)] for _ in range(steps)]
    for s in range(steps):
        dist.all_gather(allo[s], outs[s])
    if rank == 0:
        with open(os.path.join(out_dir, "det.pkl"), "wb") as f:
            pickle.dump({"outs": [[t.numpy() for t in a] for a in allo], "stats": state.stats()}, f)
    teardown()


@pytest.mark.parametrize("world,n,dtype", [(2, 1000, "float32"), (3, 2900, "float32"), (2, 3000, "bfloat16")])
def test_deterministic_mode_bitwise_equal_to_numpy_model(tmp_path, world, n, dtype):
    steps = 4
    mp.spawn(det_worker, args=(world, free_port(), str(tmp_path), n, dtype, steps), nprocs=world, join=True)
    with open(tmp_path / "det.pkl", "rb") as f:
        res = pickle.load(f)
    model = np_det_model(world, n, steps, getattr(torch, dtype))
    for s in range(steps):
        for r in range(world):  # every rank holds exactly the model's bits (NaN where the model has NaN)
            np.testing.assert_array_equal(res["outs"][s][r], model[s])
            assert res["outs"][s][r].tobytes() == res["outs"][s][0].tobytes()
    assert np.isnan(res["outs"][2][0][512:768]).all() and np.isfinite(res["outs"][2][0][:512]).all()
    assert np.isfinite(res["outs"][3][0]).all()  # the NaN did not stick (residual reset)
    st = res["stats"]
    unit = 256 * world
    n_pad = -(-n // unit) * unit
    shard = n_pad // world
    scale_ar = 2 * (world - 1) * 4 * (n_pad // 256) // world
    assert st["bytes_scale_allreduce"] == steps * scale_ar
    assert st["bytes_sent"] == steps * ((world - 1) * shard + (world - 1) * (shard + 4 * shard // 256) + scale_ar)


def hier_worker(rank: int, world: int, port: int, out_dir: str, local: int, deterministic: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n, steps = 5000, 24
    state = Int8CompressState(warmup_steps=0, min_numel=0, hierarchical=None, local_world_size=local,
                              deterministic=deterministic)
    xs = [(np.random.default_rng(r).standard_normal(n) * (1 + r)).astype(np.float32) for r in range(world)]
    exact = np.mean(np.stack(xs).astype(np.float64), axis=0)
    outs = []
    for _ in range(steps):  # the same gradient every step: error feedback makes the running mean exact
        outs.append(int8_compress_hook(state, FakeBucket(torch.from_numpy(xs[rank].copy()))).wait().clone())
    allg = [torch.empty(n) for _ in range(world)]
    dist.all_gather(allg, outs[0])
    last = [torch.empty(n) for _ in range(world)]
    dist.all_gather(last, outs[-1])
    if rank == 0:
        node_means = [np.mean(np.stack(xs[m * local:(m + 1) * local]), axis=0) for m in range(world // local)]
        o = np.stack([t.numpy() for t in outs]).astype(np.float64)
        with open(os.path.join(out_dir, "hier.pkl"), "wb") as f:
            pickle.dump({"same": all(torch.equal(allg[0], t) for t in allg[1:]) and
                         all(torch.equal(last[0], t) for t in last[1:]),
                         "first": o[0], "exact": exact, "node_means": np.stack(node_means),
                         "run_err": [float(np.abs(o[:k].mean(0) - exact).max()) for k in (1, 4, steps)],
                         "groups": state._groups is not None, "stats": state.stats(),
                         "pickled_groups": pickle.loads(pickle.dumps(state))._groups}, f)
    teardown()


@pytest.mark.parametrize("deterministic", [False, True])
def test_hierarchical_two_fake_nodes(tmp_path, deterministic):
    world, local = 4, 2
    mp.spawn(hier_worker, args=(world, free_port(), str(tmp_path), local, deterministic), nprocs=world, join=True)
    with open(tmp_path / "hier.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["same"] and res["groups"] and res["pickled_groups"] is None
    # One step: the node means are quantized (phase 1, scale <= block absmax / 127) and the
    # cross-node average requantized (phase 2): at most half a step of each.
    blk = lambda a: np.repeat(np.abs(np.pad(a, (0, -a.size % 256))).reshape(-1, 256).max(1), 256)[:a.size]
    bound = (np.max([blk(m) for m in res["node_means"]], axis=0) + blk(res["first"])) / 127 / 2 * 1.001 + 1e-7
    err = np.abs(res["first"] - res["exact"])
    assert (err <= bound).all() and err.max() > 0
    e1, e4, e24 = res["run_err"]
    assert e24 < e1 / 8 and e4 < e1, res["run_err"]  # error feedback: the running mean converges
    st = res["stats"]
    assert st["bytes_sent_full_precision"] > 0 and st["bytes_sent"] == st["bytes_sent_int8"] + st["bytes_sent_full_precision"]
    # Inter-node INT8 bytes: 2 (M-1)/M * N/L * (1 + 4/256) per rank with M = L = 2.
    n_pad = -(-5000 // 1024) * 1024
    if not deterministic:
        assert st["bytes_sent_int8"] == 24 * 2 * 1 * (n_pad // 4 + 4 * (n_pad // 4) // 256)


def test_hierarchical_configuration_errors(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="world size 4 is not divisible by local_world_size 3"):
        Int8CompressState(local_world_size=3)._topology_local(4, 0)
    with pytest.raises(ValueError, match="one node: world size 4, local_world_size 4"):
        Int8CompressState(hierarchical=True, local_world_size=4)._topology_local(4, 0)
    with pytest.raises(ValueError, match="local_world_size"):
        Int8CompressState(hierarchical=True)._topology_local(4, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 8 is not divisible by local_world_size 3"):
        Int8CompressState()._topology_local(8, 0)
    assert Int8CompressState(hierarchical=False)._topology_local(8, 5) == (False, 8, 1, 5, 0)
    assert Int8CompressState(local_world_size=4)._topology_local(4, 1) == (False, 4, 1, 1, 0)  # one node: flat
    with pytest.raises(ValueError, match="local_world_size must be >= 1"):
        Int8CompressState(local_world_size=0)
    with pytest.raises(ValueError, match="hierarchical"):
        Int8CompressState(hierarchical="yes")


def test_state_pickles_without_groups():
    state = Int8CompressState(process_group=lambda: None, deterministic=True, hierarchical=True, local_world_size=2)
    state._groups = (lambda: 1, lambda: 2)  # unpicklable stand-ins for the sub-groups
    state._topo = (4, (True, 2, 2, 0, 0))
    back = pickle.loads(pickle.dumps(state))
    assert back.process_group is None and back._groups is None and back._topo is None
    assert back.deterministic and back.hierarchical and back.local_world_size == 2


@pytest.mark.parametrize("state_kw", [{"hierarchical": True, "local_world_size": 2},
                                      {"hierarchical": None, "local_world_size": 2, "deterministic": True}])
def test_ddp_four_ranks_hierarchical_and_deterministic(tmp_path, state_kw):
    mp.spawn(worker, args=(4, free_port(), "float32", str(tmp_path), False, state_kw), nprocs=4, join=True)
    with open(tmp_path / "result.pkl", "rb") as f:
        res = pickle.load(f)
    assert res["same"], "replicas diverged"
    assert res["stats"]["buckets_compressed"] > 0 and res["stats"]["bytes_sent_full_precision"] > 0
    assert max(res["errs"][1:]) < 0.05, res["errs"]
    assert res["sum_err"] < max(res["errs"][1:]) + 1e-6
    assert res["state_pickles"]


# ---------------------------------------------------------------- issue 9 / 16 regressions


class ParamBucket:
    """A GradBucket over given (real) parameters with a given buffer: the layout stays fixed
    across a restart, so a restored state must continue bit for bit."""

    def __init__(self, buf: torch.Tensor, index: int, params: list, last: bool) -> None:
        self._buf, self._index, self._params, self._last = buf, index, params, last

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list:
        return self._params


def _buckets_of(model: torch.nn.Module) -> list:
    p = dict(model.named_parameters())
    return [[p["2.bias"], p["2.weight"]], [p["0.bias"], p["0.weight"]]]


def _steps(state: Int8CompressState, model: torch.nn.Module, rank: int, first: int, last: int) -> list:
    outs = []
    for step in range(first, last):
        for i, params in enumerate(_buckets_of(model)):
            n = sum(q.numel() for q in params)
            buf = torch.from_numpy((np.random.default_rng([rank, step, i]).standard_normal(n) * 3).astype(np.float32))
            outs.append(int8_compress_hook(state, ParamBucket(buf, i, params, i == 1)).wait().clone())
    return outs


def restart_worker(rank: int, world: int, port: int, out_dir: str, deterministic: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    kw = dict(warmup_steps=1, min_numel=0, deterministic=deterministic)
    # Uninterrupted run: 6 steps.
    ref_model = make_model(torch.float32)
    uninterrupted = _steps(Int8CompressState(**kw), ref_model, rank, 0, 6)
    # Interrupted after 3 steps: pickle (a) a state that knows the names, (b) one that does not, and
    # (c) state_dict(model); everything is then rebuilt (new tensors, new addresses) from bytes.
    old_model = make_model(torch.float32)
    named, anon = Int8CompressState(model=old_model, **kw), Int8CompressState(**kw)
    first_named, first_anon = _steps(named, old_model, rank, 0, 3), _steps(anon, old_model, rank, 0, 3)
    sd_old = named.state_dict(old_model)
    blobs = pickle.dumps((named, anon, sd_old))
    del named, anon, old_model
    res = {"first_same": all(torch.equal(a, b) for a, b in zip(first_named, uninterrupted[:6])) and
                         all(torch.equal(a, b) for a, b in zip(first_anon, uninterrupted[:6]))}
    got = {}
    for mode in ("pickled_named", "pickled_anon", "load_state_dict"):
        named, anon, sd = pickle.loads(blobs)
        new_model = make_model(torch.float32)  # a freshly built model: other tensors
        if mode == "pickled_named":
            state = named
            sd_new = state.state_dict(new_model)  # before any step: by name, not by stale address
            res["sd_names"] = sorted(sd_new["residuals"])
            res["sd_equal"] = (sorted(sd_new["residuals"]) == sorted(sd["residuals"]) and all(
                np.array_equal(sd_new["residuals"][k], sd["residuals"][k]) for k in sd["residuals"]) and all(
                np.array_equal(sd_new["shard_residuals"][k], sd["shard_residuals"][k]) for k in sd["shard_residuals"]))
        elif mode == "pickled_anon":
            state = anon
        else:
            state = Int8CompressState(**kw)
            state.load_state_dict(sd, new_model)
        got[mode] = _steps(state, new_model, rank, 3, 6)
        sd_after = state.state_dict(new_model)
        res[mode + "_sd_after"] = sorted(sd_after["residuals"])
        res[mode + "_sd_nonzero"] = sum(float(np.abs(v).sum()) for v in sd_after["residuals"].values()) > 0
    for mode, outs in got.items():
        res[mode] = all(torch.equal(a, b) for a, b in zip(outs, uninterrupted[6:])) and len(outs) == 6
    fresh = _steps(_fresh_at(kw, 3), make_model(torch.float32), rank, 3, 6)  # same steps, no residuals
    res["differs_without_residuals"] = not all(torch.equal(a, b) for a, b in zip(fresh, uninterrupted[6:]))
    with open(os.path.join(out_dir, f"restart{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    teardown()


def _fresh_at(kw: dict, iteration: int) -> Int8CompressState:
    s = Int8CompressState(**kw)
    s.iteration = iteration
    return s


@pytest.mark.parametrize("deterministic", [False, True])
def test_restart_from_pickle_or_state_dict_continues_bit_for_bit(tmp_path, deterministic):
    """Issue 9: save after 3 steps -> fresh model + unpickled state (or a fresh state and
    load_state_dict) -> the next 3 steps equal an uninterrupted run's, bit for bit; the
    unpickled state's state_dict(new model) names every parameter (it was empty: residuals
    were keyed by the old process's data_ptrs)."""
    mp.spawn(restart_worker, args=(2, free_port(), str(tmp_path), deterministic), nprocs=2, join=True)
    names = ["0.bias", "0.weight", "2.bias", "2.weight"]
    for rank in range(2):
        with open(tmp_path / f"restart{rank}.pkl", "rb") as f:
            res = pickle.load(f)
        assert res["first_same"]
        assert res["sd_names"] == names and res["sd_equal"]
        assert res["pickled_named"] and res["pickled_anon"] and res["load_state_dict"], res
        for mode in ("pickled_named", "pickled_anon", "load_state_dict"):
            assert res[mode + "_sd_after"] == names and res[mode + "_sd_nonzero"], (mode, res)
        assert res["differs_without_residuals"]  # the residuals matter: the check can fail


def test_load_state_dict_validates_and_names_the_problem():
    """Issue 9: wrong types, missing keys and wrong shapes raise TypeError / ValueError naming
    the key, what was expected and what came (no process group needed)."""
    model = make_model(torch.float32)
    state = Int8CompressState()
    good = {"version": 2, "iteration": 5, "residuals": {"2.bias": np.zeros(64, np.float32)}, "shard_residuals": {}}
    cases = [
        ([1, 2], TypeError, r"sd must be a mapping .* got list"),
        ({"version": 2, "residuals": {}}, ValueError, r"missing key 'iteration'"),
        ({"version": 2, "iteration": 1}, ValueError, r"missing key 'residuals'"),
        ({**good, "version": 3}, ValueError, r"sd\['version'\] must be 1 or 2, got 3"),
        ({**good, "iteration": "5"}, TypeError, r"sd\['iteration'\] must be an int, got str"),
        ({**good, "iteration": -1}, ValueError, r"sd\['iteration'\] must be >= 0, got -1"),
        ({**good, "residuals": [np.zeros(64)]}, TypeError, r"sd\['residuals'\] must be a mapping .* got list"),
        ({**good, "residuals": {"2.bias": [0.0] * 64}}, TypeError,
         r"sd\['residuals'\]\['2.bias'\] must be a numpy array or tensor, got list"),
        ({**good, "residuals": {"2.bias": np.zeros(63, np.float32)}}, ValueError,
         r"sd\['residuals'\]\['2.bias'\] has shape \(63,\), expected \(64,\) or \(64,\)"),
        ({**good, "residuals": {"2.weight": np.zeros((256, 64), np.float32)}}, ValueError,
         r"sd\['residuals'\]\['2.weight'\] has shape \(256, 64\), expected \(16384,\) or \(64, 256\)"),
        ({**good, "residuals": {"2.bias": np.zeros(64, np.int32)}}, ValueError, r"must hold floats .* int32"),
        ({**good, "residuals": {"9.weight": np.zeros(4, np.float32)}}, ValueError,
         r"residual for '9.weight', which the model does not have"),
        ({**good, "shard_residuals": {"0.bias": np.zeros(3, np.float32)}}, ValueError,
         r"sd\['shard_residuals'\]\['0.bias'\] has shape \(3,\), expected \(256,\)"),
    ]
    for sd, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            state.load_state_dict(sd, model)
        assert state.iteration == 0 and not state._pending  # nothing applied from a refused dict
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        state.load_state_dict(good, {})
    state.load_state_dict(good, model)
    assert state.iteration == 5 and set(state._pending) == {"2.bias"}
    state.load_state_dict({"version": 1, "iteration": 2, "residuals": {"0.bias": torch.ones(256)}}, model)
    assert state.iteration == 2 and np.array_equal(state._pending["0.bias"][0], np.ones(256, np.float32))


def test_choose_path_gates_host_ops_on_groups_that_take_cpu_tensors():
    """Issue 16.1: a CUDA bucket without usable kernels goes through the host oracle only when
    the group takes CPU tensors; on NCCL alone it is all-reduced plainly (it handed CPU tensors
    to NCCL before)."""
    from llmio_native.ddp import choose_path, group_takes_cpu_tensors

    assert choose_path("cpu", False, "gloo") == "host"
    assert choose_path("cuda", True, "nccl") == "device"
    assert choose_path("cuda", False, "nccl") == "allreduce"
    assert choose_path("cuda", False, "gloo") == "host"
    assert choose_path("cuda", False, "cpu:gloo,cuda:nccl") == "host"
    assert choose_path("cuda", False, "cuda:nccl") == "allreduce"
    assert group_takes_cpu_tensors("gloo") and group_takes_cpu_tensors("cpu:gloo, cuda:nccl")
    assert not group_takes_cpu_tensors("nccl") and not group_takes_cpu_tensors("cuda:nccl")


def test_kernel_gate_uses_our_cuda_module(monkeypatch):
    """The hook asks _native.cuda_usable() (does *our* _cuda see a device), not torch."""
    from llmio_native import _native, ddp

    monkeypatch.setattr(_native, "cuda_usable", lambda: (False, "stub: driver too old"))
    assert ddp.cuda_kernels_usable() == (False, "stub: driver too old")


def gate_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """A 'CUDA' bucket (a CPU tensor reporting device cuda) with the kernels unusable, on a group
    whose backend says nccl: the hook must fall back to the plain all-reduce, with the warning."""
    import warnings

    from llmio_native import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ddp.ops.cuda_kernels_usable = lambda: (False, "stub")  # the hook looks them up in ddp.ops
    dist.get_backend = lambda group=None: "nccl"
    calls = []
    real_host = ddp.ops._HostOps

    class Spy(real_host):
        def quantize_pack(self, *a):  # noqa: D401
            calls.append("host")
            return super().quantize_pack(*a)

    ddp.ops._HostOps = Spy

    x = torch.full((4096,), float(rank + 1))  # on the CPU; choose_path below is told "cuda"
    ddp_choose = ddp.ops.choose_path
    seen = []
    ddp.ops.choose_path = lambda dev, ok, backend: seen.append((ok, backend)) or ddp_choose("cuda", ok, backend)
    state = Int8CompressState(warmup_steps=0, min_numel=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = int8_compress_hook(state, FakeBucket(x)).wait()
    with open(os.path.join(out_dir, f"gate{rank}.pkl"), "wb") as f:
        pickle.dump({"out": out.numpy().copy(), "host_calls": calls, "seen": seen,
                     "bypassed": state.stats()["buckets_bypassed"], "warned": [str(m.message) for m in w]}, f)
    teardown()


def test_hook_falls_back_to_plain_allreduce_on_nccl_without_kernels(tmp_path):
    mp.spawn(gate_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"gate{rank}.pkl", "rb") as f:
            res = pickle.load(f)
        assert res["seen"] == [(False, "nccl")] and res["host_calls"] == [] and res["bypassed"] == 1
        assert np.array_equal(res["out"], np.full(4096, 1.5, np.float32))  # the exact average
        assert any("plain all-reduce" in m for m in res["warned"]), res["warned"]


def disagree_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 0 sees a group without a CPU backend (so: plain all-reduce), rank 1 one with gloo
    (so: host INT8 exchange). Without an agreed path they issue different collectives and
    wait on each other; with it, every rank takes the plain all-reduce."""
    import datetime

    from llmio_native import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    ddp.ops.cuda_kernels_usable = lambda: (False, "stub")
    backend = "nccl" if rank == 0 else "gloo"
    real_choose = ddp.ops.choose_path
    ddp.ops.choose_path = lambda dev, ok, b: real_choose("cuda", ok, backend)
    x = torch.full((4096,), float(rank + 1))

    state = Int8CompressState(warmup_steps=0, min_numel=0)
    res: dict = {}
    try:
        out = int8_compress_hook(state, FakeBucket(x)).wait()
        res = {"out": out.numpy().copy(), "bypassed": state.stats()["buckets_bypassed"]}
    except Exception as exc:  # a mismatch shows up as a collective error/timeout
        res = {"error": repr(exc)}
    with open(os.path.join(out_dir, f"agree{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    teardown()


def test_ranks_that_choose_different_paths_agree_on_one(tmp_path):
    mp.spawn(disagree_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"agree{rank}.pkl", "rb") as f:
            res = pickle.load(f)
        assert "error" not in res, res
        assert res["bypassed"] == 1  # both ranks took the plain all-reduce
        assert np.array_equal(res["out"], np.full(4096, 1.5, np.float32))


def overflow_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Issue 16: torch before 2.13 (the floor is 2.3) has no all_gather_single / reduce_scatter_single,
    # only all_gather_into_tensor / reduce_scatter_tensor: the hook must work without the new names
    # (test_hook_issues_no_deprecated_collective checks that it uses them where torch has them).
    for name in ("all_gather_single", "reduce_scatter_single"):
        if hasattr(dist, name):
            delattr(dist, name)
    n = 4096
    x = (np.random.default_rng(rank).standard_normal(n)).astype(np.float32)
    x[256:512] = np.float32(3e38)  # one block near the fp32 maximum on every rank
    x[300] = np.float32(-3e38)
    out = {}
    configs = {"flat": dict(hierarchical=False), "deterministic": dict(hierarchical=False, deterministic=True),
               "hierarchical": dict(hierarchical=True, local_world_size=2),
               "hierarchical_det": dict(hierarchical=True, local_world_size=2, deterministic=True),
               "allreduce": dict(hierarchical=False, min_numel=10 ** 9)}
    for name, kw in configs.items():
        kw = {"warmup_steps": 0, "min_numel": 0, **kw}
        state = Int8CompressState(**kw)
        out[name] = int8_compress_hook(state, FakeBucket(torch.from_numpy(x.copy()))).wait().numpy().copy()
    if rank == 0:
        with open(os.path.join(out_dir, "overflow.pkl"), "wb") as f:
            pickle.dump(out, f)
    teardown()


def test_values_near_fp32_max_on_every_rank_stay_finite(tmp_path):
    """Issue 9: a block holding ~3e38 on every rank came out NaN (the fp32 sum overflowed before
    the division by W) — flat, deterministic (integer sum * scale), hierarchical (the intra-node
    reduce-scatter) and the plain all-reduce path alike. Also: no torch 2.3+-missing collective
    is called (all_gather_single / reduce_scatter_single raise in the workers)."""
    mp.spawn(overflow_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    with open(tmp_path / "overflow.pkl", "rb") as f:
        out = pickle.load(f)
    for name, o in out.items():
        assert np.isfinite(o).all(), (name, np.flatnonzero(~np.isfinite(o))[:5])
        np.testing.assert_allclose(o[256:512].astype(np.float64), 3e38 * np.where(np.arange(256) == 44, -1, 1),
                                   rtol=0.02, err_msg=name)


def layout_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1",
                      LOCAL_RANK="1" if rank == 1 else "0")  # rank 1 claims local rank 1 on 1-rank nodes: bad
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    state = Int8CompressState(warmup_steps=0, min_numel=0, hierarchical=True)
    t0 = time.monotonic()
    try:
        int8_compress_hook(state, FakeBucket(torch.ones(2048))).wait()
        res = ("no error", "")
    except Exception as exc:  # noqa: BLE001
        res = (type(exc).__name__, str(exc))
    with open(os.path.join(out_dir, f"layout{rank}.pkl"), "wb") as f:
        pickle.dump((res, time.monotonic() - t0), f)
    teardown()  # no rank tears gloo down while the other is still using it (an abort at exit, 1 run in ~7)


def test_bad_hierarchical_layout_raises_on_every_rank_without_hanging(tmp_path):
    """Issue 9: the layout check raised on one rank while the other waited in new_group."""
    import time

    ctx = mp.spawn(layout_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("a rank hung in the hierarchical set-up")
    for rank in range(2):
        (kind, msg), took = pickle.load(open(tmp_path / f"layout{rank}.pkl", "rb"))
        assert kind == "RuntimeError", (rank, kind, msg)
        assert "not laid out node by node" in msg and took < 15, (rank, msg, took)


def ddp_restart_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(3 + rank)

    def step(m: torch.nn.Module) -> None:
        m.zero_grad()
        m(torch.randn(8, 64, generator=g)).pow(2).mean().backward()

    model = torch.nn.parallel.DistributedDataParallel(make_model(torch.float32), bucket_cap_mb=0.02)
    state = Int8CompressState(warmup_steps=1, min_numel=256)  # no model=: pickled by bucket slices
    model.register_comm_hook(state, int8_compress_hook)
    for _ in range(4):
        step(model)
    blob = pickle.dumps(state)
    del model, state
    # A restarted job: new tensors; DDP's first step uses its initial layout, then rebuilds.
    base = make_model(torch.float32)
    model2 = torch.nn.parallel.DistributedDataParallel(base, bucket_cap_mb=0.02)
    state2 = pickle.loads(blob)
    model2.register_comm_hook(state2, int8_compress_hook)
    for _ in range(2):
        step(model2)
    sd = state2.state_dict(base)
    allg = [torch.empty(sum(p.numel() for p in base.parameters())) for _ in range(world)]
    dist.all_gather(allg, torch.cat([p.grad.flatten() for p in base.parameters()]))
    with open(os.path.join(out_dir, f"ddprestart{rank}.pkl"), "wb") as f:
        pickle.dump({"pending_left": len(state2._pending), "names": sorted(sd["residuals"]),
                     "nonzero": all(np.abs(v).sum() > 0 for v in sd["residuals"].values()),
                     "same": all(torch.equal(allg[0], t) for t in allg[1:])}, f)
    del model2
    teardown()


def test_unpickled_state_in_a_restarted_ddp_job_places_every_residual(tmp_path):
    """Issue 9 with real DDP: a state pickled without names, unpickled into a new job (new
    tensors, DDP's initial layout on the first step, its rebuilt one after) places every
    saved residual and state_dict(new model) names every parameter (it returned {})."""
    mp.spawn(ddp_restart_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"ddprestart{rank}.pkl", "rb") as f:
            res = pickle.load(f)
        assert res["pending_left"] == 0 and res["same"], res
        assert res["names"] == ["0.bias", "0.weight", "2.bias", "2.weight"] and res["nonzero"], res


def test_state_pickles_under_the_public_module_path():
    """ddp.py became the ddp/ package: pickles still name llmio_native.ddp.Int8CompressState,
    so pickles made by the single-module version load, and new ones load there."""
    s = Int8CompressState(warmup_steps=3, min_numel=7)
    old_style = pickle.dumps(s, protocol=2)  # GLOBAL opcode: 'c' module '\n' name '\n'
    assert b"cllmio_native.ddp\nInt8CompressState\n" in old_style
    assert b"llmio_native.ddp.state" not in pickle.dumps(s)
    for blob in (old_style, pickle.dumps(s)):
        t = pickle.loads(blob)
        assert type(t) is Int8CompressState and (t.warmup_steps, t.min_numel) == (3, 7)


# ---------------------------------------------------------------- overlap: the CPU exchange runs off the hook call

class UnusedParamNet(torch.nn.Module):
    """Three layers and a parameter that gets no gradient: with find_unused_parameters DDP
    all-reduces its unused-parameter map right after the last bucket's hook."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                        torch.nn.ReLU(), torch.nn.Linear(256, 64))
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def overlap_worker(rank: int, world: int, port: int, out_dir: str, deterministic: bool) -> None:
    """The same DDP training with the exchange on the communication thread (HOST_ASYNC) and inside
    the hook call: records whether each hook's future was complete when the hook returned, the
    gradients of every step and the residuals at the end."""
    import time

    from llmio_native import ddp
    from llmio_native.ddp import exchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    real_qp = ddp.ops._HostOps.quantize_pack
    real_qps = ddp.ops._HostOps.quantize_pack_shared

    def slow_qp(self, *a):  # the exchange takes a while: a synchronous hook would return complete
        time.sleep(0.02)
        return real_qp(self, *a)

    def slow_qps(self, *a):
        time.sleep(0.02)
        return real_qps(self, *a)

    ddp.ops._HostOps.quantize_pack = slow_qp
    ddp.ops._HostOps.quantize_pack_shared = slow_qps
    out = {}
    for mode in ("async", "sync"):
        exchange.HOST_ASYNC = mode == "async"
        torch.manual_seed(0)
        net = UnusedParamNet()
        model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.03, find_unused_parameters=True)
        state = Int8CompressState(warmup_steps=1, min_numel=1024, deterministic=deterministic, model=net)
        calls = []

        def hook(st, bucket, calls=calls):
            fut = int8_compress_hook(st, bucket)
            calls.append((st.iteration, bucket.index(), bucket.is_last(), bucket.buffer().numel(), fut.done()))
            return fut

        model.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(7 + rank)
        grads = []
        for step in range(5):
            x = torch.randn(16, 64, generator=g)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.body.parameters()]).numpy().copy())
            opt.step()
        sd = state.state_dict(net)
        out[mode] = {"calls": calls, "grads": grads, "stats": state.stats(),
                     "res": {k: v.copy() for k, v in sd["residuals"].items()},
                     "shard": {k: v.copy() for k, v in sd["shard_residuals"].items()}}
        del model, opt
    exchange.HOST_ASYNC = True
    with open(os.path.join(out_dir, f"overlap{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    teardown()


@pytest.mark.parametrize("deterministic", [False, True])
def test_cpu_exchange_overlaps_backward_and_matches_the_synchronous_path(tmp_path, deterministic):
    mp.spawn(overlap_worker, args=(2, free_port(), str(tmp_path), deterministic), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"overlap{rank}.pkl", "rb") as f:
            out = pickle.load(f)
        a, s = out["async"], out["sync"]
        assert a["stats"]["buckets_compressed"] == s["stats"]["buckets_compressed"] > 4
        assert a["stats"]["bytes_sent"] == s["stats"]["bytes_sent"]
        # compressed buckets (after warmup, >= min_numel) other than the last of a step: the hook
        # returned before the exchange was done; synchronously every future was complete
        early = [c for c in a["calls"] if c[0] > 1 and c[3] >= 1024 and not c[2]]
        assert len(early) >= 4, a["calls"]
        assert not any(c[4] for c in early), a["calls"]
        assert all(c[4] for c in s["calls"] if c[0] > 1 and c[3] >= 1024), s["calls"]
        # bit for bit: gradients of every step, worker and shard residuals
        assert len(a["grads"]) == len(s["grads"]) == 5
        for ga, gs in zip(a["grads"], s["grads"]):
            np.testing.assert_array_equal(ga.view(np.uint32), gs.view(np.uint32))
        assert a["res"].keys() == s["res"].keys() and len(a["res"]) >= 4
        assert any(np.abs(v).max() > 0 for v in a["res"].values())  # error feedback is in play
        for k in a["res"]:
            np.testing.assert_array_equal(a["res"][k].view(np.uint32), s["res"][k].view(np.uint32), err_msg=k)
        assert a["shard"].keys() == s["shard"].keys()
        for k in a["shard"]:
            np.testing.assert_array_equal(a["shard"][k].view(np.uint32), s["shard"][k].view(np.uint32), err_msg=k)


# ---------------------------------------------------------------- pieces: a large bucket's exchange pipelined

def pieces_worker(rank: int, world: int, port: int, out_dir: str, deterministic: bool, dtype_name: str) -> None:
    """The same DDP training with each bucket's host exchange whole (PIECE_NUMEL = 0) and cut into
    pipelined pieces (PIECE_NUMEL = 1024: several pieces per bucket, an uneven last piece, pieces
    of padding only), and the same two set by ``Int8CompressState(piece_numel=)`` against the other
    module default; gradients of every step, residuals, and the collectives issued per mode."""
    from llmio_native.ddp import exchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, dtype_name)
    real_a2a = dist.all_to_all_single
    counted = {"a2a": 0}

    def a2a(*a, **k):
        counted["a2a"] += 1
        return real_a2a(*a, **k)

    dist.all_to_all_single = a2a
    out = {}
    for mode, piece, state_piece in (("whole", 0, None), ("pieces", 1024, None), ("state_pieces", 0, 1024),
                                     ("state_whole", 1024, 0)):
        exchange.PIECE_NUMEL = piece
        counted["a2a"] = 0
        torch.manual_seed(0)
        # 64*200+200 = 13000 and 200*37+37 = 7437 values: not multiples of 256 * W
        net = torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.ReLU(), torch.nn.Linear(200, 37)).to(dtype)
        model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.04)
        state = Int8CompressState(warmup_steps=1, min_numel=1024, deterministic=deterministic, model=net,
                                  piece_numel=state_piece)
        model.register_comm_hook(state, int8_compress_hook)
        g = torch.Generator().manual_seed(7 + rank)
        grads = []
        for step in range(5):
            x = torch.randn(16, 64, generator=g).to(dtype)
            model.zero_grad()
            model(x).float().pow(2).mean().backward()
            grads.append(torch.cat([p.grad.flatten().float() for p in net.parameters()]).numpy().copy())
        sd = state.state_dict(net)
        out[mode] = {"grads": grads, "stats": state.stats(), "a2a": counted["a2a"],
                     "res": {k: v.copy() for k, v in sd["residuals"].items()},
                     "shard": {k: v.copy() for k, v in sd["shard_residuals"].items()}}
        del model
    exchange.PIECE_NUMEL = 1 << 19
    dist.all_to_all_single = real_a2a
    with open(os.path.join(out_dir, f"pieces{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    teardown()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipelined_pieces_match_the_whole_bucket_exchange_bit_for_bit(tmp_path, deterministic, dtype):
    mp.spawn(pieces_worker, args=(2, free_port(), str(tmp_path), deterministic, dtype), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"pieces{rank}.pkl", "rb") as f:
            out = pickle.load(f)
        w = out["whole"]
        # whole: one all_to_all per compressed bucket (the state's piece_numel=0 overrides a module default
        # that would cut); pieces: several per bucket (the state's piece_numel=1024 overrides a default of 0)
        assert w["a2a"] == w["stats"]["buckets_compressed"]
        assert out["state_whole"]["a2a"] == w["a2a"]
        for mode in ("pieces", "state_pieces", "state_whole"):
            p = out[mode]
            assert w["stats"]["buckets_compressed"] == p["stats"]["buckets_compressed"] >= 4
            assert w["stats"]["bytes_sent"] == p["stats"]["bytes_sent"]  # the counters (and the wire) are unchanged
            if mode != "state_whole":
                assert p["a2a"] >= 3 * p["stats"]["buckets_compressed"], (mode, p["a2a"], p["stats"])
            for gw, gp in zip(w["grads"], p["grads"]):
                np.testing.assert_array_equal(gw.view(np.uint32), gp.view(np.uint32), err_msg=mode)
            assert any(np.abs(v).max() > 0 for v in p["res"].values())  # error feedback is in play
            for key in ("res", "shard"):
                assert w[key].keys() == p[key].keys()
                for k in w[key]:
                    np.testing.assert_array_equal(w[key][k].view(np.uint32), p[key][k].view(np.uint32),
                                                  err_msg=f"{mode} {k}")


def test_piece_numel_option_validates_and_pickles():
    """``Int8CompressState(piece_numel=)``: checked at construction, kept through pickling, and a
    state pickled before the option existed loads with the module default (None)."""
    from llmio_native.ddp import exchange

    assert Int8CompressState().piece_numel is None
    st = Int8CompressState(piece_numel=4096)
    assert pickle.loads(pickle.dumps(st)).piece_numel == 4096
    assert pickle.loads(pickle.dumps(Int8CompressState(piece_numel=0))).piece_numel == 0
    old = st.__getstate__()
    del old["piece_numel"]  # a state pickled by a version without the option
    fresh = Int8CompressState.__new__(Int8CompressState)
    fresh.__setstate__(old)
    assert fresh.piece_numel is None and fresh.warmup_steps == st.warmup_steps
    assert exchange.PIECE_NUMEL == 1 << 19  # the module default is unchanged
    with pytest.raises(ValueError, match="piece_numel must be >= 0"):
        Int8CompressState(piece_numel=-1)
    for bad in (1.5, "1024", True):
        with pytest.raises(TypeError, match="piece_numel must be an int or None"):
            Int8CompressState(piece_numel=bad)


# ---------------------------------------------------------------- no deprecated collectives

_DEPRECATED = r".*(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|_reduce_scatter_base).*"


def nowarn_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """DDP training through the hook, flat (pieces) and hierarchical (reduce-scatter and all-gather
    inside a node), with torch's deprecation warnings of the flat collectives turned into errors
    (raised on the communication thread they reach the hook's future, and backward raises); the
    last flat step recorded by ``exchange.TRACE``."""
    import warnings

    from llmio_native.ddp import exchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("error", message=_DEPRECATED)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"all_gather_single": 0, "reduce_scatter_single": 0}
    for name in calls:
        real = getattr(dist, name, None)
        if real is not None:
            def counted(*a, _real=real, _name=name, **k):
                calls[_name] += 1
                return _real(*a, **k)
            setattr(dist, name, counted)
    out = {}
    for mode, kw in (("flat", {"hierarchical": False, "piece_numel": 1024}),
                     ("hier", {"hierarchical": True, "local_world_size": 2})):
        torch.manual_seed(0)
        net = make_model(torch.float32)
        model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.05)
        state = Int8CompressState(warmup_steps=1, min_numel=256, **kw)
        model.register_comm_hook(state, int8_compress_hook)
        g = torch.Generator().manual_seed(3 + rank)
        for step in range(3):
            if mode == "flat" and step == 2:
                exchange.TRACE = []
            model.zero_grad()
            model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
            if exchange.TRACE is not None:
                out["trace"], exchange.TRACE = exchange.TRACE, None
        out[mode] = state.stats()["buckets_compressed"]
        del model
    out["calls"] = dict(calls)
    with open(os.path.join(out_dir, f"nowarn{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    teardown()


def test_hook_issues_no_deprecated_collective(tmp_path):
    """torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (FutureWarning at every
    call): the hook uses all_gather_single / reduce_scatter_single where torch has them."""
    mp.spawn(nowarn_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        with open(tmp_path / f"nowarn{rank}.pkl", "rb") as f:
            out = pickle.load(f)
        assert out["flat"] >= 2 and out["hier"] >= 2, out
        # the traced step: every compressed bucket's hook call, job, pieces and future, in time order
        trace = out.pop("trace")
        assert [t for t, *_ in trace] == sorted(t for t, *_ in trace)
        names = {e for _, e, _, _ in trace}
        assert {"hook", "job", "job_end", "quant", "quant_end", "a2a_done", "requant_end", "ag_done", "unpack_end",
                "future"} <= names, names
        hooks = {i for _, e, i, _ in trace if e == "hook"}
        jobs = {i for _, e, i, _ in trace if e == "job_end"}
        assert len(hooks) >= 2 and jobs == hooks, (hooks, jobs)
        assert max(k for _, e, _, k in trace if e == "quant") >= 1  # several pieces per bucket
        if hasattr(dist, "all_gather_single"):
            assert out["calls"]["all_gather_single"] >= out["flat"] + 2 * out["hier"], out
        if hasattr(dist, "reduce_scatter_single"):
            assert out["calls"]["reduce_scatter_single"] >= out["hier"], out
