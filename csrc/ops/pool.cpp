// Pooling: MaxPool, AveragePool (1D / 2D windows; 3D in pool_nd.cpp), GlobalAveragePool,
// GlobalMaxPool.
//   x [N, C, (H,) W] -> y [N, C, (OH,) OW]
// Kernels run one (n, c) plane per task and loop tap-major (for each kernel tap, the output
// rows/columns whose input lies inside the image), so the inner loops have no bounds checks.
#include <algorithm>
#include <cstring>
#include <limits>

#include "common/parallel.h"
#include "ops/conv_im2col.h"
#include "ops/pool_nd.h"

namespace pyedge {
namespace {

WindowGeom pool_geom(const NodeInfo& n, const std::vector<Tensor>& in) {
  check_num_inputs(n, in, 1, 1);
  check_float(n, in[0], "X");
  PYEDGE_CHECK(in[0].rank() >= 3, n.where(), ": X must be [N, C, spatial...], got ",
               shape_str(in[0].shape));
  PYEDGE_CHECK(n.attrs.has("kernel_shape"), n.where(), ": missing attribute kernel_shape");
  return make_window_geom(n, in[0].shape, n.attrs.get_ints("kernel_shape"),
                          n.attrs.get_int("ceil_mode", 0) != 0);
}

Shape pool_out_shape(const Shape& xs, const WindowGeom& g) {
  Shape s = {xs[0], xs[1]};
  for (int64_t d : window_out_dims(g)) s.push_back(d);
  return s;
}

int64_t plane_grain(int64_t work_per_plane) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_plane, 1));
}

