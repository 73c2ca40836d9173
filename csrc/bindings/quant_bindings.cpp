// llmio_native._core: INT8 block quantization and window cutting on the host: the
// CPU oracles (csrc/quant/int8_block.hpp, csrc/loader/cut_windows.hpp), the host
// emulations of the CUDA kernels (csrc/quant/int8_emulate.hpp, cut_windows_emulate),
// and the constants shared with Python (QUANT_BLOCK, INT8_DTYPES). Registered from
// core_module.cpp by bind_quant(m). The emulations take the kernels' parameters
// (host arrays in place of device pointers) and the same checks (int8_checks.hpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/int8_checks.hpp"
#include "loader/cut_windows.hpp"
#include "quant/int8_block.hpp"
#include "quant/int8_emulate.hpp"
#include "quant/int8_fast.hpp"

namespace py = pybind11;
using namespace llmio;

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

// A C-contiguous host buffer of `count` items of `itemsize` bytes (at least `count`
// when !exact), writable when asked: its address.
void* host_array(const char* fn, const char* what, const py::buffer& b, size_t itemsize, size_t count, bool exact,
                 bool writable) {
  py::buffer_info bi = b.request(writable);
  bool contiguous = true;
  py::ssize_t expect = bi.itemsize;
  for (py::ssize_t d = bi.ndim - 1; d >= 0; --d) {
    if (bi.shape[d] != 1 && bi.strides[d] != expect) contiguous = false;
    expect *= bi.shape[d];
  }
  const size_t got = static_cast<size_t>(bi.size);
  if (!contiguous || static_cast<size_t>(bi.itemsize) != itemsize || (exact ? got != count : got < count))
    checks::fail(fn, std::string(what) + " must be a C-contiguous " + (writable ? "writable " : "") + "array of " +
                         (exact ? "" : "at least ") + std::to_string(count) + " items of " + std::to_string(itemsize) +
                         " bytes, got " + std::to_string(got) + " items of " + std::to_string(bi.itemsize) +
                         " bytes" + (contiguous ? "" : " (not contiguous)"));
  return bi.ptr;
}

size_t bucket_itemsize(const char* fn, int dtype) {
  checks::dtype(fn, dtype);
  return dtype == int8::kF32 ? 4 : 2;
}

// Checks the parameters as the _cuda binding does, then runs the emulation without the GIL.
template <class P>
void emulate(const char* fn, const P& p, void (*run)(const P&)) {
  checks::check(fn, p);
  py::gil_scoped_release nogil;
  run(p);
}

void bind_oracles(py::module_& m) {
  // ---------------------------------------------------------------- INT8 blocks (CPU oracle)
  using F32 = py::array_t<float, py::array::c_style>;
  using I8 = py::array_t<int8_t, py::array::c_style>;
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

}

// One implementation of the six INT8 hook kernels on host arrays: the emulation of the
// CUDA kernels (suffix "_emulate") or the fast CPU path (suffix "_fast", int8_fast.hpp).
struct KernelSet {
  void (*quantize_pack)(const int8::Int8QuantizePackParams&);
  void (*dequant_sum_requant)(const int8::Int8DequantSumRequantParams&);
  void (*unpack_dequantize)(const int8::Int8UnpackDequantizeParams&);
  void (*block_absmax)(const int8::Int8BlockAbsmaxParams&);
  void (*quantize_pack_shared)(const int8::Int8QuantizePackSharedParams&);
  void (*dequant_sum_requant_shared)(const int8::Int8DequantSumRequantSharedParams&);
};

