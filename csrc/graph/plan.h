// A static execution plan for one input-shape signature: forward steps, the pruned backward,
// and one arena whose offsets come from a liveness-based memory plan. Built once, then run
// any number of times without allocating.
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
  std::map<int, Tensor> trainable;        // value id -> parameter storage (float32)
  std::map<int, Tensor> trainable_grads;  // value id -> its gradient buffer (accumulated into)
  std::vector<int> targets;               // values to keep for the caller (outputs, loss)
  int loss = -1;                          // value id of the scalar loss; -1: forward only
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

// A plan refuses to be built when its arena + folded constants exceed memory_limit_bytes()
// (common/memory_limit.h): PYEDGE_MAX_MEMORY or 75% of physical RAM.
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
  struct Step {
    int node;
    Op* op;
    std::vector<Tensor> in, out, dout, din;
    std::vector<bool> need_grad;  // backward: which inputs get a gradient (the pruned backward)
    std::vector<int> in_ids, out_ids;
    std::vector<int> zero_grads;  // value ids whose grad buffer this backward step zeroes first
    uint64_t fresh_din = 0;       // dins this step writes first and assigns (RunContext)
    bool skip = false;            // pass-through backward whose dX shares dY's buffer
    int64_t scratch_offset = 0;
    double seconds = 0.0;
    int64_t calls = 0;
  };
  void build(const Model& model, const PlanRequest& req);
  void assign_memory(const Model& model, const PlanRequest& req);
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
  bool profiling_ = false;
  PlanStats stats_;
  const Model* model_ = nullptr;
};

}  // namespace pyedge
