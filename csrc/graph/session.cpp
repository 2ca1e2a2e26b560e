#include "graph/session.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/alloc_counter.h"
#include "common/memory_limit.h"

namespace pyedge {

Session::Session(std::shared_ptr<Model> model, const std::vector<std::string>& trainable,
                 const std::string& loss, const OptimizerConfig& optimizer, uint64_t seed)
    : model_(std::move(model)), optim_(make_optimizer(optimizer)), seed_(seed) {
  lr = optimizer.lr;
  forward_only_ = optimizer.kind == "none";
  if (!loss.empty()) {
    loss_ = model_->find_value(loss);
    PYEDGE_CHECK(loss_ >= 0, "the loss value '", loss, "' is not in the graph");
  }
  auto names = optim_->state_names();
  params_.reserve(trainable.size());
  for (const std::string& name : trainable) {
    int v = model_->find_value(name);
    PYEDGE_CHECK(v >= 0 && model_->initializers.count(v), "trainable tensor '", name,
                 "' is not an initializer of the model");
    const Tensor& init = model_->initializers.at(v);
    PYEDGE_CHECK(init.dtype == DType::f32, "trainable tensor '", name, "' is ",
                 dtype_name(init.dtype), "; only float32 tensors can be trained");
    params_.emplace_back();
    Parameter& p = params_.back();
    p.name = name;
    p.value_id = v;
    p.value_store = Buffer(init.nbytes());
    std::memcpy(p.value_store.data(), init.data, init.nbytes());
    p.value = init;
    p.value.data = p.value_store.data();
    p.grad = init;
    p.grad.data = nullptr;  // forward-only: no gradient buffer
    if (!forward_only_) {
      p.grad_store = Buffer(init.nbytes());
      p.grad.data = p.grad_store.data();
    }
    for (size_t s = 0; s < names.size(); ++s) {
      p.state_store.emplace_back(init.nbytes());
      p.state.push_back(init);
      p.state.back().data = p.state_store.back().data();
    }
  }
}

std::vector<Plan::StepTime> Session::last_profile() const {
  if (last_plan_ >= plans_.size()) return {};
  return plans_[last_plan_].plan->profile();
}

void Session::set_memory_budget(int64_t budget_bytes, int64_t resident_bytes,
                                PlanRequest::Recompute policy) {
  memory_budget_ = budget_bytes;
  resident_bytes_ = std::max<int64_t>(resident_bytes, 0);
  recompute_ = policy;
  plans_.clear();
  last_plan_ = size_t(-1);
  arena_ = std::make_shared<Arena>();  // the next plan sizes it afresh
}

int64_t Session::fixed_bytes() const {
  int64_t n = resident_bytes_;
  const int64_t per = (forward_only_ ? 1 : 2);  // the value (+ its gradient)
  for (const Parameter& p : params_) n += int64_t(p.value.nbytes()) * int64_t(per + p.state.size());
  return n;
}

void Session::zero_grads() {
  for (Parameter& p : params_)
    if (p.grad.data) std::memset(p.grad.data, 0, p.grad.nbytes());
}

void Session::set_value_keyed_inputs(const std::vector<std::string>& names) {
  std::vector<bool> keyed(model_->inputs.size(), false);
  for (const std::string& name : names) {
    bool found = false;
    for (size_t i = 0; i < model_->inputs.size(); ++i)
      if (model_->value_name(model_->inputs[i]) == name) keyed[i] = found = true;
    PYEDGE_CHECK(found, "'", name, "' is not an input of the model");
  }
  value_keyed_ = names.empty() ? std::vector<bool>{} : keyed;
  plans_.clear();
  last_plan_ = size_t(-1);
}

Plan& Session::plan_for(const std::vector<Shape>& shapes, bool training,
                        const std::vector<int>& targets, const std::vector<Tensor>* inputs) {
  // The bytes of value-keyed inputs are part of the signature (none: no allocation here).
  std::vector<std::vector<char>>& values = scratch_values_;
  if (!value_keyed_.empty()) {
    values.resize(value_keyed_.size());
    for (size_t i = 0; i < value_keyed_.size(); ++i) {
      values[i].clear();
      if (!value_keyed_[i] || !inputs || !(*inputs)[i].data) continue;
      const char* p = static_cast<const char*>((*inputs)[i].data);
      values[i].assign(p, p + (*inputs)[i].nbytes());
    }
  }
  auto same = [&](const CachedPlan& c) {
    return c.training == training && c.shapes == shapes && c.targets == targets &&
           (value_keyed_.empty() || c.values == values);
  };
  // Fast path without allocating: the same signature as last time.
  if (last_plan_ < plans_.size()) {
    CachedPlan& c = plans_[last_plan_];
    if (same(c)) return *c.plan;
  }
  for (size_t i = 0; i < plans_.size(); ++i) {
    if (same(plans_[i])) {
      last_plan_ = i;
      return *plans_[i].plan;
    }
  }
  PlanRequest req;
  req.input_shapes = shapes;
  if (inputs)
    for (size_t i = 0; i < value_keyed_.size(); ++i)
      if (value_keyed_[i]) req.input_values[int(i)] = (*inputs)[i];
  for (Parameter& p : params_) {
    req.trainable[p.value_id] = p.value;
    if (!forward_only_) req.trainable_grads[p.value_id] = p.grad;
  }
  req.targets = targets;
  req.loss = training ? loss_ : -1;
  req.recompute = recompute_;
  // Each cached plan holds its own folded constants, and the shared arena is as large as the
  // largest: a new plan counts both as held. Under a budget that then does not fit, the other
  // plans and their arena are dropped (rebuilt when next needed: a training loop that
  // evaluates under a tight budget replans at each switch) and the plan is made again alone.
  int64_t held = 0, most = 0;
  for (const CachedPlan& c : plans_) {
    held += c.plan->stats().constant_bytes;
    most = std::max(most, c.plan->stats().constant_bytes);
  }
  auto drop_plans = [&]() {
    plans_.clear();
    last_plan_ = size_t(-1);
    arena_ = std::make_shared<Arena>();  // freed: no plan points into it any more
    held = 0;
  };
  // Folding the new plan's constants (about as large as the others': the same model) beside
  // the held plans would already pass the budget: drop them first, not after folding.
  if (memory_budget_ >= 0 && !plans_.empty() &&
      fixed_bytes() + held + int64_t(arena_->size()) + most > memory_budget_)
    drop_plans();
  auto budget_request = [&](int64_t others) {
    req.fixed_bytes = fixed_bytes() + others;
    req.arena_floor = int64_t(arena_->size());
    const int64_t limit = memory_limit_bytes();
    if (memory_budget_ >= 0) {
      req.arena_budget = std::max<int64_t>(memory_budget_ - req.fixed_bytes, 0);
      req.budget_is_hard = true;
      req.budget_source = str_cat("the memory budget (max_memory) of ", memory_budget_, " bytes");
      if (limit < req.arena_budget) {  // the plan limit binds first: recompute to meet it too
        req.arena_budget = limit;
        req.budget_source = str_cat("the plan memory limit of ", limit, " bytes (PYEDGE_MAX_MEMORY "
                                    "or 75% of RAM; under max_memory=", memory_budget_, ")");
      }
    } else {
      // No budget: what the system still has (the arena this session holds counts as free
      // for its next plan), with a margin, and never over the plan limit.
      std::string src;
      const int64_t avail = available_memory_bytes(&src);
      if (avail >= 0) {
        req.arena_budget = int64_t(double(avail) * 0.9) + int64_t(arena_->size());
        req.budget_source = str_cat("90% of ", src, " (", avail, " bytes)");
        if (limit < req.arena_budget) {
          req.arena_budget = limit;
          req.budget_source = str_cat("the plan memory limit of ", limit,
                                      " bytes (PYEDGE_MAX_MEMORY or 75% of RAM)");
        }
      } else {
        req.arena_budget = limit;
        req.budget_source = "the plan memory limit (PYEDGE_MAX_MEMORY or 75% of RAM)";
      }
      req.budget_is_hard = false;
    }
  };
  budget_request(held);
  std::unique_ptr<Plan> plan;
  try {
    plan = std::make_unique<Plan>(*model_, req, arena_);
  } catch (const OutOfMemoryError&) {
    throw;
  } catch (const Error&) {
    if (plans_.empty() || memory_budget_ < 0) throw;
    drop_plans();
    budget_request(0);
    plan = std::make_unique<Plan>(*model_, req, arena_);
  }
  plans_.push_back({training, shapes, targets, std::move(plan),
                    value_keyed_.empty() ? std::vector<std::vector<char>>{} : values});
  last_plan_ = plans_.size() - 1;
  return *plans_.back().plan;
}

void Session::check_inputs(const std::vector<Tensor>& inputs, Plan* plan, bool training) {
  PYEDGE_CHECK(inputs.size() == model_->inputs.size(), "internal: expected ",
               model_->inputs.size(), " inputs");
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].data && inputs[i].shape.empty()) continue;  // not given
    const std::string& name = model_->value_name(model_->inputs[i]);
    PYEDGE_CHECK(inputs[i].dtype == model_->input_dtypes[i], "input '", name, "' must be ",
                 dtype_name(model_->input_dtypes[i]), ", got ", dtype_name(inputs[i].dtype));
    const Shape& hint = model_->input_shape_hints[i];
    bool ok = hint.empty() || hint.size() == inputs[i].shape.size();
    for (size_t d = 0; ok && d < hint.size(); ++d) ok = hint[d] < 0 || hint[d] == inputs[i].shape[d];
    PYEDGE_CHECK(ok, "input '", name, "' has shape ", shape_str(inputs[i].shape),
                 ", the model expects ", shape_str(hint), " (-1: any size)");
  }
}

