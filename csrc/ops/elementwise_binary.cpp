// Binary arithmetic with numpy broadcasting: Add, Sub, Mul, Div, Pow, Mod (two inputs) and the
// variadic Sum, Mean, Min, Max (1..N inputs). Forward for float32/float64/int64/int32 (integer
// paths are exact: plan-time shape arithmetic runs through them); backward for float32, where
// each input's gradient is summed over the dims it was broadcast along (ReducePlan).
#include <cmath>
#include <type_traits>

#include "ops/broadcast.h"
#include "ops/fast_math.h"

namespace pyedge {
namespace {

constexpr int64_t kCheapGrain = 1 << 15;
constexpr int64_t kCostlyGrain = 1 << 12;

bool is_numeric(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::i64 || t == DType::i32;
}

// Integer arithmetic wraps (two's complement) instead of being undefined on overflow.
template <typename T> inline T add_(T a, T b) {
  if constexpr (std::is_integral_v<T>) return T(std::make_unsigned_t<T>(a) + std::make_unsigned_t<T>(b));
  else return a + b;
}
template <typename T> inline T sub_(T a, T b) {
  if constexpr (std::is_integral_v<T>) return T(std::make_unsigned_t<T>(a) - std::make_unsigned_t<T>(b));
  else return a - b;
}
template <typename T> inline T mul_(T a, T b) {
  if constexpr (std::is_integral_v<T>) return T(std::make_unsigned_t<T>(a) * std::make_unsigned_t<T>(b));
  else return a * b;
}
// Integer division truncates (C, onnxruntime); x/0 gives 0 instead of a crash.
template <typename T> inline T div_(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    if (b == 0) return 0;
    if (b == -1) return sub_<T>(0, a);
    return a / b;
  } else {
    return a / b;
  }
}
// Mod: fmod=1 -> sign of the dividend (C fmod); fmod=0 -> sign of the divisor (Python).
template <typename T> inline T mod_(T a, T b, bool c_style) {
  if constexpr (std::is_integral_v<T>) {
    if (b == 0 || b == -1) return 0;
    T r = a % b;
    if (!c_style && r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
  } else {
    return std::fmod(a, b);
  }
}
// Pow: float base in its own precision; integer base with an integer exponent is exact.
template <typename T, typename E> inline T pow_(T a, E b) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::pow(a, T(b));
  } else if constexpr (std::is_integral_v<E>) {
    if (b < 0) return a == 1 ? 1 : (a == -1 ? ((b & 1) ? -1 : 1) : 0);
    T r = 1, base = a;
    for (E e = b; e > 0; e >>= 1) {
      if (e & 1) r = mul_(r, base);
      base = mul_(base, base);
    }
    return r;
  } else {
    return T(std::pow(double(a), double(b)));
  }
}
// Min/Max propagate NaN (onnxruntime and torch do).
template <typename T> inline T max_(T a, T b) {
  const T r = fm::pick(a < b, b, a);
  return fm::pick(b != b, b, r);
}
template <typename T> inline T min_(T a, T b) {
  const T r = fm::pick(b < a, b, a);
  return fm::pick(b != b, b, r);
}

// out = f(a, b) with a and b of possibly different element types (Pow's exponent).
template <typename A, typename B, typename R, typename F>
void broadcast_mixed(const Broadcast& bc, const A* a, const B* b, R* out, int64_t grain, F f) {
  const int64_t sa = bc.inner_stride(0), sb = bc.inner_stride(1);
  bc.for_runs(grain, [&](const int64_t* off, int64_t oo, int64_t n) {
    R* o = out + oo;
    visit2(n, a + off[0], sa, b + off[1], sb, [&](int64_t i, A x, B y) { o[i] = f(x, y); });
  });
}

