// Identity, Cast, CastLike, Expand and Dropout.
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/hash.h"
#include "ops/broadcast.h"
#include "ops/fast_math.h"

namespace pyedge {
namespace {

constexpr int64_t kGrain = 1 << 15;

// dst (float32 or float64) += src (float32 or float64), elementwise.
// dst += src (or dst = src for a fresh gradient buffer), converting between float types.
void accumulate_float(const Tensor& src, const Tensor& dst, bool assign = false) {
  dispatch_type(src.dtype, [&](auto ts) {
    using S = decltype(ts);
    dispatch_type(dst.dtype, [&](auto td) {
      using D = decltype(td);
      if constexpr (std::is_floating_point_v<S> && std::is_floating_point_v<D>) {
        const S* s = src.ptr<S>();
        D* d = dst.ptr<D>();
        parallel_for(src.numel(), kGrain, [&](int64_t b, int64_t e) {
          if (assign) for (int64_t i = b; i < e; ++i) d[i] = D(s[i]);
          else for (int64_t i = b; i < e; ++i) d[i] += D(s[i]);
        });
      } else {
        throw Error("internal: float gradient on a non-float tensor");
      }
    });
  });
}

void copy_bytes(const Tensor& src, const Tensor& dst) {
  if (src.data == dst.data) return;
  const size_t bytes = src.nbytes();
  const char* s = static_cast<const char*>(src.data);
  char* d = static_cast<char*>(dst.data);
  parallel_for(int64_t(bytes), 1 << 18, [&](int64_t b, int64_t e) {
    std::memcpy(d + b, s + b, size_t(e - b));
  });
}

class Identity : public Op {
 public:
  Identity(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    outputs = {make_output(in[0].dtype, in[0].shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    copy_bytes(in[0], out[0]);
  }
  bool output_aliases_input0() const override { return true; }
  int passthrough_input(const std::vector<bool>& need) const override {
    return !need.empty() && need[0] ? 0 : -1;
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& dout,
                const std::vector<Tensor>& din, RunContext& ctx) override {
    if (din[0].data && dout[0].data) accumulate_float(dout[0], din[0], ctx.fresh(0));
  }
  bool assigns_fresh_grads() const override { return true; }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>&) const override { return {false}; }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }
};
PYEDGE_REGISTER_OP("Identity", Identity);

// ONNX TensorProto data type -> DType (the ones pyedge stores).
bool onnx_to_dtype(int64_t t, DType& out) {
  switch (t) {
    case 1: out = DType::f32; return true;
    case 2: out = DType::u8; return true;
    case 6: out = DType::i32; return true;
    case 7: out = DType::i64; return true;
    case 9: out = DType::boolean; return true;
    case 11: out = DType::f64; return true;
    default: return false;
  }
}

// One element of Cast.
// Float -> integer: ONNX leaves an out-of-range result undefined and so does C++ (x86 and
// aarch64 really differ: Cast(-1.7 -> uint8) was 255 on x86, 0 on aarch64). pyedge defines it
// the same on every arch: truncate toward zero, then saturate to the target's range, NaN -> 0
// (what aarch64's fcvtzs/fcvtzu do for 32/64-bit targets). int8/int16 targets are computed as
// int64 by the import (import_rewrites.widen_narrow_ints), so there an out-of-range float wraps
// after truncation, again the same everywhere.
// Integer -> narrower integer wraps (ONNX: high bits discarded); anything -> bool is x != 0.
template <typename S, typename D>
inline D saturate_float_to_int(S x) {
  constexpr D lo = std::numeric_limits<D>::min(), hi = std::numeric_limits<D>::max();
  if (x != x) return D(0);
  if (x <= S(lo)) return lo;  // S(lo) is exact: 0 or -2^k
  if (x >= S(hi)) return hi;  // S(hi) may round up (int64 max -> 2^63): >= keeps D(x) in range
  return D(x);
}

template <typename S, typename D, bool kToBool>
inline D convert(S x) {
  if constexpr (kToBool) {
    return D(x != S(0));
  } else if constexpr (std::is_floating_point_v<S> && std::is_integral_v<D>) {
    return saturate_float_to_int<S, D>(x);
  } else {
    return D(x);
  }
}

// Cast (attribute `to`) and CastLike (type of input 1). Gradient passes for float -> float.
class Cast : public Op {
 public:
  Cast(const NodeInfo& n, const std::vector<Tensor>& in) {
    const bool like = n.op_type == "CastLike";
    check_num_inputs(n, in, like ? 2 : 1, like ? 2 : 1);
    if (like) {
      to_ = in[1].dtype;
    } else {
      PYEDGE_CHECK(n.attrs.has("to"), n.where(), ": missing attribute 'to'");
      const int64_t t = n.attrs.get_int("to", 0);
      if (!onnx_to_dtype(t, to_))
        throw UnsupportedError(str_cat(n.where(), ": Cast to ONNX data type ", t,
                                       " is not supported (pyedge handles float32, float64, int64, "
                                       "int32, uint8, bool)"));
    }
    outputs = {make_output(to_, in[0].shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    const DType from = in[0].dtype;
    if (from == to_ || (from == DType::boolean && to_ == DType::u8)) return copy_bytes(in[0], out[0]);
    dispatch_type(from, [&](auto ts) {
      using S = decltype(ts);
      dispatch_type(to_, [&](auto td) {
        using D = decltype(td);
        if (to_ == DType::boolean) run<S, D, true>(in[0], out[0]);
        else run<S, D, false>(in[0], out[0]);
      });
    });
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && Op::differentiable_input(0) && is_float(to_);
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& dout,
                const std::vector<Tensor>& din, RunContext& ctx) override {
    if (din[0].data && dout[0].data) accumulate_float(dout[0], din[0], ctx.fresh(0));
  }
  bool assigns_fresh_grads() const override { return true; }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }

 private:
  template <typename S, typename D, bool kToBool>
  static void run(const Tensor& src, const Tensor& dst) {
    const S* s = raw<const S>(src);
    D* d = raw<D>(dst);
    parallel_for(src.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) d[i] = convert<S, D, kToBool>(s[i]);
    });
  }
  DType to_ = DType::f32;
};
PYEDGE_REGISTER_OP("Cast", Cast);
PYEDGE_REGISTER_OP("CastLike", Cast);

// Expand(input, shape): broadcast input to (input.shape broadcast with shape); shape must be
// known at plan time. Backward: the output gradient summed over the expanded dims.
class Expand : public Op {
 public:
  Expand(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    const Tensor& s = const_input(n, in, 1, "shape");
    PYEDGE_CHECK(s.dtype == DType::i64 && s.rank() == 1, n.where(),
                 ": shape must be a 1-D int64 tensor, got ", dtype_name(s.dtype), " of shape ",
                 shape_str(s.shape));
    Shape target = s.to_ints();
    for (int64_t d : target)
      PYEDGE_CHECK(d >= 0, n.where(), ": shape has a negative dim: ", shape_str(target));
    Shape out = broadcast_shapes(n, {in[0].shape, target});
    bc_ = Broadcast(n, {in[0].shape}, out);
    red_ = ReducePlan(out, in[0].shape);
    outputs = {make_output(in[0].dtype, out)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    switch (dtype_size(in[0].dtype)) {
      case 1: broadcast_copy(bc_, raw<const uint8_t>(in[0]), raw<uint8_t>(out[0])); break;
      case 4: broadcast_copy(bc_, raw<const uint32_t>(in[0]), raw<uint32_t>(out[0])); break;
      case 8: broadcast_copy(bc_, raw<const uint64_t>(in[0]), raw<uint64_t>(out[0])); break;
      default: throw Error("internal: Expand on an unexpected element size");
    }
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0 && Op::differentiable_input(0); }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& dout,
                const std::vector<Tensor>& din, RunContext&) override {
    if (din[0].data && dout[0].data) red_.accumulate(dout[0].ptr<float>(), din[0].ptr<float>());
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>&) const override {
    return {false, false};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }

