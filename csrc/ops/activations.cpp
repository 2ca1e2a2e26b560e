// Pointwise activations, y = f(x), through the UnaryOp template (unary.h). Each kernel says
// whether its gradient reads the input or the output, so the planner frees the other early.
#include <cmath>
#include <type_traits>

#include "common/simd.h"
#include "ops/fast_math.h"
#include "ops/unary.h"

namespace pyedge {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/sqrt(2*pi)
constexpr float kTwoOverSqrtPi = 1.1283791670955126f;

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

struct SigmoidK : UnaryKernel {
  explicit SigmoidK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::sigmoid(x); }
  float df(float, float y, float dy) const { return dy * y * (1.f - y); }
};
PYEDGE_REGISTER_OP("Sigmoid", UnaryOp<SigmoidK>);

struct TanhK : UnaryKernel {
  explicit TanhK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::tanh(x); }
  float df(float, float y, float dy) const { return dy * (1.f - y * y); }
};
PYEDGE_REGISTER_OP("Tanh", UnaryOp<TanhK>);

struct ErfK : UnaryKernel {
  explicit ErfK(const NodeInfo&) {}
  float f(float x) const { return fm::erf(x); }
  float df(float x, float, float dy) const { return dy * kTwoOverSqrtPi * fm::exp(-x * x); }
};
PYEDGE_REGISTER_OP("Erf", UnaryOp<ErfK>);

// simd::Scalar with fma(a, b, c) = a·b + c: an FMA instruction where the target or clone has
// one (GCC contracts it), never a libm fma() call (slow without hardware FMA). For kernels
// written over simd backends whose scalar form must auto-vectorise.
struct ScalarC : simd::Scalar {
  static PYEDGE_SIMD_INLINE float fma(float a, float b, float c) { return a * b + c; }
};

// 2^v for v <= 0 on simd vectors: 0 below -125 (where 2^v would come close to denormals),
// NaN for NaN. Base 2 saves simd::exp's ln2 reduction (n = round(v), f = v - n is exact) and
// it has no overflow side (one clamp, not two clamps and two selects). 2^f on [-1/2, 1/2]:
// degree-6 polynomial fitted to relative error (1.9e-9; ~8e-8 after float32 rounding).
template <class S>
PYEDGE_SIMD_INLINE typename S::V exp2_le0(typename S::V v) {
  using V = typename S::V;
  const V lo = S::set1(-125.f);
  const V vc = S::max(lo, v);  // x86 max returns its second operand for NaN: keeps it
  auto poly = [](V f) {
    V p = S::set1(1.534573530e-4f);
    p = S::fma(p, f, S::set1(1.339993090e-3f));
    p = S::fma(p, f, S::set1(9.618489072e-3f));
    p = S::fma(p, f, S::set1(5.550328642e-2f));
    p = S::fma(p, f, S::set1(2.402264625e-1f));
    p = S::fma(p, f, S::set1(6.931471825e-1f));
    return S::fma(p, f, S::set1(1.f));
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<S, simd::Avx512>) {
    // n by one rounding instruction; p·2^n and the zeroing below lo by one masked vscalefps
    const V nf = _mm512_roundscale_ps(vc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ);  // v >= lo, or NaN
    return _mm512_maskz_scalef_ps(keep, poly(S::sub(vc, nf)), nf);
  }
#endif
  const V magic = S::set1(12582912.f);  // round to nearest by 1.5·2^23
  const V nf = S::sub(S::add(vc, magic), magic);
  const V p = S::mul(poly(S::sub(vc, nf)), S::pow2n(nf));  // n in [-125, 0]
  return S::select(S::lt(v, lo), S::set1(0.f), p);
}

