// llmio_native._core: the only place csrc/io, csrc/ring and the CPU oracles
// meet Python. Responsibilities: map C++ errors to Python exceptions once,
// release the GIL around every wait and copy, and tie the lifetime of native
// memory to the Python objects that view it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <system_error>

#include "io/errors.hpp"
#include "io/reader.hpp"
#include "ring/host_buffer.hpp"
#include "ring/slot_ring.hpp"
#include "sample/permute.hpp"

namespace py = pybind11;
using namespace llmio;

void bind_rans(py::module_& m);  // rans_bindings.cpp
void bind_quant(py::module_& m);  // quant_bindings.cpp

#ifndef LLMIO_VERSION
#define LLMIO_VERSION "0.0.0"
#endif

namespace {

PyObject* g_unsupported = nullptr;
PyObject* g_short_read = nullptr;
PyObject* g_resource = nullptr;

// Most native threads one object may start (Reader workers, ring producers):
// far above any useful pool, low enough that a typo fails here and not as a
// process thread limit.
constexpr int64_t kMaxThreads = 1024;

uint32_t check_count(int64_t v, int64_t max, const char* what) {
  if (v < 1 || v > max)
    throw std::invalid_argument(std::string(what) + " must be between 1 and " + std::to_string(max) +
                                ", got " + std::to_string(v));
  return static_cast<uint32_t>(v);
}

// A native string that may hold a file name as Python shows file names: the
// file system encoding with surrogateescape (os.fsdecode), so a path that is
// not valid UTF-8 round-trips instead of failing to convert. Paths come in as
// bytes (reader.py passes os.fsencode(path)).
py::str fs_str(const std::string& s) {
  PyObject* o = PyUnicode_DecodeFSDefaultAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

void set_os_error(PyObject* type, int err, const std::string& msg, const std::string& path) {
  py::tuple args = path.empty() ? py::tuple(py::make_tuple(err, fs_str(msg)))
                                : py::tuple(py::make_tuple(err, fs_str(msg), fs_str(path)));
  PyErr_SetObject(type, args.ptr());
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const ShortReadError& e) {
    set_os_error(g_short_read, e.err(), e.what(), e.path());
  } catch (const ResourceError& e) {
    set_os_error(g_resource, e.err(), e.what(), e.path());
  } catch (const IoError& e) {
    // OSError(errno, ...) picks FileNotFoundError, PermissionError, ... itself.
    set_os_error(PyExc_OSError, e.err(), e.what(), e.path());
  } catch (const UnsupportedError& e) {
    PyErr_SetObject(g_unsupported, fs_str(e.what()).ptr());
  } catch (const std::invalid_argument& e) {  // may name a path (a NUL in it)
    PyErr_SetObject(PyExc_ValueError, fs_str(e.what()).ptr());
  } catch (const std::system_error& e) {
    set_os_error(PyExc_OSError, e.code().value(), e.what(), "");
  }
}

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

uint64_t check_nonneg(int64_t v, const char* what) {
  if (v < 0) throw std::invalid_argument(std::string(what) + " must be >= 0, got " + std::to_string(v));
  return static_cast<uint64_t>(v);
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

// A filled ring slot handed to Python. Holding the ring keeps the arena alive
// for as long as any view of the slot exists.
struct PySlot {
  std::shared_ptr<SlotRing> ring;
  FilledSlot f;
  bool released = false;
  ~PySlot() {
    if (!released && ring) {
      try {
        ring->release(f.slot);
      } catch (...) {
      }
    }
  }
  void release() {
    if (released) return;
    released = true;
    ring->release(f.slot);
  }
  // The arena is MADV_DONTFORK: in a forked child it is not mapped, and a
  // view of it would fault. Refuse with an error instead.
  uint8_t* ptr() const {
    if (ring->foreign())
      throw std::runtime_error("ring slot " + std::to_string(f.slot) +
                               ": the ring's arena is not mapped in a forked child (MADV_DONTFORK); "
                               "create a new ring (or loader iterator) after the fork");
    return ring->slot_ptr(f.slot);
  }
};

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

PYBIND11_MODULE(_core, m) {
  m.doc() = "llmio_native native core: read engines, pinned ring, CPU oracles";
  m.attr("__version__") = LLMIO_VERSION;
#ifdef LLMIO_HAVE_URING
  m.attr("HAVE_URING") = true;
#else
  m.attr("HAVE_URING") = false;
#endif

  static py::exception<UnsupportedError> unsupported(m, "UnsupportedError", PyExc_RuntimeError);
  static py::exception<ShortReadError> short_read(m, "ShortReadError", PyExc_OSError);
  static py::exception<std::runtime_error> cuda_error(m, "CudaError", PyExc_RuntimeError);
  g_unsupported = unsupported.ptr();
  g_short_read = short_read.ptr();
  static py::exception<ResourceError> resource(m, "ResourceError", PyExc_OSError);
  g_resource = resource.ptr();
  py::register_exception_translator(&translate);
  bind_rans(m);

  m.def("probe_io_uring", &probe_dict, "io_uring usability on this kernel: compiled, usable, errno, reason");
  m.def("_set_faults", [](const std::string& spec) {
    detail::set_faults(spec);
    reset_io_uring_probe();
  }, "Test-only fault injection (see csrc/io/file.hpp).");
  m.def("_faults", &detail::faults_spec);
  m.def("host_live_bytes", &HostBuffer::live_bytes, "Bytes mapped by live host buffers and ring arenas");
  m.def("host_live_count", &HostBuffer::live_count);

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

  py::class_<PySlot>(m, "RingSlot", py::buffer_protocol())
      .def_buffer([](PySlot& s) {
        return py::buffer_info(s.ptr(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.f.used)}, {1});
      })
      .def_property_readonly("index", [](const PySlot& s) { return s.f.slot; })
      .def_property_readonly("seq", [](const PySlot& s) { return s.f.seq; })
      .def_property_readonly("tag", [](const PySlot& s) { return s.f.tag; })
      .def_property_readonly("offsets", [](const PySlot& s) { return s.f.offsets; })
      .def_property_readonly("nbytes", [](const PySlot& s) { return s.f.nbytes; })
      .def_property_readonly("used", [](const PySlot& s) { return s.f.used; })
      .def_property_readonly("ptr", [](const PySlot& s) { return reinterpret_cast<uintptr_t>(s.ptr()); })
      .def_property_readonly("released", [](const PySlot& s) { return s.released; })
      .def("array",
           [](py::object self, size_t k) {
             PySlot& s = self.cast<PySlot&>();
             if (s.released) throw std::invalid_argument("slot was released");
             if (k >= s.f.offsets.size())
               throw py::index_error("request " + std::to_string(k) + " out of range for " +
                                     std::to_string(s.f.offsets.size()));
             // The array keeps the slot object (and so the arena) alive.
             return py::array(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(s.f.nbytes[k])}, {1},
                              s.ptr() + s.f.offsets[k], self);
           },
           py::arg("k"), "numpy uint8 view of request k's bytes (no copy)")
      .def("release", &PySlot::release, "Give the slot back to the ring (idempotent).");

