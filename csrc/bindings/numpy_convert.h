// numpy <-> core tensors. Views, not copies, wherever the memory layout allows.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "ops/op.h"
#include "tensor/tensor.h"

namespace pyedge {
namespace py = pybind11;

DType dtype_from_numpy(const py::dtype& dt);
py::dtype numpy_dtype(DType dt);
// A C-contiguous array of a supported dtype (converted if needed; the caller keeps it alive).
py::array as_core_array(py::handle obj);
Tensor tensor_view(const py::array& a);  // the array must come from as_core_array
// numpy array viewing `t`, keeping `owner` alive as its base.
py::array numpy_view(const Tensor& t, py::handle owner);
py::array numpy_copy(const Tensor& t);
Attrs attrs_from_dict(const py::dict& d);

}  // namespace pyedge
