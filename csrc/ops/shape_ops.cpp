// Shape ops. Reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze) only relabel the shape:
// the output may alias the input (the planner then skips the copy) and the backward is a plain
// add of the gradient. Shape, Size, ConstantOfShape, Constant and Range produce values known
// at plan time: the op owns them and points outputs[0].data at them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {
namespace {

// Base for ops whose output is input 0 with another shape.
class ReshapeLike : public Op {
 public:
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    if (out[0].data != in[0].data && in[0].nbytes())
      std::memcpy(out[0].data, in[0].data, in[0].nbytes());
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == 0 && !input_dtypes.empty() && input_dtypes[0] == DType::f32;
  }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const bool assign = ctx.fresh(0);
    parallel_for(din[0].numel(), 1 << 15, [&](int64_t b, int64_t e) {
      if (assign) std::copy(dy + b, dy + e, dx + b);
      else for (int64_t i = b; i < e; ++i) dx[i] += dy[i];
    });
  }
  bool assigns_fresh_grads() const override { return true; }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }
  bool output_aliases_input0() const override { return true; }
  int passthrough_input(const std::vector<bool>& need) const override {
    return !need.empty() && need[0] ? 0 : -1;
  }

 protected:
  void set_output(const NodeInfo& n, const Tensor& x, Shape s) {
    PYEDGE_CHECK(numel(s) == x.numel(), n.where(), ": cannot reshape ", shape_str(x.shape),
                 " (", x.numel(), " elements) to ", shape_str(s), " (", numel(s), " elements)");
    outputs = {make_output(x.dtype, std::move(s))};
  }
};

// Reshape(data, shape): 0 copies the input dim (unless allowzero=1), one -1 is inferred.
class Reshape : public ReshapeLike {
 public:
  Reshape(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    const Tensor& x = in[0];
    std::vector<int64_t> s = const_input(n, in, 1, "shape").to_ints();
    bool allowzero = n.attrs.get_int("allowzero", 0) != 0;
    int infer = -1;
    int64_t known = 1;
    for (size_t k = 0; k < s.size(); ++k) {
      if (s[k] == 0 && !allowzero) {
        PYEDGE_CHECK(k < x.shape.size(), n.where(), ": shape ", shape_str(s),
                     " copies dim ", k, " (0) but the input ", shape_str(x.shape),
                     " has rank ", x.rank());
        s[k] = x.shape[k];
      }
      if (s[k] == -1) {
        PYEDGE_CHECK(infer < 0, n.where(), ": shape ", shape_str(s), " has more than one -1");
        infer = int(k);
        continue;
      }
      PYEDGE_CHECK(s[k] >= 0, n.where(), ": invalid dim ", s[k], " in shape ", shape_str(s));
      known *= s[k];
    }
    if (infer >= 0) {
      PYEDGE_CHECK(known != 0 && x.numel() % known == 0, n.where(), ": cannot reshape ",
                   shape_str(x.shape), " (", x.numel(), " elements) to ", shape_str(s));
      s[size_t(infer)] = x.numel() / known;
    }
    set_output(n, x, s);
  }
};
PYEDGE_REGISTER_OP("Reshape", Reshape);

// Flatten: [d0..d(a-1)] x [da..] -> 2-D.
class Flatten : public ReshapeLike {
 public:
  Flatten(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    const Tensor& x = in[0];
    int64_t r = x.rank(), axis = n.attrs.get_int("axis", 1);
    if (axis < 0) axis += r;
    PYEDGE_CHECK(axis >= 0 && axis <= r, n.where(), ": axis ", n.attrs.get_int("axis", 1),
                 " out of range for rank ", r);
    int64_t a = 1, b = 1;
    for (int64_t k = 0; k < r; ++k) (k < axis ? a : b) *= x.shape[size_t(k)];
    set_output(n, x, {a, b});
  }
};
PYEDGE_REGISTER_OP("Flatten", Flatten);

// Axes from the attribute (before `input_from`) or from input 1 (from that opset on).
std::vector<int64_t> axes_arg(const NodeInfo& n, const std::vector<Tensor>& in, int input_from,
                              bool* given) {
  *given = false;
  if (n.opset >= input_from) {
    if (in.size() < 2 || !n.has_input(1)) return {};
    *given = true;
    return const_input(n, in, 1, "axes").to_ints();
  }
  *given = n.attrs.has("axes");
  return n.attrs.get_ints("axes");
}