StepResult Session::train_step(const std::vector<Tensor>& inputs, bool update,
                               double max_grad_norm, double grad_scale) {
  PYEDGE_CHECK(loss_ >= 0, "this session has no loss: it can only run inference");
  PYEDGE_CHECK(!params_.empty(), "nothing to train: no trainable tensors");
  PYEDGE_CHECK(!forward_only_, "this session is forward-only (optimizer 'none', e.g. MeZO): it "
               "plans no backward; compute the loss with run(inputs, {loss})");
  int64_t allocs_before = heap_allocation_count();
  std::vector<Shape>& shapes = scratch_shapes_;
  shapes.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i)
    if (shapes[i] != inputs[i].shape) shapes[i] = inputs[i].shape;
  check_inputs(inputs, nullptr, true);
  Plan& plan = plan_for(shapes, true, no_targets_, &inputs);
  plan.set_profiling(profiling);
  for (size_t i = 0; i < inputs.size(); ++i) {
    PYEDGE_CHECK(inputs[i].data || !plan.input_used(i), "input '",
                 model_->value_name(model_->inputs[i]), "' is required for training");
    plan.bind_input(i, inputs[i].data);
  }
  uint64_t step_seed = seed_ * 0x9e3779b97f4a7c15ull + uint64_t(step_count) * 0xbf58476d1ce4e5b9ull + micro_steps++;
  plan.run(training_mode, step_seed, true);
  StepResult r;
  r.loss = *static_cast<const float*>(plan.value(loss_).data);
  r.grad_norm = std::nan("");
  if (!std::isfinite(r.loss)) {
    zero_grads();  // a poisoned accumulation must not reach a later update
  } else if (update) {
    r = apply_update(max_grad_norm, r.loss, grad_scale);
  }
  last_step_allocations = heap_allocation_count() - allocs_before;
  return r;
}