// Gradient of one input of a two-input op: dst += reduce(g(a, b, dy)). g's output-shaped
// values go straight into dst when that input is not broadcast, else through `scratch`
// (numel(out) floats) and a ReducePlan. a/b are read only when use_a/use_b (else 0 is passed).
template <typename B, typename G>
void binary_grad(const Broadcast& bc, const ReducePlan& red, const float* a, bool use_a,
                 const B* b, bool use_b, const float* dy, float* dst, float* scratch,
                 int64_t grain, G g, bool assign = false) {
  static const float zero_a = 0.f;
  static const B zero_b = B(0);
  const bool direct = red.identity();
  float* target = direct ? dst : scratch;
  const int64_t sa = use_a ? bc.inner_stride(0) : 0, sb = use_b ? bc.inner_stride(1) : 0;
  bc.for_runs(grain, [&](const int64_t* off, int64_t oo, int64_t n) {
    const float* pa = use_a ? a + off[0] : &zero_a;
    const B* pb = use_b ? b + off[1] : &zero_b;
    const float* pdy = dy + oo;
    float* pt = target + oo;
    if (direct && !assign)
      visit2(n, pa, sa, pb, sb, [&](int64_t i, float x, B y) { pt[i] += g(x, float(y), pdy[i]); });
    else
      visit2(n, pa, sa, pb, sb, [&](int64_t i, float x, B y) { pt[i] = g(x, float(y), pdy[i]); });
  });
  if (!direct) red.accumulate(scratch, dst, 1.f, assign);
}

enum class Kind { add, sub, mul, div, pow, mod };