// Gelu (opset 20): approximate = "none" (erf) or "tanh". Two kernels (no per-element branch on
// the mode); the Gelu op forwards to the one the attribute picks.
struct GeluErfK : UnaryKernel {
  explicit GeluErfK(const NodeInfo&) {}
  // Phi(x) = 1/2 + copysign(1/2 − h, x) with h = erfc(a)/2, a = |x|/√2, by Abramowitz &
  // Stegun 7.1.26 alone (|error| <= 1.5e-7; fm::erf's series for small |x| keeps a relative
  // accuracy 1 + erf does not need): h = f(a)·e^(−a²)/2. Its exponential is GELU's density
  // term, so the backward evaluates one. With b = |x|·sqrt(log2(e)/2), e^(−a²)/2 = 2^(−b²−1)
  // (exp2_le0: no ln2 reduction, no overflow side; the 1/2 for free) and a = b/sqrt(log2 e)
  // folded into the rational's constant. A true division for t: a reciprocal estimate +
  // Newton step was no faster on Zen 5, and its last-bit error grows ~3x through f.
  // Written once over a simd backend: simd::Native vectors on AVX2/AVX-512/NEON builds
  // (kVector, unary.h), ScalarC (auto-vectorised in the clones) elsewhere.
  template <class S>
  static PYEDGE_SIMD_INLINE typename S::V cdf(typename S::V x, typename S::V& eh) {
    using V = typename S::V;
    const V b = S::mul(S::abs(x), S::set1(0.8493218002880191f));
    eh = exp2_le0<S>(S::sub(S::set1(-1.f), S::mul(b, b)));  // e^(−x²/2)/2
    // b <= 11.17 (a <= 9.3) keeps the divisor finite (x = inf, NaN); beyond, h < 2^-26
    const V one = S::set1(1.f), half = S::set1(0.5f);
    const V t = S::div(one, S::fma(S::set1(0.2727374808792225f),  // 0.3275911/sqrt(log2 e)
                                   S::min(b, S::set1(11.17f)), one));
    const V h = S::mul(simd::erfc_as_factor_t<S>(t), eh);
    return S::add(half, S::copysign(S::sub(half, h), x));
  }
  // dx = dy·(Phi + x·e^(−x²/2)/√(2π))
  template <class S>
  static PYEDGE_SIMD_INLINE typename S::V dcdf(typename S::V x, typename S::V dy) {
    typename S::V eh;
    const typename S::V c = cdf<S>(x, eh);
    return S::mul(dy, S::fma(S::mul(x, eh), S::set1(2.f * kInvSqrt2Pi), c));
  }
  static constexpr bool kVector = true;
  template <class S>
  PYEDGE_SIMD_INLINE typename S::V fv(typename S::V x) const {
    typename S::V eh;
    return S::mul(x, cdf<S>(x, eh));
  }
  template <class S>
  PYEDGE_SIMD_INLINE typename S::V dfv(typename S::V x, typename S::V, typename S::V dy) const {
    return dcdf<S>(x, dy);
  }
  float f(float x) const { return fv<ScalarC>(x); }
  float df(float x, float, float dy) const { return dcdf<ScalarC>(x, dy); }
};
struct GeluTanhK : UnaryKernel {
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
struct SoftplusK : UnaryKernel {
  explicit SoftplusK(const NodeInfo&) {}
  float f(float x) const { return fm::sel(x > 0.f, x, 0.f) + fm::log1p(fm::exp(-std::fabs(x))); }
  float df(float x, float, float dy) const { return dy * fm::sigmoid(x); }
};
PYEDGE_REGISTER_OP("Softplus", UnaryOp<SoftplusK>);

// Elu: y = x (x > 0) else alpha*(e^x - 1). dy*(y + alpha) below 0 reads only y when alpha > 0.
struct EluK : UnaryKernel {
  float alpha;
  explicit EluK(const NodeInfo& n) : alpha(float(n.attrs.get_float("alpha", 1.0))) {
    reads_y = alpha > 0.f;
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
struct SeluK : UnaryKernel {
  float alpha, gamma;
  explicit SeluK(const NodeInfo& n)
      : alpha(float(n.attrs.get_float("alpha", 1.67326319217681884765625))),
        gamma(float(n.attrs.get_float("gamma", 1.05070102214813232421875))) {}
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
