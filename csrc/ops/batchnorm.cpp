// BatchNormalization, x [N, C, spatial...] (or [N, C]); scale, B, mean, var [C].
// Inference (training_mode absent or 0): y = scale·(x - mean)/√(var + eps) + B with the given
// running statistics. Training (training_mode=1, opset 14+): batch statistics (biased
// variance, as the ONNX spec): Y and, when listed, running_mean / running_var (momentum-
// updated), plus hidden saved mean / inverse std for the backward (matches torch's batch_norm).
#include <cmath>

#include "common/parallel.h"
#include "ops/conv_im2col.h"

namespace pyedge {
namespace {

// Σ d[i]·(x[i] - mu), 8 partial sums so it vectorises.
float dot_centered(const float* d, const float* x, float mu, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += d[i + k] * (x[i + k] - mu);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += d[i] * (x[i] - mu);
  return s;
}

class BatchNormalization : public Op {
 public:
  BatchNormalization(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 5, 5);
    const char* names[5] = {"X", "scale", "B", "input_mean", "input_var"};
    for (size_t i = 0; i < 5; ++i) {
      PYEDGE_CHECK(n.has_input(i), n.where(), ": missing input ", names[i]);
      check_float(n, in[i], names[i]);
    }
    const Shape& xs = in[0].shape;
    PYEDGE_CHECK(xs.size() >= 2, n.where(), ": X must be [N, C, ...], got ", shape_str(xs));
    N_ = xs[0];
    C_ = xs[1];
    S_ = 1;
    for (size_t d = 2; d < xs.size(); ++d) S_ *= xs[d];
    for (size_t i = 1; i < 5; ++i)
      PYEDGE_CHECK(in[i].shape == Shape{C_}, n.where(), ": ", names[i], " has shape ",
                   shape_str(in[i].shape), ", expected [", C_, "] (channels of X ",
                   shape_str(xs), ")");
    eps_ = float(n.attrs.get_float("epsilon", 1e-5));
    momentum_ = float(n.attrs.get_float("momentum", 0.9));
    training_ = n.attrs.get_int("training_mode", 0) != 0;
    PYEDGE_CHECK(!training_ || n.opset >= 14, n.where(),
                 ": training_mode needs opset 14 or later (model has ", n.opset, ")");
    PYEDGE_CHECK(training_ || n.num_outputs == 1, n.where(), ": ", n.num_outputs,
                 " outputs need training mode (training_mode=1, opset 14+); pyedge does not "
                 "support the pre-opset-14 training outputs");
    PYEDGE_CHECK(n.num_outputs >= 1 && n.num_outputs <= 3, n.where(),
                 ": expected 1 to 3 outputs, got ", n.num_outputs);
    // Visible: Y, then running_mean / running_var as far as the node lists them; hidden:
    // saved mean and inverse std for the backward.
    outputs = {make_output(DType::f32, xs)};
    if (training_) {
      for (int k = 1; k < n.num_outputs; ++k) outputs.push_back(make_output(DType::f32, {C_}));
      n_visible = int(outputs.size());
      saved_ = int(outputs.size());
      outputs.push_back(make_output(DType::f32, {C_}));
      outputs.push_back(make_output(DType::f32, {C_}));
    }
  }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* x = in[0].ptr<float>();
    const float* scale = in[1].ptr<float>();
    const float* bias = in[2].ptr<float>();
    const float* mean = in[3].ptr<float>();
    const float* var = in[4].ptr<float>();
    float* y = out[0].ptr<float>();
    const int64_t C = C_, S = S_, N = N_;
    if (!training_) {
      const float eps = eps_;
      parallel_for(N_ * C_, std::max<int64_t>(1, 16384 / S), [&](int64_t lo, int64_t hi) {
        for (int64_t pc = lo; pc < hi; ++pc) {
          const int64_t c = pc % C;
          const float a = scale[c] / std::sqrt(var[c] + eps), b = bias[c] - mean[c] * a;
          const float* xp = x + pc * S;
          float* yp = y + pc * S;
          for (int64_t i = 0; i < S; ++i) yp[i] = xp[i] * a + b;
        }
      });
      return;
    }
    float* run_mean = saved_ > 1 ? out[1].ptr<float>() : nullptr;
    float* run_var = saved_ > 2 ? out[2].ptr<float>() : nullptr;
    float* save_mean = out[size_t(saved_)].ptr<float>();
    float* save_istd = out[size_t(saved_) + 1].ptr<float>();
    const double cnt = double(N * S);
    parallel_for(C_, std::max<int64_t>(1, 16384 / (N * S)), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        double s = 0;
        for (int64_t n = 0; n < N; ++n) s += sum8(x + (n * C + c) * S, S);
        const float mu = float(s / cnt);
        double ss = 0;  // second pass: Σ (x - mean)² is exact where Σx² - n·mean² is not
        for (int64_t n = 0; n < N; ++n) {
          const float* xp = x + (n * C + c) * S;
          float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t i = 0;
          for (; i + 8 <= S; i += 8)
            for (int k = 0; k < 8; ++k) acc[k] += (xp[i + k] - mu) * (xp[i + k] - mu);
          float t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
          for (; i < S; ++i) t += (xp[i] - mu) * (xp[i] - mu);
          ss += t;
        }
        const float v = float(ss / cnt);
        const float istd = 1.f / std::sqrt(v + eps_);
        save_mean[c] = mu;
        save_istd[c] = istd;
        if (run_mean) run_mean[c] = mean[c] * momentum_ + mu * (1.f - momentum_);
        if (run_var) run_var[c] = var[c] * momentum_ + v * (1.f - momentum_);
        const float a = scale[c] * istd, b = bias[c] - mu * a;
        for (int64_t n = 0; n < N; ++n) {
          const float* xp = x + (n * C + c) * S;
          float* yp = y + (n * C + c) * S;
          for (int64_t i = 0; i < S; ++i) yp[i] = xp[i] * a + b;
        }
      }
    });
  }

  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i < 3; }

  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (!dout[0].data) return;  // running statistics carry no gradient
    const float* dy = dout[0].ptr<float>();
    float* dx = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dscale = din[1].data ? din[1].ptr<float>() : nullptr;
    float* dbias = din[2].data ? din[2].ptr<float>() : nullptr;
    if (!dx && !dscale && !dbias) return;
    // Read only what backward_reads_* promised.
    const float* x = (dx || dscale) ? in[0].ptr<float>() : nullptr;
    const float* scale = dx ? in[1].ptr<float>() : nullptr;
    const float* mean = nullptr;
    const float* istd_saved = nullptr;
    const float* var = nullptr;
    if (training_) {
      if (dx || dscale) {
        mean = out[size_t(saved_)].ptr<float>();
        istd_saved = out[size_t(saved_) + 1].ptr<float>();
      }
    } else {
      if (dscale) mean = in[3].ptr<float>();
      if (dx || dscale) var = in[4].ptr<float>();
    }
    const int64_t C = C_, S = S_, N = N_;
    const float cnt = float(N * S);
    parallel_for(C_, std::max<int64_t>(1, 16384 / (N * S)), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const float istd = training_ ? (istd_saved ? istd_saved[c] : 0.f)
                                     : (var ? 1.f / std::sqrt(var[c] + eps_) : 0.f);
        const float mu = mean ? mean[c] : 0.f;
        // Σ dy and Σ dy·(x - mean) over the channel, when needed.
        const bool need_sums = dbias || dscale || (training_ && dx);
        const bool need_xmu = dscale || (training_ && dx);
        double sdy = 0, sdyx = 0;
        if (need_sums) {
          for (int64_t n = 0; n < N; ++n) {
            const float* d = dy + (n * C + c) * S;
            sdy += sum8(d, S);
            if (need_xmu) sdyx += dot_centered(d, x + (n * C + c) * S, mu, S);
          }
        }
        if (dbias) dbias[c] += float(sdy);
        if (dscale) dscale[c] += float(sdyx) * istd;
        if (!dx) continue;
        const float k = scale[c] * istd;
        if (!training_) {
          for (int64_t n = 0; n < N; ++n) {
            const float* d = dy + (n * C + c) * S;
            float* g = dx + (n * C + c) * S;
            for (int64_t i = 0; i < S; ++i) g[i] += k * d[i];
          }
          continue;
        }
        // dx = k·(dy - Σdy/cnt - (x - mean)·istd²·Σdy(x - mean)/cnt)
        const float a = float(sdy) / cnt, b = istd * istd * float(sdyx) / cnt;
        for (int64_t n = 0; n < N; ++n) {
          const float* d = dy + (n * C + c) * S;
          const float* xp = x + (n * C + c) * S;
          float* g = dx + (n * C + c) * S;
          for (int64_t i = 0; i < S; ++i) g[i] += k * (d[i] - a - (xp[i] - mu) * b);
        }
      }
    });
  }

  std::vector<bool> backward_reads_inputs(const std::vector<bool>& need) const override {
    std::vector<bool> r(need.size(), false);
    const bool dx = need.size() > 0 && need[0], ds = need.size() > 1 && need[1];
    r[0] = dx || ds;
    r[1] = dx;
    if (!training_) {
      r[3] = ds;
      r[4] = dx || ds;
    }
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>& need) const override {
    std::vector<bool> r(outputs.size(), false);
    const bool dx = need.size() > 0 && need[0], ds = need.size() > 1 && need[1];
    if (training_) r[size_t(saved_)] = r[size_t(saved_) + 1] = dx || ds;
    return r;
  }

 private:
  int64_t N_ = 0, C_ = 0, S_ = 1;
  float eps_ = 1e-5f, momentum_ = 0.9f;
  bool training_ = false;
  int saved_ = 0;  // index of the hidden saved mean (inverse std follows) in training mode
};
PYEDGE_REGISTER_OP("BatchNormalization", BatchNormalization);

}  // namespace
}  // namespace pyedge