// MaxPool. When the node lists Indices, that int64 output (ONNX semantics: flat index into X)
// drives the backward; otherwise a hidden int32 in-plane argmax does (half the memory).
// Either way the backward scatters dY through it and reads neither X nor Y.
//
// Dense windows (no padding, dilation 1, every window inside X: 2x2/2, 3x3/2, ...) of the
// common sizes run a kernel with the window size fixed at compile time: each output folds its
// taps in row-major order with the same strict '>' as the generic path (so values, first-max
// index and NaN behaviour are identical), and the loop over output columns vectorises
// (column pairs via shuffles for stride 2). The hidden argmax is only written when the plan has
// a backward step for this op (backward_planned); in eval plans and before the first
// trainable tensor nothing reads it.
class MaxPool : public Op {
 public:
  MaxPool(const NodeInfo& n, const std::vector<Tensor>& in) : g_(pool_geom(n, in)) {
    PYEDGE_CHECK(n.attrs.get_int("storage_order", 0) == 0, n.where(),
                 ": storage_order=1 (column-major Indices) is not supported");
    PYEDGE_CHECK(g_.in_plane() < (int64_t(1) << 31), n.where(), ": input plane too large");
    planes_ = in[0].shape[0] * in[0].shape[1];
    Shape ys = pool_out_shape(in[0].shape, g_);
    onnx_indices_ = n.num_outputs >= 2;
    outputs = {make_output(DType::f32, ys),
               make_output(onnx_indices_ ? DType::i64 : DType::i32, ys)};
    n_visible = onnx_indices_ ? 2 : 1;
    const WindowGeom& g = g_;
    const bool dense = g.PH == 0 && g.PW == 0 && g.DH == 1 && g.DW == 1 &&
                       (g.OH - 1) * g.SH + g.KH <= g.IH && (g.OW - 1) * g.SW + g.KW <= g.IW;
    if (dense) {
      dense_i32_ = pick_dense<int32_t>();
      dense_i64_ = pick_dense<int64_t>();
    }
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    if (onnx_indices_) {
      run_forward(in[0].ptr<float>(), out[0].ptr<float>(), out[1].ptr<int64_t>(), dense_i64_);
    } else {
      int32_t* idx = skips_hidden_index() ? nullptr : out[1].ptr<int32_t>();
      run_forward(in[0].ptr<float>(), out[0].ptr<float>(), idx, dense_i32_);
    }
  }

  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    if (skips_hidden_index()) {
      // The forward skipped the argmax because no backward was planned. Only a caller
      // outside a plan (run_op) gets here; X is alive there, so recompute it.
      PYEDGE_CHECK(in[0].data && out[0].data && out[1].data,
                   "MaxPool backward without a planned backward and without X");
      run_forward(in[0].ptr<float>(), out[0].ptr<float>(), out[1].ptr<int32_t>(), dense_i32_);
    }
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t P = g_.out_plane(), IP = g_.in_plane();
    // Plane pc's indices stay inside plane pc of X: planes are race-free tasks.
    if (onnx_indices_) {
      const int64_t* idx = out[1].ptr<int64_t>();
      parallel_for(planes_, plane_grain(P), [&](int64_t lo, int64_t hi) {
        for (int64_t p = lo * P; p < hi * P; ++p)
          if (idx[p] >= 0) dx[idx[p]] += dy[p];
      });
    } else {
      const int32_t* idx = out[1].ptr<int32_t>();
      parallel_for(planes_, plane_grain(P), [&](int64_t lo, int64_t hi) {
        for (int64_t pc = lo; pc < hi; ++pc) {
          float* dxp = dx + pc * IP;
          const int32_t* ip = idx + pc * P;
          const float* dyp = dy + pc * P;
          for (int64_t p = 0; p < P; ++p)
            if (ip[p] >= 0) dxp[ip[p]] += dyp[p];
        }
      });
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    return std::vector<bool>(need.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }

 private:
  // Dense kernel over output rows [0, OH) of one plane: xp [IH, IW] -> yp [OH, OW]; idx (may be
  // nullptr) gets the in-plane argmax plus `base`.
  template <typename I>
  using DenseFn = void (*)(const float* xp, float* yp, I* ip, I base, const WindowGeom& g);

  template <int KH, int KW, int SW, typename I>
  static void dense_plane(const float* xp, float* yp, I* ip, I base, const WindowGeom& g) {
    const int64_t OW = g.OW, IW = g.IW;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const float* r = xp + oh * g.SH * IW;  // window rows r + i*IW, i < KH
      float* yr = yp + oh * OW;
      if (!ip) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const float* w = r + ow * SW;
          float m = w[0];
          for (int i = 0; i < KH; ++i)
            for (int j = (i == 0 ? 1 : 0); j < KW; ++j) {
              const float v = w[i * IW + j];
              m = v > m ? v : m;
            }
          yr[ow] = m;
        }
        continue;
      }
      I* ir = ip + oh * OW;
      const I row0 = I(oh * g.SH * IW) + base;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const float* w = r + ow * SW;
        float m = w[0];
        I k = row0 + I(ow * SW);
        for (int i = 0; i < KH; ++i)
          for (int j = (i == 0 ? 1 : 0); j < KW; ++j) {
            const float v = w[i * IW + j];
            const bool gt = v > m;
            m = gt ? v : m;
            k = gt ? I(row0 + I(ow * SW + i * IW + j)) : k;
          }
        yr[ow] = m;
        ir[ow] = k;
      }
    }
  }

  template <typename I>
  DenseFn<I> pick_dense() const {
    const WindowGeom& g = g_;
    if (g.KH == 2 && g.KW == 2 && g.SW == 2) return dense_plane<2, 2, 2, I>;
    if (g.KH == 3 && g.KW == 3 && g.SW == 2) return dense_plane<3, 3, 2, I>;
    if (g.KH == 2 && g.KW == 2 && g.SW == 1) return dense_plane<2, 2, 1, I>;
    if (g.KH == 3 && g.KW == 3 && g.SW == 1) return dense_plane<3, 3, 1, I>;
    if (g.KH == 1 && g.KW == 2 && g.SW == 2) return dense_plane<1, 2, 2, I>;  // 1D k2 s2
    if (g.KH == 1 && g.KW == 3 && g.SW == 2) return dense_plane<1, 3, 2, I>;  // 1D k3 s2
    return nullptr;
  }

  // The hidden argmax is left unwritten when no backward is planned, on the dense kernels
  // (the generic kernel needs it to tell "no tap yet" from a NaN maximum).
  bool skips_hidden_index() const { return !onnx_indices_ && !backward_planned && dense_i32_; }

  // y = window max; idx = its in-plane position (ONNX int64: plus the plane's offset in X).
  // idx == nullptr only with a dense kernel.
  template <typename I>
  void run_forward(const float* x, float* y, I* idx, DenseFn<I> dense) const {
    const WindowGeom& g = g_;
    const int64_t P = g.out_plane(), IP = g.in_plane();
    const bool global = onnx_indices_;
    if (dense) {
      parallel_for(planes_, plane_grain(P * g.taps()), [&](int64_t lo, int64_t hi) {
        for (int64_t pc = lo; pc < hi; ++pc)
          dense(x + pc * IP, y + pc * P, idx ? idx + pc * P : nullptr,
                global ? I(pc * IP) : I(0), g);
      });
      return;
    }
    parallel_for(planes_, plane_grain(P * g.taps()), [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc) {
        const float* xp = x + pc * IP;
        float* yp = y + pc * P;
        I* ip = idx + pc * P;
        for (int64_t p = 0; p < P; ++p) {
          yp[p] = -std::numeric_limits<float>::infinity();
          ip[p] = -1;
        }
        // Taps in row-major order with a strict '>' keep the first maximum, as onnxruntime.
        for (int64_t i = 0; i < g.KH; ++i) {
          for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
            const int64_t row = g.ih(oh, i) * g.IW;
            float* yr = yp + oh * g.OW;
            I* ir = ip + oh * g.OW;
            for (int64_t j = 0; j < g.KW; ++j) {
              const int64_t off = row + j * g.DW - g.PW;
              for (int64_t ow = g.ow_lo[size_t(j)]; ow < g.ow_hi[size_t(j)]; ++ow) {
                const int64_t q = off + ow * g.SW;
                const float v = xp[q];
                if (v > yr[ow] || ir[ow] < 0) {
                  yr[ow] = v;
                  ir[ow] = I(q);
                }
              }
            }
          }
        }
        if (global) {
          const I base = I(pc * IP);
          for (int64_t p = 0; p < P; ++p) ip[p] = ip[p] < 0 ? I(-1) : I(ip[p] + base);
        }
      }
    });
  }

  WindowGeom g_;
  int64_t planes_ = 0;
  bool onnx_indices_ = false;
  DenseFn<int32_t> dense_i32_ = nullptr;
  DenseFn<int64_t> dense_i64_ = nullptr;
};
// 3-D windows go to pool_nd.cpp.
bool is_3d(const std::vector<Tensor>& in) { return !in.empty() && in[0].rank() == 5; }
OpRegistrar max_pool_registrar("MaxPool", [](const NodeInfo& n, const std::vector<Tensor>& in) {
  return is_3d(in) ? make_pool_3d(n, in, true) : std::unique_ptr<Op>(new MaxPool(n, in));
});

