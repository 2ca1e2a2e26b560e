// pyedge.DoraScale: DoRA's magnitude applied to a LoRA output, as PEFT computes it
// (peft/tuners/lora/dora.py, DoraLinearLayer):
//   y = z ∘ c (+ bias),   c[j] = m[j] / ‖(W + s·B·A)[j, :]‖,   z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ
// z [..., N] is pyedge.LoraMatMul's output (no bias); m [N] the magnitude vector; W the base
// weight ([N, K] with trans_w, else [K, N]); A [r, K], B [N, r]; bias [N] optional.
// PEFT detaches the weight norm ("weight_norm.detach()", section 4.3 of the DoRA paper), so
// W, A and B get no gradient here (theirs comes through z); m and z do:
//   dz = dy ∘ c,   dm[j] = Σ_i dy[i, j]·z[i, j] / ‖·‖_j,   dbias = Σ_i dy[i, :].
// Hidden outputs: c [N] and 1/‖·‖ [N], kept for the backward.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/parallel.h"
#include "common/simd.h"
#include "ops/blas.h"
#include "ops/dora_kernels.h"
#include "ops/op.h"

namespace pyedge {
namespace {

using S = simd::Native;

class DoraScale : public Op {
 public:
  DoraScale(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 5, 6);
    for (size_t i = 0; i < 5; ++i) check_float(n, in[i], "inputs");
    const Shape& z = in[0].shape;
    PYEDGE_CHECK(!z.empty(), n.where(), ": z must have rank >= 1");
    trans_w_ = n.attrs.get_int("trans_w", 0) != 0;
    scale_ = float(n.attrs.get_float("scale", 1.0));
    N_ = z.back();
    M_ = numel(z) / std::max<int64_t>(N_, 1);
    PYEDGE_CHECK(in[1].numel() == N_, n.where(), ": magnitude must have ", N_, " elements, got ",
                 shape_str(in[1].shape));
    PYEDGE_CHECK(in[2].rank() == 2, n.where(), ": W must be 2-D");
    const int64_t wn = trans_w_ ? in[2].shape[0] : in[2].shape[1];
    K_ = trans_w_ ? in[2].shape[1] : in[2].shape[0];
    PYEDGE_CHECK(wn == N_, n.where(), ": z ", shape_str(z), " does not match W ",
                 shape_str(in[2].shape), " (trans_w=", int(trans_w_), ")");
    PYEDGE_CHECK(in[3].rank() == 2 && in[3].shape[1] == K_, n.where(), ": lora_A must be [r, ",
                 K_, "], got ", shape_str(in[3].shape));
    r_ = in[3].shape[0];
    PYEDGE_CHECK(in[4].rank() == 2 && in[4].shape[0] == N_ && in[4].shape[1] == r_, n.where(),
                 ": lora_B must be [", N_, ", ", r_, "], got ", shape_str(in[4].shape));
    has_bias_ = in.size() > 5 && n.has_input(5);
    if (has_bias_) {
      check_float(n, in[5], "bias");
      PYEDGE_CHECK(in[5].numel() == N_, n.where(), ": bias must have ", N_, " elements");
    }
    outputs = {make_output(DType::f32, z), make_output(DType::f32, {N_}),
               make_output(DType::f32, {N_})};
    n_visible = 1;
  }

  // The merged weight's norms: a rank-r update of K·N plus its squares; then M·N scaling.
  double flops() const override {
    return 2.0 * double(N_) * double(K_) * double(r_ + 1) + double(M_) * double(N_);
  }
  size_t forward_scratch_bytes() const override { return size_t(N_ * K_) * 4; }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    float* merged = static_cast<float*>(ctx.scratch);  // W + s·B·A as [N, K]
    const float* W = in[2].ptr<float>();
    if (trans_w_) {
      std::memcpy(merged, W, size_t(N_ * K_) * sizeof(float));
    } else {  // W [K, N] -> [N, K]
      parallel_for(N_, 16, [&](int64_t s, int64_t e) {
        for (int64_t j = s; j < e; ++j)
          for (int64_t k = 0; k < K_; ++k) merged[j * K_ + k] = W[k * N_ + j];
      });
    }
    sgemm(false, false, N_, K_, r_, scale_, in[4].ptr<float>(), r_, in[3].ptr<float>(), K_, 1.f,
          merged, K_);
    const float* m = in[1].ptr<float>();
    float* c = out[1].ptr<float>();
    float* inv = out[2].ptr<float>();
    parallel_for(N_, 16, [&](int64_t s, int64_t e) {
      for (int64_t j = s; j < e; ++j) {
        inv[j] = 1.f / std::sqrt(dorak::sum_sq<S>(merged + j * K_, K_));
        c[j] = m[j] * inv[j];
      }
    });
    const float* z = in[0].ptr<float>();
    const float* b = has_bias_ ? in[5].ptr<float>() : nullptr;
    float* y = out[0].ptr<float>();
    parallel_for(M_, 16, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) dorak::scale_row<S>(z + i * N_, c, b, y + i * N_, N_);
    });
  }

  bool has_backward() const override { return true; }
  // z, m and the bias: W, A and B only feed the detached norm.
  bool differentiable_input(size_t i) const override {
    return (i == 0 || i == 1 || i == 5) && Op::differentiable_input(i);
  }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].ptr<float>();
    const float* z = in[0].ptr<float>();
    const float* c = out[1].ptr<float>();
    if (din[0].data) {
      float* dz = din[0].ptr<float>();
      const bool assign = ctx.fresh(0);
      parallel_for(M_, 16, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i)
          dorak::scale_row_bwd<S>(dy + i * N_, z + i * N_, c, dz + i * N_, assign, nullptr, N_);
      });
    }
    if (din[1].data) {  // dm = Σ_i dy∘z / ‖·‖ (rows in order: deterministic)
      float* dm = din[1].ptr<float>();
      std::vector<float> acc(size_t(N_), 0.f);
      for (int64_t i = 0; i < M_; ++i)
        dorak::scale_row_bwd<S>(dy + i * N_, z + i * N_, c, nullptr, false, acc.data(), N_);
      const float* inv = out[2].ptr<float>();
      const bool assign = ctx.fresh(1);
      for (int64_t j = 0; j < N_; ++j) dm[j] = (assign ? 0.f : dm[j]) + acc[size_t(j)] * inv[j];
    }
    if (has_bias_ && din.size() > 5 && din[5].data) {
      float* db = din[5].ptr<float>();
      if (ctx.fresh(5)) std::fill(db, db + N_, 0.f);
      for (int64_t i = 0; i < M_; ++i)
        for (int64_t j = 0; j < N_; ++j) db[j] += dy[i * N_ + j];
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = ng.size() > 1 && ng[1];  // dm reads z
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true, true};
  }

 private:
  bool trans_w_ = false, has_bias_ = false;
  float scale_ = 1.f;
  int64_t M_ = 0, K_ = 0, N_ = 0, r_ = 0;
};
PYEDGE_REGISTER_OP("pyedge.DoraScale", DoraScale);

}  // namespace
}  // namespace pyedge
