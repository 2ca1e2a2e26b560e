// Comparisons (Equal, Less, LessOrEqual, Greater, GreaterOrEqual -> bool), logic (And, Or,
// Xor, Not), float tests (IsNaN, IsInf) and Where(cond, x, y), all with numpy broadcasting.
// bool tensors are one byte 0/1.
#include <cmath>
#include <limits>
#include <type_traits>

#include "ops/broadcast.h"
#include "ops/fast_math.h"

namespace pyedge {
namespace {

constexpr int64_t kGrain = 1 << 15;

enum class Cmp { eq, lt, le, gt, ge };

class Compare : public Op {
 public:
  Compare(const NodeInfo& n, const std::vector<Tensor>& in, Cmp cmp) : cmp_(cmp) {
    check_num_inputs(n, in, 2, 2);
    PYEDGE_CHECK(in[0].dtype == in[1].dtype, n.where(), ": inputs must have the same dtype, got ",
                 dtype_name(in[0].dtype), " and ", dtype_name(in[1].dtype));
    Shape out = broadcast_shapes(n, {in[0].shape, in[1].shape});
    bc_ = Broadcast(n, {in[0].shape, in[1].shape}, out);
    outputs = {make_output(DType::boolean, out)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    uint8_t* o = raw<uint8_t>(out[0]);
    dispatch_type(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* a = raw<const T>(in[0]);
      const T* b = raw<const T>(in[1]);
      switch (cmp_) {
        case Cmp::eq: broadcast_binary(bc_, a, b, o, kGrain, [](T x, T y) -> uint8_t { return x == y; }); break;
        case Cmp::lt: broadcast_binary(bc_, a, b, o, kGrain, [](T x, T y) -> uint8_t { return x < y; }); break;
        case Cmp::le: broadcast_binary(bc_, a, b, o, kGrain, [](T x, T y) -> uint8_t { return x <= y; }); break;
        case Cmp::gt: broadcast_binary(bc_, a, b, o, kGrain, [](T x, T y) -> uint8_t { return x > y; }); break;
        case Cmp::ge: broadcast_binary(bc_, a, b, o, kGrain, [](T x, T y) -> uint8_t { return x >= y; }); break;
      }
    });
  }

