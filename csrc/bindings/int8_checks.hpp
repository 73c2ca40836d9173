// Argument checks of the INT8 hook kernels and of the window cutter, made once,
// by the bindings, before a kernel (_cuda.int8_*, _cuda.cut_windows) or its host
// emulation (_core.int8_*_emulate, _core.cut_windows_emulate) runs: the launchers
// and the emulations trust their parameters. Each failure throws
// std::invalid_argument (ValueError) saying what was expected and what came.
// No Python headers: shared by quant_bindings.cpp (_core) and the _cuda bindings.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "loader/cut_windows_device.hpp"
#include "quant/int8_device.hpp"

namespace llmio {
namespace checks {

[[noreturn]] inline void fail(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

inline void dtype(const char* fn, int code) {
  if (code < 0 || code >= int8::kNumBucketDTypes)
    fail(fn, "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(code));
}

inline void world(const char* fn, uint32_t w) {
  if (w == 0) fail(fn, "world must be >= 1, got 0");
}

// n values padded to n_pad, a multiple of 256 * world.
inline void sizes(const char* fn, uint64_t n, uint64_t n_pad, uint32_t w) {
  if (n > n_pad || n_pad % (uint64_t(int8::kBlock) * w) != 0)
    fail(fn, "need n <= n_pad and n_pad a multiple of " + std::to_string(int8::kBlock) + " * world, got n=" +
                 std::to_string(n) + " n_pad=" + std::to_string(n_pad) + " world=" + std::to_string(w));
}

inline void shard(const char* fn, uint64_t s) {
  if (s % int8::kBlock != 0)
    fail(fn, "shard must be a multiple of " + std::to_string(int8::kBlock) + ", got " + std::to_string(s));
}

inline void fits(const char* fn, uint64_t n, uint64_t s, uint32_t w) {
  if (n > s * w)
    fail(fn, "n=" + std::to_string(n) + " exceeds world * shard = " + std::to_string(s * w) + " (world=" +
                 std::to_string(w) + ", shard=" + std::to_string(s) + ")");
}

inline void aligned(const char* fn, const char* what, const void* p, uintptr_t a) {
  const auto u = reinterpret_cast<uintptr_t>(p);
  if (u & (a - 1)) {
    std::ostringstream o;
    o << what << " must be " << a << "-byte aligned, got address 0x" << std::hex << u << " (" << std::dec
      << (u & (a - 1)) << " bytes past a boundary)";
    fail(fn, o.str());
  }
}

// ---- one function per kernel: everything its launcher and emulation trust

inline void check(const char* fn, const int8::Int8QuantizePackParams& p) {
  dtype(fn, p.dtype);
  world(fn, p.world);
  sizes(fn, p.n, p.n_pad, p.world);
  if (p.n_pad == 0) return;
  aligned(fn, "residual", p.residual, 16);
  aligned(fn, "send", p.send, 4);
}

inline void check(const char* fn, const int8::Int8DequantSumRequantParams& p) {
  world(fn, p.world);
  shard(fn, p.shard);
  if (p.shard == 0) return;
  aligned(fn, "recv", p.recv, 4);
  aligned(fn, "own", p.own, 4);
  aligned(fn, "residual", p.residual, 16);
}

inline void check(const char* fn, const int8::Int8UnpackDequantizeParams& p) {
  dtype(fn, p.dtype);
  world(fn, p.world);
  shard(fn, p.shard);
  fits(fn, p.n, p.shard, p.world);
  if (p.n == 0) return;
  aligned(fn, "gathered", p.gathered, 4);
}

inline void check(const char* fn, const int8::Int8BlockAbsmaxParams& p) {
  dtype(fn, p.dtype);
  sizes(fn, p.n, p.n_pad, 1);
  if (p.n_pad == 0) return;
  aligned(fn, "residual", p.residual, 16);
  aligned(fn, "absmax", p.absmax, 4);
}

inline void check(const char* fn, const int8::Int8QuantizePackSharedParams& p) {
  dtype(fn, p.dtype);
  world(fn, p.world);
  sizes(fn, p.n, p.n_pad, p.world);
  if (p.n_pad == 0) return;
  aligned(fn, "residual", p.residual, 16);
  aligned(fn, "send", p.send, 4);
  aligned(fn, "absmax", p.absmax, 4);
  aligned(fn, "scales", p.scales, 4);
}

inline void check(const char* fn, const int8::Int8DequantSumRequantSharedParams& p) {
  world(fn, p.world);
  shard(fn, p.shard);
  if (p.shard == 0) return;
  aligned(fn, "recv_codes", p.recv_codes, 4);
  aligned(fn, "own", p.own, 4);
  aligned(fn, "residual", p.residual, 16);
  aligned(fn, "shared_scales", p.shared_scales, 4);
}

// The window cutter: token width and batch (the grid's y dimension). Windows are
// the caller's (checked by cut_windows_ref, and by cut_windows_emulate's binding).
inline void check(const char* fn, const CutWindowsParams& p) {
  if (p.token_bytes != kCutTokenBytes16 && p.token_bytes != kCutTokenBytes32)
    fail(fn, "token_bytes must be 2 or 4, got " + std::to_string(p.token_bytes));
  if (p.batch > kCutMaxBatch && p.seq_len > 0)  // an empty batch launches nothing
    fail(fn, "batch must be <= " + std::to_string(kCutMaxBatch) + " windows per launch, got " +
                 std::to_string(p.batch));
}

}  // namespace checks
}  // namespace llmio
