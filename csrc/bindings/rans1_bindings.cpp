// llmio_native._core: the rans1 token codec (csrc/codec/rans1.hpp). Called from
// core_module.cpp. Errors in encoded data raise _core.CodecError (registered by
// rans_bindings.cpp, a ValueError), which the dataset layer re-raises as
// FormatError with the shard and chunk named.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "codec/rans1.hpp"
#include "codec/rans_check.hpp"

namespace py = pybind11;
using llmio::rans1::Model;

namespace {

struct Tokens {
  const void* ptr;
  size_t n;
  uint32_t token_bytes;
};

Tokens tokens_of(const py::buffer_info& bi, const char* what) {
  const std::string& f = bi.format;
  if (bi.ndim != 1 || (bi.itemsize != 2 && bi.itemsize != 4) || bi.strides[0] != bi.itemsize ||
      (f != "H" && f != "I" && f != "<H" && f != "<I" && f != "=H" && f != "=I" && f != "L" && f != "<L" && f != "=L"))
    throw std::invalid_argument(std::string(what) + ": tokens must be a contiguous 1-D uint16 or uint32 array, got format '" +
                                f + "' itemsize " + std::to_string(bi.itemsize));
  return {bi.ptr, static_cast<size_t>(bi.shape[0]), static_cast<uint32_t>(bi.itemsize)};
}

py::bytes to_bytes(const std::vector<uint8_t>& v) { return py::bytes(reinterpret_cast<const char*>(v.data()), v.size()); }

// decode's simd argument: True (the default level), False (the scalar code) or a
// level by name.
llmio::rans::Simd simd_of(const py::object& o) {
  using llmio::rans::Simd;
  if (py::isinstance<py::bool_>(o)) return o.cast<bool>() ? Simd::kAuto : Simd::kScalar;
  if (py::isinstance<py::str>(o)) {
    const std::string v = o.cast<std::string>();
    for (Simd s : {Simd::kAuto, Simd::kScalar, Simd::kAvx2, Simd::kAvx512})
      if (v == llmio::rans::simd_name(s)) return s;
    throw std::invalid_argument("Rans1Model.decode: simd='" + v + "': expected True, False, 'auto', 'scalar', "
                                "'avx2' or 'avx512'");
  }
  throw py::type_error("Rans1Model.decode: simd must be a bool or a level name, got " +
                       std::string(py::str(o.get_type())));
}

}  // namespace

