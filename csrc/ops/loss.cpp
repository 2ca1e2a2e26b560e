// Losses the trainer appends after a model's output (custom domain "pyedge") and ONNX's
// SoftmaxCrossEntropyLoss (exported training graphs).
//
// pyedge.CrossEntropyLoss(logits [..., C], labels [...] int64/int32) -> loss []
//   == torch.nn.functional.cross_entropy(logits.reshape(-1, C), labels.reshape(-1),
//                                        ignore_index, label_smoothing, reduction)
//   shift=1 (causal LM): logits [..., T, C] row t is scored against labels [..., T] at t+1.
//   Difference from torch: when every target is ignored, mean gives 0 (torch: NaN) and the
//   gradient is 0, so a batch of pure padding does not poison the weights.
//   Saves log-sum-exp per row (hidden output, [rows, 2]) rather than the probabilities: the
//   backward recomputes exp(x - lse) from the logits, which are kept anyway.
// pyedge.MSELoss(pred, target) -> mean (or sum) of (pred - target)^2.
// Lets GCC if-convert the float selects in these kernels (clamps, max) and vectorise them;
// no effect on results (no code here relies on FP exception traps).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <string>

#include "common/parallel.h"
#include "ops/op.h"
#include "ops/softmax_kernels.h"

namespace pyedge {
namespace {

using rowk::exp_f;

// Labels must lie in [0, C) unless equal to ignore_index. Checked serially before the parallel
// kernels (an exception must not leave an OpenMP region).
template <typename L, typename RowLabel>
void check_labels(const std::string& where, int64_t rows, int64_t C, bool has_ignore,
                  int64_t ignore, RowLabel&& label_index, const L* lab) {
  for (int64_t r = 0; r < rows; ++r) {
    int64_t v = int64_t(lab[label_index(r)]);
    if (has_ignore && v == ignore) continue;
    PYEDGE_CHECK(v >= 0 && v < C, where, ": label ", v, " (at flat position ", label_index(r),
                 ") is out of range for ", C, " classes; valid labels are 0..", C - 1,
                 has_ignore ? str_cat(" or ignore_index ", ignore) : std::string());
  }
}

class CrossEntropyLoss : public Op {
 public:
  CrossEntropyLoss(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 2, 2);
    check_float(n, in[0], "logits");
    const Tensor& lg = in[0];
    const Tensor& lb = in[1];
    PYEDGE_CHECK(lb.dtype == DType::i64 || lb.dtype == DType::i32, where_,
                 ": labels must be int64 or int32, got ", dtype_name(lb.dtype));
    PYEDGE_CHECK(lg.rank() >= 1, where_, ": logits must have a class dimension");
    C_ = lg.shape.back();
    PYEDGE_CHECK(C_ > 0, where_, ": logits have 0 classes");
    Shape lead(lg.shape.begin(), lg.shape.end() - 1);
    PYEDGE_CHECK(lb.shape == lead, where_, ": labels shape ", shape_str(lb.shape),
                 " must equal the logits shape without its class dim ", shape_str(lead),
                 " (logits ", shape_str(lg.shape), ")");
    shift_ = n.attrs.get_int("shift", 0) != 0;
    ignore_ = n.attrs.get_int("ignore_index", -100);
    eps_ = float(n.attrs.get_float("label_smoothing", 0.0));
    PYEDGE_CHECK(eps_ >= 0.f && eps_ <= 1.f, where_, ": label_smoothing must be in [0, 1], got ",
                 eps_);
    std::string red = n.attrs.get_string("reduction", "mean");
    PYEDGE_CHECK(red == "mean" || red == "sum", where_, ": reduction must be 'mean' or 'sum', got '",
                 red, "'");
    mean_ = red == "mean";
    if (shift_) {
      PYEDGE_CHECK(lb.rank() >= 1, where_, ": shift=1 needs labels [..., T]");
      T_ = lb.shape.back();
      rows_ = T_ > 0 ? lb.numel() / T_ * (T_ - 1) : 0;
    } else {
      rows_ = lb.numel();
    }
    // hidden: per row (max, log(sum(exp(x - max)))), kept apart for precision
    outputs = {make_output(DType::f32, {}), make_output(DType::f32, {rows_, 2})};
    n_visible = 1;
  }

