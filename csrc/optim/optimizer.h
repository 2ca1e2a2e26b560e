// Optimizers as plan-level steps over the trainable parameters only: frozen tensors have no
// gradient and no optimizer state.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace pyedge {

struct OptimizerConfig {
  // "adamw" | "sgd" | "none": forward-only (zeroth-order training, pyedge/mezo.py, updates
  // the parameters itself): no gradient buffers, no optimizer state, no backward plans.
  std::string kind = "adamw";
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;   // AdamW: decoupled; SGD: L2 added to the gradient (as torch)
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
};

// A trainable tensor with its gradient and optimizer state, all owned here.
struct Parameter {
  std::string name;
  int value_id = -1;
  Buffer value_store, grad_store;
  Tensor value, grad;
  std::vector<Buffer> state_store;
  std::vector<Tensor> state;  // AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer
  // This tensor's learning rate is lr · lr_scale (LoRA+ trains B faster than A: a torch
  // parameter group per factor). AdamW's decoupled decay uses the scaled rate too, as torch.
  double lr_scale = 1.0;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual std::vector<std::string> state_names() const = 0;
  // One update with the gradients in p.grad; `step` counts from 1.
  virtual void update(std::vector<Parameter>& params, int64_t step, double lr) = 0;
};

std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& cfg);

// Global L2 norm over all gradients (float64 accumulation); scales them to max_norm when
// larger, as torch.nn.utils.clip_grad_norm_ does. Returns the norm before clipping.
double clip_grad_norm(std::vector<Parameter>& params, double max_norm);

}  // namespace pyedge
