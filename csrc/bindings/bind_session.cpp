// Model and Session for Python. Inputs cross as numpy views; the GIL is released while the
// core computes.
#include <pybind11/stl.h>

#include "bindings/numpy_convert.h"
#include "common/memory_limit.h"
#include "graph/session.h"

namespace pyedge {
namespace {

DType dtype_from_name(const std::string& s) {
  if (s == "float32") return DType::f32;
  if (s == "float64") return DType::f64;
  if (s == "int64") return DType::i64;
  if (s == "int32") return DType::i32;
  if (s == "uint8") return DType::u8;
  if (s == "bool") return DType::boolean;
  throw Error(str_cat("unsupported dtype '", s, "'"));
}

// Keeps a Python object alive from C++; drops the reference under the GIL.
std::shared_ptr<void> hold(py::object o) {
  return std::shared_ptr<void>(new py::object(std::move(o)), [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
}

struct Inputs {
  std::vector<py::array> keep;
  std::vector<Tensor> tensors;
};

Inputs convert_inputs(const Model& m, py::list inputs) {
  PYEDGE_CHECK(inputs.size() == m.inputs.size(), "expected ", m.inputs.size(),
               " inputs, got ", inputs.size());
  Inputs r;
  r.tensors.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].is_none()) continue;
    r.keep.push_back(as_core_array(inputs[i]));
    r.tensors[i] = tensor_view(r.keep.back());
  }
  return r;
}

py::dict stats_dict(const PlanStats& s) {
  py::dict d;
  d["forward_ops"] = s.forward_ops;
  d["backward_ops"] = s.backward_ops;
  d["folded_ops"] = s.folded_ops;
  d["pruned_nodes"] = s.pruned_nodes;
  d["arena_bytes"] = s.arena_bytes;
  d["activation_bytes"] = s.activation_bytes;
  d["gradient_bytes"] = s.gradient_bytes;
  d["zeroed_gradient_bytes"] = s.zeroed_gradient_bytes;
  d["passthrough_backward_ops"] = s.passthrough_backward_ops;
  d["scratch_bytes"] = s.scratch_bytes;
  d["constant_bytes"] = s.constant_bytes;
  d["backward_nodes"] = s.backward_nodes;
  d["recompute_ops"] = s.recompute_ops;
  d["recompute_op_types"] = s.recompute_op_types;
  d["recompute_nodes"] = s.recompute_nodes;
  d["recompute_flops"] = s.recompute_flops;
  d["forward_flops"] = s.forward_flops;
  d["recompute_choice"] = s.recompute_choice;
  d["arena_bytes_no_recompute"] = s.arena_bytes_no_recompute;
  d["arena_bytes_min"] = s.arena_bytes_min;
  d["arena_budget"] = s.arena_budget;
  d["fixed_bytes"] = s.fixed_bytes;
  d["planned_peak_bytes"] = s.planned_peak_bytes;
  d["output_copy_bytes"] = s.output_copy_bytes;
  d["scratch_reduced_ops"] = s.scratch_reduced_ops;
  return d;
}

}  // namespace

