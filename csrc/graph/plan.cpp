#include "graph/plan.h"

#include "common/memory_limit.h"

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <limits>

namespace pyedge {
namespace {

constexpr int64_t kAlign = 64;
int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A buffer to place in the arena: alive over steps [start, end] of the timeline.
struct Interval {
  int64_t bytes;
  int start, end;
  int64_t offset = -1;
};

// Greedy best-fit by decreasing size: each buffer takes the lowest offset that no buffer alive
// at the same time occupies. Returns the arena size.
int64_t place_intervals(std::vector<Interval>& iv) {
  std::vector<size_t> order(iv.size());
  for (size_t i = 0; i < iv.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return iv[a].bytes > iv[b].bytes; });
  std::vector<size_t> placed;
  std::vector<std::pair<int64_t, int64_t>> busy;
  int64_t total = 0;
  for (size_t i : order) {
    Interval& cur = iv[i];
    busy.clear();
    for (size_t j : placed) {
      const Interval& o = iv[j];
      if (o.start <= cur.end && cur.start <= o.end) busy.push_back({o.offset, o.offset + o.bytes});
    }
    std::sort(busy.begin(), busy.end());
    int64_t off = 0;
    for (auto& b : busy) {
      if (b.first - off >= cur.bytes) break;
      off = std::max(off, align_up(b.second));
    }
    cur.offset = off;
    total = std::max(total, off + cur.bytes);
    placed.push_back(i);
  }
  return total;
}

}  // namespace

namespace {
// Refuses a plan whose memory would exceed the limit, before it is allocated.
void check_memory(const Model& model, const char* what, int64_t bytes, int64_t limit) {
  PYEDGE_CHECK(bytes <= limit, "the plan needs ", bytes, " bytes of ", what,
               ", over the memory limit of ", limit, " bytes (75% of RAM by default; set "
               "PYEDGE_MAX_MEMORY to change it): check the input shapes and the model's "
               "Reshape/Expand/ConstantOfShape sizes");
}
}  // namespace

char* Arena::reserve(size_t bytes) {
  if (bytes > buf_.size()) {
    buf_ = Buffer();  // free first: the old and the new arena are never held together
    buf_ = Buffer(bytes);
  }
  return base();
}

Plan::Plan(const Model& model, const PlanRequest& req, std::shared_ptr<Arena> arena)
    : arena_(arena ? std::move(arena) : std::make_shared<Arena>()), model_(&model) {
  build(model, req);
}

