// A static execution plan for one input-shape signature: forward steps, the pruned backward
// (with forward steps re-run inside it where recomputation was chosen), and one arena whose
// offsets come from a liveness-based memory plan. Built once by named passes (plan_passes.h),
// then run any number of times without allocating.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "graph/model.h"
#include "ops/op.h"

namespace pyedge {

struct PlanRequest {
  std::vector<Shape> input_shapes;        // one per model input, in model order
  // model input index -> its value, known at plan time: a parameter an op reads while
  // planning (Reshape's shape, Slice's starts, Pad's pads...) fed as a graph input. The
  // plan keeps a copy, folds what depends on it, and is cached per value (Session).
  std::map<int, Tensor> input_values;
  std::map<int, Tensor> trainable;        // value id -> parameter storage (float32)
  std::map<int, Tensor> trainable_grads;  // value id -> its gradient buffer (accumulated into)
  std::vector<int> targets;               // values to keep for the caller (outputs, loss)
  int loss = -1;                          // value id of the scalar loss; -1: forward only
  // Recomputation (plan_recompute.cpp). kAuto recomputes as little as keeps arena + folded
  // constants under arena_budget; the others force a level whatever the budget.
  enum class Recompute { kAuto, kNone, kCheap, kFull };
  Recompute recompute = Recompute::kAuto;
  // Bytes the arena + folded constants may take; < 0: no budget (kAuto then recomputes
  // nothing). budget_is_hard: a plan that cannot fit is an error naming the minimum;
  // otherwise (a budget guessed from the system) the smallest plan is taken.
  int64_t arena_budget = -1;
  bool budget_is_hard = false;
  std::string budget_source;             // for messages: "max_memory=2.5 GiB", "MemAvailable"
  int64_t fixed_bytes = 0;               // weights, parameters, gradients, optimizer state
  // The shared arena's size already held for the session's other plans: this plan's peak
  // is fixed + max(its arena, the floor) + its constants.
  int64_t arena_floor = 0;
};

struct PlanStats {
  int forward_ops = 0;           // steps run in forward
  int backward_ops = 0;          // steps run in backward
  int folded_ops = 0;            // nodes computed once at plan time
  int pruned_nodes = 0;          // nodes not needed for the targets
  int64_t arena_bytes = 0;       // activations + gradients + scratch, after reuse
  int64_t activation_bytes = 0;  // sum of forward tensors before reuse
  int64_t gradient_bytes = 0;    // sum of activation-gradient tensors before reuse
  int64_t zeroed_gradient_bytes = 0;  // of those, zeroed each step (first writer accumulates)
  int passthrough_backward_ops = 0;   // backward steps skipped: dX shares dY's buffer
  int64_t scratch_bytes = 0;
  int64_t constant_bytes = 0;    // folded constants owned by the plan
  std::vector<std::string> backward_nodes;  // node names with a backward step, in order
  // Recomputation: forward steps re-run in the backward, by op type; their cost (FLOPs where
  // the op knows them, else a proxy, Op::flops) against the forward's.
  int recompute_ops = 0;
  std::map<std::string, int> recompute_op_types;
  std::vector<std::string> recompute_nodes;
  double recompute_flops = 0.0, forward_flops = 0.0;
  std::string recompute_choice;          // what was chosen and why, one line
  int64_t arena_bytes_no_recompute = 0;  // the arena without recomputation
  int64_t arena_bytes_min = 0;           // the smallest arena recomputation reaches
  int64_t arena_budget = -1;             // the budget the choice was made under (-1: none)
  int64_t fixed_bytes = 0;               // weights, parameters, gradients, optimizer state
  int64_t planned_peak_bytes = 0;        // fixed + arena + constants (+ output copies)
  // A forward-only plan's targets as the caller gets them (copied out of the arena: the
  // logits of run() exist twice at its end).
  int64_t output_copy_bytes = 0;
  int scratch_reduced_ops = 0;           // ops switched to a smaller-scratch path (Op::reduce_scratch)
};

// The memory a session's plans run in. Plans never run at the same time and keep nothing in
// the arena from one run to the next (inputs, parameters and their gradients live outside
// it), so a session with several plans (training and evaluation, several sequence lengths)
// needs its largest plan's memory, not the sum. Each plan re-points its tensors when the
// arena has moved since its last run (after a larger plan grew it).
class Arena {
 public:
  // At least `bytes` (contents dropped when it grows); returns the base.
  char* reserve(size_t bytes);
  char* base() const { return static_cast<char*>(buf_.data()); }
  size_t size() const { return buf_.size(); }