// AveragePool. The divisor of a window is separable: (taps counted along H) x (along W),
// counted inside the image (count_include_pad=0) or inside the padded image (=1).
class AveragePool : public Op {
 public:
  AveragePool(const NodeInfo& n, const std::vector<Tensor>& in) : g_(pool_geom(n, in)) {
    planes_ = in[0].shape[0] * in[0].shape[1];
    const bool incl = n.attrs.get_int("count_include_pad", 0) != 0;
    inv_h_ = inverse_counts(g_.OH, g_.KH, g_.SH, g_.DH, g_.PH, g_.PHE, g_.IH, incl);
    inv_w_ = inverse_counts(g_.OW, g_.KW, g_.SW, g_.DW, g_.PW, g_.PWE, g_.IW, incl);
    outputs = {make_output(DType::f32, pool_out_shape(in[0].shape, g_))};
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    const WindowGeom& g = g_;
    const int64_t P = g.out_plane(), IP = g.in_plane();
    parallel_for(planes_, plane_grain(P * g.taps()), [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc) {
        const float* xp = x + pc * IP;
        float* yp = y + pc * P;
        std::memset(yp, 0, sizeof(float) * size_t(P));
        for (int64_t i = 0; i < g.KH; ++i) {
          for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
            const float* xr = xp + g.ih(oh, i) * g.IW;
            float* yr = yp + oh * g.OW;
            for (int64_t j = 0; j < g.KW; ++j) {
              const float* xs = xr + j * g.DW - g.PW;
              const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
              if (g.SW == 1) {
                for (int64_t ow = a; ow < e; ++ow) yr[ow] += xs[ow];
              } else {
                for (int64_t ow = a; ow < e; ++ow) yr[ow] += xs[ow * g.SW];
              }
            }
          }
        }
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const float sh = inv_h_[size_t(oh)];
          float* yr = yp + oh * g.OW;
          for (int64_t ow = 0; ow < g.OW; ++ow) yr[ow] *= sh * inv_w_[size_t(ow)];
        }
      }
    });
  }

  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const WindowGeom& g = g_;
    const int64_t P = g.out_plane(), IP = g.in_plane();
    parallel_for(planes_, plane_grain(P * g.taps()), [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc) {
        float* xp = dx + pc * IP;
        const float* dyp = dy + pc * P;
        for (int64_t i = 0; i < g.KH; ++i) {
          for (int64_t oh = g.oh_lo[size_t(i)]; oh < g.oh_hi[size_t(i)]; ++oh) {
            float* xr = xp + g.ih(oh, i) * g.IW;
            const float* dyr = dyp + oh * g.OW;
            const float sh = inv_h_[size_t(oh)];
            const float* iw = inv_w_.data();
            for (int64_t j = 0; j < g.KW; ++j) {
              float* xs = xr + j * g.DW - g.PW;
              const int64_t a = g.ow_lo[size_t(j)], e = g.ow_hi[size_t(j)];
              if (g.SW == 1) {
                for (int64_t ow = a; ow < e; ++ow) xs[ow] += dyr[ow] * (sh * iw[ow]);
              } else {
                for (int64_t ow = a; ow < e; ++ow) xs[ow * g.SW] += dyr[ow] * (sh * iw[ow]);
              }
            }
          }
        }
      }
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    return std::vector<bool>(need.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

 private:
  // 1 / (number of taps of window o inside [0, I), or inside [-pb, I + pe) with padding).
  static std::vector<float> inverse_counts(int64_t O, int64_t K, int64_t S, int64_t D,
                                           int64_t pb, int64_t pe, int64_t I, bool incl) {
    std::vector<float> r(static_cast<size_t>(O));
    const int64_t lo = incl ? -pb : 0, hi = incl ? I + pe : I;
    for (int64_t o = 0; o < O; ++o) {
      int64_t cnt = 0;
      for (int64_t t = 0; t < K; ++t) {
        int64_t p = o * S - pb + t * D;
        cnt += (p >= lo && p < hi) ? 1 : 0;
      }
      r[size_t(o)] = cnt > 0 ? 1.f / float(cnt) : 0.f;
    }
    return r;
  }

  WindowGeom g_;
  int64_t planes_ = 0;
  std::vector<float> inv_h_, inv_w_;
};
OpRegistrar avg_pool_registrar("AveragePool", [](const NodeInfo& n,
                                                  const std::vector<Tensor>& in) {
  return is_3d(in) ? make_pool_3d(n, in, false) : std::unique_ptr<Op>(new AveragePool(n, in));
});

// Global pools: x [N, C, spatial...] -> y [N, C, 1, ...].
struct GlobalDims {
  int64_t planes = 0, size = 0;
  Shape out;
};
GlobalDims global_dims(const NodeInfo& n, const std::vector<Tensor>& in) {
  check_num_inputs(n, in, 1, 1);
  check_float(n, in[0], "X");
  PYEDGE_CHECK(in[0].rank() >= 3, n.where(), ": X must be [N, C, spatial...], got ",
               shape_str(in[0].shape));
  GlobalDims d;
  d.planes = in[0].shape[0] * in[0].shape[1];
  d.size = in[0].numel() / std::max<int64_t>(d.planes, 1);
  d.out = Shape(in[0].shape.size(), 1);
  d.out[0] = in[0].shape[0];
  d.out[1] = in[0].shape[1];
  return d;
}

class GlobalAveragePool : public Op {
 public:
  GlobalAveragePool(const NodeInfo& n, const std::vector<Tensor>& in) : d_(global_dims(n, in)) {
    outputs = {make_output(DType::f32, d_.out)};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    const int64_t S = d_.size;
    const float inv = 1.f / float(std::max<int64_t>(S, 1));
    parallel_for(d_.planes, plane_grain(S), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) y[p] = sum8(x + p * S, S) * inv;
    });
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t S = d_.size;
    const float inv = 1.f / float(std::max<int64_t>(S, 1));
    parallel_for(d_.planes, plane_grain(S), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const float g = dy[p] * inv;
        float* xp = dx + p * S;
        for (int64_t i = 0; i < S; ++i) xp[i] += g;
      }
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    return std::vector<bool>(need.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

 private:
  GlobalDims d_;
};
PYEDGE_REGISTER_OP("GlobalAveragePool", GlobalAveragePool);

// GlobalMaxPool keeps the in-plane argmax per (n, c) as a hidden int64 output.
class GlobalMaxPool : public Op {
 public:
  GlobalMaxPool(const NodeInfo& n, const std::vector<Tensor>& in) : d_(global_dims(n, in)) {
    outputs = {make_output(DType::f32, d_.out), make_output(DType::i64, {d_.planes})};
    n_visible = 1;
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    int64_t* arg = out[1].ptr<int64_t>();
    const int64_t S = d_.size;
    parallel_for(d_.planes, plane_grain(S), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const float* xp = x + p * S;
        int64_t best = 0;
        for (int64_t i = 1; i < S; ++i)
          if (xp[i] > xp[best]) best = i;
        y[p] = xp[best];
        arg[p] = best;
      }
    });
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    const int64_t* arg = out[1].ptr<int64_t>();
    float* dx = din[0].ptr<float>();
    for (int64_t p = 0; p < d_.planes; ++p) dx[p * d_.size + arg[p]] += dy[p];
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    return std::vector<bool>(need.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }

 private:
  GlobalDims d_;
};
PYEDGE_REGISTER_OP("GlobalMaxPool", GlobalMaxPool);

}  // namespace
}  // namespace pyedge