  size_t forward_scratch_bytes() const override { return size_t(rows_) * sizeof(float); }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    if (in[1].dtype == DType::i64) fwd<int64_t>(in, out, ctx);
    else fwd<int32_t>(in, out, ctx);
  }

  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext& ctx) override {
    if (din[0].data == nullptr || dout[0].data == nullptr) return;
    if (in[1].dtype == DType::i64) bwd<int64_t>(in, out, dout, din, ctx.fresh(0));
    else bwd<int32_t>(in, out, dout, din, ctx.fresh(0));
  }
  bool assigns_fresh_grads() const override { return true; }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    return {true, true};
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }

 private:
  std::string where_;
  int64_t C_ = 0, T_ = 0, rows_ = 0, ignore_ = -100;
  float eps_ = 0.f;
  bool shift_ = false, mean_ = true;

  // row r -> (logits row, label index)
  int64_t logit_row(int64_t r) const { return shift_ ? r / (T_ - 1) * T_ + r % (T_ - 1) : r; }
  int64_t label_index(int64_t r) const { return shift_ ? logit_row(r) + 1 : r; }

  template <typename L>
  int64_t count_valid(const L* lab) const {
    int64_t nv = 0;
    for (int64_t r = 0; r < rows_; ++r) nv += int64_t(lab[label_index(r)]) != ignore_;
    return nv;
  }

  template <typename L>
  void fwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext& ctx) {
    const float* x = in[0].ptr<float>();
    const L* lab = in[1].ptr<L>();
    float* loss = out[0].ptr<float>();
    float* lse = out[1].ptr<float>();
    float* row_loss = static_cast<float*>(ctx.scratch);
    const int64_t C = C_;
    check_labels<L>(where_, rows_, C, true, ignore_, [&](int64_t r) { return label_index(r); },
                    lab);
    const float eps = eps_, invC = 1.f / float(C);
    parallel_for(rows_, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t y = int64_t(lab[label_index(r)]);
        if (y == ignore_) {
          lse[2 * r] = lse[2 * r + 1] = 0.f;
          row_loss[r] = 0.f;
          continue;
        }
        const float* xr = x + logit_row(r) * C;
        // loss = lse - (1-eps)*x_y - eps*mean(x), with lse = m + log(s) kept split for
        // precision when |m| is large
        float m = rowk::row_max(xr, C);
        float ls = std::log(rowk::exp_sum(xr, m, C));
        lse[2 * r] = m;
        lse[2 * r + 1] = ls;
        float v = ls + (1.f - eps) * (m - xr[y]);
        if (eps > 0.f) v += eps * (m - rowk::row_sum(xr, C) * invC);
        row_loss[r] = v;
      }
    });
    double s = 0.0;
    for (int64_t r = 0; r < rows_; ++r) s += row_loss[r];
    int64_t nv = mean_ ? count_valid(lab) : 1;
    loss[0] = nv > 0 ? float(s / double(nv)) : 0.f;
  }

  template <typename L>
  void bwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
           const std::vector<Tensor>& dout, const std::vector<Tensor>& din, bool assign) {
    const float* x = in[0].ptr<float>();
    const L* lab = in[1].ptr<L>();
    const float* lse = out[1].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t C = C_;
    int64_t nv = mean_ ? count_valid(lab) : 1;
    if (nv == 0) {
      if (assign) std::fill(dx, dx + din[0].numel(), 0.f);
      return;
    }
    // A fresh buffer: the rows no label reads (the last position of each sequence when
    // shifted) are zeroed here; ignored rows are zeroed in the loop.
    if (assign && shift_)
      for (int64_t lr = T_ - 1; lr < din[0].numel() / C; lr += T_)
        std::fill(dx + lr * C, dx + (lr + 1) * C, 0.f);
    const float g = dout[0].ptr<float>()[0] / float(nv);
    const float off = g * eps_ / float(C), hit = g * (1.f - eps_);
    parallel_for(rows_, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t y = int64_t(lab[label_index(r)]);
        int64_t lr = logit_row(r);
        float* dr = dx + lr * C;
        if (y == ignore_) {
          if (assign) std::fill(dr, dr + C, 0.f);
          continue;
        }
        const float* xr = x + lr * C;
        const float m = lse[2 * r], ls = lse[2 * r + 1];
        if (assign)
          for (int64_t c = 0; c < C; ++c) dr[c] = g * exp_f((xr[c] - m) - ls) - off;
        else
          for (int64_t c = 0; c < C; ++c) dr[c] += g * exp_f((xr[c] - m) - ls) - off;
        dr[y] -= hit;
      }
    });
  }
};
PYEDGE_REGISTER_OP("pyedge.CrossEntropyLoss", CrossEntropyLoss);