void bind_kernel_set(py::module_& m, const std::string& suffix, const KernelSet& ks, const std::string& what) {
  // Each: the scalar checks first (the kernel binding's order: null pointers pass them),
  // then the host arrays, then the full check (alignment) in emulate().
  using B = py::buffer;
  m.def(
      ("int8_quantize_pack" + suffix).c_str(),
      [name = "int8_quantize_pack" + suffix, run = ks.quantize_pack](
          B x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, B residual, B send) {
        const char* fn = name.c_str();
        int8::Int8QuantizePackParams p{nullptr, dtype, n, n_pad, world, nullptr, nullptr};
        checks::check(fn, p);
        p.x = host_array(fn, "x", x, bucket_itemsize(fn, dtype), n, false, false);
        p.residual = static_cast<float*>(host_array(fn, "residual", residual, 4, n_pad, true, true));
        p.send = static_cast<uint8_t*>(
            host_array(fn, "send", send, 1, world * int8::packed_stride(n_pad / world), true, true));
        emulate(fn, p, run);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
      py::arg("send"),
      (what + " of _cuda.int8_quantize_pack on host arrays (x: float32, or the bits of bfloat16 / float16 "
              "as 2-byte items).\n\nRaises:\n    ValueError: bad sizes, dtype or alignment (as the kernel's "
              "binding).").c_str());
  m.def(
      ("int8_dequant_sum_requant" + suffix).c_str(),
      [name = "int8_dequant_sum_requant" + suffix, run = ks.dequant_sum_requant](
          B recv, uint32_t world, uint64_t shard, B residual, B own) {
        const char* fn = name.c_str();
        int8::Int8DequantSumRequantParams p{nullptr, world, shard, nullptr, nullptr};
        checks::check(fn, p);
        const uint64_t stride = int8::packed_stride(shard);
        p.recv = static_cast<const uint8_t*>(host_array(fn, "recv", recv, 1, world * stride, true, false));
        p.residual = static_cast<float*>(host_array(fn, "residual", residual, 4, shard, true, true));
        p.own = static_cast<uint8_t*>(host_array(fn, "own", own, 1, stride, true, true));
        emulate(fn, p, run);
      },
      py::arg("recv"), py::arg("world"), py::arg("shard"), py::arg("residual"), py::arg("own"),
      (what + " of _cuda.int8_dequant_sum_requant.\n\nRaises:\n    ValueError: bad sizes or alignment.").c_str());
  m.def(
      ("int8_unpack_dequantize" + suffix).c_str(),
      [name = "int8_unpack_dequantize" + suffix, run = ks.unpack_dequantize](
          B gathered, uint32_t world, uint64_t shard, B out, int dtype, uint64_t n) {
        const char* fn = name.c_str();
        int8::Int8UnpackDequantizeParams p{nullptr, world, shard, nullptr, dtype, n};
        checks::check(fn, p);
        p.gathered = static_cast<const uint8_t*>(
            host_array(fn, "gathered", gathered, 1, world * int8::packed_stride(shard), true, false));
        p.out = host_array(fn, "out", out, bucket_itemsize(fn, dtype), n, false, true);
        emulate(fn, p, run);
      },
      py::arg("gathered"), py::arg("world"), py::arg("shard"), py::arg("out"), py::arg("dtype"), py::arg("n"),
      (what + " of _cuda.int8_unpack_dequantize (out: float32, or 2-byte items for bfloat16 / float16)."
      "\n\nRaises:\n    ValueError: bad sizes, dtype or alignment.").c_str());
  m.def(
      ("int8_block_absmax" + suffix).c_str(),
      [name = "int8_block_absmax" + suffix, run = ks.block_absmax](
          B x, int dtype, uint64_t n, uint64_t n_pad, B residual, B absmax) {
        const char* fn = name.c_str();
        int8::Int8BlockAbsmaxParams p{nullptr, dtype, n, n_pad, nullptr, nullptr};
        checks::check(fn, p);
        p.x = host_array(fn, "x", x, bucket_itemsize(fn, dtype), n, false, false);
        p.residual = static_cast<const float*>(host_array(fn, "residual", residual, 4, n_pad, true, false));
        p.absmax = static_cast<float*>(host_array(fn, "absmax", absmax, 4, n_pad / int8::kBlock, true, true));
        emulate(fn, p, run);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("residual"), py::arg("absmax"),
      (what + " of _cuda.int8_block_absmax.\n\nRaises:\n    ValueError: bad sizes, dtype or alignment.").c_str());
  m.def(
      ("int8_quantize_pack_shared" + suffix).c_str(),
      [name = "int8_quantize_pack_shared" + suffix, run = ks.quantize_pack_shared](
          B x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world, B residual, B absmax, B send, B scales) {
        const char* fn = name.c_str();
        int8::Int8QuantizePackSharedParams p{nullptr, dtype, n, n_pad, world, nullptr, nullptr, nullptr, nullptr};
        checks::check(fn, p);
        const uint64_t nblocks = n_pad / int8::kBlock;
        p.x = host_array(fn, "x", x, bucket_itemsize(fn, dtype), n, false, false);
        p.residual = static_cast<float*>(host_array(fn, "residual", residual, 4, n_pad, true, true));
        p.absmax = static_cast<const float*>(host_array(fn, "absmax", absmax, 4, nblocks, true, false));
        p.send = static_cast<uint8_t*>(host_array(fn, "send", send, 1, n_pad, true, true));
        p.scales = static_cast<float*>(host_array(fn, "scales", scales, 4, nblocks, true, true));
        emulate(fn, p, run);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("n_pad"), py::arg("world"), py::arg("residual"),
      py::arg("absmax"), py::arg("send"), py::arg("scales"),
      (what + " of _cuda.int8_quantize_pack_shared.\n\nRaises:\n"
      "    ValueError: bad sizes, dtype or alignment.").c_str());
  m.def(
      ("int8_dequant_sum_requant_shared" + suffix).c_str(),
      [name = "int8_dequant_sum_requant_shared" + suffix, run = ks.dequant_sum_requant_shared](
          B recv_codes, uint32_t world, uint64_t shard, B shared_scales, B residual, B own) {
        const char* fn = name.c_str();
        int8::Int8DequantSumRequantSharedParams p{nullptr, world, shard, nullptr, nullptr, nullptr};
        checks::check(fn, p);
        p.recv_codes = static_cast<const uint8_t*>(host_array(fn, "recv_codes", recv_codes, 1, world * shard, true,
                                                              false));
        p.shared_scales = static_cast<const float*>(
            host_array(fn, "shared_scales", shared_scales, 4, shard / int8::kBlock, true, false));
        p.residual = static_cast<float*>(host_array(fn, "residual", residual, 4, shard, true, true));
        p.own = static_cast<uint8_t*>(host_array(fn, "own", own, 1, int8::packed_stride(shard), true, true));
        emulate(fn, p, run);
      },
      py::arg("recv_codes"), py::arg("world"), py::arg("shard"), py::arg("shared_scales"), py::arg("residual"),
      py::arg("own"),
      (what + " of _cuda.int8_dequant_sum_requant_shared.\n\nRaises:\n"
      "    ValueError: bad sizes or alignment.").c_str());
}


// Dispatch level and thread count of the fast path (tests force every level the CPU has).
void bind_fast_controls(py::module_& m) {
  m.def("int8_fast_isas", [] {
        py::list out;
        for (int8::Isa i : int8::supported_isas()) out.append(py::str(int8::isa_name(i)));
        return out;
      },
      "Levels of the fast INT8 path this CPU runs, scalar first (e.g. ['scalar', 'avx2', 'avx512']).");
  m.def("int8_fast_isa", [] { return std::string(int8::isa_name(int8::fast_isa())); },
        "The level the fast INT8 path uses now (the best supported, or LLMIO_INT8_ISA / int8_fast_set_isa)."
        "\n\nRaises:\n    ValueError: LLMIO_INT8_ISA names an unknown level or one this CPU lacks.");
  m.def("int8_fast_set_isa", [](const std::string& name) {
        const std::string prev = int8::isa_name(int8::fast_isa());
        int8::set_fast_isa(int8::parse_isa(name));
        return prev;
      },
      py::arg("name"),
      "Forces the fast INT8 path's level ('scalar', 'avx2', 'avx512'); returns the previous one.\n\nRaises:\n"
      "    ValueError: an unknown level, or one this CPU cannot run.");
  m.def("int8_fast_threads", [] { return int8::fast_threads(); },
        "Threads the fast INT8 path uses for a large call (LLMIO_INT8_THREADS, else min(cores, 4)).");
  m.def("int8_fast_set_threads", [](unsigned n) {
        const unsigned prev = int8::fast_threads();
        int8::set_fast_threads(n);
        return prev;
      },
      py::arg("n"), "Sets the fast INT8 path's thread count (1..64); returns the previous one.\n\nRaises:\n"
      "    ValueError: n outside 1..64.");
}

// tokens, starts and seq_len as given to cut_windows_ref: the parameters, with x and y allocated.
struct CutArgs {
  py::buffer_info ti;
  py::array_t<int64_t> x, y;
  CutWindowsParams p;
};

CutArgs cut_args(const char* fn, const py::buffer& tokens,
                 const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& starts, int64_t seq_len) {
  CutArgs a;
  a.ti = tokens.request();
  if (a.ti.ndim != 1 || (a.ti.itemsize != 2 && a.ti.itemsize != 4))
    checks::fail(fn, "tokens must be a 1-D uint16 or uint32 array, got " + std::to_string(a.ti.ndim) +
                         "-D with " + std::to_string(a.ti.itemsize) + "-byte items");
  if (seq_len < 1) checks::fail(fn, "seq_len must be >= 1, got " + std::to_string(seq_len));
  if (a.ti.strides[0] != a.ti.itemsize) checks::fail(fn, "tokens must be contiguous");
  const auto B = static_cast<py::ssize_t>(starts.size());
  a.x = py::array_t<int64_t>({B, static_cast<py::ssize_t>(seq_len)});
  a.y = py::array_t<int64_t>({B, static_cast<py::ssize_t>(seq_len)});
  a.p = CutWindowsParams{a.ti.ptr, static_cast<uint32_t>(a.ti.itemsize), static_cast<uint64_t>(a.ti.shape[0]),
                         starts.data(), static_cast<uint32_t>(B), static_cast<uint32_t>(seq_len),
                         a.x.mutable_data(), a.y.mutable_data()};
  return a;
}

void bind_cut(py::module_& m) {
  m.attr("CUT_MAX_BATCH") = kCutMaxBatch;
  m.def(
      "cut_windows_ref",
      [](py::buffer tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts, int64_t seq_len) {
        CutArgs a = cut_args("cut_windows_ref", tokens, starts, seq_len);
        {
          py::gil_scoped_release nogil;
          cut_windows_ref(a.p);
        }
        return py::make_tuple(a.x, a.y);
      },
      py::arg("tokens"), py::arg("starts"), py::arg("seq_len"),
      "CPU oracle of cut_windows_kernel: x[b,t]=tokens[starts[b]+t], y=x shifted by one, int64.\n\nRaises:\n"
      "    ValueError: tokens not a 1-D uint16/uint32 array, seq_len < 1, or a window past the end.");
  m.def(
      "cut_windows_emulate",
      [](py::buffer tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts, int64_t seq_len) {
        const char* fn = "cut_windows_emulate";
        CutArgs a = cut_args(fn, tokens, starts, seq_len);
        checks::check(fn, a.p);
        for (uint32_t b = 0; b < a.p.batch; ++b) {  // the kernel trusts its windows; the emulation reads host memory
          const int64_t s = a.p.starts[b];
          if (s < 0 || uint64_t(s) + a.p.seq_len + 1 > a.p.num_tokens)
            checks::fail(fn, "window " + std::to_string(b) + " starting at token " + std::to_string(s) + " needs " +
                                 std::to_string(a.p.seq_len + 1) + " tokens but the buffer holds " +
                                 std::to_string(a.p.num_tokens));
        }
        {
          py::gil_scoped_release nogil;
          cut_windows_emulate(a.p);
        }
        return py::make_tuple(a.x, a.y);
      },
      py::arg("tokens"), py::arg("starts"), py::arg("seq_len"),
      "Host emulation of cut_windows_kernel (its per-thread code over the launch grid), same arguments and result as "
      "cut_windows_ref.\n\nRaises:\n    ValueError: as cut_windows_ref, or more than CUT_MAX_BATCH windows.");
}

}  // namespace

void bind_quant(py::module_& m) {
  m.attr("QUANT_BLOCK") = static_cast<size_t>(int8::kBlock);
  py::dict dtypes;  // bucket dtype codes of the INT8 kernels (and their emulations)
  dtypes["float32"] = static_cast<int>(int8::kF32);
  dtypes["bfloat16"] = static_cast<int>(int8::kBF16);
  dtypes["float16"] = static_cast<int>(int8::kF16);
  m.attr("INT8_DTYPES") = dtypes;
  bind_oracles(m);
  bind_kernel_set(m, "_emulate",
                  {&int8::quantize_pack_emulate, &int8::dequant_sum_requant_emulate, &int8::unpack_dequantize_emulate,
                   &int8::block_absmax_emulate, &int8::quantize_pack_shared_emulate,
                   &int8::dequant_sum_requant_shared_emulate},
                  "Host emulation");
  bind_kernel_set(m, "_fast",
                  {&int8::quantize_pack_fast, &int8::dequant_sum_requant_fast, &int8::unpack_dequantize_fast,
                   &int8::block_absmax_fast, &int8::quantize_pack_shared_fast, &int8::dequant_sum_requant_shared_fast},
                  "The fast CPU path (vectorised, fused, multi-threaded; bit-exact with the emulation and the oracle)");
  bind_fast_controls(m);
  bind_cut(m);
}