class Binary : public Op {
 public:
  Binary(const NodeInfo& n, const std::vector<Tensor>& in, Kind kind) : kind_(kind) {
    check_num_inputs(n, in, 2, 2);
    const DType ta = in[0].dtype, tb = in[1].dtype;
    PYEDGE_CHECK(is_numeric(ta), n.where(), ": input A must be float32, float64, int64 or int32, got ",
                 dtype_name(ta));
    if (kind == Kind::pow) {
      PYEDGE_CHECK(is_numeric(tb), n.where(), ": exponent must be numeric, got ", dtype_name(tb));
    } else {
      PYEDGE_CHECK(ta == tb, n.where(), ": inputs must have the same dtype, got ", dtype_name(ta),
                   " and ", dtype_name(tb));
    }
    if (kind == Kind::mod) {
      c_mod_ = n.attrs.get_int("fmod", 0) != 0;
      PYEDGE_CHECK(c_mod_ || !is_float(ta), n.where(),
                   ": floating-point Mod needs attribute fmod=1 (ONNX)");
    }
    Shape out = broadcast_shapes(n, {in[0].shape, in[1].shape});
    bc_ = Broadcast(n, {in[0].shape, in[1].shape}, out);
    red_[0] = ReducePlan(out, in[0].shape);
    red_[1] = ReducePlan(out, in[1].shape);
    outputs = {make_output(ta, out)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    if (kind_ == Kind::pow) return forward_pow(in, out);
    dispatch_type(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, uint8_t>) {
        const T* a = in[0].ptr<T>();
        const T* b = in[1].ptr<T>();
        T* o = out[0].ptr<T>();
        switch (kind_) {
          case Kind::add: broadcast_binary(bc_, a, b, o, kCheapGrain, [](T x, T y) { return add_<T>(x, y); }); break;
          case Kind::sub: broadcast_binary(bc_, a, b, o, kCheapGrain, [](T x, T y) { return sub_<T>(x, y); }); break;
          case Kind::mul: broadcast_binary(bc_, a, b, o, kCheapGrain, [](T x, T y) { return mul_<T>(x, y); }); break;
          case Kind::div: broadcast_binary(bc_, a, b, o, kCheapGrain, [](T x, T y) { return div_<T>(x, y); }); break;
          case Kind::mod: {
            const bool c = c_mod_;
            broadcast_binary(bc_, a, b, o, kCostlyGrain, [c](T x, T y) { return mod_<T>(x, y, c); });
            break;
          }
          case Kind::pow: break;
        }
      }
    });
  }

  bool has_backward() const override { return kind_ != Kind::mod; }
  bool assigns_fresh_grads() const override { return true; }
  // x + b (or x - b) with b frozen and x not broadcast: dX is dY.
  int passthrough_input(const std::vector<bool>& need) const override {
    if (need.size() < 2 || (kind_ != Kind::add && kind_ != Kind::sub)) return -1;
    if (need[0] && !need[1] && red_[0].identity()) return 0;
    if (kind_ == Kind::add && need[1] && !need[0] && red_[1].identity()) return 1;
    return -1;
  }
  bool both_grads_are_dy(const std::vector<bool>& need) const override {
    return kind_ == Kind::add && need.size() == 2 && need[0] && need[1] &&
           red_[0].identity() && red_[1].identity();
  }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* da = din[0].data ? din[0].ptr<float>() : nullptr;
    float* db = din[1].data ? din[1].ptr<float>() : nullptr;
    float* s = static_cast<float*>(ctx.scratch);
    const bool fa = ctx.fresh(0), fb = ctx.fresh(1);  // assign instead of add
    switch (kind_) {
      case Kind::add:
      case Kind::sub:
        if (da) red_[0].accumulate(dy, da, 1.f, fa);
        if (db) red_[1].accumulate(dy, db, kind_ == Kind::sub ? -1.f : 1.f, fb);
        return;
      case Kind::mul: {
        const float* a = db ? in[0].ptr<float>() : nullptr;
        const float* b = da ? in[1].ptr<float>() : nullptr;
        if (da) grad(0, fa, a, false, b, true, dy, da, s, [](float, float y, float g) { return g * y; });
        if (db) grad(1, fb, a, true, b, false, dy, db, s, [](float x, float, float g) { return g * x; });
        return;
      }
      case Kind::div: {
        const float* b = in[1].ptr<float>();
        const float* a = db ? in[0].ptr<float>() : nullptr;
        if (da) grad(0, fa, a, false, b, true, dy, da, s, [](float, float y, float g) { return g / y; });
        if (db)
          grad(1, fb, a, true, b, true, dy, db, s, [](float x, float y, float g) { return -g * x / (y * y); });
        return;
      }
      case Kind::pow: return backward_pow(in, dy, da, db, s, fa, fb);
      case Kind::mod: return;
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    const bool ga = ng.size() > 0 && ng[0], gb = ng.size() > 1 && ng[1];
    switch (kind_) {
      case Kind::add: case Kind::sub: case Kind::mod: return {false, false};
      case Kind::mul: return {gb, ga};
      case Kind::div: return {gb, ga || gb};
      case Kind::pow: return {true, true};
    }
    return {true, true};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    if (kind_ == Kind::add || kind_ == Kind::sub) return 0;
    bool need = false;
    for (size_t k = 0; k < 2 && k < ng.size(); ++k) need = need || (ng[k] && !red_[k].identity());
    return need ? size_t(bc_.total) * sizeof(float) : 0;
  }

 private:
  // Gradient of input k into dst (assigned when `fresh`, see RunContext::fresh_din).
  template <typename B, typename G>
  void grad(int k, bool fresh, const float* a, bool use_a, const B* b, bool use_b,
            const float* dy, float* dst, float* scratch, G g) const {
    binary_grad(bc_, red_[k], a, use_a, b, use_b, dy, dst, scratch,
                kind_ == Kind::pow ? kCostlyGrain : kCheapGrain, g, fresh);
  }

  void forward_pow(const std::vector<Tensor>& in, const std::vector<Tensor>& out) const {
    dispatch_type(in[0].dtype, [&](auto ta) {
      using T = decltype(ta);
      dispatch_type(in[1].dtype, [&](auto tb) {
        using E = decltype(tb);
        if constexpr (!std::is_same_v<T, uint8_t> && !std::is_same_v<E, uint8_t>) {
          const T* a = in[0].ptr<T>();
          const E* b = in[1].ptr<E>();
          T* o = out[0].ptr<T>();
          const int64_t n = out[0].numel();
          if constexpr (std::is_floating_point_v<T>) {
            // Scalar exponent over a non-broadcast base (x^2 in decomposed LayerNorm): no pow().
            if (in[1].numel() == 1 && in[0].numel() == n) {
              const double e = double(b[0]);
              if (e == 2.0 || e == 3.0 || e == 1.0 || e == 0.5 || e == -1.0) {
                parallel_for(n, kCheapGrain, [&](int64_t lo, int64_t hi) {
                  if (e == 2.0) for (int64_t i = lo; i < hi; ++i) o[i] = a[i] * a[i];
                  else if (e == 3.0) for (int64_t i = lo; i < hi; ++i) o[i] = a[i] * a[i] * a[i];
                  else if (e == 1.0) for (int64_t i = lo; i < hi; ++i) o[i] = a[i];
                  else if (e == 0.5) for (int64_t i = lo; i < hi; ++i) o[i] = std::sqrt(a[i]);
                  else for (int64_t i = lo; i < hi; ++i) o[i] = T(1) / a[i];
                });
                return;
              }
            }
          }
          broadcast_mixed(bc_, a, b, o, kCostlyGrain, [](T x, E y) { return pow_<T, E>(x, y); });
        }
      });
    });
  }

  // torch: dA = dy * b * a^(b-1) (0 where b == 0); dB = dy * a^b * log(a) (0 where a == 0, b >= 0).
  void backward_pow(const std::vector<Tensor>& in, const float* dy, float* da, float* db,
                    float* s, bool fa, bool fb) const {
    const float* a = in[0].ptr<float>();
    dispatch_type(in[1].dtype, [&](auto tb) {
      using E = decltype(tb);
      if constexpr (!std::is_same_v<E, uint8_t>) {
        const E* b = in[1].ptr<E>();
        if (da) {
          const double e = double(b[0]);
          if (in[1].numel() == 1 && red_[0].identity() && (e == 2.0 || e == 3.0)) {
            // d(x^2) = 2x, d(x^3) = 3x^2: no pow() per element (GPT-2's GELU cubes x)
            parallel_for(bc_.total, kCheapGrain, [&](int64_t lo, int64_t hi) {
              for (int64_t i = lo; i < hi; ++i) {
                const float g = e == 2.0 ? 2.f * a[i] * dy[i] : 3.f * a[i] * a[i] * dy[i];
                da[i] = fa ? g : da[i] + g;
              }
            });
          } else {
            grad(0, fa, a, true, b, true, dy, da, s, [](float x, float y, float g) {
              return y == 0.f ? 0.f : g * y * std::pow(x, y - 1.f);
            });
          }
        }
        if constexpr (std::is_same_v<E, float>) {
          if (db)
            grad(1, fb, a, true, b, true, dy, db, s, [](float x, float y, float g) {
              return (x == 0.f && y >= 0.f) ? 0.f : g * std::pow(x, y) * std::log(x);
            });
        }
      }
    });
  }

  Kind kind_;
  bool c_mod_ = false;
  Broadcast bc_;
  ReducePlan red_[2];
};