// Deterministic parallel sum of f(i) over [0, n): fixed blocks, partials on the stack.
template <typename F>
double block_sum(int64_t n, F&& f) {
  constexpr int64_t kMaxBlocks = 64;
  int64_t nb = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, n / (1 << 15)));
  int64_t per = (n + nb - 1) / nb;
  double part[kMaxBlocks];
  parallel_for(nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      int64_t i0 = std::min(n, blk * per), i1 = std::min(n, i0 + per);
      float acc[rowk::kLanes] = {};
      int64_t i = i0;
      for (; i + rowk::kLanes <= i1; i += rowk::kLanes)
        for (int j = 0; j < rowk::kLanes; ++j) acc[j] += f(i + j);
      double s = 0.0;
      for (int j = 0; j < rowk::kLanes; ++j) s += acc[j];
      for (; i < i1; ++i) s += f(i);
      part[blk] = s;
    }
  });
  double s = 0.0;
  for (int64_t blk = 0; blk < nb; ++blk) s += part[blk];
  return s;
}

Shape squeeze_ones(const Shape& s) {
  Shape r;
  for (int64_t d : s)
    if (d != 1) r.push_back(d);
  return r;
}

class MSELoss : public Op {
 public:
  MSELoss(const NodeInfo& n, const std::vector<Tensor>& in) {
    check_num_inputs(n, in, 2, 2);
    check_float(n, in[0], "pred");
    check_float(n, in[1], "target");
    // same shape up to size-1 dims ([N, 1] vs [N]); torch would broadcast that to [N, N]
    PYEDGE_CHECK(squeeze_ones(in[0].shape) == squeeze_ones(in[1].shape), n.where(),
                 ": pred shape ", shape_str(in[0].shape), " and target shape ",
                 shape_str(in[1].shape), " differ");
    std::string red = n.attrs.get_string("reduction", "mean");
    PYEDGE_CHECK(red == "mean" || red == "sum", n.where(),
                 ": reduction must be 'mean' or 'sum', got '", red, "'");
    mean_ = red == "mean";
    n_ = in[0].numel();
    outputs = {make_output(DType::f32, {})};
  }
  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext&) override {
    const float* p = in[0].ptr<float>();
    const float* t = in[1].ptr<float>();
    double s = block_sum(n_, [&](int64_t i) {
      float d = p[i] - t[i];
      return d * d;
    });
    out[0].ptr<float>()[0] = float(mean_ ? (n_ > 0 ? s / double(n_) : 0.0) : s);
  }
  bool has_backward() const override { return true; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (dout[0].data == nullptr || n_ == 0) return;
    const float* p = in[0].ptr<float>();
    const float* t = in[1].ptr<float>();
    float* dp = din[0].data ? din[0].ptr<float>() : nullptr;
    float* dt = din[1].data ? din[1].ptr<float>() : nullptr;
    const float g = 2.f * dout[0].ptr<float>()[0] / (mean_ ? float(n_) : 1.f);
    parallel_for(n_, 1 << 14, [&](int64_t b, int64_t e) {
      if (dp)
        for (int64_t i = b; i < e; ++i) dp[i] += g * (p[i] - t[i]);
      if (dt)
        for (int64_t i = b; i < e; ++i) dt[i] -= g * (p[i] - t[i]);
    });
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false};
  }

 private:
  int64_t n_ = 0;
  bool mean_ = true;
};
PYEDGE_REGISTER_OP("pyedge.MSELoss", MSELoss);

