// Conv (1D / 2D): im2col + SGEMM per sample and group, a direct kernel for depthwise convs,
// and no im2col at all for 1x1 stride-1 unpadded convs.
//   x [N, C, (H,) W], w [M, C/group, (KH,) KW], b [M]  ->  y [N, M, (OH,) OW]
// Backward: dW += dY·colᵀ, dX += col2im(Wᵀ·dY), dB += Σ dY, each only when wanted (frozen
// weights skip their GEMM). BLAS is threaded, so the sample loop stays serial.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/parallel.h"
#include "ops/blas.h"
#include "ops/conv_im2col.h"

namespace pyedge {
namespace {

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
    // BLAS per sample on a busy 2-core box, whose barriers suffer from preemption); N == 1
    // runs one sample with threaded BLAS.
    const int64_t nt = num_threads();
    if (const char* e = std::getenv("PYEDGE_CONV_SLOTS")) {  // TODO remove: benchmarking
      slots_ = std::max<int64_t>(1, std::min<int64_t>(std::atoi(e), N_));
    } else if (nt > 1 && N_ >= 2) {
      slots_ = std::min(nt, N_);
    }
    Shape ys = {N_, M_};
    for (int64_t d : window_out_dims(g_)) ys.push_back(d);
    outputs = {make_output(DType::f32, ys)};
  }

