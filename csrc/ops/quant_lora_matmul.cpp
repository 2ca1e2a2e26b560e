// pyedge.LoraQuantMatMul: LoRA on a quantized frozen base (QLoRA), PEFT's arithmetic without
// a float copy of the base weight:
//   y = x·Wqᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ
// x [..., K]; A [r, K], B [N, r] in PEFT's layout; Wq [N, K] the base node's quantized weight.
// Inputs: x, A, B, then the base node's inputs after its activation, in its order:
//   base = "MatMulNBits": packed, scales, zero_points or "", bias or ""
//   base = "MatMulBnb4":  packed, absmax
// Attributes: base, the base node's own (K, N, bits, block_size, quant_type, ...), scale,
// dropout and salt (the mask stream of pyedge.LoraMatMul, ops/lora_adapter.h).
// Unlike LoraMatMul the adapter cannot be merged into the weight (that would expand it), so
// the adapter runs as two skinny products beside the quantized GEMM.
// Hidden outputs, with dropout only: the dropped input [M, K] and its keep mask.
#include <algorithm>
#include <cstring>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/lora_adapter.h"
#include "ops/op.h"
#include "ops/quant_gemm.h"

namespace pyedge {
namespace {

class LoraQuantMatMul : public Op {
 public:
  static constexpr size_t kX = 0, kA = 1, kB = 2, kQ = 3, kBias = 6;

  LoraQuantMatMul(const NodeInfo& n, const std::vector<Tensor>& in) {
    const std::string base = n.attrs.get_string("base", "");
    PYEDGE_CHECK(base == "MatMulNBits" || base == "MatMulBnb4", n.where(),
                 ": attribute 'base' must be \"MatMulNBits\" or \"MatMulBnb4\", got \"", base,
                 "\"");
    const bool bnb4 = base == "MatMulBnb4";
    check_num_inputs(n, in, 5, bnb4 ? 5 : 7);
    for (size_t i = 0; i < 3; ++i) check_float(n, in[i], "x, lora_A and lora_B");
    if (bnb4) {
      spec_ = bnb4_spec(n, in, kQ);
      PYEDGE_CHECK(n.attrs.get_int("transB", 1) != 0, n.where(),
                   ": a MatMulBnb4 base with transB = 0 is not a projection LoRA can wrap");
    } else {
      spec_ = nbits_spec(n, in, kQ);
      has_bias_ = in.size() > kBias && n.has_input(kBias);
      if (has_bias_) {
        check_float(n, in[kBias], "bias");
        PYEDGE_CHECK(in[kBias].numel() == spec_.N, n.where(), ": bias must have N = ", spec_.N,
                     " elements, got ", shape_str(in[kBias].shape));
      }
    }
    scale_ = float(n.attrs.get_float("scale", 1.0));
    dropout_ = float(n.attrs.get_float("dropout", 0.0));
    salt_ = uint64_t(n.attrs.get_int("salt", 0));
    PYEDGE_CHECK(dropout_ >= 0.f && dropout_ < 1.f, n.where(), ": dropout must be in [0, 1)");
    K_ = spec_.K;
    N_ = spec_.N;
    const Shape& x = in[kX].shape;
    PYEDGE_CHECK(!x.empty() && x.back() == K_, n.where(), ": x ", shape_str(x),
                 " must end in K = ", K_);
    M_ = numel(x) / K_;
    PYEDGE_CHECK(in[kA].rank() == 2 && in[kA].shape[1] == K_, n.where(),
                 ": lora_A must be [r, ", K_, "], got ", shape_str(in[kA].shape));
    r_ = in[kA].shape[0];
    PYEDGE_CHECK(in[kB].rank() == 2 && in[kB].shape[0] == N_ && in[kB].shape[1] == r_,
                 n.where(), ": lora_B must be [", N_, ", ", r_, "], got ",
                 shape_str(in[kB].shape));
    fwd_ = quant_gemm_tiling(N_, K_);
    bwd_ = quant_gemm_tiling(K_, N_);
    grads_ = AdapterGrads(M_, K_, N_, r_);
    Shape y(x.begin(), x.end() - 1);
    y.push_back(N_);
    outputs = {make_output(DType::f32, y)};
    if (dropout_ > 0.f) {
      outputs.push_back(make_output(DType::f32, {M_, K_}));  // dropped x
      outputs.push_back(make_output(DType::u8, {M_, K_}));   // keep mask
    }
    n_visible = 1;
  }

  bool foldable() const override { return dropout_ == 0.f; }

