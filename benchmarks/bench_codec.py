#!/usr/bin/env python3
"""Token codec benchmark: compression ratio against the order-0 entropy bound, and encode /
decode speed of ``rans`` (CPU and GPU), zstd -3 and, where installed, nVIDIA nvCOMP.

Datasets (one table each):

  zipf-50257   Zipf ids over a 50,257 vocabulary (uint16), the exponent solved numerically
               so that the order-0 entropy of the distribution is 9.33 bits/token
  zipf-128256  Zipf ids over a 128,256 vocabulary (uint32), entropy 9.85 bits/token
               (the issue's ideal ratio 3.25 for 4-byte tokens: 32 / 3.25)
  shakespeare  examples/data/tinyshakespeare.txt tokenized by a byte-level BPE trained on
               it with the tokenizers library (the BPE of ``llmio pack --train-bpe``);
               skipped, with the reason printed, when the file or tokenizers is missing

Ids are drawn by rank and mapped through a fixed random permutation of the vocabulary, so
frequent ids are not the small ones. Data is cut into chunks of 64 KiB of tokens (32768
uint16 / 16384 uint32) and, for rans, into model groups as DatasetWriter does (one model
per ``--model-tokens`` tokens, default 2^24, or the whole data when smaller).

Rows, all single-threaded on the CPU:

  rans CPU     RansModel.encode / RansModel.decode per chunk
  rans1 CPU    Rans1Model (the context-modelled codec of issue 14, DatasetWriter(codec="rans1")):
               encode / decode per chunk at the CPU's best SIMD level (AVX-512, AVX2 or
               scalar; LLMIO_RANS_SIMD caps it); the note also gives decode GB/s at every
               level the CPU runs, the levels timed interleaved in the same run
  zstd -3      zstandard per chunk (the codec DatasetWriter uses for codec="zstd")
  rans(1) GPU  GpuDecoder.decode of every chunk in one launch (the chunks tiled to at least
               ``--gpu-tokens`` tokens so that the GPU is full), timed with CUDA events over
               ``--gpu-repeats`` launches; also the kernel alone (descriptors already on the
               device) and a device-to-device copy of the decoded size (the limit). Only when
               a CUDA GPU and llmio_native._cuda are present.
  nvCOMP       ANS / LZ4 / Cascaded / Bitcomp / GDeflate / zstd batched over the same chunks,
               only when ``nvidia.nvcomp`` is importable (optional, never a dependency)

Columns: ratio = raw bytes / stored bytes, where stored bytes count every chunk as the
writer stores it (a chunk that would not get smaller is stored raw) plus, for rans, the
model region bytes (header + zstd(model)); bound = 8 * token_bytes / H0 with H0 the
empirical order-0 entropy of the whole data; of bound = ratio / bound; encode MB/s of raw
tokens per core (rans: model build included); decode GB/s of decoded tokens per core (the
GPU rows: the whole device). Every decode is checked to round-trip exactly, and the host
emulation of the GPU kernel (llmio_native.dataset.rans.emulate) must equal the CPU decode.

Targets (the rans issue): ratio within 3% of the order-0 bound; CPU decode >= 0.5 GB/s per
core; GPU decode >= 150 GB/s on an H100.

Layout overhead (issue 14): each dataset written by DatasetWriter (zstd, rans, rans1) as one
shard in format v1 (every chunk and model region padded to 4 KiB) and v2 (packed back to
back, the default); overhead = file bytes / (chunk payloads + model regions) - 1, the bytes
the layout adds (padding, the 4 KiB header, the tables). Target: < 0.5 % in v2. ``--layout``
prints only this table.

--study (issue 14) prints, instead, one table of bits/token per codec on real BPE tokens (the
shipped text with a BPE trained on it and with one trained on other text, a second corpus of
Python sources; uint16 and uint32 bytes): H0, conditional entropies and adaptive context
models (estimates), rans, rans1 (payload + model regions), zstd -3 / -19 and xz -9.

Usage: python benchmarks/bench_codec.py [--quick] [--tokens N] [--json out.json] [--study] [--layout] [--cpu-time]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zstandard

import llmio_native as lio
from llmio_native._native import _core, _cuda
from llmio_native.dataset import format as F
from llmio_native.dataset import rans as R
from llmio_native.dataset import rans1 as R1

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine as common_machine  # noqa: E402

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "data" / "tinyshakespeare.txt"  # ships with the repo
CHUNK_BYTES = 64 << 10
TARGET_OF_BOUND = 0.97
TARGET_CPU_GBPS = 0.5
TARGET_GPU_GBPS = 150.0
TARGET1_GPU_GBPS = 100.0  # rans1 (issue 14)
TARGET_LAYOUT_OVERHEAD = 0.005  # file bytes / (payloads + models) - 1, format v2 (issue 14)


@dataclass
class Row:
    dataset: str
    codec: str
    raw_bytes: int
    stored_bytes: int  # chunks as stored + model regions
    model_bytes: int
    bound: float  # order-0 entropy bound on the ratio
    encode_mbps: float | None  # raw MB/s per core
    decode_gbps: float | None  # decoded GB/s (per core on the CPU; whole device on a GPU)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0

    @property
    def of_bound(self) -> float:
        return self.ratio / self.bound if self.bound else 0.0


def machine() -> dict:
    return {**common_machine(), "numpy": np.__version__, "zstandard": zstandard.__version__}


# ----------------------------------------------------------------------------- data
def zipf_probs(vocab: int, s: float) -> np.ndarray:
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -s
    return p / p.sum()


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def solve_zipf_exponent(vocab: int, target_bits: float) -> float:
    """The exponent s of p_k ~ k^-s over ``vocab`` ranks whose entropy is ``target_bits``
    (bisection: the entropy falls as s grows)."""
    if not 0 < target_bits < math.log2(vocab):
        raise ValueError(f"no Zipf law over {vocab} ids has entropy {target_bits} bits")
    lo, hi = 0.0, 8.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if entropy_bits(zipf_probs(vocab, mid)) > target_bits:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def zipf_tokens(n: int, vocab: int, s: float, dtype: Any, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(zipf_probs(vocab, s))
    cdf[-1] = 1.0
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    perm = rng.permutation(vocab)  # rank -> id: frequent ids are not the small ones
    return perm[np.minimum(ranks, vocab - 1)].astype(dtype)


def empirical_h0(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens) if tokens.size else np.zeros(1, np.int64)
    counts = counts[counts > 0].astype(np.float64)
    return entropy_bits(counts / counts.sum()) if counts.size else 0.0


def shakespeare_tokens(vocab: int, tmp: str) -> tuple[np.ndarray | None, str]:
    if not CORPUS.exists():
        return None, f"the corpus {CORPUS} is absent"
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None, "the tokenizers package is not installed"
    from llmio_native.pack import train_bpe

    text = CORPUS.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    tok = train_bpe([text], vocab, os.path.join(tmp, "tokenizer.json"))
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
    assert tok.decode(ids.tolist()) == text  # byte-level BPE is lossless
    return ids, (f"{len(text):,} characters, byte-level BPE vocab {tok.get_vocab_size()} trained here "
                 f"({time.perf_counter() - t0:.1f} s)")


# ----------------------------------------------------------------------------- timing
# The clock of the CPU rows' decode timings: wall time by default; --cpu-time makes it the
# calling thread's CPU time (time.thread_time), so that on a machine shared with other
# work the time the thread spends descheduled does not count (the codecs are
# single-threaded, so its CPU time is the time of one core).
CLOCK: Callable[[], float] = time.perf_counter


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def split_chunks(tokens: np.ndarray) -> list[np.ndarray]:
    per = CHUNK_BYTES // tokens.itemsize
    return [tokens[i : i + per] for i in range(0, tokens.size, per)]


# ----------------------------------------------------------------------------- codecs
@dataclass
class RansEncoded:
    models: list[Any]
    payloads: list[bytes]  # per chunk; raw chunks are left out of model use (see coded)
    coded: list[bool]  # False: the chunk would not get smaller and is stored raw
    model_of: list[int]
    model_bytes: int
    stored: int
    seconds: float


def rans_encode(chunks: list[np.ndarray], group_tokens: int, codec: str = "rans") -> RansEncoded:
    """Encode as DatasetWriter does with ``codec`` ("rans" or "rans1"): one model per group."""
    tb = chunks[0].itemsize
    models, payloads, coded, model_of = [], [], [], []
    model_bytes = stored = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(chunks):  # a group: chunks until it holds group_tokens tokens (DatasetWriter)
        j, n = i, 0
        while j < len(chunks) and n < group_tokens:
            n += chunks[j].size
            j += 1
        if codec == "rans1":
            model = _core.Rans1Model.build(chunks[i:j], tb, F.RANS1_SCALE_BITS, F.RANS1_CTX_BITS)
        else:
            model = _core.RansModel.build(chunks[i:j], tb, F.RANS_SCALE_BITS)
        models.append(model)
        for c in chunks[i:j]:
            p = model.encode(c)
            payloads.append(p)
            model_of.append(len(models) - 1)
        i = j
    seconds = time.perf_counter() - t0
    for m in models:
        model_bytes += len(F.pack_model_region(m))  # header + zstd(model): what the writer stores
    for c, p in zip(chunks, payloads):
        coded.append(len(p) < c.nbytes)
        stored += len(p) if coded[-1] else c.nbytes
    return RansEncoded(models, payloads, coded, model_of, model_bytes, stored + model_bytes, seconds)


def rans_cpu_decode(enc: RansEncoded, chunks: list[np.ndarray], repeats: int) -> float:
    outs = [np.empty_like(c) for c in chunks]
    models = enc.models

    def run() -> None:
        for k, p in enumerate(enc.payloads):
            if enc.coded[k]:
                models[enc.model_of[k]].decode(p, outs[k])
            else:
                outs[k][:] = chunks[k]  # stored raw: a copy

    secs = best_of(repeats, run)
    for o, c in zip(outs, chunks):
        assert np.array_equal(o, c), "rans CPU decode does not round-trip"
    return secs


def rans1_level_decode(enc: RansEncoded, chunks: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Decode seconds (best of ``repeats``) at each SIMD level the CPU runs
    (``_core.rans_simd_levels()``), the levels interleaved within each repeat so that a
    noisy machine weighs on all of them alike; each checked to round-trip. Each timed pass
    follows an untimed one over a few chunks at its level: the scalar code reads other
    tables (the decode image) than the SIMD levels, which would otherwise start cold."""
    levels = _core.rans_simd_levels()["cpu"]
    outs = [np.empty_like(c) for c in chunks]
    best = {lv: float("inf") for lv in levels}
    coded = [k for k in range(len(chunks)) if enc.coded[k]]
    for _ in range(max(1, repeats)):
        for lv in levels:
            for k in coded[:8]:
                enc.models[enc.model_of[k]].decode(enc.payloads[k], outs[k], simd=lv)
            t0 = CLOCK()
            for k, p in enumerate(enc.payloads):
                if enc.coded[k]:
                    enc.models[enc.model_of[k]].decode(p, outs[k], simd=lv)
                else:
                    outs[k][:] = chunks[k]
            best[lv] = min(best[lv], CLOCK() - t0)
            for o, c in zip(outs, chunks):
                assert np.array_equal(o, c), f"rans1 CPU decode ({lv}) does not round-trip"
    return best