  size_t forward_scratch_bytes() const override {
    return uses_col() ? size_t(slots_ * col_floats()) * sizeof(float) : 0;
  }
  size_t backward_scratch_bytes(const std::vector<bool>& need) const override {
    const bool ndx = need.size() > 0 && need[0], ndw = need.size() > 1 && need[1];
    if (depthwise_ || (!ndx && !ndw)) return 0;
    int64_t f = uses_col() ? slots_ * col_floats() : 0;
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
    float* cols = static_cast<float*>(ctx.scratch);
    const int64_t IP = g_.in_plane();
    over_samples([&](int64_t n0, int64_t n1, int64_t slot) {
      float* col = cols + slot * col_floats();
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t gi = 0; gi < G_; ++gi) {
          const float* src = x + (n * C_ + gi * Cg_) * IP;
          if (!pointwise_) {
            im2col(src, Cg_, g_, col);
            src = col;
          }
          // y_g [Mg, P] = w_g [Mg, Kc] · col [Kc, P]
          sgemm(false, false, Mg_, P_, Kc_, 1.f, w + gi * Mg_ * Kc_, Kc_, src, P_, 0.f,
                y + (n * M_ + gi * Mg_) * P_, P_);
        }
        if (b) {
          for (int64_t m = 0; m < M_; ++m) {
            float* yp = y + (n * M_ + m) * P_;
            const float bv = b[m];
            for (int64_t p = 0; p < P_; ++p) yp[p] += bv;
          }
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
    if (!dx && !dw) {
      if (db) bias_backward(dy, db);
      return;
    }
    if (depthwise_) {
      if (db) bias_backward(dy, db);
      if (dx) depthwise_backward_x(w, dy, dx);
      if (dw) depthwise_backward_w(x, dy, dw);
      return;
    }
    float* cols = static_cast<float*>(ctx.scratch);
    float* dw_priv = cols + (uses_col() ? slots_ * col_floats() : 0);
    const int64_t IP = g_.in_plane(), WN = M_ * Kc_;
    over_samples([&](int64_t n0, int64_t n1, int64_t slot) {
      float* col = cols + slot * col_floats();
      float* dwd = nullptr;
      if (dw) {
        dwd = slot == 0 ? dw : dw_priv + (slot - 1) * WN;
        if (slot > 0) std::memset(dwd, 0, sizeof(float) * size_t(WN));
      }
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t gi = 0; gi < G_; ++gi) {
          const float* dyg = dy + (n * M_ + gi * Mg_) * P_;
          if (dwd) {
            const float* src = x + (n * C_ + gi * Cg_) * IP;
            if (!pointwise_) {
              im2col(src, Cg_, g_, col);
              src = col;
            }
            // dw_g [Mg, Kc] += dy_g [Mg, P] · colᵀ [P, Kc]
            sgemm(false, true, Mg_, Kc_, P_, 1.f, dyg, P_, src, P_, 1.f, dwd + gi * Mg_ * Kc_,
                  Kc_);
          }
          if (dx) {
            float* dxg = dx + (n * C_ + gi * Cg_) * IP;
            const float* wg = w + gi * Mg_ * Kc_;
            // dcol [Kc, P] = w_gᵀ [Kc, Mg] · dy_g [Mg, P]; pointwise: straight into dx.
            if (pointwise_) {
              sgemm(true, false, Kc_, P_, Mg_, 1.f, wg, Kc_, dyg, P_, 1.f, dxg, P_);
            } else {
              sgemm(true, false, Kc_, P_, Mg_, 1.f, wg, Kc_, dyg, P_, 0.f, col, P_);
              col2im_add(col, Cg_, g_, dxg);
            }
          }
        }
      }
    });
    // OpenMP loops last, after the BLAS calls (see over_samples).
    if (db) bias_backward(dy, db);
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

 private:
  bool uses_col() const { return !depthwise_ && !pointwise_; }
  int64_t col_floats() const { return uses_col() ? Kc_ * P_ : 0; }

  // body(n0, n1, slot) over blocks of samples. With several slots: one OpenMP task per slot
  // (own im2col buffer, single-threaded BLAS inside; im2col's parallel_for runs serially
  // there). With one slot: the whole batch here, parallel im2col and threaded BLAS. Never
  // BLAS threads inside OpenMP threads.
  template <typename F>
  void over_samples(F&& body) const {
    if (slots_ == 1) {
      body(int64_t(0), N_, int64_t(0));
      return;
    }
    struct BlasSingleThread {
      BlasSingleThread() { blas_set_num_threads(1); }
      ~BlasSingleThread() { blas_set_num_threads(num_threads()); }
    } guard;
    const int64_t S = slots_, N = N_;
    parallel_for(S, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) body(N * s / S, N * (s + 1) / S, s);
    });
  }

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
        for (int64_t i = 0; i < g.KH; ++i) {
          for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
            const float* xr = xp + g.ih(oh, i) * g.IW;
            float* yr = yp + oh * g.OW;
            for (int64_t j = 0; j < g.KW; ++j) {
              const float wv = wp[i * g.KW + j];
              const float* xs = xr + j * g.DW - g.PW;
              const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
              if (g.SW == 1) {
                for (int64_t ow = a; ow < e; ++ow) yr[ow] += wv * xs[ow];
              } else {
                for (int64_t ow = a; ow < e; ++ow) yr[ow] += wv * xs[ow * g.SW];
              }
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
          for (int64_t i = 0; i < g.KH; ++i) {
            for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
              float* xr = dxp + g.ih(oh, i) * g.IW;
              const float* dyr = dyp + oh * g.OW;
              for (int64_t j = 0; j < g.KW; ++j) {
                const float wv = wp[i * g.KW + j];
                float* xs = xr + j * g.DW - g.PW;
                const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
                if (g.SW == 1) {
                  for (int64_t ow = a; ow < e; ++ow) xs[ow] += wv * dyr[ow];
                } else {
                  for (int64_t ow = a; ow < e; ++ow) xs[ow * g.SW] += wv * dyr[ow];
                }
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
    parallel_for(M_, std::max<int64_t>(1, 4096 / (P * T * N)), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const int64_t c = m / mult;
        float* wp = dw + m * T;
        for (int64_t n = 0; n < N; ++n) {
          const float* xp = x + (n * C + c) * g.in_plane();
          const float* dyp = dy + (n * M + m) * P;
          for (int64_t i = 0; i < g.KH; ++i) {
            for (int64_t j = 0; j < g.KW; ++j) {
              const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
              float acc = 0.f;
              for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
                const float* xs = xp + g.ih(oh, i) * g.IW + j * g.DW - g.PW;
                const float* dyr = dyp + oh * g.OW;
                if (g.SW == 1) {
                  acc += dot8(dyr + a, xs + a, e - a);
                } else {
                  for (int64_t ow = a; ow < e; ++ow) acc += dyr[ow] * xs[ow * g.SW];
                }
              }
              wp[i * g.KW + j] += acc;
            }
          }
        }
      }
    });
  }

  WindowGeom g_;
  int64_t N_ = 0, C_ = 0, M_ = 0, G_ = 1, Cg_ = 0, Mg_ = 0, P_ = 0, Kc_ = 0;
  int64_t slots_ = 1;  // sample blocks run in parallel (see over_samples)
  bool has_bias_ = false, depthwise_ = false, pointwise_ = false;
};
PYEDGE_REGISTER_OP("Conv", Conv);

}  // namespace
}  // namespace pyedge