 private:
  Cmp cmp_;
  Broadcast bc_;
};

template <Cmp C>
struct CompareOf : Compare {
  CompareOf(const NodeInfo& n, const std::vector<Tensor>& in) : Compare(n, in, C) {}
};
PYEDGE_REGISTER_OP("Equal", CompareOf<Cmp::eq>);
PYEDGE_REGISTER_OP("Less", CompareOf<Cmp::lt>);
PYEDGE_REGISTER_OP("LessOrEqual", CompareOf<Cmp::le>);
PYEDGE_REGISTER_OP("Greater", CompareOf<Cmp::gt>);
PYEDGE_REGISTER_OP("GreaterOrEqual", CompareOf<Cmp::ge>);

enum class Logic { and_, or_, xor_ };

class LogicOp : public Op {
 public:
  LogicOp(const NodeInfo& n, const std::vector<Tensor>& in, Logic l) : l_(l) {
    check_num_inputs(n, in, 2, 2);
    for (int k = 0; k < 2; ++k)
      PYEDGE_CHECK(in[size_t(k)].dtype == DType::boolean, n.where(), ": inputs must be bool, input ",
                   k, " is ", dtype_name(in[size_t(k)].dtype));
    Shape out = broadcast_shapes(n, {in[0].shape, in[1].shape});
    bc_ = Broadcast(n, {in[0].shape, in[1].shape}, out);
    outputs = {make_output(DType::boolean, out)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    const uint8_t* a = raw<const uint8_t>(in[0]);
    const uint8_t* b = raw<const uint8_t>(in[1]);
    uint8_t* o = raw<uint8_t>(out[0]);
    using U = uint8_t;
    switch (l_) {
      case Logic::and_: broadcast_binary(bc_, a, b, o, kGrain, [](U x, U y) -> U { return (x != 0) & (y != 0); }); break;
      case Logic::or_: broadcast_binary(bc_, a, b, o, kGrain, [](U x, U y) -> U { return (x != 0) | (y != 0); }); break;
      case Logic::xor_: broadcast_binary(bc_, a, b, o, kGrain, [](U x, U y) -> U { return (x != 0) ^ (y != 0); }); break;
    }
  }

 private:
  Logic l_;
  Broadcast bc_;
};

template <Logic L>
struct LogicOf : LogicOp {
  LogicOf(const NodeInfo& n, const std::vector<Tensor>& in) : LogicOp(n, in, L) {}
};
PYEDGE_REGISTER_OP("And", LogicOf<Logic::and_>);
PYEDGE_REGISTER_OP("Or", LogicOf<Logic::or_>);
PYEDGE_REGISTER_OP("Xor", LogicOf<Logic::xor_>);

class Not : public Op {
 public:
  Not(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    PYEDGE_CHECK(in[0].dtype == DType::boolean, n.where(), ": input must be bool, got ",
                 dtype_name(in[0].dtype));
    outputs = {make_output(DType::boolean, in[0].shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    const uint8_t* x = raw<const uint8_t>(in[0]);
    uint8_t* y = raw<uint8_t>(out[0]);
    parallel_for(in[0].numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) y[i] = x[i] == 0;
    });
  }
};
PYEDGE_REGISTER_OP("Not", Not);

// IsNaN / IsInf (detect_negative, detect_positive): float -> bool.
class FloatTest : public Op {
 public:
  FloatTest(const NodeInfo& n, const std::vector<Tensor>& in, bool inf) : inf_(inf) {
    check_num_inputs(n, in, 1, 1);
    PYEDGE_CHECK(is_float(in[0].dtype), n.where(), ": input must be float32 or float64, got ",
                 dtype_name(in[0].dtype));
    neg_ = n.attrs.get_int("detect_negative", 1) != 0;
    pos_ = n.attrs.get_int("detect_positive", 1) != 0;
    outputs = {make_output(DType::boolean, in[0].shape)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    uint8_t* y = raw<uint8_t>(out[0]);
    dispatch_type(in[0].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_floating_point_v<T>) {
        const T* x = in[0].ptr<T>();
        const T big = std::numeric_limits<T>::infinity();
        const bool inf = inf_, neg = neg_, pos = pos_;
        parallel_for(in[0].numel(), kGrain, [&](int64_t b, int64_t e) {
          if (!inf) {
            for (int64_t i = b; i < e; ++i) y[i] = x[i] != x[i];
          } else {
            for (int64_t i = b; i < e; ++i) y[i] = (pos && x[i] == big) || (neg && x[i] == -big);
          }
        });
      }
    });
  }