StepResult Session::apply_update(double max_grad_norm, float loss, double grad_scale) {
  PYEDGE_CHECK(!forward_only_, "this session is forward-only (optimizer 'none'): it has no "
               "gradients to apply");
  StepResult r;
  r.loss = loss;
  if (grad_scale != 1.0)
    for (Parameter& p : params_) {
      float* g = p.grad.ptr<float>();
      for (int64_t i = 0, n = p.grad.numel(); i < n; ++i) g[i] = float(g[i] * grad_scale);
    }
  r.grad_norm = clip_grad_norm(params_, max_grad_norm);
  if (std::isfinite(r.grad_norm)) {
    ++step_count;
    optim_->update(params_, step_count, lr);
    r.applied = true;
  }
  zero_grads();
  return r;
}

std::vector<Tensor> Session::run(const std::vector<Tensor>& inputs, const std::vector<int>& outputs) {
  std::vector<Shape> shapes(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) shapes[i] = inputs[i].shape;
  check_inputs(inputs, nullptr, false);
  Plan& plan = plan_for(shapes, false, outputs, &inputs);
  for (size_t i = 0; i < inputs.size(); ++i) {
    PYEDGE_CHECK(inputs[i].data || !plan.input_used(i), "input '",
                 model_->value_name(model_->inputs[i]), "' is required");
    plan.bind_input(i, inputs[i].data);
  }
  plan.run(false, 0, false);
  std::vector<Tensor> out;
  for (int v : outputs) out.push_back(plan.value(v));
  return out;
}

PlanStats Session::plan_stats(const std::vector<Shape>& input_shapes, bool training) {
  if (training && forward_only_) {  // what a zeroth-order step runs: forward to the loss
    PYEDGE_CHECK(loss_ >= 0, "this session has no loss: it can only run inference");
    return plan_for(input_shapes, false, std::vector<int>{loss_}).stats();
  }
  std::vector<int> targets = training ? std::vector<int>{} : model_->outputs;
  return plan_for(input_shapes, training, targets).stats();
}

}  // namespace pyedge
