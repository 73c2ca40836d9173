// llmio_native._core: the pinned-slot ring and aligned host memory (csrc/ring).
// A RingSlot holds its ring, so the arena outlives every view of a slot; waits
// release the GIL in short slices so Ctrl-C gets through.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/bindings.hpp"
#include "common/errors.hpp"
#include "io/reader.hpp"
#include "ring/host_buffer.hpp"
#include "ring/slot_ring.hpp"

namespace py = pybind11;
using namespace llmio;
using namespace llmio::bindings;

namespace {

// A Python fence (a torch.cuda.Event, or anything with query() -> bool and
// synchronize()). The ring calls it only from the consumer's own calls, never
// with its mutex held; each call takes the GIL (the caller may have released
// it to wait). A Python exception travels as error_already_set to the caller.
class PyFence final : public Fence {
 public:
  explicit PyFence(py::object obj) : obj_(std::move(obj)) {}
  ~PyFence() override {
    if (!Py_IsInitialized()) {
      (void)obj_.release();  // the interpreter is gone: nothing to give back
      return;
    }
    py::gil_scoped_acquire gil;
    obj_ = py::object();
  }
  bool query() override {
    py::gil_scoped_acquire gil;
    return static_cast<bool>(py::bool_(obj_.attr("query")()));
  }
  void synchronize() override {
    py::gil_scoped_acquire gil;
    obj_.attr("synchronize")();
  }

 private:
  py::object obj_;
};

std::shared_ptr<Fence> make_fence(const py::object& fence) {
  if (fence.is_none()) return nullptr;
  if (!py::hasattr(fence, "query") || !py::hasattr(fence, "synchronize"))
    throw py::type_error("release(slot, fence): the fence needs query() and synchronize() (a "
                         "torch.cuda.Event), got " + std::string(py::str(py::type::of(fence))));
  return std::make_shared<PyFence>(fence);
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
  // The slot leaves the consumer's hands even if the fence's query() throws
  // (it stays releasing in the ring), so `released` is set first.
  void release(const py::object& fence) {
    if (released) return;
    std::shared_ptr<Fence> fc = make_fence(fence);
    released = true;
    ring->release(f.slot, std::move(fc));
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

}  // namespace

void bind_ring(py::module_& m) {
  m.def("host_live_bytes", &HostBuffer::live_bytes, "Bytes mapped by live host buffers and ring arenas");
  m.def("host_live_count", &HostBuffer::live_count);

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
      .def("release", &PySlot::release, py::arg("fence") = py::none(),
           "Give the slot back to the ring (idempotent). With a fence (a torch.cuda.Event: "
           "query() -> bool, synchronize()) the slot is reused only once the fence completed.");

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
      .def("poll", [](SlotRing& r) { return r.poll(); },
           "Free the slots released behind fences that completed; returns how many.")
      .def("close", [](SlotRing& r) {
        py::gil_scoped_release nogil;  // joins producers; fences take the GIL back
        r.close();
      },
      "Stop and join the producers, then synchronize pending fences and free their slots.")
      .def_property_readonly("closed", &SlotRing::closed)
      .def_property_readonly("num_slots", &SlotRing::num_slots)
      .def_property_readonly("slot_bytes", &SlotRing::slot_bytes)
      .def_property_readonly("arena_ptr", [](const SlotRing& r) { return reinterpret_cast<uintptr_t>(r.arena()); })
      .def_property_readonly("arena_bytes", &SlotRing::arena_bytes)
      .def_property_readonly("huge_pages", &SlotRing::huge_pages)
      .def_property_readonly("pending", &SlotRing::pending)
      .def_property_readonly("held", &SlotRing::held)
      .def_property_readonly("releasing", &SlotRing::releasing)
      .def("stats", [](const SlotRing& r) {
        RingStats s = r.stats();
        py::dict d;
        d["submitted"] = s.submitted;
        d["delivered"] = s.delivered;
        d["released"] = s.released;
        d["releasing"] = s.releasing;
        d["fence_waits"] = s.fence_waits;
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
}