// ONNX SoftmaxCrossEntropyLoss (opset 12/13): scores [N, C, d...] (class axis 1), labels
// [N, d...], optional weights [C]; reduction mean (weighted: sum(w_y * l) / sum(w_y)), sum or
// none ([N, d...]). Outputs loss and log_prob [N, C, d...]. log_prob is always produced (the op
// does not know whether the node lists it) and is what the backward reads, so the scores can
// be freed after the forward: dx = w_y * g * (exp(log_prob) - onehot(y)).
class SoftmaxCrossEntropyLoss : public Op {
 public:
  SoftmaxCrossEntropyLoss(const NodeInfo& n, const std::vector<Tensor>& in) : where_(n.where()) {
    check_num_inputs(n, in, 2, 3);
    check_float(n, in[0], "scores");
    const Tensor& sc = in[0];
    const Tensor& lb = in[1];
    PYEDGE_CHECK(lb.dtype == DType::i64 || lb.dtype == DType::i32, where_,
                 ": labels must be int64 or int32, got ", dtype_name(lb.dtype));
    PYEDGE_CHECK(sc.rank() >= 2, where_, ": scores must be [N, C, ...], got ",
                 shape_str(sc.shape));
    Shape want = sc.shape;
    want.erase(want.begin() + 1);
    PYEDGE_CHECK(lb.shape == want, where_, ": labels shape ", shape_str(lb.shape),
                 " must be scores shape without the class axis ", shape_str(want));
    N_ = sc.shape[0];
    C_ = sc.shape[1];
    D_ = 1;
    for (size_t i = 2; i < sc.shape.size(); ++i) D_ *= sc.shape[i];
    has_w_ = in.size() > 2 && n.has_input(2);
    if (has_w_) {
      check_float(n, in[2], "weights");
      PYEDGE_CHECK(in[2].shape == Shape{C_}, where_, ": weights must be [", C_, "], got ",
                   shape_str(in[2].shape));
    }
    has_ignore_ = n.attrs.has("ignore_index");
    ignore_ = n.attrs.get_int("ignore_index", 0);
    std::string red = n.attrs.get_string("reduction", "mean");
    PYEDGE_CHECK(red == "mean" || red == "sum" || red == "none", where_,
                 ": reduction must be 'mean', 'sum' or 'none', got '", red, "'");
    red_ = red == "mean" ? 0 : red == "sum" ? 1 : 2;
    outputs = {make_output(DType::f32, red_ == 2 ? want : Shape{}),
               make_output(DType::f32, sc.shape)};
    n_visible = 2;
  }

  // per row: weighted loss, weight
  size_t forward_scratch_bytes() const override { return size_t(2 * N_ * D_) * sizeof(float); }