void Plan::build(const Model& model, const PlanRequest& req) {
  size_t nv = model.num_values();
  values_.assign(nv, Tensor{});
  is_const_.assign(nv, false);
  std::vector<bool> external(nv, false), trainable(nv, false);
  for (auto& kv : model.initializers) {
    values_[size_t(kv.first)] = kv.second;
    is_const_[size_t(kv.first)] = true;
  }
  for (auto& kv : req.trainable) {
    values_[size_t(kv.first)] = kv.second;
    is_const_[size_t(kv.first)] = false;
    trainable[size_t(kv.first)] = true;
  }
  PYEDGE_CHECK(req.input_shapes.size() == model.inputs.size(), "internal: input shape count");
  for (size_t i = 0; i < model.inputs.size(); ++i) {
    int v = model.inputs[i];
    values_[size_t(v)] = make_output(model.input_dtypes[i], req.input_shapes[i]);
    external[size_t(v)] = true;
  }
  loss_ = req.loss;
  const int64_t mem_limit = memory_limit_bytes();

  // Only nodes that lead to a target are planned.
  std::vector<bool> needed_value(nv, false), needed_node(model.nodes.size(), false);
  for (int t : req.targets) needed_value[size_t(t)] = true;
  if (loss_ >= 0) needed_value[size_t(loss_)] = true;
  for (size_t i = model.nodes.size(); i-- > 0;) {
    const ModelNode& n = model.nodes[i];
    bool need = false;
    for (int o : n.outputs) need = need || (o >= 0 && needed_value[size_t(o)]);
    if (!need) { ++stats_.pruned_nodes; continue; }
    needed_node[i] = true;
    for (int v : n.inputs) if (v >= 0) needed_value[size_t(v)] = true;
  }

  // Shape inference, constant folding and forward scheduling, in graph order.
  auto new_value = [&](const Tensor& meta) {
    values_.push_back(meta);
    is_const_.push_back(false);
    external.push_back(false);
    trainable.push_back(false);
    return int(values_.size() - 1);
  };
  std::vector<Tensor> metas;
  for (size_t i = 0; i < model.nodes.size(); ++i) {
    if (!needed_node[i]) continue;
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
      check_memory(model, "folded constants", fold_bytes, mem_limit);
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
  nv = values_.size();

  // Which values depend on a trainable tensor through differentiable inputs.
  requires_grad_.assign(nv, false);
  for (size_t v = 0; v < nv; ++v) requires_grad_[v] = trainable[v];
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

  // The pruned backward: walk back from the loss; a node gets a backward step only if a
  // gradient reaches one of its outputs and one of its inputs needs a gradient.
  std::vector<bool> has_grad(nv, false);
  if (loss_ >= 0) {
    const Tensor& L = values_[size_t(loss_)];
    PYEDGE_CHECK(L.numel() == 1 && L.dtype == DType::f32, "the loss '",
                 model.value_name(loss_), "' must be a float32 scalar, got ",
                 dtype_name(L.dtype), shape_str(L.shape));
    PYEDGE_CHECK(requires_grad_[size_t(loss_)],
                 "no trainable tensor reaches the loss: check the LoRA targets and --train "
                 "patterns (nothing to train)");
    has_grad[size_t(loss_)] = true;
    for (size_t si = fwd_.size(); si-- > 0;) {
      Step& f = fwd_[si];
      bool out_grad = false;
      for (int k = 0; k < f.op->n_visible; ++k) out_grad = out_grad || has_grad[size_t(f.out_ids[size_t(k)])];
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
      for (size_t k = 0; k < f.in_ids.size(); ++k)
        if (need[k]) has_grad[size_t(f.in_ids[k])] = true;
      f.op->backward_planned = true;
      Step b = f;
      b.need_grad = need;
      b.din.assign(f.in_ids.size(), Tensor{});
      bwd_.push_back(std::move(b));
      stats_.backward_nodes.push_back(n.info.name);
    }
  }
  grads_.assign(nv, Tensor{});
  for (size_t v = 0; v < nv; ++v)
    if (has_grad[v]) {
      grads_[v] = make_output(DType::f32, values_[v].shape);
      if (trainable[v]) {
        auto it = req.trainable_grads.find(int(v));
        PYEDGE_CHECK(it != req.trainable_grads.end(), "internal: no gradient buffer for ",
                     model.value_name(int(v)));
        grads_[v] = it->second;
      }
    }
  stats_.forward_ops = int(fwd_.size());
  stats_.backward_ops = int(bwd_.size());

  // Memory plan over the timeline: forward steps 0..F-1, backward steps F..F+B-1.
  const int F = int(fwd_.size()), T_END = F + int(bwd_.size()) + 1;
  std::vector<int> root(nv);  // storage shared with an aliasing producer's input
  for (size_t v = 0; v < nv; ++v) root[v] = int(v);
  std::vector<int> start(nv, -1), end(nv, -1);
  auto arena_value = [&](int v) { return v >= 0 && !is_const_[size_t(v)] && !external[size_t(v)] && !trainable[size_t(v)]; };
  for (int t = 0; t < F; ++t) {
    Step& s = fwd_[size_t(t)];
    for (int v : s.in_ids)
      if (arena_value(v)) end[size_t(root[size_t(v)])] = std::max(end[size_t(root[size_t(v)])], t);
    for (size_t k = 0; k < s.out_ids.size(); ++k) {
      int v = s.out_ids[k];
      if (k == 0 && s.op->output_aliases_input0() && !s.in_ids.empty() && arena_value(s.in_ids[0]) &&
          values_[size_t(v)].nbytes() == values_[size_t(s.in_ids[0])].nbytes()) {
        root[size_t(v)] = root[size_t(s.in_ids[0])];
        continue;
      }
      start[size_t(v)] = t;
      end[size_t(v)] = std::max(end[size_t(v)], t);
    }
  }
  for (int b = 0; b < int(bwd_.size()); ++b) {
    Step& s = bwd_[size_t(b)];
    auto ri = s.op->backward_reads_inputs(s.need_grad);
    auto ro = s.op->backward_reads_outputs(s.need_grad);
    for (size_t k = 0; k < s.in_ids.size() && k < ri.size(); ++k)
      if (ri[k] && arena_value(s.in_ids[k])) { int r = root[size_t(s.in_ids[k])]; end[size_t(r)] = std::max(end[size_t(r)], F + b); }
    for (size_t k = 0; k < s.out_ids.size() && k < ro.size(); ++k)
      if (ro[k] && arena_value(s.out_ids[k])) { int r = root[size_t(s.out_ids[k])]; end[size_t(r)] = std::max(end[size_t(r)], F + b); }
  }
  for (int t : req.targets) if (arena_value(t)) end[size_t(root[size_t(t)])] = T_END;
  if (loss_ >= 0 && arena_value(loss_)) end[size_t(root[size_t(loss_)])] = T_END;

  std::vector<Interval> iv;
  std::vector<std::pair<int, int>> owner;  // (kind 0 value / 1 grad / 2 fwd scratch / 3 bwd scratch, id)
  for (size_t v = 0; v < nv; ++v)
    if (start[v] >= 0 && root[v] == int(v)) {
      iv.push_back({int64_t(std::max<size_t>(values_[v].nbytes(), 1)), start[v], end[v]});
      owner.push_back({0, int(v)});
      stats_.activation_bytes += int64_t(values_[v].nbytes());
    }
  // Activation gradients: alive from their first writer to the producer's backward step.
  std::vector<int> gstart(nv, -1), gend(nv, -1);
  // groot[v]: the value whose gradient buffer v's gradient shares (itself unless aliased).
  std::vector<int> groot(nv);
  for (size_t v = 0; v < nv; ++v) groot[v] = int(v);
  // Backward steps that write each value's gradient (its consumers', in order) and the one
  // that reads it (its producer's).
  std::vector<std::vector<int>> grad_writers(nv);
  std::vector<int> grad_reader(nv, -1);
  for (int b = 0; b < int(bwd_.size()); ++b) {
    const Step& s = bwd_[size_t(b)];
    for (size_t k = 0; k < s.in_ids.size(); ++k)
      if (s.need_grad[k]) grad_writers[size_t(s.in_ids[k])].push_back(b);
    for (int v : s.out_ids) grad_reader[size_t(v)] = b;
  }
  // The last backward step that may read the buffer of v's gradient: its producer's, or
  // past pass-through producers (which may hand v's buffer on to their input) the first
  // that does real work; -1 when an input along the way has other gradient writers (they
  // would add into the buffer) or nothing reads it.
  auto last_grad_reader = [&](int v) {
    for (;;) {
      const int r = grad_reader[size_t(v)];
      if (r < 0) return -1;
      const Step& rs = bwd_[size_t(r)];
      if (rs.op->both_grads_are_dy(rs.need_grad)) return -1;
      const int k = rs.op->passthrough_input(rs.need_grad);
      if (k < 0 || trainable[size_t(rs.in_ids[size_t(k)])]) return r;
      v = rs.in_ids[size_t(k)];
      if (grad_writers[size_t(v)].size() != 1) return -1;
    }
  };
  // z = x + y with dX = dZ and dY = dZ: both can take over dZ's buffer G when y's gradient
  // has no other writer and is read (by its producer, through pass-through ops) before any
  // other writer of x's gradient adds into G. Residual connections are this shape: y is the
  // branch's output, x the stream that other layers also read.
  auto share_both = [&](int b, const Step& s) {
    if (s.in_ids.size() != 2 || s.out_ids.empty()) return false;
    const int z = s.out_ids[0];
    if (z == loss_ || !has_grad[size_t(z)] || trainable[size_t(z)]) return false;
    for (int pick = 0; pick < 2; ++pick) {
      const int x = s.in_ids[size_t(pick)], y = s.in_ids[size_t(1 - pick)];
      if (x == y || trainable[size_t(x)] || trainable[size_t(y)]) return false;
      if (gstart[size_t(x)] >= 0 || gstart[size_t(y)] >= 0) return false;
      if (grads_[size_t(x)].nbytes() != grads_[size_t(z)].nbytes() ||
          grads_[size_t(y)].nbytes() != grads_[size_t(z)].nbytes())
        return false;
      const int r = grad_writers[size_t(y)].size() == 1 ? last_grad_reader(y) : -1;
      if (r < 0) continue;
      bool ordered = true;
      for (int w : grad_writers[size_t(x)]) ordered = ordered && (w == b || w > r);
      if (!ordered) continue;
      for (int v : {x, y}) {
        groot[size_t(v)] = groot[size_t(z)];
        gstart[size_t(v)] = gend[size_t(v)] = F + b;
      }
      return true;
    }
    return false;
  };
  for (int b = 0; b < int(bwd_.size()); ++b) {
    Step& s = bwd_[size_t(b)];
    // The step reads its outputs' gradients (skipped or not: a shared buffer lives on).
    for (int v : s.out_ids)
      if (has_grad[size_t(v)] && !trainable[size_t(v)]) gend[size_t(v)] = std::max(gend[size_t(v)], F + b);
    if (s.op->both_grads_are_dy(s.need_grad) && share_both(b, s)) {
      s.skip = true;
      ++stats_.passthrough_backward_ops;
      continue;
    }
    const int through = s.op->passthrough_input(s.need_grad);
    for (size_t k = 0; k < s.in_ids.size(); ++k) {
      int v = s.in_ids[k];
      if (!s.need_grad[k] || trainable[size_t(v)]) continue;
      if (gstart[size_t(v)] < 0 && int(k) == through) {
        // dX = dY and this step writes dX first: dX takes over dY's buffer (dY is dead after
        // this step, its producer's backward) and the step has nothing left to do.
        int y = s.out_ids.empty() ? -1 : s.out_ids[0];
        if (y >= 0 && y != loss_ && has_grad[size_t(y)] && !trainable[size_t(y)] &&
            grads_[size_t(y)].nbytes() == grads_[size_t(v)].nbytes()) {
          groot[size_t(v)] = groot[size_t(y)];
          gstart[size_t(v)] = F + b;
          gend[size_t(v)] = F + b;
          s.skip = true;
          ++stats_.passthrough_backward_ops;
          continue;
        }
      }
      if (gstart[size_t(v)] < 0) {
        gstart[size_t(v)] = F + b;
        // First writer: it assigns when it can and the value is not its input twice (the
        // second din would then add to the first); otherwise the buffer is zeroed first.
        int uses = 0;
        for (size_t j = 0; j < s.in_ids.size(); ++j) uses += s.in_ids[j] == v && s.need_grad[j];
        if (k < 64 && uses == 1 && s.op->assigns_fresh_grads()) s.fresh_din |= uint64_t(1) << k;
        else {
          s.zero_grads.push_back(v);
          stats_.zeroed_gradient_bytes += int64_t(grads_[size_t(v)].nbytes());
        }
      }
      gend[size_t(v)] = std::max(gend[size_t(v)], F + b);
    }
  }
  if (loss_ >= 0) gstart[size_t(loss_)] = F - 1;
  // A shared buffer lives from its root's first writer to the last use of any sharer.
  for (size_t v = 0; v < nv; ++v)
    if (groot[v] != int(v) && gstart[v] >= 0) {
      int r = groot[v];
      gend[size_t(r)] = std::max(gend[size_t(r)], gend[v]);
    }
  for (size_t v = 0; v < nv; ++v)
    if (has_grad[v] && !trainable[v] && gstart[v] >= 0 && groot[v] == int(v)) {
      iv.push_back({int64_t(std::max<size_t>(grads_[v].nbytes(), 1)), gstart[v], std::max(gstart[v], gend[v])});
      owner.push_back({1, int(v)});
      stats_.gradient_bytes += int64_t(grads_[v].nbytes());
    }
  for (int t = 0; t < F; ++t)
    if (size_t sb = fwd_[size_t(t)].op->forward_scratch_bytes()) {
      iv.push_back({int64_t(sb), t, t});
      owner.push_back({2, t});
      stats_.scratch_bytes += int64_t(sb);
    }
  for (int b = 0; b < int(bwd_.size()); ++b) {
    Step& s = bwd_[size_t(b)];
    if (size_t sb = s.op->backward_scratch_bytes(s.need_grad)) {
      iv.push_back({int64_t(sb), F + b, F + b});
      owner.push_back({3, b});
      stats_.scratch_bytes += int64_t(sb);
    }
  }
  // One buffer over the limit is refused before placing (keeps the offsets far from
  // overflow); the placed arena is checked again below, before it is allocated.
  for (auto& x : iv) check_memory(model, "one activation/gradient/scratch buffer", x.bytes, mem_limit);
  stats_.arena_bytes = place_intervals(iv);
  check_memory(model, "activations, gradients and scratch",
               stats_.arena_bytes + stats_.constant_bytes, mem_limit);
  value_off_.assign(nv, -1);
  grad_off_.assign(nv, -1);
  for (size_t i = 0; i < iv.size(); ++i) {
    auto [kind, id] = owner[i];
    if (kind == 0) value_off_[size_t(id)] = iv[i].offset;
    else if (kind == 1) grad_off_[size_t(id)] = iv[i].offset;
    else if (kind == 2) fwd_[size_t(id)].scratch_offset = iv[i].offset;
    else bwd_[size_t(id)].scratch_offset = iv[i].offset;
  }
  for (size_t v = 0; v < nv; ++v)
    if (root[v] != int(v)) value_off_[v] = value_off_[size_t(root[v])];
  for (size_t v = 0; v < nv; ++v)
    if (groot[v] != int(v)) grad_off_[v] = grad_off_[size_t(groot[v])];
  char* base = arena_->reserve(size_t(std::max<int64_t>(stats_.arena_bytes, 1)));
  point_values(base);

  // Bind tensors into the steps; remember where graph inputs' pointers go.
  input_sites_.assign(model.inputs.size(), {});
  std::vector<int> input_index(nv, -1);
  for (size_t i = 0; i < model.inputs.size(); ++i) input_index[size_t(model.inputs[i])] = int(i);
  auto fill = [&](Step& s, bool backward) {
    s.in.clear();
    s.out.clear();
    for (int v : s.in_ids) s.in.push_back(v >= 0 ? values_[size_t(v)] : Tensor{});
    for (int v : s.out_ids) s.out.push_back(values_[size_t(v)]);
    if (backward) {
      s.dout.clear();
      for (int v : s.out_ids) s.dout.push_back(grads_[size_t(v)]);
      for (size_t k = 0; k < s.in_ids.size(); ++k) {
        bool want = s.need_grad[k];
        s.din[k] = want ? grads_[size_t(s.in_ids[k])] : Tensor{};
        if (!want && s.in_ids[k] >= 0) { s.din[k] = values_[size_t(s.in_ids[k])]; s.din[k].data = nullptr; }
      }
    }
  };
  for (Step& s : fwd_) fill(s, false);
  for (Step& s : bwd_) fill(s, true);
  for (Step& s : fwd_)
    for (size_t k = 0; k < s.in_ids.size(); ++k)
      if (s.in_ids[k] >= 0 && input_index[size_t(s.in_ids[k])] >= 0)
        input_sites_[size_t(input_index[size_t(s.in_ids[k])])].push_back(&s.in[k]);
  for (Step& s : bwd_)
    for (size_t k = 0; k < s.in_ids.size(); ++k)
      if (s.in_ids[k] >= 0 && input_index[size_t(s.in_ids[k])] >= 0)
        input_sites_[size_t(input_index[size_t(s.in_ids[k])])].push_back(&s.in[k]);
  bound_ = base;
}

void Plan::point_values(char* base) {
  for (size_t v = 0; v < values_.size(); ++v) {
    if (value_off_[v] >= 0) values_[v].data = base + value_off_[v];
    if (grad_off_[v] >= 0) grads_[v].data = base + grad_off_[v];
  }
}

void Plan::bind_arena(char* base) {
  point_values(base);
  auto point = [&](std::vector<Tensor>& ts, const std::vector<int>& ids,
                   const std::vector<int64_t>& off) {
    for (size_t k = 0; k < ts.size() && k < ids.size(); ++k)
      if (ids[k] >= 0 && off[size_t(ids[k])] >= 0 && ts[k].data) ts[k].data = base + off[size_t(ids[k])];
  };
  for (Step& s : fwd_) {
    point(s.in, s.in_ids, value_off_);
    point(s.out, s.out_ids, value_off_);
  }
  for (Step& s : bwd_) {
    point(s.in, s.in_ids, value_off_);
    point(s.out, s.out_ids, value_off_);
    point(s.dout, s.out_ids, grad_off_);
    point(s.din, s.in_ids, grad_off_);  // a din not wanted keeps data == nullptr
  }
  bound_ = base;
}

void Plan::bind_input(size_t i, void* data) {
  values_[size_t(model_->inputs[i])].data = data;
  for (Tensor* t : input_sites_[i]) t->data = data;
}

void Plan::run(bool training, uint64_t seed, bool backward) {
  RunContext ctx;
  ctx.training = training;
  ctx.seed = seed;
  char* base = arena_->base();
  if (base != bound_) bind_arena(base);
  using clock = std::chrono::steady_clock;
  for (Step& s : fwd_) {
    ctx.scratch = base + s.scratch_offset;
    ctx.node_index = uint64_t(s.node);
    auto t0 = profiling_ ? clock::now() : clock::time_point{};
    s.op->forward(s.in, s.out, ctx);
    if (profiling_) {
      s.seconds += std::chrono::duration<double>(clock::now() - t0).count();
      ++s.calls;
    }
  }
  if (!backward || loss_ < 0) return;
  Tensor& g = grads_[size_t(loss_)];
  *static_cast<float*>(g.data) = 1.f;
  for (Step& s : bwd_) {
    if (s.skip) continue;
    for (int v : s.zero_grads) std::memset(grads_[size_t(v)].data, 0, grads_[size_t(v)].nbytes());
    ctx.scratch = base + s.scratch_offset;
    ctx.node_index = uint64_t(s.node);
    ctx.fresh_din = s.fresh_din;
    auto t0 = profiling_ ? clock::now() : clock::time_point{};
    s.op->backward(s.in, s.out, s.dout, s.din, ctx);
    if (profiling_) {
      s.seconds += std::chrono::duration<double>(clock::now() - t0).count();
      ++s.calls;
    }
  }
}

std::vector<Plan::StepTime> Plan::profile() const {
  std::vector<StepTime> r;
  auto add = [&](const Step& s, bool bwd) {
    const NodeInfo& n = model_->nodes[size_t(s.node)].info;
    r.push_back({n.name, op_key(n.domain, n.op_type), bwd, s.seconds, s.calls});
  };
  for (const Step& s : fwd_) add(s, false);
  for (const Step& s : bwd_) add(s, true);
  return r;
}

}  // namespace pyedge
