// Pass 6: liveness. Which values share storage (outputs of Reshape-like ops alias their
// input), who produces and first reads each buffer in the backward, and, for any backward
// timeline, when each buffer is first written and last read.
#include <algorithm>

#include "graph/plan_passes.h"

namespace pyedge {

void Plan::analyze_liveness(const PlanRequest& req, PlanBuild& b) {
  const size_t nv = values_.size();
  b.in_arena.assign(nv, false);
  for (size_t v = 0; v < nv; ++v)
    b.in_arena[v] = !is_const_[v] && !b.external[v] && !b.trainable[v];
  b.root.resize(nv);
  for (size_t v = 0; v < nv; ++v) b.root[v] = int(v);
  b.producer.assign(nv, -1);
  for (size_t t = 0; t < fwd_.size(); ++t) {
    const Step& s = fwd_[t];
    for (size_t k = 0; k < s.out_ids.size(); ++k) {
      const int v = s.out_ids[k];
      b.producer[size_t(v)] = int(t);
      if (k == 0 && s.op->output_aliases_input0() && !s.in_ids.empty() &&
          s.in_ids[0] >= 0 && b.in_arena[size_t(s.in_ids[0])] &&
          values_[size_t(v)].nbytes() == values_[size_t(s.in_ids[0])].nbytes())
        b.root[size_t(v)] = b.root[size_t(s.in_ids[0])];
    }
  }
  b.kept.assign(nv, false);
  for (int t : req.targets) b.kept[size_t(t)] = true;
  if (loss_ >= 0) b.kept[size_t(loss_)] = true;
  b.first_backward_read.assign(nv, -1);
  for (size_t i = b.backward.size(); i-- > 0;) {
    const Step& s = b.backward[i];
    auto ri = s.op->backward_reads_inputs(s.need_grad);
    auto ro = s.op->backward_reads_outputs(s.need_grad);
    for (size_t k = 0; k < s.in_ids.size() && k < ri.size(); ++k)
      if (ri[k] && s.in_ids[k] >= 0 && b.in_arena[size_t(s.in_ids[k])])
        b.first_backward_read[size_t(b.root[size_t(s.in_ids[k])])] = int(i);
    for (size_t k = 0; k < s.out_ids.size() && k < ro.size(); ++k)
      if (ro[k] && b.in_arena[size_t(s.out_ids[k])])
        b.first_backward_read[size_t(b.root[size_t(s.out_ids[k])])] = int(i);
  }
}

ValueLiveness timeline_liveness(const std::vector<Plan::Step>& fwd,
                                const std::vector<Plan::Step>& bwd, const PlanBuild& b,
                                const std::vector<bool>& recomputed) {
  const size_t nv = b.root.size();
  const int F = int(fwd.size());
  ValueLiveness L;
  L.start.assign(nv, -1);
  L.end.assign(nv, -1);
  L.rstart.assign(nv, -1);
  L.rend.assign(nv, -1);
  L.t_end = F + int(bwd.size()) + 1;
  auto arena = [&](int v) { return v >= 0 && b.in_arena[size_t(v)]; };
  // A read at time t keeps the buffer the reader sees alive: the recomputed copy in the
  // backward when there is one, else the forward buffer.
  auto read = [&](int v, int t, bool backward) {
    const size_t r = size_t(b.root[size_t(v)]);
    if (backward && recomputed[r]) L.rend[r] = std::max(L.rend[r], t);
    else L.end[r] = std::max(L.end[r], t);
  };
  for (int t = 0; t < F; ++t) {
    const Plan::Step& s = fwd[size_t(t)];
    for (int v : s.in_ids)
      if (arena(v)) read(v, t, false);
    for (int v : s.out_ids) {
      if (b.root[size_t(v)] != v) continue;  // aliases its input's storage
      L.start[size_t(v)] = t;
      L.end[size_t(v)] = std::max(L.end[size_t(v)], t);
    }
  }
  for (int i = 0; i < int(bwd.size()); ++i) {
    const Plan::Step& s = bwd[size_t(i)];
    const int t = F + i;
    if (s.recompute) {  // reads all its inputs, writes all its outputs (hidden ones too)
      for (int v : s.in_ids)
        if (arena(v)) read(v, t, true);
      for (int v : s.out_ids) {
        if (L.rstart[size_t(v)] < 0) L.rstart[size_t(v)] = t;
        L.rend[size_t(v)] = std::max(L.rend[size_t(v)], t);
      }
      continue;
    }
    auto ri = s.op->backward_reads_inputs(s.need_grad);
    auto ro = s.op->backward_reads_outputs(s.need_grad);
    for (size_t k = 0; k < s.in_ids.size() && k < ri.size(); ++k)
      if (ri[k] && arena(s.in_ids[k])) read(s.in_ids[k], t, true);
    for (size_t k = 0; k < s.out_ids.size() && k < ro.size(); ++k)
      if (ro[k] && arena(s.out_ids[k])) read(s.out_ids[k], t, true);
  }
  for (size_t v = 0; v < nv; ++v)
    if (b.kept[v] && b.in_arena[v]) L.end[size_t(b.root[v])] = L.t_end;
  return L;
}

}  // namespace pyedge
