// Pointwise activations, y = f(x), through the UnaryOp template (unary.h). Each kernel says
// whether its gradient reads the input or the output, so the planner frees the other early.
// The transcendental ones take their vector path (fv/dfv, kVector) from ops/unary_kernels.h;
// f/df here are the portable build's scalar form (fast_math.h, auto-vectorised).
#include <cmath>
#include <type_traits>

#include "common/simd.h"
#include "ops/fast_math.h"
#include "ops/unary.h"
#include "ops/unary_kernels.h"

namespace pyedge {
namespace {

using uk::kSqrt2OverPi;
using uk::kTwoOverSqrtPi;

// Relu: y > 0 <=> x > 0, so the gradient reads only the output. Gradient 0 at x == 0 (torch).
struct ReluK : CheapUnaryKernel {
  explicit ReluK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::sel(x < 0.f, 0.f, x); }  // NaN propagates
  float df(float, float y, float dy) const { return fm::sel(y > 0.f, dy, 0.f); }
};
PYEDGE_REGISTER_OP("Relu", UnaryOp<ReluK>);

// LeakyRelu: for alpha >= 0 the sign of y is the sign of x, so read y; else read x.
struct LeakyReluK : CheapUnaryKernel {
  float alpha;
  explicit LeakyReluK(const NodeInfo& n) : alpha(float(n.attrs.get_float("alpha", 0.01))) {
    reads_y = alpha >= 0.f;
    reads_x = !reads_y;
  }
  float f(float x) const { return fm::sel(x > 0.f, x, alpha * x); }
  float df(float x, float y, float dy) const {
    return fm::sel(fm::sel(reads_y, y, x) > 0.f, dy, alpha * dy);
  }
};
PYEDGE_REGISTER_OP("LeakyRelu", UnaryOp<LeakyReluK>);

struct SigmoidK : UnaryKernel, uk::Sigmoid {
  static constexpr bool kVector = true;
  explicit SigmoidK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::sigmoid(x); }
  float df(float, float y, float dy) const { return dy * y * (1.f - y); }
};
PYEDGE_REGISTER_OP("Sigmoid", UnaryOp<SigmoidK>);

struct TanhK : UnaryKernel, uk::Tanh {
  static constexpr bool kVector = true;
  explicit TanhK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::tanh(x); }
  float df(float, float y, float dy) const { return dy * (1.f - y * y); }
};
PYEDGE_REGISTER_OP("Tanh", UnaryOp<TanhK>);

struct ErfK : UnaryKernel, uk::Erf {
  static constexpr bool kVector = true;
  explicit ErfK(const NodeInfo&) {}
  float f(float x) const { return fm::erf(x); }
  float df(float x, float, float dy) const { return dy * kTwoOverSqrtPi * fm::exp(-x * x); }
};
PYEDGE_REGISTER_OP("Erf", UnaryOp<ErfK>);

// Gelu (opset 20): approximate = "none" (erf) or "tanh". Two kernels (no per-element branch on
// the mode); the Gelu op forwards to the one the attribute picks. The erf form's math
// (uk::GeluErf) is written once over a simd backend: simd::Native vectors on
// AVX2/AVX-512/NEON builds (kVector, unary.h), ScalarC (auto-vectorised in the clones) elsewhere.
struct GeluErfK : UnaryKernel, uk::GeluErf {
  explicit GeluErfK(const NodeInfo&) {}
  static constexpr bool kVector = true;
  float f(float x) const { return fv<uk::ScalarC>(x); }
  float df(float x, float, float dy) const { return dfv<uk::ScalarC>(x, 0.f, dy); }
};
struct GeluTanhK : UnaryKernel, uk::GeluTanh {
  static constexpr bool kVector = true;
  explicit GeluTanhK(const NodeInfo&) {}
  float f(float x) const {
    return 0.5f * x * (1.f + fm::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  }
  float df(float x, float, float dy) const {
    const float t = fm::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x));
    const float du = kSqrt2OverPi * (1.f + 3.f * 0.044715f * x * x);
    return dy * (0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du);
  }
};
class Gelu : public Op {
 public:
  Gelu(const NodeInfo& n, const std::vector<Tensor>& in) {
    const std::string a = n.attrs.get_string("approximate", "none");
    PYEDGE_CHECK(a == "none" || a == "tanh", n.where(),
                 ": approximate must be 'none' or 'tanh', got '", a, "'");
    if (a == "tanh") impl_.reset(new UnaryOp<GeluTanhK>(n, in));
    else impl_.reset(new UnaryOp<GeluErfK>(n, in));
    outputs = impl_->outputs;
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext& c) override {
    impl_->forward(in, out, c);
  }
  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return impl_->assigns_fresh_grads(); }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& c) override {
    impl_->backward(in, out, dout, din, c);
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return impl_->backward_reads_inputs(ng);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>& ng) const override {
    return impl_->backward_reads_outputs(ng);
  }

 private:
  std::unique_ptr<Op> impl_;
};
PYEDGE_REGISTER_OP("Gelu", Gelu);

