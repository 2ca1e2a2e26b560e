// Passes 4-5: which values depend on a trained tensor, and the pruned backward (a node gets a
// backward step only if a gradient reaches one of its outputs and one of its inputs needs
// one), with a gradient buffer per value the gradient reaches.
#include "graph/plan_passes.h"

namespace pyedge {

// requires_grad_[v]: v depends on a trained tensor through differentiable inputs.
void Plan::mark_requires_grad(PlanBuild& b) {
  const size_t nv = values_.size();
  requires_grad_.assign(nv, false);
  for (size_t v = 0; v < nv; ++v) requires_grad_[v] = b.trainable[v];
  for (Step& s : fwd_) {
    bool any = false;
    for (size_t k = 0; k < s.in_ids.size(); ++k) {
      int v = s.in_ids[k];
      any = any || (v >= 0 && requires_grad_[size_t(v)] && s.op->differentiable_input(k));
    }
    if (!any) continue;
    for (int k = 0; k < s.op->n_visible; ++k)
      if (is_float(values_[size_t(s.out_ids[size_t(k)])].dtype))
        requires_grad_[size_t(s.out_ids[size_t(k)])] = true;
  }
}

// Gradients are float32, and so is every backward kernel's arithmetic: a backward step may pass
// a gradient through float64 values (Cast up and down, an Add, a Reshape: they read no data),
// but not read one (Mul by a float64 constant would need its factor as float).
void Plan::check_backward_dtypes(const Model& model, const Step& f,
                                 const std::vector<bool>& need) const {
  auto refuse = [&](int v) {
    if (v < 0) return;
    const Tensor& t = values_[size_t(v)];
    if (!is_float(t.dtype) || t.dtype == DType::f32) return;
    throw UnsupportedError(str_cat(
        model.nodes[size_t(f.node)].info.where(), " computes in ", dtype_name(t.dtype), " ('",
        model.value_name(v), "') on the way from the loss to the trainable tensors, and its "
        "backward reads that value; pyedge differentiates float32 arithmetic only: export "
        "the model in float32, or train only tensors after this node"));
  };
  const std::vector<bool> ri = f.op->backward_reads_inputs(need);
  const std::vector<bool> ro = f.op->backward_reads_outputs(need);
  for (size_t k = 0; k < f.in_ids.size() && k < ri.size(); ++k)
    if (ri[k]) refuse(f.in_ids[k]);
  for (size_t k = 0; k < f.out_ids.size() && k < ro.size(); ++k)
    if (ro[k]) refuse(f.out_ids[k]);
}

// Walks back from the loss; leaves the backward steps in b.backward (recomputation and the
// memory plan come later) and a gradient tensor (no data yet) per value in grads_; trained
// tensors' gradients are the caller's buffers.
void Plan::build_backward(const Model& model, const PlanRequest& req, PlanBuild& b) {
  const size_t nv = values_.size();
  b.has_grad.assign(nv, false);
  if (loss_ >= 0) {
    const Tensor& L = values_[size_t(loss_)];
    PYEDGE_CHECK(L.numel() == 1 && L.dtype == DType::f32, "the loss '",
                 model.value_name(loss_), "' must be a float32 scalar, got ",
                 dtype_name(L.dtype), shape_str(L.shape));
    PYEDGE_CHECK(requires_grad_[size_t(loss_)],
                 "no trainable tensor reaches the loss: check the LoRA targets and --train "
                 "patterns (nothing to train)");
    b.has_grad[size_t(loss_)] = true;
    for (size_t si = fwd_.size(); si-- > 0;) {
      Step& f = fwd_[si];
      bool out_grad = false;
      for (int k = 0; k < f.op->n_visible; ++k)
        out_grad = out_grad || b.has_grad[size_t(f.out_ids[size_t(k)])];
      if (!out_grad) continue;
      std::vector<bool> need(f.in_ids.size(), false);
      bool any = false;
      for (size_t k = 0; k < f.in_ids.size(); ++k) {
        int v = f.in_ids[k];
        need[k] = v >= 0 && requires_grad_[size_t(v)] && f.op->differentiable_input(k);
        any = any || need[k];
      }
      if (!any) continue;
      const ModelNode& n = model.nodes[size_t(f.node)];
      if (!f.op->has_backward())
        throw UnsupportedError(str_cat(
            n.info.where(), " has no backward rule, but a gradient must flow through it to "
            "reach the trainable tensors upstream; train only tensors after it, or choose "
            "other LoRA targets"));
      check_backward_dtypes(model, f, need);
      for (size_t k = 0; k < f.in_ids.size(); ++k)
        if (need[k]) b.has_grad[size_t(f.in_ids[k])] = true;
      f.op->backward_planned = true;
      Step s = f;
      s.need_grad = need;
      s.din.assign(f.in_ids.size(), Tensor{});
      b.backward.push_back(std::move(s));
      stats_.backward_nodes.push_back(n.info.name);
    }
  }
  grads_.assign(nv, Tensor{});
  for (size_t v = 0; v < nv; ++v)
    if (b.has_grad[v]) {
      grads_[v] = make_output(DType::f32, values_[v].shape);
      if (b.trainable[v]) {
        auto it = req.trainable_grads.find(int(v));
        PYEDGE_CHECK(it != req.trainable_grads.end(), "internal: no gradient buffer for ",
                     model.value_name(int(v)));
        grads_[v] = it->second;
      }
    }
  stats_.backward_ops = int(b.backward.size());
}

}  // namespace pyedge
