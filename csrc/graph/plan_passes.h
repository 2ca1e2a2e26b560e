// What Plan's passes hand each other while a plan is built (internal to csrc/graph).
//
//   init_values ─ prune_unneeded ─ schedule_forward        plan_schedule.cpp
//   mark_requires_grad ─ build_backward                    plan_backward.cpp
//   analyze_liveness                                       plan_liveness.cpp
//   choose_recompute (calls layout_memory per candidate)   plan_recompute.cpp
//   layout_memory ─ commit_layout ─ bind_steps             plan_memory.cpp
//
// Each pass reads what the earlier ones left in Plan's members and in PlanBuild, and adds
// its own part; only commit_layout and bind_steps touch the arena.
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

#include "graph/plan.h"

namespace pyedge {

// Transient state of one Plan::build (dropped once the plan is built).
struct PlanBuild {
  int64_t mem_limit = 0;                 // memory_limit_bytes() at plan time
  std::vector<bool> external, trainable; // per value: a graph input / a trained tensor
  std::vector<bool> needed_node;         // per model node: leads to a target or the loss
  std::vector<bool> has_grad;            // per value: a gradient reaches it (pruned backward)
  std::vector<Plan::Step> backward;      // the pruned backward, before recomputation
  // Liveness facts that do not depend on recomputation (analyze_liveness):
  std::vector<bool> in_arena;            // per value: planned in the arena (not a constant,
                                         // graph input or trained tensor)
  std::vector<int> root;                 // storage shared with an aliasing producer's input
  std::vector<int> producer;             // forward step index producing a value, -1: none
  std::vector<bool> kept;                // must live to the end (targets, the loss)
  std::vector<int> first_backward_read;  // per root: first backward step reading it, -1: none
};

// One memory plan: the backward timeline (recompute steps in place) and every buffer's
// offset in the arena. layout_memory builds one per candidate recomputation.
struct MemoryLayout {
  std::vector<Plan::Step> bwd;
  std::vector<int64_t> value_off, recompute_off, grad_off, fwd_scratch_off;
  int64_t arena_bytes = 0;
  int64_t activation_bytes = 0, gradient_bytes = 0, zeroed_gradient_bytes = 0, scratch_bytes = 0;
  int passthrough_backward_ops = 0;
};

// Over the timeline (forward steps 0..F-1, then the backward timeline's steps F..): when each
// arena root's forward buffer and, where it is recomputed, its recomputed copy are first
// written and last read (-1: never). t_end: past the last step (targets and the loss).
struct ValueLiveness {
  std::vector<int> start, end, rstart, rend;
  int t_end = 0;
};
ValueLiveness timeline_liveness(const std::vector<Plan::Step>& fwd,
                                const std::vector<Plan::Step>& bwd, const PlanBuild& b,
                                const std::vector<bool>& recomputed);

// The backward with recompute steps in place: forward step f (recompute[f]) re-runs just
// before the first step that reads one of its outputs (a backward step, or another recompute
// step of a chain), producers before their readers.
std::vector<Plan::Step> backward_timeline(const std::vector<Plan::Step>& fwd, const PlanBuild& b,
                                          const std::vector<bool>& recompute);

// Greedy best-fit placement of buffers alive over [start, end]; returns the arena size.
struct Interval {
  int64_t bytes;
  int start, end;
  int64_t offset = -1;
};
int64_t place_intervals(std::vector<Interval>& iv);

// Refuses a plan whose memory would exceed the limit, before it is allocated.
void check_memory(const char* what, int64_t bytes, int64_t limit);

}  // namespace pyedge
