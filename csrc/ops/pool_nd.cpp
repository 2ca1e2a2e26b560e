// 3-D pooling: MaxPool and AveragePool over x [N, C, D, H, W] -> y [N, C, OD, OH, OW].
// pool.cpp runs 1-D and 2-D windows with its tap-major kernels and hands 3-D ones here
// (make_pool_3d). Volumes are rare in the models pyedge trains (video, medical), so this is
// the plain loop: one (n, c) volume per task, every output visits its window's taps and
// skips those outside the input. Same attribute semantics as the 2-D pools (auto_pad, pads,
// strides, dilations, ceil_mode with windows that may reach past the input,
// count_include_pad), same first-maximum rule (taps in row-major order, strict '>').
#include <algorithm>
#include <limits>

#include "common/parallel.h"
#include "ops/pool_nd.h"

namespace pyedge {
namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

struct Axis {
  int64_t in = 1, k = 1, s = 1, d = 1, pb = 0, pe = 0, out = 1;
  std::vector<float> count;  // per output: taps counted by AveragePool's divisor
};

class Pool3d : public Op {
 public:
  Pool3d(const NodeInfo& n, const std::vector<Tensor>& in, bool max) : max_(max) {
    check_num_inputs(n, in, 1, 1);
    check_float(n, in[0], "X");
    const Shape& xs = in[0].shape;
    PYEDGE_CHECK(xs.size() == 5, n.where(), ": X must be [N, C, D, H, W], got ", shape_str(xs));
    PYEDGE_CHECK(n.attrs.has("kernel_shape"), n.where(), ": missing attribute kernel_shape");
    auto kernel = n.attrs.get_ints("kernel_shape");
    auto strides = n.attrs.get_ints("strides", {1, 1, 1});
    auto dil = n.attrs.get_ints("dilations", {1, 1, 1});
    auto pads = n.attrs.get_ints("pads", {0, 0, 0, 0, 0, 0});
    const std::string auto_pad = n.attrs.get_string("auto_pad", "NOTSET");
    const bool ceil_mode = n.attrs.get_int("ceil_mode", 0) != 0;
    const bool incl = n.attrs.get_int("count_include_pad", 0) != 0;
    PYEDGE_CHECK(kernel.size() == 3 && strides.size() == 3 && dil.size() == 3 &&
                     pads.size() == 6, n.where(),
                 ": kernel_shape, strides, dilations need 3 values and pads 6 for a 3-D input");
    PYEDGE_CHECK(n.attrs.get_int("storage_order", 0) == 0, n.where(),
                 ": storage_order=1 (column-major Indices) is not supported");
    for (size_t a = 0; a < 3; ++a) {
      Axis& x = ax_[a];
      x.in = xs[2 + a];
      x.k = kernel[a];
      x.s = strides[a];
      x.d = dil[a];
      x.pb = pads[a];
      x.pe = pads[a + 3];
      PYEDGE_CHECK(x.k >= 1 && x.s >= 1 && x.d >= 1 && x.pb >= 0 && x.pe >= 0, n.where(),
                   ": kernel_shape, strides and dilations must be >= 1, pads >= 0");
      const int64_t eff = (x.k - 1) * x.d + 1;
      if (auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER") {
        x.out = ceil_div(x.in, x.s);
        const int64_t total = std::max<int64_t>(0, (x.out - 1) * x.s + eff - x.in);
        x.pb = auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
        x.pe = total - x.pb;
      } else if (auto_pad == "VALID") {
        x.pb = x.pe = 0;
        x.out = x.in >= eff ? (x.in - eff) / x.s + 1 : 0;
      } else {
        PYEDGE_CHECK(auto_pad == "NOTSET", n.where(), ": unknown auto_pad '", auto_pad, "'");
        const int64_t span = x.in + x.pb + x.pe - eff;
        if (ceil_mode) {
          x.out = std::max<int64_t>(0, ceil_div(span, x.s) + 1);
          if (x.out > 0 && (x.out - 1) * x.s >= x.in + x.pb) --x.out;
        } else {
          x.out = span < 0 ? 0 : span / x.s + 1;
        }
      }
      PYEDGE_CHECK(x.out >= 1, n.where(), ": window (kernel ", x.k, ", dilation ", x.d,
                   ") is larger than the padded input (", x.in, " + pads ", x.pb, "+", x.pe,
                   ") along spatial axis ", a);
      const int64_t lo = incl ? -x.pb : 0, hi = incl ? x.in + x.pe : x.in;
      x.count.resize(size_t(x.out));
      for (int64_t o = 0; o < x.out; ++o) {
        int64_t c = 0;
        for (int64_t t = 0; t < x.k; ++t) {
          const int64_t p = o * x.s - x.pb + t * x.d;
          c += (p >= lo && p < hi) ? 1 : 0;
        }
        x.count[size_t(o)] = float(c);
      }
    }
    planes_ = xs[0] * xs[1];
    in_vol_ = ax_[0].in * ax_[1].in * ax_[2].in;
    out_vol_ = ax_[0].out * ax_[1].out * ax_[2].out;
    const Shape ys = {xs[0], xs[1], ax_[0].out, ax_[1].out, ax_[2].out};
    outputs = {make_output(DType::f32, ys)};
    if (max_) {
      // Indices (ONNX: flat index into X) when listed, else a hidden copy for the backward.
      outputs.push_back(make_output(DType::i64, ys));
      n_visible = n.num_outputs >= 2 ? 2 : 1;
    }
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    float* y = out[0].ptr<float>();
    int64_t* idx = max_ ? out[1].ptr<int64_t>() : nullptr;
    parallel_for(planes_, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc)
        windows([&](int64_t o, const int64_t* taps, int64_t n_taps, float inv) {
          const float* xp = x + pc * in_vol_;
          if (max_) {
            float m = -std::numeric_limits<float>::infinity();
            int64_t arg = -1;
            for (int64_t t = 0; t < n_taps; ++t)
              if (arg < 0 || xp[taps[t]] > m) {
                m = xp[taps[t]];
                arg = taps[t];
              }
            y[pc * out_vol_ + o] = m;
            idx[pc * out_vol_ + o] = arg < 0 ? -1 : pc * in_vol_ + arg;
          } else {
            float s = 0.f;
            for (int64_t t = 0; t < n_taps; ++t) s += xp[taps[t]];
            y[pc * out_vol_ + o] = s * inv;
          }
        });
    });
  }

  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>&, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!din[0].data || !dout[0].data) return;
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    if (max_) {
      const int64_t* idx = out[1].ptr<int64_t>();
      // indices of volume pc stay in volume pc: volumes are race-free tasks
      parallel_for(planes_, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t p = lo * out_vol_; p < hi * out_vol_; ++p)
          if (idx[p] >= 0) dx[idx[p]] += dy[p];
      });
      return;
    }
    parallel_for(planes_, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t pc = lo; pc < hi; ++pc)
        windows([&](int64_t o, const int64_t* taps, int64_t n_taps, float inv) {
          float* xp = dx + pc * in_vol_;
          const float g = dy[pc * out_vol_ + o] * inv;
          for (int64_t t = 0; t < n_taps; ++t) xp[taps[t]] += g;
        });
    });
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    return std::vector<bool>(need.size(), false);
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return max_ ? std::vector<bool>{false, true} : std::vector<bool>{false};
  }

 private:
  // Calls f(output offset in a volume, in-volume offsets of the taps inside X in row-major
  // tap order, their count, 1 / AveragePool's divisor) for every output of one volume.
  template <typename F>
  void windows(F&& f) const {
    const Axis &A = ax_[0], &B = ax_[1], &C = ax_[2];
    // per thread, grown once: a steady-state step allocates nothing
    thread_local std::vector<int64_t> taps;
    const size_t max_taps = size_t(std::max<int64_t>(A.k * B.k * C.k, 1));
    if (taps.size() < max_taps) taps.resize(max_taps);
    int64_t o = 0;
    for (int64_t od = 0; od < A.out; ++od)
      for (int64_t oh = 0; oh < B.out; ++oh)
        for (int64_t ow = 0; ow < C.out; ++ow, ++o) {
          int64_t n = 0;
          for (int64_t i = 0; i < A.k; ++i) {
            const int64_t pd = od * A.s - A.pb + i * A.d;
            if (pd < 0 || pd >= A.in) continue;
            for (int64_t j = 0; j < B.k; ++j) {
              const int64_t ph = oh * B.s - B.pb + j * B.d;
              if (ph < 0 || ph >= B.in) continue;
              for (int64_t k = 0; k < C.k; ++k) {
                const int64_t pw = ow * C.s - C.pb + k * C.d;
                if (pw < 0 || pw >= C.in) continue;
                taps[size_t(n++)] = (pd * B.in + ph) * C.in + pw;
              }
            }
          }
          const float cnt = A.count[size_t(od)] * B.count[size_t(oh)] * C.count[size_t(ow)];
          f(o, taps.data(), n, cnt > 0 ? 1.f / cnt : 0.f);
        }
  }

  bool max_;
  Axis ax_[3];
  int64_t planes_ = 0, in_vol_ = 0, out_vol_ = 0;
};

}  // namespace

std::unique_ptr<Op> make_pool_3d(const NodeInfo& n, const std::vector<Tensor>& in, bool max) {
  return std::unique_ptr<Op>(new Pool3d(n, in, max));
}

}  // namespace pyedge