void bind_session(py::module_& m) {
  m.def("available_memory", [] {
    std::string source;
    const int64_t bytes = available_memory_bytes(&source);
    return py::make_tuple(bytes, source);
  }, "(bytes, source): what plans without a budget aim at (MemAvailable or a cgroup limit's "
     "headroom; -1 when unknown).");
  m.def("memory_limit", &memory_limit_bytes,
        "The plan/allocation limit: PYEDGE_MAX_MEMORY or 75% of RAM.");
  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def(py::init<>())
      .def("add_input", [](Model& self, const std::string& name, const std::string& dtype,
                           const std::vector<int64_t>& shape) {
        self.add_input(name, dtype_from_name(dtype), shape);
      })
      .def("add_output", &Model::add_output)
      .def("add_initializer", [](Model& self, const std::string& name, py::handle arr) {
        py::array a = as_core_array(arr);
        self.add_initializer(name, tensor_view(a), hold(a));
      }, "Registers a weight without copying it (the array is kept alive).")
      .def("add_node", [](Model& self, const std::string& op_type, const std::string& domain,
                          const std::string& name, const std::vector<std::string>& inputs,
                          const std::vector<std::string>& outputs, py::dict attrs, int opset) {
        ModelNode n;
        n.info.op_type = op_type;
        n.info.domain = domain;
        n.info.name = name;
        n.info.opset = opset;
        n.info.attrs = attrs_from_dict(attrs);
        for (auto& s : inputs) n.inputs.push_back(s.empty() ? -1 : self.value_id(s));
        for (auto& s : outputs) n.outputs.push_back(s.empty() ? -1 : self.value_id(s));
        self.add_node(std::move(n));
      }, py::arg("op_type"), py::arg("domain"), py::arg("name"), py::arg("inputs"),
         py::arg("outputs"), py::arg("attrs"), py::arg("opset"))
      .def("finalize", &Model::finalize)
      .def_property_readonly("input_names", [](const Model& self) {
        std::vector<std::string> r;
        for (int v : self.inputs) r.push_back(self.value_name(v));
        return r;
      })
      .def_property_readonly("output_names", [](const Model& self) {
        std::vector<std::string> r;
        for (int v : self.outputs) r.push_back(self.value_name(v));
        return r;
      })
      .def_property_readonly("num_nodes", [](const Model& self) { return self.nodes.size(); });

  py::class_<Session>(m, "Session")
      .def(py::init([](std::shared_ptr<Model> model, const std::vector<std::string>& trainable,
                       const std::string& loss, py::dict opt, uint64_t seed) {
             OptimizerConfig c;
             if (opt.contains("kind")) c.kind = opt["kind"].cast<std::string>();
             auto f = [&](const char* k, double& dst) { if (opt.contains(k)) dst = opt[k].cast<double>(); };
             f("lr", c.lr); f("beta1", c.beta1); f("beta2", c.beta2); f("eps", c.eps);
             f("weight_decay", c.weight_decay); f("momentum", c.momentum); f("dampening", c.dampening);
             if (opt.contains("nesterov")) c.nesterov = opt["nesterov"].cast<bool>();
             auto* s = new Session(std::move(model), trainable, loss, c, seed);
             if (opt.contains("lr_scales")) {  // {trainable name: lr factor} (LoRA+)
               py::dict scales = opt["lr_scales"].cast<py::dict>();
               size_t found = 0;
               for (Parameter& p : s->parameters())
                 if (scales.contains(p.name)) {
                   p.lr_scale = scales[py::str(p.name)].cast<double>();
                   ++found;
                 }
               if (found != scales.size()) {
                 delete s;
                 throw py::value_error("optimizer lr_scales name a tensor that is not trainable");
               }
             }
             return s;
           }),
           py::arg("model"), py::arg("trainable"), py::arg("loss"), py::arg("optimizer"),
           py::arg("seed") = 0, py::keep_alive<1, 2>())
      .def("train_step", [](Session& self, py::list inputs, bool update, double max_norm,
                            double grad_scale) {
        Inputs in = convert_inputs(self.model(), inputs);
        StepResult r;
        {
          py::gil_scoped_release nogil;
          r = self.train_step(in.tensors, update, max_norm, grad_scale);
        }
        return py::make_tuple(r.loss, r.grad_norm, r.applied);
      }, py::arg("inputs"), py::arg("update") = true, py::arg("max_grad_norm") = 0.0,
         py::arg("grad_scale") = 1.0)
      .def("apply_update", [](Session& self, double max_norm, double grad_scale) {
        StepResult r;
        {
          py::gil_scoped_release nogil;
          r = self.apply_update(max_norm, 0.f, grad_scale);
        }
        return py::make_tuple(r.grad_norm, r.applied);
      }, py::arg("max_grad_norm") = 0.0, py::arg("grad_scale") = 1.0)
      .def_readwrite("micro_steps", &Session::micro_steps)
      .def_readwrite("profiling", &Session::profiling)
      .def("last_profile", [](const Session& self) {
        py::list r;
        for (auto& t : self.last_profile())
          r.append(py::make_tuple(t.node, t.op_type, t.backward, t.seconds, t.calls));
        return r;
      }, "Per-op (node, op_type, backward, seconds, calls) of the last plan run, when profiling.")
      .def("run", [](Session& self, py::list inputs, const std::vector<std::string>& names) {
        Inputs in = convert_inputs(self.model(), inputs);
        std::vector<int> ids;
        for (auto& n : names) {
          int v = self.model().find_value(n);
          PYEDGE_CHECK(v >= 0, "no value named '", n, "' in the graph");
          ids.push_back(v);
        }
        std::vector<Tensor> outs;
        {
          py::gil_scoped_release nogil;
          outs = self.run(in.tensors, ids);
        }
        py::list r;
        for (auto& t : outs) r.append(numpy_copy(t));
        return r;
      })
      .def("plan_stats", [](Session& self, const std::vector<std::vector<int64_t>>& shapes, bool training) {
        py::dict d = stats_dict(self.plan_stats(shapes, training));
        d["session_arena_bytes"] = self.arena_bytes();
        return d;
      })
      .def("parameters", [](py::object self_obj) {
        Session& self = self_obj.cast<Session&>();
        py::dict d;
        for (auto& p : self.parameters()) d[py::str(p.name)] = numpy_view(p.value, self_obj);
        return d;
      }, "Trainable tensors as writable numpy views.")
      .def("gradients", [](py::object self_obj) {
        Session& self = self_obj.cast<Session&>();
        py::dict d;
        for (auto& p : self.parameters())
          if (p.grad.data) d[py::str(p.name)] = numpy_view(p.grad, self_obj);
        return d;
      }, "Accumulated gradients (zeroed after each update) as numpy views; empty when "
         "forward-only.")
      .def_property_readonly("forward_only", &Session::forward_only)
      .def("optimizer_state", [](py::object self_obj) {
        Session& self = self_obj.cast<Session&>();
        auto names = self.optimizer_state_names();
        py::dict d;
        for (auto& p : self.parameters()) {
          py::dict s;
          for (size_t i = 0; i < names.size(); ++i) s[py::str(names[i])] = numpy_view(p.state[i], self_obj);
          d[py::str(p.name)] = s;
        }
        return d;
      })
      .def("set_memory_budget", [](Session& self, int64_t budget, int64_t resident,
                                   const std::string& recompute) {
        using R = PlanRequest::Recompute;
        R policy = recompute == "auto" ? R::kAuto : recompute == "none" ? R::kNone
                 : recompute == "cheap" ? R::kCheap : recompute == "full" ? R::kFull : R::kAuto;
        PYEDGE_CHECK(recompute == "auto" || recompute == "none" || recompute == "cheap" ||
                     recompute == "full", "recompute must be 'auto', 'none', 'cheap' or "
                     "'full', got '", recompute, "'");
        self.set_memory_budget(budget, resident, policy);
      }, py::arg("budget_bytes"), py::arg("resident_bytes"), py::arg("recompute") = "auto",
      "Memory budget (whole process, bytes; < 0: none) and recomputation policy for plans "
      "built from now on (drops cached plans).")
      .def_property_readonly("fixed_bytes", &Session::fixed_bytes)
      .def("zero_grads", &Session::zero_grads)
      .def("set_value_keyed_inputs", &Session::set_value_keyed_inputs, py::arg("names"),
           "Model inputs whose fed value ops need at plan time; plans are cached per value.")
      .def_readwrite("step_count", &Session::step_count)
      .def_readwrite("lr", &Session::lr)
      .def_readwrite("training_mode", &Session::training_mode)
      .def_readonly("last_step_allocations", &Session::last_step_allocations);
}

}  // namespace pyedge
