// pyedge.Rotary(X, cos, sin): rotary position embedding of Q or K in one op, what the
// exporters spell Slice → Slice → Neg → Concat → Mul(sin) + Mul(cos) (rotary_fusion.py), for
// the half-split convention (Llama, Qwen2/3, Mistral, Gemma, Phi-3, SmolLM3, GPT-NeoX):
//   Y = X ∘ cos + rotate_half(X) ∘ sin  on the first rotary_dim channels,
//   Y = X                               on the others (partial rotary: GPT-NeoX rotary_pct,
//                                        Phi-3's partial_rotary_factor),
// rotate_half(x) = [−x[h:rd], x[:h]], h = rotary_dim / 2 (rotary_kernels.h has the row maths).
//
// Shapes (attribute layout):
//   X      [B, H, T, D] (layout "bhtd", after the head split; the default)
//          or [B, T, H, D] (layout "bthd", before the head-split Transpose)
//   cos, sin  [Bc, Tc, rd] with Bc = 1 or B (one table per sequence or shared) and Tc = T
//          (or 1: one position for all, as broadcasting allows), also given as
//          [T, rd] or with the singleton head axis of the exporters' Unsqueeze ([Bc, 1, T, rd]
//          for bhtd, [Bc, T, 1, rd] for bthd). rotary_dim = rd, even, <= D.
//   Y      X's shape.
// cos and sin are computed once per model from the position ids and are inputs here, so the
// op needs no position attribute and any scaling (NTK, YaRN, Llama 3's) stays in the graph.
//
// Why: the chain reads and writes Q and K five times forward and again backward and keeps
// the slices and products alive; this op makes one pass each way and keeps nothing: the
// backward (dX = dY ∘ cos + rotate_halfᵀ(dY ∘ sin)) reads cos and sin only, not X.
// cos and sin take no gradient: a plan that would need one is refused (the fusion never
// rewrites a rotary whose tables depend on a trained tensor).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/rotary_kernels.h"

namespace pyedge {
namespace {

class Rotary : public Op {
 public:
  Rotary(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 3, 3);
    check_float(n, in[0], "X");
    check_float(n, in[1], "cos");
    check_float(n, in[2], "sin");
    const std::string layout = n.attrs.get_string("layout", "bhtd");
    PYEDGE_CHECK(layout == "bhtd" || layout == "bthd", where_,
                 ": layout must be 'bhtd' or 'bthd', got '", layout, "'");
    heads_inner_ = layout == "bthd";
    const Shape& xs = in[0].shape;
    PYEDGE_CHECK(xs.size() == 4, where_, ": X must be 4-D ([B, H, T, D] for layout bhtd, "
                 "[B, T, H, D] for bthd), got ", shape_str(xs));
    B_ = xs[0];
    H_ = heads_inner_ ? xs[2] : xs[1];
    T_ = heads_inner_ ? xs[1] : xs[2];
    D_ = xs[3];
    PYEDGE_CHECK(in[1].shape == in[2].shape, where_, ": cos ", shape_str(in[1].shape),
                 " and sin ", shape_str(in[2].shape), " must have the same shape");
    Shape cs = in[1].shape;
    // drop the exporters' singleton head axis: [Bc, 1, T, rd] (bhtd) / [Bc, T, 1, rd] (bthd)
    if (cs.size() == 4) {
      const size_t ax = heads_inner_ ? 2 : 1;
      PYEDGE_CHECK(cs[ax] == 1, where_, ": 4-D cos/sin must have a 1 on the head axis (",
                   heads_inner_ ? "[Bc, T, 1, rd]" : "[Bc, 1, T, rd]", "), got ", shape_str(cs));
      cs.erase(cs.begin() + long(ax));
    }
    if (cs.size() == 2) cs.insert(cs.begin(), 1);
    PYEDGE_CHECK(cs.size() == 3, where_, ": cos/sin must be [Bc, T, rotary_dim] (or [T, rd], "
                 "or 4-D with a singleton head axis), got ", shape_str(in[1].shape));
    Bc_ = cs[0];
    Tc_ = cs[1];
    rd_ = cs[2];
    PYEDGE_CHECK((Bc_ == 1 || Bc_ == B_) && (Tc_ == 1 || Tc_ == T_), where_, ": cos/sin ",
                 shape_str(in[1].shape), " do not match X ", shape_str(xs),
                 " (need batch 1 or ", B_, " and 1 or ", T_, " positions)");
    PYEDGE_CHECK(rd_ > 0 && rd_ % 2 == 0 && rd_ <= D_, where_, ": rotary_dim (cos/sin's last "
                 "dim) must be even and in 1..", D_, " (X's head size), got ", rd_);
    outputs = {make_output(DType::f32, xs)};
    n_visible = 1;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    const float* c = in[1].ptr<float>();
    const float* s = in[2].ptr<float>();
    float* y = out[0].ptr<float>();
    const int64_t D = D_, h = rd_ / 2;
    parallel_for(rows(), grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t t = table_row(r);
        rotk::fwd_row<simd::Native>(x + r * D, c + t, s + t, y + r * D, h, D);
      }
    });
  }

  bool has_backward() const override { return true; }
  bool assigns_fresh_grads() const override { return true; }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    PYEDGE_CHECK(!(din[1].data || din[2].data), where_, ": cos and sin take no gradient");
    if (!din[0].data) return;
    const float* c = in[1].ptr<float>();
    const float* s = in[2].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t D = D_, h = rd_ / 2;
    const bool assign = ctx.fresh(0);
    parallel_for(rows(), grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t t = table_row(r);
        if (assign) rotk::bwd_row<simd::Native, true>(dy + r * D, c + t, s + t, dx + r * D, h, D);
        else rotk::bwd_row<simd::Native, false>(dy + r * D, c + t, s + t, dx + r * D, h, D);
      }
    });
  }

  // dX needs cos and sin only: X is not kept for the backward. Refused at plan time: a
  // gradient for cos or sin (their tables depend on a trained tensor).
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    PYEDGE_CHECK(!(ng.size() > 2 && (ng[1] || ng[2])), where_,
                 ": cos and sin depend on a trained tensor, but the fused rotary op gives "
                 "them no gradient; run the model with fuse=False");
    return {false, true, true};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

  double flops() const override { return 3.0 * double(rows()) * double(rd_); }

 private:
  std::string where_;
  bool heads_inner_ = false;  // layout bthd
  int64_t B_ = 0, H_ = 0, T_ = 0, D_ = 0, Bc_ = 1, Tc_ = 1, rd_ = 0;

  int64_t rows() const { return B_ * H_ * T_; }
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D_, 1)); }

  // Offset of row r's cos/sin vector [rd] in the [Bc, Tc, rd] tables.
  int64_t table_row(int64_t r) const {
    const int64_t t = Tc_ == 1 ? 0 : heads_inner_ ? (r / H_) % T_ : r % T_;
    const int64_t b = Bc_ == 1 ? 0 : r / (H_ * T_);
    return (b * Tc_ + t) * rd_;
  }
};
PYEDGE_REGISTER_OP("pyedge.Rotary", Rotary);

}  // namespace
}  // namespace pyedge
