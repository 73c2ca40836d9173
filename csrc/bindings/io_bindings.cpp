// llmio_native._core: the read engines (csrc/io) - Reader, the io_uring probe,
// test-only fault injection. The GIL is released around every read; arrays
// returned by read()/read_batch() own their aligned memory through a capsule.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/bindings.hpp"
#include "common/errors.hpp"
#include "io/reader.hpp"

namespace py = pybind11;
using namespace llmio;
using namespace llmio::bindings;

namespace {

// Aligned memory owned by a numpy array through a capsule.
struct OwnedBuffer {
  uint8_t* base = nullptr;
  uint8_t* dst = nullptr;
  uint32_t slack_before = 0, slack_after = 0;
};

OwnedBuffer alloc_for(const Reader& r, uint32_t file, uint64_t offset, uint64_t nbytes) {
  const uint64_t A = r.alignment(file);
  const uint64_t pad = offset % A;
  const uint64_t total = std::max<uint64_t>(A, (pad + nbytes + A - 1) / A * A);
  void* p = nullptr;
  if (posix_memalign(&p, A, total) != 0) throw std::bad_alloc();
  OwnedBuffer b;
  b.base = static_cast<uint8_t*>(p);
  b.dst = b.base + pad;
  b.slack_before = static_cast<uint32_t>(pad);
  b.slack_after = static_cast<uint32_t>(total - pad - nbytes);
  return b;
}

py::array wrap(const OwnedBuffer& b, uint64_t nbytes) {
  py::capsule owner(b.base, [](void* q) { std::free(q); });
  return py::array(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(nbytes)}, {1}, b.dst, owner);
}

uint32_t check_file(const Reader& r, int64_t i) {
  if (i < 0 || static_cast<uint64_t>(i) >= r.num_files())
    throw py::index_error("file index " + std::to_string(i) + " out of range for " +
                          std::to_string(r.num_files()) + " files");
  return static_cast<uint32_t>(i);
}

py::dict reader_stats(Reader& r) {
  auto& s = r.stats();
  py::dict d;
  d["backend"] = r.backend();
  d["batches"] = s.batches.load();
  d["requests"] = s.requests.load();
  d["bytes"] = s.bytes.load();
  d["ops_direct"] = s.ops_direct.load();
  d["ops_buffered"] = s.ops_buffered.load();
  d["bytes_direct"] = s.bytes_direct.load();
  d["bytes_buffered"] = s.bytes_buffered.load();
  d["bounce_ops"] = s.bounce_ops.load();
  d["bounce_bytes"] = s.bounce_bytes.load();
  d["fixed_buffer_ops"] = s.fixed_buffer_ops.load();
  d["retries"] = s.retries.load();
  d["submits"] = s.submits.load();
  d["wait_s"] = s.wait_ns.load() / 1e9;
  d["direct_requested"] = r.direct_requested();
  py::list fallbacks;
  for (const auto& f : r.fallbacks()) fallbacks.append(fs_str(f));
  d["direct_fallbacks"] = fallbacks;
  py::list direct_files;
  for (size_t i = 0; i < r.num_files(); ++i) direct_files.append(r.direct_active(i));
  d["direct_active"] = direct_files;
  for (auto& kv : r.features()) d[kv.first.c_str()] = kv.second;
  d["max_io_bytes"] = r.options().max_io_bytes;
  return d;
}

py::dict probe_dict() {
  UringProbe p = probe_io_uring();
  py::dict d;
  d["compiled"] = p.compiled;
  d["usable"] = p.usable;
  d["errno"] = p.err;
  d["reason"] = p.reason;
  return d;
}

}  // namespace

