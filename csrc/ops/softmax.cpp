// Softmax and LogSoftmax. Both are viewed as x [outer, D, inner] with the softmax over D:
//   opset >= 13: one axis (default -1): outer = prod(dims before), inner = prod(dims after);
//   opset <  13: axis default 1 and the input is coerced to 2D [prod(:axis), prod(axis:)], so
//                inner = 1 always.
// inner == 1 (the usual case) runs a contiguous row kernel, parallel over rows. Backward reads
// only the output: softmax dx = y*(dy - sum(dy*y)), log-softmax dx = dy - exp(y)*sum(dy).
// Lets GCC if-convert the float selects in these kernels (clamps, max) and vectorise them;
// no effect on results (no code here relies on FP exception traps).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

using rowk::exp_f;

// Strided case (inner > 1): rows are split into at most kBlocks blocks, each with its own
// [2, inner] scratch slot, so the work partition (not the thread count) decides the slots.
constexpr int64_t kBlocks = 32;

template <bool kLog>
class SoftmaxOp : public Op {
 public:
  SoftmaxOp(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 1);
    check_float(n, in[0], "input");
    const Shape& s = in[0].shape;
    int64_t r = in[0].rank();
    bool legacy = n.opset < 13;
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", legacy ? 1 : -1), r);
    outer_ = 1;
    D_ = 1;
    inner_ = 1;
    for (int64_t i = 0; i < r; ++i) {
      if (i < axis) outer_ *= s[size_t(i)];
      else if (i == axis || legacy) D_ *= s[size_t(i)];
      else inner_ *= s[size_t(i)];
    }
    if (r == 0) D_ = 1;
    outputs = {make_output(DType::f32, s)};
  }

  size_t forward_scratch_bytes() const override { return scratch_bytes(); }
  size_t backward_scratch_bytes(const std::vector<bool>&) const override { return scratch_bytes(); }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    const int64_t D = D_;
    if (D == 0) return;
    if (inner_ == 1) {
      parallel_for(outer_, grain(), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) row_forward(x + r * D, y + r * D, D);
      });
      return;
    }
    float* scratch = static_cast<float*>(ctx.scratch);
    for_blocks([&](int64_t o, float* slot) {
      strided_forward(x + o * D * inner_, y + o * D * inner_, slot);
    }, scratch);
  }

  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (din[0].data == nullptr || dout[0].data == nullptr) return;
    const float* y = out[0].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t D = D_;
    if (D == 0) return;
    const bool assign = ctx.fresh(0);
    if (inner_ == 1) {
      parallel_for(outer_, grain(), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (assign) row_backward<true>(y + r * D, dy + r * D, dx + r * D, D);
          else row_backward<false>(y + r * D, dy + r * D, dx + r * D, D);
        }
      });
      return;
    }
    float* scratch = static_cast<float*>(ctx.scratch);
    for_blocks([&](int64_t o, float* slot) {
      int64_t off = o * D * inner_;
      strided_backward(y + off, dy + off, dx + off, slot, assign);
    }, scratch);
  }
  bool assigns_fresh_grads() const override { return true; }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }

 private:
  int64_t outer_, D_, inner_;

  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D_, 1)); }
  int64_t nblocks() const { return std::min(outer_, kBlocks); }
  size_t scratch_bytes() const {
    return inner_ == 1 ? 0 : size_t(nblocks() * 2 * inner_) * sizeof(float);
  }
  // f(o, slot) for every outer index o, slot = this block's [2, inner] scratch.
  template <typename F>
  void for_blocks(F&& f, float* scratch) {
    int64_t nb = nblocks(), per = (outer_ + nb - 1) / std::max<int64_t>(nb, 1);
    parallel_for(nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        float* slot = scratch + blk * 2 * inner_;
        for (int64_t o = blk * per; o < std::min(outer_, (blk + 1) * per); ++o) f(o, slot);
      }
    });
  }

  static void row_forward(const float* x, float* y, int64_t D) {
    rowk::softmax_row(x, y, D, kLog);
  }
  template <bool kAssign>
  static void row_backward(const float* y, const float* dy, float* dx, int64_t D) {
    if (kLog) {
      float s = rowk::row_sum(dy, D);
      for (int64_t i = 0; i < D; ++i) put<kAssign>(dx[i], dy[i] - exp_f(y[i]) * s);
    } else {
      float s = rowk::row_dot(dy, y, D);
      for (int64_t i = 0; i < D; ++i) put<kAssign>(dx[i], y[i] * (dy[i] - s));
    }
  }

  // x, y [D, inner]; vectorised along inner. slot: m [inner], s [inner].
  void strided_forward(const float* x, float* y, float* slot) const {
    const int64_t D = D_, I = inner_;
    float* m = slot;
    float* s = slot + I;
    for (int64_t j = 0; j < I; ++j) m[j] = x[j];
    for (int64_t d = 1; d < D; ++d)
      for (int64_t j = 0; j < I; ++j) m[j] = x[d * I + j] > m[j] ? x[d * I + j] : m[j];
    for (int64_t j = 0; j < I; ++j) s[j] = 0.f;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < I; ++j) {
        float e = exp_f(x[d * I + j] - m[j]);
        if (!kLog) y[d * I + j] = e;
        s[j] += e;
      }
    if (kLog) {
      for (int64_t j = 0; j < I; ++j) s[j] = std::log(s[j]);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < I; ++j) y[d * I + j] = (x[d * I + j] - m[j]) - s[j];
    } else {
      for (int64_t j = 0; j < I; ++j) s[j] = 1.f / s[j];
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < I; ++j) y[d * I + j] *= s[j];
    }
  }
  void strided_backward(const float* y, const float* dy, float* dx, float* slot,
                        bool assign) const {
    const int64_t D = D_, I = inner_;
    float* s = slot;
    for (int64_t j = 0; j < I; ++j) s[j] = 0.f;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < I; ++j) s[j] += kLog ? dy[d * I + j] : dy[d * I + j] * y[d * I + j];
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < I; ++j) {
        int64_t k = d * I + j;
        const float g = kLog ? dy[k] - exp_f(y[k]) * s[j] : y[k] * (dy[k] - s[j]);
        dx[k] = assign ? g : dx[k] + g;
      }
  }
};

using Softmax = SoftmaxOp<false>;
using LogSoftmax = SoftmaxOp<true>;
PYEDGE_REGISTER_OP("Softmax", Softmax);
PYEDGE_REGISTER_OP("LogSoftmax", LogSoftmax);

}  // namespace
}  // namespace pyedge
