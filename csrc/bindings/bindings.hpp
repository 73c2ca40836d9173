// Shared by the files of llmio_native._core's bindings (one per component:
// errors_bindings.cpp, io_bindings.cpp, ring_bindings.cpp, loader_bindings.cpp,
// rans_bindings.cpp; core_module.cpp calls them). The only files that know
// Python are in csrc/bindings.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace llmio {
namespace bindings {

// Most native threads one object may start (Reader workers, ring producers):
// far above any useful pool, low enough that a typo fails here and not as a
// process thread limit.
constexpr int64_t kMaxThreads = 1024;

// v as a count in [1, max]; std::invalid_argument (ValueError) naming `what` otherwise.
uint32_t check_count(int64_t v, int64_t max, const char* what);
// v as an unsigned offset or size; std::invalid_argument naming `what` when negative.
uint64_t check_nonneg(int64_t v, const char* what);

// A native string that may hold a file name as Python shows file names: the
// file system encoding with surrogateescape (os.fsdecode), so a path that is
// not valid UTF-8 round-trips instead of failing to convert. Paths come in as
// bytes (reader.py passes os.fsencode(path)).
pybind11::str fs_str(const std::string& s);

}  // namespace bindings
}  // namespace llmio

// One per component, each in its own file; called from core_module.cpp.
void bind_errors(pybind11::module_& m);  // errors_bindings.cpp: exceptions and the C++ -> Python mapping
void bind_io(pybind11::module_& m);      // io_bindings.cpp: Reader, io_uring probe, fault injection
void bind_io_write(pybind11::module_& m);  // io_write_bindings.cpp: Writer, fsync_path
void bind_ring(pybind11::module_& m);    // ring_bindings.cpp: SlotRing, RingSlot, HostBuffer
void bind_loader(pybind11::module_& m);  // loader_bindings.cpp: the seeded permutation
void bind_rans(pybind11::module_& m);    // rans_bindings.cpp: the rans codec (CPU) and its kernel emulation
void bind_rans1(pybind11::module_& m);   // rans1_bindings.cpp: the rans1 context codec (CPU) and its kernel emulation
void bind_quant(pybind11::module_& m);   // quant_bindings.cpp: INT8 oracles + kernel emulations, window cutting
