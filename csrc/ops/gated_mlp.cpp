// pyedge.SwiGLU(gate, up): the gated MLP's activation in one op, y = act(gate) · up, with
// attribute act = "silu" (SwiGLU: Llama, Qwen2, Mistral; the exporters write Sigmoid → Mul(g) →
// Mul(up)), "gelu" or "gelu_tanh" (GeGLU: Gemma; Gelu → Mul(up) once fuse_gelu has run).
// fusions.py: fuse_gated_mlp. gate and up have the same shape (no broadcasting).
// Why: the chain keeps σ(gate) and act(gate) for its backward and makes three passes each way;
// this op keeps nothing but its inputs and recomputes act in its one backward pass:
//   dgate = dy · up · act'(gate),  dup = dy · act(gate)   (gated_mlp_kernels.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>

#include "common/parallel.h"
#include "ops/gated_mlp_kernels.h"
#include "ops/op.h"

namespace pyedge {
namespace {

class SwiGLU : public Op {
 public:
  SwiGLU(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    check_float(n, in[0], "gate");
    check_float(n, in[1], "up");
    PYEDGE_CHECK(in[0].shape == in[1].shape, n.where(), ": gate ", shape_str(in[0].shape),
                 " and up ", shape_str(in[1].shape), " must have the same shape");
    const std::string a = n.attrs.get_string("act", "silu");
    act_ = a == "silu" ? gmk::kSilu : a == "gelu" ? gmk::kGelu : a == "gelu_tanh" ? gmk::kGeluTanh : -1;
    PYEDGE_CHECK(act_ >= 0, n.where(), ": act must be 'silu', 'gelu' or 'gelu_tanh', got '", a,
                 "'");
    n_ = in[0].numel();
    outputs = {make_output(DType::f32, in[0].shape)};
    n_visible = 1;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* g = in[0].ptr<float>();
    const float* u = in[1].ptr<float>();
    float* y = out[0].ptr<float>();
    over([&](int64_t b, int64_t e) {
      switch (act_) {
        case gmk::kSilu: return gmk::forward<simd::Native, gmk::kSilu>(g + b, u + b, y + b, e - b);
        case gmk::kGelu: return gmk::forward<simd::Native, gmk::kGelu>(g + b, u + b, y + b, e - b);
        default: return gmk::forward<simd::Native, gmk::kGeluTanh>(g + b, u + b, y + b, e - b);
      }
    });
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* g = in[0].ptr<float>();
    const float* u = in[1].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dg = din[0].data ? din[0].ptr<float>() : nullptr;
    float* du = din[1].data ? din[1].ptr<float>() : nullptr;
    if (!dg && !du) return;
    // One write mode for both: assign when every wanted gradient is fresh, else add (a fresh
    // one cleared first).
    const bool fg = dg && ctx.fresh(0), fu = du && ctx.fresh(1);
    const bool assign = (!dg || fg) && (!du || fu);
    over([&](int64_t b, int64_t e) {
      float* pg = dg ? dg + b : nullptr;
      float* pu = du ? du + b : nullptr;
      if (!assign) {
        if (fg) std::fill(pg, pg + (e - b), 0.f);
        if (fu) std::fill(pu, pu + (e - b), 0.f);
      }
      if (assign) run_bwd<true>(g + b, u + b, dy + b, pg, pu, e - b);
      else run_bwd<false>(g + b, u + b, dy + b, pg, pu, e - b);
    });
  }

  // gate always (act and act' are recomputed), up only for dgate.
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return {true, ng.size() > 0 && ng[0]};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

 private:
  int act_ = gmk::kSilu;
  int64_t n_ = 0;

  template <bool kAssign>
  void run_bwd(const float* g, const float* u, const float* dy, float* dg, float* du,
               int64_t n) const {
    switch (act_) {
      case gmk::kSilu: return gmk::backward<simd::Native, gmk::kSilu, kAssign>(g, u, dy, dg, du, n);
      case gmk::kGelu: return gmk::backward<simd::Native, gmk::kGelu, kAssign>(g, u, dy, dg, du, n);
      default: return gmk::backward<simd::Native, gmk::kGeluTanh, kAssign>(g, u, dy, dg, du, n);
    }
  }

  // body(begin, end) over the elements in chunks of whole 64-byte lines.
  template <typename F>
  void over(F&& body) const {
    constexpr int64_t kGrain = 4096;
    parallel_for((n_ + kGrain - 1) / kGrain, 1, [&](int64_t b, int64_t e) {
      body(b * kGrain, std::min(n_, e * kGrain));
    });
  }
};
PYEDGE_REGISTER_OP("pyedge.SwiGLU", SwiGLU);

}  // namespace
}  // namespace pyedge