class Squeeze : public ReshapeLike {
 public:
  Squeeze(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    const Tensor& x = in[0];
    bool given;
    std::vector<int64_t> axes = axes_arg(n, in, 13, &given);
    std::vector<bool> drop(x.shape.size(), false);
    if (axes.empty()) {  // no (or empty) axes: drop every dim of size 1
      for (size_t k = 0; k < x.shape.size(); ++k) drop[k] = x.shape[k] == 1;
    }
    for (int64_t a : axes) {
      int64_t k = normalize_axis(n, a, x.rank());
      PYEDGE_CHECK(x.shape[size_t(k)] == 1, n.where(), ": cannot squeeze axis ", a,
                   " of shape ", shape_str(x.shape), " (size ", x.shape[size_t(k)], ", not 1)");
      drop[size_t(k)] = true;
    }
    Shape s;
    for (size_t k = 0; k < x.shape.size(); ++k)
      if (!drop[k]) s.push_back(x.shape[k]);
    set_output(n, x, s);
  }
};
PYEDGE_REGISTER_OP("Squeeze", Squeeze);

class Unsqueeze : public ReshapeLike {
 public:
  Unsqueeze(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    const Tensor& x = in[0];
    bool given;
    std::vector<int64_t> axes = axes_arg(n, in, 13, &given);
    PYEDGE_CHECK(given, n.where(), ": missing axes");
    int64_t r = x.rank() + int64_t(axes.size());
    std::vector<bool> ins(size_t(r), false);
    for (int64_t a : axes) {
      int64_t k = normalize_axis(n, a, r);
      PYEDGE_CHECK(!ins[size_t(k)], n.where(), ": axis ", a, " repeated in axes");
      ins[size_t(k)] = true;
    }
    Shape s;
    size_t j = 0;
    for (int64_t k = 0; k < r; ++k) s.push_back(ins[size_t(k)] ? 1 : x.shape[j++]);
    set_output(n, x, s);
  }
};
PYEDGE_REGISTER_OP("Unsqueeze", Unsqueeze);

// Base for ops whose output value is fixed at plan time and owned by the op.
class PlanConstant : public Op {
 public:
  void forward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
               RunContext&) override {
    if (out[0].data != value_.t.data && value_.t.nbytes())
      std::memcpy(out[0].data, value_.t.data, value_.t.nbytes());
  }
  bool differentiable_input(size_t) const override { return false; }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }

 protected:
  OwnedTensor value_;
  void publish() {
    Tensor t = value_.t;
    outputs = {t};
  }
};

// Shape(x) with opset-15 start/end (clamped like Python slicing).
class ShapeOp : public PlanConstant {
 public:
  ShapeOp(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    int64_t r = in[0].rank();
    int64_t b = n.attrs.get_int("start", 0), e = n.attrs.get_int("end", r);
    if (b < 0) b += r;
    if (e < 0) e += r;
    b = std::clamp<int64_t>(b, 0, r);
    e = std::clamp<int64_t>(e, 0, r);
    int64_t len = std::max<int64_t>(0, e - b);
    value_ = OwnedTensor::make(DType::i64, {len});
    int64_t* p = value_.t.ptr<int64_t>();
    for (int64_t k = 0; k < len; ++k) p[k] = in[0].shape[size_t(b + k)];
    publish();
  }
};
PYEDGE_REGISTER_OP("Shape", ShapeOp);

class SizeOp : public PlanConstant {
 public:
  SizeOp(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    value_ = OwnedTensor::make(DType::i64, {});
    *value_.t.ptr<int64_t>() = in[0].numel();
    publish();
  }
};
PYEDGE_REGISTER_OP("Size", SizeOp);

// Writes double v as element i of a tensor of any dtype.
void store_as(const Tensor& t, int64_t i, double v) {
  switch (t.dtype) {
    case DType::f32: static_cast<float*>(t.data)[i] = float(v); break;
    case DType::f64: static_cast<double*>(t.data)[i] = v; break;
    case DType::i64: static_cast<int64_t*>(t.data)[i] = int64_t(v); break;
    case DType::i32: static_cast<int32_t*>(t.data)[i] = int32_t(v); break;
    case DType::u8: static_cast<uint8_t*>(t.data)[i] = uint8_t(v); break;
    case DType::boolean: static_cast<bool*>(t.data)[i] = v != 0; break;
  }
}