void bind_io(py::module_& m) {
#ifdef LLMIO_HAVE_URING
  m.attr("HAVE_URING") = true;
#else
  m.attr("HAVE_URING") = false;
#endif
  m.def("probe_io_uring", &probe_dict, "io_uring usability on this kernel: compiled, usable, errno, reason");
  m.def("_set_faults", [](const std::string& spec) {
    detail::set_faults(spec);
    reset_io_uring_probe();
  }, "Test-only fault injection (see csrc/io/file.hpp).");
  m.def("_faults", &detail::faults_spec);

  py::class_<Reader, std::shared_ptr<Reader>>(m, "Reader")
      .def(py::init([](const std::vector<std::string>& paths, const std::string& backend, bool direct,
                       int64_t queue_depth, int64_t num_threads, int64_t max_io_bytes) {
             EngineOptions o;
             o.queue_depth = check_count(queue_depth, 65536, "queue_depth");
             o.num_threads = check_count(num_threads, kMaxThreads, "num_threads");
             if (max_io_bytes < 4096)
               throw std::invalid_argument("max_io_bytes must be >= 4096, got " + std::to_string(max_io_bytes));
             o.max_io_bytes = static_cast<uint64_t>(max_io_bytes);
             py::gil_scoped_release nogil;
             return std::make_shared<Reader>(paths, backend, direct, o);
           }),
           py::arg("paths"), py::arg("backend"), py::arg("direct") = true, py::arg("queue_depth") = 64,
           py::arg("num_threads") = 16, py::arg("max_io_bytes") = 1 << 20)
      .def_property_readonly("backend", &Reader::backend)
      .def_property_readonly("num_files", &Reader::num_files)
      .def("path", [](const Reader& r, int64_t i) { return fs_str(r.path(check_file(r, i))); })
      .def("file_size", [](const Reader& r, int64_t i) { return r.file_size(check_file(r, i)); })
      .def("alignment", [](const Reader& r, int64_t i) { return r.alignment(check_file(r, i)); })
      .def("direct_active", [](const Reader& r, int64_t i) { return r.direct_active(check_file(r, i)); })
      .def("read",
           [](Reader& r, int64_t i, int64_t offset, int64_t nbytes) {
             const uint32_t f = check_file(r, i);
             const uint64_t off = check_nonneg(offset, "offset"), n = check_nonneg(nbytes, "nbytes");
             OwnedBuffer b = alloc_for(r, f, off, n);
             py::array out = wrap(b, n);  // owns b from here on
             ReadRequest q{f, off, n, b.dst, b.slack_before, b.slack_after};
             {
               py::gil_scoped_release nogil;
               r.read_batch(&q, 1);
             }
             return out;
           },
           py::arg("i"), py::arg("offset"), py::arg("nbytes"))
      .def("read_batch",
           [](Reader& r, const std::vector<std::tuple<int64_t, int64_t, int64_t>>& reqs) {
             std::vector<ReadRequest> qs;
             py::list out;
             qs.reserve(reqs.size());
             for (const auto& t : reqs) {
               const uint32_t f = check_file(r, std::get<0>(t));
               const uint64_t off = check_nonneg(std::get<1>(t), "offset");
               const uint64_t n = check_nonneg(std::get<2>(t), "nbytes");
               OwnedBuffer b = alloc_for(r, f, off, n);
               out.append(wrap(b, n));
               qs.push_back(ReadRequest{f, off, n, b.dst, b.slack_before, b.slack_after});
             }
             {
               py::gil_scoped_release nogil;
               r.read_batch(qs.data(), qs.size());
             }
             return out;
           },
           py::arg("requests"))
      .def("read_into",
           [](Reader& r, int64_t i, int64_t offset, py::object buf) {
             const uint32_t f = check_file(r, i);
             const uint64_t off = check_nonneg(offset, "offset");
             Py_buffer view;
             if (PyObject_GetBuffer(buf.ptr(), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
               PyErr_Clear();
               throw py::type_error("read_into needs a writable C-contiguous buffer, got " +
                                    std::string(py::str(py::type::of(buf))));
             }
             ReadRequest q{f, off, static_cast<uint64_t>(view.len), static_cast<uint8_t*>(view.buf), 0, 0};
             try {
               py::gil_scoped_release nogil;
               r.read_batch(&q, 1);
             } catch (...) {
               PyBuffer_Release(&view);
               throw;
             }
             PyBuffer_Release(&view);
             return q.nbytes;
           },
           py::arg("i"), py::arg("offset"), py::arg("buf"))
      .def("read_batch_ptr",
           [](Reader& r, const std::vector<std::tuple<int64_t, int64_t, uintptr_t, int64_t>>& reqs) {
             // (file, offset, ptr, nbytes): the caller keeps the memory alive.
             std::vector<ReadRequest> qs;
             qs.reserve(reqs.size());
             for (const auto& t : reqs) {
               const uint32_t f = check_file(r, std::get<0>(t));
               qs.push_back(ReadRequest{f, check_nonneg(std::get<1>(t), "offset"),
                                        check_nonneg(std::get<3>(t), "nbytes"),
                                        reinterpret_cast<uint8_t*>(std::get<2>(t)), 0, 0});
             }
             py::gil_scoped_release nogil;
             r.read_batch(qs.data(), qs.size());
           },
           py::arg("requests"))
      .def("read_many",
           [](Reader& r, py::array_t<int64_t, py::array::c_style | py::array::forcecast> files,
              py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets,
              py::array_t<int64_t, py::array::c_style | py::array::forcecast> nbytes, py::object out,
              py::array_t<int64_t, py::array::c_style | py::array::forcecast> out_offsets) {
             // Vectorised scatter read: request k reads nbytes[k] bytes of file files[k]
             // at offsets[k] into out[out_offsets[k]:]. One submission, no per-request
             // Python objects.
             const py::ssize_t n = offsets.size();
             if (files.size() != n || nbytes.size() != n || out_offsets.size() != n)
               throw std::invalid_argument("read_many: files, offsets, nbytes and out_offsets need the same length");
             Py_buffer view;
             if (PyObject_GetBuffer(out.ptr(), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
               PyErr_Clear();
               throw py::type_error("read_many needs a writable C-contiguous output buffer");
             }
             std::vector<ReadRequest> qs(static_cast<size_t>(n));
             const int64_t *f = files.data(), *o = offsets.data(), *nb = nbytes.data(), *oo = out_offsets.data();
             const uint64_t cap = static_cast<uint64_t>(view.len);
             try {
               for (py::ssize_t k = 0; k < n; ++k) {
                 const uint32_t fi = check_file(r, f[k]);
                 const uint64_t len = check_nonneg(nb[k], "nbytes"), at = check_nonneg(oo[k], "out offset");
                 if (at > cap || len > cap - at)
                   throw std::invalid_argument("read_many: request " + std::to_string(k) + " writes [" +
                                               std::to_string(at) + ", " + std::to_string(at + len) +
                                               ") past the output buffer of " + std::to_string(cap) + " bytes");
                 qs[k] = ReadRequest{fi, check_nonneg(o[k], "offset"), len, static_cast<uint8_t*>(view.buf) + at, 0, 0};
               }
               py::gil_scoped_release nogil;
               r.read_batch(qs.data(), qs.size());
             } catch (...) {
               PyBuffer_Release(&view);
               throw;
             }
             PyBuffer_Release(&view);
           },
           py::arg("files"), py::arg("offsets"), py::arg("nbytes"), py::arg("out"), py::arg("out_offsets"))
      .def("stats", &reader_stats);
}