void bind_rans1(py::module_& m) {
  namespace r1 = llmio::rans1;
  m.attr("RANS1_SCALE_BITS_DEFAULT") = r1::kDefaultScaleBits;
  m.attr("RANS1_CTX_BITS_DEFAULT") = r1::kDefaultCtxBits;
  py::class_<Model, std::shared_ptr<Model>>(m, "Rans1Model",
                                            "Context model of the rans1 token codec (csrc/codec/rans1.hpp).")
      .def_static(
          "build",
          [](const std::vector<py::buffer>& parts, uint32_t token_bytes, uint32_t scale_bits, uint32_t ctx_bits,
             uint32_t min_count, uint32_t exact_min_count, uint32_t max_exact, uint32_t entry_cost_bits,
             uint64_t max_slots) {
            std::vector<py::buffer_info> infos;
            std::vector<std::pair<const void*, size_t>> spans;
            for (auto& p : parts) {
              infos.push_back(p.request());
              Tokens t = tokens_of(infos.back(), "Rans1Model.build");
              if (t.token_bytes != token_bytes)
                throw std::invalid_argument("Rans1Model.build: a part has " + std::to_string(t.token_bytes) +
                                            "-byte tokens, token_bytes is " + std::to_string(token_bytes));
              spans.emplace_back(t.ptr, t.n);
            }
            r1::BuildParams bp;
            bp.scale_bits = scale_bits;
            bp.ctx_bits = ctx_bits;
            bp.min_count = min_count;
            bp.exact_min_count = exact_min_count;
            bp.max_exact = max_exact;
            bp.entry_cost_bits = entry_cost_bits;
            bp.max_slots = max_slots;
            py::gil_scoped_release nogil;
            return std::make_shared<Model>(Model::build(spans, token_bytes, bp));
          },
          py::arg("parts"), py::arg("token_bytes"), py::arg("scale_bits") = r1::kDefaultScaleBits,
          py::arg("ctx_bits") = r1::kDefaultCtxBits, py::arg("min_count") = 2, py::arg("exact_min_count") = 16,
          py::arg("max_exact") = r1::kMaxExact, py::arg("entry_cost_bits") = 16,
          py::arg("max_slots") = r1::kMaxSlots,
          "Model of the tokens in `parts` (1-D uint16/uint32 arrays, each a chunk as encode() will see it).")
      .def_static(
          "parse",
          [](py::buffer data) {
            py::buffer_info bi = data.request();
            const auto* p = static_cast<const uint8_t*>(bi.ptr);
            const size_t n = static_cast<size_t>(bi.size * bi.itemsize);
            py::gil_scoped_release nogil;
            return std::make_shared<Model>(Model::parse(p, n));
          },
          py::arg("data"), "Parse serialize()'s bytes; raises CodecError when they are malformed.")
      .def("serialize", [](const Model& m) { return to_bytes(m.serialize()); })
      .def("device_image",
           [](const Model& m) {
             const std::vector<uint32_t>& w = m.device_image();
             py::array_t<uint32_t> a(static_cast<py::ssize_t>(w.size()));
             std::copy(w.begin(), w.end(), a.mutable_data());
             return a;
           })
      .def(
          "encode",
          [](const Model& m, py::buffer tokens) {
            py::buffer_info bi = tokens.request();
            Tokens t = tokens_of(bi, "Rans1Model.encode");
            if (t.token_bytes != m.token_bytes())
              throw std::invalid_argument("Rans1Model.encode: the model is for " + std::to_string(m.token_bytes()) +
                                          "-byte tokens, got " + std::to_string(t.token_bytes));
            std::vector<uint8_t> out;
            {
              py::gil_scoped_release nogil;
              m.encode(t.ptr, t.n, out);
            }
            return to_bytes(out);
          },
          py::arg("tokens"), "Encode a chunk of tokens into a payload (bytes).")
      .def(
          "decode",
          [](const Model& m, py::buffer payload, py::buffer out, bool reference, const py::object& simd_arg) {
            const llmio::rans::Simd simd = simd_of(simd_arg);
            py::buffer_info pi = payload.request();
            py::buffer_info oi = out.request(true);
            Tokens t = tokens_of(oi, "Rans1Model.decode");
            if (t.token_bytes != m.token_bytes())
              throw std::invalid_argument("Rans1Model.decode: the model is for " + std::to_string(m.token_bytes()) +
                                          "-byte tokens, out has " + std::to_string(t.token_bytes));
            const auto* p = static_cast<const uint8_t*>(pi.ptr);
            const size_t n = static_cast<size_t>(pi.size * pi.itemsize);
            py::gil_scoped_release nogil;
            m.decode(p, n, const_cast<void*>(t.ptr), t.n, reference, simd);
          },
          py::arg("payload"), py::arg("out"), py::arg("reference") = false, py::arg("simd") = true,
          "Decode a payload into `out` (its length is the token count); raises CodecError when corrupt. "
          "reference=True runs the reference decoder (the oracle of the tests). simd picks the instruction set "
          "of the default path, bit-identical at every level: True the best the CPU has (AVX-512, AVX2, scalar) "
          "capped by LLMIO_RANS_SIMD (0/scalar, avx2, avx512); False its scalar code; 'scalar', 'avx2', "
          "'avx512' or 'auto' by name, raising UnsupportedError where the CPU lacks that level and ValueError "
          "for another name.")
      .def_property_readonly("token_bytes", &Model::token_bytes)
      .def_property_readonly("scale_bits", &Model::scale_bits)
      .def_property_readonly("ctx_bits", &Model::ctx_bits)
      .def_property_readonly("num_symbols", &Model::num_symbols)
      .def_property_readonly("num_contexts", &Model::num_contexts)
      .def_property_readonly("num_exact", &Model::num_exact)
      .def_property_readonly("num_entries", &Model::num_entries)
      .def_property_readonly("num_slots", &Model::num_slots)
      .def_property_readonly("bits_per_token", &Model::model_bits_per_token,
                             "Expected coded bits per token of the modelled data under the quantised frequencies.");

  m.def(
      "rans_simd_levels",
      [] {
        namespace r = llmio::rans;
        py::dict d;
        py::list levels;
        for (r::Simd s : {r::Simd::kScalar, r::Simd::kAvx2, r::Simd::kAvx512})
          if (s <= r::cpu_simd()) levels.append(r::simd_name(s));
        d["cpu"] = levels;
        d["default"] = r::simd_name(r::default_simd());
        return d;
      },
      "The CPU decoders' instruction-set levels: {'cpu': the levels this CPU runs, lowest first, 'default': what "
      "simd=True runs (the CPU's best capped by LLMIO_RANS_SIMD)}. Raises ValueError when LLMIO_RANS_SIMD holds "
      "another value than 0, scalar, avx2, avx512, auto or 1.");
  m.def(
      "rans1_emulate_gpu",
      [](py::array_t<uint8_t, py::array::c_style> src, py::array chunks, py::array blocks,
         const std::vector<py::array_t<uint32_t, py::array::c_style>>& images, py::buffer out) {
        using llmio::rans::BlockDesc;
        using llmio::rans::ChunkDesc;
        if (chunks.nbytes() % sizeof(ChunkDesc) || blocks.nbytes() % sizeof(BlockDesc) ||
            !(chunks.flags() & py::array::c_style) || !(blocks.flags() & py::array::c_style))
          throw std::invalid_argument("rans1_emulate_gpu: chunks must be contiguous " +
                                      std::to_string(sizeof(ChunkDesc)) + "-byte and blocks " +
                                      std::to_string(sizeof(BlockDesc)) + "-byte records");
        const size_t nc = static_cast<size_t>(chunks.nbytes()) / sizeof(ChunkDesc);
        const size_t nb = static_cast<size_t>(blocks.nbytes()) / sizeof(BlockDesc);
        const auto* cd = static_cast<const ChunkDesc*>(chunks.data());
        const auto* bd = static_cast<const BlockDesc*>(blocks.data());
        py::buffer_info oi = out.request(true);
        Tokens t = tokens_of(oi, "rans1_emulate_gpu");
        std::vector<const uint32_t*> imgs;
        for (auto& a : images) {
          if (a.size() < llmio::rans1::kImageHeaderWords || a.data()[0] != llmio::rans1::kImageMagic)
            throw std::invalid_argument("rans1_emulate_gpu: image " + std::to_string(imgs.size()) +
                                        " is not a rans1 decode image");
          imgs.push_back(a.data());
        }
        llmio::rans::check_descriptors(reinterpret_cast<uintptr_t>(src.data()), static_cast<uint64_t>(src.size()), cd,
                                       nc, bd, nb, imgs.size(), static_cast<uint64_t>(t.n));
        py::array_t<int32_t> status(static_cast<py::ssize_t>(nc));
        std::fill(status.mutable_data(), status.mutable_data() + nc, 0);
        int32_t* sp = status.mutable_data();
        const uint8_t* s = src.data();
        {
          py::gil_scoped_release nogil;
          llmio::rans1::emulate_warps(s, cd, nc, bd, nb, imgs.data(), const_cast<void*>(t.ptr), t.token_bytes, sp);
        }
        return status;
      },
      py::arg("src"), py::arg("chunks"), py::arg("blocks"), py::arg("images"), py::arg("out"),
      "Host emulation of the CUDA rans1 decoder (the rans descriptors); returns per-chunk status codes.");
}