def pack_batch(payloads: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """The payloads in one buffer, each at a 4-byte aligned offset (as the kernel needs)."""
    offs, pos = [], 0
    for p in payloads:
        offs.append(pos)
        pos += (len(p) + 3) // 4 * 4
    buf = np.zeros(pos, np.uint8)
    for o, p in zip(offs, payloads):
        buf[o : o + len(p)] = np.frombuffer(p, np.uint8)
    return buf, offs


def rans_emulate_check(enc: RansEncoded, chunks: list[np.ndarray], mod: Any = R) -> int:
    """Decode every rans-coded chunk with the host emulation of the GPU kernel; it must equal
    the CPU decoder (checked against the original tokens, which the CPU decode equals)."""
    sel = [k for k in range(len(chunks)) if enc.coded[k]]
    if not sel:
        return 0
    buf, offs = pack_batch([enc.payloads[k] for k in sel])
    cd, bd = R.descriptors(offs, [len(enc.payloads[k]) for k in sel], [chunks[k].size for k in sel],
                           [enc.model_of[k] for k in sel])
    out = np.zeros(sum(chunks[k].size for k in sel), chunks[0].dtype)
    status = mod.emulate(buf, cd, bd, enc.models, out)
    assert (status == 0).all(), f"kernel emulation status {status[status != 0][:5]}"
    cpu = np.empty_like(out)
    pos = 0
    for k in sel:
        n = chunks[k].size
        enc.models[enc.model_of[k]].decode(enc.payloads[k], cpu[pos : pos + n])
        pos += n
    assert np.array_equal(out, cpu), "the kernel emulation differs from the CPU decoder"
    assert np.array_equal(out, np.concatenate([chunks[k] for k in sel]))
    return len(sel)


def zstd_rows(name: str, chunks: list[np.ndarray], raw: int, bound: float, repeats: int) -> Row:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    dctx = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    frames = [cctx.compress(memoryview(c).cast("B")) for c in chunks]
    enc_s = time.perf_counter() - t0
    stored = sum(min(len(f), c.nbytes) for f, c in zip(frames, chunks))
    outs: list[bytes] = []

    def run() -> None:
        outs.clear()
        for f in frames:
            outs.append(dctx.decompress(f))

    secs = best_of(repeats, run)
    for o, c in zip(outs, chunks):
        assert o == memoryview(c).cast("B").tobytes(), "zstd does not round-trip"
    return Row(name, "zstd -3 (CPU, 1 thread)", raw, stored, 0, bound, raw / enc_s / 1e6, raw / secs / 1e9)


# ----------------------------------------------------------------------------- GPU
def gpu_available() -> tuple[bool, str]:
    if _cuda is None:
        return False, "llmio_native._cuda is not built"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no usable CUDA GPU (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call of ``fn`` on the current stream (CUDA events around ``repeats`` calls,
    after one warm-up call)."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def gpu_rows(name: str, enc: RansEncoded, chunks: list[np.ndarray], raw: int, bound: float,
             min_tokens: int, repeats: int, codec: str = "rans") -> list[Row]:
    import torch

    dev = torch.device("cuda")
    sel = [k for k in range(len(chunks)) if enc.coded[k]]
    if not sel:
        return []
    buf, offs = pack_batch([enc.payloads[k] for k in sel])
    ntok = [chunks[k].size for k in sel]
    per = sum(ntok)
    tiles = max(1, -(-min_tokens // per))  # copies of the chunk set: fill the GPU
    src_off = np.concatenate([np.asarray(offs, np.int64) + t * buf.size for t in range(tiles)])
    cd, bd = R.descriptors(src_off, [len(enc.payloads[k]) for k in sel] * tiles, ntok * tiles,
                           [enc.model_of[k] for k in sel] * tiles)
    dsrc = torch.from_numpy(buf).to(dev).repeat(tiles)  # every tile reads its own bytes
    tb = chunks[0].itemsize
    tdt = torch.int16 if tb == 2 else torch.int32
    total = per * tiles
    out = torch.zeros(total, dtype=tdt, device=dev)
    mod = R1 if codec == "rans1" else R
    dec = mod.GpuDecoder(dev)
    status = dec.decode(dsrc, cd, bd, enc.models, out)
    torch.cuda.synchronize()
    R.check_status(status.cpu().numpy(), [f"{name} chunk {i}" for i in range(len(cd))])
    ref = np.concatenate([chunks[k] for k in sel])
    got = out.cpu().numpy().view(ref.dtype)
    for t in range(tiles):
        assert np.array_equal(got[t * per : (t + 1) * per], ref), "rans GPU decode does not round-trip"
    nbytes = total * tb
    # 1) the Python API, as the loader calls it (descriptor upload included)
    s_api = cuda_time(lambda: dec.decode(dsrc, cd, bd, enc.models, out), repeats)
    # 2) the kernel alone: descriptors and image pointers already on the device
    ptrs = torch.tensor([dec.image_ptr(m) for m in enc.models], dtype=torch.int64, device=dev)
    dcd = torch.from_numpy(cd.view(np.uint8)).to(dev)
    dbd = torch.from_numpy(bd.view(np.uint8)).to(dev)
    st = torch.zeros(len(cd), dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream(dev)

    def kernel() -> None:
        getattr(_cuda, f"{codec}_decode")(dsrc.data_ptr(), dcd.data_ptr(), len(cd), dbd.data_ptr(), len(bd), ptrs.data_ptr(),
                          out.data_ptr(), out.element_size(), st.data_ptr(), stream.cuda_stream,
                          src_nbytes=dsrc.numel(), chunks_host=cd, blocks_host=bd, num_images=len(enc.models),
                          out_tokens=out.numel())

    s_kernel = cuda_time(kernel, repeats)
    torch.cuda.synchronize()
    assert int(st.abs().sum()) == 0
    got = out.cpu().numpy().view(ref.dtype)
    for t in range(tiles):  # the timed launches wrote the same tokens
        assert np.array_equal(got[t * per : (t + 1) * per], ref), f"{codec} GPU decode does not round-trip"
    out2 = torch.empty_like(out)
    s_copy = cuda_time(lambda: out2.copy_(out), repeats)
    gpu = torch.cuda.get_device_name(dev)
    note = f"{gpu}; {len(cd)} chunks ({tiles} tiles), {len(bd)} warps, {nbytes / 2**20:.0f} MiB out"
    stored = enc.stored  # the ratio is the dataset's, whatever decodes it
    return [
        Row(name, f"{codec} GPU (GpuDecoder.decode)", raw, stored, enc.model_bytes, bound, None,
            nbytes / s_api / 1e9, note),
        Row(name, f"{codec} GPU (kernel only)", raw, stored, enc.model_bytes, bound, None, nbytes / s_kernel / 1e9,
            note),
        Row(name, "limit: GPU device-to-device copy", raw, raw, 0, bound, None, nbytes / s_copy / 1e9,
            f"copy of {nbytes / 2**20:.0f} MiB"),
    ]


def nvcomp_rows(name: str, chunks: list[np.ndarray], raw: int, bound: float, repeats: int) -> tuple[list[Row], str]:
    """nvCOMP's batched codecs over the same chunks (optional: nvidia.nvcomp and a GPU)."""
    try:
        from nvidia import nvcomp  # type: ignore[import-not-found]
    except ImportError:
        return [], "nvCOMP: skipped (nvidia.nvcomp is not importable; pip install nvidia-nvcomp-cu13 to compare)"
    ok, why = gpu_available()
    if not ok:
        return [], f"nvCOMP: skipped ({why})"
    import torch

    rows: list[Row] = []
    errors: list[str] = []
    dev_chunks = [torch.from_numpy(c.view(np.int16 if c.itemsize == 2 else np.int32)).to("cuda") for c in chunks]
    arrays = [nvcomp.as_array(t) for t in dev_chunks]
    for alg in ("ANS", "LZ4", "Cascaded", "Bitcomp", "GDeflate", "Zstd"):
        try:
            codec = nvcomp.Codec(algorithm=alg)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            comp = codec.encode(arrays)
            torch.cuda.synchronize()
            enc_s = time.perf_counter() - t0
            stored = sum(min(int(c.buffer_size), ch.nbytes) for c, ch in zip(comp, chunks))
            dec = codec.decode(comp)
            torch.cuda.synchronize()
            for d, ch in zip(dec, chunks):
                got = torch.as_tensor(d, device="cuda").view(torch.uint8).cpu().numpy()
                assert got.tobytes() == memoryview(ch).cast("B").tobytes(), f"nvCOMP {alg} does not round-trip"
            s = cuda_time(lambda: codec.decode(comp), repeats)
            rows.append(Row(name, f"nvCOMP {alg} (GPU, batched)", raw, stored, 0, bound, raw / enc_s / 1e6,
                            raw / s / 1e9, "decode includes nvCOMP's output allocation"))
        except Exception as exc:  # an optional comparison: report and go on
            errors.append(f"{alg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
    msg = f"nvCOMP {getattr(nvcomp, '__version__', '?')}: " + (
        "ok" if not errors else "some codecs failed: " + "; ".join(errors))
    return rows, msg


# ----------------------------------------------------------------------------- study (issue 14)
#
# Bits/token of every codec and of candidate context models on real BPE tokens, in one run.
# Entropy rows do not depend on the token width; byte codecs (zstd, xz) are measured on the
# uint16 and the uint32 bytes. Corpora (all local, nothing downloaded):
#   shakespeare/self   the shipped tinyshakespeare, BPE trained on it
#   shakespeare/other  the same text, BPE trained on OTHER text: Python's standard library
#                      sources (/usr/lib/python3.*/*.py, the usual pretraining case where the
#                      tokenizer was not fitted to the data)
#   pysrc/self         those Python sources, BPE trained on them (a second, larger corpus)
STUDY_VOCAB = 16384


def other_text(limit: int = 5 << 20) -> tuple[str | None, str]:
    """Python's own standard library sources (top-level modules, sorted by name), at most
    ``limit`` characters; None when absent."""
    import glob
    import sysconfig

    stdlib = sysconfig.get_paths().get("stdlib", "")
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    parts, n = [], 0
    for f in files:
        try:
            t = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(t)
        n += len(t)
        if n >= limit:
            break
    if not parts:
        return None, f"no Python sources under {stdlib!r}"
    return "".join(parts)[:limit], f"{len(parts)} files of {stdlib}/*.py"


def study_corpora(tmp: str, vocab: int) -> tuple[list[tuple[str, np.ndarray, str]], list[str]]:
    from llmio_native.pack import train_bpe

    out: list[tuple[str, np.ndarray, str]] = []
    notes: list[str] = []
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return out, ["study: skipped (the tokenizers package is not installed)"]
    shakes = CORPUS.read_text(encoding="utf-8") if CORPUS.exists() else None
    if shakes is None:
        notes.append(f"shakespeare corpora skipped: {CORPUS} is absent")
    other, other_why = other_text()
    if other is None:
        notes.append(f"the 'other text' corpora skipped: {other_why}")

    def encode(tok: Any, text: str) -> np.ndarray:
        ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)
        assert tok.decode(ids.tolist()) == text  # byte-level BPE is lossless
        return ids

    if shakes is not None:
        tok = train_bpe([shakes], vocab, os.path.join(tmp, "shakes.json"))
        out.append(("shakespeare/self", encode(tok, shakes),
                    f"tinyshakespeare ({len(shakes):,} chars), BPE {tok.get_vocab_size()} trained on it"))
    if other is not None:
        tok = train_bpe([other], vocab, os.path.join(tmp, "other.json"))
        if shakes is not None:
            out.append(("shakespeare/other", encode(tok, shakes),
                        f"tinyshakespeare, BPE {tok.get_vocab_size()} trained on other text ({other_why}, "
                        f"{len(other):,} chars)"))
        out.append(("pysrc/self", encode(tok, other),
                    f"{other_why} ({len(other):,} chars), BPE {tok.get_vocab_size()} trained on it"))
    return out, notes


def cond_entropy_bits(ctx: np.ndarray, nxt: np.ndarray) -> float:
    """Empirical H(next | ctx) in bits/token (static: the model's own cost not counted)."""
    if ctx.size == 0:
        return 0.0
    key = ctx.astype(np.uint64) << np.uint64(32) | nxt.astype(np.uint64)
    _, pair_counts = np.unique(key, return_counts=True)
    _, ctx_counts = np.unique(ctx, return_counts=True)
    n = float(ctx.size)
    hp = -(pair_counts * np.log2(pair_counts / n)).sum()
    hc = -(ctx_counts * np.log2(ctx_counts / n)).sum()
    return float((hp - hc) / n)


def ranks_of(tokens: np.ndarray) -> np.ndarray:
    counts = np.bincount(tokens)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[tokens]


def adaptive_bits(tokens: np.ndarray, order: int, beta: float = 2.0) -> float:
    """Bits/token of an adaptive (one-pass, so its model is paid for as it is learned)
    context model blended down to an adaptive order-0: p = (n(ctx,s) + beta * p_lower(s)) /
    (n(ctx) + beta), order-0 with a uniform floor over the vocabulary. An estimate of what
    a transmitted static model of that order can reach."""
    vocab = int(tokens.max()) + 1 if tokens.size else 1
    toks = tokens.tolist()
    n0 = [0] * vocab
    tot0 = 0
    tabs: list[dict] = [dict() for _ in range(order)]  # order k: ctx tuple -> {sym: count}
    tots: list[dict] = [dict() for _ in range(order)]
    bits = 0.0
    log2 = math.log2
    for i, s in enumerate(toks):
        p = (n0[s] + 0.5) / (tot0 + 0.5 * vocab)
        for k in range(1, order + 1):
            if i < k:
                break
            c = tuple(toks[i - k : i]) if k > 1 else toks[i - 1]
            t = tabs[k - 1].get(c)
            if t is None:
                t = tabs[k - 1][c] = {}
                tots[k - 1][c] = 0
            nc = tots[k - 1][c]
            p = (t.get(s, 0) + beta * p) / (nc + beta)
            t[s] = t.get(s, 0) + 1
            tots[k - 1][c] = nc + 1
        bits -= log2(p)
        n0[s] += 1
        tot0 += 1
    return bits / max(1, len(toks))


def study(tmp: str, vocab: int, model_tokens: int, out_json: dict) -> None:
    import lzma

    corpora, notes = study_corpora(tmp, vocab)
    print("## study: bits/token on real BPE tokens (issue 14)")
    print(f"- corpora are ~300K-1.5M tokens, far below the issue's >= 2^24: model costs weigh more here")
    print("- zstd / xz compress the whole token stream as one frame (their best case); rans rows count the")
    print("  chunk payloads (64 KiB chunks) plus the model region as the writer stores them")
    print("- static H(.|.) rows leave out the model's cost (a lower bound for a transmitted model);")
    print("  adaptive rows learn as they go, so their model cost is included")
    print()
    table: list[dict] = []
    for name, ids, why in corpora:
        h0 = empirical_h0(ids)
        n = ids.size
        prev, nxt = ids[:-1], ids[1:]
        rank = ranks_of(ids)
        row: dict[str, Any] = {"corpus": name, "tokens": int(n), "source": why, "H0": h0}
        row["H(next|class64)"] = cond_entropy_bits(np.minimum(rank[:-1], 63), nxt)
        row["H(next|prev)"] = cond_entropy_bits(prev, nxt)
        row["H(next|prev2)"] = cond_entropy_bits(ids[:-2].astype(np.uint64) * np.uint64(1 << 20) + ids[1:-1], ids[2:])
        t0 = time.perf_counter()
        row["adaptive order-1"] = adaptive_bits(ids, 1)
        row["adaptive order-2"] = adaptive_bits(ids, 2)
        row["_adaptive_s"] = time.perf_counter() - t0
        for dt in (np.uint16, np.uint32):
            toks = ids.astype(dt)
            w = np.dtype(dt).itemsize * 8
            raw = toks.tobytes()
            row[f"zstd -3 u{w}"] = 8 * len(zstandard.ZstdCompressor(level=3).compress(raw)) / n
            row[f"zstd -19 u{w}"] = 8 * len(zstandard.ZstdCompressor(level=19).compress(raw)) / n
            row[f"xz -9 u{w}"] = 8 * len(lzma.compress(raw, preset=9)) / n
            enc = rans_encode(split_chunks(toks), model_tokens)
            row[f"rans u{w}"] = 8 * enc.stored / n
            enc1 = rans_encode(split_chunks(toks), model_tokens, "rans1")
            row[f"rans1 u{w}"] = 8 * enc1.stored / n
            row[f"rans1 u{w} model"] = 8 * enc1.model_bytes / n
        table.append(row)
        print(f"- {name}: {n:,} tokens; {why}")
    print()
    keys = [k for k in (table[0] if table else {}) if k not in ("corpus", "tokens", "source") and not k.startswith("_")]
    print(f"| {'bits/token':<20} | " + " | ".join(f"{r['corpus']:>15}" for r in table) + " |")
    print(f"|{'-' * 22}|" + "|".join("-" * 17 for _ in table) + "|")
    for k in keys:
        print(f"| {k:<20} | " + " | ".join(f"{r[k]:7.3f} ({r[k] / r['H0']:5.3f})" for r in table) + " |")
    print()
    print("(in parentheses: x H0; 'rans1 model': the model regions' share of the rans1 row)")
    for n_ in notes:
        print(n_)
    out_json["study"] = table
    layout = [layout_row(tmp, name, ids, codec, model_tokens, version)
              for name, ids, _ in corpora for codec in ("rans", "rans1") for version in (1, 2)]
    print()
    print("## study: what the shard layout spends (DatasetWriter defaults: 65536-token chunks, uint16)")
    print("- padding: v1: zeros after every chunk and model region up to the next 4 KiB boundary; v2 (packed,")
    print("  the default): up to the next multiple of 8; fixed: the 4 KiB header, the chunk table and the document index")
    print()
    print_layout(layout)
    out_json["layout"] = layout


def layout_row(tmp: str, name: str, ids: np.ndarray, codec: str, model_tokens: int, version: int = 2,
               dtype: Any = np.uint16) -> dict:
    """Write ``ids`` as one DatasetWriter shard (format ``version``: 1 pads every chunk and
    model region to 4 KiB, 2 packs them back to back) and split its file bytes into chunk
    payloads, model regions, padding and the fixed parts (header, tables). ``overhead``: file
    bytes / (payloads + models) - 1, what the layout spends on top of the coded data."""
    d = os.path.join(tmp, f"layout-{name.replace('/', '-')}-{codec}-v{version}")
    with lio.DatasetWriter(d, dtype=np.dtype(dtype).name, codec=codec, rans_model_tokens=model_tokens,
                           overwrite=True, _format_version=version) as w:
        w.add_document(ids.astype(dtype))
    ds = lio.open_dataset(d)
    assert ds.format_version == version
    assert np.array_equal(ds.read(0, ds.num_tokens), ids)
    shards = [p for p in ds.paths]
    file_bytes = sum(os.path.getsize(p) for p in shards)
    payload = int(ds.chunks["stored_bytes"].sum())
    models = 0
    for f, off in sorted(set(zip(ds.chunks["file"].tolist(), ds.chunks["model"].tolist()))):
        if off:
            with open(shards[f], "rb") as fh:
                fh.seek(off)
                models += F.model_region_size(fh.read(F.MODEL_HEADER_BYTES), shards[f], off)
    fixed = 0
    for p in shards:
        with open(p, "rb") as fh:
            hdr = F.unpack_header(fh.read(F.HEADER_BYTES), p)
        fixed += F.HEADER_BYTES + os.path.getsize(p) - hdr["table_offset"]
    padding = file_bytes - payload - models - fixed
    n = ids.size
    shutil.rmtree(d, ignore_errors=True)
    return {"corpus": name, "codec": codec, "version": version, "tokens": int(n), "file": file_bytes,
            "payload": payload, "models": models, "padding": padding, "fixed": fixed,
            "overhead": file_bytes / (payload + models) - 1,
            "overhead_no_header": (file_bytes - F.HEADER_BYTES * len(shards)) / (payload + models) - 1,
            "bits_file": 8 * file_bytes / n,
            "bits_packed": 8 * (file_bytes - padding) / n}


def print_layout(layout: list[dict]) -> None:
    """The layout table: v1 (4 KiB-aligned chunks) against v2 (packed) per corpus and codec."""
    print(f"| {'corpus':<18} | {'codec':<5} | fmt | {'file bytes':>10} | {'payloads':>10} | {'models':>8} | "
          f"{'padding':>8} | {'fixed':>6} | {'pad %':>5} | {'overhead %':>10} | {'w/o header':>10} | "
          f"{'bits/token file':>15} |")
    print(f"|{'-' * 20}|{'-' * 7}|-----|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 7}|"
          f"{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    for r in layout:
        print(f"| {r['corpus']:<18} | {r['codec']:<5} | v{r['version']}  | {r['file']:>10,} | {r['payload']:>10,} | "
              f"{r['models']:>8,} | {r['padding']:>8,} | {r['fixed']:>6,} | {100 * r['padding'] / r['file']:5.2f} | "
              f"{100 * r['overhead']:10.3f} | {100 * r['overhead_no_header']:10.3f} | {r['bits_file']:15.3f} |")
    print()
    print("overhead % = file bytes / (chunk payloads + model regions) - 1 (padding, the 4 KiB header, the tables);")
    print("w/o header: the same without the 4 KiB header of each shard (what is left at shard scale: the tables,")
    print("48 B per chunk and 8 B per document, and the padding)")


# ----------------------------------------------------------------------------- report
def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(title: str, rows: list[Row], h0: float, tokens: int, extra: list[str]) -> None:
    print(f"## {title}")
    for line in extra:
        print(f"- {line}")
    print(f"- {tokens:,} tokens, order-0 entropy H0 = {h0:.3f} bits/token, bound = {rows[0].bound:.3f}")
    print()
    print(f"| {'codec':<34} | {'ratio':>6} | {'bound':>6} | {'of bound':>8} | {'model B':>9} | "
          f"{'enc MB/s':>8} | {'dec GB/s':>8} | note")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 10}|------")
    for r in rows:
        print(f"| {r.codec:<34} | {r.ratio:6.3f} | {r.bound:6.3f} | {r.of_bound:8.3f} | {r.model_bytes:9,} | "
              f"{fmt(r.encode_mbps, '8.1f'):>8} | {fmt(r.decode_gbps, '8.3f'):>8} | {r.note}")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, well under a minute)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per synthetic dataset (default 2^25; quick 2^20)")
    ap.add_argument("--model-tokens", type=int, default=F.RANS_MODEL_TOKENS,
                    help="rans tokens per model group (default 2^24, DatasetWriter's default)")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="BPE vocabulary for the real tokens (default 8192)")
    ap.add_argument("--repeats", type=int, default=None, help="CPU decode runs, the best counts (default 5; quick 2)")
    ap.add_argument("--gpu-tokens", type=int, default=None,
                    help="tokens per GPU launch, the chunks tiled up to it (default 2^28; quick 2^22)")
    ap.add_argument("--gpu-repeats", type=int, default=20, help="GPU launches timed (default 20)")
    ap.add_argument("--datasets", default="zipf-50257,zipf-128256,shakespeare",
                    help="comma-separated subset of the datasets")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the CPU decodes by the thread's CPU time, not wall time (a shared machine)")
    ap.add_argument("--layout", action="store_true",
                    help="only the layout overhead table (format v1 vs v2) of the datasets, no codec timings")
    ap.add_argument("--study", action="store_true",
                    help="only the context-model study of issue 14: bits/token per codec on real BPE corpora")
    ap.add_argument("--study-vocab", type=int, default=STUDY_VOCAB, help="BPE vocabulary of the study (16384)")
    a = ap.parse_args(argv)
    if a.study:
        print("# bench_codec --study: llmio_native", lio.__version__)
        for k, v in machine().items():
            print(f"#   {k}: {v}")
        res: dict[str, Any] = {"machine": machine()}
        with tempfile.TemporaryDirectory(prefix="llmio_bench_codec_") as tmp:
            study(tmp, a.study_vocab, a.model_tokens, res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    ntok = a.tokens or (1 << 20 if a.quick else 1 << 25)
    repeats = a.repeats or (2 if a.quick else 5)
    if a.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    gpu_tokens = a.gpu_tokens or (1 << 22 if a.quick else 1 << 28)
    wanted = [d.strip() for d in a.datasets.split(",") if d.strip()]

    print("# bench_codec: llmio_native", lio.__version__)
    for k, v in machine().items():
        print(f"#   {k}: {v}")
    gpu_ok, gpu_why = gpu_available()
    print(f"#   GPU: {gpu_why if gpu_ok else 'none (' + gpu_why + ')'}")
    print(f"#   chunks of {CHUNK_BYTES >> 10} KiB of tokens; rans: scale_bits {F.RANS_SCALE_BITS}, one model per "
          f"{a.model_tokens:,} tokens; CPU rows single-threaded, decode best of {repeats} "
          f"({'thread CPU time' if a.cpu_time else 'wall time'})")
    print()

    specs: list[tuple[str, int, float, Any]] = [("zipf-50257", 50257, 9.33, np.uint16),
                                                ("zipf-128256", 128256, 32 / 3.25, np.uint32)]
    rows: list[Row] = []
    results: dict[str, Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmio_bench_codec_") as tmp:
        datasets: list[tuple[str, np.ndarray, list[str]]] = []
        for seed, (name, vocab, target, dtype) in enumerate(specs):
            if name not in wanted:
                continue
            s = solve_zipf_exponent(vocab, target)
            h = entropy_bits(zipf_probs(vocab, s))
            print(f"{name}: Zipf exponent s = {s:.6f} gives {h:.4f} bits/token over {vocab:,} ids "
                  f"(target {target:.4f})")
            toks = zipf_tokens(ntok, vocab, s, dtype, seed)
            datasets.append((name, toks, [f"Zipf over {vocab:,} ids ({np.dtype(dtype).name}), s = {s:.6f}, "
                                          f"distribution entropy {h:.3f} bits"]))
        if "shakespeare" in wanted:
            toks, why = shakespeare_tokens(a.bpe_vocab, tmp)
            if toks is None:
                print(f"shakespeare: skipped ({why})")
                notes.append(f"shakespeare: skipped ({why})")
            else:
                print(f"shakespeare: {toks.size:,} tokens ({why})")
                datasets.append(("shakespeare", toks, [f"tinyshakespeare, {why}"]))
        print()

        for name, toks, extra in ([] if a.layout else datasets):
            tb = toks.itemsize
            raw = toks.nbytes
            h0 = empirical_h0(toks)
            bound = 8 * tb / h0 if h0 else float("inf")
            chunks = split_chunks(toks)
            drows: list[Row] = []
            enc = rans_encode(chunks, a.model_tokens)
            dec_s = rans_cpu_decode(enc, chunks, repeats)
            n_emul = rans_emulate_check(enc, chunks)
            nraw = enc.coded.count(False)
            model_bits = ", ".join(f"{m.bits_per_token:.3f}" for m in enc.models[:4]) + (
                ", ..." if len(enc.models) > 4 else "")
            drows.append(Row(name, "rans CPU (1 thread)", raw, enc.stored, enc.model_bytes, bound,
                             raw / enc.seconds / 1e6, raw / dec_s / 1e9,
                             f"{len(enc.models)} model(s), ratio {raw / (enc.stored - enc.model_bytes):.3f} without "
                             f"them; {nraw} raw chunk(s); emulation == CPU on {n_emul} chunks"))
            enc1 = rans_encode(chunks, a.model_tokens, "rans1")
            dec1_s = rans_cpu_decode(enc1, chunks, repeats)
            n_emul1 = rans_emulate_check(enc1, chunks, R1)
            lv_s = rans1_level_decode(enc1, chunks, repeats)
            lv_gbps = {lv: raw / sec / 1e9 for lv, sec in lv_s.items()}
            m1 = enc1.models[0]
            drows.append(Row(name, "rans1 CPU (1 thread)", raw, enc1.stored, enc1.model_bytes, bound,
                             raw / enc1.seconds / 1e6, raw / dec1_s / 1e9,
                             f"{len(enc1.models)} model(s) ({m1.num_contexts} contexts, {m1.num_entries} entries, "
                             f"{m1.num_slots} slots), ratio {raw / (enc1.stored - enc1.model_bytes):.3f} without "
                             f"them; {enc1.coded.count(False)} raw chunk(s); emulation == CPU on {n_emul1} chunks; "
                             f"decode GB/s by SIMD level (interleaved): "
                             + ", ".join(f"{lv} {g:.3f}" for lv, g in lv_gbps.items())
                             + f" (default: {_core.rans_simd_levels()['default']})"))
            drows.append(zstd_rows(name, chunks, raw, bound, repeats))
            if gpu_ok:
                drows += gpu_rows(name, enc, chunks, raw, bound, gpu_tokens, a.gpu_repeats)
                drows += gpu_rows(name, enc1, chunks, raw, bound, gpu_tokens, a.gpu_repeats, "rans1")
            nv_rows, nv_msg = nvcomp_rows(name, chunks, raw, bound, repeats)
            drows += nv_rows
            extra = extra + [f"{len(chunks)} chunks of {CHUNK_BYTES // tb} tokens; model bits/token (expected under "
                             f"its frequencies): {model_bits}", nv_msg]
            print_table(name, drows, h0, toks.size, extra)
            rows += drows
            results[name] = {"tokens": int(toks.size), "token_bytes": tb, "h0_bits": h0, "bound": bound,
                             "chunks": len(chunks), "models": len(enc.models), "raw_chunks": nraw,
                             "rans1_decode_gbps_by_level": lv_gbps}
        # ------------------------------------------------------------ layout overhead (v1 vs v2)
        layout = [layout_row(tmp, name, toks, codec, a.model_tokens, version, toks.dtype)
                  for name, toks, _ in datasets for codec in ("zstd", "rans", "rans1") for version in (1, 2)]
        print("## layout overhead: DatasetWriter shards, format v1 (4 KiB-aligned chunks) vs v2 (packed)")
        print()
        print_layout(layout)
        print()

    # ---------------------------------------------------------------- targets
    print("## targets (the rans issue)")
    print()
    print(f"| {'dataset':<12} | {'check':<44} | {'value':>8} | {'target':>8} | result |")
    print(f"|{'-' * 14}|{'-' * 46}|{'-' * 10}|{'-' * 10}|--------|")
    verdicts: list[dict] = []

    def verdict(ds: str, check: str, value: float, target: float, ok: bool | None) -> None:
        res = "n/a" if ok is None else ("PASS" if ok else "MISS")
        verdicts.append({"dataset": ds, "check": check, "value": value, "target": target, "result": res})
        print(f"| {ds:<12} | {check:<44} | {value:8.3f} | {target:8.3f} | {res:<6} |")

    for lr in layout:
        if lr["version"] == 2:
            verdict(lr["corpus"], f"layout overhead % ({lr['codec']}, v2)", 100 * lr["overhead"],
                    100 * TARGET_LAYOUT_OVERHEAD, lr["overhead"] < TARGET_LAYOUT_OVERHEAD)
    for name in results:
        r = next(x for x in rows if x.dataset == name and x.codec.startswith("rans CPU"))
        verdict(name, "rans ratio / order-0 bound", r.of_bound, TARGET_OF_BOUND, r.of_bound >= TARGET_OF_BOUND)
        verdict(name, "rans CPU decode GB/s per core", r.decode_gbps or 0, TARGET_CPU_GBPS,
                (r.decode_gbps or 0) >= TARGET_CPU_GBPS)
        g = next((x for x in rows if x.dataset == name and x.codec == "rans GPU (kernel only)"), None)
        if g is not None:
            h100 = "H100" in g.note
            verdict(name, "rans GPU decode GB/s" + ("" if h100 else " (not an H100: no verdict)"),
                    g.decode_gbps or 0, TARGET_GPU_GBPS, (g.decode_gbps or 0) >= TARGET_GPU_GBPS if h100 else None)
        r1 = next(x for x in rows if x.dataset == name and x.codec.startswith("rans1 CPU"))
        verdict(name, "rans1 CPU decode GB/s per core", r1.decode_gbps or 0, TARGET_CPU_GBPS,
                (r1.decode_gbps or 0) >= TARGET_CPU_GBPS)
        g1 = next((x for x in rows if x.dataset == name and x.codec == "rans1 GPU (kernel only)"), None)
        if g1 is not None:
            h100 = "H100" in g1.note or "H200" in g1.note
            verdict(name, "rans1 GPU decode GB/s" + ("" if h100 else " (not an H100: no verdict)"),
                    g1.decode_gbps or 0, TARGET1_GPU_GBPS,
                    (g1.decode_gbps or 0) >= TARGET1_GPU_GBPS if h100 else None)
    print()
    if not gpu_ok:
        print(f"rans GPU: not measured ({gpu_why})")
        print(f"rans1 GPU: not measured ({gpu_why})")
    for n in notes:
        print(n)
    print("round trips: every decode above was checked equal to the input tokens")

    if a.json:
        # llmio bench draws this: compression ratio per dataset and codec, the order-0 bound as the limit
        bars = []
        for ds_name in dict.fromkeys(r.dataset for r in rows):
            drows = [r for r in rows if r.dataset == ds_name]
            bound = next((r.bound for r in drows if r.bound), None)
            if bound:
                bars.append({"label": f"{ds_name}: order-0 bound (the limit of rans)", "value": bound, "kind": "limit"})
            bars += [{"label": f"{ds_name}: {r.codec}", "value": r.ratio,
                      "kind": "ours" if r.codec.startswith("rans") else "baseline"} for r in drows]
        chart = {"title": "bench_codec: compression ratio (token bytes / stored bytes, models and layout included)",
                 "unit": "compression ratio", "bars": bars}
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "clock": "thread_time" if a.cpu_time else "perf_counter", "chart": chart,
                       "gpu": gpu_why if gpu_ok else None, "datasets": results,
                       "rows": [{**asdict(r), "ratio": r.ratio, "of_bound": r.of_bound} for r in rows],
                       "targets": verdicts, "layout": layout}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
