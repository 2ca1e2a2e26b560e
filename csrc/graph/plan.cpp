#include "graph/plan.h"

#include <chrono>
#include <cstring>

#include "common/memory_limit.h"
#include "graph/plan_passes.h"

namespace pyedge {

char* Arena::reserve(size_t bytes) {
  if (bytes > buf_.size()) {
    // Before growing: does the system still have it? (Another process may have taken what
    // the plan was sized for.) A clear error now instead of the kernel's OOM kill later; the
    // old arena is freed first, so only the growth must be available.
    std::string source;
    const int64_t avail = available_memory_bytes(&source);
    const int64_t growth = int64_t(bytes - buf_.size());
    if (avail >= 0 && growth > avail)
      throw OutOfMemoryError(str_cat(
          "out of memory: the plan's arena needs ", growth, " bytes more (", buf_.size(),
          " -> ", bytes, " bytes) but ", source, " reports only ", avail,
          " bytes available (another process may hold the rest): free memory, or set a "
          "smaller max_memory so that the planner recomputes activations instead"));
    buf_ = Buffer();  // free first: the old and the new arena are never held together
    buf_ = Buffer(bytes);
  }
  return base();
}

Plan::Plan(const Model& model, const PlanRequest& req, std::shared_ptr<Arena> arena)
    : arena_(arena ? std::move(arena) : std::make_shared<Arena>()), model_(&model) {
  PlanBuild b;
  init_values(model, req, b);
  prune_unneeded(model, req, b);
  schedule_forward(model, b);
  mark_requires_grad(b);
  build_backward(model, req, b);
  analyze_liveness(req, b);
  choose_recompute(model, req, b);  // ends with commit_layout: offsets, arena, bound steps
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
    if (s.recompute) {  // the forward step again: same op, inputs, seed and node_index
      ctx.scratch = base + s.scratch_offset;
      ctx.node_index = uint64_t(s.node);
      auto t0 = profiling_ ? clock::now() : clock::time_point{};
      s.op->forward(s.in, s.out, ctx);
      if (profiling_) {
        s.seconds += std::chrono::duration<double>(clock::now() - t0).count();
        ++s.calls;
      }
      continue;
    }
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
    r.push_back({s.recompute ? n.name + " (recompute)" : n.name, op_key(n.domain, n.op_type), bwd,
                 s.seconds, s.calls});
  };
  for (const Step& s : fwd_) add(s, false);
  for (const Step& s : bwd_) add(s, true);
  return r;
}

}  // namespace pyedge
