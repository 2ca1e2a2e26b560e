// pyedge._core: the pybind11 module. Thin: each bind_* lives beside what it exposes.
#include <chrono>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/numpy_convert.h"
#include "common/alloc_counter.h"
#include "common/parallel.h"
#include "ops/blas.h"

namespace pyedge {
void bind_op_testing(py::module_& m);
void bind_quant(py::module_& m);
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
  // Both a PyedgeError and a MemoryError (raised before allocating what the system lacks).
  static py::object oom = py::reinterpret_steal<py::object>(PyErr_NewException(
      "pyedge._core.OutOfMemoryError", py::make_tuple(error, py::handle(PyExc_MemoryError)).ptr(),
      nullptr));
  m.attr("OutOfMemoryError") = oom;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pyedge::OutOfMemoryError& e) {
      py::set_error(oom, e.what());
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
  m.def("time_sgemm", [](int64_t n, int reps) {
        // The core's GEMM as the ops call it (split over the core's threads), on n x n x n:
        // the bench's SGEMM calibration. Seconds per call.
        PYEDGE_CHECK(n > 0 && n <= 8192 && reps > 0, "time_sgemm: n in 1..8192, reps > 0");
        std::vector<float> a(size_t(n * n), 0.5f), b(size_t(n * n), 0.25f), c(size_t(n * n));
        std::vector<double> secs;
        py::gil_scoped_release nogil;
        for (int r = 0; r < reps; ++r) {
          auto t0 = std::chrono::steady_clock::now();
          pyedge::sgemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
          secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        return secs;
      }, py::arg("n") = 1024, py::arg("reps") = 10);
  m.def("heap_allocation_count", &pyedge::heap_allocation_count,
        "Heap allocations made by the core's own code since import.");
  pyedge::bind_op_testing(m);
  pyedge::bind_quant(m);
  pyedge::bind_session(m);
  pyedge::bind_simd(m);
}
