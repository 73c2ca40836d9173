// llmio_native._core: the module. Each component binds itself from its own
// file (bindings/bindings.hpp lists them); the C++ -> Python error mapping is
// made once in errors_bindings.cpp.
#include <pybind11/pybind11.h>

#include "bindings/bindings.hpp"

namespace py = pybind11;

#ifndef LLMIO_VERSION
#define LLMIO_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_core, m) {
  m.doc() = "llmio_native native core: read engines, pinned ring, codecs, CPU oracles and kernel emulations";
  m.attr("__version__") = LLMIO_VERSION;
  bind_errors(m);
  bind_io(m);
  bind_io_write(m);  // Writer, fsync_path (io_write_bindings.cpp)
  bind_ring(m);
  bind_loader(m);
  bind_rans(m);
  bind_rans1(m);
  bind_quant(m);  // INT8 oracles and emulations, window cutting (quant_bindings.cpp)
}
