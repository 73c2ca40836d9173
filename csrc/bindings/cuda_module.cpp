// llmio_native._cuda: CUDA kernels behind integer pointers and streams. Built
// only when CMake finds nvcc; the CUDA runtime is linked statically, so the
// module imports on machines without a GPU or a toolkit and reports that
// through device_count() == 0 rather than failing at import.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/cut_windows.hpp"
#include "cuda/int8_quant.hpp"

namespace py = pybind11;
using namespace llmio;

void bind_rans_cuda(py::module_& m);  // rans_cuda_bindings.cpp

namespace {
PyObject* g_cuda_error = nullptr;

[[noreturn]] void raise_cuda(int err, const std::string& what) {
  const char* name = cudaGetErrorName(static_cast<cudaError_t>(err));
  const char* desc = cudaGetErrorString(static_cast<cudaError_t>(err));
  PyErr_SetString(g_cuda_error, (what + ": " + name + " (" + desc + ")").c_str());
  throw py::error_already_set();
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "llmio_native CUDA kernels (decode, window cutting, quantization)";
  // One exception class for both modules: llmio_native._core.CudaError.
  py::object core = py::module_::import("llmio_native._core");
  static py::object cuda_error = core.attr("CudaError");
  g_cuda_error = cuda_error.ptr();
  bind_rans_cuda(m);

  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
    return v;
  });
  m.def("device_count", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver / no device" error
      return 0;
    }
    return n;
  }, "Number of usable CUDA devices; 0 without a driver or GPU.");
  m.def("device_count_error", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    return e == cudaSuccess ? std::string() : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }, "Why device_count() is 0, or an empty string.");

  m.def(
      "cut_windows",
      [](uintptr_t tokens_dev, int token_bytes, uint64_t num_tokens, uintptr_t starts_dev, uint32_t batch,
         uint32_t seq_len, uintptr_t x_dev, uintptr_t y_dev, uintptr_t stream) {
        if (token_bytes != 2 && token_bytes != 4)
          throw std::invalid_argument("token_bytes must be 2 or 4, got " + std::to_string(token_bytes));
        CutWindowsParams p{reinterpret_cast<const void*>(tokens_dev), static_cast<uint32_t>(token_bytes),
                           num_tokens, reinterpret_cast<const int64_t*>(starts_dev), batch, seq_len,
                           reinterpret_cast<int64_t*>(x_dev), reinterpret_cast<int64_t*>(y_dev)};
        int e = launch_cut_windows(p, stream);
        if (e != 0) raise_cuda(e, "cut_windows_kernel launch");
      },
      py::arg("tokens_dev"), py::arg("token_bytes"), py::arg("num_tokens"), py::arg("starts_dev"),
      py::arg("batch"), py::arg("seq_len"), py::arg("x_dev"), py::arg("y_dev"), py::arg("stream"),
      "Launch cut_windows_kernel on `stream` (an integer cudaStream_t; 0 = the default stream). Device pointers as integers.");

  // ---------------------------------------------------------------- INT8 gradient hook kernels
  // csrc/cuda/int8_quant.hpp. Device pointers and the stream as integers; the
  // GIL is released around each launch; a failed launch raises CudaError.
  {
    // stream: any cudaStream_t as an integer, 0 (torch's default stream) included.
    auto check = [](const char* fn, uintptr_t /*stream*/, int dtype, uint32_t world) {
      if (dtype < 0 || dtype > 2)
        throw std::invalid_argument(std::string(fn) + ": dtype must be 0 (fp32), 1 (bf16) or 2 (fp16), got " +
                                    std::to_string(dtype));
      if (world == 0) throw std::invalid_argument(std::string(fn) + ": world must be >= 1");
    };
    auto sizes = [](const char* fn, uint64_t n, uint64_t n_pad, uint32_t world) {
      if (n > n_pad || n_pad % (256ull * world) != 0)
        throw std::invalid_argument(std::string(fn) + ": need n <= n_pad and n_pad a multiple of 256 * world, got n=" +
                                    std::to_string(n) + " n_pad=" + std::to_string(n_pad) +
                                    " world=" + std::to_string(world));
    };
    auto shard_ok = [](const char* fn, uint64_t shard) {
      if (shard % 256 != 0)
        throw std::invalid_argument(std::string(fn) + ": shard must be a multiple of 256, got " + std::to_string(shard));
    };
    auto launched = [](int e, const char* what) {
      if (e != 0) raise_cuda(e, what);
    };
    m.attr("INT8_DTYPES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1, py::arg("float16") = 2);
    m.def(
        "int8_quantize_pack",
        [=](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, uintptr_t residual, uintptr_t send,
            uintptr_t stream) {
          check("int8_quantize_pack", stream, dtype, world);
          sizes("int8_quantize_pack", n, n_pad, world);
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_quantize_pack(reinterpret_cast<const void*>(x), dtype, n, n_pad, world,
                                          reinterpret_cast<float*>(residual), reinterpret_cast<uint8_t*>(send), stream);
          }
          launched(e, "int8_quantize_pack_kernel launch");
        },
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
        py::arg("send"), py::arg("stream"),
        "Kernel (a): x (n values, dtype code) + residual ([n_pad] fp32, updated) -> send [world][shard + 4*shard/256] "
        "(each rank's shard codes, then its scales).");
    m.def(
        "int8_dequant_sum_requant",
        [=](uintptr_t recv, uint32_t world, uint64_t shard, uintptr_t residual, uintptr_t own, uintptr_t stream) {
          check("int8_dequant_sum_requant", stream, 0, world);
          shard_ok("int8_dequant_sum_requant", shard);
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_dequant_sum_requant(reinterpret_cast<const uint8_t*>(recv), world, shard,
                                                reinterpret_cast<float*>(residual), reinterpret_cast<uint8_t*>(own),
                                                stream);
          }
          launched(e, "int8_dequant_sum_requant_kernel launch");
        },
        py::arg("recv"), py::arg("world"), py::arg("shard"), py::arg("residual"), py::arg("own"), py::arg("stream"),
        "Kernel (b): world packed copies of the owned shard -> fp32 rank-order sum / world + residual ([shard], "
        "updated) -> requantized packed shard `own`.");
    m.def(
        "int8_unpack_dequantize",
        [=](uintptr_t gathered, uint32_t world, uint64_t shard, uintptr_t out, int dtype, uint64_t n,
            uintptr_t stream) {
          check("int8_unpack_dequantize", stream, dtype, world);
          shard_ok("int8_unpack_dequantize", shard);
          if (n > shard * world)
            throw std::invalid_argument("int8_unpack_dequantize: n=" + std::to_string(n) + " exceeds world * shard = " +
                                        std::to_string(shard * world));
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_unpack_dequantize(reinterpret_cast<const uint8_t*>(gathered), world, shard,
                                              reinterpret_cast<void*>(out), dtype, n, stream);
          }
          launched(e, "int8_unpack_dequantize_kernel launch");
        },
        py::arg("gathered"), py::arg("world"), py::arg("shard"), py::arg("out"), py::arg("dtype"), py::arg("n"),
        py::arg("stream"), "Kernel (c): the gathered packed shards -> out[:n] in place, in the bucket's dtype.");
    m.def(
        "int8_block_absmax",
        [=](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uintptr_t residual, uintptr_t absmax,
            uintptr_t stream) {
          check("int8_block_absmax", stream, dtype, 1);
          sizes("int8_block_absmax", n, n_pad, 1);
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_block_absmax(reinterpret_cast<const void*>(x), dtype, n, n_pad,
                                         reinterpret_cast<const float*>(residual), reinterpret_cast<float*>(absmax),
                                         stream);
          }
          launched(e, "int8_block_absmax_kernel launch");
        },
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("residual"), py::arg("absmax"),
        py::arg("stream"), "Deterministic mode: per-block absmax of x + residual (+inf for a non-finite block).");
    m.def(
        "int8_quantize_pack_shared",
        [=](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, uintptr_t residual, uintptr_t absmax,
            uintptr_t send, uintptr_t scales, uintptr_t stream) {
          check("int8_quantize_pack_shared", stream, dtype, world);
          sizes("int8_quantize_pack_shared", n, n_pad, world);
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_quantize_pack_shared(reinterpret_cast<const void*>(x), dtype, n, n_pad, world,
                                                 reinterpret_cast<float*>(residual),
                                                 reinterpret_cast<const float*>(absmax),
                                                 reinterpret_cast<uint8_t*>(send), reinterpret_cast<float*>(scales),
                                                 stream);
          }
          launched(e, "int8_quantize_pack_shared_kernel launch");
        },
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
        py::arg("absmax"), py::arg("send"), py::arg("scales"), py::arg("stream"),
        "Deterministic kernel (a): shared block scales from the all-reduced absmax; codes only into send "
        "[world][shard], the scales used into scales [n_pad/256].");
    m.def(
        "int8_dequant_sum_requant_shared",
        [=](uintptr_t recv_codes, uint32_t world, uint64_t shard, uintptr_t shared_scales, uintptr_t residual,
            uintptr_t own, uintptr_t stream) {
          check("int8_dequant_sum_requant_shared", stream, 0, world);
          shard_ok("int8_dequant_sum_requant_shared", shard);
          int e;
          {
            py::gil_scoped_release nogil;
            e = launch_int8_dequant_sum_requant_shared(
                reinterpret_cast<const uint8_t*>(recv_codes), world, shard,
                reinterpret_cast<const float*>(shared_scales), reinterpret_cast<float*>(residual),
                reinterpret_cast<uint8_t*>(own), stream);
          }
          launched(e, "int8_dequant_sum_requant_shared_kernel launch");
        },
        py::arg("recv_codes"), py::arg("world"), py::arg("shard"), py::arg("shared_scales"), py::arg("residual"),
        py::arg("own"), py::arg("stream"),
        "Deterministic kernel (b): int32 sum of the world code copies * shared scale / world + residual, "
        "requantized into the packed shard `own`.");
  }
}
