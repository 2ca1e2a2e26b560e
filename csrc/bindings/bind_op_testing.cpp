// _core.run_op: one op, forward and (optionally) backward, outside any plan. Tests use it to
// check each kernel against onnxruntime and PyTorch autograd.
#include <algorithm>
#include <cstring>
#include <limits>

#include <pybind11/stl.h>

#include "bindings/numpy_convert.h"

namespace pyedge {

static py::tuple run_op(const std::string& op_type, py::list inputs, py::dict attrs,
                        const std::string& domain, int opset, py::object grad_outputs,
                        py::object const_inputs, bool training, uint64_t seed, int num_outputs,
                        const std::string& grad_init) {
  NodeInfo node;
  node.op_type = op_type;
  node.domain = domain;
  node.name = "test";
  node.opset = opset;
  node.num_outputs = num_outputs;
  node.attrs = attrs_from_dict(attrs);

  std::vector<py::array> keep;
  std::vector<Tensor> in(inputs.size()), plan_in(inputs.size());
  std::vector<bool> is_const(inputs.size(), false);
  for (size_t i = 0; i < inputs.size(); ++i) {
    node.input_present.push_back(!inputs[i].is_none());
    if (inputs[i].is_none()) continue;
    keep.push_back(as_core_array(inputs[i]));
    in[i] = tensor_view(keep.back());
    is_const[i] = !is_float(in[i].dtype);  // default: integer inputs are plan-time constants
  }
  if (!const_inputs.is_none())
    for (auto i : const_inputs.cast<std::vector<size_t>>()) is_const.at(i) = true;
  for (size_t i = 0; i < in.size(); ++i) {
    plan_in[i] = in[i];
    if (!is_const[i]) plan_in[i].data = nullptr;
  }
  std::unique_ptr<Op> op = make_op(node, plan_in);
  op->backward_planned = !grad_outputs.is_none();  // as a plan with this op's backward would

  std::vector<OwnedTensor> out_store;
  std::vector<Tensor> out;
  for (auto& o : op->outputs) {
    out_store.push_back(OwnedTensor::make(o.dtype, o.shape));
    if (o.data) std::memcpy(out_store.back().t.data, o.data, o.nbytes());
    out.push_back(out_store.back().t);
  }
  RunContext ctx;
  ctx.training = training;
  ctx.seed = seed;
  OwnedTensor scratch = OwnedTensor::make(DType::u8, {int64_t(op->forward_scratch_bytes())});
  ctx.scratch = scratch.t.data;
  bool all_const = true;
  for (auto& o : op->outputs) all_const = all_const && o.data;
  if (!all_const) op->forward(in, out, ctx);

  py::list outs;
  for (int i = 0; i < op->n_visible; ++i) outs.append(numpy_copy(out[size_t(i)]));
  py::list grads;
  if (!grad_outputs.is_none()) {
    py::list go = grad_outputs;
    std::vector<Tensor> dout(out.size());
    for (size_t j = 0; j < go.size() && j < out.size(); ++j) {
      if (go[j].is_none()) continue;
      // Gradients are float32 in a plan whatever the value's dtype (a float64 value after a
      // Cast takes a float32 gradient buffer): the same here.
      auto g = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(go[j]);
      PYEDGE_CHECK(g, "grad_outputs[", j, "] is not convertible to a float32 array");
      keep.push_back(as_core_array(g));
      dout[j] = tensor_view(keep.back());
      PYEDGE_CHECK(dout[j].shape == out[j].shape, "grad_outputs[", j, "] has shape ",
                   shape_str(dout[j].shape), ", output is ", shape_str(out[j].shape));
    }
    std::vector<bool> need(in.size(), false);
    std::vector<OwnedTensor> din_store(in.size());
    std::vector<Tensor> din(in.size());
    bool any = false;
    for (size_t i = 0; i < in.size(); ++i) {
      need[i] = node.input_present[i] && !is_const[i] && op->differentiable_input(i);
      if (!need[i]) { din[i] = in[i]; din[i].data = nullptr; continue; }
      any = true;
      din_store[i] = OwnedTensor::make(DType::f32, in[i].shape);  // zeroed, float32 as in a plan
      din[i] = din_store[i].t;
      // "ones": the op must add to what is there; "fresh": garbage (NaN) the op must overwrite
      // when it assigns_fresh_grads(), zeros otherwise (as the planner does).
      float* d = din[i].ptr<float>();
      const int64_t n = din[i].numel();
      if (grad_init == "ones") std::fill(d, d + n, 1.f);
      else if (grad_init == "fresh" && op->assigns_fresh_grads() && i < 64) {
        std::fill(d, d + n, std::numeric_limits<float>::quiet_NaN());
        ctx.fresh_din |= uint64_t(1) << i;
      } else PYEDGE_CHECK(grad_init == "zeros" || grad_init == "fresh",
                          "grad_init must be 'zeros', 'ones' or 'fresh', got '", grad_init, "'");
    }
    if (any) {
      if (!op->has_backward())
        throw UnsupportedError(str_cat(node.where(), " has no backward rule"));
      OwnedTensor bscratch =
          OwnedTensor::make(DType::u8, {int64_t(op->backward_scratch_bytes(need))});
      ctx.scratch = bscratch.t.data;
      op->backward(in, out, dout, din, ctx);
    }
    for (size_t i = 0; i < in.size(); ++i)
      grads.append(need[i] ? py::object(numpy_copy(din[i])) : py::object(py::none()));
  }
  return py::make_tuple(outs, grads);
}

void bind_op_testing(py::module_& m) {
  m.def("run_op", &run_op, py::arg("op_type"), py::arg("inputs"), py::arg("attrs") = py::dict(),
        py::arg("domain") = "", py::arg("opset") = 17, py::arg("grad_outputs") = py::none(),
        py::arg("const_inputs") = py::none(), py::arg("training") = false,
        py::arg("seed") = 0, py::arg("num_outputs") = 1, py::arg("grad_init") = "zeros",
        "Run one op: returns (outputs, input_grads). input_grads is empty unless "
        "grad_outputs is given; entries are None for inputs that take no gradient. Integer "
        "inputs (and those listed in const_inputs) count as known at plan time. num_outputs is how many outputs the node lists. grad_init: what the input-gradient buffers hold before the backward: 'zeros', 'ones' (the op adds to them) or 'fresh' (NaN, marked for ops that assign fresh gradients).");
  m.def("registered_ops", &registered_ops);
}

}  // namespace pyedge