 private:
  bool inf_, neg_ = true, pos_ = true;
};
struct IsNaN : FloatTest {
  IsNaN(const NodeInfo& n, const std::vector<Tensor>& in) : FloatTest(n, in, false) {}
};
struct IsInf : FloatTest {
  IsInf(const NodeInfo& n, const std::vector<Tensor>& in) : FloatTest(n, in, true) {}
};
PYEDGE_REGISTER_OP("IsNaN", IsNaN);
PYEDGE_REGISTER_OP("IsInf", IsInf);

// Where(cond, x, y): out = cond ? x : y, broadcast over all three; any dtype for x/y (the
// kernel only moves elements, so it dispatches on element size). Backward (float32):
// dx += reduce(cond ? dy : 0), dy_in += reduce(cond ? 0 : dy).
class Where : public Op {
 public:
  Where(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 3, 3);
    PYEDGE_CHECK(in[0].dtype == DType::boolean, n.where(), ": condition must be bool, got ",
                 dtype_name(in[0].dtype));
    PYEDGE_CHECK(in[1].dtype == in[2].dtype, n.where(), ": X and Y must have the same dtype, got ",
                 dtype_name(in[1].dtype), " and ", dtype_name(in[2].dtype));
    Shape out = broadcast_shapes(n, {in[0].shape, in[1].shape, in[2].shape});
    bc_ = Broadcast(n, {in[0].shape, in[1].shape, in[2].shape}, out);
    red_[0] = ReducePlan(out, in[1].shape);
    red_[1] = ReducePlan(out, in[2].shape);
    outputs = {make_output(in[1].dtype, out)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext&) override {
    switch (dtype_size(in[1].dtype)) {
      case 1: run<uint8_t>(in, out[0]); break;
      case 4: run<uint32_t>(in, out[0]); break;
      case 8: run<uint64_t>(in, out[0]); break;
      default: throw Error("internal: Where on an unexpected element size");
    }
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i > 0 && Op::differentiable_input(i); }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (!dout[0].data) return;
    const uint8_t* c = raw<const uint8_t>(in[0]);
    const float* dy = dout[0].ptr<float>();
    const int64_t sc = bc_.inner_stride(0);
    for (int k = 1; k <= 2; ++k) {
      if (!din[size_t(k)].data) continue;
      const ReducePlan& red = red_[k - 1];
      const bool direct = red.identity();
      float* dst = din[size_t(k)].ptr<float>();
      float* target = direct ? dst : static_cast<float*>(ctx.scratch);
      const uint8_t pick = k == 1;  // x takes the gradient where cond is true
      bc_.for_runs(kGrain, [&](const int64_t* off, int64_t oo, int64_t n) {
        const uint8_t* pc = c + off[0];
        const float* pdy = dy + oo;
        float* pt = target + oo;
        if (direct) {
          if (sc) for (int64_t i = 0; i < n; ++i) pt[i] += fm::sel((pc[i] != 0) == pick, pdy[i], 0.f);
          else if ((pc[0] != 0) == pick) for (int64_t i = 0; i < n; ++i) pt[i] += pdy[i];
        } else {
          if (sc) for (int64_t i = 0; i < n; ++i) pt[i] = fm::sel((pc[i] != 0) == pick, pdy[i], 0.f);
          else {
            const float m = (pc[0] != 0) == pick ? 1.f : 0.f;
            for (int64_t i = 0; i < n; ++i) pt[i] = m * pdy[i];
          }
        }
      });
      if (!direct) red.accumulate(target, dst);
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>&) const override {
    return {true, false, false};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override { return {false}; }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    bool need = (ng.size() > 1 && ng[1] && !red_[0].identity()) ||
                (ng.size() > 2 && ng[2] && !red_[1].identity());
    return need ? size_t(bc_.total) * sizeof(float) : 0;
  }

 private:
  template <typename T>
  void run(const std::vector<Tensor>& in, const Tensor& out) const {
    const uint8_t* c = raw<const uint8_t>(in[0]);
    const T* x = raw<const T>(in[1]);
    const T* y = raw<const T>(in[2]);
    T* o = raw<T>(out);
    const int64_t sc = bc_.inner_stride(0), sx = bc_.inner_stride(1), sy = bc_.inner_stride(2);
    bc_.for_runs(kGrain, [&](const int64_t* off, int64_t oo, int64_t n) {
      const uint8_t* pc = c + off[0];
      const T* px = x + off[1];
      const T* py = y + off[2];
      T* po = o + oo;
      if (!sc) {  // one condition for the run: a copy (or fill) from x or y
        const T* src = pc[0] ? px : py;
        const int64_t s = pc[0] ? sx : sy;
        if (s) for (int64_t i = 0; i < n; ++i) po[i] = src[i];
        else for (int64_t i = 0; i < n; ++i) po[i] = src[0];
      } else {
        // integer select on the bit patterns: vectorises for every stride pattern
        visit3(n, pc, sc, px, sx, py, sy,
               [&](int64_t i, uint8_t cv, T xv, T yv) { po[i] = cv ? xv : yv; });
      }
    });
  }
  Broadcast bc_;
  ReducePlan red_[2];
};
PYEDGE_REGISTER_OP("Where", Where);

}  // namespace
}  // namespace pyedge