 private:
  Broadcast bc_;
  ReducePlan red_;
};
PYEDGE_REGISTER_OP("Expand", Expand);

// Dropout(data, ratio?, training_mode?) (opset 12+; ratio is an attribute before).
// Outputs: y, mask (bool). Active when ctx.training and training_mode (if given) is true and
// ratio > 0: y = x * mask / (1 - ratio), mask drawn from hash(ctx.seed, node, element).
// Otherwise y = x and the mask is all true. A missing training_mode input follows
// ctx.training (the graph then does not pin the mode).
class Dropout : public Op {
 public:
  Dropout(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, n.opset >= 12 ? 3 : 1);
    check_float(n, in[0], "data");
    if (n.opset < 12) attr_ratio_ = n.attrs.get_float("ratio", 0.5);
    has_ratio_ = in.size() > 1 && n.has_input(1);
    has_mode_ = in.size() > 2 && n.has_input(2);
    if (has_ratio_)
      PYEDGE_CHECK(is_float(in[1].dtype) && in[1].numel() == 1, n.where(),
                   ": ratio must be a float scalar, got ", dtype_name(in[1].dtype), " of shape ",
                   shape_str(in[1].shape));
    if (has_mode_)
      PYEDGE_CHECK(in[2].dtype == DType::boolean && in[2].numel() == 1, n.where(),
                   ": training_mode must be a bool scalar, got ", dtype_name(in[2].dtype),
                   " of shape ", shape_str(in[2].shape));
    if (has_ratio_ && in[1].data) {
      const double r = in[1].float_at(0);
      PYEDGE_CHECK(r >= 0 && r <= 1, n.where(), ": ratio must be in [0, 1], got ", r);
    }
    // per-node salt: FNV-1a of the node name, mixed with the `seed` attribute
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : n.name) h = (h ^ c) * 1099511628211ull;
    salt_ = splitmix64(h ^ uint64_t(n.attrs.get_int("seed", 0)));
    outputs = {make_output(in[0].dtype, in[0].shape), make_output(DType::boolean, in[0].shape)};
    n_visible = 2;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext& ctx) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    uint8_t* mask = raw<uint8_t>(out[1]);
    const int64_t n = in[0].numel();
    double ratio;
    if (!active(in, ctx, ratio)) {
      copy_bytes(in[0], out[0]);
      std::memset(mask, 1, size_t(n));
      return;
    }
    const float scale = ratio < 1.0 ? float(1.0 / (1.0 - ratio)) : 0.f;
    // keep element i when its 53-bit uniform draw is >= ratio
    const uint64_t thresh = ratio >= 1.0 ? ~0ull : uint64_t(ratio * 9007199254740992.0);
    const uint64_t key = splitmix64(ctx.seed ^ salt_);
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const uint8_t keep = (splitmix64(key + uint64_t(i) * 0xd1b54a32d192ed03ull) >> 11) >= thresh;
        mask[i] = keep;
        y[i] = fm::sel(keep, x[i] * scale, 0.f);
      }
    });
  }

  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!din[0].data || !dout[0].data) return;
    double ratio;
    const float scale = !active(in, ctx, ratio) ? 1.f : (ratio < 1.0 ? float(1.0 / (1.0 - ratio)) : 0.f);
    const uint8_t* mask = raw<const uint8_t>(out[1]);
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    parallel_for(out[0].numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dx[i] += fm::sel(mask[i] != 0, dy[i] * scale, 0.f);
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);  // only the scalar ratio / training_mode
    if (r.size() > 1) r[1] = has_ratio_;
    if (r.size() > 2) r[2] = has_mode_;
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }
  bool foldable() const override { return false; }

 private:
  bool active(const std::vector<Tensor>& in, const RunContext& ctx, double& ratio) const {
    ratio = has_ratio_ ? in[1].float_at(0) : attr_ratio_;
    PYEDGE_CHECK(ratio >= 0 && ratio <= 1, "Dropout: ratio must be in [0, 1], got ", ratio);
    const bool mode = has_mode_ ? raw<const uint8_t>(in[2])[0] != 0 : true;
    return ctx.training && mode && ratio > 0;
  }
  bool has_ratio_ = false, has_mode_ = false;
  double attr_ratio_ = 0.5;
  uint64_t salt_ = 0;
};
PYEDGE_REGISTER_OP("Dropout", Dropout);

}  // namespace
}  // namespace pyedge
