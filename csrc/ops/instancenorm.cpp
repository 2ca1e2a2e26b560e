// InstanceNormalization: x [N, C, spatial...], scale [C], B [C] -> y [N, C, spatial...]
//   y = scale[c]·(x - mean[n,c]) / √(var[n,c] + eps) + B[c]
// with mean/var (biased) over the spatial elements of each (n, c) plane. wav2vec2's
// group-norm feature extractor (GroupNorm with one group per channel) exports to this.
// Hidden outputs: the per-plane mean and inverse std [N*C], kept for the backward.
#include <cmath>

#include "common/parallel.h"
#include "ops/op.h"

namespace pyedge {
namespace {

class InstanceNormalization : public Op {
 public:
  InstanceNormalization(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 3, 3);
    const char* names[3] = {"input", "scale", "B"};
    for (size_t i = 0; i < 3; ++i) {
      PYEDGE_CHECK(n.has_input(i), n.where(), ": missing input ", names[i]);
      check_float(n, in[i], names[i]);
    }
    const Shape& xs = in[0].shape;
    PYEDGE_CHECK(xs.size() >= 3, n.where(), ": input must be [N, C, spatial...], got ",
                 shape_str(xs));
    C_ = xs[1];
    planes_ = xs[0] * xs[1];
    S_ = 1;
    for (size_t d = 2; d < xs.size(); ++d) S_ *= xs[d];
    for (size_t i = 1; i < 3; ++i)
      PYEDGE_CHECK(in[i].shape == Shape{C_}, n.where(), ": ", names[i], " has shape ",
                   shape_str(in[i].shape), ", expected [", C_, "] (channels of input ",
                   shape_str(xs), ")");
    eps_ = float(n.attrs.get_float("epsilon", 1e-5));
    outputs = {make_output(DType::f32, xs), make_output(DType::f32, {planes_}),
               make_output(DType::f32, {planes_})};
    n_visible = 1;
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    const float* scale = in[1].ptr<float>();
    const float* bias = in[2].ptr<float>();
    float* y = out[0].ptr<float>();
    float* mean = out[1].ptr<float>();
    float* rstd = out[2].ptr<float>();
    const int64_t S = S_, C = C_;
    parallel_for(planes_, grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const float* xp = x + p * S;
        // Two passes in double: planes are long (wav2vec2: 512 channels x ~16k samples)
        // and a float running sum loses the variance of a plane with a large mean.
        double s = 0;
        for (int64_t i = 0; i < S; ++i) s += xp[i];
        const double mu = S > 0 ? s / double(S) : 0.0;
        double v = 0;
        for (int64_t i = 0; i < S; ++i) {
          const double d = xp[i] - mu;
          v += d * d;
        }
        v = S > 0 ? v / double(S) : 0.0;
        const float r = float(1.0 / std::sqrt(v + double(eps_)));
        mean[p] = float(mu);
        rstd[p] = r;
        const int64_t c = p % C;
        const float a = scale[c] * r, b = bias[c] - float(mu) * a;
        float* yp = y + p * S;
        for (int64_t i = 0; i < S; ++i) yp[i] = xp[i] * a + b;
      }
    });
  }

  bool has_backward() const override { return true; }
  // xhat = (x - mean)·rstd; over one plane of S elements:
  //   dB[c] += Σ dy,  dscale[c] += Σ dy·xhat,
  //   dx = scale·rstd·(dy - mean(dy) - xhat·mean(dy·xhat)).
  // Planes run in parallel for dx; the per-channel sums are added serially afterwards
  // (several planes share a channel).
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!dout[0].data) return;
    const float* x = in[0].ptr<float>();
    const float* scale = in[1].ptr<float>();
    const float* mean = out[1].ptr<float>();
    const float* rstd = out[2].ptr<float>();
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dscale = din[1].data ? din[1].ptr<float>() : nullptr;
    float* dbias = din[2].data ? din[2].ptr<float>() : nullptr;
    const int64_t S = S_, C = C_;
    sums_.assign(size_t(2 * planes_), 0.0);
    double* sdy = sums_.data();
    double* sdyx = sums_.data() + planes_;
    parallel_for(planes_, grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const float* xp = x + p * S;
        const float* dyp = dy + p * S;
        const float mu = mean[p], r = rstd[p];
        double a = 0, b = 0;
        for (int64_t i = 0; i < S; ++i) {
          a += dyp[i];
          b += double(dyp[i]) * double((xp[i] - mu) * r);
        }
        sdy[p] = a;
        sdyx[p] = b;
        if (!dx || S == 0) continue;
        const float k = scale[p % C] * r;
        const float m1 = float(a / double(S)), m2 = float(b / double(S));
        float* dxp = dx + p * S;
        for (int64_t i = 0; i < S; ++i)
          dxp[i] += k * (dyp[i] - m1 - (xp[i] - mu) * r * m2);
      }
    });
    for (int64_t p = 0; p < planes_; ++p) {
      if (dbias) dbias[p % C] += float(sdy[p]);
      if (dscale) dscale[p % C] += float(sdyx[p]);
    }
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>&) const override {
    return {true, true, false};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true, true};
  }

 private:
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(S_, 1)); }

  int64_t C_ = 0, planes_ = 0, S_ = 0;
  float eps_ = 1e-5f;
  std::vector<double> sums_;  // [2, N*C] per-plane Σdy, Σdy·xhat (backward)
};
PYEDGE_REGISTER_OP("InstanceNormalization", InstanceNormalization);

}  // namespace
}  // namespace pyedge
