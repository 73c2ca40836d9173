// LLMIO_HD: marks a function compiled both into a CUDA kernel (nvcc: __host__
// __device__, inlined) and into its host emulation and CPU tests (plain inline).
// Every per-thread kernel header (codec/rans_device.hpp, quant/int8_device.hpp,
// loader/cut_windows_device.hpp) uses it, so one source of truth runs in both.
#pragma once

#if defined(__CUDACC__)
#define LLMIO_HD __host__ __device__ __forceinline__
#else
#define LLMIO_HD inline
#endif