  // The quantized GEMM's panels, then t = drop(x)·Aᵀ [M, r].
  size_t forward_scratch_bytes() const override {
    return (fwd_.scratch_floats() + size_t(M_ * r_)) * 4;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* x = in[kX].ptr<float>();
    float* y = out[0].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    if (has_bias_) {  // rows pre-filled with the bias; the GEMM adds onto them
      const float* b = in[kBias].ptr<float>();
      parallel_for(M_, 64, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) std::memcpy(y + i * N_, b, size_t(N_) * sizeof(float));
      });
    }
    quant_gemm_xwt(view(spec_, in), M_, x, has_bias_ ? 1.f : 0.f, y, N_, fwd_, scratch);
    const float* xa = x;
    if (dropout_ > 0.f && ctx.training) {
      lora_dropout(x, M_ * K_, dropout_, ctx.seed, salt_, out[1].ptr<float>(),
                   out[2].ptr<uint8_t>());
      xa = out[1].ptr<float>();
    } else if (dropout_ > 0.f) {
      std::memcpy(out[1].data, x, size_t(M_ * K_) * 4);
      std::memset(out[2].data, 1, size_t(M_ * K_));
    }
    float* t = scratch + fwd_.scratch_floats();
    sgemm(false, true, M_, r_, K_, 1.f, xa, K_, in[kA].ptr<float>(), K_, 0.f, t, r_);  // t = x·Aᵀ
    sgemm(false, true, M_, N_, r_, scale_, t, r_, in[kB].ptr<float>(), r_, 1.f, y, N_);  // y += s·t·Bᵀ
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  bool differentiable_input(size_t i) const override {
    return i == kX || i == kA || i == kB || (has_bias_ && i == kBias);
  }
  // The adapter-gradient pass, then for dx the quantized GEMM's panels and dt [M, r].
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    size_t f = grads_.scratch_floats();
    if (!ng.empty() && ng[kX]) f += bwd_.scratch_floats() + size_t(M_ * r_);
    return f * 4;
  }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].ptr<float>();
    const float* A = in[kA].ptr<float>();
    const float* B = in[kB].ptr<float>();
    const float* xa = dropout_ > 0.f ? out[1].ptr<float>() : in[kX].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    if (din[kA].data || din[kB].data)
      grads_.run(xa, dy, A, B, scale_, din[kA].ptr<float>(), ctx.fresh(kA),
                 din[kB].ptr<float>(), ctx.fresh(kB), scratch);
    if (has_bias_ && din.size() > kBias && din[kBias].data)
      quant_bias_grad(dy, M_, N_, ctx.fresh(kBias), din[kBias].ptr<float>());
    if (!din[kX].data) return;
    // dx (+)= dY·Wq + [keep ∘] (dt·A) [/ (1 − p)], dt = s·dY·B
    float* dx = din[kX].ptr<float>();
    float* panels = scratch + grads_.scratch_floats();
    float* dt = panels + bwd_.scratch_floats();
    quant_gemm_xw(view(spec_, in), M_, dy, ctx.fresh(kX) ? 0.f : 1.f, dx, bwd_, panels);
    sgemm(false, false, M_, r_, N_, scale_, dy, N_, B, r_, 0.f, dt, r_);
    if (dropout_ == 0.f) sgemm(false, false, M_, K_, r_, 1.f, dt, r_, A, K_, 1.f, dx, K_);
    else lora_dropout_dx(dt, A, out[2].ptr<uint8_t>(), dropout_, M_, K_, r_, dx);
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    const bool adapter = ng[kA] || ng[kB];
    r[kX] = dropout_ == 0.f && adapter;  // the adapter pass reads x (else the dropped copy)
    r[kA] = ng[kX] || ng[kB];            // dx and dB (through t) read A
    r[kB] = ng[kX] || ng[kA];            // dx and dA (through dt) read B
    for (size_t i = kQ; i < r.size() && i < kBias; ++i) r[i] = ng[kX];  // the weight, for dx
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    std::vector<bool> r(outputs.size(), true);  // the dropped x and its mask
    r[0] = false;
    return r;
  }

  // base GEMM + the adapter's two skinny products (recompute planning, graph/plan_recompute)
  double flops() const override {
    return 2.0 * double(M_) * (double(N_) * double(K_) + double(r_) * double(K_ + N_));
  }

 private:
  QuantWeightSpec spec_;
  bool has_bias_ = false;
  float scale_ = 1.f, dropout_ = 0.f;
  uint64_t salt_ = 0;
  int64_t M_ = 0, K_ = 0, N_ = 0, r_ = 0;
  QuantGemmTiling fwd_, bwd_;
  AdapterGrads grads_;
};
PYEDGE_REGISTER_OP("pyedge.LoraQuantMatMul", LoraQuantMatMul);

}  // namespace
}  // namespace pyedge
