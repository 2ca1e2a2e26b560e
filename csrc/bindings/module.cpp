// pyedge._core: the pybind11 module. Thin: each bind_* lives beside what it exposes.
#include "bindings/numpy_convert.h"
#include "common/alloc_counter.h"
#include "common/parallel.h"
#include "ops/blas.h"

namespace pyedge {
void bind_op_testing(py::module_& m);
void bind_session(py::module_& m);
void bind_simd(py::module_& m);
}  // namespace pyedge

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  m.doc() = "pyedge core: ONNX training plans with sparse backprop, in C++";
  // Exceptions: the base class first so the subclass is matched first by pybind11.
  static py::exception<pyedge::Error> error(m, "PyedgeError", PyExc_ValueError);
  static py::exception<pyedge::UnsupportedError> unsupported(m, "UnsupportedOpError",
                                                             error.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pyedge::UnsupportedError& e) {
      py::set_error(unsupported, e.what());
    } catch (const pyedge::Error& e) {
      py::set_error(error, e.what());
    } catch (const std::bad_alloc&) {
      py::set_error(PyExc_MemoryError, "pyedge: out of memory");
    }
  });
  m.def("set_num_threads", &pyedge::set_num_threads);
  m.def("num_threads", &pyedge::num_threads);
  m.def("blas_core", [] { return std::string(pyedge::blas_core_name()); },
        "OpenBLAS's kernel family for this CPU (set OPENBLAS_CORETYPE before import to choose).");
  m.def("heap_allocation_count", &pyedge::heap_allocation_count,
        "Heap allocations made by the core's own code since import.");
  pyedge::bind_op_testing(m);
  pyedge::bind_session(m);
  pyedge::bind_simd(m);
}
