#include "bindings/numpy_convert.h"

#include <cstring>

#include <pybind11/stl.h>  // list attributes -> std::vector

namespace pyedge {

DType dtype_from_numpy(const py::dtype& dt) {
  char k = dt.kind();
  size_t s = dt.itemsize();
  if (k == 'f' && s == 4) return DType::f32;
  if (k == 'f' && s == 8) return DType::f64;
  if (k == 'i' && s == 8) return DType::i64;
  if (k == 'i' && s == 4) return DType::i32;
  if (k == 'u' && s == 1) return DType::u8;
  if (k == 'b') return DType::boolean;
  throw Error(str_cat("unsupported array dtype '", std::string(py::str(dt)),
                      "' (pyedge handles float32, float64, int64, int32, uint8, bool)"));
}

py::dtype numpy_dtype(DType dt) {
  switch (dt) {
    case DType::f32: return py::dtype::of<float>();
    case DType::f64: return py::dtype::of<double>();
    case DType::i64: return py::dtype::of<int64_t>();
    case DType::i32: return py::dtype::of<int32_t>();
    case DType::u8: return py::dtype::of<uint8_t>();
    case DType::boolean: return py::dtype::of<bool>();
  }
  return py::dtype::of<float>();
}

py::array as_core_array(py::handle obj) {
  py::array a = py::array::ensure(obj, py::array::c_style);
  if (!a) throw Error("expected an array-like value");
  char k = a.dtype().kind();
  size_t s = a.dtype().itemsize();
  // Narrow/odd types are widened to what the kernels take.
  if (k == 'f' && s == 2) a = a.attr("astype")("float32");
  else if ((k == 'i' && s < 4) || (k == 'u' && s > 1)) a = a.attr("astype")("int64");
  dtype_from_numpy(a.dtype());  // throws for anything else
  return py::array::ensure(a, py::array::c_style);
}

Tensor tensor_view(const py::array& a) {
  Tensor t;
  t.dtype = dtype_from_numpy(a.dtype());
  t.shape.assign(a.shape(), a.shape() + a.ndim());
  t.data = const_cast<void*>(a.data());
  return t;
}

py::array numpy_view(const Tensor& t, py::handle owner) {
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  return py::array(numpy_dtype(t.dtype), shape, t.data, owner);
}

py::array numpy_copy(const Tensor& t) {
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  py::array a(numpy_dtype(t.dtype), shape);
  if (t.nbytes()) std::memcpy(a.mutable_data(), t.data, t.nbytes());
  return a;
}

Attrs attrs_from_dict(const py::dict& d) {
  Attrs attrs;
  for (auto kv : d) {
    std::string k = py::str(kv.first);
    py::handle v = kv.second;
    if (py::isinstance<py::bool_>(v)) attrs.values[k] = int64_t(v.cast<bool>());
    else if (py::isinstance<py::int_>(v)) attrs.values[k] = v.cast<int64_t>();
    else if (py::isinstance<py::float_>(v)) attrs.values[k] = v.cast<double>();
    else if (py::isinstance<py::str>(v)) attrs.values[k] = v.cast<std::string>();
    else if (py::isinstance<py::bytes>(v)) attrs.values[k] = std::string(v.cast<py::bytes>());
    else if (py::isinstance<py::array>(v)) {
      py::array a = as_core_array(v);
      Tensor src = tensor_view(a);
      OwnedTensor o = OwnedTensor::make(src.dtype, src.shape);
      if (src.nbytes()) std::memcpy(o.t.data, src.data, src.nbytes());
      attrs.values[k] = o;
    } else if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) {
      py::sequence seq = v.cast<py::sequence>();
      bool all_int = true, all_str = seq.size() > 0;
      for (auto e : seq) {
        if (!py::isinstance<py::int_>(e)) all_int = false;
        if (!py::isinstance<py::str>(e)) all_str = false;
      }
      if (all_str) attrs.values[k] = seq.cast<std::vector<std::string>>();
      else if (all_int) attrs.values[k] = seq.cast<std::vector<int64_t>>();
      else attrs.values[k] = seq.cast<std::vector<double>>();
    } else {
      throw Error(str_cat("attribute '", k, "' has an unsupported type"));
    }
  }
  return attrs;
}

}  // namespace pyedge
