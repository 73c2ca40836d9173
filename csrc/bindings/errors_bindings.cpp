// llmio_native._core's exceptions and the one mapping of the native core's
// typed errors (common/errors.hpp) to Python exceptions:
//   IoError -> OSError(errno, message, filename) (FileNotFoundError, ... by errno)
//   ShortReadError -> ShortReadError, ResourceError -> ResourceError (OSErrors)
//   UnsupportedError -> UnsupportedError (a RuntimeError)
//   std::invalid_argument -> ValueError (pybind11 itself: std::out_of_range -> IndexError)
//   std::system_error -> OSError(errno, message)
// CudaError is registered here too; llmio_native._cuda raises it (its own
// translator maps llmio::CudaError to it).
#include <pybind11/pybind11.h>

#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>

#include "bindings/bindings.hpp"
#include "common/errors.hpp"

namespace py = pybind11;
using namespace llmio;

namespace llmio {
namespace bindings {

uint32_t check_count(int64_t v, int64_t max, const char* what) {
  if (v < 1 || v > max)
    throw std::invalid_argument(std::string(what) + " must be between 1 and " + std::to_string(max) +
                                ", got " + std::to_string(v));
  return static_cast<uint32_t>(v);
}

uint64_t check_nonneg(int64_t v, const char* what) {
  if (v < 0) throw std::invalid_argument(std::string(what) + " must be >= 0, got " + std::to_string(v));
  return static_cast<uint64_t>(v);
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

}  // namespace bindings
}  // namespace llmio

namespace {

using llmio::bindings::fs_str;

PyObject* g_unsupported = nullptr;
PyObject* g_short_read = nullptr;
PyObject* g_resource = nullptr;

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

}  // namespace

void bind_errors(py::module_& m) {
  static py::exception<UnsupportedError> unsupported(m, "UnsupportedError", PyExc_RuntimeError);
  static py::exception<ShortReadError> short_read(m, "ShortReadError", PyExc_OSError);
  static py::exception<std::runtime_error> cuda_error(m, "CudaError", PyExc_RuntimeError);
  g_unsupported = unsupported.ptr();
  g_short_read = short_read.ptr();
  static py::exception<ResourceError> resource(m, "ResourceError", PyExc_OSError);
  g_resource = resource.ptr();
  py::register_exception_translator(&translate);
}