template <Kind K>
struct BinaryOf : Binary {
  BinaryOf(const NodeInfo& n, const std::vector<Tensor>& in) : Binary(n, in, K) {}
};
PYEDGE_REGISTER_OP("Add", BinaryOf<Kind::add>);
PYEDGE_REGISTER_OP("Sub", BinaryOf<Kind::sub>);
PYEDGE_REGISTER_OP("Mul", BinaryOf<Kind::mul>);
PYEDGE_REGISTER_OP("Div", BinaryOf<Kind::div>);
PYEDGE_REGISTER_OP("Pow", BinaryOf<Kind::pow>);
PYEDGE_REGISTER_OP("Mod", BinaryOf<Kind::mod>);

// Variadic Sum / Mean / Min / Max over 1..N broadcast inputs. Forward: out = in0 (op) in1, then
// out = out (op) in_k in place. Min/Max gradient goes to the inputs equal to the result, split
// evenly among ties (torch.maximum for two inputs; torch.stack(..).amax(0) for N).
enum class VKind { sum, mean, min, max };

class Variadic : public Op {
 public:
  Variadic(const NodeInfo& n, const std::vector<Tensor>& in, VKind kind) : kind_(kind) {
    PYEDGE_CHECK(!in.empty(), n.where(), " needs at least one input");
    const DType t = in[0].dtype;
    const bool float_only = kind == VKind::mean;
    PYEDGE_CHECK(float_only ? is_float(t) : is_numeric(t), n.where(), ": inputs must be ",
                 float_only ? "float32 or float64" : "float32, float64, int64 or int32", ", got ",
                 dtype_name(t));
    std::vector<Shape> shapes;
    for (size_t i = 0; i < in.size(); ++i) {
      PYEDGE_CHECK(n.has_input(i), n.where(), ": input ", i, " is missing");
      PYEDGE_CHECK(in[i].dtype == t, n.where(), ": all inputs must have the same dtype; input ", i,
                   " is ", dtype_name(in[i].dtype), ", input 0 is ", dtype_name(t));
      shapes.push_back(in[i].shape);
    }
    Shape out = broadcast_shapes(n, shapes);
    if (in.size() >= 2) first_ = Broadcast(n, {shapes[0], shapes[1]}, out);
    for (size_t i = 0; i < in.size(); ++i) {
      per_input_.push_back(Broadcast(n, {shapes[i], out}, out));  // (input i, output)
      red_.push_back(ReducePlan(out, shapes[i]));
    }
    outputs = {make_output(t, out)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    dispatch_type(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, uint8_t>) {
        T* o = out[0].ptr<T>();
        if (in.size() == 1) {
          broadcast_copy(per_input_[0], in[0].ptr<T>(), o);
        } else {
          combine<T>(first_, in[0].ptr<T>(), in[1].ptr<T>(), o);
          for (size_t k = 2; k < in.size(); ++k) {
            // plan (input k, output): swap operands so the output is read as `a`
            const Broadcast& p = per_input_[k];
            combine_into<T>(p, in[k].ptr<T>(), o);
          }
        }
        if constexpr (std::is_floating_point_v<T>) {
          if (kind_ == VKind::mean) {
            const T inv = T(1) / T(in.size());
            parallel_for(out[0].numel(), kCheapGrain, [&](int64_t b, int64_t e) {
              for (int64_t i = b; i < e; ++i) o[i] *= inv;
            });
          }
        }
      }
    });
  }

  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    const size_t n = in.size();
    if (kind_ == VKind::sum || kind_ == VKind::mean) {
      const float alpha = kind_ == VKind::mean ? 1.f / float(n) : 1.f;
      for (size_t k = 0; k < n; ++k)
        if (din[k].data) red_[k].accumulate(dy, din[k].ptr<float>(), alpha);
      return;
    }
    // Min/Max: count[i] = number of inputs equal to y[i]; dx_k = dy * (x_k == y) / count.
    const float* y = out[0].ptr<float>();
    const int64_t total = out[0].numel();
    float* count = static_cast<float*>(ctx.scratch);
    float* g = count + total;
    parallel_for(total, kCheapGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) count[i] = 0.f;
    });
    for (size_t k = 0; k < n; ++k) {
      const float* x = in[k].ptr<float>();
      binary_grad(per_input_[k], ReducePlan(), x, true, y, true, dy, count, nullptr, kCheapGrain,
                  [](float xv, float yv, float) { return fm::sel(xv == yv, 1.f, 0.f); });
    }
    for (size_t k = 0; k < n; ++k) {
      if (!din[k].data) continue;
      const float* x = in[k].ptr<float>();
      const float* c = count;
      // g = dy * [x == y] / count, written output-shaped, then reduced to input k
      const bool direct = red_[k].identity();
      float* dst = din[k].ptr<float>();
      float* target = direct ? dst : g;
      const int64_t sx = per_input_[k].inner_stride(0);
      per_input_[k].for_runs(kCheapGrain, [&](const int64_t* off, int64_t oo, int64_t len) {
        const float* py = y + oo;
        const float* pdy = dy + oo;
        const float* pc = c + oo;
        float* pt = target + oo;
        visit2(len, x + off[0], sx, py, 1, [&](int64_t i, float xv, float yv) {
          const float v = fm::sel(xv == yv, pdy[i] / pc[i], 0.f);
          if (direct) pt[i] += v;
          else pt[i] = v;
        });
      });
      if (!direct) red_[k].accumulate(g, dst);
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    const bool minmax = kind_ == VKind::min || kind_ == VKind::max;
    return std::vector<bool>(ng.size(), minmax);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {kind_ == VKind::min || kind_ == VKind::max};
  }
  size_t backward_scratch_bytes(const std::vector<bool>&) const override {
    if (kind_ == VKind::sum || kind_ == VKind::mean) return 0;
    return 2 * size_t(numel(outputs[0].shape)) * sizeof(float);
  }

 private:
  template <typename T>
  void combine(const Broadcast& p, const T* a, const T* b, T* o) const {
    switch (kind_) {
      case VKind::sum: case VKind::mean: broadcast_binary(p, a, b, o, kCheapGrain, [](T x, T y) { return add_<T>(x, y); }); break;
      case VKind::min: broadcast_binary(p, a, b, o, kCheapGrain, [](T x, T y) { return min_<T>(x, y); }); break;
      case VKind::max: broadcast_binary(p, a, b, o, kCheapGrain, [](T x, T y) { return max_<T>(x, y); }); break;
    }
  }
  // o = o (op) x, with plan p over (x, o); all ops here are commutative.
  template <typename T>
  void combine_into(const Broadcast& p, const T* x, T* o) const {
    combine<T>(p, x, o, o);
  }

  VKind kind_;
  Broadcast first_;
  std::vector<Broadcast> per_input_;
  std::vector<ReducePlan> red_;
};

template <VKind K>
struct VariadicOf : Variadic {
  VariadicOf(const NodeInfo& n, const std::vector<Tensor>& in) : Variadic(n, in, K) {}
};
PYEDGE_REGISTER_OP("Sum", VariadicOf<VKind::sum>);
PYEDGE_REGISTER_OP("Mean", VariadicOf<VKind::mean>);
PYEDGE_REGISTER_OP("Min", VariadicOf<VKind::min>);
PYEDGE_REGISTER_OP("Max", VariadicOf<VKind::max>);

}  // namespace
}  // namespace pyedge
