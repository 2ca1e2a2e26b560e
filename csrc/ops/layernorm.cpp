// LayerNormalization (opset 17): X viewed as [rows, D], D = prod(shape[axis:]);
//   Y = (X - mean) * rstd * Scale + B,   rstd = 1 / sqrt(var + epsilon).
// Outputs: Y, Mean, InvStdDev (both [shape[:axis], 1, ...]). The op always produces all three
// (they are tiny) and its backward reads Mean/InvStdDev instead of recomputing them.
// Backward per row: xhat = (x - mean)*rstd, g = dy*scale,
//   dx = rstd * (g - mean(g) - xhat*mean(g*xhat)),  dScale = sum_rows dy*xhat,  dB = sum_rows dy:
// one pass for the two row sums, one for dx and the dScale/dB partials (simd::Native vectors).
// dScale/dB: rows are cut into a fixed number of blocks (chosen at plan time), each block sums
// into its own scratch row, then the block rows are added column-parallel: deterministic, no
// races, independent of the thread count.
// Lets GCC if-convert the float selects in these kernels (clamps, max) and vectorise them;
// no effect on results (no code here relies on FP exception traps).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>

#include "common/parallel.h"
#include "common/simd.h"
#include "ops/op.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

class LayerNorm : public Op {
 public:
  LayerNorm(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 3);
    check_float(n, in[0], "X");
    check_float(n, in[1], "Scale");
    const Shape& s = in[0].shape;
    int64_t r = in[0].rank();
    PYEDGE_CHECK(r >= 1, n.where(), ": X must have rank >= 1");
    int64_t axis = normalize_axis(n, n.attrs.get_int("axis", -1), r);
    eps_ = float(n.attrs.get_float("epsilon", 1e-5));
    rows_ = 1;
    D_ = 1;
    for (int64_t i = 0; i < r; ++i) (i < axis ? rows_ : D_) *= s[size_t(i)];
    Shape norm_shape(s.begin() + axis, s.end());
    check_param(n, in[1], norm_shape, "Scale");
    has_bias_ = in.size() > 2 && n.has_input(2);
    if (has_bias_) {
      check_float(n, in[2], "B");
      check_param(n, in[2], norm_shape, "B");
    }
    Shape stat(s.begin(), s.begin() + axis);
    stat.resize(size_t(r), 1);
    outputs = {make_output(DType::f32, s), make_output(DType::f32, stat),
               make_output(DType::f32, stat)};
    n_visible = 3;
    nblocks_ = std::max<int64_t>(1, std::min<int64_t>({rows_, 32, rows_ * D_ / 4096 + 1}));
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    const float* g = in[1].ptr<float>();
    const float* bias = has_bias_ ? in[2].ptr<float>() : nullptr;
    float* y = out[0].ptr<float>();
    float* mean = out[1].ptr<float>();
    float* rstd = out[2].ptr<float>();
    const int64_t D = D_;
    const float invD = D > 0 ? 1.f / float(D) : 0.f;
    parallel_for(rows_, grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = x + r * D;
        float* yr = y + r * D;
        float mu = rowk::row_sum(xr, D) * invD;
        // second pass over the (cached) row: stable variance of the centred values
        float var = rowk::row_sqdev(xr, mu, D);
        float rs = 1.f / std::sqrt(var * invD + eps_);
        mean[r] = mu;
        rstd[r] = rs;
        rowk::ln_apply(xr, mu, rs, g, bias, yr, D);
      }
    });
  }

  bool has_backward() const override { return true; }

  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    bool params = ng.size() > 1 && (ng[1] || (ng.size() > 2 && ng[2]));
    return params ? size_t(nblocks_ * 2 * D_) * sizeof(float) : 0;
  }

  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    // Gradients through the Mean/InvStdDev outputs are not propagated (they are statistics;
    // exported training graphs never differentiate them).
    if (dout[0].data == nullptr) {  // only the statistics have gradients: none flow back
      for (size_t k = 0; k < din.size(); ++k)
        if (din[k].data && ctx.fresh(k))
          std::fill(din[k].ptr<float>(), din[k].ptr<float>() + din[k].numel(), 0.f);
      return;
    }
    const float* x = in[0].ptr<float>();
    const float* g = in[1].ptr<float>();
    const float* mean = out[1].ptr<float>();
    const float* rstd = out[2].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dg = din[1].data ? din[1].ptr<float>() : nullptr;
    float* db = din.size() > 2 && din[2].data ? din[2].ptr<float>() : nullptr;
    const int64_t D = D_, rows = rows_;
    const float invD = D > 0 ? 1.f / float(D) : 0.f;
    bool params = dg || db;
    float* part = static_cast<float*>(ctx.scratch);  // [nblocks, 2, D]: dScale, dB partials
    if (!dx && !params) return;
    const bool assign_dx = ctx.fresh(0);
    // Scale / bias gradients are small: clear fresh ones and keep one summation path.
    if (dg && ctx.fresh(1)) std::fill(dg, dg + D, 0.f);
    if (db && ctx.fresh(2)) std::fill(db, db + D, 0.f);

    int64_t nb = nblocks_, per = (rows + nb - 1) / nb;
    parallel_for(nb, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        float* pg = params ? part + blk * 2 * D : nullptr;
        float* pb = params ? pg + D : nullptr;
        if (params) std::fill(pg, pg + 2 * D, 0.f);
        const BwdArgs a{x, dy, g, mean, rstd, invD, dx, pg, pb, blk * per,
                        std::min(rows, (blk + 1) * per)};
        if (!dx) bwd_rows<false, false, true>(a);
        else if (!params) assign_dx ? bwd_rows<true, true, false>(a) : bwd_rows<true, false, false>(a);
        else assign_dx ? bwd_rows<true, true, true>(a) : bwd_rows<true, false, true>(a);
      }
    });
    if (!params) return;
    parallel_for(D, 1024, [&](int64_t b, int64_t e) {
      for (int64_t blk = 0; blk < nb; ++blk) {
        const float* pg = part + blk * 2 * D;
        const float* pb = pg + D;
        if (dg)
          for (int64_t k = b; k < e; ++k) dg[k] += pg[k];
        if (db)
          for (int64_t k = b; k < e; ++k) db[k] += pb[k];
      }
    });
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = true;  // X for xhat
    r[1] = ng[0];  // Scale only for dX
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true, true};
  }

 private:
  int64_t rows_ = 1, D_ = 1, nblocks_ = 1;
  float eps_ = 1e-5f;
  bool has_bias_ = false;

  // Backward of rows [r0, r1) of [rows, D] (D_ columns), on simd::Native vectors with a
  // scalar column tail (the same per-row arithmetic whatever the block split):
  //   kDx: dx (= when kAssign, else +=) rstd·(dy·g − mean(dy·g)) − (x − mean)·rstd³·mean(dy·g·(x − mean))
  //   kParams: pg += dy·xhat, pb += dy (this block's dScale / dB partial rows)
  struct BwdArgs {
    const float *x, *dy, *g, *mean, *rstd;
    float invD;
    float *dx, *pg, *pb;
    int64_t r0, r1;
  };
  template <bool kDx, bool kAssign, bool kParams>
  void bwd_rows(const BwdArgs& a) const {
    const float *x = a.x, *dy = a.dy, *g = a.g;
    float *pg = a.pg, *pb = a.pb;
    const float invD = a.invD;
    using S = simd::Native;
    using V = S::V;
    constexpr int W = S::W;
    const int64_t D = D_, nv = D / W * W;  // columns [0, nv) as vectors
    for (int64_t r = a.r0; r < a.r1; ++r) {
      const float* xr = x + r * D;
      const float* dyr = dy + r * D;
      const float mu = a.mean[r], rs = a.rstd[r];
      float A = 0.f, B = 0.f, C = 0.f;  // dx = dy·g·A + (x − mu)·C + B
      if constexpr (kDx) {
        // s1 = sum dy·g, s2 = sum dy·g·(x − mu): two accumulators each, for latency
        V a1 = S::set1(0.f), a2 = a1, b1 = a1, b2 = a1;
        const V vmu = S::set1(mu);
        int64_t i = 0;
        for (; i + 2 * W <= nv; i += 2 * W) {
          const V g0 = S::mul(S::load(dyr + i), S::load(g + i));
          const V g1 = S::mul(S::load(dyr + i + W), S::load(g + i + W));
          a1 = S::add(a1, g0);
          b1 = S::add(b1, g1);
          a2 = S::fma(g0, S::sub(S::load(xr + i), vmu), a2);
          b2 = S::fma(g1, S::sub(S::load(xr + i + W), vmu), b2);
        }
        if (i < nv) {
          const V g0 = S::mul(S::load(dyr + i), S::load(g + i));
          a1 = S::add(a1, g0);
          a2 = S::fma(g0, S::sub(S::load(xr + i), vmu), a2);
        }
        float s1 = S::hsum(S::add(a1, b1)), s2 = S::hsum(S::add(a2, b2));
        for (int64_t k = nv; k < D; ++k) {
          const float gg = dyr[k] * g[k];
          s1 += gg;
          s2 += gg * (xr[k] - mu);
        }
        A = rs;
        B = -rs * s1 * invD;
        C = -rs * rs * rs * s2 * invD;
      }
      float* dxr = kDx ? a.dx + r * D : nullptr;
      // one column block (vectors, then the scalar tail through simd::Scalar)
      auto cols = [&](auto tag, int64_t k) {
        using T = decltype(tag);
        const auto d = T::load(dyr + k);
        const auto xm = T::sub(T::load(xr + k), T::set1(mu));
        if constexpr (kDx) {
          auto v = T::fma(T::mul(d, T::load(g + k)), T::set1(A), T::fma(xm, T::set1(C), T::set1(B)));
          if constexpr (!kAssign) v = T::add(T::load(dxr + k), v);
          T::store(dxr + k, v);
        }
        if constexpr (kParams) {
          T::store(pg + k, T::fma(T::mul(d, xm), T::set1(rs), T::load(pg + k)));
          T::store(pb + k, T::add(T::load(pb + k), d));
        }
      };
      for (int64_t k = 0; k < nv; k += W) cols(S{}, k);
      for (int64_t k = nv; k < D; ++k) cols(simd::Scalar{}, k);
    }
  }

  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D_, 1)); }

  // Scale/B must hold exactly the normalised shape (leading 1s allowed).
  static void check_param(const NodeInfo& n, const Tensor& t, const Shape& norm,
                          const char* what) {
    Shape ts = t.shape;
    while (ts.size() > norm.size() && ts.front() == 1) ts.erase(ts.begin());
    Shape ns = norm;
    while (ns.size() > ts.size() && ns.front() == 1) ns.erase(ns.begin());
    PYEDGE_CHECK(ts == ns, n.where(), ": ", what, " has shape ", shape_str(t.shape),
                 ", expected the normalised shape ", shape_str(norm));
  }
};
PYEDGE_REGISTER_OP("LayerNormalization", LayerNorm);

}  // namespace
}  // namespace pyedge
