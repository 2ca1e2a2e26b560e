// Pointwise math: Sqrt, Exp, Log, Reciprocal, Sin, Cos, Neg, Abs, Sign, Floor, Ceil, Round,
// and Clip (bounds as attributes before opset 11, as optional scalar inputs after).
#include <cmath>
#include <limits>

#include "ops/fast_math.h"
#include "ops/unary.h"
#include "ops/unary_kernels.h"

namespace pyedge {
namespace {

struct SqrtK : CheapUnaryKernel {
  explicit SqrtK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return std::sqrt(x); }
  float df(float, float y, float dy) const { return dy * 0.5f / y; }
};
PYEDGE_REGISTER_OP("Sqrt", UnaryOp<SqrtK>);

struct ExpK : UnaryKernel, uk::Exp {
  static constexpr bool kVector = true;  // vector path: ops/unary_kernels.h
  explicit ExpK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return fm::exp(x); }
  float df(float, float y, float dy) const { return dy * y; }
};
PYEDGE_REGISTER_OP("Exp", UnaryOp<ExpK>);

struct LogK : UnaryKernel, uk::Log {
  static constexpr bool kVector = true;
  explicit LogK(const NodeInfo&) {}
  float f(float x) const { return fm::log(x); }
  float df(float x, float, float dy) const { return dy / x; }
};
PYEDGE_REGISTER_OP("Log", UnaryOp<LogK>);

struct ReciprocalK : CheapUnaryKernel {
  explicit ReciprocalK(const NodeInfo&) { reads_x = false, reads_y = true; }
  float f(float x) const { return 1.f / x; }
  float df(float, float y, float dy) const { return -dy * y * y; }
};
PYEDGE_REGISTER_OP("Reciprocal", UnaryOp<ReciprocalK>);

struct SinK : UnaryKernel {
  explicit SinK(const NodeInfo&) {}
  float f(float x) const { return std::sin(x); }
  float df(float x, float, float dy) const { return dy * std::cos(x); }
};
PYEDGE_REGISTER_OP("Sin", UnaryOp<SinK>);

struct CosK : UnaryKernel {
  explicit CosK(const NodeInfo&) {}
  float f(float x) const { return std::cos(x); }
  float df(float x, float, float dy) const { return -dy * std::sin(x); }
};
PYEDGE_REGISTER_OP("Cos", UnaryOp<CosK>);

// Neg, Abs, Sign: also for float64/int64/int32 (shape arithmetic).
struct NegK : CheapUnaryKernel {
  static constexpr bool kNumeric = true;
  explicit NegK(const NodeInfo&) { reads_x = false; }
  template <typename T> T f(T x) const { return T(-x); }
  float df(float, float, float dy) const { return -dy; }
};
PYEDGE_REGISTER_OP("Neg", UnaryOp<NegK>);

// Abs: gradient sign(x), 0 at x == 0 (torch).
struct AbsK : CheapUnaryKernel {
  static constexpr bool kNumeric = true;
  explicit AbsK(const NodeInfo&) {}
  template <typename T> T f(T x) const { return x < T(0) ? T(-x) : x; }
  float df(float x, float, float dy) const { return fm::sel(x > 0.f, dy, fm::sel(x < 0.f, -dy, 0.f)); }
};
PYEDGE_REGISTER_OP("Abs", UnaryOp<AbsK>);

struct SignK : CheapUnaryKernel {
  static constexpr bool kNumeric = true;
  static constexpr bool kGrad = false;
  explicit SignK(const NodeInfo&) {}
  template <typename T> T f(T x) const { return T((x > T(0)) - (x < T(0))); }
  float df(float, float, float) const { return 0.f; }
};
PYEDGE_REGISTER_OP("Sign", UnaryOp<SignK>);

// Floor, Ceil, Round: piecewise constant; no backward (the gradient would be zero).
struct FloorK : CheapUnaryKernel {
  static constexpr bool kGrad = false;
  explicit FloorK(const NodeInfo&) {}
  float f(float x) const { return std::floor(x); }
  float df(float, float, float) const { return 0.f; }
};
PYEDGE_REGISTER_OP("Floor", UnaryOp<FloorK>);