// HardSigmoid: y = clamp(alpha*x + beta, 0, 1); gradient alpha strictly inside (torch).
struct HardSigmoidK : CheapUnaryKernel {
  float alpha, beta;
  explicit HardSigmoidK(const NodeInfo& n)
      : alpha(float(n.attrs.get_float("alpha", 0.2))), beta(float(n.attrs.get_float("beta", 0.5))) {}
  float f(float x) const {
    return fm::clampf(alpha * x + beta, 0.f, 1.f);
  }
  float df(float x, float, float dy) const {
    const float v = alpha * x + beta;
    return fm::sel((v > 0.f) & (v < 1.f), alpha * dy, 0.f);
  }
};
PYEDGE_REGISTER_OP("HardSigmoid", UnaryOp<HardSigmoidK>);

// HardSwish: y = x * clamp(x/6 + 1/2, 0, 1); gradient as torch (x/3 + 1/2 on [-3, 3]).
struct HardSwishK : CheapUnaryKernel {
  explicit HardSwishK(const NodeInfo&) {}
  float f(float x) const {
    return x * fm::clampf(x * (1.f / 6.f) + 0.5f, 0.f, 1.f);
  }
  float df(float x, float, float dy) const {
    return fm::sel(x < -3.f, 0.f, fm::sel(x <= 3.f, dy * (x * (1.f / 3.f) + 0.5f), dy));
  }
};
PYEDGE_REGISTER_OP("HardSwish", UnaryOp<HardSwishK>);

// Softplus: y = log(1 + e^x), computed as max(x, 0) + log1p(e^-|x|) (no overflow).
struct SoftplusK : UnaryKernel, uk::Softplus {
  static constexpr bool kVector = true;
  explicit SoftplusK(const NodeInfo&) {}
  float f(float x) const { return fm::sel(x > 0.f, x, 0.f) + fm::log1p(fm::exp(-std::fabs(x))); }
  float df(float x, float, float dy) const { return dy * fm::sigmoid(x); }
};
PYEDGE_REGISTER_OP("Softplus", UnaryOp<SoftplusK>);

// Elu: y = x (x > 0) else alpha*(e^x - 1). dy*(y + alpha) below 0 reads only y when alpha > 0.
struct EluK : UnaryKernel, uk::Elu {
  static constexpr bool kVector = true;
  explicit EluK(const NodeInfo& n) {
    alpha = float(n.attrs.get_float("alpha", 1.0));
    reads_y = grad_from_y = alpha > 0.f;
    reads_x = !reads_y;
  }
  float f(float x) const { return fm::sel(x > 0.f, x, alpha * fm::expm1(x)); }
  float df(float x, float y, float dy) const {
    if (reads_y) return fm::sel(y > 0.f, dy, dy * (y + alpha));
    return fm::sel(x > 0.f, dy, dy * alpha * fm::exp(x));
  }
};
PYEDGE_REGISTER_OP("Elu", UnaryOp<EluK>);

// Selu: gamma * (x > 0 ? x : alpha*(e^x - 1)).
struct SeluK : UnaryKernel, uk::Selu {
  static constexpr bool kVector = true;
  explicit SeluK(const NodeInfo& n) {
    alpha = float(n.attrs.get_float("alpha", 1.67326319217681884765625));
    gamma = float(n.attrs.get_float("gamma", 1.05070102214813232421875));
  }
  float f(float x) const { return gamma * fm::sel(x > 0.f, x, alpha * fm::expm1(x)); }
  float df(float x, float, float dy) const {
    return fm::sel(x > 0.f, gamma * dy, dy * gamma * alpha * fm::exp(x));
  }
};
PYEDGE_REGISTER_OP("Selu", UnaryOp<SeluK>);

// Softsign: x / (1 + |x|).
struct SoftsignK : CheapUnaryKernel {
  explicit SoftsignK(const NodeInfo&) {}
  float f(float x) const { return x / (1.f + std::fabs(x)); }
  float df(float x, float, float dy) const {
    const float d = 1.f + std::fabs(x);
    return dy / (d * d);
  }
};
PYEDGE_REGISTER_OP("Softsign", UnaryOp<SoftsignK>);

}  // namespace
}  // namespace pyedge
