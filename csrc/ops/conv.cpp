// Conv (1D / 2D): im2col + SGEMM per group and per sample (large planes) or per block of
// samples side by side (small planes, see batch_), a direct kernel for depthwise convs, and no
// im2col at all for 1x1 stride-1 unpadded convs one sample at a time.
//   x [N, C, (H,) W], w [M, C/group, (KH,) KW], b [M]  ->  y [N, M, (OH,) OW]
// Backward: dW += dY·colᵀ, dX += col2im(Wᵀ·dY), dB += Σ dY, each only when wanted (frozen
// weights skip their GEMM). Threads: see over_samples.
#include <algorithm>
#include <cstring>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/conv_im2col.h"

namespace pyedge {
namespace {

// Unit-stride depthwise kernels. A "tap row" is out[o] += Σ_j w[j]·in[o + off + j·D] for o in
// [0, O), skipping taps whose index falls outside [0, I): forward uses in = x, off = -pad,
// D = dilation; dX uses the gather form in = dy, off = +pad, D = -dilation. Where every tap is
// valid ([A, E)), all taps run in one vectorised pass with the kernel size fixed at compile
// time for the common sizes; the few edge outputs go tap by tap.

// [A, E): the outputs whose K taps all fall inside [0, I) (A == E == 0 when there are none).
void tap_interior(int64_t O, int64_t I, int64_t off, int64_t D, int64_t K, int64_t& A,
                  int64_t& E) {
  A = 0;
  E = O;
  for (int64_t j = 0; j < K; ++j) {
    A = std::max(A, std::clamp<int64_t>(-(off + j * D), 0, O));
    E = std::min(E, std::clamp<int64_t>(I - off - j * D, 0, O));
  }
  if (A >= E) A = E = 0;
}

// The outputs outside [A, E) of one tap row, tap by tap.
void tap_row_edges(float* out, int64_t O, const float* in, int64_t I, int64_t off, int64_t D,
                   const float* w, int64_t K, int64_t A, int64_t E) {
  for (int64_t j = 0; j < K; ++j) {
    const float wj = w[j];
    const float* src = in + off + j * D;
    const int64_t l = std::clamp<int64_t>(-(off + j * D), 0, O);
    const int64_t h = std::clamp<int64_t>(I - off - j * D, 0, O);
    for (int64_t o = l; o < std::min(h, A); ++o) out[o] += wj * src[o];
    for (int64_t o = std::max(l, E); o < h; ++o) out[o] += wj * src[o];
  }
}

void tap_row(float* out, int64_t O, const float* in, int64_t I, int64_t off, int64_t D,
             const float* w, int64_t K) {
  int64_t A, E;
  tap_interior(O, I, off, D, K, A, E);
  for (int64_t j = 0; j < K; ++j) {
    const float wj = w[j];
    const float* src = in + off + j * D;
    for (int64_t o = A; o < E; ++o) out[o] += wj * src[o];
  }
  tap_row_edges(out, O, in, I, off, D, w, K, A, E);
}

// Rows [RA, RE) of a plane where all KH x KW taps are valid on columns [A, E).
template <int KH, int KW>
void tap_rows_fused(float* out, int64_t OW, const float* in, int64_t IW, int64_t RA, int64_t RE,
                    int64_t A, int64_t E, int64_t offh, int64_t offw, int64_t DH, int64_t DW,
                    const float* w) {
  float wk[KH * KW];
  for (int t = 0; t < KH * KW; ++t) wk[t] = w[t];
  for (int64_t oh = RA; oh < RE; ++oh) {
    const float* rows[KH];
    for (int i = 0; i < KH; ++i) rows[i] = in + (oh + offh + i * DH) * IW + offw;
    float* o = out + oh * OW;
    for (int64_t ow = A; ow < E; ++ow) {
      float acc = o[ow];
      for (int i = 0; i < KH; ++i)
        for (int j = 0; j < KW; ++j) acc += wk[i * KW + j] * rows[i][ow + j * DW];
      o[ow] = acc;
    }
  }
}

// out [OH, OW] += Σ_ij w[i, j]·in[oh + offh + i·DH, ow + offw + j·DW], taps outside in skipped.
void tap_plane(float* out, int64_t OH, int64_t OW, const float* in, int64_t IH, int64_t IW,
               int64_t offh, int64_t offw, int64_t DH, int64_t DW, const float* w, int64_t KH,
               int64_t KW) {
  int64_t RA, RE, A, E;
  tap_interior(OH, IH, offh, DH, KH, RA, RE);
  tap_interior(OW, IW, offw, DW, KW, A, E);
  using Fused = void (*)(float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t, int64_t, const float*);
  Fused fused = nullptr;
  if (KH == 3 && KW == 3) fused = tap_rows_fused<3, 3>;
  if (KH == 5 && KW == 5) fused = tap_rows_fused<5, 5>;
  if (KH == 7 && KW == 7) fused = tap_rows_fused<7, 7>;
  if (KH == 1 && KW == 3) fused = tap_rows_fused<1, 3>;
  if (KH == 1 && KW == 5) fused = tap_rows_fused<1, 5>;
  if (KH == 1 && KW == 7) fused = tap_rows_fused<1, 7>;
  if (!fused || A >= E) RA = RE = 0;
  if (RA < RE) fused(out, OW, in, IW, RA, RE, A, E, offh, offw, DH, DW, w);
  for (int64_t oh = 0; oh < OH; ++oh) {
    const bool interior = oh >= RA && oh < RE;
    for (int64_t i = 0; i < KH; ++i) {
      const int64_t ih = oh + offh + i * DH;
      if (ih < 0 || ih >= IH) continue;
      if (interior) {
        tap_row_edges(out + oh * OW, OW, in + ih * IW, IW, offw, DW, w + i * KW, KW, A, E);
      } else {
        tap_row(out + oh * OW, OW, in + ih * IW, IW, offw, DW, w + i * KW, KW);
      }
    }
  }
}

// acc[j][·] += Σ_o d[o]·x[o + off + j·D] over the outputs valid for each of the KW taps of one
// kernel row (dW of a unit-stride depthwise conv); 8 lanes per tap so it vectorises.
template <int KW>
void tap_row_dot(const float* d, int64_t O, const float* x, int64_t I, int64_t off, int64_t D,
                 float (*acc)[8]) {
  int64_t A, E;
  tap_interior(O, I, off, D, KW, A, E);
  float a[KW][8];  // local, so the compiler keeps it in registers (acc may alias d and x)
  for (int j = 0; j < KW; ++j)
    for (int q = 0; q < 8; ++q) a[j][q] = 0.f;
  int64_t o = A;
  for (; o + 8 <= E; o += 8)
    for (int j = 0; j < KW; ++j) {
      const float* xs = x + off + j * D + o;
      for (int q = 0; q < 8; ++q) a[j][q] += d[o + q] * xs[q];
    }
  for (int j = 0; j < KW; ++j)
    for (int q = 0; q < 8; ++q) acc[j][q] += a[j][q];
  const int64_t tail = o;
  for (int j = 0; j < KW; ++j) {
    const float* xs = x + off + j * D;
    const int64_t l = std::clamp<int64_t>(-(off + j * D), 0, O);
    const int64_t h = std::clamp<int64_t>(I - off - j * D, 0, O);
    float s = 0.f;
    for (int64_t p = l; p < std::min(h, A); ++p) s += d[p] * xs[p];
    for (int64_t p = std::max(l, tail); p < h; ++p) s += d[p] * xs[p];
    acc[j][0] += s;
  }
}

class Conv : public Op {
 public:
  Conv(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 3);
    check_float(n, in[0], "X");
    check_float(n, in[1], "W");
    const Shape& xs = in[0].shape;
    const Shape& ws = in[1].shape;
    PYEDGE_CHECK(xs.size() >= 3, n.where(), ": X must be [N, C, spatial...], got ",
                 shape_str(xs));
    PYEDGE_CHECK(xs.size() <= 4, n.where(), ": only 1D and 2D Conv are supported, X has shape ",
                 shape_str(xs));
    PYEDGE_CHECK(ws.size() == xs.size(), n.where(), ": W has shape ", shape_str(ws),
                 ", expected rank ", xs.size(), " like X ", shape_str(xs));
    G_ = n.attrs.get_int("group", 1);
    N_ = xs[0];
    C_ = xs[1];
    M_ = ws[0];
    PYEDGE_CHECK(G_ >= 1, n.where(), ": group must be >= 1, got ", G_);
    PYEDGE_CHECK(C_ % G_ == 0, n.where(), ": group ", G_, " does not divide the ", C_,
                 " input channels");
    PYEDGE_CHECK(M_ % G_ == 0, n.where(), ": group ", G_, " does not divide the ", M_,
                 " output channels of W ", shape_str(ws));
    Cg_ = C_ / G_;
    Mg_ = M_ / G_;
    PYEDGE_CHECK(ws[1] == Cg_, n.where(), ": channel mismatch: X ", shape_str(xs), " has ", C_,
                 " channels, W ", shape_str(ws), " expects ", ws[1] * G_, " (group ", G_, ")");
    std::vector<int64_t> kernel(ws.begin() + 2, ws.end());
    if (n.attrs.has("kernel_shape"))
      PYEDGE_CHECK(n.attrs.get_ints("kernel_shape") == kernel, n.where(),
                   ": kernel_shape attribute disagrees with W ", shape_str(ws));
    g_ = make_window_geom(n, xs, kernel, false);
    has_bias_ = in.size() > 2 && n.has_input(2);
    if (has_bias_) {
      check_float(n, in[2], "B");
      PYEDGE_CHECK(in[2].shape == Shape{M_}, n.where(), ": B has shape ", shape_str(in[2].shape),
                   ", expected [", M_, "]");
    }
    P_ = g_.out_plane();
    Kc_ = Cg_ * g_.taps();
    depthwise_ = G_ > 1 && Cg_ == 1;
    pointwise_ = g_.pointwise();
    // sgemm must not throw inside a parallel region: check its 32-bit limits here.
    PYEDGE_CHECK(P_ < (int64_t(1) << 31) && Kc_ < (int64_t(1) << 31) && Mg_ < (int64_t(1) << 31),
                 n.where(), ": Conv too large for 32-bit BLAS");
    // Parallel over samples whenever there are several (measured: far ahead of threaded
    // BLAS per sample on a busy 2-core box); N == 1 splits each GEMM instead.
    const int64_t nt = num_threads();
    if (nt > 1 && N_ >= 2) slots_ = std::min(nt, N_);
    // Small output planes: a slot puts up to B samples side by side in one col [Kc, B*P] and
    // runs one GEMM of B*P columns (W3's 4x4 and 8x8 outputs: per-sample GEMMs of 16 or 64
    // columns are slow, and W is packed once instead of B times). ~512 columns is plenty.
    if (!depthwise_) {
      const int64_t per_slot = (N_ + slots_ - 1) / slots_;
      batch_ = std::clamp<int64_t>(kTargetCols / std::max<int64_t>(P_, 1), 1, per_slot);
    }
    if (!depthwise_ && (batch_ > 1 || !pointwise_)) im2col_ = make_im2col_plan(g_);
    splits_ = slots_ == 1 ? std::max<int64_t>(1, std::min(nt, Cg_)) : 1;
    PYEDGE_CHECK(batch_ * P_ < (int64_t(1) << 31), n.where(), ": Conv too large for 32-bit BLAS");
    Shape ys = {N_, M_};
    for (int64_t d : window_out_dims(g_)) ys.push_back(d);
    outputs = {make_output(DType::f32, ys)};
  }