struct CeilK : CheapUnaryKernel {
  static constexpr bool kGrad = false;
  explicit CeilK(const NodeInfo&) {}
  float f(float x) const { return std::ceil(x); }
  float df(float, float, float) const { return 0.f; }
};
PYEDGE_REGISTER_OP("Ceil", UnaryOp<CeilK>);

// Round: halves to even, as ONNX specifies.
struct RoundK : CheapUnaryKernel {
  static constexpr bool kGrad = false;
  explicit RoundK(const NodeInfo&) {}
  float f(float x) const { return std::nearbyint(x); }
  float df(float, float, float) const { return 0.f; }
};
PYEDGE_REGISTER_OP("Round", UnaryOp<RoundK>);

// Clip(x, min?, max?): y = min(max(x, lo), hi). Gradient passes where lo <= x <= hi (torch).
class Clip : public Op {
 public:
  Clip(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, n.opset >= 11 ? 3 : 1);
    DType t = in[0].dtype;
    PYEDGE_CHECK(t == DType::f32 || t == DType::f64 || t == DType::i64 || t == DType::i32,
                 n.where(), ": input must be float32, float64, int64 or int32, got ", dtype_name(t));
    if (n.opset < 11) {
      attr_lo_ = n.attrs.get_float("min", -std::numeric_limits<double>::infinity());
      attr_hi_ = n.attrs.get_float("max", std::numeric_limits<double>::infinity());
    }
    for (size_t i = 1; i < in.size(); ++i) {
      if (!n.has_input(i)) continue;
      PYEDGE_CHECK(in[i].numel() == 1, n.where(), ": ", i == 1 ? "min" : "max",
                   " must be a scalar, got shape ", shape_str(in[i].shape));
      PYEDGE_CHECK(in[i].dtype == t, n.where(), ": ", i == 1 ? "min" : "max", " must be ",
                   dtype_name(t), " like the input, got ", dtype_name(in[i].dtype));
      (i == 1 ? has_lo_ : has_hi_) = true;
    }
    outputs = {make_output(t, in[0].shape)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    dispatch_type(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, uint8_t>) {
        T lo, hi;
        bounds<T>(in, lo, hi);
        const T* x = in[0].ptr<T>();
        T* y = out[0].ptr<T>();
        parallel_for(in[0].numel(), 1 << 15, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const T v = fm::pick(x[i] < lo, lo, x[i]);
            y[i] = fm::pick(v > hi, hi, v);
          }
        });
      }
    });
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0 && Op::differentiable_input(0); }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    float lo, hi;
    bounds<float>(in, lo, hi);
    const float* x = in[0].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    parallel_for(in[0].numel(), 1 << 15, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dx[i] += fm::sel((x[i] >= lo) & (x[i] <= hi), dy[i], 0.f);
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = true;
    if (r.size() > 1) r[1] = has_lo_;
    if (r.size() > 2) r[2] = has_hi_;
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

 private:
  template <typename T>
  void bounds(const std::vector<Tensor>& in, T& lo, T& hi) const {
    lo = std::numeric_limits<T>::lowest();
    hi = std::numeric_limits<T>::max();
    if (has_lo_) lo = raw<const T>(in[1])[0];
    if (has_hi_) hi = raw<const T>(in[2])[0];
    if constexpr (std::is_floating_point_v<T>) {  // opset < 11 attributes
      if (attr_lo_ > -std::numeric_limits<double>::infinity()) lo = T(attr_lo_);
      if (attr_hi_ < std::numeric_limits<double>::infinity()) hi = T(attr_hi_);
    }
  }
  bool has_lo_ = false, has_hi_ = false;
  double attr_lo_ = -std::numeric_limits<double>::infinity();
  double attr_hi_ = std::numeric_limits<double>::infinity();
};
PYEDGE_REGISTER_OP("Clip", Clip);

}  // namespace
}  // namespace pyedge
