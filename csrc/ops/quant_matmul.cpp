// com.microsoft.MatMulNBits and com.microsoft.MatMulBnb4: MatMul against a frozen quantized
// weight W [N, K] that stays packed (ops/quant_gemm.h holds the formats).
//   Y [..., N] = A [..., K] · Wᵀ (+ bias [N], MatMulNBits only)
//   MatMulBnb4 with transB = 0 (what ORT's training graphs use for the gradient):
//   Y [..., K] = A [..., N] · W
// Backward: dA only (the packed weight, scales and zero points are constants); dBias = the
// column sums of dY when the bias is a float input that needs a gradient.
// Inputs, MatMulNBits: A, B, scales, zero_points?, g_idx? (refused), bias?.
//         MatMulBnb4:  A, B, absmax. Attributes as ONNX Runtime documents them;
//         accuracy_level and training_mode do not change the result here.
#include <algorithm>
#include <cstring>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/quant_gemm.h"

namespace pyedge {

// Column sums of dY [M, N] into db [N] (assign when fresh, else add).
void quant_bias_grad(const float* dy, int64_t M, int64_t N, bool fresh, float* db) {
  parallel_for(N, 256, [&](int64_t j0, int64_t j1) {
    if (fresh) std::fill(db + j0, db + j1, 0.f);
    for (int64_t i = 0; i < M; ++i) {
      const float* r = dy + i * N;
      for (int64_t j = j0; j < j1; ++j) db[j] += r[j];
    }
  });
}

namespace {

class QuantMatMul : public Op {
 public:
  QuantMatMul(const NodeInfo& n, const std::vector<Tensor>& in) {
    const bool bnb4 = n.op_type == "MatMulBnb4";
    check_num_inputs(n, in, 3, bnb4 ? 3 : 6);
    check_float(n, in[0], "A");
    if (bnb4) {
      spec_ = bnb4_spec(n, in, 1);
      trans_b_ = n.attrs.get_int("transB", 1) != 0;
    } else {
      spec_ = nbits_spec(n, in, 1);
      PYEDGE_CHECK(!n.has_input(4), n.where(),
                   ": g_idx (act-order quantization) is not supported; quantize without it");
      has_bias_ = in.size() > 5 && n.has_input(5);
      if (has_bias_) {
        check_float(n, in[5], "bias");
        PYEDGE_CHECK(in[5].numel() == spec_.N, n.where(), ": bias must have N = ", spec_.N,
                     " elements, got ", shape_str(in[5].shape));
      }
    }
    const Shape& a = in[0].shape;
    PYEDGE_CHECK(!a.empty(), n.where(), ": A must have rank >= 1");
    const int64_t in_dim = trans_b_ ? spec_.K : spec_.N, out_dim = trans_b_ ? spec_.N : spec_.K;
    PYEDGE_CHECK(a.back() == in_dim, n.where(), ": A ", shape_str(a), " must end in ",
                 trans_b_ ? "K = " : "N = ", in_dim);
    M_ = numel(a) / in_dim;
    fwd_ = quant_gemm_tiling(out_dim, in_dim);
    bwd_ = quant_gemm_tiling(in_dim, out_dim);
    Shape y(a.begin(), a.end() - 1);
    y.push_back(out_dim);
    outputs = {make_output(DType::f32, y)};
    n_visible = 1;
  }

  size_t forward_scratch_bytes() const override { return fwd_.scratch_floats() * 4; }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const QuantWeight w = view(spec_, in);
    const float* a = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    float* scratch = static_cast<float*>(ctx.scratch);
    if (!trans_b_) return quant_gemm_xw(w, M_, a, 0.f, y, fwd_, scratch);
    if (has_bias_) {  // rows pre-filled with the bias; the GEMM adds onto them
      const float* b = in[5].ptr<float>();
      const int64_t N = spec_.N;
      parallel_for(M_, 64, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) std::memcpy(y + i * N, b, size_t(N) * sizeof(float));
      });
    }
    quant_gemm_xwt(w, M_, a, has_bias_ ? 1.f : 0.f, y, spec_.N, fwd_, scratch);
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0 || (has_bias_ && i == 5); }
  size_t backward_scratch_bytes(const std::vector<bool>& ng) const override {
    return !ng.empty() && ng[0] ? bwd_.scratch_floats() * 4 : 0;
  }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].ptr<float>();
    if (has_bias_ && din.size() > 5 && din[5].data)
      quant_bias_grad(dy, M_, spec_.N, ctx.fresh(5), din[5].ptr<float>());
    if (!din[0].data) return;
    const QuantWeight w = view(spec_, in);
    const float beta = ctx.fresh(0) ? 0.f : 1.f;
    float* scratch = static_cast<float*>(ctx.scratch);
    float* da = din[0].ptr<float>();
    if (trans_b_) quant_gemm_xw(w, M_, dy, beta, da, bwd_, scratch);   // dA = dY · W
    else quant_gemm_xwt(w, M_, dy, beta, da, spec_.N, bwd_, scratch);  // dA = dY · Wᵀ
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), false);
    for (size_t i = 1; i < r.size() && i < 5; ++i) r[i] = ng[0];  // the weight, for dA
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }
  // A GEMM's cost: the recompute planner must not take it for a cheap elementwise op.
  double flops() const override { return 2.0 * double(M_) * double(spec_.N) * double(spec_.K); }

 private:
  QuantWeightSpec spec_;
  bool trans_b_ = true, has_bias_ = false;
  int64_t M_ = 0;
  QuantGemmTiling fwd_, bwd_;
};
PYEDGE_REGISTER_OP("com.microsoft.MatMulNBits", QuantMatMul);
PYEDGE_REGISTER_OP("com.microsoft.MatMulBnb4", QuantMatMul);

}  // namespace
}  // namespace pyedge