  size_t forward_scratch_bytes() const override {
    return depthwise_ ? 0 : size_t(slots_ * slot_floats()) * sizeof(float);
  }
  size_t backward_scratch_bytes(const std::vector<bool>& need) const override {
    const bool ndx = need.size() > 0 && need[0], ndw = need.size() > 1 && need[1];
    if (depthwise_ || (!ndx && !ndw)) return 0;
    int64_t f = slots_ * slot_floats();
    if (ndw) f += (slots_ - 1) * M_ * Kc_;  // private dW of slots 1.. (slot 0 uses dW)
    return size_t(f) * sizeof(float);
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    const float* x = in[0].ptr<float>();
    const float* w = in[1].ptr<float>();
    const float* b = has_bias_ ? in[2].ptr<float>() : nullptr;
    float* y = out[0].ptr<float>();
    if (depthwise_) return depthwise_forward(x, w, b, y);
    float* scratch = static_cast<float*>(ctx.scratch);
    const int64_t IP = g_.in_plane(), P = P_;
    over_samples([&](int64_t n0, int64_t n1, int64_t slot) {
      Slot sl = slot_buffers(scratch, slot);
      for (int64_t nb = n0; nb < n1; nb += batch_) {
        const int64_t B = std::min(batch_, n1 - nb), ld = B * P;
        for (int64_t gi = 0; gi < G_; ++gi) {
          const float* wg = w + gi * Mg_ * Kc_;
          if (batch_ > 1) {
            // col [Kc, B*P] (sample k at columns k*P..), stage [Mg, B*P] = w_g · col, then
            // each [Mg, P] block to y[nb + k] (+ bias). Serial: one slot per thread.
            for (int64_t k = 0; k < B; ++k)
              fill_col(x + ((nb + k) * C_ + gi * Cg_) * IP, 0, Cg_, sl.pad, sl.col + k * P, ld);
            sgemm(false, false, Mg_, ld, Kc_, 1.f, wg, Kc_, sl.col, ld, 0.f, sl.stage, ld);
            for (int64_t k = 0; k < B; ++k)
              for (int64_t m = 0; m < Mg_; ++m) {
                const float* sr = sl.stage + m * ld + k * P;
                float* yr = y + ((nb + k) * M_ + gi * Mg_ + m) * P;
                const float bv = b ? b[gi * Mg_ + m] : 0.f;
                for (int64_t p = 0; p < P; ++p) yr[p] = sr[p] + bv;
              }
            continue;
          }
          const float* src = sample_columns(x + (nb * C_ + gi * Cg_) * IP, sl);
          // y_g [Mg, P] = w_g [Mg, Kc] · col [Kc, P], split by output columns
          float* yg = y + (nb * M_ + gi * Mg_) * P;
          parallel_for(P, kColGrain, [&](int64_t p0, int64_t p1) {
            sgemm(false, false, Mg_, p1 - p0, Kc_, 1.f, wg, Kc_, src + p0, P, 0.f, yg + p0, P);
            if (b)
              for (int64_t m = 0; m < Mg_; ++m) {
                const float bv = b[gi * Mg_ + m];
                float* yr = yg + m * P;
                for (int64_t p = p0; p < p1; ++p) yr[p] += bv;
              }
          });
        }
      }
    });
  }

