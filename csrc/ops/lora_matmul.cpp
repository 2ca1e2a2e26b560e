// pyedge.LoraMatMul: the LoRA adapter fused into its base projection, as PEFT computes it:
//   y = x·W (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ
// x [..., K]; W [K, N] (MatMul layout, trans_w=0) or [N, K] (Gemm transB / nn.Linear, trans_w=1);
// A [r, K] and B [N, r] in PEFT's layout; bias [N] optional.
// Hidden outputs: t = drop(x)·Aᵀ [M, r] (needed for dB), and with dropout the dropped input
// [M, K] and its keep mask.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/hash.h"
#include "common/parallel.h"
#include "ops/blas.h"
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
    Shape y(x.begin(), x.end() - 1);
    y.push_back(N_);
    outputs = {make_output(DType::f32, y), make_output(DType::f32, {M_, r_})};
    if (dropout_ > 0.f) {
      outputs.push_back(make_output(DType::f32, {M_, K_}));      // dropped x
      outputs.push_back(make_output(DType::u8, {M_, K_}));       // keep mask
    }
    n_visible = 1;
  }

  bool foldable() const override { return dropout_ == 0.f; }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    float* t = out[1].ptr<float>();
    if (has_bias_) {  // rows pre-filled with the bias; the GEMM adds onto them (beta 1)
      const float* b = in[4].ptr<float>();
      parallel_for(M_, 64, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) std::memcpy(y + i * N_, b, size_t(N_) * sizeof(float));
      });
    }
    sgemm(false, trans_w_, M_, N_, K_, 1.f, x, K_, in[1].ptr<float>(), in[1].shape[1],
          has_bias_ ? 1.f : 0.f, y, N_);
    const float* xa = x;
    if (dropout_ > 0.f && ctx.training) {
      float* xd = out[2].ptr<float>();
      uint8_t* keep = out[3].ptr<uint8_t>();
      uint64_t seed = splitmix64(ctx.seed ^ splitmix64(salt_));
      float inv = 1.f / (1.f - dropout_);
      uint64_t threshold = uint64_t(double(dropout_) * 18446744073709551616.0);
      parallel_for(M_ * K_, 1 << 14, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) {
          keep[i] = splitmix64(seed + uint64_t(i)) >= threshold;
          xd[i] = keep[i] ? x[i] * inv : 0.f;
        }
      });
      xa = xd;
    } else if (dropout_ > 0.f) {
      std::memcpy(out[2].data, x, size_t(M_ * K_) * 4);
      std::memset(out[3].data, 1, size_t(M_ * K_));
    }
    sgemm(false, true, M_, r_, K_, 1.f, xa, K_, in[2].ptr<float>(), K_, 0.f, t, r_);   // t = x·Aᵀ
    sgemm(false, true, M_, N_, r_, scale_, t, r_, in[3].ptr<float>(), r_, 1.f, y, N_); // y += s·t·Bᵀ
  }

  bool has_backward() const override { return true; }
  size_t backward_scratch_bytes(const std::vector<bool>&) const override {
    return size_t(M_ * r_) * 4;
  }
  bool assigns_fresh_grads() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].ptr<float>();
    // Fresh (unzeroed) buffers: dx is overwritten by its first GEMM; the rest are cleared.
    for (size_t k = 1; k < din.size(); ++k)
      if (din[k].data && ctx.fresh(k))
        std::fill(din[k].ptr<float>(), din[k].ptr<float>() + din[k].numel(), 0.f);
    const float* t = out[1].ptr<float>();
    const float* xa = dropout_ > 0.f ? out[2].ptr<float>() : in[0].ptr<float>();
    bool need_dt = din[0].data || din[2].data;
    float* dt = static_cast<float*>(ctx.scratch);
    if (need_dt)  // dt [M, r] = s · dY [M, N] · B [N, r]
      sgemm(false, false, M_, r_, N_, scale_, dy, N_, in[3].ptr<float>(), r_, 0.f, dt, r_);
    if (din[3].data)  // dB [N, r] += s · dYᵀ [N, M] · t [M, r]
      sgemm(true, false, N_, r_, M_, scale_, dy, N_, t, r_, 1.f, din[3].ptr<float>(), r_);
    if (din[2].data)  // dA [r, K] += dtᵀ [r, M] · drop(x) [M, K]
      sgemm(true, false, r_, K_, M_, 1.f, dt, r_, xa, K_, 1.f, din[2].ptr<float>(), K_);
    if (din[1].data) {  // frozen in normal use; supported when W is trained too
      if (trans_w_)  // dW [N, K] += dYᵀ · x
        sgemm(true, false, N_, K_, M_, 1.f, dy, N_, in[0].ptr<float>(), K_, 1.f, din[1].ptr<float>(), K_);
      else  // dW [K, N] += xᵀ · dY
        sgemm(true, false, K_, N_, M_, 1.f, in[0].ptr<float>(), K_, dy, N_, 1.f, din[1].ptr<float>(), N_);
    }
    if (has_bias_ && din.size() > 4 && din[4].data) {
      float* db = din[4].ptr<float>();
      for (int64_t i = 0; i < M_; ++i)
        for (int64_t j = 0; j < N_; ++j) db[j] += dy[i * N_ + j];
    }
    if (din[0].data) {
      float* dx = din[0].ptr<float>();
      // dx += dY · op(W)ᵀ
      sgemm(false, !trans_w_, M_, K_, N_, 1.f, dy, N_, in[1].ptr<float>(), in[1].shape[1],
            ctx.fresh(0) ? 0.f : 1.f, dx, K_);
      if (dropout_ == 0.f) {  // dx += dt · A
        sgemm(false, false, M_, K_, r_, 1.f, dt, r_, in[2].ptr<float>(), K_, 1.f, dx, K_);
      } else {
        const uint8_t* keep = out[3].ptr<uint8_t>();
        const float* A = in[2].ptr<float>();
        float inv = 1.f / (1.f - dropout_);
        parallel_for(M_, 16, [&](int64_t s, int64_t e) {
          for (int64_t i = s; i < e; ++i)
            for (int64_t k = 0; k < K_; ++k) {
              if (!keep[i * K_ + k]) continue;
              float acc = 0.f;
              for (int64_t q = 0; q < r_; ++q) acc += dt[i * r_ + q] * A[q * K_ + k];
              dx[i * K_ + k] += acc * inv;
            }
        });
      }
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    r[0] = dropout_ == 0.f && ng[2];        // dA reads x (or the saved dropped x)
    r[0] = r[0] || (ng.size() > 1 && ng[1]);
    r[1] = ng[0];                           // dx reads W
    r[2] = ng[0];                           // dx reads A
    r[3] = ng[0] || ng[2];                  // dt reads B
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    std::vector<bool> r(outputs.size(), true);
    r[0] = false;
    return r;
  }

 private:
  bool trans_w_ = false, has_bias_ = false;
  float scale_ = 1.f, dropout_ = 0.f;
  uint64_t salt_ = 0;
  int64_t M_ = 0, K_ = 0, N_ = 0, r_ = 0;
};
PYEDGE_REGISTER_OP("pyedge.LoraMatMul", LoraMatMul);

}  // namespace
}  // namespace pyedge
