// Pass 8: memory assignment. For one backward timeline: gradient buffers (shared along
// pass-through and residual chains, zeroed or assigned by their first writer), every
// buffer's lifetime, greedy placement in one arena; then the chosen layout is committed and
// the steps bound to their tensors.
#include <algorithm>

#include "graph/plan_passes.h"

namespace pyedge {
namespace {

constexpr int64_t kAlign = 64;
int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

void check_memory(const char* what, int64_t bytes, int64_t limit) {
  PYEDGE_CHECK(bytes <= limit, "the plan needs ", bytes, " bytes of ", what,
               ", over the memory limit of ", limit, " bytes (75% of RAM by default; set "
               "PYEDGE_MAX_MEMORY to change it): check the input shapes and the model's "
               "Reshape/Expand/ConstantOfShape sizes");
}

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

MemoryLayout Plan::layout_memory(const PlanBuild& b, const std::vector<bool>& recompute) const {
  const size_t nv = values_.size();
  const std::vector<int>& root = b.root;
  const std::vector<bool>& trainable = b.trainable;
  const std::vector<bool>& has_grad = b.has_grad;
  MemoryLayout m;
  m.bwd = backward_timeline(fwd_, b, recompute);
  std::vector<Step>& bwd = m.bwd;
  std::vector<bool> recomputed(nv, false);
  for (size_t f = 0; f < fwd_.size(); ++f)
    if (recompute[f])
      for (int v : fwd_[f].out_ids) recomputed[size_t(v)] = true;
  const int F = int(fwd_.size());
  const ValueLiveness L = timeline_liveness(fwd_, bwd, b, recomputed);

  std::vector<Interval> iv;
  // (kind 0 value / 1 grad / 2 fwd scratch / 3 bwd scratch / 4 recomputed value, id)
  std::vector<std::pair<int, int>> owner;
  for (size_t v = 0; v < nv; ++v)
    if (L.start[v] >= 0 && root[v] == int(v)) {
      iv.push_back({int64_t(std::max<size_t>(values_[v].nbytes(), 1)), L.start[v], L.end[v]});
      owner.push_back({0, int(v)});
      m.activation_bytes += int64_t(values_[v].nbytes());
    }
  // Activation gradients: alive from their first writer to the producer's backward step.
  std::vector<int> gstart(nv, -1), gend(nv, -1);
  // groot[v]: the value whose gradient buffer v's gradient shares (itself unless aliased).
  std::vector<int> groot(nv);
  for (size_t v = 0; v < nv; ++v) groot[v] = int(v);
  // Backward steps that write each value's gradient (its consumers', in order) and the one
  // that reads it (its producer's). Recompute steps touch no gradient.
  std::vector<std::vector<int>> grad_writers(nv);
  std::vector<int> grad_reader(nv, -1);
  for (int i = 0; i < int(bwd.size()); ++i) {
    const Step& s = bwd[size_t(i)];
    if (s.recompute) continue;
    for (size_t k = 0; k < s.in_ids.size(); ++k)
      if (s.need_grad[k]) grad_writers[size_t(s.in_ids[k])].push_back(i);
    for (int v : s.out_ids) grad_reader[size_t(v)] = i;
  }
  // The last backward step that may read the buffer of v's gradient: its producer's, or
  // past pass-through producers (which may hand v's buffer on to their input) the first
  // that does real work; -1 when an input along the way has other gradient writers (they
  // would add into the buffer) or nothing reads it.
  auto last_grad_reader = [&](int v) {
    for (;;) {
      const int r = grad_reader[size_t(v)];
      if (r < 0) return -1;
      const Step& rs = bwd[size_t(r)];
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
  auto share_both = [&](int i, const Step& s) {
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
      for (int w : grad_writers[size_t(x)]) ordered = ordered && (w == i || w > r);
      if (!ordered) continue;
      for (int v : {x, y}) {
        groot[size_t(v)] = groot[size_t(z)];
        gstart[size_t(v)] = gend[size_t(v)] = F + i;
      }
      return true;
    }
    return false;
  };
  for (int i = 0; i < int(bwd.size()); ++i) {
    Step& s = bwd[size_t(i)];
    if (s.recompute) continue;
    // The step reads its outputs' gradients (skipped or not: a shared buffer lives on).
    for (int v : s.out_ids)
      if (has_grad[size_t(v)] && !trainable[size_t(v)]) gend[size_t(v)] = std::max(gend[size_t(v)], F + i);
    if (s.op->both_grads_are_dy(s.need_grad) && share_both(i, s)) {
      s.skip = true;
      ++m.passthrough_backward_ops;
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
          gstart[size_t(v)] = F + i;
          gend[size_t(v)] = F + i;
          s.skip = true;
          ++m.passthrough_backward_ops;
          continue;
        }
      }
      if (gstart[size_t(v)] < 0) {
        gstart[size_t(v)] = F + i;
        // First writer: it assigns when it can and the value is not its input twice (the
        // second din would then add to the first); otherwise the buffer is zeroed first.
        int uses = 0;
        for (size_t j = 0; j < s.in_ids.size(); ++j) uses += s.in_ids[j] == v && s.need_grad[j];
        if (k < 64 && uses == 1 && s.op->assigns_fresh_grads()) s.fresh_din |= uint64_t(1) << k;
        else {
          s.zero_grads.push_back(v);
          m.zeroed_gradient_bytes += int64_t(grads_[size_t(v)].nbytes());
        }
      }
      gend[size_t(v)] = std::max(gend[size_t(v)], F + i);
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
      m.gradient_bytes += int64_t(grads_[v].nbytes());
    }
  for (int t = 0; t < F; ++t)
    if (size_t sb = fwd_[size_t(t)].op->forward_scratch_bytes()) {
      iv.push_back({int64_t(sb), t, t});
      owner.push_back({2, t});
      m.scratch_bytes += int64_t(sb);
    }
  for (int i = 0; i < int(bwd.size()); ++i) {
    Step& s = bwd[size_t(i)];
    const size_t sb = s.recompute ? s.op->forward_scratch_bytes()
                                  : s.op->backward_scratch_bytes(s.need_grad);
    if (sb) {
      iv.push_back({int64_t(sb), F + i, F + i});
      owner.push_back({3, i});
      m.scratch_bytes += int64_t(sb);
    }
  }
  // Recomputed copies: from their recompute step to their last backward reader.
  for (size_t v = 0; v < nv; ++v)
    if (L.rstart[v] >= 0) {
      iv.push_back({int64_t(std::max<size_t>(values_[v].nbytes(), 1)), L.rstart[v], L.rend[v]});
      owner.push_back({4, int(v)});
    }
  // One buffer over the limit is refused before placing (keeps the offsets far from
  // overflow); the placed arena is checked again before it is allocated.
  for (auto& x : iv) check_memory("one activation/gradient/scratch buffer", x.bytes, b.mem_limit);
  m.arena_bytes = place_intervals(iv);
  m.value_off.assign(nv, -1);
  m.recompute_off.assign(nv, -1);
  m.grad_off.assign(nv, -1);
  m.fwd_scratch_off.assign(size_t(F), 0);
  for (size_t i = 0; i < iv.size(); ++i) {
    auto [kind, id] = owner[i];
    if (kind == 0) m.value_off[size_t(id)] = iv[i].offset;
    else if (kind == 1) m.grad_off[size_t(id)] = iv[i].offset;
    else if (kind == 2) m.fwd_scratch_off[size_t(id)] = iv[i].offset;
    else if (kind == 3) bwd[size_t(id)].scratch_offset = iv[i].offset;
    else m.recompute_off[size_t(id)] = iv[i].offset;
  }
  for (size_t v = 0; v < nv; ++v)
    if (root[v] != int(v)) {
      m.value_off[v] = m.value_off[size_t(root[v])];
      m.recompute_off[v] = m.recompute_off[size_t(root[v])];
    }
  for (size_t v = 0; v < nv; ++v)
    if (groot[v] != int(v)) m.grad_off[v] = m.grad_off[size_t(groot[v])];
  return m;
}

void Plan::commit_layout(const Model& model, const PlanBuild& b, MemoryLayout&& m) {
  check_memory("activations, gradients and scratch", m.arena_bytes + stats_.constant_bytes,
               b.mem_limit);
  stats_.arena_bytes = m.arena_bytes;
  stats_.activation_bytes = m.activation_bytes;
  stats_.gradient_bytes = m.gradient_bytes;
  stats_.zeroed_gradient_bytes = m.zeroed_gradient_bytes;
  stats_.scratch_bytes = m.scratch_bytes;
  stats_.passthrough_backward_ops = m.passthrough_backward_ops;
  bwd_ = std::move(m.bwd);
  for (size_t t = 0; t < fwd_.size(); ++t) fwd_[t].scratch_offset = m.fwd_scratch_off[t];
  value_off_ = std::move(m.value_off);
  grad_off_ = std::move(m.grad_off);
  bwd_value_off_ = value_off_;
  for (size_t v = 0; v < bwd_value_off_.size(); ++v)
    if (m.recompute_off[v] >= 0) bwd_value_off_[v] = m.recompute_off[v];
  char* base = arena_->reserve(size_t(std::max<int64_t>(stats_.arena_bytes, 1)));
  point_values(base);
  bind_steps(model);
  bound_ = base;
}

// Binds tensors into the steps; remembers where graph inputs' pointers go.
void Plan::bind_steps(const Model& model) {
  const size_t nv = values_.size();
  char* base = arena_->base();
  input_sites_.assign(model.inputs.size(), {});
  std::vector<int> input_index(nv, -1);
  for (size_t i = 0; i < model.inputs.size(); ++i) input_index[size_t(model.inputs[i])] = int(i);
  // A value as the backward's steps see it: its recomputed copy where there is one.
  auto bwd_value = [&](int v) {
    Tensor t = values_[size_t(v)];
    if (bwd_value_off_[size_t(v)] >= 0) t.data = base + bwd_value_off_[size_t(v)];
    return t;
  };
  auto fill = [&](Step& s, bool in_backward) {
    auto value = [&](int v) { return in_backward ? bwd_value(v) : values_[size_t(v)]; };
    s.in.clear();
    s.out.clear();
    for (int v : s.in_ids) s.in.push_back(v >= 0 ? value(v) : Tensor{});
    for (int v : s.out_ids) s.out.push_back(value(v));
    if (in_backward && !s.recompute) {
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
  for (std::vector<Step>* steps : {&fwd_, &bwd_})
    for (Step& s : *steps)
      for (size_t k = 0; k < s.in_ids.size(); ++k)
        if (s.in_ids[k] >= 0 && input_index[size_t(s.in_ids[k])] >= 0)
          input_sites_[size_t(input_index[size_t(s.in_ids[k])])].push_back(&s.in[k]);
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
    point(s.in, s.in_ids, bwd_value_off_);
    point(s.out, s.out_ids, bwd_value_off_);
    point(s.dout, s.out_ids, grad_off_);
    point(s.din, s.in_ids, grad_off_);  // a din not wanted keeps data == nullptr
  }
  bound_ = base;
}

}  // namespace pyedge
