// pyedge.LoraMatMul: the LoRA adapter fused into its base projection, as PEFT computes it:
//   y = x·W (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ
// x [..., K]; W [K, N] (MatMul layout, trans_w=0) or [N, K] (Gemm transB / nn.Linear, trans_w=1);
// A [r, K] and B [N, r] in PEFT's layout; bias [N] optional.
// Without dropout the op runs as y = x·W' with the merged weight W' = W + s·(B·A) in W's
// layout (rebuilt each forward and backward: A and B change every step; 2·K·N·r FLOPs), so the
// adapter costs no passes over the [M, N] output, and dx = dY·W'ᵀ gets its adapter share from
// the same GEMM. PEFT's sum x·W + s·(x·Aᵀ)·Bᵀ differs from it only by rounding.
// Under a memory budget that the planner cannot meet otherwise (reduce_scratch) the op takes
// that unmerged path in forward and backward: scratch [M, r] instead of the K×N merged weight
// (W8's down projection: 55 MB), 2·M·r·(K+N) FLOPs instead of 2·K·N·r; results differ from
// the merged path by rounding only (as PEFT's do), and a plan never mixes the two.
// Hidden outputs, with dropout only: the dropped input [M, K] and its keep mask.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/lora_adapter.h"
#include "ops/op.h"

namespace pyedge {
namespace {

class LoraMatMul : public Op {
 public:
  LoraMatMul(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 4, 5);
    for (size_t i = 0; i < 4; ++i) check_float(n, in[i], "inputs");
    const Shape& x = in[0].shape;
    PYEDGE_CHECK(!x.empty(), n.where(), ": x must have rank >= 1");
    trans_w_ = n.attrs.get_int("trans_w", 0) != 0;
    scale_ = float(n.attrs.get_float("scale", 1.0));
    dropout_ = float(n.attrs.get_float("dropout", 0.0));
    salt_ = uint64_t(n.attrs.get_int("salt", 0));
    PYEDGE_CHECK(dropout_ >= 0.f && dropout_ < 1.f, n.where(), ": dropout must be in [0, 1)");
    K_ = x.back();
    M_ = numel(x) / std::max<int64_t>(K_, 1);
    PYEDGE_CHECK(in[1].rank() == 2, n.where(), ": W must be 2-D");
    int64_t wk = trans_w_ ? in[1].shape[1] : in[1].shape[0];
    N_ = trans_w_ ? in[1].shape[0] : in[1].shape[1];
    PYEDGE_CHECK(wk == K_, n.where(), ": x ", shape_str(x), " does not match W ",
                 shape_str(in[1].shape));
    PYEDGE_CHECK(in[2].rank() == 2 && in[2].shape[1] == K_, n.where(), ": lora_A must be [r, ",
                 K_, "], got ", shape_str(in[2].shape));
    r_ = in[2].shape[0];
    PYEDGE_CHECK(in[3].rank() == 2 && in[3].shape[0] == N_ && in[3].shape[1] == r_, n.where(),
                 ": lora_B must be [", N_, ", ", r_, "], got ", shape_str(in[3].shape));
    has_bias_ = in.size() > 4 && n.has_input(4);
    if (has_bias_)
      PYEDGE_CHECK(in[4].numel() == N_, n.where(), ": bias must have ", N_, " elements");
    // Without dropout y = x·(W + s·(B·A) in W's layout): one GEMM on a merged weight, once
    // the rows outnumber what building it costs (M·(K+N) adapter MACs against K·N).
    merged_fwd_ = dropout_ == 0.f && M_ * (K_ + N_) >= K_ * N_;
    grads_ = AdapterGrads(M_, K_, N_, r_);
    Shape y(x.begin(), x.end() - 1);
    y.push_back(N_);
    outputs = {make_output(DType::f32, y)};
    if (dropout_ > 0.f) {
      outputs.push_back(make_output(DType::f32, {M_, K_}));      // dropped x
      outputs.push_back(make_output(DType::u8, {M_, K_}));       // keep mask
    }
    n_visible = 1;
  }

  bool foldable() const override { return dropout_ == 0.f; }
  bool reduce_scratch() override {
    if (dropout_ > 0.f || unmerged_) return false;  // dropout: unmerged already
    unmerged_ = true;
    merged_fwd_ = false;
    return true;
  }
  // x·W plus the adapter path x·Aᵀ·Bᵀ.
  double flops() const override {
    return 2.0 * double(M_) * (double(K_) * double(N_) + double(r_) * double(K_ + N_));
  }