  void forward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
               RunContext& ctx) override {
    if (in[1].dtype == DType::i64) fwd<int64_t>(in, out, ctx);
    else fwd<int32_t>(in, out, ctx);
  }
  bool has_backward() const override { return true; }
  bool differentiable_input(size_t i) const override { return i == 0; }
  void backward(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                const std::vector<Tensor>& dout, const std::vector<Tensor>& din,
                RunContext&) override {
    if (din[0].data == nullptr) return;
    if (dout[1].data) logprob_backward(out[1].ptr<float>(), dout[1].ptr<float>(),
                                       din[0].ptr<float>());
    if (dout[0].data == nullptr) return;
    if (in[1].dtype == DType::i64) bwd<int64_t>(in, out, dout, din);
    else bwd<int32_t>(in, out, dout, din);
  }
  std::vector<bool> backward_reads_inputs(const std::vector<bool>& ng) const override {
    std::vector<bool> r(ng.size(), true);
    r[0] = false;  // reads log_prob instead of the scores
    return r;
  }
  std::vector<bool> backward_reads_outputs(const std::vector<bool>&) const override {
    return {false, true};
  }

 private:
  std::string where_;
  int64_t N_ = 0, C_ = 0, D_ = 1, ignore_ = 0;
  bool has_w_ = false, has_ignore_ = false;
  int red_ = 0;  // 0 mean, 1 sum, 2 none

  bool ignored(int64_t y) const { return has_ignore_ && y == ignore_; }

  // log_prob of one row (n, d): elements at stride D_ (stride 1 when kContig).
  template <bool kContig>
  void row_logprob(const float* x, float* lp) const {
    const int64_t C = C_, st = kContig ? 1 : D_;
    if (kContig) {
      float m = rowk::row_max(x, C);
      float ls = std::log(rowk::exp_sum(x, m, C));
      for (int64_t c = 0; c < C; ++c) lp[c] = (x[c] - m) - ls;
      return;
    }
    float m = x[0];
    for (int64_t c = 1; c < C; ++c) m = x[c * st] > m ? x[c * st] : m;
    float s = 0.f;
    for (int64_t c = 0; c < C; ++c) s += exp_f(x[c * st] - m);
    float ls = std::log(s);
    for (int64_t c = 0; c < C; ++c) lp[c * st] = (x[c * st] - m) - ls;
  }

  template <typename L>
  void fwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out, RunContext& ctx) {
    const float* x = in[0].ptr<float>();
    const L* lab = in[1].ptr<L>();
    const float* w = has_w_ ? in[2].ptr<float>() : nullptr;
    float* loss = out[0].ptr<float>();
    float* lp = out[1].ptr<float>();
    const int64_t rows = N_ * D_, C = C_, D = D_;
    check_labels<L>(where_, rows, C, has_ignore_, ignore_, [](int64_t r) { return r; }, lab);
    float* rl = static_cast<float*>(ctx.scratch);  // [rows] weighted loss
    float* rw = rl + rows;                         // [rows] weight
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                 [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t nn = r / D, d = r % D, base = nn * C * D + d;
        if (D == 1) row_logprob<true>(x + base, lp + base);
        else row_logprob<false>(x + base, lp + base);
        int64_t y = int64_t(lab[r]);
        if (ignored(y)) {
          rl[r] = 0.f;
          rw[r] = 0.f;
          continue;
        }
        float wy = w ? w[y] : 1.f;
        rl[r] = -wy * lp[base + y * D];
        rw[r] = wy;
      }
    });
    if (red_ == 2) {
      for (int64_t r = 0; r < rows; ++r) loss[r] = rl[r];
      return;
    }
    double s = 0.0, sw = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      s += rl[r];
      sw += rw[r];
    }
    loss[0] = float(red_ == 1 ? s : (sw != 0.0 ? s / sw : 0.0));
  }

  // Gradient through the log_prob output: dx = dlp - softmax * sum_c(dlp).
  void logprob_backward(const float* lp, const float* dlp, float* dx) const {
    const int64_t rows = N_ * D_, C = C_, D = D_;
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                 [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t base = r / D * C * D + r % D;
        const float* l = lp + base;
        const float* g = dlp + base;
        float* dr = dx + base;
        if (D == 1) {
          float s = rowk::row_sum(g, C);
          for (int64_t c = 0; c < C; ++c) dr[c] += g[c] - exp_f(l[c]) * s;
        } else {
          float s = 0.f;
          for (int64_t c = 0; c < C; ++c) s += g[c * D];
          for (int64_t c = 0; c < C; ++c) dr[c * D] += g[c * D] - exp_f(l[c * D]) * s;
        }
      }
    });
  }

  template <typename L>
  void bwd(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
           const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    const L* lab = in[1].ptr<L>();
    const float* w = has_w_ ? in[2].ptr<float>() : nullptr;
    const float* lp = out[1].ptr<float>();
    const float* dl = dout[0].ptr<float>();
    float* dx = din[0].ptr<float>();
    const int64_t rows = N_ * D_, C = C_, D = D_;
    float scale = red_ == 2 ? 1.f : dl[0];
    if (red_ == 0) {
      double sw = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t y = int64_t(lab[r]);
        if (!ignored(y)) sw += w ? w[y] : 1.f;
      }
      if (sw == 0.0) return;
      scale = float(dl[0] / sw);
    }
    parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                 [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t y = int64_t(lab[r]);
        if (ignored(y)) continue;
        float g = (red_ == 2 ? dl[r] : scale) * (w ? w[y] : 1.f);
        int64_t nn = r / D, d = r % D, base = nn * C * D + d;
        const float* l = lp + base;
        float* dr = dx + base;
        if (D == 1)
          for (int64_t c = 0; c < C; ++c) dr[c] += g * exp_f(l[c]);
        else
          for (int64_t c = 0; c < C; ++c) dr[c * D] += g * exp_f(l[c * D]);
        dr[y * D] -= g;
      }
    });
  }
};
PYEDGE_REGISTER_OP("SoftmaxCrossEntropyLoss", SoftmaxCrossEntropyLoss);

}  // namespace
}  // namespace pyedge
