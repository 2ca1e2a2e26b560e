// A training session: the model, its trainable parameters with their optimizer, and plans
// cached per input-shape signature.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "graph/model.h"
#include "graph/plan.h"
#include "optim/optimizer.h"

namespace pyedge {

struct StepResult {
  float loss = 0.f;
  double grad_norm = 0.0;  // before clipping; NaN when not computed
  bool applied = false;    // false when the loss or gradients were not finite
};

class Session {
 public:
  Session(std::shared_ptr<Model> model, const std::vector<std::string>& trainable,
          const std::string& loss, const OptimizerConfig& optimizer, uint64_t seed);

  // Forward + backward; gradients accumulate across calls. When `update`, clips to
  // max_grad_norm (0: off), applies the optimizer and zeroes the gradients. A non-finite loss
  // or gradient leaves parameters and optimizer state untouched and zeroes the gradients.
  // grad_scale multiplies the accumulated gradients before clipping (1/k averages k
  // accumulated micro-batches).
  StepResult train_step(const std::vector<Tensor>& inputs, bool update, double max_grad_norm,
                        double grad_scale = 1.0);
  // Clips, applies the optimizer to the accumulated gradients and zeroes them; skipped (but
  // gradients still zeroed) when the gradient norm is not finite.
  StepResult apply_update(double max_grad_norm, float loss = 0.f, double grad_scale = 1.0);
  // Forward only (dropout off). Returned tensors view plan memory, valid until the next call.
  std::vector<Tensor> run(const std::vector<Tensor>& inputs, const std::vector<int>& outputs);
  PlanStats plan_stats(const std::vector<Shape>& input_shapes, bool training);
  // Bytes of the arena all plans share: the largest plan's, not the sum.
  size_t arena_bytes() const { return arena_->size(); }

  const Model& model() const { return *model_; }
  std::vector<Parameter>& parameters() { return params_; }
  std::vector<std::string> optimizer_state_names() const { return optim_->state_names(); }
  int64_t step_count = 0;   // optimizer updates applied
  double lr = 1e-3;
  bool training_mode = true;       // dropout active in train_step
  int64_t last_step_allocations = 0;  // heap allocations inside the last train_step
  void zero_grads();
  bool profiling = false;  // time every op of every plan (see last_profile)

  // Memory budget for plans built from now on (drops the cached plans and the arena).
  // budget_bytes: the whole process (resident + parameters, gradients, optimizer state +
  // arena + folded constants), < 0: none, then plans aim at what the system has
  // (available_memory_bytes()). resident_bytes: what the caller already holds (the weights;
  // the Python side passes max(initializer bytes, its resident set)).
  void set_memory_budget(int64_t budget_bytes, int64_t resident_bytes,
                         PlanRequest::Recompute policy);
  // resident + parameters + their gradients + optimizer state.
  int64_t fixed_bytes() const;
  // Optimizer "none": no gradient buffers; train_step/apply_update refuse; plan_stats of a
  // "training" plan is the forward plan that outputs the loss (what run(..., {loss}) uses).
  bool forward_only() const { return forward_only_; }
  std::vector<Plan::StepTime> last_profile() const;
  // Model inputs (by name) whose value an op needs at plan time (a Reshape's shape, Slice's
  // starts, ... fed as graph inputs): plans are then built with the fed value known and
  // cached per value as well as per shape. Drops the cached plans.
  void set_value_keyed_inputs(const std::vector<std::string>& names);

 private:
  Plan& plan_for(const std::vector<Shape>& shapes, bool training, const std::vector<int>& targets,
                 const std::vector<Tensor>* inputs = nullptr);
  void check_inputs(const std::vector<Tensor>& inputs, Plan* plan, bool training);

  std::shared_ptr<Model> model_;
  std::vector<Parameter> params_;
  std::unique_ptr<Optimizer> optim_;
  int loss_ = -1;
  bool forward_only_ = false;
  uint64_t seed_ = 0;
  struct CachedPlan {
    bool training;
    std::vector<Shape> shapes;
    std::vector<int> targets;
    std::unique_ptr<Plan> plan;
    std::vector<std::vector<char>> values;  // bytes of the value-keyed inputs (else empty)
  };
  std::vector<bool> value_keyed_;  // per model input (empty: none)
  std::vector<std::vector<char>> scratch_values_;
  std::vector<CachedPlan> plans_;
  int64_t memory_budget_ = -1, resident_bytes_ = 0;
  PlanRequest::Recompute recompute_ = PlanRequest::Recompute::kAuto;
  std::shared_ptr<Arena> arena_ = std::make_shared<Arena>();  // shared by all plans_
  size_t last_plan_ = size_t(-1);
  std::vector<Shape> scratch_shapes_;  // reused so a steady-state step allocates nothing
  const std::vector<int> no_targets_;

 public:
  uint64_t micro_steps = 0;  // forward/backward passes run; seeds dropout (saved for resume)
};

}  // namespace pyedge