  py::class_<SlotRing, std::shared_ptr<SlotRing>>(m, "SlotRing")
      .def(py::init([](std::shared_ptr<Reader> reader, int64_t num_slots, int64_t slot_bytes, int64_t producers) {
             if (!reader) throw std::invalid_argument("SlotRing needs a reader, got None");
             const uint32_t ns = check_count(num_slots, int64_t(1) << 20, "num_slots");
             if (slot_bytes < 1) throw std::invalid_argument("slot_bytes must be >= 1, got " + std::to_string(slot_bytes));
             const uint32_t np = check_count(producers, kMaxThreads, "num_producers");
             py::gil_scoped_release nogil;  // joins producers if one cannot start
             return std::make_shared<SlotRing>(std::move(reader), ns, static_cast<uint64_t>(slot_bytes), np);
           }),
           py::arg("reader"), py::arg("num_slots"), py::arg("slot_bytes"), py::arg("num_producers") = 1)
      .def("required_bytes",
           [](SlotRing& r, const std::vector<std::tuple<uint32_t, int64_t, int64_t>>& reqs, bool packed) {
             std::vector<RingRequest> rr;
             for (auto& t : reqs)
               rr.push_back(RingRequest{std::get<0>(t), check_nonneg(std::get<1>(t), "offset"),
                                        check_nonneg(std::get<2>(t), "nbytes")});
             return r.required_bytes(rr, packed);
           },
           py::arg("requests"), py::arg("packed") = false)
      .def("submit",
           [](SlotRing& r, int64_t tag, const std::vector<std::tuple<uint32_t, int64_t, int64_t>>& reqs,
              bool packed) {
             std::vector<RingRequest> rr;
             rr.reserve(reqs.size());
             for (auto& t : reqs)
               rr.push_back(RingRequest{std::get<0>(t), check_nonneg(std::get<1>(t), "offset"),
                                        check_nonneg(std::get<2>(t), "nbytes")});
             return r.submit(tag, rr, packed);
           },
           py::arg("tag"), py::arg("requests"), py::arg("packed") = false)
      .def("get",
           [](std::shared_ptr<SlotRing> r, py::object timeout) -> py::object {
             // Wait in short slices so Ctrl-C (KeyboardInterrupt) gets through.
             const bool forever = timeout.is_none();
             const double limit = forever ? 0.0 : timeout.cast<double>();
             auto t0 = std::chrono::steady_clock::now();
             for (;;) {
               int64_t slice = 50;
               if (!forever) {
                 double left = limit - std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                 if (left <= 0) slice = 0;
                 else slice = std::min<int64_t>(50, static_cast<int64_t>(left * 1000) + 1);
               }
               std::optional<FilledSlot> f;
               {
                 py::gil_scoped_release nogil;
                 f = r->get(slice);
               }
               if (f) {
                 auto s = std::make_unique<PySlot>();
                 s->ring = r;
                 s->f = std::move(*f);
                 return py::cast(std::move(s));
               }
               if (PyErr_CheckSignals() != 0) throw py::error_already_set();
               if (!forever && slice == 0) return py::none();
             }
           },
           py::arg("timeout") = py::none(),
           "Next filled slot in submission order; None if timeout (seconds) passes first.")
      .def("close", [](SlotRing& r) {
        py::gil_scoped_release nogil;
        r.close();
      })
      .def_property_readonly("closed", &SlotRing::closed)
      .def_property_readonly("num_slots", &SlotRing::num_slots)
      .def_property_readonly("slot_bytes", &SlotRing::slot_bytes)
      .def_property_readonly("arena_ptr", [](const SlotRing& r) { return reinterpret_cast<uintptr_t>(r.arena()); })
      .def_property_readonly("arena_bytes", &SlotRing::arena_bytes)
      .def_property_readonly("huge_pages", &SlotRing::huge_pages)
      .def_property_readonly("pending", &SlotRing::pending)
      .def_property_readonly("held", &SlotRing::held)
      .def("stats", [](const SlotRing& r) {
        RingStats s = r.stats();
        py::dict d;
        d["submitted"] = s.submitted;
        d["delivered"] = s.delivered;
        d["released"] = s.released;
        d["bytes"] = s.bytes;
        d["producer_busy_s"] = s.producer_busy_ns / 1e9;
        d["consumer_wait_s"] = s.consumer_wait_ns / 1e9;
        d["consumer_waits"] = s.consumer_waits;
        return d;
      });

  py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer", py::buffer_protocol())
      .def(py::init([](int64_t nbytes) {
             if (nbytes < 1) throw std::invalid_argument("HostBuffer needs nbytes >= 1");
             return std::make_shared<HostBuffer>(static_cast<uint64_t>(nbytes));
           }),
           py::arg("nbytes"))
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      })
      .def_property_readonly("ptr", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &HostBuffer::size)
      .def_property_readonly("huge_pages", &HostBuffer::huge_pages);

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
        "Seeded bijection of [0, n) applied to idx (int64); see csrc/sample/permute.hpp.");

  bind_quant(m);  // quant_bindings.cpp: INT8 oracles and emulations, window cutting
}
