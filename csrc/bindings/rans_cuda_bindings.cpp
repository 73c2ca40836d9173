// llmio_native._cuda: the rans and rans1 GPU decoders (csrc/cuda/rans_decode.cu,
// csrc/cuda/rans1_decode.cu), one binding template for both: they take the same
// descriptors and parameter layout. Called from cuda_module.cpp. Device pointers are integers (tensor.data_ptr()); the
// stream is a cudaStream_t as an integer, torch's default stream (0) included.
// The descriptors are also passed as host arrays: the kernel trusts them, so
// they are checked here, once (token_bytes, null pointers, record sizes and
// rans::check_descriptors, the same check the host emulation makes), before
// anything is launched. A CUDA failure (llmio::CudaError, LLMIO_CUDA_CHECK)
// becomes llmio_native._core.CudaError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "codec/rans_check.hpp"
#include "common/cuda_check.hpp"
#include "cuda/rans1_decode.hpp"
#include "cuda/rans_decode.hpp"

namespace py = pybind11;

namespace {

// A contiguous host buffer of `count` records of `size` bytes.
const void* host_records(const py::buffer_info& bi, size_t size, uint32_t count, const char* what,
                         const std::string& fn) {
  const size_t nbytes = static_cast<size_t>(bi.size) * static_cast<size_t>(bi.itemsize);
  bool contiguous = true;
  py::ssize_t expect = bi.itemsize;
  for (py::ssize_t d = bi.ndim - 1; d >= 0; --d) {
    if (bi.shape[d] != 1 && bi.strides[d] != expect) contiguous = false;
    expect *= bi.shape[d];
  }
  if (!contiguous || nbytes != size * count)
    throw std::invalid_argument(fn + ": " + what + " must be " + std::to_string(count) +
                                " contiguous " + std::to_string(size) + "-byte records, got " +
                                std::to_string(nbytes) + " bytes");
  return bi.ptr;
}

// Defines `<codec>_decode` launching `launch(Params, stream)`; Params is RansDecodeParams or
// Rans1DecodeParams (the same fields).
template <class Params>
void def_decoder(py::module_& m, const std::string& codec, void (*launch)(const Params&, cudaStream_t)) {
  const std::string fn = codec + "_decode";
  m.def(
      fn.c_str(),
      [fn, launch](uintptr_t src, uintptr_t chunks, uint32_t num_chunks, uintptr_t blocks, uint32_t num_blocks,
                   uintptr_t images, uintptr_t out, int token_bytes, uintptr_t status, uintptr_t stream,
                   uint64_t src_nbytes, py::buffer chunks_host, py::buffer blocks_host, uint64_t num_images,
                   uint64_t out_tokens) {
        using llmio::rans::BlockDesc;
        using llmio::rans::ChunkDesc;
        if (token_bytes != 2 && token_bytes != 4)
          throw std::invalid_argument(fn + ": token_bytes must be 2 or 4, got " + std::to_string(token_bytes));
        if (num_blocks && (!src || !chunks || !blocks || !images || !out || !status)) {
          std::string which;
          for (auto [name, v] : {std::pair<const char*, uintptr_t>{"src", src}, {"chunks", chunks},
                                 {"blocks", blocks}, {"images", images}, {"out", out}, {"status", status}})
            if (!v) which += std::string(which.empty() ? "" : ", ") + name;
          throw std::invalid_argument(fn + ": expected non-null device pointers for " +
                                      std::to_string(num_blocks) + " block(s), got null " + which);
        }
        const py::buffer_info ci = chunks_host.request(), bi = blocks_host.request();
        const auto* cd =
            static_cast<const ChunkDesc*>(host_records(ci, sizeof(ChunkDesc), num_chunks, "chunks_host", fn));
        const auto* bd =
            static_cast<const BlockDesc*>(host_records(bi, sizeof(BlockDesc), num_blocks, "blocks_host", fn));
        llmio::rans::check_descriptors(src, src_nbytes, cd, num_chunks, bd, num_blocks, num_images, out_tokens);
        Params p{reinterpret_cast<const uint8_t*>(src),
                 reinterpret_cast<const ChunkDesc*>(chunks),
                 num_chunks,
                 reinterpret_cast<const BlockDesc*>(blocks),
                 num_blocks,
                 reinterpret_cast<const uint32_t* const*>(images),
                 reinterpret_cast<void*>(out),
                 static_cast<uint32_t>(token_bytes),
                 reinterpret_cast<int32_t*>(status)};
        launch(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("src"), py::arg("chunks"), py::arg("num_chunks"), py::arg("blocks"), py::arg("num_blocks"),
      py::arg("images"), py::arg("out"), py::arg("token_bytes"), py::arg("status"), py::arg("stream"), py::kw_only(),
      py::arg("src_nbytes"), py::arg("chunks_host"), py::arg("blocks_host"), py::arg("num_images"),
      py::arg("out_tokens"),
      ("Launch the " + codec +
       " decoder on `stream` (a cudaStream_t as an integer; 0 is torch's default stream): one warp "
       "per block descriptor; per-chunk status codes (0 = decoded) are written to `status` (zeroed by the caller). "
       "Device pointers as integers. The keyword arguments describe the buffers for the descriptor check made "
       "before the launch (ValueError naming the chunk): src size in bytes, the host copies of the chunk and block "
       "tables, the number of model images and the output size in tokens.")
          .c_str());
}

}  // namespace

void bind_rans_cuda(py::module_& m) {
  def_decoder<llmio::RansDecodeParams>(m, "rans", &llmio::launch_rans_decode);
  def_decoder<llmio::Rans1DecodeParams>(m, "rans1", &llmio::launch_rans1_decode);
}
