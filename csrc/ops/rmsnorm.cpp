// pyedge.RMSNorm(X, W): root-mean-square normalisation over the last axis (Llama, Qwen2,
// Mistral, Gemma), what the exporters spell Pow → ReduceMean → Add(eps) → Sqrt → Reciprocal →
// Mul(x) → Mul(weight) (fusions.py: fuse_rmsnorm). X [..., D] viewed as [rows, D], W [D]
// (optional: absent = no weight).
//   Y = w' ∘ X · r,   r = 1 / sqrt(mean(X²) + epsilon)   per row,
//   w' = W, or 1 + W with add_one = 1 (Gemma), or 1 without W.
// Outputs: Y and a hidden R [rows] (the r of each row, kept for the backward: one float per
// row instead of the chain's five activations).
// Backward per row (rmsnorm_kernels.h): s = Σ dy∘w'∘x,
//   dX = r·dy∘w' − x·r³·s/D,   dW = Σ_rows dy∘x·r   (also for 1 + W: d(1 + W)/dW = 1).
// dW: rows are cut into a fixed number of blocks (chosen at plan time), each block sums into
// its own scratch row, then the block rows are added column-parallel: deterministic,
// independent of the thread count (as LayerNorm).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/rmsnorm_kernels.h"

namespace pyedge {
namespace {

class RMSNorm : public Op {
 public:
  RMSNorm(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 1, 2);
    check_float(n, in[0], "X");
    PYEDGE_CHECK(in[0].rank() >= 1, n.where(), ": X must have rank >= 1");
    const Shape& s = in[0].shape;
    D_ = s.back();
    rows_ = D_ > 0 ? in[0].numel() / D_ : 0;
    eps_ = float(n.attrs.get_float("epsilon", 1e-6));
    PYEDGE_CHECK(eps_ >= 0.f, n.where(), ": epsilon must be >= 0, got ", eps_);
    const bool add_one = n.attrs.get_int("add_one", 0) != 0;
    has_w_ = in.size() > 1 && n.has_input(1);
    if (has_w_) {
      check_float(n, in[1], "W");
      Shape ws = in[1].shape;
      while (ws.size() > 1 && ws.front() == 1) ws.erase(ws.begin());
      PYEDGE_CHECK(ws == Shape{D_}, n.where(), ": W has shape ", shape_str(in[1].shape),
                   ", expected [", D_, "] (X's last dim; X is ", shape_str(s), ")");
    } else {
      PYEDGE_CHECK(!add_one, n.where(), ": add_one = 1 needs a weight input W");
    }
    form_ = !has_w_ ? rmsk::kNone : add_one ? rmsk::kOnePlus : rmsk::kWeight;
    outputs = {make_output(DType::f32, s), make_output(DType::f32, {rows_})};
    n_visible = 1;
    nblocks_ = std::max<int64_t>(1, std::min<int64_t>({rows_, 32, rows_ * D_ / 4096 + 1}));
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    switch (form_) {
      case rmsk::kNone: return fwd<rmsk::kNone>(in, out);
      case rmsk::kWeight: return fwd<rmsk::kWeight>(in, out);
      default: return fwd<rmsk::kOnePlus>(in, out);
    }
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }

  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    return ng.size() > 1 && ng[1] ? size_t(nblocks_ * D_) * sizeof(float) : 0;
  }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    switch (form_) {
      case rmsk::kNone: return bwd<rmsk::kNone>(in, out, dout, din, ctx);
      case rmsk::kWeight: return bwd<rmsk::kWeight>(in, out, dout, din, ctx);
      default: return bwd<rmsk::kOnePlus>(in, out, dout, din, ctx);
    }
  }

  // X always (dX's dot and dW); W only for dX; of the outputs only R.
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = true;
    if (r.size() > 1) r[1] = has_w_ && ng[0];
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }

 private:
  int64_t rows_ = 0, D_ = 0, nblocks_ = 1;
  float eps_ = 1e-6f;
  bool has_w_ = false;
  int form_ = rmsk::kWeight;

  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D_, 1)); }

  template <int kW>
  void fwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out) const {
    using S = simd::Native;
    const float* x = in[0].ptr<float>();
    const float* w = has_w_ ? in[1].ptr<float>() : nullptr;
    float* y = out[0].ptr<float>();
    float* R = out[1].ptr<float>();
    const int64_t D = D_;
    const float invD = D > 0 ? 1.f / float(D) : 0.f;
    parallel_for(rows_, grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = x + r * D;
        const float rs = 1.f / std::sqrt(rmsk::sum_sq<S>(xr, D) * invD + eps_);
        R[r] = rs;
        rmsk::apply_row<S, kW>(xr, w, rs, y + r * D, D);
      }
    });
  }

  template <int kW>
  void bwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
           const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
           RunContext& ctx) const {
    using S = simd::Native;
    const float* x = in[0].ptr<float>();
    const float* w = has_w_ ? in[1].ptr<float>() : nullptr;
    const float* R = out[1].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dw = din.size() > 1 && din[1].data ? din[1].ptr<float>() : nullptr;
    if (!dx && !dw) return;
    const int64_t D = D_, rows = rows_;
    const float invD = D > 0 ? 1.f / float(D) : 0.f;
    const bool assign_dx = ctx.fresh(0);
    float* part = static_cast<float*>(ctx.scratch);  // [nblocks, D]: dW partials
    const int64_t nb = nblocks_, per = (rows + nb - 1) / nb;
    parallel_for(nb, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        float* pw = dw ? part + blk * D : nullptr;
        if (pw) std::fill(pw, pw + D, 0.f);
        for (int64_t r = blk * per, r1 = std::min(rows, (blk + 1) * per); r < r1; ++r) {
          const float* xr = x + r * D;
          const float* dyr = dy + r * D;
          const float rs = R[r];
          const float c = dx ? -rs * rs * rs * rmsk::dot_row<S, kW>(xr, w, dyr, D) * invD : 0.f;
          float* dxr = dx ? dx + r * D : nullptr;
          if (assign_dx) rmsk::bwd_row<S, kW, true>(xr, w, dyr, rs, c, dxr, pw, D);
          else rmsk::bwd_row<S, kW, false>(xr, w, dyr, rs, c, dxr, pw, D);
        }
      }
    });
    if (!dw) return;
    const bool fresh_w = ctx.fresh(1);
    parallel_for(D, 1024, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        float s = fresh_w ? 0.f : dw[k];
        for (int64_t blk = 0; blk < nb; ++blk) s += part[blk * D + k];
        dw[k] = s;
      }
    });
  }
};
PYEDGE_REGISTER_OP("pyedge.RMSNorm", RMSNorm);

}  // namespace
}  // namespace pyedge
