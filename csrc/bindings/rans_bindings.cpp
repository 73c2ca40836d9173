// llmio_native._core: the rans token codec (csrc/codec). Called from
// core_module.cpp; CodecError becomes llmio_native._core.CodecError (a
// ValueError), which the dataset layer re-raises as FormatError with the shard
// and chunk named.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <initializer_list>
#include <memory>
#include <tuple>
#include <string>
#include <vector>

#include "codec/rans.hpp"
#include "codec/rans_check.hpp"

namespace py = pybind11;
using llmio::rans::Model;

namespace {

struct Tokens {
  const void* ptr;
  size_t n;
  uint32_t token_bytes;
};

Tokens tokens_of(const py::buffer_info& bi, const char* what) {
  if (bi.ndim != 1 || (bi.itemsize != 2 && bi.itemsize != 4) || bi.strides[0] != bi.itemsize ||
      (bi.format != "H" && bi.format != "I" && bi.format != "<H" && bi.format != "<I" && bi.format != "=H" &&
       bi.format != "=I" && bi.format != "L" && bi.format != "<L" && bi.format != "=L"))
    throw std::invalid_argument(std::string(what) + ": tokens must be a contiguous 1-D uint16 or uint32 array, got format '" +
                                bi.format + "' itemsize " + std::to_string(bi.itemsize));
  return {bi.ptr, static_cast<size_t>(bi.shape[0]), static_cast<uint32_t>(bi.itemsize)};
}

py::bytes to_bytes(const std::vector<uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

// The constants Python needs, defined once in rans_device.hpp / rans_check.cpp:
//   RANS_STATUS           {code: text} of the per-chunk status codes
//   RANS_STATUS_OK, ...   each code by name
//   RANS_CHUNK_DESC, RANS_BLOCK_DESC   descriptor layouts as numpy dtype specs
//                         ({"names", "formats", "offsets", "itemsize"}: np.dtype(spec))
//   RANS_PAYLOAD_ALIGN    alignment of a payload's address (bytes)
//   RANS_SCALE_BITS_DEFAULT, RANS_MIN_SCALE_BITS, RANS_MAX_SCALE_BITS
void export_rans_constants(py::module_& m) {
  namespace r = llmio::rans;
  py::dict status;
  for (int32_t c = 0; c < r::kNumStatus; ++c) status[py::int_(c)] = r::status_text(c);
  m.attr("RANS_STATUS") = status;
  m.attr("RANS_STATUS_OK") = static_cast<int32_t>(r::kOk);
  m.attr("RANS_STATUS_BAD_HEADER") = static_cast<int32_t>(r::kBadHeader);
  m.attr("RANS_STATUS_BAD_STATE") = static_cast<int32_t>(r::kBadState);
  m.attr("RANS_STATUS_OVERRUN") = static_cast<int32_t>(r::kOverrun);
  m.attr("RANS_STATUS_BAD_SYMBOL") = static_cast<int32_t>(r::kBadSymbol);
  m.attr("RANS_STATUS_BAD_FINAL") = static_cast<int32_t>(r::kBadFinal);
  auto spec = [](std::initializer_list<std::tuple<const char*, const char*, size_t>> fields, size_t itemsize) {
    py::list names, formats, offsets;
    for (const auto& f : fields) {
      names.append(std::get<0>(f));
      formats.append(std::get<1>(f));
      offsets.append(std::get<2>(f));
    }
    py::dict d;
    d["names"] = names;
    d["formats"] = formats;
    d["offsets"] = offsets;
    d["itemsize"] = itemsize;
    return d;
  };
  static_assert(sizeof(r::ChunkDesc::src_offset) == 8 && sizeof(r::ChunkDesc::num_tokens) == 4 &&
                    sizeof(r::BlockDesc::chunk) == 4 && sizeof(r::BlockDesc) == 8,
                "descriptor field widths as exported below");
  m.attr("RANS_CHUNK_DESC") = spec({{"src_offset", "<u8", offsetof(r::ChunkDesc, src_offset)},
                                    {"src_bytes", "<u8", offsetof(r::ChunkDesc, src_bytes)},
                                    {"out_offset", "<u8", offsetof(r::ChunkDesc, out_offset)},
                                    {"num_tokens", "<u4", offsetof(r::ChunkDesc, num_tokens)},
                                    {"model", "<u4", offsetof(r::ChunkDesc, model)}},
                                   sizeof(r::ChunkDesc));
  m.attr("RANS_BLOCK_DESC") = spec({{"chunk", "<u4", offsetof(r::BlockDesc, chunk)},
                                    {"block", "<u4", offsetof(r::BlockDesc, block)}},
                                   sizeof(r::BlockDesc));
  m.attr("RANS_PAYLOAD_ALIGN") = r::kPayloadAlign;
  m.attr("RANS_SCALE_BITS_DEFAULT") = r::kDefaultScaleBits;
  m.attr("RANS_MIN_SCALE_BITS") = r::kMinScaleBits;
  m.attr("RANS_MAX_SCALE_BITS") = r::kMaxScaleBits;
}

}  // namespace

void bind_rans(py::module_& m) {
  py::register_exception<llmio::rans::CodecError>(m, "CodecError", PyExc_ValueError);
  m.attr("RANS_BLOCK_SYMBOLS") = llmio::rans::kBlockSymbols;
  m.attr("RANS_LANES") = llmio::rans::kLanes;
  export_rans_constants(m);

  py::class_<Model, std::shared_ptr<Model>>(m, "RansModel",
                                            "Frequency model of the rans token codec (csrc/codec/rans.hpp).")
      .def_static(
          "build",
          [](const std::vector<py::buffer>& parts, uint32_t token_bytes, uint32_t scale_bits,
             uint32_t escape_max_count) {
            std::vector<py::buffer_info> infos;
            std::vector<std::pair<const void*, size_t>> spans;
            for (auto& p : parts) {
              infos.push_back(p.request());
              Tokens t = tokens_of(infos.back(), "RansModel.build");
              if (t.token_bytes != token_bytes)
                throw std::invalid_argument("RansModel.build: a part has " + std::to_string(t.token_bytes) +
                                            "-byte tokens, token_bytes is " + std::to_string(token_bytes));
              spans.emplace_back(t.ptr, t.n);
            }
            py::gil_scoped_release nogil;
            return std::make_shared<Model>(Model::build(spans, token_bytes, scale_bits, escape_max_count));
          },
          py::arg("parts"), py::arg("token_bytes"), py::arg("scale_bits") = llmio::rans::kDefaultScaleBits, py::arg("escape_max_count") = 0,
          "Model of the tokens in `parts` (1-D uint16/uint32 arrays).")
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
             std::vector<uint32_t> w = m.device_image();
             py::array_t<uint32_t> a(static_cast<py::ssize_t>(w.size()));
             std::copy(w.begin(), w.end(), a.mutable_data());
             return a;
           })
      .def(
          "encode",
          [](const Model& m, py::buffer tokens) {
            py::buffer_info bi = tokens.request();
            Tokens t = tokens_of(bi, "RansModel.encode");
            if (t.token_bytes != m.token_bytes())
              throw std::invalid_argument("RansModel.encode: the model is for " + std::to_string(m.token_bytes()) +
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
          [](const Model& m, py::buffer payload, py::buffer out, bool simd) {
            py::buffer_info pi = payload.request();
            py::buffer_info oi = out.request(true);
            Tokens t = tokens_of(oi, "RansModel.decode");
            if (t.token_bytes != m.token_bytes())
              throw std::invalid_argument("RansModel.decode: the model is for " + std::to_string(m.token_bytes()) +
                                          "-byte tokens, out has " + std::to_string(t.token_bytes));
            const auto* p = static_cast<const uint8_t*>(pi.ptr);
            const size_t n = static_cast<size_t>(pi.size * pi.itemsize);
            py::gil_scoped_release nogil;
            m.decode(p, n, const_cast<void*>(t.ptr), t.n, simd);
          },
          py::arg("payload"), py::arg("out"), py::arg("simd") = true,
          "Decode a payload into `out` (its length is the token count); raises CodecError when corrupt.")
      .def_property_readonly("token_bytes", &Model::token_bytes)
      .def_property_readonly("scale_bits", &Model::scale_bits)
      .def_property_readonly("num_symbols", &Model::num_symbols)
      .def_property_readonly("num_rank_buckets", &Model::num_rank_buckets)
      .def_property_readonly("bits_per_token", &Model::model_bits_per_token,
                             "Expected coded bits per token under the model's frequencies.")
      .def_property_readonly("freq", [](const Model& m) {
        py::array_t<uint32_t> a(static_cast<py::ssize_t>(m.freq().size()));
        std::copy(m.freq().begin(), m.freq().end(), a.mutable_data());
        return a;
      });

  m.def(
      "rans_emulate_gpu",
      [](py::array_t<uint8_t, py::array::c_style> src, py::array chunks, py::array blocks,
         const std::vector<py::array_t<uint32_t, py::array::c_style>>& images, py::buffer out) {
        using llmio::rans::BlockDesc;
        using llmio::rans::ChunkDesc;
        if (chunks.nbytes() % sizeof(ChunkDesc) || blocks.nbytes() % sizeof(BlockDesc) ||
            !(chunks.flags() & py::array::c_style) || !(blocks.flags() & py::array::c_style))
          throw std::invalid_argument(
              "rans_emulate_gpu: chunks must be contiguous " + std::to_string(sizeof(ChunkDesc)) + "-byte and blocks " +
              std::to_string(sizeof(BlockDesc)) + "-byte records, got chunks of " + std::to_string(chunks.nbytes()) +
              " bytes" + ((chunks.flags() & py::array::c_style) ? "" : " (not C-contiguous)") + " and blocks of " +
              std::to_string(blocks.nbytes()) + " bytes" +
              ((blocks.flags() & py::array::c_style) ? "" : " (not C-contiguous)"));
        const size_t nc = static_cast<size_t>(chunks.nbytes()) / sizeof(ChunkDesc);
        const size_t nb = static_cast<size_t>(blocks.nbytes()) / sizeof(BlockDesc);
        const auto* cd = static_cast<const ChunkDesc*>(chunks.data());
        const auto* bd = static_cast<const BlockDesc*>(blocks.data());
        py::buffer_info oi = out.request(true);
        Tokens t = tokens_of(oi, "rans_emulate_gpu");
        std::vector<const uint32_t*> imgs;
        for (auto& a : images) imgs.push_back(a.data());
        // The kernel trusts the host for these; the CUDA binding makes the same check.
        llmio::rans::check_descriptors(reinterpret_cast<uintptr_t>(src.data()), static_cast<uint64_t>(src.size()), cd,
                                       nc, bd, nb, imgs.size(), static_cast<uint64_t>(t.n));
        py::array_t<int32_t> status(static_cast<py::ssize_t>(nc));
        std::fill(status.mutable_data(), status.mutable_data() + nc, 0);
        int32_t* sp = status.mutable_data();
        const uint8_t* s = src.data();
        {
          py::gil_scoped_release nogil;
          llmio::rans::emulate_warps(s, cd, nc, bd, nb, imgs.data(), const_cast<void*>(t.ptr), t.token_bytes, sp);
        }
        return status;
      },
      py::arg("src"), py::arg("chunks"), py::arg("blocks"), py::arg("images"), py::arg("out"),
      "Host emulation of the CUDA rans decoder (same descriptors); returns per-chunk status codes.");
}
