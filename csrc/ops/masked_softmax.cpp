// pyedge.MaskedSoftmax: attention's score normalisation in one pass each way,
//   y = softmax(scale * x + mask) over the last axis
// x [..., D]; mask (optional) broadcasts to x (e.g. [B, 1, 1, S] or [B, 1, S, S] against
// [B, H, S, S]). The exporters write it as Mul/Div by a constant, Add of the mask and Softmax
// (pyedge/fusions.py rewrites that chain): three passes over the scores forward and three
// backward become one each, and no intermediate is kept.
// Backward reads y only: dS = y * (dy - sum(dy * y)); dx = scale * dS; dmask = dS summed over
// the dims the mask broadcasts along (only when the mask needs a gradient, which it usually
// does not).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>

#include "common/parallel.h"
#include "ops/broadcast.h"
#include "ops/op.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

class MaskedSoftmax : public Op {
 public:
  MaskedSoftmax(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    check_float(n, in[0], "x");
    const Shape& xs = in[0].shape;
    PYEDGE_CHECK(!xs.empty(), n.where(), ": x must have rank >= 1");
    scale_ = float(n.attrs.get_float("scale", 1.0));
    D_ = xs.back();
    rows_ = D_ > 0 ? numel(xs) / D_ : 0;
    has_mask_ = in.size() > 1 && n.has_input(1);
    if (has_mask_) {
      check_float(n, in[1], "mask");
      const Shape& ms = in[1].shape;
      PYEDGE_CHECK(ms.size() <= xs.size(), n.where(), ": mask ", shape_str(ms),
                   " has a higher rank than x ", shape_str(xs));
      // Mask element strides per x dim (0 where the mask broadcasts).
      const size_t r = xs.size(), lead = r - ms.size();
      std::vector<int64_t> st(r, 0);
      int64_t s = 1;
      for (size_t d = r; d-- > lead;) {
        const int64_t md = ms[d - lead];
        PYEDGE_CHECK(md == xs[d] || md == 1, n.where(), ": mask ", shape_str(ms),
                     " does not broadcast to x ", shape_str(xs));
        st[d] = md == 1 ? 0 : s;
        s *= md;
      }
      mask_step_ = st[r - 1];
      // Offset of each row's mask run: rows [..] = x dims but the last.
      row_off_.assign(size_t(rows_), 0);
      std::vector<int64_t> idx(r > 0 ? r - 1 : 0, 0);
      for (int64_t row = 0; row < rows_; ++row) {
        int64_t off = 0;
        for (size_t d = 0; d + 1 < r; ++d) off += idx[d] * st[d];
        row_off_[size_t(row)] = off;
        for (size_t d = r - 1; d-- > 0;) {  // next index, last leading dim fastest
          if (++idx[d] < xs[d]) break;
          idx[d] = 0;
        }
      }
      reduce_ = ReducePlan(xs, ms);
    }
    outputs = {make_output(DType::f32, xs)};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    const float* m = has_mask_ ? in[1].ptr<float>() : nullptr;
    float* y = out[0].ptr<float>();
    const int64_t D = D_;
    parallel_for(rows_, grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = x + r * D;
        float* yr = y + r * D;
        if (m) {
          const float* mr = m + row_off_[size_t(r)];
          if (mask_step_ == 1)
            for (int64_t i = 0; i < D; ++i) yr[i] = scale_ * xr[i] + mr[i];
          else
            for (int64_t i = 0; i < D; ++i) yr[i] = scale_ * xr[i] + mr[0];
        } else {
          for (int64_t i = 0; i < D; ++i) yr[i] = scale_ * xr[i];
        }
        rowk::softmax_row(yr, yr, D, false);  // in place: the row is in L1 now
      }
    });
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* y = out[0].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    const bool want_mask = din.size() > 1 && din[1].data;
    // dS goes to scratch when the mask needs it (then reduced); dx is scale * dS.
    float* ds = want_mask ? static_cast<float*>(ctx.scratch) : nullptr;
    const bool assign = ctx.fresh(0);
    const int64_t D = D_;
    const float sc = scale_;
    parallel_for(rows_, grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* yr = y + r * D;
        const float* gr = dy + r * D;
        const float s = rowk::row_dot(gr, yr, D);
        if (dx) {
          float* o = dx + r * D;
          if (assign)
            for (int64_t i = 0; i < D; ++i) o[i] = sc * (yr[i] * (gr[i] - s));
          else
            for (int64_t i = 0; i < D; ++i) o[i] += sc * (yr[i] * (gr[i] - s));
        }
        if (ds) {
          float* o = ds + r * D;
          for (int64_t i = 0; i < D; ++i) o[i] = yr[i] * (gr[i] - s);
        }
      }
    });
    if (want_mask) reduce_.accumulate(ds, din[1].ptr<float>(), 1.f, ctx.fresh(1));
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return std::vector<bool>(ng.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {true};
  }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    return ng.size() > 1 && ng[1] ? size_t(rows_ * D_) * sizeof(float) : 0;
  }

 private:
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D_, 1)); }

  float scale_ = 1.f;
  int64_t D_ = 0, rows_ = 0;
  bool has_mask_ = false;
  int64_t mask_step_ = 0;             // mask stride along the softmax axis (0 or 1)
  std::vector<int64_t> row_off_;      // [rows] mask offset of each row
  ReducePlan reduce_;                 // dS [x shape] -> dmask [mask shape]
};
PYEDGE_REGISTER_OP("pyedge.MaskedSoftmax", MaskedSoftmax);

}  // namespace
}  // namespace pyedge
