// llmio_native._core: per-element loader work (csrc/loader) - the seeded
// permutation of window ids.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/bindings.hpp"
#include "loader/permute.hpp"

namespace py = pybind11;
using namespace llmio;

void bind_loader(py::module_& m) {
  m.def("feistel_permute",
        [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx, uint64_t n, uint64_t key,
           int rounds) {
          py::array_t<int64_t> out(idx.size());
          const int64_t* in = idx.data();
          int64_t* o = out.mutable_data();
          const size_t cnt = static_cast<size_t>(idx.size());
          {
            py::gil_scoped_release nogil;
            feistel_permute(in, o, cnt, n, key, rounds);
          }
          return out;
        },
        py::arg("idx"), py::arg("n"), py::arg("key"), py::arg("rounds") = 6,
        "Seeded bijection of [0, n) applied to idx (int64); see csrc/loader/permute.hpp.");
}