  bool has_backward() const override { return true; }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    const float* dy = dout[0].data ? dout[0].ptr<float>() : nullptr;
    if (!dy) return;
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dw = din[1].data ? din[1].ptr<float>() : nullptr;
    float* db = has_bias_ && din.size() > 2 && din[2].data ? din[2].ptr<float>() : nullptr;
    // Only what the wanted gradients read is guaranteed alive (backward_reads_inputs).
    const float* x = dw ? in[0].ptr<float>() : nullptr;
    const float* w = dx ? in[1].ptr<float>() : nullptr;
    if (db) bias_backward(dy, db);
    if (!dx && !dw) return;
    if (depthwise_) {
      if (dx) depthwise_backward_x(w, dy, dx);
      if (dw) depthwise_backward_w(x, dy, dw);
      return;
    }
    float* scratch = static_cast<float*>(ctx.scratch);
    float* dw_priv = scratch + slots_ * slot_floats();
    const int64_t IP = g_.in_plane(), P = P_, WN = M_ * Kc_;
    over_samples([&](int64_t n0, int64_t n1, int64_t slot) {
      Slot sl = slot_buffers(scratch, slot);
      float* dwd = nullptr;
      if (dw) {
        dwd = slot == 0 ? dw : dw_priv + (slot - 1) * WN;
        if (slot > 0) std::memset(dwd, 0, sizeof(float) * size_t(WN));
      }
      for (int64_t nb = n0; nb < n1; nb += batch_) {
        const int64_t B = std::min(batch_, n1 - nb), ld = B * P;
        for (int64_t gi = 0; gi < G_; ++gi) {
          const float* wg = w ? w + gi * Mg_ * Kc_ : nullptr;
          float* dwg = dwd ? dwd + gi * Mg_ * Kc_ : nullptr;
          if (batch_ > 1) {
            // stage [Mg, B*P] = the samples' dy_g side by side; col as in forward.
            // dw_g += stage · colᵀ; dcol = w_gᵀ · stage (into col), folded back per sample.
            for (int64_t k = 0; k < B; ++k)
              for (int64_t m = 0; m < Mg_; ++m)
                std::memcpy(sl.stage + m * ld + k * P, dy + ((nb + k) * M_ + gi * Mg_ + m) * P,
                            sizeof(float) * size_t(P));
            if (dwg) {
              for (int64_t k = 0; k < B; ++k)
                fill_col(x + ((nb + k) * C_ + gi * Cg_) * IP, 0, Cg_, sl.pad, sl.col + k * P,
                         ld);
              sgemm(false, true, Mg_, Kc_, ld, 1.f, sl.stage, ld, sl.col, ld, 1.f, dwg, Kc_);
            }
            if (dx) {
              sgemm(true, false, Kc_, ld, Mg_, 1.f, wg, Kc_, sl.stage, ld, 0.f, sl.col, ld);
              for (int64_t k = 0; k < B; ++k)
                fold_col(sl.col + k * P, 0, Cg_, sl.pad, dx + ((nb + k) * C_ + gi * Cg_) * IP,
                         ld);
            }
            continue;
          }
          const int64_t n = nb;
          const float* dyg = dy + (n * M_ + gi * Mg_) * P;
          if (dwg) {
            const float* src = sample_columns(x + (n * C_ + gi * Cg_) * IP, sl);
            // dw_g [Mg, Kc] += dy_g [Mg, P] · colᵀ [P, Kc], split by rows of dw_g
            parallel_for(Mg_, 8, [&](int64_t m0, int64_t m1) {
              sgemm(false, true, m1 - m0, Kc_, P, 1.f, dyg + m0 * P, P, src, P, 1.f,
                    dwg + m0 * Kc_, Kc_);
            });
          }
          if (dx) {
            float* dxg = dx + (n * C_ + gi * Cg_) * IP;
            // dcol [Kc, P] = w_gᵀ [Kc, Mg] · dy_g [Mg, P] by column blocks, then folded
            // back per channel; pointwise: straight into dx.
            float* dst = pointwise_ ? dxg : sl.col;
            const float beta = pointwise_ ? 1.f : 0.f;
            parallel_for(P, kColGrain, [&](int64_t p0, int64_t p1) {
              sgemm(true, false, Kc_, p1 - p0, Mg_, 1.f, wg, Kc_, dyg + p0, P, beta, dst + p0, P);
            });
            if (!pointwise_)
              over_channels([&](int64_t c0, int64_t c1, float* pad) {
                fold_col(sl.col, c0, c1, pad, dxg, P);
              }, sl);
          }
        }
      }
    });
    if (dw && slots_ > 1) {  // fold the private dW of slots 1.. into dW
      const int64_t S = slots_;
      parallel_for(WN, 1 << 14, [&](int64_t lo, int64_t hi) {
        for (int64_t s = 1; s < S; ++s) {
          const float* src = dw_priv + (s - 1) * WN;
          for (int64_t i = lo; i < hi; ++i) dw[i] += src[i];
        }
      });
    }
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    std::vector<bool> r(need.size(), false);
    if (need.size() > 1 && need[1]) r[0] = true;  // dW reads X
    if (need.size() > 0 && need[0]) r[1] = true;  // dX reads W
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return std::vector<bool>(outputs.size(), false);
  }

