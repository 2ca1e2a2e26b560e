// Passes 1-3: every value's dtype and shape, which nodes the targets need, and the forward
// schedule (shape inference per node, constant folding, one Step per node that runs).
#include <cstring>

#include "common/memory_limit.h"
#include "graph/plan_passes.h"

namespace pyedge {

// Initializers, trained tensors and graph inputs get their dtype, shape (and, for the first
// two, data); everything else is filled in by schedule_forward.
void Plan::init_values(const Model& model, const PlanRequest& req, PlanBuild& b) {
  size_t nv = model.num_values();
  values_.assign(nv, Tensor{});
  is_const_.assign(nv, false);
  b.external.assign(nv, false);
  b.trainable.assign(nv, false);
  for (auto& kv : model.initializers) {
    values_[size_t(kv.first)] = kv.second;
    is_const_[size_t(kv.first)] = true;
  }
  for (auto& kv : req.trainable) {
    values_[size_t(kv.first)] = kv.second;
    is_const_[size_t(kv.first)] = false;
    b.trainable[size_t(kv.first)] = true;
  }
  PYEDGE_CHECK(req.input_shapes.size() == model.inputs.size(), "internal: input shape count");
  for (size_t i = 0; i < model.inputs.size(); ++i) {
    int v = model.inputs[i];
    values_[size_t(v)] = make_output(model.input_dtypes[i], req.input_shapes[i]);
    b.external[size_t(v)] = true;
    auto known = req.input_values.find(int(i));
    if (known != req.input_values.end() && known->second.data) {
      const Tensor& t = known->second;
      PYEDGE_CHECK(t.dtype == model.input_dtypes[i] && t.shape == req.input_shapes[i],
                   "internal: plan-time value of input ", i, " does not match its shape");
      folded_.push_back(OwnedTensor::make(t.dtype, t.shape));
      std::memcpy(folded_.back().t.data, t.data, t.nbytes());
      stats_.constant_bytes += int64_t(t.nbytes());
      values_[size_t(v)] = folded_.back().t;
      is_const_[size_t(v)] = true;
    }
  }
  loss_ = req.loss;
  b.mem_limit = memory_limit_bytes();
}

// Only nodes that lead to a target (or the loss) are planned.
void Plan::prune_unneeded(const Model& model, const PlanRequest& req, PlanBuild& b) {
  std::vector<bool> needed_value(model.num_values(), false);
  b.needed_node.assign(model.nodes.size(), false);
  for (int t : req.targets) needed_value[size_t(t)] = true;
  if (loss_ >= 0) needed_value[size_t(loss_)] = true;
  for (size_t i = model.nodes.size(); i-- > 0;) {
    const ModelNode& n = model.nodes[i];
    bool need = false;
    for (int o : n.outputs) need = need || (o >= 0 && needed_value[size_t(o)]);
    if (!need) { ++stats_.pruned_nodes; continue; }
    b.needed_node[i] = true;
    for (int v : n.inputs) if (v >= 0) needed_value[size_t(v)] = true;
  }
}

// Shape inference, constant folding and forward scheduling, in graph order. Hidden outputs
// (an op's saved statistics, a dropout mask) become values of their own.
void Plan::schedule_forward(const Model& model, PlanBuild& b) {
  auto new_value = [&](const Tensor& meta) {
    values_.push_back(meta);
    is_const_.push_back(false);
    b.external.push_back(false);
    b.trainable.push_back(false);
    return int(values_.size() - 1);
  };
  std::vector<Tensor> metas;
  for (size_t i = 0; i < model.nodes.size(); ++i) {
    if (!b.needed_node[i]) continue;
    const ModelNode& n = model.nodes[i];
    NodeInfo info = n.info;
    info.input_present.clear();
    metas.clear();
    bool all_const = true;
    for (int v : n.inputs) {
      info.input_present.push_back(v >= 0);
      Tensor m = v >= 0 ? values_[size_t(v)] : Tensor{};
      if (v >= 0 && !is_const_[size_t(v)]) { m.data = nullptr; all_const = false; }
      metas.push_back(m);
    }
    while (!metas.empty() && !info.input_present.back()) {  // trailing absent inputs
      metas.pop_back();
      info.input_present.pop_back();
    }
    info.num_outputs = int(n.outputs.size());
    std::unique_ptr<Op> op = make_op(info, metas);
    PYEDGE_CHECK(op->n_visible >= int(n.outputs.size()), n.info.where(), " produces ",
                 op->n_visible, " outputs but the node lists ", n.outputs.size());
    bool outputs_known = true;
    for (auto& o : op->outputs) outputs_known = outputs_known && o.data != nullptr;
    std::vector<int> out_ids;
    for (size_t k = 0; k < op->outputs.size(); ++k) {
      int id = k < n.outputs.size() ? n.outputs[k] : -1;
      if (id < 0) id = new_value(op->outputs[k]);
      else values_[size_t(id)] = op->outputs[k];
      out_ids.push_back(id);
    }
    if (!outputs_known && all_const && op->foldable()) {
      // All inputs known now: compute once at plan time (shape arithmetic, frozen-weight
      // transposes) and treat the results as constants.
      std::vector<Tensor> outs;
      int64_t fold_bytes = stats_.constant_bytes + int64_t(op->forward_scratch_bytes());
      for (auto& o : op->outputs) fold_bytes += int64_t(o.nbytes());
      check_memory("folded constants", fold_bytes, b.mem_limit);
      for (size_t k = 0; k < op->outputs.size(); ++k) {
        folded_.push_back(OwnedTensor::make(op->outputs[k].dtype, op->outputs[k].shape));
        stats_.constant_bytes += int64_t(folded_.back().t.nbytes());
        outs.push_back(folded_.back().t);
      }
      OwnedTensor scratch = OwnedTensor::make(DType::u8, {int64_t(op->forward_scratch_bytes())});
      RunContext ctx;
      ctx.scratch = scratch.t.data;
      ctx.node_index = i;
      op->forward(metas, outs, ctx);
      for (size_t k = 0; k < outs.size(); ++k) values_[size_t(out_ids[k])] = outs[k];
      outputs_known = true;
      ++stats_.folded_ops;
    }
    if (outputs_known) {
      for (int id : out_ids) is_const_[size_t(id)] = true;
      ops_.push_back(std::move(op));
      continue;
    }
    Step s;
    s.node = int(i);
    s.op = op.get();
    for (int v : n.inputs) s.in_ids.push_back(v);
    s.in_ids.resize(metas.size());
    s.out_ids = out_ids;
    fwd_.push_back(std::move(s));
    ops_.push_back(std::move(op));
  }
  stats_.forward_ops = int(fwd_.size());
}

}  // namespace pyedge
