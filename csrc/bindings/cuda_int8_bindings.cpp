// llmio_native._cuda: the INT8 gradient hook kernels (csrc/cuda/int8_quant.hpp).
// Device pointers and the stream are integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream; 0, torch's default stream, included).
// Arguments are checked once, here (int8_checks.hpp), before the launch; the GIL
// is released around each launch; a failed launch raises CudaError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/cuda_check.hpp"
#include "bindings/int8_checks.hpp"
#include "cuda/int8_quant.hpp"

namespace py = pybind11;
using namespace llmio;

namespace {

template <class P>
void checked_launch(const char* fn, const P& p, uintptr_t stream, cudaError_t (*launch)(const P&, cudaStream_t)) {
  checks::check(fn, p);
  cudaError_t e;
  {
    py::gil_scoped_release nogil;
    e = launch(p, reinterpret_cast<cudaStream_t>(stream));
  }
  LLMIO_CUDA_CHECK_WHAT(e, (std::string(fn) + "_kernel launch").c_str());
}

template <class T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

}  // namespace

void bind_int8_cuda(py::module_& m) {
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(int8::kF32);
  dtypes["bfloat16"] = static_cast<int>(int8::kBF16);
  dtypes["float16"] = static_cast<int>(int8::kF16);
  m.attr("INT8_DTYPES") = dtypes;
  m.attr("QUANT_BLOCK") = int8::kBlock;

  m.def(
      "int8_quantize_pack",
      [](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, uintptr_t residual, uintptr_t send,
         uintptr_t stream) {
        checked_launch("int8_quantize_pack",
                       Int8QuantizePackParams{ptr<const void>(x), dtype, n, n_pad, world, ptr<float>(residual),
                                              ptr<uint8_t>(send)},
                       stream, &launch_int8_quantize_pack);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
      py::arg("send"), py::arg("stream"),
      "Kernel (a): x (n values, dtype code) + residual ([n_pad] fp32, updated) -> send [world][shard + 4*shard/256] "
      "(each rank's shard codes, then its scales).\n\nRaises:\n    ValueError: bad sizes, dtype or alignment.\n"
      "    CudaError: the launch failed.");
  m.def(
      "int8_dequant_sum_requant",
      [](uintptr_t recv, uint32_t world, uint64_t shard, uintptr_t residual, uintptr_t own, uintptr_t stream) {
        checked_launch("int8_dequant_sum_requant",
                       Int8DequantSumRequantParams{ptr<const uint8_t>(recv), world, shard, ptr<float>(residual),
                                                   ptr<uint8_t>(own)},
                       stream, &launch_int8_dequant_sum_requant);
      },
      py::arg("recv"), py::arg("world"), py::arg("shard"), py::arg("residual"), py::arg("own"), py::arg("stream"),
      "Kernel (b): world packed copies of the owned shard -> fp32 rank-order sum / world + residual ([shard], "
      "updated) -> requantized packed shard `own`.\n\nRaises:\n    ValueError: bad sizes or alignment.\n"
      "    CudaError: the launch failed.");
  m.def(
      "int8_unpack_dequantize",
      [](uintptr_t gathered, uint32_t world, uint64_t shard, uintptr_t out, int dtype, uint64_t n, uintptr_t stream) {
        checked_launch("int8_unpack_dequantize",
                       Int8UnpackDequantizeParams{ptr<const uint8_t>(gathered), world, shard, ptr<void>(out), dtype,
                                                  n},
                       stream, &launch_int8_unpack_dequantize);
      },
      py::arg("gathered"), py::arg("world"), py::arg("shard"), py::arg("out"), py::arg("dtype"), py::arg("n"),
      py::arg("stream"),
      "Kernel (c): the gathered packed shards -> out[:n] in place, in the bucket's dtype.\n\nRaises:\n"
      "    ValueError: bad sizes, dtype or alignment.\n    CudaError: the launch failed.");
  m.def(
      "int8_block_absmax",
      [](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uintptr_t residual, uintptr_t absmax, uintptr_t stream) {
        checked_launch("int8_block_absmax",
                       Int8BlockAbsmaxParams{ptr<const void>(x), dtype, n, n_pad, ptr<const float>(residual),
                                             ptr<float>(absmax)},
                       stream, &launch_int8_block_absmax);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("residual"), py::arg("absmax"),
      py::arg("stream"),
      "Deterministic mode: per-block absmax of x + residual (+inf for a non-finite block).\n\nRaises:\n"
      "    ValueError: bad sizes, dtype or alignment.\n    CudaError: the launch failed.");
  m.def(
      "int8_quantize_pack_shared",
      [](uintptr_t x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, uintptr_t residual, uintptr_t absmax,
         uintptr_t send, uintptr_t scales, uintptr_t stream) {
        checked_launch("int8_quantize_pack_shared",
                       Int8QuantizePackSharedParams{ptr<const void>(x), dtype, n, n_pad, world, ptr<float>(residual),
                                                    ptr<const float>(absmax), ptr<uint8_t>(send), ptr<float>(scales)},
                       stream, &launch_int8_quantize_pack_shared);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
      py::arg("absmax"), py::arg("send"), py::arg("scales"), py::arg("stream"),
      "Deterministic kernel (a): shared block scales from the all-reduced absmax; codes only into send "
      "[world][shard], the scales used into scales [n_pad/256].\n\nRaises:\n"
      "    ValueError: bad sizes, dtype or alignment.\n    CudaError: the launch failed.");
  m.def(
      "int8_dequant_sum_requant_shared",
      [](uintptr_t recv_codes, uint32_t world, uint64_t shard, uintptr_t shared_scales, uintptr_t residual,
         uintptr_t own, uintptr_t stream) {
        checked_launch("int8_dequant_sum_requant_shared",
                       Int8DequantSumRequantSharedParams{ptr<const uint8_t>(recv_codes), world, shard,
                                                         ptr<const float>(shared_scales), ptr<float>(residual),
                                                         ptr<uint8_t>(own)},
                       stream, &launch_int8_dequant_sum_requant_shared);
      },
      py::arg("recv_codes"), py::arg("world"), py::arg("shard"), py::arg("shared_scales"), py::arg("residual"),
      py::arg("own"), py::arg("stream"),
      "Deterministic kernel (b): int32 sum of the world code copies * shared scale / world + residual, "
      "requantized into the packed shard `own`.\n\nRaises:\n    ValueError: bad sizes or alignment.\n"
      "    CudaError: the launch failed.");
}
