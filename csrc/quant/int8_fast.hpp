// The INT8 hook's kernels, fast on the CPU: the same parameters and the same
// results, bit for bit, as the CUDA kernels' host emulation (int8_emulate.hpp)
// and the CPU oracle (int8_block.hpp), on the packed layouts of int8_device.hpp.
//
// Fused: one pass per 256-value block (residual add + absmax + quantize + pack;
// dequantize-sum-requantize), straight from the bucket into the packed send
// buffer and from the gathered buffer into the bucket (no intermediate copies).
// Vectorised: AVX2 or AVX-512F, chosen at run time (__builtin_cpu_supports),
// the functions compiled with target attributes (no -mavx2 for the build);
// bf16 / fp16 buckets widened and narrowed in vectors too (F16C with AVX2).
// Every operation is the oracle's: IEEE division (vdivps rounds exactly as
// divss), round half to even in the current rounding mode (roundps with
// _MM_FROUND_CUR_DIRECTION, as std::nearbyint), a separate multiply and
// subtract (the source is built with -ffp-contract=off), and the block absmax
// is a max (exact in any order for finite values; a non-finite block is
// detected separately). Multi-threaded: blocks split over a small persistent
// pool for large buckets; workers copy the caller's MXCSR (rounding mode,
// FTZ/DAZ) so the thread count never changes a result.
//
// Forcing a level (tests, CI): LLMIO_INT8_ISA=scalar|avx2|avx512 in the
// environment (read once) or set_fast_isa(); LLMIO_INT8_THREADS=N or
// set_fast_threads(N). Arguments are trusted (the bindings check them with
// int8_checks.hpp, as for the kernels); alignment is not needed here.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "quant/int8_device.hpp"

namespace llmio {
namespace int8 {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// Levels this CPU (and OS) can run, scalar first.
std::vector<Isa> supported_isas();
// The level in use: the best supported, unless forced.
Isa fast_isa();
// Forces a level; std::invalid_argument if this CPU cannot run it (named).
void set_fast_isa(Isa isa);
// Parses "scalar" / "avx2" / "avx512" (std::invalid_argument otherwise).
Isa parse_isa(const std::string& name);

// Threads used for one large call (1 = the caller only). Default: LLMIO_INT8_THREADS,
// else min(hardware threads, 4).
unsigned fast_threads();
// n >= 1 (std::invalid_argument otherwise); at most 64.
void set_fast_threads(unsigned n);

void quantize_pack_fast(const Int8QuantizePackParams& p);
void dequant_sum_requant_fast(const Int8DequantSumRequantParams& p);
void unpack_dequantize_fast(const Int8UnpackDequantizeParams& p);
void block_absmax_fast(const Int8BlockAbsmaxParams& p);
void quantize_pack_shared_fast(const Int8QuantizePackSharedParams& p);
void dequant_sum_requant_shared_fast(const Int8DequantSumRequantSharedParams& p);

}  // namespace int8
}  // namespace llmio
