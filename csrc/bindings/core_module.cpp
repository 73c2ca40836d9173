// llmio_native._core: the module. Each component binds itself from its own
// file (bindings/bindings.hpp lists them); the C++ -> Python error mapping is
// made once in errors_bindings.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/cut_windows.hpp"
#include "bindings/bindings.hpp"
#include "common/errors.hpp"
#include "quant/int8_block.hpp"

namespace py = pybind11;
using namespace llmio;

#ifndef LLMIO_VERSION
#define LLMIO_VERSION "0.0.0"
#endif

namespace {

// An optional residual updated in place: exactly float32, C-contiguous, writable and
// n long (a converting cast would silently update a temporary copy). The caller keeps
// the Python object alive for the duration of the call.
float* inplace_residual(const py::object& residual, size_t n) {
  if (residual.is_none()) return nullptr;
  using F32 = py::array_t<float, py::array::c_style>;
  if (!F32::check_(residual) || !(py::array(residual).flags() & py::array::c_style) ||
      !py::array(residual).writeable())
    throw py::type_error("residual must be a writable C-contiguous float32 array (updated in place)");
  auto r = py::reinterpret_borrow<F32>(residual);
  if (static_cast<size_t>(r.size()) != n) throw std::invalid_argument("residual must hold n values");
  return r.mutable_data();
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "llmio_native native core: read engines, pinned ring, CPU oracles";
  m.attr("__version__") = LLMIO_VERSION;
  bind_errors(m);
  bind_io(m);
  bind_ring(m);
  bind_loader(m);
  bind_rans(m);

  // ---------------------------------------------------------------- INT8 blocks (CPU oracle)
  using F32 = py::array_t<float, py::array::c_style>;
  using I8 = py::array_t<int8_t, py::array::c_style>;
  m.attr("QUANT_BLOCK") = kQuantBlock;
  m.def("quantize_blocks_ref",
        [](F32 x, py::object residual, I8 codes, F32 scales) {
          const size_t n = static_cast<size_t>(x.size());
          if (static_cast<size_t>(codes.size()) != n || static_cast<size_t>(scales.size()) != quant_num_blocks(n))
            throw std::invalid_argument("quantize_blocks_ref: codes must hold n values and scales ceil(n/256)");
          float* res = inplace_residual(residual, n);
          const float* xp = x.data();
          int8_t* cp = codes.mutable_data();
          float* sp = scales.mutable_data();
          py::gil_scoped_release nogil;
          quantize_blocks_ref(xp, res, n, cp, sp);
        },
        py::arg("x"), py::arg("residual"), py::arg("codes").noconvert(), py::arg("scales").noconvert(),
        "Blockwise INT8 quantization with error feedback, in place into codes/scales (and residual).");
  m.def("dequantize_blocks_ref",
        [](I8 codes, F32 scales, F32 out) {
          const size_t n = static_cast<size_t>(codes.size());
          if (static_cast<size_t>(out.size()) != n || static_cast<size_t>(scales.size()) != quant_num_blocks(n))
            throw std::invalid_argument("dequantize_blocks_ref: sizes do not match");
          const int8_t* cp = codes.data();
          const float* sp = scales.data();
          float* op = out.mutable_data();
          py::gil_scoped_release nogil;
          dequantize_blocks_ref(cp, sp, n, op);
        },
        py::arg("codes"), py::arg("scales"), py::arg("out").noconvert());
  m.def("dequant_sum_requant_ref",
        [](I8 codes_w, F32 scales_w, py::object residual, I8 codes, F32 scales) {
          // codes_w: [W, n], scales_w: [W, nblocks]
          if (codes_w.ndim() != 2 || scales_w.ndim() != 2 || codes_w.shape(0) != scales_w.shape(0))
            throw std::invalid_argument("codes_w must be [W, n] and scales_w [W, nblocks]");
          const size_t W = static_cast<size_t>(codes_w.shape(0)), n = static_cast<size_t>(codes_w.shape(1));
          if (static_cast<size_t>(scales_w.shape(1)) != quant_num_blocks(n) ||
              static_cast<size_t>(codes.size()) != n || static_cast<size_t>(scales.size()) != quant_num_blocks(n))
            throw std::invalid_argument("dequant_sum_requant_ref: sizes do not match");
          std::vector<const int8_t*> cw(W);
          std::vector<const float*> sw(W);
          for (size_t r = 0; r < W; ++r) {
            cw[r] = codes_w.data() + r * n;
            sw[r] = scales_w.data() + r * quant_num_blocks(n);
          }
          float* res = inplace_residual(residual, n);
          int8_t* cp = codes.mutable_data();
          float* sp = scales.mutable_data();
          py::gil_scoped_release nogil;
          dequant_sum_requant_ref(cw.data(), sw.data(), W, n, res, cp, sp);
        },
        py::arg("codes_w"), py::arg("scales_w"), py::arg("residual"), py::arg("codes").noconvert(),
        py::arg("scales").noconvert());

  // ---------------------------------------------------------------- INT8 blocks, deterministic mode (CPU oracle)
  m.def("block_absmax_ref",
        [](F32 x, py::object residual, F32 absmax) {
          const size_t n = static_cast<size_t>(x.size());
          if (static_cast<size_t>(absmax.size()) != quant_num_blocks(n))
            throw std::invalid_argument("block_absmax_ref: absmax must hold ceil(n/256) values");
          if (!absmax.writeable()) throw std::invalid_argument("block_absmax_ref: absmax must be writable");
          F32 res_arr;  // holds a (possibly converted) residual alive while the oracle runs
          if (!residual.is_none()) {
            res_arr = py::cast<F32>(residual);
            if (static_cast<size_t>(res_arr.size()) != n) throw std::invalid_argument("residual must hold n values");
          }
          const float* res = residual.is_none() ? nullptr : res_arr.data();
          const float* xp = x.data();
          float* ap = absmax.mutable_data();
          py::gil_scoped_release nogil;
          block_absmax_ref(xp, res, n, ap);
        },
        py::arg("x"), py::arg("residual"), py::arg("absmax").noconvert(),
        "Per-block absmax of x + residual (residual read only; +inf for a block with inf/NaN).");
  m.def("quantize_blocks_shared_ref",
        [](F32 x, py::object residual, F32 absmax, I8 codes, F32 scales) {
          const size_t n = static_cast<size_t>(x.size());
          if (static_cast<size_t>(codes.size()) != n || static_cast<size_t>(scales.size()) != quant_num_blocks(n) ||
              static_cast<size_t>(absmax.size()) != quant_num_blocks(n))
            throw std::invalid_argument("quantize_blocks_shared_ref: codes must hold n values, absmax and scales "
                                        "ceil(n/256)");
          float* res = inplace_residual(residual, n);
          const float* xp = x.data();
          const float* ap = absmax.data();
          int8_t* cp = codes.mutable_data();
          float* sp = scales.mutable_data();
          py::gil_scoped_release nogil;
          quantize_blocks_shared_ref(xp, res, n, ap, cp, sp);
        },
        py::arg("x"), py::arg("residual"), py::arg("absmax"), py::arg("codes").noconvert(),
        py::arg("scales").noconvert(),
        "Blockwise INT8 quantization with the shared (all-reduced MAX) block absmax, in place.");
  m.def("dequant_sum_requant_shared_ref",
        [](I8 codes_w, F32 shared_scales, py::object residual, I8 codes, F32 scales) {
          // codes_w: [W, n], shared_scales: [nblocks] (the same on every rank)
          if (codes_w.ndim() != 2) throw std::invalid_argument("codes_w must be [W, n]");
          const size_t W = static_cast<size_t>(codes_w.shape(0)), n = static_cast<size_t>(codes_w.shape(1));
          if (static_cast<size_t>(shared_scales.size()) != quant_num_blocks(n) ||
              static_cast<size_t>(codes.size()) != n || static_cast<size_t>(scales.size()) != quant_num_blocks(n))
            throw std::invalid_argument("dequant_sum_requant_shared_ref: sizes do not match");
          std::vector<const int8_t*> cw(W);
          for (size_t r = 0; r < W; ++r) cw[r] = codes_w.data() + r * n;
          float* res = inplace_residual(residual, n);
          const float* ssp = shared_scales.data();
          int8_t* cp = codes.mutable_data();
          float* sp = scales.mutable_data();
          py::gil_scoped_release nogil;
          dequant_sum_requant_shared_ref(cw.data(), W, n, ssp, res, cp, sp);
        },
        py::arg("codes_w"), py::arg("shared_scales"), py::arg("residual"), py::arg("codes").noconvert(),
        py::arg("scales").noconvert(),
        "Owner step with shared scales: int32 sum of the W codes, * scale / W + residual, requantized.");

  m.def("cut_windows_ref",
        [](py::buffer tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
           int64_t seq_len) {
          py::buffer_info ti = tokens.request();
          if (ti.ndim != 1 || (ti.itemsize != 2 && ti.itemsize != 4))
            throw std::invalid_argument("tokens must be a 1-D uint16 or uint32 array");
          if (seq_len < 1) throw std::invalid_argument("seq_len must be >= 1");
          if (ti.strides[0] != ti.itemsize) throw std::invalid_argument("tokens must be contiguous");
          const auto B = static_cast<py::ssize_t>(starts.size());
          py::array_t<int64_t> x({B, static_cast<py::ssize_t>(seq_len)});
          py::array_t<int64_t> y({B, static_cast<py::ssize_t>(seq_len)});
          CutWindowsParams p{ti.ptr, static_cast<uint32_t>(ti.itemsize), static_cast<uint64_t>(ti.shape[0]),
                             starts.data(), static_cast<uint32_t>(B), static_cast<uint32_t>(seq_len),
                             x.mutable_data(), y.mutable_data()};
          {
            py::gil_scoped_release nogil;
            cut_windows_ref(p);
          }
          return py::make_tuple(x, y);
        },
        py::arg("tokens"), py::arg("starts"), py::arg("seq_len"),
        "CPU oracle of cut_windows_kernel: x[b,t]=tokens[starts[b]+t], y=x shifted by one, int64.");
}