// ConstantOfShape(shape) filled with the one-element `value` tensor (default float32 0).
class ConstantOfShape : public PlanConstant {
 public:
  ConstantOfShape(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    Shape s = const_input(n, in, 0, "input").to_ints();
    for (int64_t d : s)
      PYEDGE_CHECK(d >= 0, n.where(), ": negative dim in shape ", shape_str(s));
    const OwnedTensor* v = n.attrs.get_tensor("value");
    DType dt = v ? v->t.dtype : DType::f32;
    if (v)
      PYEDGE_CHECK(v->t.numel() == 1, n.where(), ": 'value' must have one element, has ",
                   v->t.numel());
    value_ = OwnedTensor::make(dt, s);
    size_t es = dtype_size(dt);
    auto* dst = static_cast<uint8_t*>(value_.t.data);
    if (v)
      for (int64_t i = 0; i < value_.t.numel(); ++i) std::memcpy(dst + size_t(i) * es, v->t.data, es);
    publish();  // (buffers start zeroed: the default value needs no fill)
  }
};
PYEDGE_REGISTER_OP("ConstantOfShape", ConstantOfShape);

class Constant : public PlanConstant {
 public:
  Constant(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 0, 0);
    if (const OwnedTensor* v = n.attrs.get_tensor("value")) {
      value_ = OwnedTensor::make(v->t.dtype, v->t.shape);
      if (v->t.nbytes()) std::memcpy(value_.t.data, v->t.data, v->t.nbytes());
    } else if (n.attrs.has("value_float")) {
      value_ = OwnedTensor::make(DType::f32, {});
      *value_.t.ptr<float>() = float(n.attrs.get_float("value_float", 0));
    } else if (n.attrs.has("value_int")) {
      value_ = OwnedTensor::make(DType::i64, {});
      *value_.t.ptr<int64_t>() = n.attrs.get_int("value_int", 0);
    } else if (n.attrs.has("value_ints")) {
      auto v = n.attrs.get_ints("value_ints");
      value_ = OwnedTensor::make(DType::i64, {int64_t(v.size())});
      std::copy(v.begin(), v.end(), value_.t.ptr<int64_t>());
    } else if (n.attrs.has("value_floats")) {
      auto v = n.attrs.get_floats("value_floats");
      value_ = OwnedTensor::make(DType::f32, {int64_t(v.size())});
      for (size_t i = 0; i < v.size(); ++i) value_.t.ptr<float>()[i] = float(v[i]);
    } else {
      PYEDGE_CHECK(false, n.where(), ": needs a 'value', 'value_float', 'value_int', "
                   "'value_ints' or 'value_floats' attribute (string and sparse constants "
                   "are not supported)");
    }
    publish();
  }
};
PYEDGE_REGISTER_OP("Constant", Constant);

// Range(start, limit, delta): all three must be known at plan time.
class Range : public PlanConstant {
 public:
  Range(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 3, 3);
    const char* names[3] = {"start", "limit", "delta"};
    for (size_t i = 0; i < 3; ++i) {
      const Tensor& t = const_input(n, in, i, names[i]);
      PYEDGE_CHECK(t.numel() == 1, n.where(), ": '", names[i], "' must be a scalar, has shape ",
                   shape_str(t.shape));
      PYEDGE_CHECK(t.dtype == in[0].dtype, n.where(), ": inputs must share one dtype");
    }
    DType dt = in[0].dtype;
    PYEDGE_CHECK(dt != DType::boolean && dt != DType::u8, n.where(), ": unsupported dtype ",
                 dtype_name(dt));
    int64_t count;
    if (is_float(dt)) {
      double s = in[0].float_at(0), l = in[1].float_at(0), d = in[2].float_at(0);
      PYEDGE_CHECK(d != 0, n.where(), ": delta is 0");
      count = std::max<int64_t>(0, int64_t(std::ceil((l - s) / d)));
      value_ = OwnedTensor::make(dt, {count});
      // float32 like the reference: accumulate start + i*delta in the tensor's precision
      for (int64_t i = 0; i < count; ++i)
        store_as(value_.t, i, dt == DType::f32 ? double(float(s) + float(i) * float(d))
                                               : s + double(i) * d);
    } else {
      int64_t s = in[0].int_at(0), l = in[1].int_at(0), d = in[2].int_at(0);
      PYEDGE_CHECK(d != 0, n.where(), ": delta is 0");
      int64_t span = l - s;
      count = d > 0 ? (span > 0 ? (span + d - 1) / d : 0) : (span < 0 ? (-span - d - 1) / -d : 0);
      value_ = OwnedTensor::make(dt, {count});
      for (int64_t i = 0; i < count; ++i) {
        if (dt == DType::i64) value_.t.ptr<int64_t>()[i] = s + i * d;
        else value_.t.ptr<int32_t>()[i] = int32_t(s + i * d);
      }
    }
    publish();
  }
};
PYEDGE_REGISTER_OP("Range", Range);

}  // namespace
}  // namespace pyedge