 private:
  Buffer buf_;
};

// A plan recomputes activations to fit its arena + folded constants under the request's
// budget (plan_recompute.cpp), and refuses to be built when they still exceed
// memory_limit_bytes() (common/memory_limit.h): PYEDGE_MAX_MEMORY or 75% of physical RAM.
struct PlanBuild;    // plan_passes.h: what the passes hand each other
struct MemoryLayout;

class Plan {
 public:
  // Runs in `arena` (shared with the session's other plans), or in its own when null.
  Plan(const Model& model, const PlanRequest& req, std::shared_ptr<Arena> arena = nullptr);

  // Binds caller-owned input memory (dtype/shape already checked) for the next run.
  void bind_input(size_t input_index, void* data);
  // Forward, and when `backward` the backward: parameter gradients are ACCUMULATED into
  // the request's trainable_grads buffers, which the caller zeroes.
  void run(bool training, uint64_t seed, bool backward);
  bool has_backward() const { return loss_ >= 0; }
  bool input_used(size_t i) const { return !input_sites_[i].empty(); }
  const Tensor& value(int id) const { return values_[size_t(id)]; }
  const PlanStats& stats() const { return stats_; }

  // One scheduled op call (public for the planner's passes, plan_passes.h).
  struct Step {
    int node;
    Op* op;
    std::vector<Tensor> in, out, dout, din;
    std::vector<bool> need_grad;  // backward: which inputs get a gradient (the pruned backward)
    std::vector<int> in_ids, out_ids;
    std::vector<int> zero_grads;  // value ids whose grad buffer this backward step zeroes first
    uint64_t fresh_din = 0;       // dins this step writes first and assigns (RunContext)
    bool skip = false;            // pass-through backward whose dX shares dY's buffer
    bool recompute = false;       // in bwd_: re-runs the forward step `node` (plan_recompute)
    int64_t scratch_offset = 0;
    double seconds = 0.0;
    int64_t calls = 0;
  };

  // Per-step timing (off by default: two clock reads per op when on).
  struct StepTime {
    std::string node, op_type;
    bool backward;
    double seconds;
    int64_t calls;
  };
  void set_profiling(bool on) { profiling_ = on; }
  std::vector<StepTime> profile() const;

 private:
  // The passes, in the order the constructor runs them (one file each, plan_passes.h).
  void init_values(const Model& model, const PlanRequest& req, PlanBuild& b);  // plan_schedule
  void prune_unneeded(const Model& model, const PlanRequest& req, PlanBuild& b);
  void schedule_forward(const Model& model, PlanBuild& b);
  void mark_requires_grad(PlanBuild& b);                                       // plan_backward
  void build_backward(const Model& model, const PlanRequest& req, PlanBuild& b);
  void check_backward_dtypes(const Model& model, const Step& f,
                             const std::vector<bool>& need) const;
  void analyze_liveness(const PlanRequest& req, PlanBuild& b);                 // plan_liveness
  void choose_recompute(const Model& model, const PlanRequest& req, PlanBuild& b);  // plan_recompute
  MemoryLayout layout_memory(const PlanBuild& b, const std::vector<bool>& recompute) const;  // plan_memory
  void commit_layout(const Model& model, const PlanBuild& b, MemoryLayout&& m);
  void bind_steps(const Model& model);
  // Points the arena's values and gradients at `base` + their offsets.
  void point_values(char* base);
  // The same, and the steps' copies of those tensors (after the arena moved).
  void bind_arena(char* base);

  std::vector<std::unique_ptr<Op>> ops_;
  std::vector<OwnedTensor> folded_;      // constants computed at plan time
  std::vector<Tensor> values_;           // every value's dtype, shape and (after planning) data
  std::vector<Tensor> grads_;            // gradient buffers (data null: no gradient)
  std::vector<bool> is_const_, requires_grad_;
  std::vector<Step> fwd_, bwd_;
  std::vector<std::vector<Tensor*>> input_sites_;  // where each graph input's pointer is used
  int loss_ = -1;
  std::shared_ptr<Arena> arena_;
  char* bound_ = nullptr;                // arena base the tensors point into
  std::vector<int64_t> value_off_, grad_off_;  // arena offset per value / gradient, -1: outside
  // Arena offset of each value as bwd_'s steps see it: its recomputed copy where the value is
  // recomputed, else value_off_.
  std::vector<int64_t> bwd_value_off_;
  bool profiling_ = false;
  PlanStats stats_;
  const Model* model_ = nullptr;
};

}  // namespace pyedge
