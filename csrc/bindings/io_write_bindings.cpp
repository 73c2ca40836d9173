// llmio_native._core: the write path (csrc/io/writer.hpp) - Writer and
// fsync_path. The GIL is released around every copy, wait and sync.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "bindings/bindings.hpp"
#include "common/errors.hpp"
#include "io/staging_pool.hpp"
#include "io/writer.hpp"

namespace py = pybind11;
using namespace llmio;
using namespace llmio::bindings;

namespace {

py::dict writer_stats(Writer& w) {
  auto& s = w.stats();
  py::dict d;
  d["backend"] = w.backend();
  d["bytes"] = s.bytes.load();
  d["ops"] = s.ops.load();
  d["ops_direct"] = s.ops_direct.load();
  d["ops_buffered"] = s.ops_buffered.load();
  d["bytes_direct"] = s.bytes_direct.load();
  d["bytes_buffered"] = s.bytes_buffered.load();
  d["fixed_buffer_ops"] = s.fixed_buffer_ops.load();
  d["retries"] = s.retries.load();
  d["submits"] = s.submits.load();
  d["wait_s"] = s.wait_ns.load() / 1e9;
  d["copy_s"] = s.copy_ns.load() / 1e9;
  d["direct_requested"] = w.options().direct;
  d["direct_active"] = w.direct_active();
  d["direct_fallbacks"] = s.direct_fallbacks.load();
  d["fallback_reason"] = w.fallback_reason();
  d["closed"] = w.closed();
  for (auto& kv : w.features()) d[kv.first.c_str()] = kv.second;
  return d;
}

}  // namespace

void bind_io_write(py::module_& m) {
  py::class_<Writer, std::shared_ptr<Writer>>(m, "Writer")
      .def(py::init([](const std::string& path, const std::string& backend, bool direct, int64_t queue_depth,
                       int64_t chunk_bytes, int64_t staging_bytes, bool exclusive) {
             WriterOptions o;
             o.backend = backend;
             o.direct = direct;
             o.queue_depth = check_count(queue_depth, 4096, "queue_depth");
             if (chunk_bytes < 1 || chunk_bytes > (1ll << 30))
               throw std::invalid_argument("chunk_bytes must be between 1 and 1 GiB, got " + std::to_string(chunk_bytes));
             o.chunk_bytes = static_cast<uint64_t>(chunk_bytes);
             o.staging_bytes = check_nonneg(staging_bytes, "staging_bytes");
             o.exclusive = exclusive;
             py::gil_scoped_release nogil;
             return std::make_shared<Writer>(path, o);
           }),
           py::arg("path"), py::arg("backend"), py::arg("direct") = true, py::arg("queue_depth") = 32,
           py::arg("chunk_bytes") = 4 << 20, py::arg("staging_bytes") = 64 << 20, py::arg("exclusive") = false)
      .def_property_readonly("path", [](const Writer& w) { return fs_str(w.path()); })
      .def_property_readonly("backend", &Writer::backend)
      .def_property_readonly("direct_active", &Writer::direct_active)
      .def_property_readonly("closed", &Writer::closed)
      .def_property_readonly("alignment", &Writer::alignment)
      .def_property_readonly("chunk_bytes", &Writer::chunk_bytes)
      .def("write",
           [](Writer& w, py::object buf) {
             // Any C-contiguous buffer, read-only ones included (bytes).
             Py_buffer view;
             if (PyObject_GetBuffer(buf.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
               PyErr_Clear();
               throw py::type_error("Writer.write needs a C-contiguous buffer, got " +
                                    std::string(py::str(py::type::of(buf))));
             }
             uint64_t at = 0;
             try {
               py::gil_scoped_release nogil;
               at = w.write(static_cast<const uint8_t*>(view.buf), static_cast<uint64_t>(view.len));
             } catch (...) {
               PyBuffer_Release(&view);
               throw;
             }
             PyBuffer_Release(&view);
             return at;
           },
           py::arg("data"), "Append a C-contiguous buffer; returns the file offset it starts at.")
      .def("write_ptr",
           [](Writer& w, uintptr_t ptr, int64_t nbytes) {
             // The caller keeps [ptr, ptr + nbytes) alive for the call (a CPU tensor).
             const uint64_t n = check_nonneg(nbytes, "nbytes");
             if (n && !ptr) throw std::invalid_argument("write_ptr: null pointer with nbytes > 0");
             py::gil_scoped_release nogil;
             return w.write(reinterpret_cast<const uint8_t*>(ptr), n);
           },
           py::arg("ptr"), py::arg("nbytes"))
      .def("tell", &Writer::tell)
      .def("flush", &Writer::flush, py::call_guard<py::gil_scoped_release>())
      .def("close", &Writer::close, py::arg("sync") = "data", py::call_guard<py::gil_scoped_release>())
      .def("abort", &Writer::abort, py::call_guard<py::gil_scoped_release>())
      .def("stats", &writer_stats);

  m.def("staging_pool_enter", &staging_pool::scope_enter,
        "Open a scope of the Writer staging pool (io/staging_pool.hpp): Writers reuse idle arenas.");
  m.def("staging_pool_exit", &staging_pool::scope_exit,
        "Close a scope; the last one unmaps every idle arena.");
  m.def("staging_pool_stats", [] {
    const StagingPoolStats s = staging_pool::stats();
    py::dict d;
    d["idle_bytes"] = s.idle_bytes;
    d["idle_count"] = s.idle_count;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["scopes"] = s.scopes;
    d["max_idle_bytes"] = kStagingPoolMaxIdleBytes;
    return d;
  }, "Counters of the Writer staging pool: idle_bytes, idle_count, hits, misses, scopes, max_idle_bytes.");

  m.def("fsync_path", &fsync_path, py::arg("path"), py::arg("data_only") = false,
        py::call_guard<py::gil_scoped_release>(),
        "open + fsync (fdatasync when data_only) of a file or a directory; OSError naming the path.");
}