  // The merged weight, or t = drop(x)·Aᵀ [M, r].
  size_t forward_scratch_bytes() const override {
    return size_t(merged_fwd_ ? K_ * N_ : M_ * r_) * 4;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    const float* w = in[1].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    if (merged_fwd_) w = merged_weight(in, scratch);
    if (has_bias_) {  // rows pre-filled with the bias; the GEMM adds onto them (beta 1)
      const float* b = in[4].ptr<float>();
      parallel_for(M_, 64, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) std::memcpy(y + i * N_, b, size_t(N_) * sizeof(float));
      });
    }
    sgemm(false, trans_w_, M_, N_, K_, 1.f, x, K_, w, in[1].shape[1], has_bias_ ? 1.f : 0.f, y,
          N_);
    if (merged_fwd_) return;
    const float* xa = x;
    if (dropout_ > 0.f && ctx.training) {
      float* xd = out[1].ptr<float>();
      uint8_t* keep = out[2].ptr<uint8_t>();
      lora_dropout(x, M_ * K_, dropout_, ctx.seed, salt_, xd, keep);
      xa = xd;
    } else if (dropout_ > 0.f) {
      std::memcpy(out[1].data, x, size_t(M_ * K_) * 4);
      std::memset(out[2].data, 1, size_t(M_ * K_));
    }
    float* t = scratch;
    sgemm(false, true, M_, r_, K_, 1.f, xa, K_, in[2].ptr<float>(), K_, 0.f, t, r_);   // t = x·Aᵀ
    sgemm(false, true, M_, N_, r_, scale_, t, r_, in[3].ptr<float>(), r_, 1.f, y, N_); // y += s·t·Bᵀ
  }

  bool has_backward() const override { return true; }
  // The adapter-gradient pass, then for dx the merged weight (or dt [M, r] with dropout).
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    if (ng.empty() || !ng[0]) return grads_.scratch_floats() * 4;
    if (dropout_ > 0.f || unmerged_) return (grads_.scratch_floats() + M_ * r_) * 4;
    return (grads_.scratch_floats() + K_ * N_) * 4 + skip_zero_rows_scratch_bytes(M_, K_, N_);
  }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].ptr<float>();
    const float* A = in[2].ptr<float>();
    const float* B = in[3].ptr<float>();
    const float* xa = dropout_ > 0.f ? out[1].ptr<float>() : in[0].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    float* dx_scratch = scratch + grads_.scratch_floats();
    if (din[2].data || din[3].data)
      grads_.run(xa, dy, A, B, scale_, din[2].ptr<float>(), ctx.fresh(2), din[3].ptr<float>(),
                 ctx.fresh(3), scratch);
    if (din[1].data) {  // frozen in normal use; supported when W is trained too
      const float bw = ctx.fresh(1) ? 0.f : 1.f;
      if (trans_w_)  // dW [N, K] (+)= dYᵀ · x
        sgemm(true, false, N_, K_, M_, 1.f, dy, N_, in[0].ptr<float>(), K_, bw, din[1].ptr<float>(), K_);
      else  // dW [K, N] (+)= xᵀ · dY
        sgemm(true, false, K_, N_, M_, 1.f, in[0].ptr<float>(), K_, dy, N_, bw, din[1].ptr<float>(), N_);
    }
    if (has_bias_ && din.size() > 4 && din[4].data) {
      float* db = din[4].ptr<float>();
      if (ctx.fresh(4)) std::fill(db, db + N_, 0.f);
      for (int64_t i = 0; i < M_; ++i)
        for (int64_t j = 0; j < N_; ++j) db[j] += dy[i * N_ + j];
    }
    if (!din[0].data) return;
    float* dx = din[0].ptr<float>();
    const float bx = ctx.fresh(0) ? 0.f : 1.f;
    if (dropout_ == 0.f && !unmerged_) {  // dx (+)= dY · op(W + s·B·A)ᵀ: the adapter's share in the same GEMM
      // (rows of dY the loss never reads skipped, blas.h)
      sgemm_skip_zero_rows(!trans_w_, M_, K_, N_, dy, N_, merged_weight(in, dx_scratch),
                           in[1].shape[1], bx, dx, K_, dx_scratch + K_ * N_);
      return;
    }
    // dx (+)= dY · op(W)ᵀ + keep ∘ (dt · A) / (1 − p), dt = s·dY·B
    sgemm(false, !trans_w_, M_, K_, N_, 1.f, dy, N_, in[1].ptr<float>(), in[1].shape[1], bx, dx,
          K_);
    float* dt = dx_scratch;
    sgemm(false, false, M_, r_, N_, scale_, dy, N_, B, r_, 0.f, dt, r_);
    if (dropout_ == 0.f) {  // unmerged: dx += dt [M, r] · A [r, K]
      sgemm(false, false, M_, K_, r_, 1.f, dt, r_, A, K_, 1.f, dx, K_);
      return;
    }
    lora_dropout_dx(dt, A, out[2].ptr<uint8_t>(), dropout_, M_, K_, r_, dx);
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    const bool adapter = ng[2] || ng[3];
    r[0] = (dropout_ == 0.f && adapter) || ng[1];  // the adapter pass and dW read x
    r[1] = ng[0];                                  // dx reads W
    r[2] = ng[0] || ng[3];                         // dx and dB (through t) read A
    r[3] = ng[0] || ng[2];                         // dx and dA (through dt) read B
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    std::vector<bool> r(outputs.size(), true);  // the dropped x and its mask
    r[0] = false;
    return r;
  }

 private:
  // W + s·(B·A) in W's layout ([N, K] with trans_w, else [K, N]) into `buf`.
  const float* merged_weight(const std::vector<Tensor>& in, float* buf) const {
    const float* A = in[2].ptr<float>();
    const float* B = in[3].ptr<float>();
    std::memcpy(buf, in[1].data, size_t(K_ * N_) * sizeof(float));
    if (trans_w_)  // [N, K] += s · B [N, r] · A [r, K]
      sgemm(false, false, N_, K_, r_, scale_, B, r_, A, K_, 1.f, buf, K_);
    else  // [K, N] += s · Aᵀ [K, r] · Bᵀ [r, N]
      sgemm(true, true, K_, N_, r_, scale_, A, K_, B, r_, 1.f, buf, N_);
    return buf;
  }

  bool trans_w_ = false, has_bias_ = false, merged_fwd_ = false;
  bool unmerged_ = false;  // reduce_scratch(): x·W + s·(x·Aᵀ)·Bᵀ, no merged weight
  float scale_ = 1.f, dropout_ = 0.f;
  uint64_t salt_ = 0;
  int64_t M_ = 0, K_ = 0, N_ = 0, r_ = 0;
  AdapterGrads grads_;
};
PYEDGE_REGISTER_OP("pyedge.LoraMatMul", LoraMatMul);

}  // namespace
}  // namespace pyedge