  // Every output element is a dot product over a group's channels times the kernel taps.
  double flops() const override { return 2.0 * double(N_ * M_) * double(P_) * double(Kc_); }

 private:
  // Per-slot scratch: col [Kc, batch*P] (im2col, or dcol in backward), stage [Mg, batch*P]
  // (GEMM output in forward, gathered dY in backward; batch > 1 only), and a padded plane
  // for im2col_planned per channel block (splits_ of them with a single slot, whose channel
  // loop is split over the threads; one otherwise).
  struct Slot {
    float* col;
    float* stage;
    float* pad;
  };
  bool uses_col() const { return !depthwise_ && (batch_ > 1 || !pointwise_); }
  int64_t col_floats() const { return uses_col() ? Kc_ * batch_ * P_ : 0; }
  int64_t stage_floats() const { return batch_ > 1 ? Mg_ * batch_ * P_ : 0; }
  int64_t pad_floats() const { return im2col_.plane_floats(); }
  int64_t slot_floats() const {
    return col_floats() + stage_floats() + splits_ * pad_floats();
  }
  Slot slot_buffers(float* scratch, int64_t slot) const {
    float* base = scratch + slot * slot_floats();
    return {base, base + col_floats(), base + col_floats() + stage_floats()};
  }
  // body(c0, c1, pad) over splits_ blocks of the group's channels, block t with padded plane t
  // (blocks, not threads, own the planes: safe whatever the thread count at run time).
  template <typename F>
  void over_channels(F&& body, const Slot& sl) const {
    const int64_t S = splits_, C = Cg_, PF = pad_floats();
    parallel_for(S, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) body(C * t / S, C * (t + 1) / S, sl.pad + t * PF);
    });
  }
  // col rows of channels [c0, c1) of one sample (xg: its group's first channel), row stride ld.
  void fill_col(const float* xg, int64_t c0, int64_t c1, float* pad, float* col,
                int64_t ld) const {
    const int64_t IP = g_.in_plane(), T = g_.taps();
    im2col_planned(xg + c0 * IP, c1 - c0, g_, im2col_, pad, col + c0 * T * ld, ld);
  }
  // The GEMM operand [Kc, P] of one sample's group (xg: its first channel): x itself for a
  // pointwise conv, else its im2col in sl.col.
  const float* sample_columns(const float* xg, const Slot& sl) const {
    if (pointwise_) return xg;
    over_channels([&](int64_t c0, int64_t c1, float* pad) {
      fill_col(xg, c0, c1, pad, sl.col, P_);
    }, sl);
    return sl.col;
  }
  // dxg (channels [c0, c1) of one sample's group) += fold of col rows, row stride ld.
  void fold_col(const float* col, int64_t c0, int64_t c1, float* pad, float* dxg,
                int64_t ld) const {
    const int64_t IP = g_.in_plane(), T = g_.taps();
    col2im_add_planned(col + c0 * T * ld, c1 - c0, g_, im2col_, pad, dxg + c0 * IP, ld);
  }

  // GEMMs inside our own OpenMP loops run on the calling thread (see blas.h).
  // body(n0, n1, slot) handles a block of samples with scratch `slot`. Several slots: one
  // OpenMP task per slot, and the parallel_for calls inside the body run serially. One slot
  // (N == 1, or one thread): the body's parallel_for calls split im2col by channels and each
  // GEMM by columns (or rows).
  template <typename F>
  void over_samples(F&& body) const {
    if (slots_ == 1) {
      body(int64_t(0), N_, int64_t(0));
      return;
    }
    const int64_t S = slots_, N = N_;
    parallel_for(S, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) body(N * s / S, N * (s + 1) / S, s);
    });
  }
  static constexpr int64_t kColGrain = 128;    // GEMM columns per task, at least
  static constexpr int64_t kTargetCols = 512;  // batched GEMM width (samples x plane)

  void bias_backward(const float* dy, float* db) const {
    const int64_t P = P_, M = M_, N = N_;
    parallel_for(M, std::max<int64_t>(1, 16384 / (P * N)), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        double acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          const float* p = dy + (n * M + m) * P;
          acc += sum8(p, P);
        }
        db[m] += float(acc);
      }
    });
  }

  // Depthwise (C == group): output channel m reads input channel m / mult only.
  void depthwise_forward(const float* x, const float* w, const float* b, float* y) const {
    const WindowGeom& g = g_;
    const int64_t mult = Mg_, P = P_, T = g.taps(), M = M_, C = C_;
    parallel_for(N_ * M_, std::max<int64_t>(1, 4096 / (P * T)), [&](int64_t lo, int64_t hi) {
      for (int64_t pm = lo; pm < hi; ++pm) {
        const int64_t n = pm / M, m = pm % M, c = m / mult;
        const float* xp = x + (n * C + c) * g.in_plane();
        const float* wp = w + m * T;
        float* yp = y + pm * P;
        const float bv = b ? b[m] : 0.f;
        for (int64_t p = 0; p < P; ++p) yp[p] = bv;
        if (g.SH == 1 && g.SW == 1) {
          tap_plane(yp, g.OH, g.OW, xp, g.IH, g.IW, -g.PH, -g.PW, g.DH, g.DW, wp, g.KH, g.KW);
          continue;
        }
        for (int64_t i = 0; i < g.KH; ++i) {
          for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
            const float* xr = xp + g.ih(oh, i) * g.IW;
            float* yr = yp + oh * g.OW;
            if (g.SW == 1) {
              tap_row(yr, g.OW, xr, g.IW, -g.PW, g.DW, wp + i * g.KW, g.KW);
              continue;
            }
            for (int64_t j = 0; j < g.KW; ++j) {
              const float wv = wp[i * g.KW + j];
              const float* xs = xr + j * g.DW - g.PW;
              for (int64_t ow = g.ow_lo[size_t(j)]; ow < g.ow_hi[size_t(j)]; ++ow)
                yr[ow] += wv * xs[ow * g.SW];
            }
          }
        }
      }
    });
  }

  // dx plane (n, c) gathers from its `mult` output channels: no races across tasks.
  void depthwise_backward_x(const float* w, const float* dy, float* dx) const {
    const WindowGeom& g = g_;
    const int64_t mult = Mg_, P = P_, T = g.taps(), M = M_, C = C_;
    parallel_for(N_ * C_, std::max<int64_t>(1, 4096 / (P * T * mult)),
                 [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc) {
        const int64_t n = pc / C, c = pc % C;
        float* dxp = dx + pc * g.in_plane();
        for (int64_t k = 0; k < mult; ++k) {
          const int64_t m = c * mult + k;
          const float* dyp = dy + (n * M + m) * P;
          const float* wp = w + m * T;
          if (g.SH == 1 && g.SW == 1) {  // gather: dx[ih, iw] += Σ w[i, j]·dy[ih + pad - i·dil, ..]
            tap_plane(dxp, g.IH, g.IW, dyp, g.OH, g.OW, g.PH, g.PW, -g.DH, -g.DW, wp, g.KH, g.KW);
            continue;
          }
          for (int64_t i = 0; i < g.KH; ++i) {
            for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
              float* xr = dxp + g.ih(oh, i) * g.IW;
              const float* dyr = dyp + oh * g.OW;
              if (g.SW == 1) {  // gather form: dx[iw] += Σ_j w[j]·dy[iw + pad - j·dil]
                tap_row(xr, g.IW, dyr, g.OW, g.PW, -g.DW, wp + i * g.KW, g.KW);
                continue;
              }
              for (int64_t j = 0; j < g.KW; ++j) {
                const float wv = wp[i * g.KW + j];
                float* xs = xr + j * g.DW - g.PW;
                for (int64_t ow = g.ow_lo[size_t(j)]; ow < g.ow_hi[size_t(j)]; ++ow)
                  xs[ow * g.SW] += wv * dyr[ow];
              }
            }
          }
        }
      }
    });
  }

  // dw[m, tap] += Σ_n Σ_o dy[n, m, o] · x[n, c, o·s + tap·d - pad]; one task per channel m.
  void depthwise_backward_w(const float* x, const float* dy, float* dw) const {
    const WindowGeom& g = g_;
    const int64_t mult = Mg_, P = P_, T = g.taps(), M = M_, C = C_, N = N_;
    using RowDot = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t,
                            float (*)[8]);
    RowDot row_dot = nullptr;
    if (g.SW == 1 && g.KW == 3) row_dot = tap_row_dot<3>;
    if (g.SW == 1 && g.KW == 5) row_dot = tap_row_dot<5>;
    if (g.SW == 1 && g.KW == 7) row_dot = tap_row_dot<7>;
    parallel_for(M_, std::max<int64_t>(1, 4096 / (P * T * N)), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const int64_t c = m / mult;
        float* wp = dw + m * T;
        for (int64_t i = 0; i < g.KH; ++i) {
          if (row_dot) {  // all KW taps of kernel row i per pass over a dy row
            float acc[7][8] = {};
            for (int64_t n = 0; n < N; ++n) {
              const float* xp = x + (n * C + c) * g.in_plane();
              const float* dyp = dy + (n * M + m) * P;
              for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh)
                row_dot(dyp + oh * g.OW, g.OW, xp + g.ih(oh, i) * g.IW, g.IW, -g.PW, g.DW, acc);
            }
            for (int64_t j = 0; j < g.KW; ++j)
              wp[i * g.KW + j] += ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3])) +
                                  ((acc[j][4] + acc[j][5]) + (acc[j][6] + acc[j][7]));
            continue;
          }
          for (int64_t j = 0; j < g.KW; ++j) {
            const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int64_t n = 0; n < N; ++n) {
              const float* xp = x + (n * C + c) * g.in_plane();
              const float* dyp = dy + (n * M + m) * P;
              for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
                const float* xs = xp + g.ih(oh, i) * g.IW + j * g.DW - g.PW;
                const float* dyr = dyp + oh * g.OW;
                for (int64_t ow = a; ow < e; ++ow) acc[ow & 7] += dyr[ow] * xs[ow * g.SW];
              }
            }
            wp[i * g.KW + j] +=
                ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
          }
        }
      }
    });
  }

  WindowGeom g_;
  int64_t N_ = 0, C_ = 0, M_ = 0, G_ = 1, Cg_ = 0, Mg_ = 0, P_ = 0, Kc_ = 0;
  int64_t slots_ = 1;  // sample blocks run in parallel (see over_samples)
  int64_t batch_ = 1;   // samples per GEMM within a slot
  int64_t splits_ = 1;  // channel blocks of im2col / col2im (threads, with a single slot)
  Im2colPlan im2col_;   // how col is filled (see conv_im2col.h)
  bool has_bias_ = false, depthwise_ = false, pointwise_ = false;
};
PYEDGE_REGISTER_OP("Conv", Conv);

}  // namespace
}  // namespace pyedge
